"""A real one-node Slurm cluster (slurmctld + slurmd + munged) for tests.

Why a real one: the launcher's Slurm path (sbatch scripts, srun task layout, requeue after
preemption, cancel) only means something against real Slurm; fakes drift. Everything lives in a
temporary folder with its own munge key and socket and its own ports, so it does not touch (or
clash with) a system Slurm. Clients find it through `SLURM_CONF` (see :attr:`LocalSlurmCluster.env`).

Debian bookworm's Slurm 22.05 is what this was written against; the daemons run as root (slurmd
must be root to launch jobs).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Self

SLURM_PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
_COMMANDS = ("sbatch", "srun", "scontrol", "sinfo", "slurmctld", "slurmd", "munged")
_SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")

# Job states after which a job never runs again (scontrol's JobState names).
FINISHED_STATES = frozenset({
    "COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
    "BOOT_FAIL", "DEADLINE"})


def _which(name: str) -> str | None:
    """`shutil.which`, also looking in the sbin folders a non-login PATH may lack."""
    path = os.pathsep.join([os.environ.get("PATH", ""), *_SBIN_DIRS])
    return shutil.which(name, path=path)


def _missing_commands() -> list[str]:
    return [name for name in _COMMANDS if _which(name) is None]


def ensure_installed() -> str | None:
    """Make Slurm and munge available; return None when they are, else why they cannot be.

    Installs Debian's packages when running as root with apt-get (CI starts from a clean
    machine). The reason string is meant for a skip/fail message.
    """
    if os.geteuid() != 0:
        return (f"the local Slurm cluster must run as root (slurmd launches jobs as root); "
                f"running as uid {os.geteuid()}")
    missing = _missing_commands()
    if not missing:
        return None
    apt = shutil.which("apt-get")
    if apt is None:
        return f"Slurm commands {missing} are missing and apt-get is not available to install them"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    steps = ([apt, "update"],
             [apt, "install", "-y", "--no-install-recommends", *SLURM_PACKAGES])
    for cmd in steps:
        try:
            proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True,
                                  timeout=900)
        except subprocess.TimeoutExpired:
            return f"`{' '.join(cmd)}` did not finish within 900 s"
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout)[-2000:]
            return f"`{' '.join(cmd)}` exited with {proc.returncode}:\n{tail}"
    missing = _missing_commands()
    if missing:
        return f"installed {SLURM_PACKAGES} but {missing} are still not found"
    return None


def _free_ports(count: int) -> list[int]:
    """Ports free right now, distinct (all are held open until every one is picked)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def _node_hardware() -> dict[str, str]:
    """CPUs and RealMemory as slurmd itself measures them (larger values would drain the node)."""
    out = subprocess.run([_which("slurmd"), "-C"], check=False, capture_output=True, text=True,
                         timeout=30).stdout
    fields = _parse_fields(out.splitlines()[0] if out else "")
    if not {"CPUs", "RealMemory"} <= fields.keys():
        raise RuntimeError(f"`slurmd -C` printed no CPUs / RealMemory:\n{out}")
    return fields


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"


def _parse_fields(line: str) -> dict[str, str]:
    """`scontrol show -o` prints `Key=Value` pairs separated by spaces."""
    fields = {}
    for item in line.split():
        key, sep, value = item.partition("=")
        if sep:
            fields[key] = value
    return fields


class LocalSlurmCluster:
    """One node, one default partition, all daemons as child processes of this one.

    Use as a context manager; `__exit__` cancels the remaining jobs, stops every daemon it
    started and kills any job process left behind, then checks they are all gone.

    `cred_expire` is Slurm's job-credential lifetime (AuthInfo, default 120 s): a requeued job
    gets BeginTime = requeue + cred_expire. Shortening it alone does not help much (measured:
    with 5 s the job still waited about 26 s, for the next backfill pass); :meth:`requeue`
    lifts the BeginTime instead.
    """

    NODE_TIMEOUT_S = 60.0

    def __init__(self, *, kill_wait: int = 30, cred_expire: int = 120,
                 partition: str = "debug", keep_dir: bool = False):
        self.kill_wait = kill_wait
        self.cred_expire = cred_expire
        self.partition = partition
        self.keep_dir = keep_dir
        self.root: Path | None = None
        self.hostname = socket.gethostname().split(".")[0]
        self._daemons: dict[str, subprocess.Popen] = {}

    # ----- paths and environment -------------------------------------------------------------
    @property
    def conf_path(self) -> Path:
        return self.root / "etc" / "slurm.conf"

    @property
    def munge_socket(self) -> Path:
        return self.root / "munge" / "munge.socket"

    @property
    def env(self) -> dict[str, str]:
        """Variables to merge into a subprocess's environment so Slurm clients use this cluster."""
        return {"SLURM_CONF": str(self.conf_path)}

    @property
    def daemon_pids(self) -> dict[str, int]:
        return {name: proc.pid for name, proc in self._daemons.items()}

    # ----- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> Self:
        self.root = Path(tempfile.mkdtemp(prefix="turbolaser-slurm-"))
        try:
            self._start()
        except BaseException:
            self.keep_dir = True  # the daemons' logs, for whoever reads the error
            self._stop()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop()

    def _start(self) -> None:
        started = time.monotonic()
        # munged refuses a socket folder that others cannot traverse; mkdtemp makes it 0700.
        self.root.chmod(0o755)
        for sub in ("etc", "state", "spool", "log", "run", "munge"):
            (self.root / sub).mkdir(mode=0o755)
        key = self.root / "etc" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self._write_conf()

        munge = self.root / "munge"
        self._spawn("munged", [
            _which("munged"), "--foreground", "--force", f"--socket={self.munge_socket}",
            f"--key-file={key}", f"--pid-file={munge / 'munged.pid'}",
            f"--seed-file={munge / 'munged.seed'}"])
        self._wait_until(lambda: self.munge_socket.exists(), 10, "munged to create its socket")
        conf = str(self.conf_path)
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-f", conf])
        self._spawn("slurmd", [_which("slurmd"), "-D", "-f", conf])
        try:
            self._wait_until(lambda: self.node_state() == "idle", self.NODE_TIMEOUT_S,
                             "the node to become idle")
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\nnode state: {self.node_state()!r}; kept {self.root}") \
                from None
        self.start_seconds = time.monotonic() - started

    def _write_conf(self) -> None:
        state, spool, run = (self.root / sub for sub in ("state", "spool", "run"))
        hardware = _node_hardware()
        ctld_port, slurmd_port = _free_ports(2)
        lines = [
            "ClusterName=turbolaser-test",
            f"SlurmctldHost={self.hostname}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={slurmd_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket},cred_expire={self.cred_expire}",
            f"StateSaveLocation={state}",
            f"SlurmdSpoolDir={spool}",
            f"SlurmctldPidFile={run / 'slurmctld.pid'}",
            f"SlurmdPidFile={run / 'slurmd.pid'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            f"PlugStackConfig={self.root / 'etc' / 'plugstack.conf'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=batch_sched_delay=0",
            "JobRequeue=1",
            "ReturnToService=2",
            "MinJobAge=3600",
            "SlurmdTimeout=60",
            "SlurmctldTimeout=60",
            "InactiveLimit=0",
            f"KillWait={self.kill_wait}",
            "Waittime=0",
            (f"NodeName={self.hostname} NodeAddr=127.0.0.1 CPUs={hardware['CPUs']} "
             f"RealMemory={hardware['RealMemory']} State=UNKNOWN"),
            (f"PartitionName={self.partition} Nodes={self.hostname} Default=YES "
             "MaxTime=INFINITE State=UP"),
        ]
        (self.root / "etc" / "plugstack.conf").write_text("")
        self.conf_path.write_text("\n".join(lines) + "\n")

    def _spawn(self, name: str, cmd: list[str]) -> None:
        """Start a daemon in the foreground; without a log file it logs to stderr, kept here."""
        log = self.root / "log" / f"{name}.log"
        with open(log, "w") as out:
            self._daemons[name] = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, **self.env}, start_new_session=True)

    def _wait_until(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = {n: p.returncode for n, p in self._daemons.items() if p.poll() is not None}
            if dead:
                raise RuntimeError(f"Slurm daemon(s) exited while waiting for {what}: {dead}\n"
                                   + self.log_tails())
            if ready():
                return
            time.sleep(0.2)
        raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}\n"
                           + self.log_tails())

    def log_tails(self, chars: int = 3000) -> str:
        """The end of every daemon's log and stdout, for error messages."""
        logs = (self.root / "log" / f"{name}.log" for name in self._daemons)
        return "\n".join(f"--- {log} ---\n{_tail(log, chars)}" for log in logs)

    def _stop(self) -> None:
        """Cancel jobs, stop daemons (TERM, then KILL), sweep strays; raise if any survive."""
        if self._daemons.get("slurmctld") and self._daemons["slurmctld"].poll() is None:
            self.run(["scancel", f"--partition={self.partition}"], check=False,
                     timeout=30)
            try:
                self._wait_until(lambda: not self.run(["squeue", "-h", "-o", "%i"], check=False,
                                                      timeout=30).stdout.strip(),
                                 self.kill_wait + 15, "cancelled jobs to leave the queue")
            except RuntimeError:
                pass  # the sweep below kills what is left
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self._daemons.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)
        survivors = self._sweep_strays() if self.root is not None else []
        if self.root is not None and not self.keep_dir and not survivors:
            shutil.rmtree(self.root, ignore_errors=True)
        if survivors:
            raise RuntimeError(f"processes of the local Slurm cluster survived: {survivors}")

    def stray_pids(self) -> list[int]:
        """Live processes that carry this cluster's SLURM_CONF (slurmstepd, job steps)."""
        marker = f"SLURM_CONF={self.conf_path}".encode()
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                environ = Path(f"/proc/{entry}/environ").read_bytes()
                status = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if marker in environ.split(b"\0") and status.rsplit(")", 1)[1].split()[0] != "Z":
                pids.append(int(entry))
        return pids

    def _sweep_strays(self) -> list[int]:
        for _ in range(2):
            pids = self.stray_pids()
            if not pids:
                return []
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)
        return self.stray_pids()

    # ----- client helpers --------------------------------------------------------------------
    def run(self, cmd: list[str], *, check: bool = True, timeout: float = 60,
            **kwargs) -> subprocess.CompletedProcess:
        """Run a command with this cluster's environment; text output captured."""
        env = {**os.environ, **kwargs.pop("env", {}), **self.env}
        proc = subprocess.run(list(map(str, cmd)), check=False, env=env, capture_output=True,
                              text=True, timeout=timeout, **kwargs)
        if check and proc.returncode != 0:
            raise RuntimeError(f"`{' '.join(map(str, cmd))}` exited with {proc.returncode}:\n"
                               f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        return proc

    def node_state(self) -> str:
        """The node's state as sinfo prints it (`idle`, `alloc`, `down*`, ...), or ''."""
        proc = self.run(["sinfo", "-h", "-N", "-o", "%T"], check=False, timeout=30)
        return proc.stdout.strip() if proc.returncode == 0 else ""

    def submit(self, script: str | os.PathLike, *sbatch_args: str,
               script_args: tuple[str, ...] = ()) -> int:
        """`sbatch --parsable [sbatch_args] script [script_args]`; returns the job id."""
        out = self.run(["sbatch", "--parsable", *sbatch_args, script, *script_args]).stdout
        return int(out.strip().split(";")[0])

    def job_info(self, jobid: int) -> dict[str, str]:
        """`scontrol show job -o` as a dict (finished jobs stay for MinJobAge = 3600 s)."""
        out = self.run(["scontrol", "show", "job", "-o", str(jobid)]).stdout
        return _parse_fields(out.strip().splitlines()[0])

    def job_state(self, jobid: int) -> str:
        """JobState, e.g. PENDING, RUNNING, COMPLETING, COMPLETED, CANCELLED."""
        return self.job_info(jobid)["JobState"]

    def wait_for(self, jobid: int, states: set[str] | frozenset[str], timeout: float = 60) -> str:
        """Poll until the job's state is one of `states`; return it. Fails on timeout, or when
        the job finished in a state not asked for."""
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = self.job_state(jobid)
            if state in states:
                return state
            if state in FINISHED_STATES:
                raise RuntimeError(f"job {jobid} finished as {state}, waiting for {states}: "
                                   f"{self.job_info(jobid)}")
            time.sleep(0.2)
        raise RuntimeError(f"job {jobid} still {state} after {timeout:.0f} s, waiting for "
                           f"{states}: {self.job_info(jobid)}\n{self.log_tails()}")

    def requeue(self, jobid: int, timeout: float = 60) -> None:
        """`scontrol requeue`, then make the job eligible again at once.

        A requeued job gets BeginTime = now + cred_expire (120 s by default); `scontrol update
        StartTime=now` sent at least 2 s after the requeue lifts that (sent sooner it does not
        stick), so it is sent once the job is back to plain PENDING and 2 s have passed.
        """
        requeued = time.monotonic()
        self.run(["scontrol", "requeue", str(jobid)])
        self.start_now(jobid, requeued, timeout)

    def start_now(self, jobid: int, requeued: float | None = None, timeout: float = 60) -> None:
        """Lift the BeginTime delay of a job that was requeued (by `requeue` or by itself) at
        ``requeued`` (time.monotonic(); None: now)."""
        requeued = time.monotonic() if requeued is None else requeued
        self.wait_for(jobid, {"PENDING"}, timeout)
        time.sleep(max(0.0, requeued + 2.1 - time.monotonic()))
        self.run(["scontrol", "update", f"jobid={jobid}", "StartTime=now"])

    def cancel(self, jobid: int) -> None:
        self.run(["scancel", str(jobid)])
