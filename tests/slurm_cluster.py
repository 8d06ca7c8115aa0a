"""A real one-node SLURM cluster on this machine for the tests (not a test module).

Debian's ``slurm-wlm`` and ``munge`` (``apt-get install slurm-wlm munge``):
``munged``, ``slurmctld`` and ``slurmd`` run in the foreground as this
process's children, with their key, configuration, state, spool, logs and
sockets in one folder, on free ports, so nothing of the machine's own
``/etc/slurm`` or ``/etc/munge`` is read or changed and two clusters do not
meet. No cgroups: processes are tracked by process group
(``proctrack/pgid``), tasks are not bound (``task/none``); jobs get CPUs and
memory from ``select/cons_tres`` (``CR_CPU_Memory``) on the one node that
``slurmd -C`` describes. While the context is open ``SLURM_CONF`` points at
it, so ``sbatch``, ``squeue`` and ``scancel`` (and dask-jobqueue, which calls
them) use it.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

from conftest import free_port, stop_processes

#: The programs a cluster needs, and where Debian puts the daemons (often not on a user's PATH).
PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "sinfo", "scontrol")
_SEARCH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin"])
#: The partition of the cluster (the default one: jobs need not name it).
PARTITION = "lungzarr"
#: ``squeue`` columns: job id, partition, whole job name, user, state, time, nodes, node list or reason.
SQUEUE_FORMAT = "%.6i %.9P %.14j %.6u %.8T %.8M %.5D %R"


def missing_programs() -> list[str]:
    """The programs of :data:`PROGRAMS` that are not installed."""
    return [name for name in PROGRAMS if shutil.which(name, path=_SEARCH) is None]


def _program(name: str) -> str:
    return shutil.which(name, path=_SEARCH)


def _node() -> dict:
    """This machine as ``slurmd -C`` sees it: NodeName, CPUs, sockets, cores, threads, RealMemory."""
    out = subprocess.run([_program("slurmd"), "-C"], capture_output=True, text=True, check=True).stdout
    first = out.splitlines()[0]
    return dict(re.findall(r"(\w+)=(\S+)", first))


def _config(folder: Path, node: dict, *, ctld_port: int, slurmd_port: int) -> str:
    name = node["NodeName"]
    return f"""\
# A one-node SLURM cluster in {folder} (tests/slurm_cluster.py).
ClusterName=lungzarr-test
SlurmctldHost={name}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={folder}/munge/munge.socket
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/log/slurmctld.log
SlurmdLogFile={folder}/log/slurmd.log
MailProg=/bin/true
ProctrackType=proctrack/pgid
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
ReturnToService=2
NodeName={name} NodeAddr=127.0.0.1 CPUs={node["CPUs"]} Boards={node.get("Boards", 1)} \
SocketsPerBoard={node["SocketsPerBoard"]} CoresPerSocket={node["CoresPerSocket"]} \
ThreadsPerCore={node["ThreadsPerCore"]} RealMemory={node["RealMemory"]} State=UNKNOWN
PartitionName={PARTITION} Nodes={name} Default=YES MaxTime=INFINITE State=UP
"""


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


class SlurmCluster:
    """A running cluster: its folder, configuration and the commands a test asks it.

    Attributes
    ----------
    folder : Path
        Key, configuration, state, spool and logs (``log/``).
    conf : Path
        Its ``slurm.conf`` (``SLURM_CONF``).
    node : dict
        This machine as ``slurmd -C`` described it (``NodeName``, ``CPUs``, ``RealMemory``, ...).
    """

    def __init__(self, folder: Path, conf: Path, node: dict):
        self.folder, self.conf, self.node = folder, conf, node

    def command(self, *argv: str, check: bool = True) -> str:
        """Run a SLURM client command (``squeue``, ``sinfo``, ...) against this cluster; return its stdout."""
        env = {**os.environ, "SLURM_CONF": str(self.conf)}
        r = subprocess.run([_program(argv[0]), *argv[1:]], capture_output=True, text=True, env=env, timeout=60)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited with {r.returncode}: {r.stderr.strip()}")
        return r.stdout

    def squeue(self) -> str:
        """The queue as ``squeue`` prints it (:data:`SQUEUE_FORMAT`: whole job names, states spelt out)."""
        return self.command("squeue", "--format", SQUEUE_FORMAT)

    def jobs(self) -> dict[str, tuple[str, str]]:
        """The jobs in the queue: id -> (name, state)."""
        rows = [line.split("|") for line in self.command("squeue", "-h", "-o", "%i|%j|%T").splitlines() if line]
        return {job: (name, state) for job, name, state in rows}

    def logs(self) -> str:
        """The daemons' last log lines (for a failure's message)."""
        return "\n".join(f"--- {p.name}\n{_tail(p)}" for p in sorted((self.folder / "log").glob("*")))


def _wait(what: str, ready, *, timeout: float, procs, folder: Path) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        dead = [p.args[0] for p in procs if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            logs = "\n".join(f"--- {p.name}\n{_tail(p)}" for p in sorted((folder / "log").glob("*")))
            raise RuntimeError(f"the SLURM test cluster: {what} " + (f"({', '.join(dead)} exited)" if dead else
                                                                      f"not within {timeout:g} s") + f"\n{logs}")
        time.sleep(0.2)


@contextmanager
def slurm_cluster(folder, *, timeout: float = 60):
    """Start munged, slurmctld and slurmd in ``folder``; yield a :class:`SlurmCluster` once the node is idle.

    On leaving, every job still in the queue is cancelled (and its processes
    ended once the queue stays full for 30 s), then the daemons are stopped
    (SIGTERM, SIGKILL after 30 s): also when the test failed.

    Raises
    ------
    RuntimeError
        A program is missing, or a daemon exited or the node was not idle
        within ``timeout`` seconds (the message holds the daemons' last log lines).
    """
    missing = missing_programs()
    if missing:
        raise RuntimeError(f"SLURM programs missing: {', '.join(missing)} (apt-get install slurm-wlm munge)")
    folder = Path(folder)
    for sub in ("state", "spool", "log"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    # munged refuses a key that others may read; the socket's folder is this user's only (munged says so in its
    # log, and works): no other local user can get a credential from it and submit jobs that run as root.
    (folder / "munge").mkdir(mode=0o700, exist_ok=True)
    key = folder / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    node = _node()
    conf = folder / "slurm.conf"
    conf.write_text(_config(folder, node, ctld_port=free_port(), slurmd_port=free_port()))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    log = folder / "log"
    procs = []

    def start(argv, name):
        with open(log / f"{name}.out", "wb") as out:
            procs.append(subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          env=env, cwd=folder))

    cluster = SlurmCluster(folder, conf, node)
    saved = os.environ.get("SLURM_CONF")
    try:
        munge = folder / "munge"
        start([_program("munged"), "--foreground", "--force", f"--socket={munge}/munge.socket",
               f"--key-file={key}", f"--pid-file={munge}/munged.pid", f"--seed-file={munge}/munged.seed",
               f"--log-file={log}/munged.log"], "munged")
        _wait("munged's socket", (munge / "munge.socket").exists, timeout=timeout, procs=procs, folder=folder)
        start([_program("slurmctld"), "-D"], "slurmctld")
        _wait("slurmctld answering", lambda: "UP" in cluster.command("scontrol", "ping", check=False),
              timeout=timeout, procs=procs, folder=folder)
        start([_program("slurmd"), "-D", "-N", node["NodeName"]], "slurmd")
        _wait("the node idle", lambda: cluster.command("sinfo", "-h", "-N", "-o", "%T", check=False).strip()
              == "idle", timeout=timeout, procs=procs, folder=folder)
        os.environ["SLURM_CONF"] = str(conf)
        yield cluster
    finally:
        if saved is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = saved
        try:
            _cancel_all(cluster)
        except (RuntimeError, subprocess.SubprocessError):
            pass  # slurmctld never answered (the start failed): it holds no job
        # slurmd before slurmctld (it reports to it), munged last (both authenticate through it).
        stop_processes(*reversed(procs))


def _cancel_all(cluster: SlurmCluster, *, timeout: float = 30) -> None:
    """Cancel every job and wait until the queue is empty; end what outlives that (its process ids from slurmd)."""
    import signal

    if not cluster.jobs():
        return
    cluster.command("scancel", "--partition", PARTITION, check=False)
    deadline = time.monotonic() + timeout
    while cluster.jobs() and time.monotonic() < deadline:
        time.sleep(0.5)
    if cluster.jobs():
        # `scontrol listpids`: PID JOBID STEPID LOCALID GLOBALID of each job process on this node.
        for line in cluster.command("scontrol", "listpids", check=False).splitlines()[1:]:
            try:
                os.kill(int(line.split()[0]), signal.SIGKILL)
            except (ValueError, IndexError, ProcessLookupError):
                pass
