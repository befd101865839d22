"""Chunked backend of ``vmf_xent``: rows in chunks, logits by GEMM, 4 N×K×D GEMM-equivalents.

Per chunk of student rows (and, for the identity pairing, the same teacher rows): l_s = zs_c@wsᵀ/τ_s
+ b_s and l_t = zt_c@wtᵀ/τ_t + b_t − centre by GEMM, both softmaxes, the soft-CE, G = a·(c·P_s − T)
(T = Σ_pairs P_t), then dz_c = G@ws/τ_s and dws += Gᵀ@zs_c/τ_s, db += Σ_rows G; Σ P_t for the
statistics. Only [chunk, K] tensors exist (chunk·K·4 B ≤ 64 MiB), never N×K for the whole batch;
chunk sizes depend on shapes only (no data-dependent shapes: CUDA-graph friendly). Gradients are
formed in the forward (the loss is a scalar) and scaled in the backward.

This module is the torch implementation of the algorithm (any device; also a memory-bounded CPU
path). A fused Triton kernel for the per-chunk softmax/CE/G step is not written yet (issue 12).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .vmf_xent_torch import check_pairs, vmf_bias

MAX_CHUNK_BYTES = 64 * 2**20


def chunk_rows(k: int, limit: int = 1024) -> int:
    """Rows per chunk: ≤ limit and a [chunk, K] fp32 block ≤ MAX_CHUNK_BYTES (L2-sized on H200)."""
    return max(1, min(limit, MAX_CHUNK_BYTES // (4 * k)))


class _ChunkedFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, zs, ws, b_s, zt, wt, b_tc, w, pairs, tau_s, tau_t, chunk):
        ns, d = zs.shape
        nt, k = zt.shape[0], ws.shape[0]
        acc = torch.promote_types(zs.dtype, torch.float32)
        f = dict(dtype=acc, device=zs.device)
        its, itt = 1.0 / tau_s, 1.0 / tau_t
        b_s, b_tc, w = b_s.detach().to(acc), b_tc.to(acc), w.to(acc)
        need_z, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        dz = torch.empty(ns, d, **f) if need_z else None
        dw = torch.zeros(k, d, **f)
        db = torch.zeros(k, **f)
        pm = torch.zeros(k, **f)
        loss = torch.zeros((), **f)

        def teacher_probs(lo, hi):
            lt = (zt[lo:hi] @ wt.T).to(acc) * itt + b_tc
            return torch.softmax(lt, dim=1)

        if pairs is None:
            count = torch.ones(ns, **f)
            valid = None
        else:
            valid = (pairs >= 0).to(acc)
            idx = pairs.clamp_min(0)
            count = valid.sum(1)
            p_t_all = torch.empty(nt, k, **f) if nt * k * 4 <= 4 * MAX_CHUNK_BYTES else None
            for lo in range(0, nt, chunk):  # teacher rows (few for the [CLS] loss) once each
                p = teacher_probs(lo, min(lo + chunk, nt))
                pm += p.sum(0)
                if p_t_all is None:
                    raise ValueError(f"chunked backend with pairs: Nt·K = {nt}·{k} too large")
                p_t_all[lo:lo + p.shape[0]] = p
        den = (w * count).sum()
        a = w * torch.where(den > 0, 1.0 / den, torch.zeros_like(den))
        for lo in range(0, ns, chunk):
            hi = min(lo + chunk, ns)
            zc = zs[lo:hi]
            ls = (zc @ ws.T).to(acc) * its + b_s
            lse = torch.logsumexp(ls, dim=1)
            if pairs is None:
                target = teacher_probs(lo, hi)
                pm += target.sum(0)
            else:
                target = torch.einsum("im,imk->ik", valid[lo:hi], p_t_all[idx[lo:hi]])
            a_c, c_c = a[lo:hi], count[lo:hi]
            loss += (a_c * (c_c * lse - (target * ls).sum(1))).sum()
            g = (a_c * c_c).unsqueeze(1) * torch.exp(ls - lse.unsqueeze(1)) - a_c.unsqueeze(1) * target
            gd = g.to(zs.dtype)
            if need_z:
                dz[lo:hi] = (gd @ ws).to(acc) * its
            if need_w:
                dw += (gd.T @ zc).to(acc)
                db += g.sum(0)
        ctx.save_for_backward(dz, dw if need_w else None, db if need_w else None)
        ctx.dtypes = (zs.dtype, ws.dtype, b_s.dtype)
        ctx.its = its
        ctx.mark_non_differentiable(pm)
        return loss, pm

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_loss, _g_pm):
        dz, dw, db = ctx.saved_tensors
        tz, tw, _ = ctx.dtypes
        gz = (g_loss * dz).to(tz) if ctx.needs_input_grad[0] else None
        gw = (g_loss * ctx.its * dw).to(tw) if ctx.needs_input_grad[1] else None
        gb = g_loss * db if ctx.needs_input_grad[2] else None
        return gz, gw, gb, None, None, None, None, None, None, None, None


def vmf_xent_chunked(zs: Tensor, ws: Tensor, zt: Tensor, wt: Tensor, center: Tensor, tau_s: float,
                     tau_t: float, pairs: Tensor | None = None, weights: Tensor | None = None,
                     vmf: bool = True, chunk: int | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Chunked ``vmf_xent`` (same contract as the torch reference; float32/64/bf16/fp16)."""
    ns, d = zs.shape
    nt, k = zt.shape[0], ws.shape[0]
    if pairs is None and ns != nt:
        raise ValueError(f"pairs=None pairs row i with row i, so Ns ({ns}) must equal Nt ({nt})")
    if pairs is not None:
        if pairs.dim() != 2 or pairs.shape[0] != ns:
            raise ValueError(f"pairs must be [Ns={ns}, m], got {tuple(pairs.shape)}")
        pairs = pairs.to(device=zs.device, dtype=torch.long)
        check_pairs(pairs, nt)
    acc = torch.promote_types(zs.dtype, torch.float32)
    b_s = vmf_bias(ws, tau_s, vmf)
    if b_s is None:
        b_s = torch.zeros(k, dtype=acc, device=zs.device)
    with torch.no_grad():
        b_t = vmf_bias(wt.detach(), tau_t, vmf)
        b_t = torch.zeros(k, dtype=acc, device=zs.device) if b_t is None else b_t.to(acc)
        logit_mean = (zt.to(acc).mean(0) @ wt.detach().to(acc).T) / tau_t + b_t
        w = (torch.ones(ns, dtype=acc, device=zs.device) if weights is None
             else weights.detach().to(device=zs.device, dtype=acc))
        b_tc = b_t - center.detach().to(acc)
    loss, pm = _ChunkedFn.apply(zs, ws, b_s, zt.detach(), wt.detach(), b_tc, w, pairs, tau_s, tau_t,
                                chunk or chunk_rows(k))
    return loss, {"teacher_logit_mean": logit_mean.float(), "teacher_prob_mean": (pm / nt).float()}
