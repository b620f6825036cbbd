"""Preemption and divergence handling for the training loop.

Preemption. SLURM sends SIGTERM before it kills a preempted or timed-out job, and ``sbatch --signal``
can send SIGUSR1 ahead of the time limit. :class:`PreemptionGuard` records either signal; the trainer
asks :meth:`PreemptionGuard.requested` once per step (an all-reduce, so every rank stops after the
same step), saves, and raises :class:`Preempted`. The stage worker exits with
:data:`PREEMPTED_EXIT_CODE`, which launchers treat as "requeue and resume".

Divergence. A NaN/Inf loss or gradient skips the optimizer update (weights, optimizer state and LR
schedule stay as they were; the step's data is consumed; the gradient check is the optimizer's own
gradient norm, :func:`megatron_ext.optim.step_if_finite`) and is logged; ``max_skipped_steps``
consecutive skips raise :class:`TrainingDiverged`, leaving the last good checkpoint as ``latest``.

Only constants and the guard import at module level: the launcher imports this without torch.
"""

from __future__ import annotations

import signal

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "temporary failure, try again"
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """Raised after the preemption checkpoint is saved."""

    def __init__(self, step: int, signal_name: str):
        super().__init__(f"preempted by {signal_name} after step {step}; checkpoint saved")
        self.step, self.signal_name = step, signal_name


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


class PreemptionGuard:
    """Notes SIGTERM / SIGUSR1 instead of dying, so the current step can finish and be saved."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self) -> "PreemptionGuard":
        for sig in PREEMPTION_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def requested(self) -> str | None:
        """The signal's name if any rank received one (collective: call on every rank)."""
        import torch
        import torch.distributed as dist

        flag = torch.tensor([self.received or 0], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return signal.Signals(int(flag)).name if int(flag) else None
