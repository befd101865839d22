"""The iBOT-vMF objective: DINO [CLS] loss across views + iBOT masked-patch loss, both through
:func:`icehpc.ssl.kernels.vmf_xent`, with the teacher centres they own and update."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import LossConfig
from .model import HeadOut


def cls_pairs(batch: int, n_local: int, device: torch.device) -> torch.Tensor:
    """Teacher rows [(2+n_local)·B, 2] each student [CLS] row is compared with (−1 = none).

    Rows are view-major (row v·B + b is view v of image b). A student global view meets the OTHER
    teacher global view of its image; a local view meets both.
    """
    b = torch.arange(batch, device=device)
    rows = [torch.stack([batch + b, torch.full_like(b, -1)], 1), torch.stack([b, torch.full_like(b, -1)], 1)]
    rows += [torch.stack([b, batch + b], 1)] * n_local
    return torch.cat(rows)


def patch_weights(masks: torch.Tensor, mask_index: torch.Tensor | None = None) -> torch.Tensor:
    """Weight 1/(#masked patches of its image) per selected patch row, in ``tokens[masks]`` order,
    so the patch loss is a mean over images of per-image means (iBOT). With ``mask_index`` (the
    flat positions of ``masks``) the output size is known on the host: no device→host read."""
    counts = masks.sum(1).clamp(min=1).float()
    if mask_index is not None:
        return (1.0 / counts).index_select(0, mask_index // masks.shape[1])
    return (1.0 / counts).repeat_interleave(masks.sum(1))



CENTERINGS = ("logit", "probability")


def resolve_centering(centering: str, vmf: bool) -> str:
    """``auto`` → probability centring with vMF (DINO-vMF), logit centring without (DINO/iBOT)."""
    if centering == "auto":
        return "probability" if vmf else "logit"
    if centering not in CENTERINGS:
        raise ValueError(f"loss.centering must be auto, logit or probability, got {centering!r}")
    return centering


class Centres:
    """The teacher centres of the [CLS] and patch losses, owned here with their update rule.

    ``logit`` (DINO, iBOT): each centre c is an EMA (``momentum``) of the batch-mean teacher logits
    l = z·w/τ_t + b (b = log C_p(‖w‖/τ_t) with vMF); targets are softmax(l − c). Because b[k] is a
    per-prototype constant it is absorbed into c: at equilibrium the vMF term cancels exactly.

    ``probability`` (DINO-vMF, Govindarajan et al. 2024): each centre c is an EMA of the batch-mean
    *uncentred* teacher probabilities softmax(l) [K] (starting uniform, 1/K); targets are the
    probabilities divided by c and renormalised, softmax(l − log c). The per-row normaliser of
    softmax(l) does not cancel in the batch mean, so b (the prototypes' κ) keeps acting on the
    targets, and a prototype's target mass is damped in proportion to how much it already gets.

    The centre statistics are all-reduced by the caller (batch means over all ranks).
    """

    def __init__(self, k: int, momentum: float, device: torch.device | str = "cpu", mode: str = "logit") -> None:
        if mode not in CENTERINGS:
            raise ValueError(f"centring mode must be one of {CENTERINGS}, got {mode!r}")
        self.momentum = momentum
        self.mode = mode
        init = 1.0 / k if mode == "probability" else 0.0
        self.cls = torch.full((k,), init, device=device)
        self.patch = torch.full((k,), init, device=device)

    def offset(self, which: str) -> torch.Tensor:
        """[K] subtracted from the teacher logits before the softmax (the op's ``center``)."""
        c = self.cls if which == "cls" else self.patch
        if self.mode == "probability":
            return torch.log(c.clamp(min=1e-30))
        return c

    @torch.no_grad()
    def update(self, cls_mean: torch.Tensor, patch_mean: torch.Tensor,
               patch_rows: torch.Tensor | None = None) -> None:
        """EMA step with the all-reduced batch means (logits or uncentred probabilities, per mode).
        ``patch_rows`` (device scalar, the global masked-patch count): when it is 0 the patch centre
        stays as is, decided on the device (no host read)."""
        m = self.momentum
        self.cls.mul_(m).add_(cls_mean, alpha=1 - m)
        if patch_rows is not None:
            patch_mean = torch.where(patch_rows > 0, patch_mean, self.patch)
        self.patch.mul_(m).add_(patch_mean, alpha=1 - m)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"centre_cls": self.cls, "centre_patch": self.patch}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.cls.copy_(state["centre_cls"])
        self.patch.copy_(state["centre_patch"])


def prototype_biases(student: HeadOut, teacher: HeadOut, tau_s: float, tau_t: float,
                     vmf: bool) -> tuple[torch.Tensor | None, ...]:
    """vMF biases log C_p(‖w_k‖/τ) (cls student, cls teacher, patch student, patch teacher), each
    prototype set evaluated ONCE per step: a head shared by both losses gives one student and one
    teacher evaluation, and teacher_entropy reuses the teacher's. From the prototypes as the head
    returns them (fp32 master weights); the student's stay differentiable (gradient −A_p(κ))."""
    if not vmf:
        return (None,) * 4
    from .kernels import vmf_bias

    cache: dict[tuple[int, float], torch.Tensor] = {}

    def get(w: torch.Tensor, tau: float, grad: bool) -> torch.Tensor:
        key = (id(w), tau)
        if key not in cache:
            with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
                cache[key] = vmf_bias(w if grad else w.detach(), tau, True)
        return cache[key]

    return (get(student.cls_prototypes, tau_s, True), get(teacher.cls_prototypes, tau_t, False),
            get(student.patch_prototypes, tau_s, True), get(teacher.patch_prototypes, tau_t, False))


def teacher_logits(zt: torch.Tensor, wt: torch.Tensor, tau_t: float, vmf: bool,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """Uncentred teacher logits [N, K] float32: zt·wt/τ_t (+ log C_p(‖w_k‖/τ_t) with vMF; ``bias``:
    the step's precomputed b_t from :func:`prototype_biases`, so log C_p is not evaluated again)."""
    logits = (zt.float() @ wt.float().T) / tau_t
    if vmf and bias is not None:
        logits = logits + bias.float()
    elif vmf:
        from ..vmf import log_cp_step

        logits = logits + log_cp_step(wt.float().norm(dim=1) / tau_t, wt.shape[1])
    return logits


@torch.no_grad()
def teacher_targets(zt: torch.Tensor, wt: torch.Tensor, offset: torch.Tensor, tau_t: float, vmf: bool) -> torch.Tensor:
    """The teacher's centred targets P_t [N, K] = softmax(logits − offset) (for tests, diagnostics)."""
    return torch.softmax(teacher_logits(zt, wt, tau_t, vmf) - offset.float(), dim=1)


@torch.no_grad()
def teacher_entropy(zt: torch.Tensor, wt: torch.Tensor, offset: torch.Tensor, tau_t: float, vmf: bool,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """Mean entropy (nats) of the teacher's centred softmax over the rows of zt [N, p] (N×K, so
    only used for the [CLS] rows). With it the [CLS] loss splits into H(P_t) + KL(P_t‖P_s): the
    entropy shows centring/sharpening and collapse (→0: one prototype, →ln K: uniform), the KL
    shows the student learning (DINO's collapse diagnostics). ``offset``: :meth:`Centres.offset`."""
    logp = torch.log_softmax(teacher_logits(zt, wt, tau_t, vmf, bias) - offset.float(), dim=1)
    return -(logp.exp() * logp).sum(1).mean()


def koleo(x: torch.Tensor, views: int, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo (Kozachenko–Leonenko) spreading term, as DINOv2 uses it: x [views*B, D] view-major, each
    view's rows L2-normalised; −mean log(distance to the nearest other row of the same view), averaged
    over views. Lower when the rows spread out; it pushes apart the closest pairs."""
    x = x.to(torch.promote_types(x.dtype, torch.float32))  # bf16 rows: the distances in fp32
    xs = torch.nn.functional.normalize(x, dim=-1, eps=1e-6).unflatten(0, (views, -1))
    dist = torch.cdist(xs, xs)  # [views, B, B]
    eye = torch.eye(xs.shape[1], dtype=torch.bool, device=x.device)
    nearest = dist.masked_fill(eye, float("inf")).amin(dim=-1)
    return -torch.log(nearest + eps).mean()


@dataclass
class LossOut:
    loss: torch.Tensor  # scalar with grad: λ_cls·cls + λ_patch·patch + λ_koleo·koleo
    cls: torch.Tensor
    patch: torch.Tensor
    koleo: torch.Tensor  # 0 when λ_koleo = 0 (not computed)
    stats_cls: dict[str, torch.Tensor]
    stats_patch: dict[str, torch.Tensor]
    teacher_entropy_cls: torch.Tensor
    centre_stat_cls: torch.Tensor    # [K] batch mean the centre update needs (logits or probabilities)
    centre_stat_patch: torch.Tensor  # [K] (zeros when there are no masked patches)


def ibot_vmf_loss(student: HeadOut, teacher: HeadOut, masks: torch.Tensor, batch: int, n_local: int,
                  centres: Centres, tau_s: float, tau_t: float, cfg: LossConfig,
                  dtype: torch.dtype | None = None, mask_index: torch.Tensor | None = None) -> LossOut:
    """DINO [CLS] loss across views + iBOT loss on masked patches, both through ``vmf_xent``.

    ``dtype``: operand dtype of the loss matmuls (bf16 when training in bf16; the op accumulates in
    fp32). Passed explicitly because F.normalize returns fp32 under CUDA autocast (CPU autocast
    keeps bf16), which would run the fp32 kernel; default: the student rows' dtype."""
    from .kernels import UNCENTRED, vmf_xent

    dtype = dtype or student.cls_z.dtype  # both operands of the fused matmuls match
    pairs = cls_pairs(batch, n_local, student.cls_z.device)
    b_cls_s, b_cls_t, b_patch_s, b_patch_t = prototype_biases(student, teacher, tau_s, tau_t, cfg.vmf)
    off_cls, off_patch = centres.offset("cls"), centres.offset("patch")
    loss_cls, st_cls = vmf_xent(student.cls_z.to(dtype), student.cls_prototypes.to(dtype), teacher.cls_z.to(dtype),
                                teacher.cls_prototypes.to(dtype), off_cls, tau_s, tau_t, pairs=pairs,
                                vmf=cfg.vmf, backend=cfg.backend, bias_s=b_cls_s, bias_t=b_cls_t)
    loss_patch, st_patch = vmf_xent(student.patch_z.to(dtype), student.patch_prototypes.to(dtype), teacher.patch_z.to(dtype),
                                    teacher.patch_prototypes.to(dtype), off_patch, tau_s, tau_t,
                                    weights=patch_weights(masks, mask_index), vmf=cfg.vmf, backend=cfg.backend,
                                    bias_s=b_patch_s, bias_t=b_patch_t)
    total = cfg.lambda_cls * loss_cls + cfg.lambda_patch * loss_patch
    loss_koleo = torch.zeros((), device=total.device)
    if cfg.lambda_koleo > 0:
        if student.cls_tokens is None:
            raise ValueError("loss.lambda_koleo > 0 needs the student's backbone [CLS] (HeadOut.cls_tokens)")
        loss_koleo = koleo(student.cls_tokens[: 2 * batch], views=2)
        total = total + cfg.lambda_koleo * loss_koleo
    entropy = teacher_entropy(teacher.cls_z, teacher.cls_prototypes, off_cls, tau_t, cfg.vmf, b_cls_t)
    # the centre statistic comes out of the loss's own teacher pass (no second pass over N×K)
    stat = UNCENTRED if centres.mode == "probability" else "teacher_logit_mean"
    stat_cls, stat_patch = st_cls[stat], st_patch[stat]
    return LossOut(total, loss_cls, loss_patch, loss_koleo, st_cls, st_patch, entropy, stat_cls.float(), stat_patch.float())
