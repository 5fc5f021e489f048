"""A small Slurm cluster on this machine, started by the tests (Debian's slurm-wlm, munge).

munged with a key of its own, a `slurm.conf` in a temporary directory (free ports, its own
spool and state directories), `slurmctld` and two `slurmd` (two nodes on this one host, each
with half its CPUs) in the foreground as child processes. Commands find it through
`SLURM_CONF`, which `env()` sets. Needs root (the daemons run as root, `SlurmUser=root`),
as in CI.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.processes import free_port

PARTITION = "debug"


@dataclass
class SlurmCluster:
    root: Path
    conf: Path
    nodes: list[str]
    cpus: int  # per node
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *argv: str) -> str:
        return subprocess.run(
            argv, env=self.env(), check=True, capture_output=True, text=True, timeout=30
        ).stdout

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(self.root.glob("*.log"))
        )


def _start_munge(root: Path) -> subprocess.Popen[bytes] | None:
    """munged on the default socket, unless one already answers there."""
    if subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
        return None
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        key.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True)
        shutil.chown(key, "munge", "munge") if _user_exists("munge") else None
        key.chmod(0o400)
    for path in ("/run/munge", "/var/lib/munge", "/var/log/munge"):
        Path(path).mkdir(parents=True, exist_ok=True)
    with (root / "munged.log").open("wb") as out:
        proc = subprocess.Popen(
            ["munged", "--foreground", "--force"],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    _wait(lambda: subprocess.run(["munge", "-n"], capture_output=True).returncode == 0, "munged", 15)
    return proc


def _user_exists(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _wait(ready: object, what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ready():  # type: ignore[operator]
            return
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not come up within {timeout_s:g} s")


def _write_conf(root: Path, node: str, names: list[str], cpus: int) -> Path:
    """Two Slurm nodes on this one host (one slurmd each, on its own port): heterogeneous job
    components never share a node, so a batch of two needs two."""
    nodes = "\n".join(
        f"NodeName={name} NodeHostname={node} NodeAddr=127.0.0.1 Port={free_port()}"
        f" CPUs={cpus} RealMemory=10000 State=UNKNOWN"
        for name in names
    )
    (root / "spool").mkdir()
    (root / "state").mkdir()
    conf = root / "slurm.conf"
    conf.write_text(
        f"""ClusterName=vpooltest
SlurmctldHost={node}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
StateSaveLocation={root / "state"}
SlurmdSpoolDir={root / "spool" / "slurmd-%n"}
SlurmctldPidFile={root / "slurmctld.pid"}
SlurmdPidFile={root / "slurmd-%n.pid"}
SlurmctldLogFile={root / "slurmctld.log"}
SlurmdLogFile={root / "slurmd-%n.log"}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
MinJobAge=600
KillWait=30
MpiDefault=none
{nodes}
PartitionName={PARTITION} Nodes={",".join(names)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""
    )
    return conf


@contextmanager
def slurm_cluster(root: Path) -> Iterator[SlurmCluster]:
    """Start munge (if need be), slurmctld and slurmd; stop them (and every job) on exit."""
    for tool in ("slurmctld", "slurmd", "sbatch", "munged"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"`{tool}` is not installed: apt-get install slurm-wlm munge")
    host = socket.gethostname().split(".")[0]
    names = ["vpool-n1", "vpool-n2"]
    cpus = max(1, (os.cpu_count() or 2) // len(names))
    conf = _write_conf(root, host, names, cpus)
    cluster = SlurmCluster(root, conf, names, cpus)
    env = cluster.env()
    munge = _start_munge(root)
    if munge is not None:
        cluster.processes.append(munge)
    try:
        daemons = [("slurmctld", []), *(("slurmd", ["-N", name]) for name in names)]
        for daemon, extra in daemons:
            with (root / f"{daemon}{'-' + extra[1] if extra else ''}.out.log").open("wb") as out:
                cluster.processes.append(
                    subprocess.Popen(
                        [daemon, "-D", *extra, "-f", str(conf)],
                        env=env,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )

        def node_idle() -> bool:
            try:
                out = cluster.run("sinfo", "-h", "-N", "-o", "%T")
            except subprocess.SubprocessError:
                return False
            states = out.split()
            return len(states) == len(names) and all(s in ("idle", "mixed", "allocated") for s in states)

        try:
            _wait(node_idle, "the Slurm node", 60)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\n{cluster.logs()}") from None
        yield cluster
    finally:
        try:
            cluster.run("scancel", "--user", "root")
        except (subprocess.SubprocessError, OSError):
            pass
        for proc in reversed(cluster.processes):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
