"""Shared by the test modules: a tiny exported backbone, and seeded grey PNGs to feed it."""
from __future__ import annotations

import io
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


def png(seed: int, w: int = 12, h: int = 10) -> bytes:
    """A seeded random greyscale PNG of w x h pixels."""
    import numpy as np
    from PIL import Image

    a = np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a, "L").save(buf, format="PNG")
    return buf.getvalue()


def png_tree(root, classes: dict[str, int], seed: int = 0):
    """ROOT/CLASS/i.png: ``classes[CLASS]`` seeded random PNGs per class folder; returns ROOT."""
    for k, (label, n) in enumerate(classes.items()):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (root / label / f"{i}.png").write_bytes(png(seed * 1000 + k * 100 + i))
    return root
