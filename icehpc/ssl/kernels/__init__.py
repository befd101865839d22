"""Fused kernels. ``vmf_xent``: iBOT-vMF prototype softmax + soft cross-entropy.

Importing this package does not import Triton; the fused backend is loaded on first use.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .vmf_xent_torch import UNCENTRED, crop_pairs, vmf_bias, vmf_xent_torch

BACKENDS = ("auto", "torch", "triton", "chunked")
TRITON_MAX_D = 256  # vmf_xent_triton.MAX_D (not imported here: importing Triton is deferred)


def vmf_xent(zs: Tensor, ws: Tensor, zt: Tensor, wt: Tensor, center: Tensor, tau_s: float,
             tau_t: float, pairs: Tensor | None = None, weights: Tensor | None = None,
             vmf: bool = True, backend: str = "auto", bias_s: Tensor | None = None,
             bias_t: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Soft cross-entropy between teacher and student vMF prototype softmaxes.

    zs [Ns, D] student rows (L2-normalised), ws [K, D] student prototypes (unnormalised: ‖w_k‖
    carries the concentration), zt [Nt, D] / wt [K, D] teacher (no gradient), center [K] teacher
    centre in logit space, tau_s / tau_t temperatures.

    l_s[i,k] = zs_i·ws_k/τ_s + b_s[k];  l_t[j,k] = zt_j·wt_k/τ_t + b_t[k] − center[k];
    b[k] = log C_p(‖w_k‖/τ) (p = D) if vmf else 0;  P_t = softmax(l_t), log P_s = log_softmax(l_s).

    pairs: None (student row i ↔ teacher row i, Ns == Nt; iBOT patch loss) or LongTensor [Ns, m] of
    teacher rows, −1 = none (DINO [CLS] loss; ``crop_pairs`` builds it). weights [Ns] ≥ 0, default
    ones (constants: no gradient).

    loss = Σ_i w_i Σ_{j∈pairs(i)} H(P_t[j], P_s[i]) / Σ_i w_i |pairs(i)|  (0 when the denominator is 0);
    gradients flow to zs and ws (through b_s too). stats (float32, no gradient):
    ``teacher_logit_mean`` [K] = mean over all Nt teacher rows of zt·wt/τ_t + b_t (the logits
    before centring, for the EMA centre), ``teacher_prob_mean`` [K] = mean over all Nt rows of P_t,
    ``teacher_prob_mean_uncentred`` (``UNCENTRED``) [K] = mean over all Nt rows of
    softmax(zt·wt/τ_t + b_t), the probabilities before centring (DINO-vMF's probability centring;
    from the same teacher pass, no second one). Weights and pairs do not enter the statistics;
    with Nt = 0 they are zeros.

    bias_s / bias_t: the vMF biases b_s, b_t [K] computed once per step by the caller
    (``vmf_bias(w, tau, True)``, differentiable for the student: its gradient −A_p(κ) flows through
    the caller's graph), so that a prototype set shared by several calls evaluates log C_p once;
    None: computed here. Only with vmf=True.

    backend: "torch" (plain reference), "triton" (fused, no N×K tensor, D ≤ 256), "chunked" (rows
    in chunks, logits by GEMM, one fused Triton launch per chunk for the softmaxes / soft-CE / G on
    CUDA, torch ops per chunk on a CPU; no N×K tensor for the whole batch; any device and D),
    "auto" (triton on CUDA when D ≤ 256, else torch; until a GPU benchmark shows chunked faster).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        use = zs.is_cuda and zs.shape[1] <= TRITON_MAX_D and _triton_available()
        backend = "triton" if use else "torch"
    if backend == "torch":
        fn = vmf_xent_torch
    elif backend == "chunked":
        from .vmf_xent_chunked import vmf_xent_chunked as fn
    else:
        from .vmf_xent_triton import vmf_xent_triton as fn
    loss, stats = fn(zs, ws, zt, wt, center, tau_s, tau_t, pairs, weights, vmf, bias_s, bias_t)
    if zt.shape[0] == 0:  # a mean over no teacher row is 0, not 0/0 (it is summed across ranks)
        stats = {name: torch.zeros_like(s) for name, s in stats.items()}
    return loss, stats


def _triton_available() -> bool:
    """True when Triton imports (it is an optional dependency, extras `gpu`)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


__all__ = ["vmf_xent", "vmf_xent_torch", "vmf_bias", "crop_pairs", "BACKENDS", "UNCENTRED"]
