"""iBOT-vMF network: a grayscale timm ViT with a mask token, and the vMF prototype head.

The backbone stays a stock timm ``VisionTransformer`` (``self.vit``) so the exported teacher is a
plain timm ``state_dict`` that ``timm.create_model(arch, in_chans=1, num_classes=0, ...)`` loads.
Grayscale: the model is built with ``in_chans=1``; 3-channel checkpoints are folded by summing the
patch-embedding weights over RGB (timm's ``adapt_input_conv``), which is exactly the RGB model seen
on a gray image replicated to 3 channels (up to the per-channel normalisation constants).

The head returns the L2-normalised bottleneck z and the UNnormalised prototypes w_k; the loss op
(``icehpc.ssl.kernels.vmf_xent``) forms the logits ``w_k·z/τ + log C_p(‖w_k‖/τ)``, so ‖w_k‖ acts as a
per-prototype concentration κ_k·τ.
"""
from __future__ import annotations

import logging
import os
import pickle
from dataclasses import dataclass
from typing import Any

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import adapt_input_conv
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from ..config import UserError
from .config import ModelConfig

log = logging.getLogger(__name__)

#: Prefixes that DINO/iBOT/DDP checkpoints wrap backbone keys in.
_KEY_PREFIXES = ("module.", "backbone.", "teacher.", "student.", "model.", "encoder.")
#: Names DINO/iBOT/DINOv2 use for the mask token.
_MASK_TOKEN_KEYS = ("masked_embed", "mask_token")


def timm_kwargs(cfg: ModelConfig, img_size: int) -> dict[str, Any]:
    """The ``timm.create_model`` kwargs of the backbone (also stored in the exported file)."""
    return {"in_chans": 1, "num_classes": 0, "img_size": img_size, "dynamic_img_size": True,
            **cfg.arch_kwargs}


class MaskedViT(nn.Module):
    """timm ViT whose patch embeddings can be replaced by a learnable mask token (iBOT)."""

    def __init__(self, vit: VisionTransformer) -> None:
        super().__init__()
        self.vit = vit
        self.mask_token = nn.Parameter(torch.zeros(vit.embed_dim))
        self.patch_size = int(vit.patch_embed.patch_size[0])
        self.num_prefix_tokens = int(vit.num_prefix_tokens)

    def forward(self, images: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """images [B, 1, H, W] → tokens [B, prefix + Hp*Wp, D] after the final norm.

        ``masks`` [B, Hp*Wp] bool: patches to replace by the mask token (before position embeddings).
        """
        vit = self.vit
        x = vit.patch_embed(images)  # [B, Hp, Wp, D] (dynamic_img_size keeps the grid)
        if masks is not None:
            grid_mask = masks.view(x.shape[0], x.shape[1], x.shape[2], 1)
            x = torch.where(grid_mask, self.mask_token.to(x.dtype), x)
        x = vit._pos_embed(x)
        x = vit.patch_drop(x)
        x = vit.norm_pre(x)
        x = vit.blocks(x)
        return vit.norm(x)


class VMFHead(nn.Module):
    """MLP (in → hidden → hidden → p, GELU) + L2 norm, and K unnormalised vMF prototypes [K, p].

    ``param="weightnorm"`` (the iBOT/DINO reference head): w_k = g_k·v_k/‖v_k‖, so the optimiser
    moves a direction v_k and a norm g_k (= κ_k·τ) separately, and weight decay shrinks v (harmless
    to w) but never g. ``param="plain"``: w_k is one free tensor, and AdamW with weight decay act on
    ‖w_k‖ = κ_k·τ directly.
    """

    def __init__(self, in_dim: int, hidden: int, bottleneck: int, n_prototypes: int, init_norm: float,
                 param: str = "weightnorm") -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        directions = F.normalize(torch.randn(n_prototypes, bottleneck), dim=1)
        self.param = param
        if param == "weightnorm":
            self.prototype_v = nn.Parameter(directions.clone())
            self.prototype_g = nn.Parameter(torch.full((n_prototypes,), float(init_norm)))
        elif param == "plain":
            self.prototypes_plain = nn.Parameter(directions * init_norm)
        else:
            raise ValueError(f"model.prototype_param must be weightnorm or plain, got {param!r}")

    @property
    def prototypes(self) -> torch.Tensor:
        """[K, p] prototypes w_k (‖w_k‖/τ is the concentration κ_k)."""
        if self.param == "weightnorm":
            return self.prototype_g[:, None] * F.normalize(self.prototype_v, dim=1, eps=1e-12)
        return self.prototypes_plain

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [N, D] → z [N, p], L2-normalised."""
        return F.normalize(self.mlp(tokens), dim=-1, eps=1e-6)


#: Parameter-name endings of the prototype layer ("last layer": frozen at first, own optimiser groups).
PROTOTYPE_DIRECTIONS = ("prototype_v", "prototypes_plain")
PROTOTYPE_NORMS = ("prototype_g",)


@dataclass
class HeadOut:
    """cls_z [n_crops*B, p] (view-major), patch_z [N_masked, p], prototypes [K, p] for each loss;
    cls_tokens [n_crops*B, D]: the backbone's [CLS] before the head (the KoLeo term reads them)."""

    cls_z: torch.Tensor
    patch_z: torch.Tensor
    cls_prototypes: torch.Tensor
    patch_prototypes: torch.Tensor
    cls_tokens: torch.Tensor | None = None


class IBOTVMF(nn.Module):
    """Backbone + head(s). The same class serves as student (masks applied) and teacher (not)."""

    def __init__(self, backbone: MaskedViT, head: VMFHead, patch_head: VMFHead | None) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.patch_head = patch_head

    def forward(self, globals_: torch.Tensor, masks: torch.Tensor, locals_: torch.Tensor | None = None,
                apply_mask: bool = True, mask_index: torch.Tensor | None = None) -> HeadOut:
        """globals_ [2B,1,G,G], masks [2B, Hp*Wp] bool, locals_ [nB,1,L,L] or None.

        ``apply_mask`` (student) replaces masked patches by the mask token; the teacher passes False
        and only uses ``masks`` to pick the patch tokens the iBOT loss compares. ``mask_index``
        (optional, ``Crops.mask_index``): the flat positions of ``masks``, so that picking them
        needs no device→host read (boolean indexing does one).
        """
        prefix = self.backbone.num_prefix_tokens
        tokens = self.backbone(globals_, masks if apply_mask else None)
        cls = [tokens[:, 0]]
        if locals_ is not None and locals_.shape[0]:
            cls.append(self.backbone(locals_)[:, 0])
        cls_tokens = torch.cat(cls)
        patch = tokens[:, prefix:]
        patch_tokens = (patch.flatten(0, 1).index_select(0, mask_index) if mask_index is not None
                        else patch[masks])  # only masked patches enter the head
        if self.patch_head is None:
            z = self.head(torch.cat([cls_tokens, patch_tokens]))
            cls_z, patch_z = z[: cls_tokens.shape[0]], z[cls_tokens.shape[0]:]
            protos = self.head.prototypes
            return HeadOut(cls_z, patch_z, protos, protos, cls_tokens)
        return HeadOut(self.head(cls_tokens), self.patch_head(patch_tokens), self.head.prototypes,
                       self.patch_head.prototypes, cls_tokens)

    def prototype_names(self) -> list[str]:
        """Parameter names of the prototype layer(s): the 'last layer' that stays frozen at first."""
        return [n for n, _ in self.named_parameters() if n.endswith(PROTOTYPE_DIRECTIONS + PROTOTYPE_NORMS)]

    def prototype_heads(self) -> dict[str, VMFHead]:
        """{"head": …, "patch_head": …} (the latter only with separate heads)."""
        return {"head": self.head, **({"patch_head": self.patch_head} if self.patch_head is not None else {})}


def build_model(cfg: ModelConfig, img_size: int, drop_path: float | None = None) -> IBOTVMF:
    """Randomly initialised iBOT-vMF network (``drop_path`` overrides cfg.drop_path, e.g. 0 for the teacher)."""
    rate = cfg.drop_path if drop_path is None else drop_path
    vit = timm.create_model(cfg.arch, pretrained=False, drop_path_rate=rate, **timm_kwargs(cfg, img_size))
    if not isinstance(vit, VisionTransformer):
        raise ValueError(f"model.arch={cfg.arch} is not a timm VisionTransformer")
    backbone = MaskedViT(vit)

    def make_head() -> VMFHead:
        return VMFHead(vit.embed_dim, cfg.head_hidden, cfg.head_bottleneck, cfg.n_prototypes, cfg.prototype_init_norm,
                       cfg.prototype_param)

    head = make_head()
    return IBOTVMF(backbone, head, None if cfg.shared_head else make_head())


#: Largest network (student parameters) a config may ask for: 2·10⁹ fp32 parameters are 8 GB before
#: the teacher, the optimizer state and the activations. Checked on the meta device, nothing allocated.
MAX_MODEL_PARAMS = 2_000_000_000


def check_model_size(cfg: ModelConfig, img_size: int, limit: int = MAX_MODEL_PARAMS) -> int:
    """The student's parameter count, counted without allocating (torch's meta device); a
    ConfigError naming the keys when timm cannot build it or it exceeds ``limit``."""
    from ..config import ConfigError

    try:
        with torch.device("meta"):
            n = sum(p.numel() for p in build_model(cfg, img_size).parameters())
    except Exception as exc:  # noqa: BLE001 - timm's own checks (e.g. embed_dim % num_heads): one line
        raise ConfigError(f"model.arch={cfg.arch} with model.arch_kwargs={cfg.arch_kwargs}: timm cannot build "
                          f"it ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    if n > limit:
        raise ConfigError(f"model: {n:,} parameters (model.arch={cfg.arch}, model.arch_kwargs={cfg.arch_kwargs}, "
                          f"head {cfg.head_hidden}/{cfg.head_bottleneck}/{cfg.n_prototypes}) exceed the limit of "
                          f"{limit:,}; choose a smaller model")
    return n


class RefusedCheckpoint(UserError, pickle.UnpicklingError):
    """A torch checkpoint holding pickled objects that are not tensors: refused (one line for the CLI)."""


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a local checkpoint file, unwrapped to the backbone's key layout.

    Accepts timm state_dicts, DINO/iBOT full checkpoints (``teacher`` → ``backbone.*``) and their
    ``state_dict``/``model``/``module`` wrappers; ``.safetensors`` or torch files, the latter with
    ``weights_only=True`` (a checkpoint from elsewhere must not run code).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"init.path {path} does not exist (weights are never downloaded)")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state: Any = load_file(path, device="cpu")
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:  # torch's message is a dozen lines of advice: one line instead
            why = next((ln.strip() for ln in str(exc).splitlines() if "GLOBAL" in ln or "Unsupported" in ln),
                       "not a tensor container")
            raise RefusedCheckpoint(f"checkpoint {path}: refused, the file holds Python objects besides tensors "
                                    f"({why[:160]}) and loading them could run code; save a plain state_dict of "
                                    "tensors or a .safetensors file") from None
    for wrapper in ("teacher", "state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise ValueError(f"init.path {path}: expected a dict of tensors, got {type(state).__name__}")
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        stripped = True
        while stripped:
            stripped = False
            for prefix in _KEY_PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix):], True
        out[key] = value
    return out


def load_backbone_weights(backbone: MaskedViT, path: str | os.PathLike) -> list[str]:
    """Initialise ``backbone`` from a local checkpoint; returns the loaded parameter names.

    Position embeddings are resampled (timm's filter) when the checkpoint's grid differs, RGB patch
    embeddings are folded to one channel, and the mask token is taken from iBOT's ``masked_embed``
    (or DINOv2's ``mask_token``) when present. Projection heads in the file are ignored; any
    missing or mis-shaped backbone tensor is an error naming it.
    """
    state = read_checkpoint(path)
    mask_token = next((state[k] for k in _MASK_TOKEN_KEYS if k in state), None)
    vit = backbone.vit
    state = checkpoint_filter_fn(state, vit)
    w = state.get("patch_embed.proj.weight")
    if w is not None and w.dim() == 4 and w.shape[1] != vit.patch_embed.proj.in_channels:
        state["patch_embed.proj.weight"] = adapt_input_conv(vit.patch_embed.proj.in_channels, w)
    own = vit.state_dict()
    missing = [k for k in own if k not in state]
    if missing:
        raise ValueError(f"init.path {path}: backbone tensors missing from the file: {missing[:8]}"
                         f"{' …' if len(missing) > 8 else ''} (is it a {type(vit).__name__} of this size?)")
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if state[k].shape != v.shape]
    if wrong:
        raise ValueError(f"init.path {path}: shape mismatch (file vs model): {wrong[:8]}")
    vit.load_state_dict({k: state[k].to(v.dtype) for k, v in own.items()})
    loaded = [f"vit.{k}" for k in own]
    if mask_token is not None and mask_token.numel() == backbone.mask_token.numel():
        with torch.no_grad():
            backbone.mask_token.copy_(mask_token.reshape(-1))
        loaded.append("mask_token")
    log.info("initialised backbone from %s (%d tensors)", path, len(loaded))
    return loaded
