"""Single-process local stages forked from a process that has imported torch and megatron-core once.

A stage runs in a process of its own: megatron-core's global parallel state, the memory a stage
leaves behind and a crash stay in it. A fresh ``python -m launch.stage_worker`` spends 5-6 s
importing torch, megatron-core and our stage modules before its first step, which on the 2-core dev
box was about a tenth of the CPU demo (ten stages). Here multiprocessing's fork server imports them
once (:data:`PRELOAD`), and each stage is a child forked from it that runs
:func:`launch.stage_worker.main`: still a process per stage, started in milliseconds.

The server starts with the stages' environment (``launch.pipeline_jobs.worker_env``: thread counts and
library settings are read when torch loads: the environment without a stage's rendezvous variables)
and serves the runner's stages for its lifetime; a stage whose base environment differs from the
server's gets a fresh ``python`` instead. ``cluster.fork_stages: false`` turns forking off. torchrun stages (several ranks)
and Slurm / nemo-run jobs start as before.
"""

from __future__ import annotations

import io
import multiprocessing
import multiprocessing.forkserver
import os
import sys
from pathlib import Path

from launch.stages import STAGE_KINDS

# what the stages import (every stage kind's module); a module that fails to import is skipped by the
# server (the stage then imports it itself and reports the error where it belongs)
PRELOAD = ["torch", "megatron.core", "megatron.core.models.gpt", "launch.stage_worker",
           "megatron_ext.stage_training", "megatron_ext.model_builder", "megatron_ext.generation",
           *sorted(set(STAGE_KINDS.values()))]
# set in a forked stage's environment; the manifest's attempt records it (launch.stage_worker)
FORKED_ENV = "TURBOLASER_FORKED_STAGE"

_server_env: dict[str, str] | None = None


def _context():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def start_server(env: dict[str, str]) -> bool:
    """Start the fork server with ``env`` (it imports :data:`PRELOAD` in the background); False where
    fork servers do not exist or one already runs with another environment."""
    global _server_env
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return False
    if _server_env is not None:
        return _server_env == env
    _context()
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)   # the server is a fresh python: it takes the environment it starts with
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    _server_env = dict(env)
    return True


def _run_stage(stage_dir: str, env: dict[str, str], out) -> None:
    """The forked child: the stage's environment and output pipe, then the worker's main."""
    os.environ.clear()
    os.environ.update(env, **{FORKED_ENV: "1"})
    for fd in (1, 2):
        os.dup2(out.fileno(), fd)
    out.close()
    # unbuffered text on the pipe, as PYTHONUNBUFFERED gives a fresh worker (progress bars use \r)
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), write_through=True)
    import torch   # preloaded: free here

    from launch import stage_worker

    if env.get("OMP_NUM_THREADS", "").isdigit():   # as a fresh python reads it, should the server not have
        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    sys.exit(stage_worker.main(stage_dir))


class ForkedStage:
    """A stage forked from the server, with the part of ``subprocess.Popen``'s interface the launcher
    uses: ``pid``, ``stdout`` (its output and errors), ``wait``, ``send_signal``, ``terminate``."""

    def __init__(self, stage_dir: Path, env: dict[str, str]):
        ctx = _context()
        # a one-way OS pipe; multiprocessing hands the writing end to the child through the server
        reader, writer = ctx.Pipe(duplex=False)
        self._process = ctx.Process(target=_run_stage, args=(str(stage_dir), env, writer),
                                    name=f"stage {Path(stage_dir).name}")
        try:
            self._process.start()
        finally:
            writer.close()   # the child has its own copy: EOF once it (and what it started) exits
        self.pid = self._process.pid
        self.stdout = open(os.dup(reader.fileno()), "rb", buffering=0)
        reader.close()
        self.returncode: int | None = None

    def wait(self) -> int:
        self._process.join()
        self.returncode = self._process.exitcode
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self._process.exitcode is None:
            os.kill(self.pid, signum)

    def terminate(self) -> None:
        self._process.terminate()


def start(stage_dir: Path, env: dict[str, str], server_env: dict[str, str]) -> ForkedStage | None:
    """Fork the stage, with its environment ``env``, from the server (started with ``server_env``, the
    same without the stage's rendezvous variables, the first time); None when it cannot (the caller
    starts a fresh process)."""
    if not start_server(server_env):
        return None
    return ForkedStage(stage_dir, env)
