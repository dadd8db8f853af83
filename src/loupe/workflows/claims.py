"""Claim files: independent workers sharing one output folder agree on who works on what, through the folder alone.

A worker about to work on item ``NAME`` (a slide) creates ``CLAIMS/NAME.claim``; whoever creates it holds the item,
the others skip it. There is no scheduler and no server: the file system's atomic operations decide.

- **Creating a claim** is ``os.link`` of a complete temporary file onto the claim's name: link fails when the name
  exists, on a local disk and on NFS alike (unlike ``O_EXCL``, which old NFS clients do not honour, and unlike
  create-then-write, a reader never sees an empty claim). NFS may report a link as failed when its reply was lost
  although it was made; the temporary file's link count (2) then says it was made.
- **The claim holds its owner**: host, boot id, pid namespace, pid, the process's start time (``/proc``: a reused
  pid is not the owner) and a token unique to the worker; and a **heartbeat**, the file's mtime, refreshed every
  ``heartbeat_s`` by a thread of the owner while it lives (through an open descriptor: the owner only ever touches
  its own file).
- **A claim is stale** when its heartbeat is older than ``expiry_s`` (default 10 minutes), by the file system's
  clock (the mtime of the claims folder, touched just then: no trust in the clocks of other nodes), or at once when
  its owner ran on this machine (same host, boot and pid namespace) and its process is gone (or a zombie). Pids
  are compared only on the owner's machine: another node's pid says nothing here.
- **Taking over** a stale claim: first create (as above: one creator) a break lock named after that claim's
  incarnation, its inode and heartbeat time; of several workers that judged the same claim stale, one gets the lock
  and the others step back. The lock holder deletes the claim only if it is still that incarnation (not replaced,
  not refreshed), then creates its own claim as above (if yet another worker was quicker, it steps back). So a
  claim is never deleted by two workers, nor is a fresh claim deleted for a stale one (renaming the stale claim
  away and putting back what was renamed by mistake, the usual trick, lets a third worker in meanwhile: two holders).
  The one window left: a stale claim's owner that wakes up and releases it in the microsecond between the lock
  holder's check and its delete, while a fourth worker claims the slide.
- **Releasing** deletes the claim, only if it is still this worker's file.

A worker killed with SIGKILL leaves its claims: another worker takes them over once they expire, and a re-run on
the same machine at once (the pid is dead). A worker that finds a claim of its own token (the same object) holds
it already.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal
from urllib.parse import quote

log = logging.getLogger("loupe")

#: Default claim expiry: a worker silent for this long is taken to be dead.
EXPIRY_S = 600.0
SUFFIX = ".claim"

ClaimState = Literal["free", "mine", "live", "stale"]


def _read_text(path: str) -> str | None:
    try:
        with open(path) as handle:
            return handle.read().strip()
    except OSError:
        return None


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks since boot) of a process, from /proc; None where unknown."""
    text = _read_text(f"/proc/{pid}/stat")
    if not text or ")" not in text:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) ": the comm may hold spaces
    try:
        return fields[0], int(fields[19])
    except (IndexError, ValueError):
        return None


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


@dataclass(frozen=True)
class Owner:
    """Who holds a claim: enough to tell, on the owner's machine, whether it still runs."""

    worker: str  # unique per worker (token)
    host: str
    pid: int
    pid_start: int | None = None  # clock ticks since boot (/proc/PID/stat): tells a reused pid
    boot: str | None = None  # /proc/sys/kernel/random/boot_id: another boot, another process
    pidns: str | None = None  # the pid namespace: containers on one host do not share pids
    started: float = 0.0  # wall clock when the worker started (for people reading the file)

    @classmethod
    def current(cls, worker: str | None = None) -> Owner:
        """This process, as a worker named ``worker`` (default: a fresh random token)."""
        pid = os.getpid()
        stat = _proc_stat(pid)
        return cls(
            worker=worker or uuid.uuid4().hex[:12],
            host=socket.gethostname(),
            pid=pid,
            pid_start=stat[1] if stat else None,
            boot=_read_text("/proc/sys/kernel/random/boot_id"),
            pidns=_pid_namespace(),
            started=time.time(),
        )

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Owner:
        return cls(
            worker=str(data["worker"]),
            host=str(data["host"]),
            pid=int(data["pid"]),
            pid_start=data.get("pid_start"),
            boot=data.get("boot"),
            pidns=data.get("pidns"),
            started=float(data.get("started", 0.0)),
        )

    def same_machine(self, other: Owner) -> bool:
        """Whether pids of ``other`` can be checked from here: same host, boot and pid namespace (a host name
        alone may repeat across machines, and every machine's first pid namespace has the same id)."""
        return (self.host, self.boot, self.pidns) == (other.host, other.boot, other.pidns)

    def is_gone(self) -> bool:
        """On the owner's machine: whether its process has ended (a zombie has, a reused pid is someone else)."""
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass  # alive, another user's: the stat below still tells a reused pid
        if self.pid_start is None:
            return False
        stat = _proc_stat(self.pid)
        if stat is None:
            return False
        state, start = stat
        return state in ("Z", "X") or start != self.pid_start


@dataclass
class _Held:
    path: Path
    fd: int
    ino: tuple[int, int]  # (st_dev, st_ino) of our claim file
    lost: bool = False


class Claims:
    """The claims one worker holds in one folder, kept alive by a heartbeat thread while the object is open.

    Use as a context manager (``with Claims(folder) as claims: ...``): closing stops the heartbeat and releases
    every claim still held.
    """

    def __init__(
        self,
        folder: str | Path,
        *,
        expiry_s: float = EXPIRY_S,
        heartbeat_s: float | None = None,
        owner: Owner | None = None,
    ) -> None:
        if expiry_s <= 0:
            raise ValueError(f"claim expiry must be > 0 s, got {expiry_s}")
        self.folder = Path(folder)
        self.expiry_s = float(expiry_s)
        self.heartbeat_s = float(heartbeat_s) if heartbeat_s else max(0.05, self.expiry_s / 10)
        self.owner = owner or Owner.current()
        self._held: dict[str, _Held] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.folder.mkdir(parents=True, exist_ok=True)

    # --- life ------------------------------------------------------------------------------------------------

    def __enter__(self) -> Claims:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def start(self) -> None:
        """Start the heartbeat thread (idempotent)."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._beat, name="loupe-heartbeat", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop the heartbeat and release every claim still held."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for name in list(self._held):
            self.release(name)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            self.touch()

    def touch(self) -> None:
        """Refresh the heartbeat of every claim held (the heartbeat thread calls this); warn once for a claim that
        another worker took over (this worker was silent too long)."""
        with self._lock:  # release closes descriptors under the same lock
            for name, h in self._held.items():
                with contextlib.suppress(OSError):
                    os.utime(h.fd if os.utime in os.supports_fd else h.path)
                if not h.lost and not self._is_mine(h):
                    h.lost = True
                    log.warning("the claim on %s was taken over by another worker (this one was silent too long)", name)

    # --- the claims ------------------------------------------------------------------------------------------

    def path(self, name: str) -> Path:
        """The claim file of ``name`` (any string: quoted into one file name)."""
        return self.folder / f"{quote(name, safe='')}{SUFFIX}"

    def holds(self, name: str) -> bool:
        """Whether this worker holds ``name``'s claim (and nobody took it over)."""
        h = self._held.get(name)
        return h is not None and self._is_mine(h)

    def acquire(self, name: str) -> bool:
        """Claim ``name``: True when this worker holds it now (made, or taken over from a stale claim), False when
        another worker holds it."""
        if name in self._held:
            return True
        path = self.path(name)
        for _ in range(3):  # a claim released or taken over between our steps: look again
            try:
                seen = os.stat(path)
            except FileNotFoundError:
                if self._create(name, path):
                    return True
                continue
            if not self._stale(seen, self.holder(name)) or not self._break(path, seen):
                return False
        return False

    def state(self, name: str) -> ClaimState:
        """Whether ``name`` is unclaimed, claimed by this worker, or by another that is alive or stale."""
        if name in self._held:
            return "mine"
        try:
            seen = os.stat(self.path(name))
        except FileNotFoundError:
            return "free"
        return "stale" if self._stale(seen, self.holder(name)) else "live"

    def holder(self, name: str) -> Owner | None:
        """The owner written in ``name``'s claim (None when unclaimed or unreadable)."""
        try:
            return Owner.from_json(json.loads(self.path(name).read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def release(self, name: str) -> None:
        """Give ``name`` up: its claim file is deleted if it is still this worker's."""
        with self._lock:
            h = self._held.pop(name, None)
            if h is None:
                return
            try:
                if self._is_mine(h):
                    os.unlink(h.path)
            except FileNotFoundError:
                pass
            finally:
                os.close(h.fd)

    def held(self) -> list[str]:
        """The names this worker holds."""
        return list(self._held)

    # --- mechanics -------------------------------------------------------------------------------------------

    def _is_mine(self, h: _Held) -> bool:
        try:
            st = os.stat(h.path)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == h.ino

    def _link_new(self, target: Path, content: bytes) -> int | None:
        """Create ``target`` holding ``content``, only if it does not exist: a temporary file linked onto it.
        Returns an open descriptor of the new file, or None when ``target`` existed."""
        tmp = self.folder / f".{target.name}.{uuid.uuid4().hex}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        made = False
        try:
            os.write(fd, content)
            try:
                os.link(tmp, target)
                made = True
            except FileExistsError:
                made = os.stat(tmp).st_nlink == 2  # NFS: made, but the reply was lost
        except BaseException:
            os.close(fd)
            raise
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        if not made:
            os.close(fd)
            return None
        return fd

    def _create(self, name: str, path: Path) -> bool:
        """Make this worker's claim at ``path``; True when made (False: another worker's is there)."""
        fd = self._link_new(path, (json.dumps(asdict(self.owner)) + "\n").encode())
        if fd is None:
            return False
        st = os.fstat(fd)
        with self._lock:
            self._held[name] = _Held(path, fd, (st.st_dev, st.st_ino))
        return True

    def _now(self) -> float:
        """The file system's current time (its clock stamps the heartbeats), read by touching the claims folder;
        this machine's clock where the folder cannot be touched."""
        try:
            os.utime(self.folder)
            return os.stat(self.folder).st_mtime
        except OSError:
            return time.time()

    def _stale(self, seen: os.stat_result, owner: Owner | None) -> bool:
        if owner is not None and owner.worker == self.owner.worker:
            return False  # ours (another object of this worker): never taken from ourselves
        if owner is not None and self.owner.same_machine(owner) and owner.is_gone():
            return True
        return self._now() - seen.st_mtime > self.expiry_s

    def _break(self, path: Path, seen: os.stat_result) -> bool:
        """Delete the stale claim ``seen`` at ``path``; True when the claim is gone (create one now), False when
        another worker is breaking it or it turned out to be replaced or refreshed (leave it).

        Breaking is exclusive per claim incarnation: a break lock named after the claim's inode and heartbeat is
        created first (one creator), and the claim is deleted only if it is still that incarnation."""
        lock = self.folder / f".{path.name}.break-{seen.st_ino}-{seen.st_mtime_ns}"
        fd = self._link_new(lock, (json.dumps(asdict(self.owner)) + "\n").encode())
        if fd is None:  # another worker breaks it now; or one died doing so (a stale lock: cleared for later)
            with contextlib.suppress(OSError):
                if self._now() - os.stat(lock).st_mtime > self.expiry_s:
                    os.unlink(lock)
            return False
        os.close(fd)
        try:
            try:
                now = os.stat(path)
            except FileNotFoundError:
                return True
            if (now.st_dev, now.st_ino, now.st_mtime_ns) != (seen.st_dev, seen.st_ino, seen.st_mtime_ns):
                return False
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return True
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock)

    def clear_stale(self, names: list[str]) -> int:
        """Delete the stale claims of ``names`` (slides already finished whose owner died between recording the
        result and releasing its claim); return how many were deleted."""
        cleared = 0
        for name in names:
            if name in self._held:
                continue
            try:
                seen = os.stat(self.path(name))
            except FileNotFoundError:
                continue
            if self._stale(seen, self.holder(name)) and self._break(self.path(name), seen):
                cleared += 1
        return cleared

    def sweep(self) -> None:
        """Delete leftovers of killed workers (temporary files and break locks older than the expiry)."""
        now = self._now()
        with contextlib.suppress(OSError), os.scandir(self.folder) as entries:
            for entry in entries:
                if entry.name.startswith(".") and (entry.name.endswith(".tmp") or ".break-" in entry.name):
                    with contextlib.suppress(OSError):
                        if now - entry.stat().st_mtime > self.expiry_s:
                            os.unlink(entry.path)
