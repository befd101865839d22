"""Per-step schedules of a pretraining run: pure functions of the global step, so resume is exact."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .config import PretrainConfig


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


