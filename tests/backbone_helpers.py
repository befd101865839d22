"""Shared by the test modules: a tiny exported backbone, and releasing a requeued Slurm job."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path
from types import SimpleNamespace


def tiny_backbone(path: Path, *, seed: int = 7, size: int = 32, dim: int = 32, depth: int = 2, step: int = 5,
                  data=None, **augment) -> Path:
    """A seeded tiny ViT exported by the real export code (arch, normalisation, framing in the header).

    ``augment`` goes to AugmentConfig (e.g. ``eval_size``); ``data`` is a DataConfig recorded as the
    pretraining decode."""
    import torch

    from icehpc.ssl.config import AugmentConfig, ModelConfig
    from icehpc.ssl.export import export_teacher
    from icehpc.ssl.model import build_model

    torch.manual_seed(seed)
    model_cfg = ModelConfig(arch_kwargs={"patch_size": 8, "embed_dim": dim, "depth": depth, "num_heads": 2},
                            head_hidden=max(dim // 2, 8), head_bottleneck=max(dim // 4, 4), n_prototypes=max(dim // 2, 8))
    cfg = SimpleNamespace(model=model_cfg, augment=AugmentConfig(global_size=size, mean=0.5, std=0.25, **augment),
                          **({"data": data} if data is not None else {}))
    return export_teacher(build_model(model_cfg, size), cfg, path, step)


def release_when_requeued(job: str, timeout: float = 120) -> None:
    """Slurm holds a requeued job back ~2 min (its begin time moves); start it now, as an admin
    would, so a test does not sit out the back-off."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True,
                               timeout=30).stdout.strip()
        if state == "PENDING":
            # releasing while slurmd still tears down the old steps revokes the new credential
            # ("Job credential revoked") and fails the job: wait until no step of it is left
            while subprocess.run(["squeue", "-h", "-s", "-j", job], capture_output=True, text=True,
                                 timeout=30).stdout.strip() and time.time() < deadline:
                time.sleep(0.3)
            time.sleep(2.0)
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True, timeout=30)
            return
        assert state, f"job {job} left the queue instead of being requeued"
        time.sleep(0.3)
    raise AssertionError(f"job {job} was not requeued within {timeout} s")
