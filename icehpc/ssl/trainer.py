"""The pretraining loop of ``icehpc pretrain``: iBOT-vMF self-supervised pretraining on DeepSpeed, 1 CPU process to N nodes.

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

import contextlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import torch
import yaml

from .. import config as cfglib
from ..fileio import LockedError, lock_dir, write_atomic
from .augment import Crops, MultiCrop
from .checkpoint import PREEMPTED_EXIT, PreemptFlag, checkpoint_root, commit, latest_tag, ResumeError, resume_tag
from .config import METRICS, RUN_CONFIG, PretrainConfig
from .engine import apply_schedule, ds_config, ema_update, import_deepspeed, init_distributed, param_groups
from .loss import Centres, LossOut, ibot_vmf_loss, resolve_centering
from .metrics import CollapseGuard, MetricsLog, _as_float, _progress, kappa_stats, prototype_stats
from .model import build_model, check_model_size, load_backbone_weights
from .schedule import Schedule, schedule_at, step_seed

log = logging.getLogger("icehpc.ssl.trainer")

#: Exit code of a run stopped by a NaN/inf loss or non-finite weights.
NONFINITE_EXIT = 3
#: Exit code of a run stopped because the teacher collapsed (see train.collapse_patience).
COLLAPSE_EXIT = 4
#: Scalars leading the per-step all-reduce: loss_cls, loss_patch, #patch rows, preempt, H(P_t) cls, KoLeo.
_N_SCALARS = 6


class NonFiniteError(RuntimeError):
    """A loss or the weights became NaN/inf; the message names the step and the last good checkpoint."""


class CollapseError(RuntimeError):
    """The teacher [CLS] entropy signalled collapse for train.collapse_patience steps (checkpoint saved)."""


class Preempted(Exception):
    """SIGUSR2 arrived; a checkpoint was saved and the job should be requeued."""


def _batches(cfg: PretrainConfig, epoch: int, rank: int, world: int, steps_per_epoch: int,
             skip: int, device: torch.device) -> Iterator[tuple[torch.Tensor, list]]:
    """Batches on ``device``; on CUDA pinned first, so the copy is async, and bbox windows enlarged there."""
    from ..data.loader import train_loader

    loader = train_loader(cfg.data.shards, batch_size=cfg.data.batch_size, canvas=cfg.data.canvas,
                          num_workers=cfg.data.num_workers, seed=cfg.train.seed, rank=rank, world_size=world,
                          epoch=epoch, batches_per_epoch=steps_per_epoch, framing=cfg.data.framing,
                          margin=cfg.data.framing_margin, device=device)
    it = iter(loader)
    for _ in range(skip):  # resume mid-epoch: the loader is deterministic per epoch, replay its prefix
        next(it)
    return it


def _steps_per_epoch(cfg: PretrainConfig, world: int) -> int:
    """Shard total // global batch (the loader's default), from the shards' index.json."""
    from ..data.format import read_index

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

    def __init__(self, cfg: PretrainConfig, source: dict[str, Any] | None = None) -> None:
        self.cfg = cfg
        self.source = source  # where the config came from (file, overrides), for config.yaml
        self.out = Path(cfg.out)
        cuda = cfg.engine.device == "cuda" or (cfg.engine.device == "auto" and torch.cuda.is_available())
        if cuda and not torch.cuda.is_available():
            raise RuntimeError("engine.device=cuda but CUDA is not available")
        if cuda:  # before the process group exists, so NCCL binds each rank to its own GPU; modulo
            # the visible count because Slurm may show each task only its own GPU (--gpu-bind)
            from ..dist import from_env

            torch.cuda.set_device(from_env().local_rank % torch.cuda.device_count())
        self.env = init_distributed("nccl" if cuda else "gloo")
        self.rank, self.world = self.env.rank, self.env.world_size
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        self.bf16 = cfg.engine.precision == "bf16" or (cfg.engine.precision == "auto" and cuda)
        if cfg.engine.threads:
            torch.set_num_threads(cfg.engine.threads)

        self.steps_per_epoch = cfg.data.batches_per_epoch or _steps_per_epoch(cfg, self.world)
        self.total_steps = max(1, round(cfg.train.epochs * self.steps_per_epoch))

        check_model_size(cfg.model, cfg.augment.global_size)  # before any allocation: a config can ask for 10⁹ dims
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        student = build_model(cfg.model, cfg.augment.global_size)
        if cfg.init.path and latest_tag(self.out) is None:
            load_backbone_weights(student.backbone, cfg.init.path)
        self.teacher = build_model(cfg.model, cfg.augment.global_size, drop_path=0.0)
        self.teacher.load_state_dict(student.state_dict())
        self.teacher.requires_grad_(False)
        self.teacher.to(self.device).eval()
        self.multicrop = MultiCrop(cfg.augment, student.backbone.patch_size)

        self.engine, self.optimizer, _, _ = import_deepspeed().initialize(
            model=student.to(self.device), model_parameters=param_groups(student),
            config=ds_config(cfg, self.bf16))
        k = cfg.model.n_prototypes
        self.centres = Centres(k, cfg.loss.center_momentum, self.device,
                               mode=resolve_centering(cfg.loss.centering, cfg.loss.vmf))
        self.step = 0
        # metrics (each read waits for the device) every N steps; between reads nothing in
        # train_step reads the device, so the host runs ahead of the GPU
        self.metrics_every = cfg.train.metrics_every or (20 if cuda else 1)
        self._bad: torch.Tensor | None = None  # device flag: a non-finite loss since the last read
        self._window: tuple[float, int] | None = None  # (time, step) of the last read

    # ---- checkpoints
    def _client_state(self) -> dict[str, Any]:
        epoch, batch = divmod(self.step, self.steps_per_epoch)
        return {"step": self.step, "teacher": self.teacher.state_dict(), **self.centres.state_dict(),
                "world_size": self.world,
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
            commit(self.out, tag, self.cfg.train.keep_checkpoints)  # manifest, then `latest`, then pruning
        torch.distributed.barrier()
        return tag

    def _last_good(self) -> str:
        tag = latest_tag(self.out)
        where = checkpoint_root(self.out) / tag if tag else None
        return f"last good checkpoint: {where}" if where else "no checkpoint was saved yet"

    @contextlib.contextmanager
    def locked_out(self) -> Iterator[None]:
        """Rank 0 holds the lock of ``out`` for the run; every rank stops if another job holds it."""
        with contextlib.ExitStack() as held:
            failed, msg = torch.zeros(1, device=self.device), ""
            if self.rank == 0:
                try:
                    held.enter_context(lock_dir(self.out, "pretraining run folder"))
                except LockedError as exc:
                    failed[0], msg = 1.0, str(exc)
            torch.distributed.all_reduce(failed)
            if float(failed[0]) > 0:
                raise LockedError(msg or f"pretraining run folder {self.out} is in use by another job (see rank 0)")
            yield

    def resume(self) -> bool:
        tag, warnings = resume_tag(self.out)  # verified against its sha256 manifest, inside the run folder
        if self.rank == 0:
            for w in warnings:
                log.warning("%s", w)
        if tag is None:
            return False
        where = checkpoint_root(self.out) / tag
        try:  # DeepSpeed: torch.load(weights_only=False) — see the trust boundary in checkpoint.py
            _, state = self.engine.load_checkpoint(str(checkpoint_root(self.out)), tag=tag)
        except (AssertionError, RuntimeError, OSError, EOFError, ValueError, KeyError) as exc:
            raise ResumeError(f"checkpoint {where} could not be loaded ({type(exc).__name__}: {exc}); move it "
                               "aside to resume from an older one, or use a new `out` folder") from None
        if state is None:
            raise ResumeError(f"checkpoint {where} could not be loaded")
        if state["world_size"] != self.world:
            raise ResumeError(f"checkpoint {tag} was written by {state['world_size']} ranks; resume with the same "
                               f"number of ranks (now {self.world}) or start a new run folder")
        if state["model_config"] != cfglib.to_dict(self.cfg.model):
            raise ResumeError(f"model section differs from the checkpoint's in {self.out}; use a new `out` folder")
        if state["rng"]["seed"] != self.cfg.train.seed:
            raise ResumeError(f"train.seed={self.cfg.train.seed} but the checkpoint ran with seed "
                               f"{state['rng']['seed']}: data order and augmentation are derived from it")
        if state["steps_per_epoch"] != self.steps_per_epoch:
            raise ResumeError(f"steps per epoch changed ({state['steps_per_epoch']} → {self.steps_per_epoch}): "
                               "same shards and data.batch_size are needed to resume")
        self.teacher.load_state_dict(state["teacher"])
        self.centres.load_state_dict(state)
        self.step = int(state["step"])
        return True

    # ---- one step
    def _reduce(self, out: LossOut, n_patch_rows: int, preempt: bool) -> torch.Tensor:
        """One all-reduce (sum) of losses, centre statistics (count-weighted) and flags."""
        k = self.cfg.model.n_prototypes
        n_cls = float(2 * self.cfg.data.batch_size)
        sc, sp = out.stats_cls, out.stats_patch
        scalars = torch.stack([out.cls.detach().float(), out.patch.detach().float(),
                               torch.full((), float(n_patch_rows), device=self.device),  # no H2D copy
                               torch.full((), float(preempt), device=self.device),
                               out.teacher_entropy_cls.float(), out.koleo.detach().float()])
        flat = torch.cat([scalars, out.centre_stat_cls * n_cls, out.centre_stat_patch * n_patch_rows,
                          sc["teacher_prob_mean"] * n_cls, sp["teacher_prob_mean"] * n_patch_rows]).float()
        torch.distributed.all_reduce(flat)
        assert flat.numel() == _N_SCALARS + 4 * k
        return flat

    def train_step(self, images: torch.Tensor, sched: Schedule, preempt: bool,
                   read: bool = True) -> dict[str, Any] | None:
        """One step. Without ``read`` nothing is read from the device (no host sync) and None is
        returned; with it the step's metrics (and the non-finite check of every step since the last
        read) are materialised."""
        cfg = self.cfg
        t0 = time.perf_counter()
        if self._window is None:
            self._window = (t0, self.step)
        seed = step_seed(cfg.train.seed, self.rank, self.step)
        torch.manual_seed(seed)  # drop-path
        gen = torch.Generator().manual_seed(seed ^ 0x5EED)  # augmentation parameters
        dtype = torch.bfloat16 if self.bf16 else torch.float32
        crops: Crops = self.multicrop(images.to(self.device, non_blocking=True), gen)
        apply_schedule(self.optimizer, sched)
        with torch.no_grad(), torch.autocast(self.device.type, dtype=dtype, enabled=self.bf16):
            t_out = self.teacher(crops.globals_, crops.masks, apply_mask=False, mask_index=crops.mask_index)
        s_out = self.engine(crops.globals_, crops.masks, crops.locals_, mask_index=crops.mask_index)
        b = images.shape[0]
        loss = ibot_vmf_loss(s_out, t_out, crops.masks, b, cfg.augment.n_local, self.centres,
                             cfg.loss.student_temp, sched.teacher_temp, cfg.loss, dtype=dtype,
                             mask_index=crops.mask_index)
        n_patch = int(t_out.patch_z.shape[0])
        flat = self._reduce(loss, n_patch, preempt)
        k = cfg.model.n_prototypes
        # non-finite loss: flagged on the device (a host read here would wait for the forward) and
        # raised at the next read; save() refuses non-finite weights, so no bad checkpoint is written
        bad = ~torch.isfinite(flat[:2]).all()
        self._bad = bad if self._bad is None else self._bad | bad
        self.engine.backward(loss.loss)
        self.engine.step()

        n_cls_all = 2.0 * b * self.world
        n_patch_all = flat[2].clamp(min=1.0)
        logit_cls, logit_patch, prob_cls, prob_patch = flat[_N_SCALARS:].view(4, k)
        logit_cls, prob_cls = logit_cls / n_cls_all, prob_cls / n_cls_all
        logit_patch, prob_patch = logit_patch / n_patch_all, prob_patch / n_patch_all
        self.centres.update(logit_cls, logit_patch, patch_rows=flat[2])  # no host read
        ema_update(self.teacher, self.engine.module, sched.momentum)
        if not read:
            return None
        loss_cls, loss_patch = float(flat[0]) / self.world, float(flat[1]) / self.world
        bad, self._bad = bool(self._bad), None
        if bad:
            raise NonFiniteError(f"non-finite loss at or before step {self.step} (cls={loss_cls}, "
                                 f"patch={loss_patch}); stopping, {self._last_good()}. Lower optim.lr "
                                 "or check the inputs.")
        entropy_cls, loss_koleo = float(flat[4]) / self.world, float(flat[5]) / self.world
        now = time.perf_counter()  # the reads above waited for the device: a true mean step time
        dt = (now - self._window[0]) / max(1, self.step + 1 - self._window[1])
        self._window = (now, self.step + 1)
        record = {"step": self.step, "epoch": self.step / self.steps_per_epoch,
                  "loss": cfg.loss.lambda_cls * loss_cls + cfg.loss.lambda_patch * loss_patch
                  + cfg.loss.lambda_koleo * loss_koleo,
                  "loss_cls": loss_cls, "loss_patch": loss_patch, "loss_koleo": loss_koleo,
                  "cls_teacher_entropy": entropy_cls,
                  "cls_kl": loss_cls - entropy_cls, "lr": sched.lr, "wd": sched.weight_decay,
                  "momentum": sched.momentum, "teacher_temp": sched.teacher_temp,
                  "last_layer_frozen": sched.last_layer_frozen,
                  "grad_norm": _as_float(self.engine.get_global_grad_norm()),
                  "mask_ratio": float(crops.masks.float().mean()),
                  "img_per_s": b * self.world / dt, "step_s": dt}
        record.update(prototype_stats(prob_cls, "cls", cfg.loss.usage_threshold))
        record.update(prototype_stats(prob_patch, "patch", cfg.loss.usage_threshold))
        for name, head in self.engine.module.prototype_heads().items():
            record.update(kappa_stats(head.prototypes.detach(), cfg.loss.student_temp, name))
        record["preempt"] = bool(flat[3] > 0)
        return record

    # ---- loop
    def fit(self, preempt: PreemptFlag) -> int:
        cfg = self.cfg
        resumed = self.resume()
        start = self.step
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            head = f"# resolved config; source: {json.dumps(self.source)}\n" if self.source else ""
            write_atomic(self.out / RUN_CONFIG, head + yaml.safe_dump(cfglib.to_dict(cfg), sort_keys=False))
        metrics = MetricsLog(self.out / METRICS, self.rank == 0, start)
        if resumed:
            log.info("resumed %s at step %d / %d", self.out, start, self.total_steps)
        stop = min(self.total_steps, cfg.train.stop_at_step or self.total_steps)
        bar = _progress(cfg.train.progress and self.rank == 0, start, self.total_steps)
        batches: Iterator | None = None
        guard = CollapseGuard(cfg.model.n_prototypes, cfg.train.collapse_patience, cfg.train.collapse_uniform_margin,
                              cfg.train.collapse_min_entropy)
        try:
            while self.step < stop:
                epoch, index = divmod(self.step, self.steps_per_epoch)
                if batches is None or index == 0:
                    batches = _batches(cfg, epoch, self.rank, self.world, self.steps_per_epoch, index,
                                       self.device)
                images, _ = next(batches)
                sched = schedule_at(self.step, cfg, self.steps_per_epoch, self.world)
                # read the device every metrics_every steps, and always before a checkpoint / the end
                nxt = self.step + 1
                read = nxt % self.metrics_every == 0 or nxt == stop or nxt % cfg.train.checkpoint_every == 0
                record = self.train_step(images, sched, preempt.raised, read=read)
                self.step += 1
                if bar is not None:
                    bar.update(1)
                if record is None:
                    continue
                metrics.write({k: v for k, v in record.items() if k != "preempt"})
                if bar is not None:
                    bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['img_per_s']:.0f}")
                if record["preempt"]:
                    self.save()
                    raise Preempted(f"SIGUSR2: checkpoint saved at step {self.step}")
                collapsed = guard.update(record["step"], record["cls_teacher_entropy"])  # same value on all ranks
                if collapsed:
                    tag = self.save()
                    raise CollapseError(f"{collapsed}; checkpoint {checkpoint_root(self.out) / tag} kept. Try a "
                                        "lower loss.teacher_temp, loss.centering=probability or a larger batch")
                if self.step % cfg.train.checkpoint_every == 0 or self.step == stop:
                    self.save()
        finally:
            metrics.close()
            if bar is not None:
                bar.close(final=self.step >= stop)  # no "done" line after a preemption or an error
        if self.step >= self.total_steps and cfg.train.export and self.rank == 0:
            from .export import export_teacher

            export_teacher(self.teacher, cfg, self.out / "backbone.safetensors", step=self.step)
        if self.step == start and self.rank == 0:
            print(f"icehpc pretrain: {self.out} is already at step {self.step} / {self.total_steps}; nothing to do",
                  file=sys.stderr)
        if self.rank == 0:
            print(where_line(self.out, self.step, self.total_steps), flush=True)
        return 0


def where_line(out: Path, step: int, total: int) -> str:
    """The last line of a pretraining run: where its checkpoint, backbone and metrics are."""
    tag = latest_tag(out)
    ckpt = checkpoint_root(out) / tag if tag else "none saved"
    backbone = out / "backbone.safetensors"
    bb = backbone if backbone.exists() else f"not exported yet (step {step} < {total}; `icehpc export {out}`)"
    return f"icehpc pretrain: step {step}/{total}; checkpoint: {ckpt}; backbone: {bb}; metrics: {out / METRICS}"



def pretrain(cfg: PretrainConfig, source: dict[str, Any] | None = None) -> int:
    """Run (or resume) pretraining as this rank; returns the process exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    preempt = PreemptFlag()
    preempt.install()
    trainer = Trainer(cfg, source)
    try:
        with trainer.locked_out():
            return trainer.fit(preempt)
    except LockedError as exc:
        if trainer.rank == 0:
            print(f"icehpc pretrain: error: {exc}", file=sys.stderr)
        return 1
    except NonFiniteError as exc:
        if trainer.rank == 0:
            print(f"icehpc pretrain: {exc}", file=sys.stderr)
        return NONFINITE_EXIT
    except ResumeError as exc:  # every rank sees the same files, so every rank stops here
        if trainer.rank == 0:
            print(f"icehpc pretrain: error: {exc}", file=sys.stderr)
        return 2
    except CollapseError as exc:
        if trainer.rank == 0:
            print(f"icehpc pretrain: {exc}", file=sys.stderr)
        return COLLAPSE_EXIT
    except Preempted as exc:
        if trainer.rank == 0:
            print(f"icehpc pretrain: {exc}; requeue (same command) to resume", file=sys.stderr)
        preempt.hand_over()  # submitit: rank 0 requeues the job and exits here
        return PREEMPTED_EXIT
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
