"""Preemption (SIGUSR2) and the checkpoint folder layout of a pretraining run."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

#: Exit code of a rank that saved a checkpoint after SIGUSR2 and wants the job requeued (EX_TEMPFAIL).
PREEMPTED_EXIT = 75
#: How long a non-zero rank waits for submitit's requeue to kill it after a preemption checkpoint (s).
_REQUEUE_GRACE_S = 600


class PreemptFlag:
    """SIGUSR2 (Slurm ``--signal=USR2@T``, submitit's timeout/preemption signal) → finish the step,
    checkpoint on every rank, then hand over to the previous handler (submitit requeues) or exit
    with :data:`PREEMPTED_EXIT` so ``jobs/pretrain.sh`` requeues."""

    def __init__(self) -> None:
        self.raised = False
        self.previous: Any = None

    def install(self) -> None:
        if hasattr(signal, "SIGUSR2"):
            self.previous = signal.signal(signal.SIGUSR2, self._handler)

    def _handler(self, signum: int, frame: Any) -> None:
        self.raised = True

    def hand_over(self) -> None:
        """Call the handler we displaced. submitit's requeues the job and exits on global rank 0
        and returns on the others, which must then NOT exit first: a task ending could end the
        step before rank 0's ``scontrol requeue`` (submitit's own rule). They wait to be killed."""
        if callable(self.previous):
            self.previous(signal.SIGUSR2, None)
            time.sleep(_REQUEUE_GRACE_S)



def checkpoint_root(out: str | os.PathLike) -> Path:
    return Path(out) / "checkpoints"


def latest_tag(out: str | os.PathLike) -> str | None:
    """The last complete checkpoint tag of a run folder, or None."""
    f = checkpoint_root(out) / "latest"
    return f.read_text().strip() if f.exists() else None

