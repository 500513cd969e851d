"""The local flow log file: appended in batches, rotated by size, bounded backups.

``path`` is rotated to ``path.1`` (``.1`` to ``.2`` ...) when a write would take it past
``max_bytes``; the oldest backup beyond ``backups`` is removed. Writes are batched per
ring-buffer drain and flushed at once, so an operator tailing the file sees decisions
within a drain.
"""

from __future__ import annotations

import contextlib
import os
from typing import TextIO


class RotatingFile:
    def __init__(self, path: str, *, max_bytes: int, backups: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self.rotations = 0
        self.bytes_written = 0
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._f: TextIO = open(path, "a", encoding="utf-8")  # noqa: SIM115 (long-lived)
        self._size = self._f.tell()

    def write_lines(self, lines: list[str]) -> None:
        if not lines:
            return
        chunk = "".join(lines)
        size = len(chunk.encode("utf-8")) if not chunk.isascii() else len(chunk)
        if self._size and self._size + size > self.max_bytes:
            self.rotate()
        self._f.write(chunk)
        self._f.flush()
        self._size += size
        self.bytes_written += size

    def rotate(self) -> None:
        self._f.close()
        if self.backups == 0:
            os.unlink(self.path)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{self.path}.{self.backups}")
            for i in range(self.backups - 1, 0, -1):
                with contextlib.suppress(FileNotFoundError):
                    os.replace(f"{self.path}.{i}", f"{self.path}.{i + 1}")
            os.replace(self.path, f"{self.path}.1")
        self._f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
        self._size = 0
        self.rotations += 1

    def close(self) -> None:
        self._f.close()
