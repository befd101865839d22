"""``icehpc export CKPT_DIR --out backbone.safetensors``: the teacher backbone as a plain timm state_dict.

The embedding job (and any user) needs only timm: the file holds the ``VisionTransformer`` tensors
under timm's own key names, and its safetensors metadata says how to build the model and feed it:
``arch``, ``timm_kwargs`` (JSON, includes ``in_chans=1``), ``input_size``, ``input_mean``,
``input_std`` (pixels are ``(uint8/255 − mean)/std``), ``step``, and the decoding of pretraining:
``input_canvas``, ``input_framing`` (none | bbox), ``input_framing_margin``. :func:`load_backbone` does exactly
that. Pretraining calls :func:`export_teacher` itself when a run completes.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import torch

MODEL_STATES = "mp_rank_00_model_states.pt"  # DeepSpeed's per-tag file holding our client state
_TEACHER_PREFIX = "backbone.vit."


def _metadata(model_cfg: dict[str, Any], augment_cfg: dict[str, Any], step: int,
              data_cfg: dict[str, Any] | None = None) -> dict[str, str]:
    from .config import ModelConfig
    from .model import timm_kwargs

    mc = ModelConfig(**model_cfg)
    size = int(augment_cfg["global_size"])
    return {"format": "timm", "source": "icehpc pretrain teacher", "arch": mc.arch,
            "timm_kwargs": json.dumps(timm_kwargs(mc, size)), "input_size": str(size),
            "input_mean": str(augment_cfg["mean"]), "input_std": str(augment_cfg["std"]), "step": str(step),
            **_framing(data_cfg)}


def _framing(data_cfg: dict[str, Any] | None) -> dict[str, str]:
    """How pretraining decoded its images, so ``icehpc embed`` frames particles the same way."""
    if not data_cfg:
        return {}
    return {"input_canvas": str(int(data_cfg["canvas"])), "input_framing": str(data_cfg.get("framing", "none")),
            "input_framing_margin": str(float(data_cfg.get("framing_margin", 0.1)))}


def _save(tensors: dict[str, torch.Tensor], metadata: dict[str, str], out: str | os.PathLike) -> Path:
    from safetensors.torch import save_file

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, out)
    return out


def export_teacher(teacher: torch.nn.Module, cfg: Any, out: str | os.PathLike, step: int) -> Path:
    """Write the live teacher's backbone (``teacher.backbone.vit``) of a running pretraining."""
    from ..config import to_dict

    data = getattr(cfg, "data", None)
    meta = _metadata(to_dict(cfg.model), to_dict(cfg.augment), step, to_dict(data) if data is not None else None)
    return _save(teacher.backbone.vit.state_dict(), meta, out)


def find_model_states(ckpt_dir: str | os.PathLike) -> Path:
    """The DeepSpeed model-states file of a run folder, its ``checkpoints/`` folder, or one tag folder."""
    d = Path(ckpt_dir)
    for root in (d / "checkpoints", d):
        latest = root / "latest"
        if latest.is_file():
            return root / latest.read_text().strip() / MODEL_STATES
    if (d / MODEL_STATES).is_file():
        return d / MODEL_STATES
    raise FileNotFoundError(f"{d}: no checkpoint found (expected checkpoints/latest, latest, or {MODEL_STATES})")


def export_checkpoint(ckpt_dir: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Export the teacher backbone stored in a pretraining checkpoint (no DeepSpeed, no process group)."""
    path = find_model_states(ckpt_dir)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if "teacher" not in state or "config" not in state:
        raise ValueError(f"{path} is not an icehpc pretraining checkpoint (no teacher/config client state)")
    teacher = {k[len(_TEACHER_PREFIX):]: v for k, v in state["teacher"].items() if k.startswith(_TEACHER_PREFIX)}
    meta = _metadata(state["config"]["model"], state["config"]["augment"], int(state["step"]), state["config"].get("data"))
    return _save(teacher, meta, out)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a ``.safetensors`` header (``{}`` for any other checkpoint file)."""
    if not str(path).endswith(".safetensors"):
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_backbone(path: str | os.PathLike, device: str | torch.device = "cpu") -> torch.nn.Module:
    """timm ViT with the exported weights (strict), in eval mode; see the module docstring for inputs."""
    import timm
    from safetensors.torch import load_file

    meta = read_metadata(path)
    if meta.get("format") != "timm":
        raise ValueError(f"{path}: not an icehpc backbone export (metadata format={meta.get('format')!r})")
    model = timm.create_model(meta["arch"], pretrained=False, **json.loads(meta["timm_kwargs"]))
    model.load_state_dict(load_file(str(path), device="cpu"))
    return model.to(device).eval()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ckpt_dir", help="pretraining run folder, its checkpoints/ folder, or one step-* tag folder")
    parser.add_argument("--out", required=True, help="output .safetensors path")


def run(args: argparse.Namespace) -> int:
    out = export_checkpoint(args.ckpt_dir, args.out)
    meta = read_metadata(out)
    print(f"exported teacher backbone ({meta['arch']}, step {meta['step']}) to {out}")
    return 0
