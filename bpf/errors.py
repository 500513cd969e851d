"""Errors raised by the BPF binding. Every error names the object it concerns and its errno."""

from __future__ import annotations

import errno as _errno
import os


class BpfError(OSError):
    """A libbpf or bpf(2) failure: ``errno`` plus a message naming the map, program or path."""

    def __init__(self, errno: int, what: str, detail: str = "") -> None:
        reason = os.strerror(errno) if errno else "unknown error"
        name = _errno.errorcode.get(errno, str(errno))
        message = f"{what}: {reason} ({name})"
        if detail:
            message = f"{message}\n{detail}"
        super().__init__(errno, message)
        self.what = what
        self.detail = detail

    def __str__(self) -> str:
        return str(self.strerror)


class LibbpfMissingError(RuntimeError):
    """The system libbpf shared library could not be loaded."""


class RuleLimitError(ValueError):
    """A rule set does not fit the datapath's limits; raised instead of truncating rules."""
