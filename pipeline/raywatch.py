"""A watchdog that stops a local Ray instance's processes when the driver that started them dies.

``ray.init`` starts the GCS, the raylet and, even without the dashboard, a dashboard process and
the dashboard and runtime-env agents. After a ``kill -9`` of the driver the agents stay alive; this
watchdog, a separate tiny process, kills what the driver started once it is gone.
"""

from __future__ import annotations

import select
import subprocess
import sys
from pathlib import Path

# The watchdog's program, run as ``python -c`` so that it starts in a blink and imports nothing of
# samcp (nor torch). Arguments: the driver's pid, the folder that holds psutil (Ray bundles it),
# then the pids of the driver's children that existed before, which are not Ray's.
# It remembers every process started under the driver's new children (gcs, raylet, the agents and
# workers the raylet starts), polling twice a second. "seal" on stdin (sent once ray.init has
# returned) ends the watch for new direct children of the driver, which from then on are not
# Ray's; their descendants are still followed. "stop" on stdin means Ray was shut down
# cleanly: exit. End of input without "stop" means the driver is gone: kill what it remembered
# (psutil checks each process's start time, so a reused pid is never hit), then exit.
_WATCHDOG_SOURCE = """
import os, select, signal, sys
sys.path.insert(0, sys.argv[2])
import psutil

signal.signal(signal.SIGINT, signal.SIG_IGN)
driver = psutil.Process(int(sys.argv[1]))
ignore = {int(p) for p in sys.argv[3:]} | {os.getpid()}
seen = {}


def remember(procs):
    for p in procs:
        if p.pid not in ignore:
            seen.setdefault(p.pid, p)


def scan():
    if not sealed:  # after ray.init, new children of the driver are not Ray's
        try:
            remember(p for p in driver.children() if p.pid not in ignore)
        except psutil.Error:
            pass
    for p in list(seen.values()):
        try:
            remember(p.children(recursive=True))
        except psutil.Error:
            pass


message = b""
sealed = False
while True:
    scan()
    ready, _, _ = select.select([0], [], [], 0.5)
    if ready:
        chunk = os.read(0, 64)
        message += chunk
        if b"stop" in message:
            sys.exit(0)
        if b"seal" in message and not sealed:
            scan()
            sealed = True
            os.write(1, b"sealed\\n")
        if not chunk:
            break
    if not driver.is_running():
        break

for p in list(seen.values()):
    try:
        remember(p.children(recursive=True))
    except psutil.Error:
        pass
for p in seen.values():
    try:
        p.kill()
    except psutil.Error:
        pass
"""


class RayWatchdog:
    """A small process that kills the local Ray instance's processes if this process dies first.

    Ray fate-shares only its direct children with the driver (Linux ``PR_SET_PDEATHSIG``); the
    raylet's children, the dashboard and runtime-env agents, outlive a driver killed with SIGKILL
    (observed with Ray 2.60, ``include_dashboard=False`` included; no ``ray.init`` option turns
    them off). The watchdog is started before ``ray.init`` and knows nothing of Ray: it watches
    the processes that appear under this one. It is never used with ``--ray-address``.
    """

    def __init__(self) -> None:
        import importlib

        import ray  # noqa: F401  (puts the psutil that Ray bundles on sys.path)

        psutil = importlib.import_module("psutil")
        me = psutil.Process()
        before = [str(p.pid) for p in me.children()]
        self.proc: subprocess.Popen | None = subprocess.Popen(
            [
                sys.executable,
                "-c",
                _WATCHDOG_SOURCE,
                str(me.pid),
                str(Path(psutil.__file__).parent.parent),
                *before,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            # Its own session: Ctrl-C or a closed terminal stop the driver, not the watchdog.
            start_new_session=True,
        )

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def seal(self) -> None:
        """Says that ``ray.init`` has returned: Ray's own processes have all been started, so
        processes the driver starts later (a host program's own) are never killed."""
        if self.proc is None:
            return
        try:
            self.proc.stdin.write(b"seal\n")
            self.proc.stdin.flush()
        except OSError:
            return
        # Wait for the acknowledgement: only then does a process this one starts count as not
        # Ray's (the watchdog polls twice a second).
        ready, _, _ = select.select([self.proc.stdout], [], [], 10)
        if ready:
            self.proc.stdout.readline()

    def stop(self) -> None:
        """Tells the watchdog that Ray was shut down cleanly, and waits for it to exit."""
        if self.proc is None:
            return
        try:
            self.proc.stdin.write(b"stop\n")
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

