"""A lock shared by processes that the kernel releases when its holder dies.

:class:`FileLock` is an ``flock(2)`` lock on a small temporary file, one per lock. Unlike a
``multiprocessing.Lock`` (a semaphore, which stays taken forever when its holder is killed inside
the critical section), an ``flock`` lock belongs to an open file description and the kernel drops
it when the last descriptor of that description closes, which it does for a process that dies,
SIGKILL included. So one killed process can't block every other one.

Every process opens the file itself (a lock taken through a descriptor inherited over ``fork``
would be the parent's lock, not its own): a child forked by Python (``os.fork``,
``multiprocessing``'s fork) closes the inherited descriptor in an at-fork hook and opens a new
one when it first locks; a spawned child receives the path (pickled while spawning) and opens the
file when unpickling. A thread lock in front of the file lock excludes the threads of one
process, which share its descriptor.

The lock is as fast as ``multiprocessing.Lock`` uncontended (two ``flock`` calls, about 0.6 us
together); contended, a waiter polls with a backoff (``flock`` has no timeout), which costs about
the same throughput as the semaphore's wake-ups for critical sections of microseconds.

Only POSIX has ``flock``: :data:`AVAILABLE` says whether this platform does. Elsewhere callers
fall back to ``multiprocessing.Lock``, which does not survive the death of its holder.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import time
import weakref
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: no flock; callers fall back to multiprocessing.Lock
    fcntl = None  # type: ignore[assignment]

__all__ = ["AVAILABLE", "FileLock"]

#: Whether :class:`FileLock` works on this platform (POSIX ``flock``).
AVAILABLE = fcntl is not None and hasattr(os, "register_at_fork")

#: Longest pause between two tries of a contended lock, in seconds.
_MAX_BACKOFF_S = 1e-3

# Every FileLock of this process, so that a forked child can drop the descriptors it inherited.
_LOCKS: weakref.WeakSet[FileLock] = weakref.WeakSet()
# Serializes the (re)opening of descriptors by the threads of a freshly forked child.
_ATTACH_LOCK = threading.Lock()


def _unlink_if_creator(path: str, creator: int) -> None:
    # Only the process that created the file removes it (forked children inherit finalizers).
    if os.getpid() == creator:
        with contextlib.suppress(OSError):
            os.unlink(path)


def _after_fork_in_child() -> None:
    global _ATTACH_LOCK
    _ATTACH_LOCK = threading.Lock()  # another thread may have held it during the fork
    for lock in list(_LOCKS):
        lock._drop_inherited()


if AVAILABLE:
    os.register_at_fork(after_in_child=_after_fork_in_child)


class FileLock:
    """Exclusive lock for threads and processes, released by the kernel if its holder dies.

    Creates its lock file (empty, in the temporary directory); the creating process removes it
    when the lock is garbage collected or at exit. A creator killed by a signal leaves the empty
    file behind. Pickled while spawning a child process (as an argument of
    ``multiprocessing.Process``), it reaches the child as the same lock.

    Raises:
        RuntimeError: :data:`AVAILABLE` is false (no ``flock`` on this platform).
    """

    _fd: int | None

    def __init__(self) -> None:
        if not AVAILABLE:
            raise RuntimeError("FileLock needs POSIX flock; use multiprocessing.Lock here")
        fd, self._path = tempfile.mkstemp(prefix="asyncmomentum-", suffix=".lock")
        os.close(fd)
        self._finalizer = weakref.finalize(self, _unlink_if_creator, self._path, os.getpid())
        self._attach()

    def _attach(self) -> None:
        """Give this process its own descriptor (own open file description) and thread lock."""
        self._thread_lock = threading.Lock()
        self._pid = os.getpid()
        try:
            self._fd = os.open(self._path, os.O_RDWR)
        except FileNotFoundError:
            self._fd = None
            raise RuntimeError(
                f"the lock file {self._path} is gone: the process that created the shared "
                "object no longer holds it. Share it again (share_memory()) before starting "
                "the processes"
            ) from None
        _LOCKS.add(self)

    def _drop_inherited(self) -> None:
        """In a forked child: close the parent's descriptor (its lock stays the parent's)."""
        fd, self._fd = self._fd, None
        self._thread_lock = threading.Lock()  # another thread may have held it during the fork
        if fd is not None:
            os.close(fd)

    @property
    def path(self) -> str:
        """The lock file."""
        return self._path

    def acquire(self, timeout: float | None = None) -> bool:
        """Take the lock.

        Args:
            timeout: seconds to wait at most; ``None`` to wait as long as it takes.

        Returns:
            Whether the lock was taken (``False``: ``timeout`` ran out first).
        """
        if self._fd is None:  # first use after a fork
            with _ATTACH_LOCK:
                if self._fd is None:
                    self._attach()
        deadline = None
        if not self._thread_lock.acquire(blocking=False):
            if timeout is None:
                self._thread_lock.acquire()
            else:
                deadline = time.monotonic() + timeout
                if not self._thread_lock.acquire(timeout=timeout):
                    return False
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # type: ignore[arg-type]
            return True
        except BlockingIOError:
            if deadline is None and timeout is not None:
                deadline = time.monotonic() + timeout
        except BaseException:
            self._thread_lock.release()
            raise
        return self._wait(deadline)

    def _wait(self, deadline: float | None) -> bool:
        # Another process holds the file lock; flock has no timeout, so poll, backing off from
        # a microsecond to a millisecond (the critical sections guarded here last microseconds,
        # and a holder that dies releases the lock at once).
        delay = 1e-6
        try:
            while True:
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    self._thread_lock.release()
                    return False
                time.sleep(delay if deadline is None else min(delay, deadline - now))
                try:
                    fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # type: ignore[arg-type]
                    return True
                except BlockingIOError:
                    delay = min(2 * delay, _MAX_BACKOFF_S)
        except BaseException:
            self._thread_lock.release()
            raise

    def release(self) -> None:
        """Release the lock, taken by this thread with :meth:`acquire`."""
        try:
            fcntl.flock(self._fd, fcntl.LOCK_UN)  # type: ignore[arg-type]
        finally:
            self._thread_lock.release()

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self._path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._path = state["path"]
        self._attach()

    def __del__(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None and getattr(self, "_pid", None) == os.getpid():
            with contextlib.suppress(OSError):
                os.close(fd)

    def __repr__(self) -> str:
        return f"FileLock({self._path!r})"
