"""Typed configuration of ``icehpc pretrain`` (every section of the YAML), without importing torch.

``icehpc pretrain --help``, ``icehpc pipeline --plan`` and the job scripts read these on a login
node, so this module imports only the standard library and :mod:`icehpc.config`.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from ..config import field

#: The files a pretraining run writes beside its checkpoints (``out``): the resolved config and the
#: per-step metrics (the trainer writes them; the report reads them).
RUN_CONFIG = "config.yaml"
METRICS = "metrics.jsonl"


def _check_finite(section: Any) -> None:
    """Every float (and list of floats) of a section is finite: NaN passes every ``<`` test silently."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise ValueError(f"{f.name} must be finite, got {value}")


@dataclass
class ModelConfig:
    arch: str = field("vit_small_patch16_224", help="timm ViT architecture name (no weights are downloaded)")
    arch_kwargs: dict[str, Any] = field({}, help="extra timm kwargs, e.g. {embed_dim: 64, depth: 2, patch_size: 4}")
    drop_path: float = field(0.1, help="stochastic depth rate of the student (teacher: 0)")
    head_hidden: int = field(2048, help="hidden width of the head MLP")
    head_bottleneck: int = field(256, help="bottleneck dimension p of the L2-normalised head output")
    n_prototypes: int = field(8192, help="number of vMF prototypes K")
    prototype_init_norm: float = field(1.0, help="initial ‖w_k‖ (1 = iBOT's normalised layer at start)")
    prototype_param: str = field("weightnorm", help="weightnorm: w_k = g_k·v_k/‖v_k‖ (reference head; no decay "
                                                    "on g = κτ) | plain: w_k one decayed tensor")
    shared_head: bool = field(True, help="one head for [CLS] and patch tokens (iBOT default)")

    def validate(self) -> None:
        _check_finite(self)
        if not 0 <= self.drop_path < 1:
            raise ValueError(f"drop_path must be in [0, 1), got {self.drop_path}")
        if min(self.head_hidden, self.head_bottleneck, self.n_prototypes) < 2:
            raise ValueError("head_hidden, head_bottleneck and n_prototypes must be >= 2")
        if self.prototype_init_norm <= 0:
            raise ValueError("prototype_init_norm must be > 0")
        if self.prototype_param not in ("weightnorm", "plain"):
            raise ValueError(f"prototype_param must be weightnorm or plain, got {self.prototype_param!r}")


@dataclass
class InitConfig:
    path: str | None = field(None, help="LOCAL timm/DINO/iBOT checkpoint (.pth/.pt/.safetensors) to start the backbone from")


@dataclass
class AugmentConfig:
    global_size: int = field(224, help="side of the 2 global crops (pixels)")
    global_scale: list[float] = field([0.25, 1.0], help="area fraction range of the global crops")
    local_size: int = field(96, help="side of the local crops (pixels)")
    local_scale: list[float] = field([0.05, 0.25], help="area fraction range of the local crops")
    eval_size: int | None = field(None, help="side the exported backbone embeds whole canvases at (its header's "
                                             "input_size; default global_size). Random-resized global crops "
                                             "magnify the particle, so a larger side can match what training saw "
                                             "(test-time resolution; README Science checks)")
    n_local: int = field(10, help="number of local crops per image")
    aspect_ratio: list[float] = field([0.8, 1.25], help="width/height range of crops (log-uniform)")
    hflip_p: float = field(0.5, help="probability of a horizontal flip")
    vflip_p: float = field(0.5, help="probability of a vertical flip")
    jitter_p: float = field(0.8, help="probability of brightness/contrast jitter")
    brightness: float = field(0.4, help="brightness factor drawn from [1-b, 1+b]")
    contrast: float = field(0.4, help="contrast factor drawn from [1-c, 1+c]")
    blur_p: list[float] = field([1.0, 0.1, 0.5], help="blur probability: global 1, global 2, locals")
    blur_sigma: list[float] = field([0.1, 2.0], help="Gaussian blur sigma range (output pixels)")
    solarize_p: list[float] = field([0.0, 0.2, 0.0], help="solarisation probability: global 1, global 2, locals")
    mean: float = field(0.449, help="normalisation mean (ImageNet RGB means averaged, fits folded weights)")
    std: float = field(0.226, help="normalisation std")
    mask_prob: float = field(0.5, help="probability that a student global view is masked at all (iBOT: 0.5)")
    mask_ratio: list[float] = field([0.1, 0.5], help="masked patch fraction range of a masked view (iBOT: 0.1-0.5)")
    mask_min_patches: int = field(16, help="smallest masking block in patches on a 14×14 grid (iBOT: 16); "
                                           "scaled by grid area / 196 for other grids (at least 1)", ge=1)
    mask_aspect: list[float] = field([0.3, 3.3333], help="masking block aspect ratio range (log-uniform)")
    mask_candidates: int = field(32, help="candidate blocks drawn per image (vectorised BEiT masking)", ge=1)

    def validate(self) -> None:
        _check_finite(self)
        for name in ("global_scale", "local_scale", "aspect_ratio", "blur_sigma", "mask_ratio", "mask_aspect"):
            lo_hi = getattr(self, name)
            if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1]:
                raise ValueError(f"{name} must be [low, high] with 0 < low <= high, got {lo_hi}")
        if self.global_scale[1] > 1 or self.local_scale[1] > 1 or self.mask_ratio[1] > 1:
            raise ValueError("crop scales and mask ratios are fractions and must be <= 1")
        if len(self.blur_p) != 3 or len(self.solarize_p) != 3:
            raise ValueError("blur_p and solarize_p take 3 values: global 1, global 2, locals")
        if not 0 <= self.mask_prob <= 1:
            raise ValueError(f"mask_prob must be in [0, 1], got {self.mask_prob}")
        if self.n_local < 0 or self.global_size < 1 or self.local_size < 1:
            raise ValueError("n_local must be >= 0 and crop sizes >= 1")
        if self.eval_size is not None and self.eval_size < 1:
            raise ValueError(f"eval_size must be >= 1 (or null = global_size), got {self.eval_size}")


@dataclass
class DataConfig:
    shards: str = field("shards/train", help="shard folder written by `icehpc shards build` (index.json inside)")
    canvas: int = field(256, help="decoded square canvas side (pixels); crops are taken from it")
    batch_size: int = field(64, help="images per rank per step (global batch = this × ranks)")
    num_workers: int = field(4, help="decoding DataLoader workers per rank")
    batches_per_epoch: int | None = field(None, help="steps per epoch (default: shard total // global batch)")
    framing: str = field("bbox", help="bbox: crop each particle to its bounding box + margin, resize to the canvas "
                                      "(aspect kept); none: shrink-to-fit only (recorded in the export for embed)")
    framing_margin: float = field(0.1, help="bbox margin on each side, as a fraction of the box's longest side")

    def validate(self) -> None:
        if self.framing not in ("none", "bbox"):
            raise ValueError(f"data.framing must be none or bbox, got {self.framing!r}")
        if not 0 <= self.framing_margin <= 2:
            raise ValueError("data.framing_margin must be in [0, 2]")
        if self.canvas < 1:
            raise ValueError(f"canvas must be >= 1 pixel, got {self.canvas}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0 (0 = decode in the training process), got {self.num_workers}")
        if self.batches_per_epoch is not None and self.batches_per_epoch < 1:
            raise ValueError(f"batches_per_epoch must be >= 1 or null, got {self.batches_per_epoch}")


LOSS_BACKENDS = ("auto", "torch", "triton", "chunked")  # = kernels.BACKENDS (a test keeps them equal;
# not imported from there so that reading a config imports no torch)


@dataclass
class LossConfig:
    lambda_cls: float = field(1.0, help="weight of the DINO [CLS] loss")
    lambda_patch: float = field(1.0, help="weight of the iBOT masked-patch loss")
    lambda_koleo: float = field(0.0, help="weight of the KoLeo spreading term on the student's global-view "
                                          "backbone [CLS] (DINOv2 uses 0.1); 0 = off")
    student_temp: float = field(0.1, help="student temperature τ_s")
    teacher_temp: float = field(0.04, help="teacher temperature at the start of warm-up")
    teacher_temp_final: float = field(0.07, help="teacher temperature after warm-up")
    teacher_temp_warmup_epochs: float = field(30.0, help="epochs of linear teacher temperature warm-up")
    center_momentum: float = field(0.9, help="EMA momentum of the [CLS] and patch centres")
    centering: str = field("auto", help="teacher centring: auto (probability with vmf, else logit) | logit (DINO) | "
                                        "probability (DINO-vMF: keeps the vMF κ term, which logit centring cancels)")
    vmf: bool = field(True, help="add log C_p(‖w_k‖/τ) to the logits (iBOT-vMF); false = plain iBOT")
    backend: str = field("auto", help="vmf_xent backend: auto | torch | triton | chunked (rows in chunks, "
                                      "logits by GEMM: no N×K tensor, any D). auto = triton on CUDA when D <= 256, "
                                      "else torch (today's default, kept until a GPU measures chunked against it)")
    usage_threshold: float = field(0.1, help="a prototype is 'used' when its mean teacher probability ≥ this / K")

    def validate(self) -> None:
        _check_finite(self)
        if min(self.student_temp, self.teacher_temp, self.teacher_temp_final) <= 0:
            raise ValueError("temperatures must be > 0")
        if not 0 <= self.center_momentum < 1:
            raise ValueError("center_momentum must be in [0, 1)")
        if min(self.lambda_cls, self.lambda_patch, self.lambda_koleo) < 0:
            raise ValueError("loss weights (lambda_*) must be >= 0")
        if self.backend not in LOSS_BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(LOSS_BACKENDS)}, got {self.backend!r}")
        if self.centering not in ("auto", "logit", "probability"):
            raise ValueError(f"centering must be auto, logit or probability, got {self.centering!r}")


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
        _check_finite(self)
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.min_lr < 0:
            raise ValueError(f"min_lr must be >= 0, got {self.min_lr}")
        for name in ("warmup_epochs", "weight_decay", "weight_decay_end", "freeze_last_layer_epochs"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.clip_grad < 0:
            raise ValueError(f"clip_grad must be >= 0 (0 = off), got {self.clip_grad}")
        if not 0 <= self.momentum_teacher <= self.momentum_teacher_end <= 1:
            raise ValueError("need 0 <= momentum_teacher <= momentum_teacher_end <= 1")
        if len(self.betas) != 2:
            raise ValueError("betas takes two values")


@dataclass
class EngineConfig:
    device: str = field("auto", help="auto (cuda when available) | cpu | cuda")
    precision: str = field("auto", help="auto (bf16 on cuda, fp32 on cpu) | bf16 | fp32; bf16 = autocast, fp32 master weights")
    zero_stage: int = field(1, help="DeepSpeed ZeRO stage (0, 1 or 2). 0 = no optimizer sharding (one node: "
                                     "ViT-S needs none, and ZeRO-1's 5e8-element buckets reserve ~4 GB); the "
                                     "default stays 1 until a GPU measures 0 faster (bench/pretrain.py "
                                     "engine.zero_stage=0)")
    threads: int | None = field(None, help="torch CPU threads per rank (default: OMP_NUM_THREADS / torch default)",
                                 ge=1)

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
    seed: int = field(0, help="seed of initialisation, data order, augmentation and drop-path", ge=0)
    checkpoint_every: int = field(500, help="save a checkpoint every N steps (and always at the end)")
    keep_checkpoints: int = field(2, help="how many step checkpoints to keep")
    stop_at_step: int | None = field(None, help="save and stop once this global step is done (time-boxed allocations)",
                                      ge=1)
    progress: bool = field(True, help="progress on rank 0: a bar on a terminal, plain log lines otherwise")
    metrics_every: int = field(0, help="read and log metrics every N steps (a read waits for the GPU); "
                                       "0 = auto: 1 on CPU, 20 on CUDA")
    export: bool = field(True, help="write backbone.safetensors (teacher) when the run completes")
    collapse_patience: int = field(50, help="stop (checkpoint kept, exit 4) when the teacher [CLS] entropy has "
                                            "signalled collapse for this many consecutive steps; 0 = never")
    collapse_uniform_margin: float = field(0.01, help="uniform collapse: entropy within this fraction of ln K")
    collapse_min_entropy: float = field(0.1, help="one-prototype collapse: entropy below this (nats)")

    def validate(self) -> None:
        _check_finite(self)
        if self.metrics_every < 0:
            raise ValueError("metrics_every must be >= 0 (0 = auto)")
        if self.epochs <= 0 or self.checkpoint_every < 1 or self.keep_checkpoints < 1:
            raise ValueError("epochs must be > 0, checkpoint_every and keep_checkpoints >= 1")
        if self.collapse_patience < 0 or not 0 <= self.collapse_uniform_margin < 1 or self.collapse_min_entropy < 0:
            raise ValueError("collapse_patience >= 0, collapse_uniform_margin in [0, 1), collapse_min_entropy >= 0")


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

    def validate(self) -> None:
        if self.loss.lambda_koleo > 0 and self.data.batch_size < 2:
            raise ValueError("loss.lambda_koleo > 0 needs data.batch_size >= 2 (KoLeo compares the images of a rank's batch)")


