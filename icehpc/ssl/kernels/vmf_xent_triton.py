"""Fused Triton backend of ``vmf_xent``: no N×K tensor in forward or backward.

Algebra (per student row i, target T_i = Σ_{j∈pairs(i)} P_t[j], c_i = |pairs(i)|, a_i = w_i / Σ w c):

  loss   = Σ_i a_i (c_i·lse_s[i] − Σ_k T_ik l_s[i,k])
  Σ_k P_t[j,k] l_s[i,k] = zs_i·U_j/τ_s + v_j   with U_j = P_t[j] @ ws  [D],  v_j = P_t[j]·b_s
  ∂/∂zs_i = a_i (c_i·O_i − Σ_{j∈pairs(i)} U_j)/τ_s   with O_i = P_s[i] @ ws  [D]
  ∂/∂ws_k = (1/τ_s) Σ_i G_ik zs_i,  ∂/∂b_s[k] = Σ_i G_ik,  G = a·c·P_s − Σ_pairs a·P_t

So a *row* pass per side (online softmax over K tiles, like flash attention with the prototypes
as values; K split over programs when there are few rows) gives lse_s, O and lse_t, U, v for every
row, hence the loss and ∂zs; one *column* pass (logits recomputed tile by tile from the saved
per-row lse, student and teacher in the same program for the identity pairing so that G·zs is one
product) gives ∂ws, ∂b_s and Σ_j P_t[j] (the teacher_prob_mean statistic). Probability centring
needs the probabilities BEFORE centring, softmax(l_t + centre): the teacher row pass also keeps
their logsumexp lse_u (a second online max/sum over the same logit tiles, one more exp per logit)
and the column pass sums exp(l_t + centre − lse_u) next to P_t, so that statistic costs no second
pass over the N×K teacher logits (one more exp per logit there too). The loss is linear in
P_t, so with ``pairs`` the teacher rows are processed once each and their U_j, v_j (and, for the
column pass, the paired student rows summed per teacher row) are combined by an O(N·m·D) gather,
never per pair over K. Both passes run in the forward (the loss is a scalar, so the backward only
scales the saved fp32 gradients); the column pass is needed there anyway for the statistics.
Student and teacher row passes are separate launches: fused, two [BLOCK_N, D] fp32 accumulators
spill registers on sm_90 (ptxas, D = 256), while the prototype tiles re-read come from L2.
Matmul count per step: 4 N×K×D in the row passes, 3 in the column pass (plain autograd: 4).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from .vmf_xent_torch import UNCENTRED, check_pairs, vmf_bias

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# The D axis is one tile: the row kernel holds a [BLOCK_N, D] fp32 accumulator in registers and the
# column kernel a [BLOCK_K, D] one, and their pipelined [BLOCK, D] operand tiles sit in shared
# memory. At D = 256 the sm_90a compiles (bench/vmf_kernel.py --aot) need up to 196 KiB of the
# 227 KiB an H100/H200 block may use, and shared memory grows linearly with D, so 256 is the
# largest D every config fits (larger D: the "chunked" or "torch" backend). The same limit holds
# under the interpreter so that the CPU tests promise what the GPU can do.
MAX_D = 256
SMEM_LIMIT = 227 * 1024  # bytes of shared memory per block on sm_90


# bf16 configs per kernel variant (BLOCK_N, BLOCK_K, warps, stages): only those whose sm_90a
# compile at D = 256 spills no register with BOTH Triton 3.6 (the GPU image's) and 3.8 (this
# venv's): ptxas -v via `python bench/vmf_kernel.py --aot`, run once per Triton (3.6 from a side
# folder: `pip install --target DIR triton==3.6.0`, PYTHONPATH=DIR); 3.6 spilled 12–1,264 B/thread
# in 10 of the 20 configs kept for 3.8 alone (teacher row 836 B, identity column 260 B). Larger
# tiles (128×128, 8 warps, 3 stages) where they fit that rule. Row variants are
# (SAME_W, NEED_O, NEED_V; the teacher's, NEED_V, also has NEED_U), column variants (DO_S, DO_T,
# NEED_DW). A variant whose launch still runs out of resources falls back to _SAFE_CONFIG (_launch).
ROW_VARIANT_CONFIGS = {
    (1, 1, 0): [(32, 64, 4, 2), (32, 64, 4, 3)],  # student: lse_s, O = P_s@ws
    # teacher: lse_t, U = P_t@ws, v = P_t·b_s, lse_u ((16, 64, 8, 2) spilled 36 B with lse_u, 3.6)
    (0, 1, 1): [(32, 32, 8, 2), (16, 32, 4, 2)],
    (0, 0, 0): [(32, 64, 4, 2), (64, 64, 8, 2), (128, 64, 8, 2), (64, 128, 8, 3), (128, 128, 8, 3)],
}
COL_VARIANT_CONFIGS = {
    (1, 1, 1): [(16, 16, 4, 2)],  # identity pairing: student and teacher in one program
    (1, 0, 1): [(32, 32, 4, 2)],
    (0, 1, 1): [(16, 16, 4, 2)],  # (16, 32, 8, 2) spilled 24 B with Σ softmax(uncentred) (3.6)
    (0, 1, 0): [(32, 64, 4, 2), (64, 128, 8, 3)],
}


def _cfg(bn: int, bk: int, w: int, s: int) -> triton.Config:
    return triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)


def _union(table: dict) -> list[triton.Config]:
    return [_cfg(*c) for c in dict.fromkeys(c for cs in table.values() for c in cs)]


def _row_configs() -> list[triton.Config]:
    """Union of the per-variant lists (_prune keeps the launched variant's own); the row kernel
    holds a [BLOCK_N, D] fp32 accumulator, D ~ 256."""
    if INTERPRET:  # the interpreter fails with several autotune configs
        return [triton.Config({"BLOCK_N": 16, "BLOCK_K": 32}, num_warps=4)]
    return _union(ROW_VARIANT_CONFIGS)


def _col_configs() -> list[triton.Config]:
    if INTERPRET:
        return [triton.Config({"BLOCK_N": 16, "BLOCK_K": 32}, num_warps=4)]
    return _union(COL_VARIANT_CONFIGS)


def variant_configs(kind: str, flags: dict) -> list[triton.Config]:
    """The bf16 configs of one kernel variant (kind "row" or "col", flags by name)."""
    if kind == "row":
        return [_cfg(*c) for c in ROW_VARIANT_CONFIGS[
            (int(flags["SAME_W"]), int(flags["NEED_O"]), int(flags["NEED_V"]))]]
    return [_cfg(*c) for c in COL_VARIANT_CONFIGS[
        (int(flags["DO_S"]), int(flags["DO_T"]), int(flags["NEED_DW"]))]]


# fp32 inputs on the GPU: one small config (fp32 tiles double the shared memory and the compile time)
_FP32_CONFIG = triton.Config({"BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)


# A variant whose configs ran out of resources at launch on this device / Triton (shared memory,
# registers: Triton 3.6 allocates differently from the 3.8 the tables were made with) falls back,
# for the rest of the process, to this small config (see _launch).
_SAFE_CONFIG = triton.Config({"BLOCK_N": 16, "BLOCK_K": 32}, num_warps=4, num_stages=1)
_FALLBACK: set[tuple] = set()  # (kind, flag values) that ran out of resources


def _variant_key(kind: str, arg) -> tuple:
    flags = ("SAME_W", "NEED_O", "NEED_V") if kind == "row" else ("DO_S", "DO_T", "NEED_DW")
    return (kind, *(int(bool(arg(f))) for f in flags))


def _launch(kernel, kind: str, grid, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``; when it raises OutOfResources, the variant falls back to
    _SAFE_CONFIG and the launch is retried once. (The autotuner's benchmark gives a config that
    runs out of resources an infinite time, but a variant with ONE config still gets it, and the
    launch raises; its cached choices are forgotten so that the key is pruned again.)"""
    from triton.runtime.errors import OutOfResources

    try:
        kernel[grid](*args, **kwargs)
    except OutOfResources as exc:
        key = _variant_key(kind, kwargs.get)
        if key in _FALLBACK:
            raise
        _FALLBACK.add(key)
        import warnings

        warnings.warn(f"vmf_xent {kind} kernel {key[1:]}: {exc}; falling back to {_SAFE_CONFIG}",
                      RuntimeWarning, stacklevel=2)
        getattr(kernel, "cache", {}).clear()
        kernel[grid](*args, **kwargs)


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Half inputs: the launched variant's spill-free configs (those of ``configs`` in its table
    entry); fp32 gets _FP32_CONFIG; a variant that ran out of resources, _SAFE_CONFIG. The
    interpreter keeps what it is given (tests patch it)."""
    arg = lambda n: kwargs.get(n, named_args.get(n))  # noqa: E731
    if _FALLBACK and _variant_key("row" if arg("SAME_W") is not None else "col", arg) in _FALLBACK:
        return [_SAFE_CONFIG]
    if INTERPRET:
        return configs
    if arg("DOT") == tl.float32:
        return [_FP32_CONFIG]
    kind = "row" if "SAME_W" in kwargs or "SAME_W" in named_args else "col"
    flags = ("SAME_W", "NEED_O", "NEED_V") if kind == "row" else ("DO_S", "DO_T", "NEED_DW")
    have = {str(c): c for c in configs}
    keep = [have[str(c)] for c in variant_configs(kind, {f: arg(f) for f in flags}) if str(c) in have]
    return keep or configs


def n_bucket(n: int) -> int:
    """Autotune key of a row count: its log2 bucket (n.bit_length()). The masked-patch count
    changes every step; the best tile shape does not change within a factor of two of rows."""
    return max(int(n), 1).bit_length()


# Keys: what changes the best config (K, D tile, flags, precision, a log2 bucket of N; the
# autotuner adds every tensor argument's dtype itself), never N: N varies step to step.
@triton.autotune(configs=_row_configs(),
                 key=["N_BUCKET", "K", "BLOCK_D", "SAME_W", "NEED_O", "NEED_V", "NEED_U", "PRECISION"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _row_kernel(x_ptr, wl_ptr, bl_ptr, wv_ptr, c_ptr, cu_ptr, lse_ptr, o_ptr, v_ptr, lse_u_ptr,
                N, K, D, inv_tau, N_BUCKET,
                SAME_W: tl.constexpr, NEED_O: tl.constexpr, NEED_V: tl.constexpr,
                NEED_U: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Per row block and K split (grid axis 1), online softmax over the split's K tiles of the
    logits l = x@wlᵀ·inv_tau + bl; writes lse, O = P@wv [D] (NEED_O; wv = wl when SAME_W) and
    v = P·c (NEED_V), each normalised within the split, to [split, N(, D)] fp32 (the host combines
    several splits; an empty split writes lse = −inf and zeros). NEED_U: also lse_u, the
    logsumexp of the logits before centring, l + cu (cu = the centre; for probability centring)."""
    pid_s = tl.program_id(1)
    n_split = tl.num_programs(1)
    chunk = tl.cdiv(tl.cdiv(K, n_split), BLOCK_K) * BLOCK_K
    k_lo = pid_s * chunk
    k_hi = tl.minimum(k_lo + chunk, K)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    cols = tl.arange(0, BLOCK_D)
    dmask = cols < D
    xmask = rmask[:, None] & dmask[None, :]
    x = tl.load(x_ptr + rows[:, None] * D + cols[None, :], mask=xmask, other=0.0).to(DOT)
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_N], tl.float32)
    if NEED_O:
        o = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    if NEED_V:
        v = tl.zeros([BLOCK_N], tl.float32)
    if NEED_U:
        m_u = tl.full([BLOCK_N], float("-inf"), tl.float32)
        l_u = tl.zeros([BLOCK_N], tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        kmask = ks < k_hi
        woff = ks[:, None] * D + cols[None, :]
        wmask = kmask[:, None] & dmask[None, :]
        w_l = tl.load(wl_ptr + woff, mask=wmask, other=0.0).to(DOT)
        b_l = tl.load(bl_ptr + ks, mask=kmask, other=float("-inf"))  # −inf: padded prototypes
        z = tl.dot(x, tl.trans(w_l), input_precision=PRECISION) * inv_tau + b_l[None, :]
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(z - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        if NEED_U:  # its own running max (the centre shifts each prototype differently); first,
            zu = z + tl.load(cu_ptr + ks, mask=kmask, other=0.0)[None, :]  # so z dies before the dot
            mu_new = tl.maximum(m_u, tl.max(zu, axis=1))
            l_u = l_u * tl.exp(m_u - mu_new) + tl.sum(tl.exp(zu - mu_new[:, None]), axis=1)
            m_u = mu_new
        if NEED_O:
            if SAME_W:
                w_v = w_l
            else:
                w_v = tl.load(wv_ptr + woff, mask=wmask, other=0.0).to(DOT)
            o = o * alpha[:, None] + tl.dot(p.to(DOT), w_v, input_precision=PRECISION)
        if NEED_V:
            c = tl.load(c_ptr + ks, mask=kmask, other=0.0)
            v = v * alpha + tl.sum(p * c[None, :], axis=1)
        m = m_new
    out_row = pid_s.to(tl.int64) * N + rows  # into [split, N] and, times D, [split, N, D]
    l1 = tl.where(l > 0, l, 1.0)
    tl.store(lse_ptr + out_row, tl.where(l > 0, m + tl.log(l1), float("-inf")), mask=rmask)
    if NEED_O:
        tl.store(o_ptr + out_row[:, None] * D + cols[None, :], o / l1[:, None], mask=xmask)
    if NEED_V:
        tl.store(v_ptr + out_row, v / l1, mask=rmask)
    if NEED_U:
        tl.store(lse_u_ptr + out_row, tl.where(l_u > 0, m_u + tl.log(tl.where(l_u > 0, l_u, 1.0)),
                                               float("-inf")), mask=rmask)


# restore_value, not reset_to_zero: the outputs ACCUMULATE (in pairs mode the second launch adds
# to the first one's dw/db/pm). The autotuner zeroes reset_to_zero buffers before each benchmark
# run and once more after benchmarking, which would drop the first launch's contribution on the
# first call per key; restore_value snapshots them before each benchmark run and copies them back.
@triton.autotune(configs=_col_configs(),
                 key=["N_BUCKET", "K", "BLOCK_D", "DO_S", "DO_T", "NEED_DW", "Y_IS_XS", "PRECISION"],
                 restore_value=["dw_ptr", "db_ptr", "pm_ptr", "pu_ptr"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _col_kernel(xs_ptr, ws_ptr, bs_ptr, lse_s_ptr, as_ptr,
                xt_ptr, wt_ptr, bt_ptr, lse_t_ptr, atw_ptr, atb_ptr, cu_ptr, lse_u_ptr,
                y_ptr, dw_ptr, db_ptr, pm_ptr, pu_ptr,
                N, K, D, inv_tau_s, inv_tau_t, N_BUCKET,
                DO_S: tl.constexpr, DO_T: tl.constexpr, NEED_DW: tl.constexpr, Y_IS_XS: tl.constexpr,
                DOT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Per K tile and row split, recompute P tiles from the saved lse and reduce over rows:
    G = as·P_s − atw·P_t;  dw += Gᵀ@y (y = the student rows xs when Y_IS_XS);
    db += Σ_rows (as·P_s − atb·P_t);  pm += Σ_rows P_t;  pu += Σ_rows softmax(l_t + cu), the
    teacher's probabilities before centring (cu = the centre, lse_u their row logsumexp).
    Outputs are fp32 and accumulated with atomics across the row splits (grid axis 1)."""
    pid_k = tl.program_id(0)
    n_split = tl.num_programs(1)
    chunk = tl.cdiv(tl.cdiv(N, n_split), BLOCK_N) * BLOCK_N
    row_start = tl.program_id(1).to(tl.int64) * chunk
    row_end = tl.minimum(row_start + chunk, N)
    ks = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = ks < K
    cols = tl.arange(0, BLOCK_D)
    dmask = cols < D
    woff = ks[:, None] * D + cols[None, :]
    wmask = kmask[:, None] & dmask[None, :]
    # bias −inf on padded prototypes (and lse +inf on padded rows) makes their P exactly 0
    if DO_S:
        b_s = tl.load(bs_ptr + ks, mask=kmask, other=float("-inf"))
    if DO_T:
        b_t = tl.load(bt_ptr + ks, mask=kmask, other=float("-inf"))
        c_u = tl.load(cu_ptr + ks, mask=kmask, other=0.0)
        pm = tl.zeros([BLOCK_K], tl.float32)
        pu = tl.zeros([BLOCK_K], tl.float32)
    db = tl.zeros([BLOCK_K], tl.float32)
    if NEED_DW:
        dw = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
    for r0 in range(row_start, row_end, BLOCK_N):
        rows = r0 + tl.arange(0, BLOCK_N)
        rmask = rows < row_end
        xoff = rows[:, None] * D + cols[None, :]
        xmask = rmask[:, None] & dmask[None, :]
        # the tiles are computed transposed, [BLOCK_K, BLOCK_N] = w@xᵀ, so that Gᵀ feeds the ∂w
        # product as the A operand straight from registers (no tl.trans of the G accumulator,
        # which costs a register→shared round trip); xᵀ is a layout of the loaded operand
        gt = tl.zeros([BLOCK_K, BLOCK_N], tl.float32)
        # prototype tiles re-read each step (L2 hits) rather than held across the loop: fewer
        # register spills next to the [BLOCK_K, D] accumulator in most variants (ptxas, sm_90a)
        if DO_S:
            w_s = tl.load(ws_ptr + woff, mask=wmask, other=0.0).to(DOT)
            xs = tl.load(xs_ptr + xoff, mask=xmask, other=0.0).to(DOT)
            lse_s = tl.load(lse_s_ptr + rows, mask=rmask, other=float("inf"))
            a_s = tl.load(as_ptr + rows, mask=rmask, other=0.0)
            st = tl.dot(w_s, tl.trans(xs), input_precision=PRECISION) * inv_tau_s + b_s[:, None]
            pt = a_s[None, :] * tl.exp(st - lse_s[None, :])
            gt += pt
            db += tl.sum(pt, axis=1)
        if DO_T:
            w_t = tl.load(wt_ptr + woff, mask=wmask, other=0.0).to(DOT)
            xt = tl.load(xt_ptr + xoff, mask=xmask, other=0.0).to(DOT)
            lse_t = tl.load(lse_t_ptr + rows, mask=rmask, other=float("inf"))
            tt = tl.dot(w_t, tl.trans(xt), input_precision=PRECISION) * inv_tau_t + b_t[:, None]
            lse_u = tl.load(lse_u_ptr + rows, mask=rmask, other=float("inf"))
            pu += tl.sum(tl.exp(tt + c_u[:, None] - lse_u[None, :]), axis=1)
            qt = tl.exp(tt - lse_t[None, :])
            pm += tl.sum(qt, axis=1)
            if NEED_DW:
                a_tw = tl.load(atw_ptr + rows, mask=rmask, other=0.0)
                a_tb = tl.load(atb_ptr + rows, mask=rmask, other=0.0)
                gt -= a_tw[None, :] * qt
                db -= tl.sum(a_tb[None, :] * qt, axis=1)
        if NEED_DW:
            if Y_IS_XS:
                y = xs
            else:
                y = tl.load(y_ptr + xoff, mask=xmask, other=0.0).to(DOT)
            dw += tl.dot(gt.to(DOT), y, input_precision=PRECISION)
    if NEED_DW:
        tl.atomic_add(dw_ptr + woff, dw, mask=wmask)
        tl.atomic_add(db_ptr + ks, db, mask=kmask)
    if DO_T:
        tl.atomic_add(pm_ptr + ks, pm, mask=kmask)
        tl.atomic_add(pu_ptr + ks, pu, mask=kmask)


_DOT_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _dot_setup(dtype: torch.dtype) -> tuple[tl.dtype, str]:
    """Operand type of tl.dot and its fp32 precision. The interpreter computes bf16/fp16 wrongly, so
    there every tile is cast to fp32 right after tl.load; on the GPU half inputs stay half (tensor
    cores, fp32 accumulation) and fp32 follows torch's TF32 matmul switch: TF32 when allowed, else
    3×TF32 (about fp32 accuracy on tensor cores; plain fp32 FMA dots compile for minutes)."""
    if dtype not in _DOT_DTYPES:
        raise TypeError(f"triton backend takes float32/bfloat16/float16 inputs, got {dtype}")
    if INTERPRET:
        return tl.float32, "ieee"
    if dtype == torch.float32:
        return tl.float32, "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"
    return _DOT_DTYPES[dtype], "ieee"


def _sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _col_grid(n_rows: int, k: int, device: torch.device):
    """Column pass grid (K tiles, row splits): about four programs per SM. The interpreter uses
    two row splits so that the CPU tests exercise the atomics across splits."""
    if INTERPRET or device.type != "cuda":
        return lambda meta: (triton.cdiv(k, meta["BLOCK_K"]), 2 if n_rows > 16 else 1)
    sms = _sms(device)
    return lambda meta: (triton.cdiv(k, meta["BLOCK_K"]),
                         max(1, min(triton.cdiv(4 * sms, triton.cdiv(k, meta["BLOCK_K"])),
                                    triton.cdiv(n_rows, meta["BLOCK_N"]))))


def _k_splits(n_rows: int, k: int, device: torch.device) -> int:
    """K splits of the row pass: few rows (the DINO [CLS] loss, Nt = 2·batch) would leave most
    SMs idle, so the K axis is split (flash-decoding style) and the splits combined on the host.
    The interpreter uses two splits whenever K spans more than one tile, to test the combine."""
    if INTERPRET or device.type != "cuda":
        return 2 if k > 32 else 1
    return max(1, min(triton.cdiv(2 * _sms(device), triton.cdiv(n_rows, 64)), k // 1024))


def _combine(lse: Tensor, *vals: Tensor) -> tuple[Tensor, ...]:
    """Merge per-split softmax results: lse [S, N], vals [S, N(, D)] each normalised in its split."""
    if lse.shape[0] == 1:
        return (lse[0], *(v[0] for v in vals))
    total = torch.logsumexp(lse, dim=0)
    share = torch.exp(lse - total)  # [S, N], 0 for empty splits (lse = −inf)
    return (total, *((share.view(*share.shape, *[1] * (v.dim() - 2)) * v).sum(0) for v in vals))


def _row_pass(x: Tensor, w_logit: Tensor, b_logit: Tensor, inv_tau: float, w_value: Tensor | None,
              c_value: Tensor | None, split: int | None = None, centre: Tensor | None = None
              ) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Softmax over K of x@w_logitᵀ·inv_tau + b_logit per row, never stored: returns lse [N],
    P@w_value [N, D] (or None), P·c_value [N] (or None) and, with ``centre`` [K], the logsumexp of
    the logits + centre [N] (or None), fp32. split: K splits (default: by occupancy, see
    _k_splits)."""
    n, d = x.shape
    k = w_logit.shape[0]
    split = split or _k_splits(n, k, x.device)
    f32 = dict(dtype=torch.float32, device=x.device)
    dummy = torch.empty(1, **f32)
    need_o, need_v, need_u = w_value is not None, c_value is not None, centre is not None
    lse = torch.empty(split, n, **f32)
    o = torch.empty(split, n, d, **f32) if need_o else dummy
    v = torch.empty(split, n, **f32) if need_v else dummy
    lse_u = torch.empty(split, n, **f32) if need_u else dummy
    dot, prec = _dot_setup(x.dtype)
    _launch(_row_kernel, "row", lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), split),
        x, w_logit, b_logit, w_value if need_o else x, c_value if need_v else dummy,
        centre if need_u else dummy, lse, o, v, lse_u, n, k, d, inv_tau, n_bucket(n),
        SAME_W=w_value is w_logit, NEED_O=need_o, NEED_V=need_v, NEED_U=need_u,
        DOT=dot, PRECISION=prec, BLOCK_D=max(16, triton.next_power_of_2(d)))
    lse_u = torch.logsumexp(lse_u, dim=0) if need_u else None  # the splits' shares of Σ exp
    lse, *rest = _combine(lse, *([o] if need_o else []), *([v] if need_v else []))
    return lse, (rest.pop(0) if need_o else None), (rest.pop(0) if need_v else None), lse_u


def _col_pass(ws: Tensor, wt: Tensor, b_s: Tensor, b_t: Tensor, inv_tau_s: float, inv_tau_t: float,
              dw: Tensor, db: Tensor, pm: Tensor, pu: Tensor, *, xs: Tensor | None = None,
              lse_s: Tensor | None = None, a_s: Tensor | None = None, xt: Tensor | None = None,
              lse_t: Tensor | None = None, a_tw: Tensor | None = None, a_tb: Tensor | None = None,
              centre: Tensor | None = None, lse_u: Tensor | None = None,
              y: Tensor | None = None) -> None:
    """Launch the column kernel; accumulates into dw [K, D], db [K], pm [K], pu [K] (fp32,
    zeroed). The teacher side (xt) needs lse_t and, for pu, the centre and lse_u."""
    x = xs if xs is not None else xt
    n, d = x.shape
    k = ws.shape[0]
    dummy = torch.empty(1, dtype=torch.float32, device=x.device)
    do_s, do_t, need_dw = xs is not None, xt is not None, y is not None
    dot, prec = _dot_setup(x.dtype)
    _launch(_col_kernel, "col", _col_grid(n, k, x.device),
        x, ws, b_s, lse_s if do_s else dummy, a_s if do_s else dummy,
        xt if do_t else x, wt, b_t, lse_t if do_t else dummy, a_tw if do_t else dummy,
        a_tb if do_t else dummy, centre if do_t else dummy, lse_u if do_t else dummy,
        y if need_dw else x, dw, db, pm, pu,
        n, k, d, inv_tau_s, inv_tau_t, n_bucket(n),
        DO_S=do_s, DO_T=do_t, NEED_DW=need_dw, Y_IS_XS=do_s and y is xs, DOT=dot, PRECISION=prec,
        BLOCK_D=max(16, triton.next_power_of_2(d)))


class _VmfXentFn(torch.autograd.Function):
    """loss (scalar), Σ_j P_t[j] and Σ_j softmax(l_t[j] + centre) (the teacher's probabilities
    before centring; both non-differentiable); gradients for zs, ws (matmul part) and b_s are
    computed in the forward and scaled in the backward. b_t: the centred bias b_t − centre."""

    @staticmethod
    def forward(ctx, zs: Tensor, ws: Tensor, b_s: Tensor, zt: Tensor, wt: Tensor, b_t: Tensor,
                centre: Tensor, w: Tensor, pairs: Tensor | None, tau_s: float, tau_t: float
                ) -> tuple[Tensor, Tensor, Tensor]:
        ns, d = zs.shape
        k = ws.shape[0]
        need_z, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        its, itt = 1.0 / tau_s, 1.0 / tau_t
        f32 = dict(dtype=torch.float32, device=zs.device)
        b_s32 = b_s.detach().float().contiguous()
        dw = torch.zeros(k, d, **f32) if need_w else torch.empty(1, **f32)
        db = torch.zeros(k, **f32)
        pm = torch.zeros(k, **f32)
        pu = torch.zeros(k, **f32)
        # student: lse_s and O = P_s@ws; teacher: lse_t, U = P_t@ws, v = P_t·b_s, lse_u (uncentred)
        lse_s, o, _, _ = _row_pass(zs, ws, b_s32, its, ws if need_z else None, None)
        lse_t, u, v, lse_u = _row_pass(zt, wt, b_t, itt, ws, b_s32, centre=centre)
        teacher = dict(xt=zt, lse_t=lse_t, centre=centre, lse_u=lse_u)
        if pairs is None:
            count = torch.ones(ns, **f32)
            den = w.sum()
            inv_den = torch.where(den > 0, 1.0 / den, torch.zeros_like(den))
            a = w * inv_den
            u_bar, v_bar = u, v
            if need_w:
                _col_pass(ws, wt, b_s32, b_t, its, itt, dw, db, pm, pu, xs=zs, lse_s=lse_s, a_s=a,
                          a_tw=a, a_tb=a, y=zs, **teacher)
            else:
                _col_pass(ws, wt, b_s32, b_t, its, itt, dw, db, pm, pu, **teacher)
        else:
            valid = pairs >= 0
            idx = pairs.clamp_min(0)
            count = valid.sum(1).float()
            den = (w * count).sum()
            inv_den = torch.where(den > 0, 1.0 / den, torch.zeros_like(den))
            a = w * inv_den
            vm = valid.float()
            u_bar = torch.einsum("im,imd->id", vm, u[idx])
            v_bar = (vm * v[idx]).sum(1)
            if need_w:
                _col_pass(ws, wt, b_s32, b_t, its, itt, dw, db, pm, pu, xs=zs, lse_s=lse_s,
                          a_s=a * count, y=zs)
                # per teacher row j: Σ_{i paired with j} a_i (for b_s) and a_i·zs_i (for ws). Fixed
                # shapes [Ns·m]: −1 entries add 0 to row 0 (no boolean indexing, no host sync)
                flat_j = idx.reshape(-1)
                a_pair = (a.unsqueeze(1) * vm).reshape(-1)
                a_t = torch.zeros(zt.shape[0], **f32).index_add_(0, flat_j, a_pair)
                z_t = torch.zeros(zt.shape[0], d, **f32).index_add_(
                    0, flat_j, (a_pair.view(ns, -1, 1) * zs.float().unsqueeze(1)).reshape(-1, d))
                _col_pass(ws, wt, b_s32, b_t, its, itt, dw, db, pm, pu, a_tw=torch.ones_like(a_t),
                          a_tb=a_t, y=z_t, **teacher)
            else:
                _col_pass(ws, wt, b_s32, b_t, its, itt, dw, db, pm, pu, **teacher)
        cross = (zs.float() * u_bar).sum(1) * its + v_bar
        loss = (a * (count * lse_s - cross)).sum()
        dz = (a * count * its).unsqueeze(1) * o - (a * its).unsqueeze(1) * u_bar if need_z else None
        ctx.save_for_backward(dz, dw if need_w else None, db if need_w else None)
        ctx.dtypes = (zs.dtype, ws.dtype, b_s.dtype)
        ctx.inv_tau_s = its
        ctx.mark_non_differentiable(pm, pu)
        return loss, pm, pu

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_loss: Tensor, _g_pm: Tensor, _g_pu: Tensor) -> tuple[Tensor | None, ...]:
        dz, dw, db = ctx.saved_tensors
        tz, tw, tb = ctx.dtypes
        gz = (g_loss * dz).to(tz) if ctx.needs_input_grad[0] else None
        gw = (g_loss * ctx.inv_tau_s * dw).to(tw) if ctx.needs_input_grad[1] else None
        gb = (g_loss * db).to(tb) if ctx.needs_input_grad[2] else None
        return gz, gw, gb, None, None, None, None, None, None, None, None


def vmf_xent_triton(zs: Tensor, ws: Tensor, zt: Tensor, wt: Tensor, center: Tensor, tau_s: float,
                    tau_t: float, pairs: Tensor | None = None, weights: Tensor | None = None,
                    vmf: bool = True, bias_s: Tensor | None = None, bias_t: Tensor | None = None
                    ) -> tuple[Tensor, dict[str, Tensor]]:
    """Fused ``vmf_xent`` (same contract as the torch reference). Inputs fp32/bf16/fp16, one dtype;
    the loss is fp32 and so are the statistics."""
    ns, d = zs.shape
    nt, k = zt.shape[0], ws.shape[0]
    if not (ws.shape == wt.shape == (k, d) and zt.shape[1] == d and center.shape == (k,)):
        raise ValueError(f"shape mismatch: zs {tuple(zs.shape)} ws {tuple(ws.shape)} zt "
                         f"{tuple(zt.shape)} wt {tuple(wt.shape)} center {tuple(center.shape)}")
    if len({zs.dtype, ws.dtype, zt.dtype, wt.dtype}) != 1:
        raise TypeError("zs, ws, zt, wt must share one dtype")
    if d > MAX_D:
        raise ValueError(f"triton backend supports D <= {MAX_D} (its tiles must fit in the "
                         f"{SMEM_LIMIT // 1024} KiB of shared memory of an sm_90 block), got D = {d}; "
                         f"use backend='chunked' or 'torch'")
    if pairs is None and ns != nt:
        raise ValueError(f"pairs=None pairs row i with row i, so Ns ({ns}) must equal Nt ({nt})")
    if not zs.is_cuda and not INTERPRET:
        raise RuntimeError("triton backend needs CUDA tensors (or TRITON_INTERPRET=1 before import)")
    if pairs is not None:
        if pairs.dim() != 2 or pairs.shape[0] != ns:
            raise ValueError(f"pairs must be [Ns={ns}, m], got {tuple(pairs.shape)}")
        pairs = pairs.to(device=zs.device, dtype=torch.long, non_blocking=True)
        check_pairs(pairs, nt)  # on the device for CUDA tensors: no host round trip
    zs, ws, zt, wt = (t.contiguous() for t in (zs, ws, zt, wt))
    b_s = vmf_bias(ws, tau_s, vmf, bias_s)
    if b_s is None:
        b_s = torch.zeros(k, dtype=torch.float32, device=zs.device)
    with torch.no_grad():
        b_t = vmf_bias(wt.detach(), tau_t, vmf, None if bias_t is None else bias_t.detach())
        b_t = torch.zeros(k, dtype=torch.float32, device=zs.device) if b_t is None else b_t.float()
        # mean of the uncentred teacher logits is linear in zt: one [D]·[K, D] product
        logit_mean = (zt.float().mean(0) @ wt.detach().float().T) / tau_t + b_t
        w = (torch.ones(ns, dtype=torch.float32, device=zs.device) if weights is None
             else weights.detach().to(device=zs.device, dtype=torch.float32))
        centre = center.detach().float().contiguous()
        b_tc = (b_t - centre).contiguous()
    loss, pm, pu = _VmfXentFn.apply(zs, ws, b_s, zt.detach(), wt.detach(), b_tc, centre, w, pairs,
                                    tau_s, tau_t)
    return loss, {"teacher_logit_mean": logit_mean, "teacher_prob_mean": pm / nt,
                  UNCENTRED: pu / nt}
