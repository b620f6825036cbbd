import os
import time

import pytest

from data_pipelines.code_sandbox import SandboxLimits, run_python
from data_pipelines.errors import DataConfigError

FAST = SandboxLimits(time_s=1.5, cpu_s=5, memory_mb=256, output_bytes=1000)
# for programs that end at once (blocked, done or out of memory): a wall clock a loaded 2-core CI box
# cannot hit while the sandboxed Python starts (1.5 s was hit under the parallel suite)
ROOMY = SandboxLimits(time_s=20, cpu_s=5, memory_mb=256, output_bytes=1000)


def test_runs_and_captures_output():
    result = run_python("import sys\nprint('hello')\nprint('oops', file=sys.stderr)")
    assert result.ok and result.returncode == 0 and not result.timed_out
    assert result.stdout == "hello\n" and result.stderr == "oops\n"
    assert result.reason == "ok"


def test_nonzero_exit_is_reported():
    result = run_python("raise ValueError('bad input')")
    assert not result.ok and result.returncode == 1
    assert "ValueError: bad input" in result.reason


def test_infinite_loop_is_killed_within_the_time_limit():
    start = time.monotonic()
    result = run_python("while True:\n    pass", FAST)
    assert time.monotonic() - start < FAST.time_s + 2.0
    assert result.timed_out and not result.ok
    assert result.returncode == -9 and "timed out" in result.reason


def test_cpu_limit_kills_even_before_the_wall_clock():
    limits = SandboxLimits(time_s=10, cpu_s=1)
    start = time.monotonic()
    result = run_python("while True:\n    pass", limits)
    assert time.monotonic() - start < 5
    assert not result.ok and not result.timed_out and "SIGXCPU" in result.reason


@pytest.mark.parametrize("program", [
    "import socket\ns = socket.socket()\ns.connect(('127.0.0.1', 80))",
    "import _socket",
    "import urllib.request\nurllib.request.urlopen('http://example.com')",
])
def test_network_is_blocked(program):
    result = run_python(program, ROOMY)
    assert not result.ok and "blocked" in result.reason


def test_write_outside_the_folder_is_blocked(tmp_path):
    target = tmp_path / "pwned.txt"
    for program in [f"open({str(target)!r}, 'w').write('x')",
                    f"import os\nos.open({str(target)!r}, os.O_WRONLY | os.O_CREAT)",
                    f"import pathlib\npathlib.Path({str(target)!r}).write_text('x')",
                    f"import os\nos.chdir({str(tmp_path)!r})\nopen('pwned.txt', 'w')",
                    "open('../escaped.txt', 'w')",
                    (f"import os\nfd = os.open({str(tmp_path)!r}, os.O_RDONLY)\n"
                     f"os.open('pwned.txt', os.O_WRONLY | os.O_CREAT, dir_fd=fd)")]:
        result = run_python(program, ROOMY)
        assert not result.ok and "blocked" in result.reason, (program, result)
    assert not target.exists()


def test_file_system_changes_outside_are_blocked(tmp_path):
    keep = tmp_path / "keep.txt"
    keep.write_text("data")
    for program in [f"import os\nos.remove({str(keep)!r})",
                    f"import os\nos.rename({str(keep)!r}, 'stolen.txt')",
                    f"import os\nos.chmod({str(keep)!r}, 0o777)",
                    f"import os\nos.symlink({str(keep)!r}, 'link')",
                    f"import shutil\nshutil.rmtree({str(tmp_path)!r})"]:
        result = run_python(program, ROOMY)
        assert not result.ok and "blocked" in result.reason, (program, result)
    assert keep.read_text() == "data"


def test_writing_inside_its_folder_works():
    program = ("import os, pathlib\nos.mkdir('sub')\nopen('sub/a.txt', 'w').write('inside')\n"
               "pathlib.Path('b.txt').write_text('too')\nos.rename('b.txt', 'c.txt')\n"
               "print(open('sub/a.txt').read(), open('c.txt').read(), sorted(os.listdir('.')))")
    result = run_python(program, ROOMY)
    assert result.ok, result
    assert result.stdout.strip() == "inside too ['c.txt', 'main.py', 'sub']"
    result = run_python("import tempfile\nprint(tempfile.mkdtemp())\nopen('/dev/null', 'w')", ROOMY)
    assert result.ok and "/sandbox-" in result.stdout, result


@pytest.mark.parametrize("program", [
    "import os\nwhile True:\n    os.fork()",
    "import subprocess\nsubprocess.run(['echo', 'hi'])",
    "import os\nos.system('echo hi')",
    "import os\nos.execv('/bin/echo', ['echo', 'hi'])",
    "import os\nos.posix_spawn('/bin/echo', ['echo'], {})",
    "import multiprocessing\nmultiprocessing.Process(target=print).start()",
    "import os, signal\nos.kill(os.getppid(), signal.SIGTERM)",
])
def test_process_creation_and_signals_are_blocked(program):
    result = run_python(program, ROOMY)
    assert not result.ok and "blocked" in result.reason, result
    assert "hi" not in result.stdout


@pytest.mark.parametrize("program", [
    "import ctypes",
    "import resource\nresource.setrlimit(resource.RLIMIT_CPU, (100, 100))",
    "import gc\ngc.get_objects()",
    "open('/proc/self/mem', 'rb')",
    "try:\n    1 / 0\nexcept ZeroDivisionError as e:\n    e.__traceback__.tb_frame",
])
def test_escape_hatches_are_blocked(program):
    result = run_python(program, ROOMY)
    assert not result.ok and "blocked" in result.reason, result


@pytest.mark.parametrize("program", [
    "x = bytearray(2 * 1024 ** 3)",
    "chunks = []\nwhile True:\n    chunks.append(' ' * 10 ** 7)",
])
def test_memory_hog_is_stopped(program):
    result = run_python(program, ROOMY)
    assert not result.ok and not result.timed_out
    assert "memory" in result.reason.lower(), result.reason


def test_output_is_truncated_at_the_cap():
    result = run_python("import sys\nprint('x' * 100000)\nsys.stderr.write('e' * 5000)", ROOMY)
    assert result.ok
    # The first and the last 500 bytes survive, with a note of what was cut in between.
    assert result.stdout.startswith("x" * 500) and result.stdout.endswith("x" * 499 + "\n")
    assert result.stdout.count("x") == 999 and "[... 99001 bytes truncated ...]" in result.stdout
    assert result.stderr == "e" * 500 + "\n[... 4000 bytes truncated ...]\n" + "e" * 500


def test_environment_is_minimal_and_the_folder_is_removed(monkeypatch):
    monkeypatch.setenv("SECRET_TOKEN", "hunter2")
    result = run_python("import os, sys\nprint(os.getcwd())\nprint(sorted(os.environ))\n"
                        "print(sys.flags.isolated)", ROOMY)
    assert result.ok, result
    cwd, env, isolated = result.stdout.splitlines()
    assert "SECRET_TOKEN" not in env and "PYTHONPATH" not in env and isolated == "1"
    assert os.path.basename(cwd).startswith("sandbox-") and not os.path.exists(cwd)


def test_bad_file_name_and_limits_raise_config_errors():
    with pytest.raises(DataConfigError, match="plain file name"):
        run_python("pass", files={"../x.py": ""})
    with pytest.raises(DataConfigError, match="sandbox.time_s"):
        SandboxLimits(time_s=0)
