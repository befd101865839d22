"""Plain PyTorch reference of the iBOT-vMF prototype soft cross-entropy (any device, any float dtype).

It materialises the N×K logits on purpose: it is the specification the fused Triton kernel is tested
against (in float64) and the loss CPU pretraining trains with.
"""
from __future__ import annotations

import torch
from torch import Tensor

# stats key of the mean teacher probabilities BEFORE centring, softmax(zt·wt/τ_t + b_t): the
# statistic of DINO-vMF's probability centring (every backend returns it)
UNCENTRED = "teacher_prob_mean_uncentred"


def vmf_bias(w: Tensor, tau: float, vmf: bool, given: Tensor | None = None) -> Tensor | None:
    """b[k] = log C_p(‖w_k‖/τ) with p = D (the vMF normaliser of prototype k), or None without vMF.

    w: [K, D]. Returns [K] in float32 (float64 for float64 input); differentiable through ‖w_k‖
    (d b / d κ = −A_p(κ) exactly). ``given``: a bias computed once per step by the caller for this
    prototype set and temperature (see ``vmf_xent``'s bias_s / bias_t); returned as it is.
    """
    if given is not None:
        if not vmf:
            raise ValueError("a precomputed vMF bias was given with vmf=False")
        if given.shape != w.shape[:1]:
            raise ValueError(f"vMF bias must be [K={w.shape[0]}], got {tuple(given.shape)}")
        return given
    if not vmf:
        return None
    from ...vmf import log_cp_step  # gradient −A_p(κ); tabulated on CUDA (~110 ops, not ~870)

    acc = torch.promote_types(w.dtype, torch.float32)
    return log_cp_step(w.to(acc).norm(dim=1) / tau, w.shape[1])


def crop_pairs(n_crops: int, n_global: int, batch: int, device: torch.device | str = "cpu") -> Tensor:
    """DINO [CLS] pairing: student row c·B+b (crop c of image b) against teacher rows g·B+b of every
    *other* global crop g < n_global; −1 where g == c. Returns LongTensor [n_crops·B, n_global]."""
    crop = torch.arange(n_crops, device=device).repeat_interleave(batch).unsqueeze(1)
    image = torch.arange(batch, device=device).repeat(n_crops).unsqueeze(1)
    g = torch.arange(n_global, device=device).unsqueeze(0)
    return torch.where(g == crop, -1, g * batch + image)


def check_pairs(pairs: Tensor, n_teacher: int) -> None:
    """Range check of ``pairs`` (< Nt) without a host round trip on CUDA (torch._assert_async, an
    error at a later launch); a CPU tensor is checked on the host with a ValueError."""
    if not pairs.numel() or torch.compiler.is_compiling():
        return
    if pairs.device.type != "cpu":
        torch._assert_async(pairs.max() < n_teacher, f"pairs holds a teacher row >= Nt = {n_teacher}")
    elif int(pairs.max()) >= n_teacher:
        raise ValueError(f"pairs holds teacher row {int(pairs.max())} but Nt = {n_teacher}")


def pair_matrix(pairs: Tensor | None, n_student: int, n_teacher: int, dtype: torch.dtype,
                device: torch.device) -> Tensor | None:
    """Dense 0/1 (or count) matrix A [Ns, Nt] with A[i, j] = #times teacher row j is paired with
    student row i; −1 entries of ``pairs`` [Ns, m] are ignored. None for the identity pairing."""
    if pairs is None:
        return None
    if pairs.dim() != 2 or pairs.shape[0] != n_student:
        raise ValueError(f"pairs must be [Ns={n_student}, m], got {tuple(pairs.shape)}")
    check_pairs(pairs, n_teacher)
    pairs = pairs.to(device)
    valid = pairs >= 0  # fixed shapes: −1 entries add 0 at column 0 (no boolean indexing)
    rows = torch.arange(n_student, device=device).unsqueeze(1).expand_as(pairs)
    a = torch.zeros(n_student, n_teacher, dtype=dtype, device=device)
    a.index_put_((rows.reshape(-1), pairs.clamp_min(0).reshape(-1)), valid.to(dtype).reshape(-1),
                 accumulate=True)
    return a


def vmf_xent_torch(zs: Tensor, ws: Tensor, zt: Tensor, wt: Tensor, center: Tensor, tau_s: float,
                   tau_t: float, pairs: Tensor | None = None, weights: Tensor | None = None,
                   vmf: bool = True, bias_s: Tensor | None = None, bias_t: Tensor | None = None
                   ) -> tuple[Tensor, dict[str, Tensor]]:
    """Reference of ``icehpc.ssl.kernels.vmf_xent`` (see there for shapes and the formula).

    Matmuls run in the input dtype; logits and softmaxes in float32 (float64 for float64 input),
    as plain mixed-precision PyTorch code does.
    """
    ns, d = zs.shape
    nt = zt.shape[0]
    if pairs is None and ns != nt:
        raise ValueError(f"pairs=None pairs row i with row i, so Ns ({ns}) must equal Nt ({nt})")
    acc = torch.promote_types(zs.dtype, torch.float32)
    ls = (zs @ ws.T).to(acc) / tau_s
    b_s = vmf_bias(ws, tau_s, vmf, bias_s)
    if b_s is not None:
        ls = ls + b_s.to(acc)
    with torch.no_grad():
        lt_raw = (zt @ wt.T).to(acc) / tau_t
        b_t = vmf_bias(wt, tau_t, vmf, None if bias_t is None else bias_t.detach())
        if b_t is not None:
            lt_raw = lt_raw + b_t.to(acc)
        p_t = torch.softmax(lt_raw - center.to(acc), dim=1)
        stats = {"teacher_logit_mean": lt_raw.mean(0).float(), "teacher_prob_mean": p_t.mean(0).float(),
                 UNCENTRED: torch.softmax(lt_raw, dim=1).mean(0).float()}
        a = pair_matrix(pairs, ns, nt, acc, zs.device)
        target = p_t if a is None else a @ p_t  # Σ_{j∈pairs(i)} P_t[j], linear in P_t
        count = torch.ones(ns, dtype=acc, device=zs.device) if a is None else a.sum(1)
        w = torch.ones(ns, dtype=acc, device=zs.device) if weights is None else weights.detach().to(acc)
        den = (w * count).sum()
    log_ps = torch.log_softmax(ls, dim=1)
    num = -(w.unsqueeze(1) * target * log_ps).sum()
    loss = num / torch.where(den > 0, den, torch.ones_like(den))  # no weight → num = 0 → loss 0
    return loss, stats
