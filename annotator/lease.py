"""Lease: one holder at a time for a folder, created atomically, renewed by a heartbeat, taken over when stale.

The lease is one file (`lock` in a run folder) holding its holder's identity: a unique token, host, boot id,
pid and the pid's start time, since, expires. The protocol uses only link/rename/unlink, so it holds on local
disks and on shared filesystems (NFS) alike:

- Create: the full content is written to a private file, then `link`ed to the lease's name, which fails if
  the name exists. Nobody ever sees a lease half-written.
- Take over a stale lease with token T: `link` a private file to `NAME.T.next` (exactly one process can) and
  check that the chain from NAME still ends there, then install it over NAME (`rename`). A process that
  claimed the successor of T and died is itself stale and is succeeded the same way.
- Stale: on this host, the holder's process is gone (pid dead, a zombie, or reused by another process, or the
  host rebooted); on another host, the lease's expiry has passed (nobody can see its pid).
- Renew: a heartbeat thread rewrites the lease with a later expiry while NAME still holds our token and
  nobody has claimed our succession. A holder that finds its lease taken stops writing (`check`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from annotator.errors import AnnotatorError, RunInterrupted

LEASE_TTL_S = 60.0
DAMAGED_GRACE_S = 10.0  # a lease file that cannot be parsed counts as held this long (a filesystem without links)
SWEEP_AGE_S = 60.0  # private files older than this belong to acquirers that died
_MAX_CHAIN = 64


class LeaseHeld(AnnotatorError):
    """Someone else holds the lease."""

    def __init__(self, message: str, holder: Holder) -> None:
        super().__init__(message)
        self.holder = holder


class LeaseLost(RunInterrupted):
    """Our lease was taken over (we were paused or cut off past its expiry): stop writing."""


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), None where unknown; -1 for a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] in ("Z", "X"):
        return -1
    return int(fields[19])


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


HOST = socket.gethostname()
BOOT_ID = _boot_id()


@dataclass(frozen=True)
class Holder:
    """Who holds a lease, as written in the lease file."""

    token: str
    host: str
    pid: int
    since: float
    expires: float
    boot_id: str | None = None
    pid_start: int | None = None
    purpose: str = ""
    damaged: bool = False

    @classmethod
    def mine(cls, ttl_s: float, purpose: str) -> Holder:
        now = time.time()
        pid = os.getpid()
        return cls(secrets.token_hex(8), HOST, pid, now, now + ttl_s, BOOT_ID, _process_start(pid), purpose)

    def encode(self) -> bytes:
        return json.dumps({k: v for k, v in asdict(self).items() if k != "damaged"}).encode()

    @property
    def same_host(self) -> bool:
        return self.host == HOST

    def stale(self, now: float | None = None) -> bool:
        """True when nobody holds this lease any more: its process is gone, or (another host) it expired."""
        now = time.time() if now is None else now
        if self.damaged:
            return now > self.since + DAMAGED_GRACE_S
        if not self.same_host:
            return now > self.expires
        if self.boot_id and BOOT_ID and self.boot_id != BOOT_ID:
            return True  # this host rebooted since
        if not _pid_alive(self.pid):
            return True
        started = _process_start(self.pid)
        if started == -1:
            return True  # a zombie: dead, not yet reaped
        return self.pid_start is not None and started is not None and started != self.pid_start

    def describe(self, now: float | None = None) -> str:
        """`held by pid P on HOST until T`, or why it no longer counts."""
        if self.damaged:
            return "damaged lease file" + (" (being written?)" if not self.stale(now) else "")
        until = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.expires))
        who = f"pid {self.pid} on {self.host}"
        if not self.stale(now):
            return f"held by {who} until {until} (renewed while it runs)"
        if self.same_host:
            return f"stale: {who} is gone"
        return f"expired at {until} ({who})"


def _decode(data: bytes, path: Path) -> Holder:
    try:
        raw = json.loads(data)
        if "token" not in raw and "pid" in raw and "host" in raw:  # a lock of annotator before leases
            stat = path.stat()
            since = float(raw.get("since", stat.st_mtime))
            token = f"legacy-{stat.st_ino}-{stat.st_mtime_ns}"
            return Holder(token, str(raw["host"]), int(raw["pid"]), since, since + LEASE_TTL_S)
        return Holder(
            token=str(raw["token"]),
            host=str(raw["host"]),
            pid=int(raw["pid"]),
            since=float(raw["since"]),
            expires=float(raw["expires"]),
            boot_id=raw.get("boot_id"),
            pid_start=raw.get("pid_start"),
            purpose=str(raw.get("purpose", "")),
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        # Unparseable: name it by the file's identity, so that a takeover claims exactly this file.
        stat = path.stat()
        return Holder(f"damaged-{stat.st_ino}-{stat.st_mtime_ns}", "?", -1, stat.st_mtime, stat.st_mtime, damaged=True)


def _read(path: Path) -> Holder | None:
    try:
        return _decode(path.read_bytes(), path)
    except FileNotFoundError:
        return None


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems cannot fsync a folder; the rename is still atomic
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_private(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _create_exclusive(private: Path, target: Path, data: bytes) -> bool:
    """Make `target` appear with `data` whole, unless it exists; True if we created it."""
    _write_private(private, data)
    try:
        os.link(private, target)
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS):
            raise
        # No hard links here (FAT, some FUSE mounts): create exclusively and fill; readers grant a grace period.
        try:
            fd = os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    finally:
        private.unlink(missing_ok=True)
    _fsync_dir(target.parent)
    return True


class Lease:
    """The lease at `path`; `acquire` it (or raise `LeaseHeld`), keep it with `start_heartbeat`, `release` it."""

    def __init__(self, path: str | Path, ttl_s: float = LEASE_TTL_S, purpose: str = "annotate") -> None:
        self.path = Path(path)
        self.ttl_s = ttl_s
        self.purpose = purpose
        self.holder: Holder | None = None
        self.lost = False
        self._deadline = 0.0  # monotonic: past it, we cannot be sure nobody else took the lease
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _claim_path(self, token: str) -> Path:
        return self.path.with_name(f"{self.path.name}.{token}.next")

    def _private(self, token: str, kind: str) -> Path:
        return self.path.with_name(f".{self.path.name}.{token}.{kind}.tmp")

    def chain(self) -> list[Holder]:
        """The lease file's holder, then each successor claimed after it; the last one is the holder that counts."""
        holder = _read(self.path)
        chain = [] if holder is None else [holder]
        while chain and len(chain) < _MAX_CHAIN:
            successor = _read(self._claim_path(chain[-1].token))
            if successor is None:
                break
            chain.append(successor)
        return chain

    def current(self) -> Holder | None:
        """The holder that counts (live or stale), or None when nobody has the lease."""
        chain = self.chain()
        return chain[-1] if chain else None

    def acquire(self) -> Lease:
        me = Holder.mine(self.ttl_s, self.purpose)
        data = me.encode()
        for _ in range(200):
            if _create_exclusive(self._private(me.token, "new"), self.path, data):
                return self._won(me, [])
            chain = self.chain()
            if not chain:
                continue  # released meanwhile: try to create it again
            last = chain[-1]
            if not last.stale():
                raise LeaseHeld(self._held_message(last), last)
            claim = self._claim_path(last.token)
            if not _create_exclusive(self._private(me.token, "claim"), claim, data):
                continue  # another process claimed it first: look again
            # Our claim counts only if it is the end of the chain that starts at the lease file now. It may not
            # be: the lease changed hands after we read it, and the successor of a token long gone was free.
            now = self.chain()
            if now and now[-1].token == me.token:
                return self._won(me, [h.token for h in now[:-1]])
            claim.unlink(missing_ok=True)
        raise AnnotatorError(f"Could not take the lease {str(self.path)!r}: it keeps changing hands. Try again.")

    def _won(self, me: Holder, replaced: list[str]) -> Lease:
        if replaced:  # install our holder as the lease file, then drop the claims that led to it
            private = self._private(me.token, "renew")
            _write_private(private, me.encode())
            os.replace(private, self.path)
            _fsync_dir(self.path.parent)
            for token in replaced:
                self._claim_path(token).unlink(missing_ok=True)
        self.holder = me
        self.lost = False
        self._deadline = time.monotonic() + self.ttl_s
        self._sweep(me.token)
        return self

    def _sweep(self, mine: str) -> None:
        """Delete what dead acquirers left: old private files, and claims on tokens that no longer count.

        A claim on any token but ours is void once we hold the lease (its maker's check fails and it retries).
        Private files of live acquirers are young: only old ones are deleted, so no acquirer loses its file.
        """
        old = time.time() - SWEEP_AGE_S
        for path in self.path.parent.glob(f".{self.path.name}.*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_mtime < old:
                    path.unlink(missing_ok=True)
        for path in self.path.parent.glob(f"{self.path.name}.*.next"):
            if path != self._claim_path(mine):
                path.unlink(missing_ok=True)

    def _held_message(self, holder: Holder) -> str:
        if holder.damaged:
            return f"The lease {str(self.path)!r} is being written by another process. Try again in a few seconds."
        where = "this host" if holder.same_host else f"host {holder.host}"
        fix = (
            "Wait for it to finish, or stop that process."
            if holder.same_host
            else "Wait for it to finish; if that host is gone, its lease expires by itself and the folder becomes "
            "free then (nothing to delete by hand)."
        )
        return f"{str(self.path.parent)!r} is in use: {holder.describe()} ({where}). {fix}"

    def _still_mine(self) -> bool:
        assert self.holder is not None
        holder = _read(self.path)
        return (
            holder is not None
            and holder.token == self.holder.token
            and not self._claim_path(self.holder.token).exists()
        )

    def renew(self) -> None:
        """Push the expiry forward; raises `LeaseLost` if the lease is no longer ours."""
        with self._lock:
            if self.holder is None or self.lost:
                raise LeaseLost(self._lost_message())
            if not self._still_mine():
                self.lost = True
                raise LeaseLost(self._lost_message())
            now = time.time()
            renewed = Holder(**{**asdict(self.holder), "expires": now + self.ttl_s})
            private = self._private(renewed.token, "renew")
            _write_private(private, renewed.encode())
            os.replace(private, self.path)
            self.holder = renewed
            self._deadline = time.monotonic() + self.ttl_s

    def check(self) -> None:
        """Raise `LeaseLost` unless the lease is still ours (cheap while the heartbeat keeps it fresh)."""
        if self.lost:
            raise LeaseLost(self._lost_message())
        if time.monotonic() > self._deadline - self.ttl_s / 2:
            self.renew()  # the heartbeat fell behind (a paused process): make sure before going on

    def _lost_message(self) -> str:
        taker = self.current()
        who = f" by pid {taker.pid} on {taker.host}" if taker is not None and not taker.damaged else ""
        return (
            f"This process lost the lease on {str(self.path.parent)!r}: it was taken over{who} after this process "
            "was paused or cut off past the lease's expiry. Committed windows are safe; let the other process "
            "finish, or stop it and run `annotate resume`."
        )

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                self.renew()
            except LeaseLost:
                return
            except OSError:
                continue  # a full or flaky disk: try again at the next beat; `check` decides when it is too late

    def start_heartbeat(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)
            self._thread.start()

    def stop_heartbeat(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def release(self) -> None:
        """Give the lease up if it is still ours; never touches a lease someone else holds."""
        self.stop_heartbeat()
        with self._lock:
            if self.holder is None:
                return
            try:
                if not self.lost and self._still_mine():
                    self.path.unlink(missing_ok=True)
            except OSError:
                pass  # a read-only or vanished folder: the lease goes stale with this process
            self.holder = None

    def __enter__(self) -> Lease:
        self.acquire()
        self.start_heartbeat()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lease_state(path: str | Path) -> dict[str, Any] | None:
    """What `status` shows: the holder that counts and whether it is live; None when the lease is free."""
    holder = Lease(path).current()
    if holder is None:
        return None
    return {"live": not holder.stale(), "describe": holder.describe(), "pid": holder.pid, "host": holder.host}
