"""A real single-node Slurm (munge, slurmctld, slurmd as root on 127.0.0.1) for tests.

``with SlurmCluster(folder) as cluster:`` starts the daemons with all state in ``folder`` and
``cluster.env`` holds what a command needs (``SLURM_CONF``). Leaving the block — a failing test
included — cancels every job, waits for the queue to empty, then stops the daemons.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("slurmctld", "slurmd", "munged", "mungekey", "sbatch")


def missing() -> str | None:
    """Why no cluster can run here, or None."""
    absent = [d for d in DAEMONS if shutil.which(d) is None]
    if absent:
        return f"not installed: {', '.join(absent)} (apt-get install slurmctld slurmd slurm-client munge)"
    if os.geteuid() != 0:
        return "the test cluster runs its daemons as root"
    return None


class SlurmCluster:
    def __init__(self, folder: Path, partition: str = "debug"):
        self.dir = Path(folder)
        self.partition = partition
        self.procs: list[subprocess.Popen] = []
        self.env = dict(os.environ)

    # -- bring-up -----------------------------------------------------------------------------------
    def __enter__(self) -> SlurmCluster:
        atexit.register(self.stop)
        try:
            self._munge()
            self._configure()
            self._start("slurmctld", "-D", "-f", str(self.conf))
            self._start("slurmd", "-D", "-f", str(self.conf))
            self._wait_idle()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _munge(self) -> None:
        m = self.dir / "munge"
        m.mkdir(parents=True, exist_ok=True)
        m.chmod(0o755)  # munged refuses a key folder that is not 755
        self.munge_socket = m / "munge.socket.2"
        key = m / "munge.key"
        if not key.exists():
            subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True, capture_output=True)
        key.chmod(0o400)
        subprocess.run(["munged", f"--key-file={key}", f"--socket={self.munge_socket}", f"--pid-file={m / 'pid'}",
                        f"--log-file={m / 'log'}", f"--seed-file={m / 'seed'}", "--force"],
                       check=True, capture_output=True)
        self.munge_pid = int((m / "pid").read_text())

    def _configure(self) -> None:
        node = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
        node = re.sub(r"RealMemory=(\d+)", lambda mm: f"RealMemory={int(mm.group(1)) * 9 // 10}", node)
        name = re.search(r"NodeName=(\S+)", node).group(1)
        d = self.dir
        for sub in ("state", "spool", "log"):
            (d / sub).mkdir(exist_ok=True)
        self.conf = d / "slurm.conf"
        self.conf.write_text(f"""
ClusterName=lsurftest
SlurmctldHost={socket.gethostname()}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={self.munge_socket}
CredType=cred/munge
StateSaveLocation={d / 'state'}
SlurmdSpoolDir={d / 'spool'}
SlurmctldPidFile={d / 'slurmctld.pid'}
SlurmdPidFile={d / 'slurmd.pid'}
SlurmctldLogFile={d / 'log' / 'slurmctld.log'}
SlurmdLogFile={d / 'log' / 'slurmd.log'}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MinJobAge=4
{node} NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName={self.partition} Nodes={name} Default=YES MaxTime=INFINITE State=UP
""")
        self.env["SLURM_CONF"] = str(self.conf)

    def _start(self, *cmd: str) -> None:
        log = open(self.dir / "log" / f"{cmd[0]}.out", "w")
        self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True))

    def _wait_idle(self, timeout: float = 30) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            out = self.run("sinfo", "-h", "-o", "%t", check=False).stdout
            if "idle" in out:
                return
            time.sleep(0.3)
        logs = "\n".join(p.read_text()[-2000:] for p in (self.dir / "log").glob("*") if p.is_file())
        raise RuntimeError(f"the test Slurm did not become idle in {timeout} s:\n{logs}")

    # -- use ----------------------------------------------------------------------------------------
    def run(self, *cmd: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, check=check, timeout=timeout)

    def queue(self) -> list[str]:
        return self.run("squeue", "-h", "-o", "%i", check=False).stdout.split()

    def wait_empty(self, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while self.queue() and time.time() < deadline:
            time.sleep(0.3)

    # -- tear-down ----------------------------------------------------------------------------------
    def stop(self) -> None:
        """Cancel jobs and wait for them (a running job's slurmstepd outlives the daemons), then stop."""
        if getattr(self, "_stopped", False):
            return
        self._stopped = True
        if self.procs:
            subprocess.run(["scancel", "--full", "-u", "root"], env=self.env, capture_output=True)
            self.wait_empty(30)
        for p in reversed(self.procs):
            _stop(p.pid, p)
        if hasattr(self, "munge_pid"):
            _stop(self.munge_pid)


def _free_port() -> int:
    """A port nobody listens on now, so clusters of concurrent test runs do not collide."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(pid: int, proc: subprocess.Popen | None = None) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.time() + 5
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            return
        if proc is None and not Path(f"/proc/{pid}").exists():
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if proc is not None:
        proc.wait()
