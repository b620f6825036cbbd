"""Run an untrusted Python program (a model's code answer) in a limited subprocess.

GRPO's code reward (Hunyuan-TurboS RL stage I, code : math : logic = 2 : 2 : 1) executes sampled
programs by the thousand; a few will loop forever, eat memory, fork, touch the network or write
over files, by accident or as reward hacking. Unprivileged Linux has no full jail, so the defence
is layered, and each layer is cheap:

- a fresh temporary directory as cwd, deleted afterwards; ``sys.executable -I -B`` (isolated: no
  user site, no PYTHON* variables, no cwd on sys.path) with an almost empty environment;
- kernel limits set by the child on itself before the program runs (`resource.setrlimit`): CPU
  seconds, address space, file size, open files, processes (0: no fork, no threads) and core dumps;
- a wall-clock timeout after which the whole process group (``start_new_session``) gets SIGKILL;
- a `sys.addaudithook` hook, which Python code cannot remove, refusing: sockets, subprocesses,
  exec/spawn/fork/kill, ctypes, rlimit changes, gc, traceback/generator frame access, writes
  or file-system changes outside the folder, reads of /proc, /sys and /dev;
- when ``unshare -rn`` works, a new user + network namespace (no interfaces), so sockets fail even
  if the hook were bypassed; never required.

Known limits: audit hooks are not a security boundary against a determined attacker (CPython says
so: crafted bytecode via `marshal` can corrupt the interpreter); reads elsewhere in the file
system are allowed (the interpreter needs its standard library); as root, the kernel does not
enforce the process limit, so the hook alone stops forks; `os.mknod` / `os.mkfifo` raise no audit
event and are removed from `os` (a reload of `posix` could bring them back). Run as a
non-root user, or in a container, for a real boundary.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

from data_pipelines.errors import DataConfigError

MAIN_FILE = "main.py"


@dataclass(frozen=True)
class SandboxLimits:
    """Per-run limits: wall-clock and CPU seconds, address space (MB), bytes of stdout and of
    stderr kept (head and tail), size of any file written (MB), open file descriptors."""

    time_s: float = 5.0
    cpu_s: int = 4
    memory_mb: int = 512
    output_bytes: int = 64 * 1024
    file_mb: int = 16
    open_files: int = 64

    def __post_init__(self):
        for name in ("time_s", "cpu_s", "memory_mb", "output_bytes", "file_mb", "open_files"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise DataConfigError(f"sandbox.{name}: must be a positive number, got {value!r}")


@dataclass(frozen=True)
class SandboxResult:
    """`ok` iff the program exited 0 within the limits. `reason` is "ok" or says what stopped it
    (timeout, signal, blocked operation, MemoryError, exit code and the last stderr line).
    stdout and stderr keep their first and last `output_bytes / 2` bytes each."""

    ok: bool
    returncode: int | None
    timed_out: bool
    stdout: str
    stderr: str
    reason: str
    wall_s: float


# Runs in the child before the program: limits, then the audit hook, then the program. Everything
# the hook uses is bound in `_install`'s closure, so later monkey-patching of `os` or `builtins`
# by the program cannot change it; nothing but the interpreter's hook list refers to the hook, and
# gc (which could find it) is refused. `sys._getframe` stays allowed: `typing` needs it.
_BOOTSTRAP = r'''
import builtins, json, os, posix, resource, signal, sys
_cfg = json.loads(sys.argv[1])

def _limit(res, soft):
    try:
        resource.setrlimit(res, (soft, soft))
    except (ValueError, OSError):  # above an existing hard limit: keep that one
        pass

_limit(resource.RLIMIT_CORE, 0)
_limit(resource.RLIMIT_AS, _cfg["memory_bytes"])
_limit(resource.RLIMIT_FSIZE, _cfg["file_bytes"])
_limit(resource.RLIMIT_NOFILE, _cfg["open_files"])
_limit(resource.RLIMIT_NPROC, 0)
try:
    resource.setrlimit(resource.RLIMIT_CPU, (_cfg["cpu_s"], _cfg["cpu_s"] + 1))
except (ValueError, OSError):
    pass
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an oversized write fails with EFBIG instead
for _mod in (os, posix):
    for _name in ("mknod", "mkfifo"):
        if hasattr(_mod, _name):
            delattr(_mod, _name)


def _install(root, blocked_prefixes, blocked_imports, fs_events, write_flags, no_read):
    _isinstance, _type, _str, _bytes, _int = isinstance, type, str, bytes, int
    _getcwd, _perm = posix.getcwd, PermissionError
    import pathlib
    _paths = (pathlib.PosixPath, pathlib.PurePosixPath)

    def _text(p):
        """The path as str, or None when it cannot be trusted (an arbitrary PathLike may answer
        differently on its second __fspath__ call)."""
        if _type(p) is _str:
            return p
        if _type(p) is _bytes:
            return p.decode("utf-8", "surrogateescape")
        if _type(p) in _paths:
            return p.__fspath__()
        return None

    def _absolute(p, relative_ok):
        """Lexically normalised absolute path; no symlink can exist inside the folder (symlink
        and link are refused), so lexical is real there. None if it cannot be decided."""
        p = _text(p)
        if p is None or "\x00" in p:
            return None
        if not p.startswith("/"):
            if not relative_ok:  # relative to an unknown dir_fd
                return None
            p = _getcwd() + "/" + p
        parts = []
        for part in p.split("/"):
            if part == "..":
                if parts:
                    parts.pop()
            elif part and part != ".":
                parts.append(part)
        return "/" + "/".join(parts)

    def _inside(p, relative_ok=True):
        a = _absolute(p, relative_ok)
        return a is not None and (a == root or a.startswith(root + "/"))

    def _refuse(event, detail=""):
        raise _perm(f"sandbox blocked {event}{detail}")

    def hook(event, args):
        if event.startswith(blocked_prefixes):
            _refuse(event)
        if event == "import":
            if args[0] in blocked_imports:
                _refuse(event, f" of {args[0]}")
        elif event == "open":
            path, mode, flags = args
            if _isinstance(path, _int):
                return
            if flags & write_flags:
                # os.open (mode None) may carry a dir_fd the event does not show: absolute only.
                if not _inside(path, relative_ok=mode is not None) and path != "/dev/null":
                    _refuse("write", f" to {path!r} (outside the sandbox folder)")
            else:
                a = _absolute(path, relative_ok=mode is not None)
                if a is None and mode is None or (
                        a is not None and a.startswith(no_read)
                        and a not in ("/dev/null", "/dev/urandom")):
                    _refuse("read", f" of {path!r}")
        elif event in fs_events:
            paths, dir_fds = fs_events[event]
            # The event shows "no dir_fd" as None or -1.
            relative_ok = all(i >= len(args) or args[i] is None or args[i] == -1
                              for i in dir_fds)
            for i in paths:
                if i < len(args) and (_isinstance(args[i], _int)
                                      or not _inside(args[i], relative_ok)):
                    _refuse(event, f" on {args[i]!r} (outside the sandbox folder)")

    sys.addaudithook(hook)


_install(
    _cfg["root"],
    ("socket.", "subprocess.", "os.exec", "os.spawn", "os.posix_spawn", "os.fork", "os.forkpty",
     "os.system", "os.kill", "os.killpg", "os.startfile", "os.link", "os.symlink", "pty.",
     "signal.pthread_kill", "ctypes.", "resource.", "gc.", "sys._current_frames",
     "sys.settrace", "sys.setprofile", "object.__getattr__",
     "code.__new__", "sqlite3.", "urllib.", "http.", "ftplib.", "smtplib.", "poplib.",
     "imaplib.", "nntplib.", "telnetlib.", "webbrowser."),
    frozenset({"_socket", "_ssl", "_ctypes", "_posixsubprocess", "_multiprocessing",
               "_posixshmem", "_gdbm", "_dbm", "_sqlite3", "_tkinter", "_xxsubinterpreters",
               "_testcapi", "_testinternalcapi", "_lsprof", "faulthandler"}),
    {  # event: (indices of path arguments, indices of dir_fd arguments)
        "os.mkdir": ((0,), (2,)), "os.remove": ((0,), (1,)), "os.rmdir": ((0,), (1,)),
        "os.rename": ((0, 1), (2, 3)), "os.chmod": ((0,), (2,)), "os.chown": ((0,), (3,)),
        "os.utime": ((0,), (3,)), "os.truncate": ((0,), ()), "os.chflags": ((0,), ()),
        "os.lchflags": ((0,), ()), "os.setxattr": ((0,), ()), "os.removexattr": ((0,), ()),
        "os.chdir": ((0,), ()), "shutil.rmtree": ((0,), (1,)),
    },
    os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC,
    ("/proc", "/sys", "/dev"),
)
del _install, _limit, _cfg, _mod, _name
sys.path.insert(0, os.getcwd())
sys.argv = [os.path.abspath(__MAIN__)]
with open(__MAIN__, encoding="utf-8") as _f:
    _code = compile(_f.read(), __MAIN__, "exec")
del _f
exec(_code, {"__name__": "__main__", "__file__": sys.argv[0], "__builtins__": builtins})
'''.replace("__MAIN__", repr(MAIN_FILE))

_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
_unshare_cmd: list[str] | None = None
_unshare_lock = threading.Lock()


def network_isolation() -> list[str]:
    """``[unshare, -rn]`` when a user + network namespace can be made here, else []. Probed once."""
    global _unshare_cmd
    with _unshare_lock:
        if _unshare_cmd is None:
            exe = shutil.which("unshare")
            _unshare_cmd = []
            if exe:
                try:
                    probe = subprocess.run([exe, "-rn", "true"], capture_output=True, timeout=5,
                                           check=False)
                    if probe.returncode == 0:
                        _unshare_cmd = [exe, "-rn"]
                except (OSError, subprocess.SubprocessError):
                    pass
        return list(_unshare_cmd)


def _reader(stream, cap: int, out: list) -> None:
    """Keep the first and the last cap/2 bytes (the end of a traceback says what went wrong),
    drain and count the middle so the child never blocks on a full pipe."""
    head_cap, tail_cap = cap - cap // 2, cap // 2
    head, tail, total = bytearray(), bytearray(), 0
    while chunk := stream.read1(65536):
        total += len(chunk)
        take = max(0, head_cap - len(head))
        head += chunk[:take]
        if tail_cap:
            tail = (tail + chunk[take:])[-tail_cap:]
    stream.close()
    out[:] = [bytes(head), bytes(tail), total - len(head) - len(tail)]


def _decode(parts: list) -> str:
    head, tail, dropped = parts or [b"", b"", 0]
    if dropped:
        head += f"\n[... {dropped} bytes truncated ...]\n".encode()
    return (head + tail).decode("utf-8", "replace")


def _last_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("[... ")]
    return lines[-1].strip()[:300] if lines else ""


def _reason(returncode: int | None, timed_out: bool, stderr: str, limits: SandboxLimits) -> str:
    if timed_out:
        return f"timed out after {limits.time_s:g}s wall clock; process group killed"
    if returncode == 0:
        return "ok"
    last = _last_line(stderr)
    if "sandbox blocked" in stderr:
        blocked = [ln for ln in stderr.splitlines() if "sandbox blocked" in ln]
        return f"blocked operation: {blocked[-1].strip()[:300]}"
    if returncode is not None and returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else "?"
        why = {"SIGXCPU": " (CPU limit)", "SIGKILL": " (CPU or memory limit)",
               "SIGSEGV": " (crash, possibly the memory limit)"}.get(name, "")
        return f"killed by {name}{why}"
    if "MemoryError" in last:
        return f"memory limit exceeded ({limits.memory_mb} MB): {last}"
    return f"exit code {returncode}: {last}" if last else f"exit code {returncode}"


def run_python(program: str, limits: SandboxLimits | None = None,
               files: Mapping[str, str] | None = None, stdin: str = "") -> SandboxResult:
    """Run `program` as ``main.py`` in a fresh folder that also holds `files` (name -> text).

    Never raises for anything the program does; raises DataConfigError for a bad file name.
    """
    limits = limits or SandboxLimits()
    files = dict(files or {})
    for name in files:
        if (not isinstance(name, str) or not name or "/" in name or name.startswith(".")
                or name == MAIN_FILE):
            raise DataConfigError(f"sandbox files: {name!r} must be a plain file name other "
                                  f"than {MAIN_FILE!r}")
    folder = tempfile.mkdtemp(prefix="sandbox-")
    start = time.monotonic()
    try:
        root = os.path.realpath(folder)
        files[MAIN_FILE] = program
        for name, text in files.items():
            with open(os.path.join(root, name), "w", encoding="utf-8", errors="replace") as f:
                f.write(text)
        config = {"root": root, "cpu_s": max(1, int(limits.cpu_s)),
                  "memory_bytes": int(limits.memory_mb) * 2**20,
                  "file_bytes": int(limits.file_mb) * 2**20,
                  "open_files": int(limits.open_files)}
        cmd = network_isolation() + [sys.executable, "-I", "-B", "-c", _BOOTSTRAP,
                                     json.dumps(config)]
        env = {**_ENV, "HOME": root, "TMPDIR": root}  # tempfile then works inside the folder
        proc = subprocess.Popen(cmd, cwd=root, env=env, start_new_session=True,
                                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, close_fds=True)
        outs: list[list] = [[], []]
        readers = [threading.Thread(target=_reader, daemon=True,
                                    args=(stream, int(limits.output_bytes), outs[i]))
                   for i, stream in enumerate((proc.stdout, proc.stderr))]
        for r in readers:
            r.start()
        if stdin:
            try:
                proc.stdin.write(stdin.encode())
                proc.stdin.close()
            except OSError:  # the program exited (or closed stdin) first
                pass
        timed_out = False
        try:
            proc.wait(timeout=limits.time_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            if proc.returncode is None:  # timed out, or interrupted: kill the whole group
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
        for r in readers:
            r.join(timeout=2.0)
        stdout, stderr = _decode(outs[0]), _decode(outs[1])
        rc = proc.returncode
        reason = _reason(rc, timed_out, stderr, limits)
        return SandboxResult(rc == 0 and not timed_out, rc, timed_out, stdout, stderr, reason,
                             time.monotonic() - start)
    finally:
        _remove_tree(folder)


def _remove_tree(folder: str) -> None:
    """rmtree that also removes what the program made unreadable (chmod 000 on a subfolder)."""
    def retry(func, path, _exc):
        try:
            os.chmod(os.path.dirname(path), 0o700)
            os.chmod(path, 0o700)
            func(path)
        except OSError:
            pass
    shutil.rmtree(folder, onerror=retry)
