"""One writer per shard-set directory: an ``flock`` on ``<dir>/.grounding-lock`` held for the whole write.

The OS releases the lock when its holder dies (SIGKILL included), so a stale lock file never blocks anyone.
A full writer takes the lock exclusively; the parts of a fan-out run (``ShardWriter(shards=...)``) share it,
so they run side by side but never beside a full writer. The holder writes its pid, host and command into
the file, so a writer that finds the lock taken can name who holds it.

The file is removed by its exclusive holder when it releases the lock. A writer that waited on a file that
was removed meanwhile sees that the path no longer names the file it locked and tries again (the usual
protocol for lock files that are deleted), so two writers never both hold "the" lock.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

from grounding.shards.manifest import ShardError

LOCK_FILE = ".grounding-lock"
log = logging.getLogger(__name__)
_HELD: dict[int, "DirLock"] = {}  # fd -> lock held by this process (closed in forked children)


class LockHeld(ShardError):
    """Another live writer holds the directory's lock (the message names its pid, host and command)."""


def _close_in_child() -> None:
    """After fork: the child does not hold its parent's locks (closing a duplicate descriptor does not
    release an flock, so the parent keeps it) and must never release or remove them."""
    for fd, lock in list(_HELD.items()):
        lock.fd = None
        _close_quietly(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_close_in_child)


def holder_info() -> dict[str, object]:
    """What this process writes into a lock it holds."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)[:500],
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def describe_holder(path: Path) -> str:
    """``pid N on host H (command ...)`` from a lock file, or a plain phrase when it cannot be read."""
    for _ in range(20):  # the holder writes its info just after locking: give it a moment
        try:
            info = json.loads(path.read_text(encoding="utf-8") or "null")
        except (OSError, ValueError):
            info = None
        if isinstance(info, dict):
            return (f"pid {info.get('pid')} on host {info.get('host')} (command: {info.get('command')!r}, "
                    f"since {info.get('since')})")
        time.sleep(0.05)
    return "another process (its lock file names no holder)"


class DirLock:
    """``flock`` on ``directory/.grounding-lock``; ``shared=True`` for fan-out parts. Created unlocked;
    :meth:`acquire` creates the directory when needed."""

    def __init__(self, directory: str | os.PathLike[str], *, shared: bool = False, what: str = "writer") -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE
        self.shared = shared
        self.what = what
        self.fd: int | None = None

    @property
    def held(self) -> bool:
        return self.fd is not None

    def acquire(self, wait: bool = False) -> "DirLock":
        """Take the lock. ``wait=False``: raise :class:`LockHeld` at once when another writer holds it;
        ``wait=True``: block until it is released (logging who is waited for)."""
        if self.fd is not None:
            return self
        mode = fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX
        told = False
        while True:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                try:
                    fcntl.flock(fd, mode | fcntl.LOCK_NB)
                except OSError as e:
                    if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                        raise
                    who = describe_holder(self.path)
                    if not wait:
                        raise LockHeld(f"{self.directory}: another writer is writing this shard set: {who}; "
                                       f"wait for it to finish, or rerun with --wait (shards.wait=true)") from None
                    if not told:
                        log.warning("%s: waiting for the writer holding it: %s", self.directory, who)
                        print(f"{self.directory}: waiting for {who} to finish", file=sys.stderr, flush=True)
                        told = True
                    fcntl.flock(fd, mode)
                st, cur = os.fstat(fd), _stat_or_none(self.path)
                if cur is None or (cur.st_ino, cur.st_dev) != (st.st_ino, st.st_dev):
                    os.close(fd)  # the holder removed the file while we waited: lock the current one
                    continue
            except BaseException:
                _close_quietly(fd)
                raise
            break
        self.fd = fd
        _HELD[fd] = self
        if not self.shared or os.fstat(fd).st_size == 0:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(holder_info(), sort_keys=True).encode("utf-8") + b"\n", 0)
        return self

    def release(self, *, remove_dir_if_empty: bool = False) -> None:
        """Give the lock back. An exclusive holder first removes the lock file (and, when asked, the
        directory if nothing else is in it)."""
        fd, self.fd = self.fd, None
        if fd is None:
            return
        _HELD.pop(fd, None)
        try:
            if not self.shared:
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
                if remove_dir_if_empty:
                    try:
                        self.directory.rmdir()
                    except OSError:  # not empty (or gone): leave it
                        pass
        finally:
            os.close(fd)

    def __enter__(self) -> "DirLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        if self.fd is None:
            return
        try:
            _HELD.pop(self.fd, None)
            _close_quietly(self.fd)  # released by the OS; the file stays (harmless, replaced by the next)
        except (AttributeError, TypeError):  # at interpreter exit module globals may already be None
            pass


def _stat_or_none(path: Path) -> os.stat_result | None:
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
