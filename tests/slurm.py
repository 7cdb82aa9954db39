"""A real single-node Slurm (slurmctld + slurmd + munged), started from
nothing in a temporary folder and stopped by PID: what the README's sbatch
script runs on in the tests. Needs root and the slurm-wlm and munge packages
(tests/run.sh installs them)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

SLURM_CONF = """\
ClusterName=rqa
SlurmctldHost={host}
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={base}/munge.socket
SlurmUser=root
SlurmdUser=root
StateSaveLocation={base}/state
SlurmdSpoolDir={base}/spool
SlurmctldPidFile={base}/slurmctld.pid
SlurmdPidFile={base}/slurmd.pid
SlurmctldLogFile={base}/slurmctld.log
SlurmdLogFile={base}/slurmd.log
# pgid: linuxproc leaked processes that ignored SIGTERM; no cgroup plugins
# (cgroup v1 in a hybrid mount here).
ProctrackType=proctrack/pgid
TaskPlugin=task/none
# Cores and memory are consumable, so array tasks run side by side.
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU={mem_per_cpu}
KillWait=10
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
{node} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalSlurm:
    """slurmctld, slurmd and munged for the tests; env() is what a user's
    shell on the cluster has (SLURM_CONF pointing at this cluster)."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.conf = base / "slurm.conf"
        self.processes: list[subprocess.Popen] = []

    def start(self) -> LocalSlurm:
        base = self.base
        for folder in ("state", "spool"):
            (base / folder).mkdir(parents=True, exist_ok=True)
        key = base / "munge.key"
        subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True)
        key.chmod(0o400)
        self.spawn(
            "munged",
            "-F",
            "--force",
            f"--key-file={key}",
            f"--socket={base}/munge.socket",
            f"--pid-file={base}/munged.pid",
            f"--log-file={base}/munged.log",
            f"--seed-file={base}/munged.seed",
        )
        self.wait_for(lambda: (base / "munge.socket").exists(), "munged")
        node = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True)
        node_line = node.stdout.splitlines()[0]
        cpus = int(node_line.split("CPUs=")[1].split()[0])
        memory = int(node_line.split("RealMemory=")[1].split()[0])
        host = node_line.split("NodeName=")[1].split()[0]
        self.conf.write_text(
            SLURM_CONF.format(
                host=host,
                base=base,
                node=node_line,
                ctld_port=free_port(),
                slurmd_port=free_port(),
                mem_per_cpu=memory // (2 * cpus),
            )
        )
        self.spawn("slurmctld", "-D", "-i", "-f", str(self.conf))
        self.spawn("slurmd", "-D", "-f", str(self.conf))
        self.wait_for(lambda: self.node_state() == "idle", "the node to be idle")
        return self

    def spawn(self, *argv: str) -> None:
        log = open(self.base / f"{argv[0]}.out", "ab")
        self.processes.append(
            subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env())
        )

    def env(self) -> dict[str, str]:
        return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "SLURM_CONF": str(self.conf)}

    def node_state(self) -> str:
        result = subprocess.run(
            ["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=self.env()
        )
        return result.stdout.strip()

    def wait_for(self, condition, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            for process in self.processes:
                if process.poll() is not None:
                    raise RuntimeError(f"{process.args[0]} exited: see {self.base}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"waited {timeout:g} s for {what}: see {self.base}")
            time.sleep(0.2)

    def jobs(self, job_id: str) -> list[str]:
        """States of the job's tasks still known to slurmctld (empty: all done)."""
        result = subprocess.run(
            ["squeue", "-h", "-j", job_id, "-o", "%T"],
            capture_output=True,
            text=True,
            env=self.env(),
        )
        return result.stdout.split()

    def finished(self, job_id: str) -> dict[int, tuple[str, str]]:
        """(state, exit code) of each array task, while slurmctld remembers
        (MinJobAge, 300 s by default; there is no accounting database here)."""
        result = subprocess.run(
            ["scontrol", "-o", "show", "job", job_id],
            capture_output=True,
            text=True,
            env=self.env(),
        )
        tasks = {}
        for line in result.stdout.splitlines():
            fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
            tasks[int(fields["ArrayTaskId"])] = (fields["JobState"], fields["ExitCode"])
        return tasks

    def wait_for_job(self, job_id: str, timeout: float = 900) -> None:
        self.wait_for(lambda: not self.jobs(job_id), f"job {job_id}", timeout)

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in reversed(self.processes):
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
