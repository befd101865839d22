"""DeepSpeed engine setup of the student, its optimizer groups and schedule, and the teacher EMA."""
from __future__ import annotations

import logging
import socket
import warnings
from dataclasses import replace
from typing import Any

import torch

from .config import PretrainConfig
from .model import IBOTVMF
from .schedule import Schedule


# ------------------------------------------------------------------------------------------- run
def _deepspeed_noise(record: logging.LogRecord) -> bool:
    """False for the DeepSpeed log line that says nothing to an icehpc user: "Setting accelerator to
    CPU" (logged at import when torch sees no GPU; icehpc chose the CPU itself, engine.device)."""
    return not record.getMessage().startswith("Setting accelerator to CPU")


def import_deepspeed() -> Any:
    """``import deepspeed`` without the notes every run would print and no user can act on: its
    CPU-accelerator line, and the FutureWarning (one per rank) of the torch collective it calls,
    renamed in torch 2.x. Everything else DeepSpeed or torch warns about still shows."""
    logging.getLogger("DeepSpeed").addFilter(_deepspeed_noise)  # its logger: the same object after import
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                            category=FutureWarning)
    import deepspeed

    return deepspeed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_distributed(backend: str):
    """Rank facts from the launcher → torch env variables → DeepSpeed/torch.distributed (no MPI_Init)."""
    from .. import dist

    deepspeed = import_deepspeed()
    env = dist.from_env()
    if env.world_size == 1 and env.launcher == "none":
        env = replace(env, master_port=_free_port())  # lone process: never collide with another run
    dist.export_torch_env(env)
    if backend == "gloo":
        # On CPU DeepSpeed JIT-compiles a shared-memory all-reduce op at init (~60 s, under a file
        # lock; under srun it even rebuilds, so ranks queued behind the lock). Training never uses
        # it (gloo does the collectives): mark it unavailable in DeepSpeed's op table.
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    return env


def ds_config(cfg: PretrainConfig, bf16: bool) -> dict[str, Any]:
    """The DeepSpeed config of the student engine (lr/wd are overwritten every step)."""
    out: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {
            "lr": cfg.optim.lr, "betas": list(cfg.optim.betas), "eps": 1e-8,
            "weight_decay": cfg.optim.weight_decay, "torch_adam": cfg.optim.torch_adam}},
        "gradient_clipping": cfg.optim.clip_grad,
        "zero_optimization": {"stage": cfg.engine.zero_stage},
        "steps_per_print": 10**12,
        # no timer may synchronise the device: wall_clock_breakdown off, and the throughput timer
        # (on by default; it calls synchronize() at every forward and step from step 2 on) off
        "wall_clock_breakdown": False,
        "timers": {"throughput": {"enabled": False, "synchronized": False}},
    }
    if bf16:
        out["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    return out


def param_groups(model: IBOTVMF) -> list[dict[str, Any]]:
    """AdamW groups: decayed weights, undecayed biases/norms/tokens (DINO's rule: bias or 1-D), and
    the prototypes on their own so they can be frozen (lr 0) during the first epoch: directions
    (decayed, as in the reference) and weight-norm magnitudes g = κτ (never decayed)."""
    from .model import PROTOTYPE_NORMS

    protos = set(model.prototype_names())
    decay, no_decay, last, norms = [], [], [], []
    for name, p in model.named_parameters():
        if name in protos:
            (norms if name.endswith(PROTOTYPE_NORMS) else last).append(p)
        elif name.endswith(".bias") or p.ndim <= 1:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "name": "decay"}, {"params": no_decay, "name": "no_decay", "weight_decay": 0.0},
            {"params": last, "name": "prototypes"},
            {"params": norms, "name": "prototype_norms", "weight_decay": 0.0}]


def apply_schedule(optimizer: Any, sched: Schedule) -> None:
    for group in optimizer.param_groups:
        name = group.get("name")
        frozen = name in ("prototypes", "prototype_norms") and sched.last_layer_frozen
        group["lr"] = 0.0 if frozen else sched.lr
        if name not in ("no_decay", "prototype_norms"):
            group["weight_decay"] = sched.weight_decay


@torch.no_grad()
def ema_update(teacher: torch.nn.Module, student: torch.nn.Module, momentum: float) -> None:
    """teacher ← m·teacher + (1−m)·student over all parameters, in two foreach kernels."""
    t = list(teacher.parameters())
    s = [p.detach() for p in student.parameters()]
    torch._foreach_mul_(t, momentum)
    torch._foreach_add_(t, s, alpha=1.0 - momentum)

