"""``icehpc pretrain``: iBOT-vMF self-supervised pretraining on DeepSpeed, 1 CPU process to N nodes.

One code path for every launcher: ranks and rendezvous come from :func:`icehpc.dist.from_env`
(torchrun, ``srun``, Open MPI) and are exported as the five variables DeepSpeed reads, so DeepSpeed
never calls ``MPI_Init``. DeepSpeed wraps the student only (ZeRO 1/2, bf16 autocast on GPU, fp32 on
CPU with torch's AdamW); the teacher is a plain module updated by EMA with foreach ops.

Resume is exact: randomness is counter-based (augmentation and drop-path RNGs are re-seeded from
(seed, rank, step) every step), the data position is (epoch, batch) = divmod(step, steps per epoch)
with a loader that is deterministic per epoch, and the checkpoint holds the student and optimizer
(DeepSpeed) plus the teacher, the EMA centres and the step (client state). A run stopped after step
k and restarted with the same command therefore logs the same losses as an uninterrupted run.

Output folder (``out``): ``config.yaml`` (resolved), ``metrics.jsonl`` (one line per step),
``checkpoints/step-XXXXXXXX/`` (DeepSpeed tags) with ``checkpoints/latest`` (written atomically
after every rank saved), and ``backbone.safetensors`` (teacher backbone, timm keys) at the end.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import yaml

from . import config as cfglib
from .augment import AugmentConfig, Crops, MultiCrop
from .config import field
from .model import IBOTVMF, HeadOut, InitConfig, ModelConfig, build_model, load_backbone_weights
from .fileio import write_atomic

log = logging.getLogger("icehpc.pretrain")

#: Exit code of a rank that saved a checkpoint after SIGUSR2 and wants the job requeued (EX_TEMPFAIL).
PREEMPTED_EXIT = 75
#: Exit code of a run stopped by a NaN/inf loss or non-finite weights.
NONFINITE_EXIT = 3
#: Scalars leading the per-step all-reduce: loss_cls, loss_patch, #patch rows, preempt, H(P_t) cls.
_N_SCALARS = 5
#: How long a non-zero rank waits for submitit's requeue to kill it after a preemption checkpoint (s).
_REQUEUE_GRACE_S = 600


# ----------------------------------------------------------------------------------------- config
@dataclass
class DataConfig:
    shards: str = field("shards/train", help="shard folder written by `icehpc shards build` (index.json inside)")
    canvas: int = field(256, help="decoded square canvas side (pixels); crops are taken from it")
    batch_size: int = field(64, help="images per rank per step (global batch = this × ranks)")
    num_workers: int = field(4, help="decoding DataLoader workers per rank")
    batches_per_epoch: int | None = field(None, help="steps per epoch (default: shard total // global batch)")


@dataclass
class LossConfig:
    lambda_cls: float = field(1.0, help="weight of the DINO [CLS] loss")
    lambda_patch: float = field(1.0, help="weight of the iBOT masked-patch loss")
    student_temp: float = field(0.1, help="student temperature τ_s")
    teacher_temp: float = field(0.04, help="teacher temperature at the start of warm-up")
    teacher_temp_final: float = field(0.07, help="teacher temperature after warm-up")
    teacher_temp_warmup_epochs: float = field(30.0, help="epochs of linear teacher temperature warm-up")
    center_momentum: float = field(0.9, help="EMA momentum of the [CLS] and patch centres")
    vmf: bool = field(True, help="add log C_p(‖w_k‖/τ) to the logits (iBOT-vMF); false = plain iBOT")
    backend: str = field("auto", help="vmf_xent backend: auto | torch | triton")
    usage_threshold: float = field(0.1, help="a prototype is 'used' when its mean teacher probability ≥ this / K")

    def validate(self) -> None:
        if min(self.student_temp, self.teacher_temp, self.teacher_temp_final) <= 0:
            raise ValueError("temperatures must be > 0")
        if not 0 <= self.center_momentum < 1:
            raise ValueError("center_momentum must be in [0, 1)")
        if self.backend not in ("auto", "torch", "triton"):
            raise ValueError(f"backend must be auto, torch or triton, got {self.backend!r}")


@dataclass
class OptimConfig:
    lr: float = field(5e-4, help="peak learning rate per 256 images (scaled by global batch / 256)")
    min_lr: float = field(1e-6, help="learning rate at the end of the cosine")
    warmup_epochs: float = field(10.0, help="epochs of linear learning-rate warm-up from 0")
    weight_decay: float = field(0.04, help="weight decay at the start (cosine schedule)")
    weight_decay_end: float = field(0.4, help="weight decay at the end")
    clip_grad: float = field(3.0, help="global gradient-norm clipping (DeepSpeed gradient_clipping); 0 = off")
    freeze_last_layer_epochs: float = field(1.0, help="epochs during which the prototypes get lr 0")
    momentum_teacher: float = field(0.996, help="teacher EMA momentum at the start (cosine to momentum_teacher_end)")
    momentum_teacher_end: float = field(1.0, help="teacher EMA momentum at the end")
    betas: list[float] = field([0.9, 0.999], help="AdamW betas")
    torch_adam: bool = field(True, help="torch.optim.AdamW (no JIT build); false = DeepSpeed FusedAdam on GPU")

    def validate(self) -> None:
        if self.lr <= 0 or self.min_lr < 0:
            raise ValueError("lr must be > 0 and min_lr >= 0")
        if not 0 <= self.momentum_teacher <= self.momentum_teacher_end <= 1:
            raise ValueError("need 0 <= momentum_teacher <= momentum_teacher_end <= 1")
        if len(self.betas) != 2:
            raise ValueError("betas takes two values")


@dataclass
class EngineConfig:
    device: str = field("auto", help="auto (cuda when available) | cpu | cuda")
    precision: str = field("auto", help="auto (bf16 on cuda, fp32 on cpu) | bf16 | fp32; bf16 = autocast, fp32 master weights")
    zero_stage: int = field(1, help="DeepSpeed ZeRO stage (0, 1 or 2)")
    threads: int | None = field(None, help="torch CPU threads per rank (default: OMP_NUM_THREADS / torch default)")

    def validate(self) -> None:
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be auto, bf16 or fp32, got {self.precision!r}")
        if self.zero_stage not in (0, 1, 2):
            raise ValueError(f"zero_stage must be 0, 1 or 2, got {self.zero_stage}")


@dataclass
class TrainConfig:
    epochs: float = field(100.0, help="length of the run; every schedule is laid out over it")
    seed: int = field(0, help="seed of initialisation, data order, augmentation and drop-path")
    checkpoint_every: int = field(500, help="save a checkpoint every N steps (and always at the end)")
    keep_checkpoints: int = field(2, help="how many step checkpoints to keep")
    stop_at_step: int | None = field(None, help="save and stop once this global step is done (time-boxed allocations)")
    progress: bool = field(True, help="tqdm progress bar on rank 0")
    export: bool = field(True, help="write backbone.safetensors (teacher) when the run completes")

    def validate(self) -> None:
        if self.epochs <= 0 or self.checkpoint_every < 1 or self.keep_checkpoints < 1:
            raise ValueError("epochs must be > 0, checkpoint_every and keep_checkpoints >= 1")


@dataclass
class PretrainConfig:
    out: str = field("runs/pretrain", help="output folder (checkpoints, metrics, exported backbone)")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    init: InitConfig = field(default_factory=InitConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# -------------------------------------------------------------------------------------- schedules
@dataclass(frozen=True)
class Schedule:
    """Every per-step value of the run, a pure function of the global step (so resume is exact)."""

    lr: float
    weight_decay: float
    momentum: float
    teacher_temp: float
    last_layer_frozen: bool


def _cosine(start: float, end: float, frac: float) -> float:
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * min(max(frac, 0.0), 1.0)))


def schedule_at(step: int, cfg: PretrainConfig, steps_per_epoch: int, world_size: int) -> Schedule:
    """lr: linear warm-up from 0 to lr×global_batch/256, then cosine to min_lr; weight decay and
    teacher momentum: cosine over the run; teacher temperature: linear warm-up, then constant."""
    total = max(1, round(cfg.train.epochs * steps_per_epoch))
    epoch = step / steps_per_epoch
    peak = cfg.optim.lr * cfg.data.batch_size * world_size / 256
    warm = round(cfg.optim.warmup_epochs * steps_per_epoch)
    if step < warm:
        lr = peak * step / warm
    else:
        lr = _cosine(peak, cfg.optim.min_lr, (step - warm) / max(1, total - warm))
    wd = _cosine(cfg.optim.weight_decay, cfg.optim.weight_decay_end, step / total)
    momentum = _cosine(cfg.optim.momentum_teacher, cfg.optim.momentum_teacher_end, step / total)
    lc = cfg.loss
    if lc.teacher_temp_warmup_epochs > 0 and epoch < lc.teacher_temp_warmup_epochs:
        temp = lc.teacher_temp + (lc.teacher_temp_final - lc.teacher_temp) * epoch / lc.teacher_temp_warmup_epochs
    else:
        temp = lc.teacher_temp_final
    return Schedule(lr=lr, weight_decay=wd, momentum=momentum, teacher_temp=temp,
                    last_layer_frozen=epoch < cfg.optim.freeze_last_layer_epochs)


def step_seed(seed: int, rank: int, step: int) -> int:
    """Counter-based seed of one (rank, step): the RNG state IS the step, nothing to save."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, dtype=np.uint64)[0] >> 1)


# ------------------------------------------------------------------------------------------ loss
class NonFiniteError(RuntimeError):
    """A loss or the weights became NaN/inf; the message names the step and the last good checkpoint."""


class Preempted(Exception):
    """SIGUSR2 arrived; a checkpoint was saved and the job should be requeued."""


def cls_pairs(batch: int, n_local: int, device: torch.device) -> torch.Tensor:
    """Teacher rows [(2+n_local)·B, 2] each student [CLS] row is compared with (−1 = none).

    Rows are view-major (row v·B + b is view v of image b). A student global view meets the OTHER
    teacher global view of its image; a local view meets both.
    """
    b = torch.arange(batch, device=device)
    rows = [torch.stack([batch + b, torch.full_like(b, -1)], 1), torch.stack([b, torch.full_like(b, -1)], 1)]
    rows += [torch.stack([b, batch + b], 1)] * n_local
    return torch.cat(rows)


def patch_weights(masks: torch.Tensor) -> torch.Tensor:
    """Weight 1/(#masked patches of its image) per selected patch row, in ``tokens[masks]`` order,
    so the patch loss is a mean over images of per-image means (iBOT)."""
    counts = masks.sum(1).clamp(min=1).float()
    return (1.0 / counts).repeat_interleave(masks.sum(1))


@torch.no_grad()
def teacher_entropy(zt: torch.Tensor, wt: torch.Tensor, centre: torch.Tensor, tau_t: float, vmf: bool) -> torch.Tensor:
    """Mean entropy (nats) of the teacher's centred softmax over the rows of zt [N, p] (N×K, so
    only used for the [CLS] rows). With it the [CLS] loss splits into H(P_t) + KL(P_t‖P_s): the
    entropy shows centring/sharpening and collapse (→0: one prototype, →ln K: uniform), the KL
    shows the student learning (DINO's collapse diagnostics)."""
    logits = (zt.float() @ wt.float().T) / tau_t - centre.float()
    if vmf:
        from .vmf import log_cp_torch

        logits = logits + log_cp_torch(wt.float().norm(dim=1) / tau_t, wt.shape[1])
    logp = torch.log_softmax(logits, dim=1)
    return -(logp.exp() * logp).sum(1).mean()


@dataclass
class LossOut:
    loss: torch.Tensor  # scalar with grad: λ_cls·cls + λ_patch·patch
    cls: torch.Tensor
    patch: torch.Tensor
    stats_cls: dict[str, torch.Tensor]
    stats_patch: dict[str, torch.Tensor]
    teacher_entropy_cls: torch.Tensor


def ibot_vmf_loss(student: HeadOut, teacher: HeadOut, masks: torch.Tensor, batch: int, n_local: int,
                  centre_cls: torch.Tensor, centre_patch: torch.Tensor, tau_s: float, tau_t: float,
                  cfg: LossConfig) -> LossOut:
    """DINO [CLS] loss across views + iBOT loss on masked patches, both through ``vmf_xent``."""
    from .kernels import vmf_xent

    dtype = student.cls_z.dtype  # bf16 under autocast: both operands of the fused matmuls match
    pairs = cls_pairs(batch, n_local, student.cls_z.device)
    loss_cls, st_cls = vmf_xent(student.cls_z, student.cls_prototypes.to(dtype), teacher.cls_z.to(dtype),
                                teacher.cls_prototypes.to(dtype), centre_cls, tau_s, tau_t, pairs=pairs,
                                vmf=cfg.vmf, backend=cfg.backend)
    loss_patch, st_patch = vmf_xent(student.patch_z, student.patch_prototypes.to(dtype), teacher.patch_z.to(dtype),
                                    teacher.patch_prototypes.to(dtype), centre_patch, tau_s, tau_t,
                                    weights=patch_weights(masks), vmf=cfg.vmf, backend=cfg.backend)
    total = cfg.lambda_cls * loss_cls + cfg.lambda_patch * loss_patch
    entropy = teacher_entropy(teacher.cls_z, teacher.cls_prototypes, centre_cls, tau_t, cfg.vmf)
    return LossOut(total, loss_cls, loss_patch, st_cls, st_patch, entropy)


# ------------------------------------------------------------------------------------------- run
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_distributed(backend: str):
    """Rank facts from the launcher → torch env variables → DeepSpeed/torch.distributed (no MPI_Init)."""
    import deepspeed

    from . import dist

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
        "wall_clock_breakdown": False,
    }
    if bf16:
        out["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    return out


def param_groups(model: IBOTVMF) -> list[dict[str, Any]]:
    """AdamW groups: decayed weights, undecayed biases/norms/tokens (DINO's rule: bias or 1-D), and
    the prototypes on their own so they can be frozen (lr 0) during the first epoch."""
    protos = set(model.prototype_names())
    decay, no_decay, last = [], [], []
    for name, p in model.named_parameters():
        if name in protos:
            last.append(p)
        elif name.endswith(".bias") or p.ndim <= 1:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "name": "decay"}, {"params": no_decay, "name": "no_decay", "weight_decay": 0.0},
            {"params": last, "name": "prototypes"}]


def apply_schedule(optimizer: Any, sched: Schedule) -> None:
    for group in optimizer.param_groups:
        name = group.get("name")
        group["lr"] = 0.0 if (name == "prototypes" and sched.last_layer_frozen) else sched.lr
        if name != "no_decay":
            group["weight_decay"] = sched.weight_decay


@torch.no_grad()
def ema_update(teacher: torch.nn.Module, student: torch.nn.Module, momentum: float) -> None:
    """teacher ← m·teacher + (1−m)·student over all parameters, in two foreach kernels."""
    t = list(teacher.parameters())
    s = [p.detach() for p in student.parameters()]
    torch._foreach_mul_(t, momentum)
    torch._foreach_add_(t, s, alpha=1.0 - momentum)


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



class MetricsLog:
    """metrics.jsonl on rank 0; on resume, records after the checkpoint are dropped (they are redone)."""

    def __init__(self, path: Path, enabled: bool, resume_step: int) -> None:
        self.path = path
        self.enabled = enabled
        if enabled and path.exists():
            kept = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] < resume_step]
            write_atomic(path, "".join(ln + "\n" for ln in kept))
        self._fh = open(path, "a") if enabled else None

    def write(self, record: dict[str, Any]) -> None:
        if self._fh is not None:
            self._fh.write(json.dumps(record) + "\n")
            self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()


def checkpoint_root(out: str | os.PathLike) -> Path:
    return Path(out) / "checkpoints"


def latest_tag(out: str | os.PathLike) -> str | None:
    """The last complete checkpoint tag of a run folder, or None."""
    f = checkpoint_root(out) / "latest"
    return f.read_text().strip() if f.exists() else None


def _batches(cfg: PretrainConfig, epoch: int, rank: int, world: int, steps_per_epoch: int,
             skip: int) -> Iterator[tuple[torch.Tensor, list]]:
    from .data import train_loader

    loader = train_loader(cfg.data.shards, batch_size=cfg.data.batch_size, canvas=cfg.data.canvas,
                          num_workers=cfg.data.num_workers, seed=cfg.train.seed, rank=rank, world_size=world,
                          epoch=epoch, batches_per_epoch=steps_per_epoch)
    it = iter(loader)
    for _ in range(skip):  # resume mid-epoch: the loader is deterministic per epoch, replay its prefix
        next(it)
    return it


def _steps_per_epoch(cfg: PretrainConfig, world: int) -> int:
    """Shard total // global batch (the loader's default), from the shards' index.json."""
    from .data import read_index

    total = read_index(cfg.data.shards)["totals"]["written"]
    steps = total // (cfg.data.batch_size * world)
    if steps < 1:
        raise ValueError(f"{cfg.data.shards}: {total} images are fewer than one global batch of "
                         f"{cfg.data.batch_size}×{world}; lower data.batch_size")
    return steps


def _nonfinite_params(*modules: torch.nn.Module) -> list[str]:
    return [n for m in modules for n, p in m.named_parameters() if not bool(torch.isfinite(p).all())]


class Trainer:
    """State and loop of one pretraining run on this rank (see the module docstring)."""

    def __init__(self, cfg: PretrainConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.out)
        cuda = cfg.engine.device == "cuda" or (cfg.engine.device == "auto" and torch.cuda.is_available())
        if cuda and not torch.cuda.is_available():
            raise RuntimeError("engine.device=cuda but CUDA is not available")
        if cuda:  # before the process group exists, so NCCL binds each rank to its own GPU; modulo
            # the visible count because Slurm may show each task only its own GPU (--gpu-bind)
            from .dist import from_env

            torch.cuda.set_device(from_env().local_rank % torch.cuda.device_count())
        self.env = init_distributed("nccl" if cuda else "gloo")
        self.rank, self.world = self.env.rank, self.env.world_size
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        self.bf16 = cfg.engine.precision == "bf16" or (cfg.engine.precision == "auto" and cuda)
        if cfg.engine.threads:
            torch.set_num_threads(cfg.engine.threads)

        self.steps_per_epoch = cfg.data.batches_per_epoch or _steps_per_epoch(cfg, self.world)
        self.total_steps = max(1, round(cfg.train.epochs * self.steps_per_epoch))

        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        student = build_model(cfg.model, cfg.augment.global_size)
        if cfg.init.path and latest_tag(self.out) is None:
            load_backbone_weights(student.backbone, cfg.init.path)
        self.teacher = build_model(cfg.model, cfg.augment.global_size, drop_path=0.0)
        self.teacher.load_state_dict(student.state_dict())
        self.teacher.requires_grad_(False)
        self.teacher.to(self.device).eval()
        self.multicrop = MultiCrop(cfg.augment, student.backbone.patch_size)

        import deepspeed

        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=student.to(self.device), model_parameters=param_groups(student),
            config=ds_config(cfg, self.bf16))
        k = cfg.model.n_prototypes
        self.centre_cls = torch.zeros(k, device=self.device)
        self.centre_patch = torch.zeros(k, device=self.device)
        self.step = 0

    # ---- checkpoints
    def _client_state(self) -> dict[str, Any]:
        epoch, batch = divmod(self.step, self.steps_per_epoch)
        return {"step": self.step, "teacher": self.teacher.state_dict(), "centre_cls": self.centre_cls,
                "centre_patch": self.centre_patch, "world_size": self.world,
                "steps_per_epoch": self.steps_per_epoch, "data_position": {"epoch": epoch, "batch": batch},
                "rng": {"scheme": "counter", "seed": self.cfg.train.seed},
                "model_config": cfglib.to_dict(self.cfg.model), "config": cfglib.to_dict(self.cfg)}

    def save(self) -> str:
        """Checkpoint on EVERY rank (ZeRO shards), then rank 0 moves ``latest`` and prunes old tags."""
        bad = _nonfinite_params(self.engine.module, self.teacher)
        if bad:
            raise NonFiniteError(f"non-finite weights after step {self.step} ({bad[:4]}); not saving, "
                                 f"{self._last_good()}")
        tag = f"step-{self.step:08d}"
        root = checkpoint_root(self.out)
        self.engine.save_checkpoint(str(root), tag=tag, client_state=self._client_state(), save_latest=False)
        torch.distributed.barrier()
        if self.rank == 0:
            write_atomic(root / "latest", tag + "\n")
            tags = sorted(p.name for p in root.glob("step-*") if p.is_dir())
            for old in tags[: max(0, len(tags) - self.cfg.train.keep_checkpoints)]:
                if old != tag:
                    shutil.rmtree(root / old, ignore_errors=True)
        torch.distributed.barrier()
        return tag

    def _last_good(self) -> str:
        tag = latest_tag(self.out)
        where = checkpoint_root(self.out) / tag if tag else None
        return f"last good checkpoint: {where}" if where else "no checkpoint was saved yet"

    def resume(self) -> bool:
        tag = latest_tag(self.out)
        if tag is None:
            return False
        _, state = self.engine.load_checkpoint(str(checkpoint_root(self.out)), tag=tag)
        if state is None:
            raise RuntimeError(f"checkpoint {checkpoint_root(self.out) / tag} could not be loaded")
        if state["world_size"] != self.world:
            raise RuntimeError(f"checkpoint {tag} was written by {state['world_size']} ranks; resume with the same "
                               f"number of ranks (now {self.world}) or start a new run folder")
        if state["model_config"] != cfglib.to_dict(self.cfg.model):
            raise RuntimeError(f"model section differs from the checkpoint's in {self.out}; use a new `out` folder")
        if state["rng"]["seed"] != self.cfg.train.seed:
            raise RuntimeError(f"train.seed={self.cfg.train.seed} but the checkpoint ran with seed "
                               f"{state['rng']['seed']}: data order and augmentation are derived from it")
        if state["steps_per_epoch"] != self.steps_per_epoch:
            raise RuntimeError(f"steps per epoch changed ({state['steps_per_epoch']} → {self.steps_per_epoch}): "
                               "same shards and data.batch_size are needed to resume")
        self.teacher.load_state_dict(state["teacher"])
        self.centre_cls.copy_(state["centre_cls"])
        self.centre_patch.copy_(state["centre_patch"])
        self.step = int(state["step"])
        return True

    # ---- one step
    def _reduce(self, out: LossOut, n_patch_rows: int, preempt: bool) -> torch.Tensor:
        """One all-reduce (sum) of losses, centre statistics (count-weighted) and flags."""
        k = self.cfg.model.n_prototypes
        n_cls = float(2 * self.cfg.data.batch_size)
        sc, sp = out.stats_cls, out.stats_patch
        scalars = torch.stack([out.cls.detach().float(), out.patch.detach().float(),
                               torch.tensor(float(n_patch_rows), device=self.device),
                               torch.tensor(float(preempt), device=self.device),
                               out.teacher_entropy_cls.float()])
        flat = torch.cat([scalars, sc["teacher_logit_mean"] * n_cls, sp["teacher_logit_mean"] * n_patch_rows,
                          sc["teacher_prob_mean"] * n_cls, sp["teacher_prob_mean"] * n_patch_rows]).float()
        torch.distributed.all_reduce(flat)
        assert flat.numel() == _N_SCALARS + 4 * k
        return flat

    def train_step(self, images: torch.Tensor, sched: Schedule, preempt: bool) -> dict[str, Any]:
        cfg = self.cfg
        t0 = time.perf_counter()
        seed = step_seed(cfg.train.seed, self.rank, self.step)
        torch.manual_seed(seed)  # drop-path
        gen = torch.Generator().manual_seed(seed ^ 0x5EED)  # augmentation parameters
        dtype = torch.bfloat16 if self.bf16 else torch.float32
        crops: Crops = self.multicrop(images.to(self.device, non_blocking=True), gen)
        apply_schedule(self.optimizer, sched)
        with torch.no_grad(), torch.autocast(self.device.type, dtype=dtype, enabled=self.bf16):
            t_out = self.teacher(crops.globals_, crops.masks, apply_mask=False)
        s_out = self.engine(crops.globals_, crops.masks, crops.locals_)
        b = images.shape[0]
        loss = ibot_vmf_loss(s_out, t_out, crops.masks, b, cfg.augment.n_local, self.centre_cls,
                             self.centre_patch, cfg.loss.student_temp, sched.teacher_temp, cfg.loss)
        n_patch = int(t_out.patch_z.shape[0])
        flat = self._reduce(loss, n_patch, preempt)
        k = cfg.model.n_prototypes
        loss_cls, loss_patch = float(flat[0]) / self.world, float(flat[1]) / self.world
        if not (math.isfinite(loss_cls) and math.isfinite(loss_patch)):
            raise NonFiniteError(f"non-finite loss at step {self.step} (cls={loss_cls}, patch={loss_patch}); "
                                 f"stopping, {self._last_good()}. Lower optim.lr or check the inputs.")
        self.engine.backward(loss.loss)
        self.engine.step()

        n_cls_all = 2.0 * b * self.world
        n_patch_all = max(float(flat[2]), 1.0)
        logit_cls, logit_patch, prob_cls, prob_patch = flat[_N_SCALARS:].view(4, k)
        logit_cls, prob_cls = logit_cls / n_cls_all, prob_cls / n_cls_all
        logit_patch, prob_patch = logit_patch / n_patch_all, prob_patch / n_patch_all
        entropy_cls = float(flat[4]) / self.world
        m = cfg.loss.center_momentum
        self.centre_cls.mul_(m).add_(logit_cls, alpha=1 - m)
        self.centre_patch.mul_(m).add_(logit_patch, alpha=1 - m)
        ema_update(self.teacher, self.engine.module, sched.momentum)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        record = {"step": self.step, "epoch": self.step / self.steps_per_epoch,
                  "loss": cfg.loss.lambda_cls * loss_cls + cfg.loss.lambda_patch * loss_patch,
                  "loss_cls": loss_cls, "loss_patch": loss_patch, "cls_teacher_entropy": entropy_cls,
                  "cls_kl": loss_cls - entropy_cls, "lr": sched.lr, "wd": sched.weight_decay,
                  "momentum": sched.momentum, "teacher_temp": sched.teacher_temp,
                  "last_layer_frozen": sched.last_layer_frozen,
                  "grad_norm": _as_float(self.engine.get_global_grad_norm()),
                  "mask_ratio": float(crops.masks.float().mean()),
                  "img_per_s": b * self.world / dt, "step_s": dt}
        record.update(prototype_stats(prob_cls, "cls", cfg.loss.usage_threshold))
        record.update(prototype_stats(prob_patch, "patch", cfg.loss.usage_threshold))
        for name, p in self.engine.module.named_parameters():
            if name.endswith("prototypes"):
                record.update(kappa_stats(p.detach(), cfg.loss.student_temp, name.split(".")[0]))
        record["preempt"] = bool(flat[3] > 0)
        return record

    # ---- loop
    def fit(self, preempt: PreemptFlag) -> int:
        cfg = self.cfg
        resumed = self.resume()
        start = self.step
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            write_atomic(self.out / "config.yaml", yaml.safe_dump(cfglib.to_dict(cfg), sort_keys=False))
        metrics = MetricsLog(self.out / "metrics.jsonl", self.rank == 0, start)
        if resumed:
            log.info("resumed %s at step %d / %d", self.out, start, self.total_steps)
        stop = min(self.total_steps, cfg.train.stop_at_step or self.total_steps)
        bar = _progress(cfg.train.progress and self.rank == 0, start, self.total_steps)
        batches: Iterator | None = None
        try:
            while self.step < stop:
                epoch, index = divmod(self.step, self.steps_per_epoch)
                if batches is None or index == 0:
                    batches = _batches(cfg, epoch, self.rank, self.world, self.steps_per_epoch, index)
                images, _ = next(batches)
                sched = schedule_at(self.step, cfg, self.steps_per_epoch, self.world)
                record = self.train_step(images, sched, preempt.raised)
                self.step += 1
                metrics.write({k: v for k, v in record.items() if k != "preempt"})
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['img_per_s']:.0f}")
                if record["preempt"]:
                    self.save()
                    raise Preempted(f"SIGUSR2: checkpoint saved at step {self.step}")
                if self.step % cfg.train.checkpoint_every == 0 or self.step == stop:
                    self.save()
        finally:
            metrics.close()
            if bar is not None:
                bar.close()
        if self.step >= self.total_steps and cfg.train.export and self.rank == 0:
            from .pretrain_export import export_teacher

            export_teacher(self.teacher, cfg, self.out / "backbone.safetensors", step=self.step)
        if self.step == start and self.rank == 0:
            print(f"icehpc pretrain: {self.out} is already at step {self.step} / {self.total_steps}; nothing to do",
                  file=sys.stderr)
        return 0


def _as_float(x: Any) -> float | None:
    if x is None:
        return None
    return float(x)


def prototype_stats(prob_mean: torch.Tensor, prefix: str, threshold: float) -> dict[str, float]:
    """How many prototypes receive teacher mass (partial prototype collapse shows here).

    ``{prefix}_proto_used``: prototypes whose mean teacher probability is ≥ threshold/K;
    ``{prefix}_proto_perplexity``: exp(entropy) of the mean teacher distribution (K = uniform use).
    """
    k = prob_mean.numel()
    p = prob_mean.double().clamp(min=0)
    p = p / p.sum().clamp(min=1e-30)
    entropy = -(p * torch.log(p.clamp(min=1e-30))).sum()
    return {f"{prefix}_proto_used": int((p >= threshold / k).sum()),
            f"{prefix}_proto_perplexity": float(torch.exp(entropy))}


def kappa_stats(prototypes: torch.Tensor, tau: float, prefix: str) -> dict[str, float]:
    """Distribution of the prototype concentrations κ_k = ‖w_k‖/τ_s (min, 5/50/95 %, max)."""
    kappa = prototypes.float().norm(dim=1) / tau
    q = torch.quantile(kappa, torch.tensor([0.0, 0.05, 0.5, 0.95, 1.0], device=kappa.device))
    names = ("min", "p05", "p50", "p95", "max")
    return {f"{prefix}_kappa_{n}": float(v) for n, v in zip(names, q)}


def _progress(enabled: bool, start: int, total: int) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="pretrain", unit="step", dynamic_ncols=True, mininterval=1.0)


def pretrain(cfg: PretrainConfig) -> int:
    """Run (or resume) pretraining as this rank; returns the process exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    preempt = PreemptFlag()
    preempt.install()
    trainer = Trainer(cfg)
    try:
        return trainer.fit(preempt)
    except NonFiniteError as exc:
        if trainer.rank == 0:
            print(f"icehpc pretrain: {exc}", file=sys.stderr)
        return NONFINITE_EXIT
    except Preempted as exc:
        if trainer.rank == 0:
            print(f"icehpc pretrain: {exc}; requeue (same command) to resume", file=sys.stderr)
        preempt.hand_over()  # submitit: rank 0 requeues the job and exits here
        return PREEMPTED_EXIT
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cfglib.add_config_arguments(parser, PretrainConfig, "pretrain-vits16.yaml")


def run(args: argparse.Namespace) -> int:
    cfg = cfglib.from_args(PretrainConfig, args)
    return pretrain(cfg)
