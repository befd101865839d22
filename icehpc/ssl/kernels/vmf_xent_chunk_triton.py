"""Fused per-chunk Triton kernel of the chunked ``vmf_xent`` backend.

For one chunk of C rows whose logits the GEMMs have just written ([C, K] buffers, small enough to
stay in L2), one launch does everything between the logits GEMMs and the gradient GEMMs:

  l_s = ls·inv_tau_s + b_s,  l_t = lt·inv_tau_t + (b_t − centre)  (vMF bias per prototype, given)
  lse_s, lse_t, lse_u                   (pass 1 over K: online max / sum, both sides at once;
                                         lse_u of the uncentred teacher logits l_t + centre)
  T = P_t (identity)  or  T_i = Σ_{j ∈ pairs(i), j ≥ 0} P_t[j]  (gathered from a [Nt, K] buffer)
  row loss   a_i (c_i·lse_s[i] − Σ_k T_ik l_s[i,k])       (c_i = |pairs(i)|, 1 for the identity)
  G          = a_i (c_i·P_s[i] − T_i),  written as inv_tau_s·G in the GEMM dtype
  Σ_rows G   (∂b_s), Σ_rows P_t (teacher_prob_mean) and Σ_rows softmax(l_t + centre) (its value
             before centring), accumulated per program into its own row of a [programs, K]
             buffer (no atomics: deterministic, summed once at the end)

The teacher-only mode (pairs: teacher rows first, once each) turns raw teacher logits into P_t in
place and accumulates both Σ P_t. Every shape is fixed by (chunk, K): no data-dependent shapes, no
host reads; the launches can be captured in a CUDA graph after the first (autotuning) call.
ACC is the arithmetic dtype (float32, or float64 for float64 inputs: the CPU reference tests run
this kernel in float64 under TRITON_INTERPRET=1).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
BLOCK_M = 4 if INTERPRET else 8  # rows per program (fixed: it sizes the [programs, K] partials)


# (BLOCK_K, warps) per variant (DO_S, TEACHER): those whose sm_90a compile spills no register with
# Triton 3.6 and 3.8 (`python bench/vmf_kernel.py --aot`, as for vmf_xent_triton's tables; every
# config is a compile in the cold GPU check). With the uncentred statistic, the identity variant
# spilled 12 B at (1024, 8) under 3.6 and the teacher-only one 4 B at (512, 4).
VARIANT_CONFIGS = {(1, 1): [(512, 4)], (0, 1): [(1024, 8)], (1, 2): [(512, 4), (1024, 8)]}


def _cfg(bk: int, w: int) -> triton.Config:
    return triton.Config({"BLOCK_K": bk}, num_warps=w)


def _configs() -> list[triton.Config]:
    if INTERPRET:  # the interpreter's benchmarker needs a GPU: one config
        return [_cfg(64, 4)]
    return [_cfg(*c) for c in dict.fromkeys(c for cs in VARIANT_CONFIGS.values() for c in cs)]


def variant_configs(flags: dict) -> list[triton.Config]:
    """The configs of one variant (flags by name: DO_S, TEACHER)."""
    return [_cfg(*c) for c in VARIANT_CONFIGS[(int(flags["DO_S"]), int(flags["TEACHER"]))]]


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """The launched variant's configs (the interpreter keeps its one)."""
    if INTERPRET:
        return configs
    flags = {f: kwargs.get(f, named_args.get(f)) for f in ("DO_S", "TEACHER")}
    have = {str(c): c for c in configs}
    return [have[str(c)] for c in variant_configs(flags) if str(c) in have] or configs


# The partial sums accumulate across chunks and the teacher-only mode rewrites its input in place,
# so benchmarking must leave those buffers as it found them: restore_value (see vmf_xent_triton).
@triton.autotune(configs=_configs(), key=["K", "DO_S", "TEACHER", "WRITE_PT", "NEED_G", "M"],
                 restore_value=["pt_ptr", "dbp_ptr", "pmp_ptr", "pup_ptr"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _chunk_kernel(ls_ptr, bs_ptr, lt_ptr, btc_ptr, cen_ptr, pt_ptr, pairs_ptr, a_ptr,
                  g_ptr, loss_ptr, dbp_ptr, pmp_ptr, pup_ptr,
                  C, K, inv_tau_s, inv_tau_t,
                  DO_S: tl.constexpr, TEACHER: tl.constexpr, WRITE_PT: tl.constexpr,
                  NEED_G: tl.constexpr, M: tl.constexpr, ACC: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """TEACHER: 0 none, 1 teacher logits of the same rows (lt_ptr), 2 gathered P_t via pairs."""
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < C
    part = pid.to(tl.int64) * K  # this program's row of the [programs, K] partial sums
    m_s = tl.full([BLOCK_M], float("-inf"), ACC)
    l_s = tl.zeros([BLOCK_M], ACC)
    m_t = tl.full([BLOCK_M], float("-inf"), ACC)
    l_t = tl.zeros([BLOCK_M], ACC)
    m_u = tl.full([BLOCK_M], float("-inf"), ACC)
    l_u = tl.zeros([BLOCK_M], ACC)
    # pass 1: online max / sum of exp over K, student and teacher side by side
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        msk = rmask[:, None] & kmask[None, :]
        off = rows[:, None] * K + ks[None, :]
        if DO_S:
            b = tl.load(bs_ptr + ks, mask=kmask, other=0.0).to(ACC)
            s = tl.load(ls_ptr + off, mask=msk, other=0.0).to(ACC) * inv_tau_s + b[None, :]
            s = tl.where(msk, s, float("-inf"))
            m_new = tl.maximum(m_s, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows past C: all −inf
            l_s = l_s * tl.exp(m_s - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), axis=1)
            m_s = m_new
        if TEACHER == 1:
            bt = tl.load(btc_ptr + ks, mask=kmask, other=0.0).to(ACC)
            t = tl.load(lt_ptr + off, mask=msk, other=0.0).to(ACC) * inv_tau_t + bt[None, :]
            t = tl.where(msk, t, float("-inf"))
            m_new = tl.maximum(m_t, tl.max(t, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_t = l_t * tl.exp(m_t - m_safe) + tl.sum(tl.exp(t - m_safe[:, None]), axis=1)
            m_t = m_new
            u = t + tl.load(cen_ptr + ks, mask=kmask, other=0.0).to(ACC)[None, :]  # −inf stays
            m_new = tl.maximum(m_u, tl.max(u, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_u = l_u * tl.exp(m_u - m_safe) + tl.sum(tl.exp(u - m_safe[:, None]), axis=1)
            m_u = m_new
    lse_s = tl.where(rmask, m_s + tl.log(tl.where(l_s > 0, l_s, 1.0)), 0.0)
    lse_t = tl.where(rmask, m_t + tl.log(tl.where(l_t > 0, l_t, 1.0)), 0.0)
    lse_u = tl.where(rmask, m_u + tl.log(tl.where(l_u > 0, l_u, 1.0)), 0.0)
    cross = tl.zeros([BLOCK_M], ACC)
    if DO_S:
        a = tl.load(a_ptr + rows, mask=rmask, other=0.0).to(ACC)
        cnt = tl.zeros([BLOCK_M], ACC) + 1.0
        if TEACHER == 2:
            cnt = tl.zeros([BLOCK_M], ACC)
            for j in tl.static_range(M):
                idx = tl.load(pairs_ptr + rows * M + j, mask=rmask, other=-1)
                cnt += tl.where(idx >= 0, 1.0, 0.0)
    # pass 2: probabilities, target, soft-CE, G and the column sums, tile by tile
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        msk = rmask[:, None] & kmask[None, :]
        off = rows[:, None] * K + ks[None, :]
        target = tl.zeros([BLOCK_M, BLOCK_K], ACC)
        if TEACHER == 1:
            bt = tl.load(btc_ptr + ks, mask=kmask, other=0.0).to(ACC)
            t = tl.load(lt_ptr + off, mask=msk, other=0.0).to(ACC) * inv_tau_t + bt[None, :]
            cen = tl.load(cen_ptr + ks, mask=kmask, other=0.0).to(ACC)
            qu = tl.where(msk, tl.exp(t + cen[None, :] - lse_u[:, None]), 0.0)
            pu = tl.load(pup_ptr + part + ks, mask=kmask, other=0.0)
            tl.store(pup_ptr + part + ks, pu + tl.sum(qu, axis=0), mask=kmask)
            q = tl.where(msk, tl.exp(t - lse_t[:, None]), 0.0)
            pm = tl.load(pmp_ptr + part + ks, mask=kmask, other=0.0)
            tl.store(pmp_ptr + part + ks, pm + tl.sum(q, axis=0), mask=kmask)
            if WRITE_PT:
                tl.store(pt_ptr + off, q, mask=msk)
            target = q
        if TEACHER == 2:
            for j in tl.static_range(M):
                idx = tl.load(pairs_ptr + rows * M + j, mask=rmask, other=-1)
                ok = msk & (idx >= 0)[:, None]
                src = tl.where(idx >= 0, idx, 0).to(tl.int64)
                target += tl.load(pt_ptr + src[:, None] * K + ks[None, :], mask=ok, other=0.0).to(ACC)
        if DO_S:
            b = tl.load(bs_ptr + ks, mask=kmask, other=0.0).to(ACC)
            s = tl.load(ls_ptr + off, mask=msk, other=0.0).to(ACC) * inv_tau_s + b[None, :]
            cross += tl.sum(tl.where(msk, target * s, 0.0), axis=1)
            if NEED_G:
                p = tl.exp(s - lse_s[:, None])
                g = tl.where(msk, a[:, None] * (cnt[:, None] * p - target), 0.0)
                tl.store(g_ptr + off, (g * inv_tau_s).to(g_ptr.dtype.element_ty), mask=msk)
                db = tl.load(dbp_ptr + part + ks, mask=kmask, other=0.0)
                tl.store(dbp_ptr + part + ks, db + tl.sum(g, axis=0), mask=kmask)
    if DO_S:
        tl.store(loss_ptr + rows, a * (cnt * lse_s - cross), mask=rmask)


_ACC = {torch.float32: tl.float32, torch.float64: tl.float64}


def programs(chunk: int) -> int:
    """Programs per chunk launch (= rows of the partial-sum buffers)."""
    return triton.cdiv(chunk, BLOCK_M)


def chunk_step(*, k: int, inv_tau_s: float, inv_tau_t: float, acc: torch.dtype, dbp: Tensor,
               pmp: Tensor, pup: Tensor | None = None, ls: Tensor | None = None,
               b_s: Tensor | None = None, lt: Tensor | None = None, b_tc: Tensor | None = None,
               centre: Tensor | None = None, pt: Tensor | None = None,
               pairs: Tensor | None = None, a: Tensor | None = None, g: Tensor | None = None,
               row_loss: Tensor | None = None, write_pt: bool = False) -> None:
    """One launch for one chunk (see the module docstring). ls / lt: raw logits [C, K] (any float
    dtype, row stride K); pt: [Nt, K] teacher probabilities (pairs mode) or the output of the
    teacher-only mode (pt is lt, in place); pairs [C, m] int64 (−1 = none); a [C] row weights
    w_i / Σ w c; g [C, K] output in the GEMM dtype (None: no gradient); row_loss [C] output;
    dbp / pmp / pup [programs(chunk), K] partial sums (acc dtype), accumulated; centre [K] and pup
    go with lt (l_t + centre are the uncentred logits whose softmax pup sums)."""
    ref = ls if ls is not None else lt
    c = ref.shape[0]
    dummy = torch.empty(1, dtype=acc, device=ref.device)
    do_s = ls is not None
    teacher = 1 if lt is not None else 2 if pairs is not None else 0
    m = pairs.shape[1] if pairs is not None else 1
    _chunk_kernel[(triton.cdiv(c, BLOCK_M),)](
        ls if do_s else dummy, b_s if do_s else dummy, lt if teacher == 1 else dummy,
        b_tc if teacher == 1 else dummy, centre if teacher == 1 else dummy,
        pt if pt is not None else dummy,
        pairs if pairs is not None else dummy, a if a is not None else dummy,
        g if g is not None else dummy, row_loss if row_loss is not None else dummy,
        dbp, pmp, pup if teacher == 1 else dummy, c, k, inv_tau_s, inv_tau_t,
        DO_S=do_s, TEACHER=teacher, WRITE_PT=write_pt, NEED_G=g is not None, M=m, ACC=_ACC[acc],
        BLOCK_M=BLOCK_M)
