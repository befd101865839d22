"""``icehpc export CKPT_DIR --out backbone.safetensors``: the teacher backbone as a plain timm state_dict.

The embedding job (and any user) needs only timm: the file holds the ``VisionTransformer`` tensors
under timm's own key names, and its safetensors metadata says how to build the model and feed it:
``arch``, ``timm_kwargs`` (JSON, includes ``in_chans=1``), ``input_size`` (the side to embed at:
``augment.eval_size``, else the global crop side ``input_train_size``), ``input_mean``,
``input_std`` (pixels are ``(uint8/255 − mean)/std``), ``step``, and the decoding of pretraining:
``input_canvas``, ``input_framing`` (none | bbox), ``input_framing_margin``. This module is the one
reader and writer of that file: :func:`backbone_spec` reads the header, :func:`build_backbone` builds
the ViT (also from other local timm/DINO/iBOT checkpoints, or seeded random init), and
:func:`load_backbone` does both for an export. Pretraining calls :func:`export_teacher` itself when a
run completes. Importing this module does not import torch (``icehpc embed --help`` stays fast).
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..fileio import file_sha256
from .config import AugmentConfig

_TEACHER_PREFIX = "backbone.vit."

if TYPE_CHECKING:
    import torch


def _metadata(model_cfg: dict[str, Any], augment_cfg: dict[str, Any], step: int,
              data_cfg: dict[str, Any] | None = None) -> dict[str, str]:
    from .config import ModelConfig
    from .model import timm_kwargs

    mc = ModelConfig(**model_cfg)
    size = int(augment_cfg["global_size"])  # the position-embedding grid of the weights
    return {"format": "timm", "source": "icehpc pretrain teacher", "arch": mc.arch,
            "timm_kwargs": json.dumps(timm_kwargs(mc, size)), "input_train_size": str(size),
            "input_size": str(int(augment_cfg.get("eval_size") or size)),
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


def export_checkpoint(ckpt_dir: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Export the teacher backbone stored in a pretraining checkpoint (no DeepSpeed, no process group).

    The tag is verified against its sha256 manifest first (:func:`icehpc.ssl.checkpoint.model_states`):
    a tag that resume would reject is refused (:class:`~icehpc.ssl.checkpoint.CheckpointError`)."""
    from .checkpoint import model_states

    path = model_states(ckpt_dir)
    import torch

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


DEFAULT_ARCH = "vit_small_patch16_224"
#: Input normalisation of a checkpoint whose header does not state it: the pretraining default.
DEFAULT_MEAN, DEFAULT_STD = AugmentConfig.mean, AugmentConfig.std


@dataclass(frozen=True)
class BackboneSpec:
    """What defines the embeddings: architecture, timm kwargs, weights and input normalisation."""

    arch: str
    timm_kwargs: dict[str, Any]
    img_size: int
    mean: float
    std: float
    weights: str  # checkpoint path, or "random-init(seed=S)"
    weights_sha256: str
    canvas: int | None = None  # decode canvas of pretraining (export header), None: not recorded
    framing: str = "none"      # particle framing of pretraining (none | bbox), from the export header
    framing_margin: float = 0.1


def backbone_spec(checkpoint: str | None, arch: str | None, img_size: int | None, seed: int,
                  like: str | None = None) -> BackboneSpec:
    """Resolve the backbone from an exported file's header, else from ``arch``/``img_size``.

    ``icehpc export`` records the timm architecture, its kwargs, input size and the pretraining
    normalisation (``arch``, ``timm_kwargs``, ``input_size``, ``input_mean``, ``input_std``) in the
    safetensors header; a plain timm checkpoint needs ``arch`` (default ViT-S/16). ``like`` (an
    export) takes only that header, for a random-init baseline of exactly the trained shape.
    """
    header_source = checkpoint or like
    meta = read_metadata(header_source) if header_source else {}
    file_arch = meta.get("arch")
    if arch and file_arch and arch != file_arch:
        raise ValueError(f"--model {arch} but {header_source} holds a {file_arch} backbone; drop --model")
    kwargs = json.loads(meta.get("timm_kwargs", "{}"))
    for fixed in ("in_chans", "num_classes", "img_size", "dynamic_img_size"):  # set by build_backbone
        kwargs.pop(fixed, None)
    size = img_size or int(meta.get("input_size", 0)) or 224
    return BackboneSpec(arch=arch or file_arch or DEFAULT_ARCH, timm_kwargs=kwargs, img_size=size,
                        mean=float(meta.get("input_mean", DEFAULT_MEAN)),
                        std=float(meta.get("input_std", DEFAULT_STD)),
                        weights=checkpoint or f"random-init(seed={seed})",
                        weights_sha256=file_sha256(checkpoint) if checkpoint else "",
                        canvas=int(meta["input_canvas"]) if "input_canvas" in meta else None,
                        framing=meta.get("input_framing", "none"),
                        framing_margin=float(meta.get("input_framing_margin", 0.1)))


def build_backbone(spec: BackboneSpec, seed: int):
    """A grayscale timm ViT (model.py's convention: in_chans=1, RGB checkpoints folded) in eval mode.

    A random-init backbone is seeded, so every rank builds the same network.
    """
    import timm
    import torch
    from timm.models.vision_transformer import VisionTransformer

    from .model import MaskedViT, load_backbone_weights

    torch.manual_seed(seed)
    vit = timm.create_model(spec.arch, pretrained=False, in_chans=1, num_classes=0, img_size=spec.img_size,
                            dynamic_img_size=True, **spec.timm_kwargs)
    if not isinstance(vit, VisionTransformer) or vit.cls_token is None:
        raise ValueError(f"--model {spec.arch}: need a timm VisionTransformer with a [CLS] token")
    if spec.weights_sha256:
        load_backbone_weights(MaskedViT(vit), spec.weights)
    return vit.eval()


def load_backbone(path: str | os.PathLike, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The exported backbone as a timm ViT in eval mode (:func:`build_backbone` of its header)."""
    if read_metadata(path).get("format") != "timm":
        raise ValueError(f"{path}: not an icehpc backbone export (no timm format in its header)")
    return build_backbone(backbone_spec(str(path), None, None, seed=0), seed=0).to(device)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ckpt_dir", help="pretraining run folder, its checkpoints/ folder, or one step-* tag folder")
    parser.add_argument("--out", required=True, help="output .safetensors path")


def run(args: argparse.Namespace) -> int:
    out = export_checkpoint(args.ckpt_dir, args.out)
    meta = read_metadata(out)
    print(f"exported teacher backbone ({meta['arch']}, step {meta['step']}) to {out}")
    return 0
