"""The lock that keeps two samcp runs off one local output folder (a cache, a training run)."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import uuid
from pathlib import Path

from samcp.pipeline.errors import SamcpError
from samcp.pipeline.outputs import LOCK_FILE


class FolderLock:
    """Exclusive claim of one samcp run on a local output folder (a cache, a training run).

    The claim is the file ``<folder>/.samcp-lock``, created with ``O_CREAT | O_EXCL`` (so exactly one
    of two racing runs gets it) and holding one JSON object: ``host``, ``pid``, ``pid_start`` (the
    process's start time where the OS tells it, so a reused pid is not mistaken for the holder),
    ``started`` (UTC, ISO 8601), ``argv`` and a random ``token``. It is removed when the run ends,
    on errors too. A lock left by a run that died without removing it is taken over when it was
    made on this host and its process is gone; a lock from another host is always respected,
    since its process cannot be checked from here.

    Args:
        folder: the folder; created if missing (an empty folder is still a new output).
        what: what the folder is, for messages ("cache", "run folder").
        command: the command that writes it, for messages.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        what: str = "cache",
        command: str = "samcp precompute",
    ) -> None:
        self.folder = Path(folder)
        self.what, self.command = what, command
        self.path = self.folder / LOCK_FILE
        self._content: bytes | None = None
        self._made_folder = False

    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    def acquire(self) -> None:
        """Takes the lock, or raises SamcpError naming the run that holds it.

        Raises:
            SamcpError: another live run holds the lock, or the lock file is unreadable.
        """
        if not self.folder.exists():
            try:
                self.folder.mkdir(parents=True)
                self._made_folder = True
            except FileExistsError:
                pass  # made by a run that started at the same moment; the lock decides
        pid = os.getpid()
        self._content = json.dumps(
            {
                "host": socket.gethostname(),
                "pid": pid,
                "pid_start": _process_start(pid),
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "argv": sys.argv[:40],
                "token": uuid.uuid4().hex,
            }
        ).encode()
        for _ in range(5):
            if self._create():
                return
            holder, raw = self._read_holder()
            if raw is None:
                continue  # removed in between: try again
            if holder is None:
                raise SamcpError(
                    f"{self.what} {self.folder} has an unreadable lock file {self.path}; if no "
                    f"{self.command} is writing it, delete that file and re-run"
                )
            if not self._is_stale(holder):
                raise SamcpError(_held_message(self, holder))
            if self._take_over(raw):
                print(
                    f"note: taking over the lock of {self.what} {self.folder} from a run that "
                    f"is gone (pid {holder.get('pid')} on this host, since "
                    f"{holder.get('started')})",
                    file=sys.stderr,
                )
        raise SamcpError(
            f"{self.what} {self.folder} is being locked and unlocked by other runs; "
            "wait for them to finish, or use another --out"
        )

    def release(self) -> None:
        """Removes the lock file if it is still this run's (and the folder if it made it empty)."""
        if self._content is None:
            return
        _, raw = self._read_holder()
        if raw == self._content:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
        self._content = None
        if self._made_folder:
            try:
                self.folder.rmdir()  # only succeeds if the run failed before writing anything
            except OSError:
                pass

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, self._content)
        finally:
            os.close(fd)
        return True

    def _read_holder(self) -> tuple[dict | None, bytes | None]:
        """(parsed holder or None if unreadable, raw bytes or None if there is no lock file)."""
        raw = None
        for _ in range(20):  # a lock being created is empty for an instant
            try:
                raw = self.path.read_bytes()
            except FileNotFoundError:
                return None, None
            try:
                holder = json.loads(raw)
            except ValueError:
                time.sleep(0.05)
                continue
            return (holder if isinstance(holder, dict) else None), raw
        return None, raw

    @staticmethod
    def _is_stale(holder: dict) -> bool:
        if holder.get("host") != socket.gethostname():
            return False
        pid = holder.get("pid")
        if not isinstance(pid, int) or isinstance(pid, bool):
            return False
        if not _pid_alive(pid):
            return True
        # The pid lives, but is it the holder? Not if it started at another time: the holder died
        # and its pid was reused (a restarted container gives samcp the same pid again).
        recorded = holder.get("pid_start")
        now = _process_start(pid)
        return recorded is not None and now is not None and recorded != now

    def _take_over(self, stale: bytes) -> bool:
        """Removes a stale lock file unless another run replaced it meanwhile."""
        aside = self.path.with_name(f"{LOCK_FILE}.stale-{os.getpid()}")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return False
        if aside.read_bytes() != stale:
            # Another run took the stale lock first and we moved its fresh one: put it back.
            try:
                os.link(aside, self.path)
            except OSError:
                pass
            aside.unlink()
            return False
        aside.unlink()
        return True


def _holder_words(holder: dict) -> str:
    return (
        f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, "
        f"since {holder.get('started', '?')}"
    )


def _held_message(lock: FolderLock, holder: dict) -> str:
    path = lock.path
    msg = (
        f"{lock.what} {lock.folder} is locked by another {lock.command} "
        f"({_holder_words(holder)}); wait for it to finish, or use another --out"
    )
    if holder.get("host") != socket.gethostname():
        msg += (
            f"; that run is on another machine, so if it is no longer running, delete {path} "
            "and re-run"
        )
    else:
        msg += f"; if pid {holder.get('pid')} is not a samcp run, delete {path} and re-run"
    return msg


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    except OSError:
        return False
    return True


def _process_start(pid: int) -> str | None:
    """The start time of a process as the kernel records it (Linux), or None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None
    # Field 22 (starttime, clock ticks since boot); the command name (field 2) may hold spaces.
    fields = stat[stat.rindex(")") + 2 :].split()
    return f"{boot}:{fields[19]}" if len(fields) > 19 else None
