"""Chunked backend of ``vmf_xent``: rows in chunks, logits by GEMM, 4 N×K×D GEMM-equivalents.

Per chunk of student rows (and, for the identity pairing, the same teacher rows): l_s = zs_c@wsᵀ/τ_s
+ b_s and l_t = zt_c@wtᵀ/τ_t + b_t − centre by GEMM, both softmaxes, the soft-CE, G = a·(c·P_s − T)
(T = Σ_pairs P_t), then dz_c = G@ws/τ_s and dws += Gᵀ@zs_c/τ_s, db += Σ_rows G; Σ P_t and
Σ softmax(l_t + centre) (the probabilities before centring) for the statistics. Only [chunk, K]
tensors exist (chunk·K·4 B ≤ 64 MiB), never N×K for the whole batch; chunk sizes depend on shapes
only (no data-dependent shapes: CUDA-graph friendly). Gradients are formed in the forward (the loss
is a scalar) and scaled in the backward.

Two implementations of the per-chunk step between the GEMMs: ``fused`` (one Triton launch per
chunk, ``vmf_xent_chunk_triton``: both softmaxes, the soft-CE, G, Σ G and both Σ P_t; used on CUDA
and under TRITON_INTERPRET=1) and plain torch ops (any device; the fallback on a CPU without the
interpreter). ``FUSED`` (None = that choice, True / False) overrides it, for tests and benchmarks.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from .vmf_xent_torch import UNCENTRED, check_pairs, vmf_bias

MAX_CHUNK_BYTES = 64 * 2**20
FUSED: bool | None = None  # None: the fused Triton step on CUDA / under the interpreter
FUSED_CHUNK_BYTES = 48 * 2**20  # all [chunk, K] buffers of the fused step together


def chunk_rows(k: int, limit: int = 1024) -> int:
    """Rows per chunk: ≤ limit and a [chunk, K] fp32 block ≤ MAX_CHUNK_BYTES (L2-sized on H200)."""
    return max(1, min(limit, MAX_CHUNK_BYTES // (4 * k)))


def fused_chunk_rows(k: int, bytes_per_logit: int, limit: int = 1024) -> int:
    """Rows per chunk of the fused step: a power of two in [16, limit] whose [chunk, K] buffers
    (bytes_per_logit per row and prototype, all buffers together) fit FUSED_CHUNK_BYTES. At
    K = 8192 with bf16 inputs (fp32 student and teacher logits + bf16 G: 10 B) that is 512 rows,
    40 MiB, so the op's extra memory at N = 25,088 stays under 0.1 GB (with ∂zs, ∂ws, partials)."""
    rows = max(16, FUSED_CHUNK_BYTES // (bytes_per_logit * k))
    return min(limit, 1 << (rows.bit_length() - 1))


def use_fused(x: Tensor) -> bool:
    """The fused Triton step runs on CUDA (Triton importable) or under TRITON_INTERPRET=1."""
    if FUSED is not None:
        return FUSED
    if not (x.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1"):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return x.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16)


_MM_OUT_DTYPE = True  # torch.mm(..., out_dtype=) (CUDA only, torch >= 2.8): fp32 out of half GEMMs


def mm_into(a: Tensor, b: Tensor, out: Tensor) -> Tensor:
    """out = a @ b with out in its own (accumulation) dtype; half inputs on CUDA write fp32
    directly (no half rounding of the logits), elsewhere the product is cast."""
    global _MM_OUT_DTYPE
    if a.dtype == out.dtype:
        return torch.mm(a, b, out=out)
    if a.is_cuda and _MM_OUT_DTYPE:
        try:
            return torch.mm(a, b, out_dtype=out.dtype, out=out)
        except (RuntimeError, TypeError):
            _MM_OUT_DTYPE = False
    return out.copy_(a @ b)


class _ChunkedFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, zs, ws, b_s, zt, wt, b_tc, centre, w, pairs, tau_s, tau_t, chunk, fused):
        ns, d = zs.shape
        nt, k = zt.shape[0], ws.shape[0]
        acc = torch.promote_types(zs.dtype, torch.float32)
        f = dict(dtype=acc, device=zs.device)
        its, itt = 1.0 / tau_s, 1.0 / tau_t
        b_s, b_tc, centre, w = b_s.detach().to(acc), b_tc.to(acc), centre.to(acc), w.to(acc)
        need_z, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        if fused:
            loss, pm, pu, dz, dw, db = _forward_fused(zs, ws, b_s, zt, wt, b_tc, centre, w, pairs,
                                                      its, itt, chunk, need_z, need_w)
            ctx.save_for_backward(dz, dw, db)
            ctx.dtypes = (zs.dtype, ws.dtype, b_s.dtype)
            ctx.its = 1.0  # the fused step writes G·inv_tau_s: dz and dw are already scaled
            ctx.mark_non_differentiable(pm, pu)
            return loss, pm, pu
        dz = torch.empty(ns, d, **f) if need_z else None
        dw = torch.zeros(k, d, **f)
        db = torch.zeros(k, **f)
        pm = torch.zeros(k, **f)
        pu = torch.zeros(k, **f)
        loss = torch.zeros((), **f)

        def teacher_probs(lo, hi):
            """Centred P_t of rows lo:hi; Σ P_t and Σ softmax(uncentred logits) into pm, pu."""
            lt = (zt[lo:hi] @ wt.T).to(acc) * itt + b_tc
            pu.add_(torch.softmax(lt + centre, dim=1).sum(0))
            p = torch.softmax(lt, dim=1)
            pm.add_(p.sum(0))
            return p

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
        ctx.mark_non_differentiable(pm, pu)
        return loss, pm, pu

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_loss, _g_pm, _g_pu):
        dz, dw, db = ctx.saved_tensors
        tz, tw, _ = ctx.dtypes
        gz = (g_loss * dz).to(tz) if ctx.needs_input_grad[0] else None
        gw = (g_loss * ctx.its * dw).to(tw) if ctx.needs_input_grad[1] else None
        gb = g_loss * db if ctx.needs_input_grad[2] else None
        return gz, gw, gb, None, None, None, None, None, None, None, None, None, None


def _forward_fused(zs, ws, b_s, zt, wt, b_tc, centre, w, pairs, its, itt, chunk, need_z, need_w):
    """The chunk loop with the fused Triton step: per chunk two logits GEMMs into fixed [chunk, K]
    buffers, one launch, then dz_c = G@ws and dws += Gᵀ@zs_c (G already carries 1/τ_s). Returns
    loss, Σ P_t, Σ softmax(uncentred), dz, dws, db (dz / dws / db None when not needed)."""
    from . import vmf_xent_chunk_triton as ct

    ns, d = zs.shape
    nt, k = zt.shape[0], ws.shape[0]
    acc = b_s.dtype
    f = dict(dtype=acc, device=zs.device)
    need_g = need_z or need_w
    chunk = min(chunk, max(ns, nt, 1))  # no rows (no masked patch on this rank): one empty chunk
    n_prog = ct.programs(chunk)
    dbp = torch.zeros(n_prog, k, **f)  # per-program partial column sums (no atomics)
    pmp = torch.zeros(n_prog, k, **f)
    pup = torch.zeros(n_prog, k, **f)
    ls_buf = torch.empty(chunk, k, **f)
    g_buf = torch.empty(chunk, k, dtype=zs.dtype, device=zs.device) if need_g else None
    row_loss = torch.empty(ns, **f)
    dz = torch.empty(ns, d, **f) if need_z else None
    dw = torch.zeros(k, d, **f) if need_w else None
    dw_c = torch.empty(k, d, **f) if need_w and zs.dtype != acc else None  # half GEMM out, fp32
    ws_t, wt_t = ws.T, wt.T
    if pairs is None:
        den = w.sum()
        lt_buf = torch.empty(chunk, k, **f)
        pt = None
    else:
        count = (pairs >= 0).sum(1).to(acc)
        den = (w * count).sum()
        if nt * k * 4 > 4 * MAX_CHUNK_BYTES:
            raise ValueError(f"chunked backend with pairs: Nt·K = {nt}·{k} too large")
        pt = torch.empty(nt, k, **f)  # teacher rows (2·batch for the [CLS] loss) once each
        for lo in range(0, nt, chunk):
            lt = mm_into(zt[lo:lo + chunk], wt_t, pt[lo:lo + chunk])
            ct.chunk_step(k=k, inv_tau_s=its, inv_tau_t=itt, acc=acc, dbp=dbp, pmp=pmp, pup=pup,
                          centre=centre, lt=lt, b_tc=b_tc, pt=lt, write_pt=True)
        pairs = pairs.contiguous()
    a = w * torch.where(den > 0, 1.0 / den, torch.zeros_like(den))
    for lo in range(0, ns, chunk):
        hi = min(lo + chunk, ns)
        c = hi - lo
        zc = zs[lo:hi]
        ls = mm_into(zc, ws_t, ls_buf[:c])
        g = g_buf[:c] if need_g else None
        if pairs is None:
            lt = mm_into(zt[lo:hi], wt_t, lt_buf[:c])
            ct.chunk_step(k=k, inv_tau_s=its, inv_tau_t=itt, acc=acc, dbp=dbp, pmp=pmp, pup=pup,
                          centre=centre, ls=ls, b_s=b_s, lt=lt, b_tc=b_tc, a=a[lo:hi], g=g,
                          row_loss=row_loss[lo:hi])
        else:
            ct.chunk_step(k=k, inv_tau_s=its, inv_tau_t=itt, acc=acc, dbp=dbp, pmp=pmp, ls=ls,
                          b_s=b_s, pt=pt, pairs=pairs[lo:hi], a=a[lo:hi], g=g,
                          row_loss=row_loss[lo:hi])
        if need_z:
            mm_into(g, ws, dz[lo:hi])
        if need_w:
            if dw_c is None:
                dw.addmm_(g.T, zc)
            else:
                dw += mm_into(g.T, zc, dw_c)
    db = dbp.sum(0) if need_w else None
    return row_loss.sum(), pmp.sum(0), pup.sum(0), dz, dw, db


def vmf_xent_chunked(zs: Tensor, ws: Tensor, zt: Tensor, wt: Tensor, center: Tensor, tau_s: float,
                     tau_t: float, pairs: Tensor | None = None, weights: Tensor | None = None,
                     vmf: bool = True, bias_s: Tensor | None = None, bias_t: Tensor | None = None,
                     chunk: int | None = None) -> tuple[Tensor, dict[str, Tensor]]:
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
    b_s = vmf_bias(ws, tau_s, vmf, bias_s)
    if b_s is None:
        b_s = torch.zeros(k, dtype=acc, device=zs.device)
    with torch.no_grad():
        b_t = vmf_bias(wt.detach(), tau_t, vmf, None if bias_t is None else bias_t.detach())
        b_t = torch.zeros(k, dtype=acc, device=zs.device) if b_t is None else b_t.to(acc)
        logit_mean = (zt.to(acc).mean(0) @ wt.detach().to(acc).T) / tau_t + b_t
        w = (torch.ones(ns, dtype=acc, device=zs.device) if weights is None
             else weights.detach().to(device=zs.device, dtype=acc))
        centre = center.detach().to(acc)
        b_tc = b_t - centre
    fused = use_fused(zs)
    if fused:
        zs, ws, zt, wt = (t.contiguous() for t in (zs, ws, zt, wt))
        row_bytes = 8 + zs.element_size() if acc == torch.float32 else 24
        chunk = chunk or fused_chunk_rows(k, row_bytes)
    loss, pm, pu = _ChunkedFn.apply(zs, ws, b_s, zt.detach(), wt.detach(), b_tc, centre, w, pairs,
                                    tau_s, tau_t, chunk or chunk_rows(k), fused)
    return loss, {"teacher_logit_mean": logit_mean.float(), "teacher_prob_mean": (pm / nt).float(),
                  UNCENTRED: (pu / nt).float()}
