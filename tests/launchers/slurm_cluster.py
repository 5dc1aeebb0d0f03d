"""A real single-node Slurm cluster for tests: slurmctld + slurmd on loopback, in a temp dir.

Uses Debian's slurm-wlm (``apt-get install slurm-wlm``). Nothing system-wide is touched: the
config, state, spool and logs live in a fresh temporary directory, the daemons listen on free
ports, and every Slurm command finds the cluster through ``SLURM_CONF`` (``cluster.env``).
Authentication is off (``auth/none``) and both daemons run as the current user (root or not), so
jobs run as that user too.

    cluster = SlurmCluster.start()      # or SlurmCluster.skip_reason() first
    subprocess.run(["sbatch", ...], env={**os.environ, **cluster.env})
    cluster.stop()

When Slurm is missing the tests skip with the reason, unless
``AUTOMODEL_REQUIRE_SLURM=1`` (CI), where they fail instead.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

REQUIRE_ENV = "AUTOMODEL_REQUIRE_SLURM"
BINARIES = ("slurmctld", "slurmd", "sbatch", "srun", "squeue", "scontrol", "scancel", "sinfo")
PARTITION = "debug"


def skip_reason() -> str | None:
    """Why a cluster cannot be started here, or None."""
    missing = [name for name in BINARIES if shutil.which(name) is None]
    if missing:
        return (f"Slurm is not installed ({', '.join(missing)} not on PATH); install Debian's "
                f"slurm-wlm (`apt-get install -y slurm-wlm`) to run the Slurm launcher tests")
    return None


def required() -> bool:
    return os.environ.get(REQUIRE_ENV, "") not in ("", "0", "false", "no")


def _free_ports(count: int) -> list[int]:
    sockets, ports = [], []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
            ports.append(sock.getsockname()[1])
    finally:
        for sock in sockets:
            sock.close()
    return ports


def _memory_mb() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return max(512, int(line.split()[1]) // 1024 - 512)
    except (OSError, ValueError, IndexError):
        pass
    return 1024


class SlurmCluster:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.conf = root / "slurm.conf"
        self.node = socket.gethostname().split(".")[0]
        self.cpus = os.cpu_count() or 1
        self.user = pwd.getpwuid(os.geteuid()).pw_name
        self.processes: list[subprocess.Popen] = []

    @property
    def env(self) -> dict[str, str]:
        """Environment that points every Slurm command (and the jobs) at this cluster."""
        return {"SLURM_CONF": str(self.conf)}

    def write_config(self) -> None:
        ctld_port, slurmd_port = _free_ports(2)
        for name in ("state", "spool", "log"):
            (self.root / name).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(f"""\
# Test cluster written by tests/launchers/slurm_cluster.py
ClusterName=automodeltest
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/none
CredType=cred/none
# Requeued jobs may start again after cred_expire seconds (default 120).
AuthInfo=cred_expire=5
SlurmUser={self.user}
SlurmdUser={self.user}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
JobRequeue=1
ReturnToService=2
KillWait=5
MinJobAge=5
InactiveLimit=0
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MailProg=/bin/true
StateSaveLocation={self.root}/state
SlurmdSpoolDir={self.root}/spool
SlurmctldPidFile={self.root}/slurmctld.pid
SlurmdPidFile={self.root}/slurmd.pid
SlurmctldLogFile={self.root}/log/slurmctld.log
SlurmdLogFile={self.root}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={_memory_mb()} State=UNKNOWN
PartitionName={PARTITION} Nodes={self.node} Default=YES MaxTime=60 State=UP
""")

    @classmethod
    def start(cls, timeout: float = 60) -> SlurmCluster:
        cluster = cls(Path(tempfile.mkdtemp(prefix="amslurm-")))
        try:
            cluster.write_config()
            env = {**os.environ, **cluster.env}
            for daemon in ("slurmctld", "slurmd"):
                args = [daemon, "-D"] + (["-c", "-i"] if daemon == "slurmctld" else [])
                log = open(cluster.root / "log" / f"{daemon}.stdout", "wb")
                cluster.processes.append(subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT,
                                                          start_new_session=True))
                log.close()
            cluster.wait_idle(timeout)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def run(self, *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        done = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **self.env})
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}): {done.stderr}{done.stdout}")
        return done

    def wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            for process in self.processes:
                if process.poll() is not None:
                    raise RuntimeError(f"{process.args[0]} exited with {process.returncode}:\n{self.daemon_logs()}")
            done = self.run("sinfo", "-h", "-N", "-o", "%T", check=False, timeout=10)
            last = (done.stdout + done.stderr).strip()
            if done.returncode == 0 and last.startswith("idle"):
                return
            time.sleep(0.3)
        raise RuntimeError(f"the test Slurm node did not become idle in {timeout:.0f} s (sinfo: {last!r}):\n"
                           f"{self.daemon_logs()}")

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a mapping ({} once the job has left slurmctld's memory)."""
        import re

        done = self.run("scontrol", "show", "job", "-o", job_id, check=False)
        if done.returncode != 0 or not done.stdout.strip():
            return {}
        return dict(re.findall(r"(\w+)=(\S*)", done.stdout.splitlines()[0]))

    def queue(self) -> list[str]:
        done = self.run("squeue", "-h", "-o", "%i", check=False)
        return done.stdout.split() if done.returncode == 0 else []

    def daemon_logs(self, lines: int = 40) -> str:
        out = []
        for path in sorted((self.root / "log").glob("*")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(out)

    def stop(self) -> None:
        """Cancel what is left in the queue, stop both daemons and remove the temp dir."""
        if all(p.poll() is None for p in self.processes) and self.processes:
            jobs = self.queue()
            if jobs:
                self.run("scancel", *jobs, check=False)
                deadline = time.monotonic() + 20
                while self.queue() and time.monotonic() < deadline:
                    time.sleep(0.5)
        for process in reversed(self.processes):  # slurmd first, then slurmctld
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        self.processes.clear()
        shutil.rmtree(self.root, ignore_errors=True)
