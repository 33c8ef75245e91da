"""A throw-away one-machine Slurm cluster for tests: munged, slurmctld and one slurmd, all as
root, every file under one temporary directory, ports picked free.

    with SlurmCluster(tmp_path) as cluster:      # raises SlurmUnavailable with the reason
        job = cluster.sbatch(["--nodes", "1", script, ...], env=...)
        cluster.wait(job, lambda info: info["JobState"] == "COMPLETED", timeout=300)

Needs Debian's ``slurm-wlm`` and ``munge`` (``apt-get install slurm-wlm munge``) and root (slurmd
runs jobs as their submitting user, and the daemons read a root-owned munge key). Works in a
container without cgroups: ``proctrack/linuxproc``, ``task/none``, no accounting.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from contextlib import closing
from pathlib import Path
from typing import Callable, Dict, List, Optional

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo", "scancel")


class SlurmUnavailable(RuntimeError):
    """Slurm cannot be started here (missing packages, not root, a daemon that does not come up)."""


def _free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _memory_mb() -> int:
    try:
        with open("/proc/meminfo") as f:
            kb = int(re.search(r"MemTotal:\s+(\d+)", f.read()).group(1))
        return max(256, kb // 1024 // 2)
    except (OSError, AttributeError):
        return 1024


class SlurmCluster:
    NODE = "rils-slurm-node"

    def __init__(self, root: os.PathLike, cpus: Optional[int] = None):
        self.root = Path(root)
        self.cpus = cpus or os.cpu_count() or 1
        self.procs: List[subprocess.Popen] = []
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"

    # ------------------------------------------------------------------ set-up
    @staticmethod
    def unavailable_reason() -> Optional[str]:
        """Why this machine cannot run the cluster, or None."""
        missing = [d for d in DAEMONS if shutil.which(d) is None and not os.path.exists(f"/usr/sbin/{d}")]
        if missing:
            return (f"Slurm/munge not installed (missing {', '.join(missing)}): "
                    "apt-get install slurm-wlm munge")
        if os.geteuid() != 0:
            return "the test Slurm cluster runs its daemons as root; not root here"
        return None

    def env(self, extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
        """Environment for Slurm clients (and jobs submitted with it)."""
        return {**os.environ, "SLURM_CONF": str(self.conf), **(extra or {})}

    def _write_config(self) -> None:
        r = self.root
        for d in ("munge", "state", "spool", "log"):
            (r / d).mkdir(parents=True, exist_ok=True)
        os.chmod(r / "munge", 0o700)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        ctl_port, node_port = _free_port(), _free_port()
        self.conf.write_text(f"""\
ClusterName=rilstest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctl_port}
SlurmdPort={node_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=3600
MailProg=/bin/true
NodeName={self.NODE} NodeHostname=localhost NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={_memory_mb()} State=UNKNOWN
PartitionName=test Nodes={self.NODE} Default=YES MaxTime=INFINITE State=UP
""")

    def _spawn(self, cmd: List[str], log: str) -> subprocess.Popen:
        out = open(self.root / "log" / log, "ab")
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env(),
                                start_new_session=True)
        out.close()
        self.procs.append(proc)
        return proc

    def start(self, timeout: float = 60) -> "SlurmCluster":
        reason = self.unavailable_reason()
        if reason:
            raise SlurmUnavailable(reason)
        self._write_config()
        r = self.root
        self._spawn(["munged", "--foreground", "--force", f"--socket={self.munge_socket}",
                     f"--key-file={r}/munge/munge.key", f"--pid-file={r}/munge/munged.pid",
                     f"--seed-file={r}/munge/munged.seed", f"--log-file={r}/log/munged.log"], "munged.out")
        self._wait_for(lambda: self.munge_socket.exists(), timeout, "munged did not create its socket")
        self._spawn(["slurmctld", "-D", "-i", "-f", str(self.conf)], "slurmctld.out")
        self._spawn(["slurmd", "-D", "-N", self.NODE, "-f", str(self.conf)], "slurmd.out")

        self.wait_node_idle(timeout)
        return self

    def _wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            dead = [p for p in self.procs if p.poll() is not None]
            if dead:
                raise SlurmUnavailable(f"{what}: {dead[0].args[0]} exited with {dead[0].returncode}\n" + self.logs())
            if predicate():
                return
            time.sleep(0.2)
        raise SlurmUnavailable(f"{what} within {timeout:.0f}s\n" + self.logs())

    def logs(self, tail: int = 3000) -> str:
        out = []
        for p in sorted((self.root / "log").glob("*")):
            text = p.read_text(errors="replace")
            out.append(f"--- {p.name}\n{text[-tail:]}")
        return "\n".join(out)

    def stop(self) -> None:
        """Cancel every job, then stop the daemons (their whole process groups)."""
        if self.conf.exists() and self.procs:
            self.run(["scancel", "--full", "--user", str(os.getuid())], check=False)
        for proc in reversed(self.procs):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs.clear()

    def __enter__(self) -> "SlurmCluster":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ clients
    def run(self, cmd: List[str], check: bool = True, env: Optional[Dict[str, str]] = None,
            cwd: Optional[str] = None, timeout: float = 60) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=self.env(env), cwd=cwd, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
        return proc

    def sbatch(self, args: List[str], env: Optional[Dict[str, str]] = None, cwd: Optional[str] = None) -> str:
        """Submit; returns the job id."""
        out = self.run(["sbatch", "--parsable", *args], env=env, cwd=cwd).stdout.strip()
        return out.split(";")[0]

    def job(self, job_id: str) -> Dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, StdOut, ...); {} if unknown."""
        out = self.run(["scontrol", "show", "job", "-o", job_id], check=False)
        if out.returncode != 0:
            return {}
        return dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", out.stdout))

    def wait_node_idle(self, timeout: float) -> None:
        """Until the node has finished cleaning up after its last job (state ``idle``)."""
        def idle():
            out = self.run(["sinfo", "-h", "-N", "-o", "%T"], check=False)
            return out.returncode == 0 and out.stdout.strip() == "idle"
        self._wait_for(idle, timeout, "the Slurm node did not become idle")

    def wait(self, job_id: str, predicate: Callable[[Dict[str, str]], bool], timeout: float,
             what: str = "") -> Dict[str, str]:
        deadline = time.time() + timeout
        info: Dict[str, str] = {}
        while time.time() < deadline:
            info = self.job(job_id)
            if info and predicate(info):
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id}: {what or 'condition'} not reached within {timeout:.0f}s; "
                           f"last state {info.get('JobState')} ({info.get('Reason')})\n" + self.logs())
