"""The local flow log file: appended in batches, rotated by size, bounded backups; never
lost track of, and never a reason to lose count.

``path`` is rotated to ``path.1`` (``.1`` to ``.2`` ...) when a write would take it past
``max_bytes``; the oldest backup beyond ``backups`` is removed. Writes are batched per
ring-buffer drain and written at once (one ``write`` of the batch, appended), so an
operator tailing the file sees decisions within a drain.

- **The file is followed by name.** Before each batch the path is compared with the open
  file (device and inode): when it was deleted, or moved away by logrotate, the file is
  opened again at the path (and on :meth:`reopen`, which SIGHUP calls). Nothing goes into
  an unlinked file.
- **What cannot be written is counted**, by reason (``disk_full``: ENOSPC or EDQUOT,
  ``file_error``: any other), a line at a time: a line cut short by a full disk counts as
  lost, and the next write starts on a new line. The state is logged when it changes
  (unwritable, then writable again with how many lines were lost meanwhile), not per
  batch; each batch tries again, so writing resumes when space returns.
- The mode of a created file is ``mode`` (``--flow-log-file-mode``, 0600 by default:
  flow logs show every pod's connections, which not every local user should read).
"""

from __future__ import annotations

import contextlib
import errno
import os
from dataclasses import dataclass, field

import structlog

log = structlog.get_logger("flowlogs.sink")

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


@dataclass
class SinkStats:
    lines_written: int = 0
    bytes_written: int = 0
    rotations: int = 0
    reopened: int = 0
    lost: dict[str, int] = field(default_factory=lambda: {"disk_full": 0, "file_error": 0})
    last_error: str = ""


class RotatingFile:
    def __init__(
        self, path: str, *, max_bytes: int, backups: int, mode: int = 0o600, name: str = "flow log"
    ) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self.mode = mode
        self.name = name
        self.stats = SinkStats()
        self._fd = -1
        self._ident: tuple[int, int] = (0, 0)
        self._size = 0
        self._torn = False  # the last write ended mid-line
        self._failing: str | None = None  # reason while writes fail
        self._lost_while_failing = 0
        self._reopen = False
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._open()

    # ---- compatibility with the counters callers read -----------------------------------
    @property
    def rotations(self) -> int:
        return self.stats.rotations

    @property
    def bytes_written(self) -> int:
        return self.stats.bytes_written

    # ---- writing ----------------------------------------------------------------------
    def write_lines(self, lines: list[str]) -> int:
        """Append ``lines`` (each ending in a newline); returns how many were written
        whole. The rest are counted in ``stats.lost`` by reason."""
        if not lines:
            return 0
        try:
            self._follow()
            data = "".join(lines).encode("utf-8")
            if self._size and self._size + len(data) > self.max_bytes:
                self.rotate()
            if self._torn:
                data = b"\n" + data
            self._write_all(data)
        except OSError as exc:
            return self._failed(exc, lines)
        self._torn = False
        self._succeeded()
        self.stats.lines_written += len(lines)
        return len(lines)

    def _write_all(self, data: bytes) -> int:
        view = memoryview(data)
        done = 0
        try:
            while done < len(data):
                n = os.write(self._fd, view[done:])
                done += n
                self._size += n
                self.stats.bytes_written += n
        except OSError as exc:
            exc.partial = done  # type: ignore[attr-defined]
            raise
        return done

    def _failed(self, exc: OSError, lines: list[str]) -> int:
        """Count the lines not written whole; log the state if it changed."""
        partial: int = getattr(exc, "partial", 0)
        whole = 0
        if partial:
            if self._torn:
                partial -= 1  # the newline ending the earlier torn line
            for line in lines:
                size = len(line.encode("utf-8"))
                if partial < size:
                    break
                partial -= size
                whole += 1
            self._torn = partial > 0
        lost = len(lines) - whole
        reason = "disk_full" if exc.errno in DISK_FULL else "file_error"
        self.stats.lost[reason] += lost
        self.stats.lines_written += whole
        self.stats.last_error = f"{exc.strerror or exc} ({self.path})"
        self._lost_while_failing += lost
        if self._failing != reason:
            self._failing = reason
            log.error(
                "flowlogs.file_unwritable",
                file=self.path,
                what=self.name,
                reason=reason,
                error=self.stats.last_error,
                effect="lines are counted as lost until writes succeed again",
            )
        return whole

    def _succeeded(self) -> None:
        if self._failing is not None:
            log.warning(
                "flowlogs.file_writable_again",
                file=self.path,
                what=self.name,
                lost_meanwhile=self._lost_while_failing,
                reason=self._failing,
            )
            self._failing = None
            self._lost_while_failing = 0
            self.stats.last_error = ""

    # ---- following the path -------------------------------------------------------------
    def reopen(self) -> None:
        """Open the path again before the next write (SIGHUP, as logrotate expects)."""
        self._reopen = True

    def _follow(self) -> None:
        """The open file is the one the path names; else open the path (again)."""
        why = "requested" if self._reopen else "closed" if self._fd < 0 else ""
        if not why:
            try:
                st = os.stat(self.path)
                if (st.st_dev, st.st_ino) != self._ident:
                    why = "replaced"
            except FileNotFoundError:
                why = "deleted"
        if why:
            self._reopen = False
            self._close_fd()
            self._open()
            self.stats.reopened += 1
            log.warning("flowlogs.file_reopened", file=self.path, what=self.name, reason=why)

    def _open(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self._fd = os.open(
            self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, self.mode
        )
        st = os.fstat(self._fd)
        self._ident = (st.st_dev, st.st_ino)
        self._size = st.st_size
        self._torn = False

    def _close_fd(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1

    def rotate(self) -> None:
        self._close_fd()
        if self.backups == 0:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{self.path}.{self.backups}")
            for i in range(self.backups - 1, 0, -1):
                with contextlib.suppress(FileNotFoundError):
                    os.replace(f"{self.path}.{i}", f"{self.path}.{i + 1}")
            with contextlib.suppress(FileNotFoundError):
                os.replace(self.path, f"{self.path}.1")
        self._open()
        self.stats.rotations += 1

    def close(self) -> None:
        self._close_fd()
