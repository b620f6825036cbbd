"""Every `python -m launch` command in the README validates and plans its jobs (`--dry-run`): a user who
copies one gets a run, not a config error (issue 21: the cluster example was refused)."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_commands() -> list[str]:
    """The README's ``python -m launch ...`` lines in code blocks (backslash continuations joined,
    comments dropped); commands with a ``...`` placeholder are left out."""
    commands, block, current = [], False, ""
    for line in README.read_text().splitlines():
        if line.startswith("```"):
            block = not block
            continue
        if not block or not (current or re.match(r"\s*(\.venv/bin/)?python -m launch(\s|$)", line)):
            continue
        current = f"{current} {line.strip()}"
        if current.endswith("\\"):
            current = current[:-1]
            continue
        command = current.split("#")[0].strip()
        current = ""
        if "..." not in command:
            commands.append(command)
    return commands


def test_readme_has_the_examples():
    commands = readme_commands()
    assert any("cluster=slurm" in c and "model=hunyuan_turbos" in c for c in commands)
    assert any("parallel=cp2" in c for c in commands)


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_validates(command, tmp_path):
    args = [a for a in shlex.split(command)[3:] if not a.startswith("run_dir=")]
    proc = subprocess.run([sys.executable, "-m", "launch", *args, f"run_dir={tmp_path / 'run'}", "--dry-run"],
                          capture_output=True, text=True, timeout=300, cwd=README.parent)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "config error" not in proc.stdout + proc.stderr
