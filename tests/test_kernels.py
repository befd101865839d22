"""vmf_xent: the fused Triton kernel (interpreter on the CPU, real on CUDA) against a float64
PyTorch reference; the reference itself against finite differences and an explicit per-pair loop."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from icehpc.ssl.kernels import UNCENTRED, crop_pairs, vmf_xent

ROOT = Path(__file__).resolve().parent.parent
OUTS = ("loss", "grad_zs", "grad_ws", "teacher_logit_mean", "teacher_prob_mean", UNCENTRED)


def make_inputs(ns: int, nt: int, k: int, d: int, seed: int = 0, w_scale: float = 1.0,
                zero_frac: float = 0.25) -> dict[str, torch.Tensor]:
    """Unit-norm rows, unnormalised prototypes (‖w‖ varies per prototype), weights with zeros."""
    g = torch.Generator().manual_seed(seed)
    return {
        "zs": F.normalize(torch.randn(ns, d, generator=g, dtype=torch.float64), dim=1),
        "ws": torch.randn(k, d, generator=g, dtype=torch.float64) * w_scale
        * torch.rand(k, 1, generator=g, dtype=torch.float64).add(0.5),
        "zt": F.normalize(torch.randn(nt, d, generator=g, dtype=torch.float64), dim=1),
        "wt": torch.randn(k, d, generator=g, dtype=torch.float64) * w_scale,
        "center": torch.randn(k, generator=g, dtype=torch.float64) * 0.3,
        "weights": torch.rand(ns, generator=g, dtype=torch.float64)
        * (torch.rand(ns, generator=g) >= zero_frac),
    }


def make_pairs(ns: int, nt: int, m: int, seed: int = 0) -> torch.Tensor:
    """[ns, m] teacher indices with −1 padding, one row all −1, repeated indices allowed."""
    g = torch.Generator().manual_seed(seed + 1)
    pairs = torch.randint(0, nt, (ns, m), generator=g)
    pairs[torch.rand(ns, m, generator=g) < 0.3] = -1
    pairs[0] = -1
    return pairs


def run(inp: dict, backend: str, dtype: torch.dtype, device: str = "cpu", *, pairs=None,
        vmf: bool = True, tau_s: float = 0.1, tau_t: float = 0.04, grad: tuple = (True, True),
        weights: bool = True) -> dict[str, torch.Tensor | None]:
    """Loss, gradients and stats, all returned as float64 CPU tensors."""
    zs = inp["zs"].to(device, dtype, copy=True).requires_grad_(grad[0])
    ws = inp["ws"].to(device, dtype, copy=True).requires_grad_(grad[1])
    zt, wt, center = (inp[n].to(device, dtype) for n in ("zt", "wt", "center"))
    w = inp["weights"].to(device, dtype) if weights else None
    p = None if pairs is None else pairs.to(device)
    loss, stats = vmf_xent(zs, ws, zt, wt, center, tau_s, tau_t, pairs=p, weights=w, vmf=vmf,
                           backend=backend)
    if loss.requires_grad:
        loss.backward()
    out = {"loss": loss.detach(), "grad_zs": zs.grad, "grad_ws": ws.grad, **stats}
    if w is not None and pairs is None:  # size of a_i·c_i·(P_s@ws)/τ_s, the terms ∂zs cancels
        out["zs_term"] = w.abs().max() / w.sum().clamp_min(1e-30) * ws.abs().max() / tau_s
    else:
        out["zs_term"] = torch.tensor(0.0)
    return {n: None if t is None else t.detach().double().cpu() for n, t in out.items()}


def assert_close(ref: dict, out: dict, rtol: float, names=OUTS) -> None:
    """max |out − ref| ≤ rtol · max |ref| (+ a tiny floor for all-zero references), per output.
    The loss is lse − Σ P_t·l_s and ∂zs is a·(c·P_s − T)@ws/τ_s: their rounding errors scale with
    the logits and with those terms, not with the (possibly much smaller) results."""
    logit_scale = ref["teacher_logit_mean"].abs().max().item()
    for n in names:
        assert out[n] is not None and ref[n] is not None, n
        assert torch.isfinite(out[n]).all(), n
        err = (out[n] - ref[n]).abs().max().item()
        floor = {"loss": logit_scale, "grad_zs": ref["zs_term"].item()}.get(n, 0.0)
        scale = max(ref[n].abs().max().item(), floor)
        assert err <= rtol * scale + 1e-9, f"{n}: max err {err:.3g} vs max |ref| {scale:.3g}"


# ----------------------------------------------------------------------------- reference checks

def test_reference_matches_finite_differences():
    """The reference's autograd (incl. the vMF bias through log_cp_torch) is the true gradient."""
    inp = make_inputs(5, 5, 7, 6, seed=3)
    pairs = make_pairs(5, 5, 2, seed=3)

    def f(zs, ws):
        return vmf_xent(zs, ws, inp["zt"], inp["wt"], inp["center"], 0.3, 0.2, pairs=pairs,
                        weights=inp["weights"], vmf=True, backend="torch")[0]

    assert torch.autograd.gradcheck(f, (inp["zs"].clone().requires_grad_(),
                                        inp["ws"].clone().requires_grad_()), eps=1e-6, atol=1e-6)


def test_reference_matches_explicit_pair_loop():
    """Linearity in P_t: the reference equals Σ over every (i, j) pair of w_i·H(P_t[j], P_s[i])."""
    inp = make_inputs(9, 4, 11, 8, seed=4)
    pairs = make_pairs(9, 4, 3, seed=4)
    tau_s, tau_t = 0.2, 0.05
    loss, _ = vmf_xent(inp["zs"], inp["ws"], inp["zt"], inp["wt"], inp["center"], tau_s, tau_t,
                       pairs=pairs, weights=inp["weights"], vmf=False, backend="torch")
    log_ps = torch.log_softmax(inp["zs"] @ inp["ws"].T / tau_s, dim=1)
    p_t = torch.softmax(inp["zt"] @ inp["wt"].T / tau_t - inp["center"], dim=1)
    num = den = 0.0
    for i in range(9):
        for j in pairs[i].tolist():
            if j >= 0:
                num += inp["weights"][i] * -(p_t[j] * log_ps[i]).sum()
                den += inp["weights"][i]
    assert torch.allclose(loss, num / den, rtol=1e-12)


def test_reference_float32_close_to_float64():
    """CPU pretraining trains with the torch backend in float32."""
    inp = make_inputs(37, 37, 203, 48)
    ref = run(inp, "torch", torch.float64)
    assert_close(ref, run(inp, "torch", torch.float32), 1e-4)


def test_crop_pairs_pairs_each_crop_with_the_other_global_crops():
    p = crop_pairs(4, 2, 3)
    assert p.shape == (12, 2)
    assert p[0].tolist() == [-1, 3] and p[3].tolist() == [0, -1]  # global crops 0 and 1, image 0
    assert p[8].tolist() == [2, 5] and p[11].tolist() == [2, 5]  # local crops 2 and 3, image 2


def test_auto_is_torch_on_cpu_and_errors():
    inp = make_inputs(6, 6, 9, 16)
    assert run(inp, "auto", torch.float64)["loss"] == run(inp, "torch", torch.float64)["loss"]
    args = (inp["zs"], inp["ws"], inp["zt"][:5], inp["wt"], inp["center"], 0.1, 0.04)
    for backend in ("torch", "triton"):
        with pytest.raises(ValueError, match="Ns"):
            vmf_xent(*args, backend=backend)
        with pytest.raises(ValueError, match="teacher row"):
            vmf_xent(*args, pairs=torch.full((6, 2), 5), backend=backend)
    with pytest.raises(ValueError, match="backend"):
        vmf_xent(*args, backend="cuda")


# ------------------------------------------------------------------ fused kernel vs float64 reference

@pytest.mark.parametrize("paired", [False, True], ids=["identity", "pairs"])
@pytest.mark.parametrize("vmf", [True, False], ids=["vmf", "plain"])
def test_triton_matches_reference(paired, vmf):
    """Odd shapes (no dimension a multiple of a block), zero weights, −1 padding, repeated pairs."""
    ns, nt, k, d = (37, 37, 203, 48) if not paired else (41, 13, 203, 48)
    inp = make_inputs(ns, nt, k, d, seed=int(paired) + 2 * int(vmf))
    pairs = make_pairs(ns, nt, 3, seed=5) if paired else None
    ref = run(inp, "torch", torch.float64, pairs=pairs, vmf=vmf)
    out = run(inp, "triton", torch.float32, pairs=pairs, vmf=vmf)
    assert_close(ref, out, 2e-5)


@pytest.mark.parametrize("tau_s,tau_t", [(1e-2, 1e-3), (10.0, 5.0)], ids=["sharp", "flat"])
def test_triton_extreme_temperatures(tau_s, tau_t):
    """Logits of magnitude ~10^4 (online max must not overflow) and nearly uniform softmaxes."""
    inp = make_inputs(37, 37, 203, 48, seed=7, w_scale=2.0)
    pairs = make_pairs(37, 37, 2, seed=7)
    for p in (None, pairs):
        ref = run(inp, "torch", torch.float64, pairs=p, tau_s=tau_s, tau_t=tau_t)
        out = run(inp, "triton", torch.float32, pairs=p, tau_s=tau_s, tau_t=tau_t)
        # fp32 logits of size L carry an absolute error ~ L·2^-24; P and the gradients inherit it
        assert_close(ref, out, 1e-3 if tau_t < 0.01 else 2e-5)


@pytest.mark.parametrize("ns,k,d", [(1, 17, 20), (19, 64, 32), (70, 33, 100)])
def test_triton_odd_and_tiny_shapes(ns, k, d):
    """K smaller than a tile, exact tile multiples, one row, D not a power of two."""
    inp = make_inputs(ns, ns, k, d, seed=ns)
    ref = run(inp, "torch", torch.float64)
    assert_close(ref, run(inp, "triton", torch.float32), 2e-5)


def test_triton_all_weights_zero():
    """Σ w |pairs| = 0: loss and gradients are exactly 0 (no NaN), stats still computed."""
    inp = make_inputs(37, 37, 203, 48, seed=9)
    inp["weights"] = torch.zeros(37, dtype=torch.float64)
    for p in (None, make_pairs(37, 37, 2)):
        out = run(inp, "triton", torch.float32, pairs=p)
        ref = run(inp, "torch", torch.float64, pairs=p)
        for n in ("loss", "grad_zs", "grad_ws"):
            assert torch.equal(out[n], torch.zeros_like(out[n])), n
        assert_close(ref, out, 2e-5, names=OUTS[3:])


def test_triton_partial_gradients_and_no_grad():
    """Only the gradients asked for are computed; without any, only the stats pass runs."""
    inp = make_inputs(37, 37, 203, 48, seed=11)
    ref = run(inp, "torch", torch.float64)
    only_z = run(inp, "triton", torch.float32, grad=(True, False))
    assert only_z["grad_ws"] is None
    assert_close(ref, only_z, 2e-5, names=("loss", "grad_zs", *OUTS[3:]))
    only_w = run(inp, "triton", torch.float32, grad=(False, True))
    assert only_w["grad_zs"] is None
    assert_close(ref, only_w, 2e-5, names=("loss", "grad_ws", *OUTS[3:]))
    with torch.no_grad():
        none = run(inp, "triton", torch.float32)
    assert_close(ref, none, 2e-5, names=("loss", *OUTS[3:]))


def probability_centre(k: int, seed: int) -> torch.Tensor:
    """log c of a probability centre c spread over ~30 nats, the ``center`` DINO-vMF's probability
    centring hands the op (Centres.offset)."""
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(4.0 * torch.randn(k, generator=g, dtype=torch.float64), 0)


@pytest.mark.parametrize("paired", [False, True], ids=["identity", "pairs"])
def test_triton_uncentred_statistic_from_the_teacher_pass(paired):
    """The probability-centring statistic mean_j softmax(zt_j·wt/τ_t + b_t), folded into the fused
    teacher pass (row pass: the logsumexp lse_u of the uncentred logits; column pass:
    Σ_j exp(l_t + centre − lse_u)), equals the float64 one to 1e-5 although the centre moves it
    far from the centred mean; loss, gradients and the other statistics as before."""
    from icehpc.ssl.kernels import vmf_bias

    ns, nt, k, d = (41, 13, 203, 48) if paired else (37, 37, 203, 48)
    inp = make_inputs(ns, nt, k, d, seed=71 + paired)
    inp["center"] = probability_centre(k, 71)
    pairs = make_pairs(ns, nt, 3, seed=71) if paired else None
    ref = run(inp, "torch", torch.float64, pairs=pairs, tau_t=0.1)
    want = torch.softmax(inp["zt"] @ inp["wt"].T / 0.1 + vmf_bias(inp["wt"], 0.1, True), 1).mean(0)
    torch.testing.assert_close(ref[UNCENTRED], want, rtol=1e-6, atol=1e-9)  # the reference's is that
    assert (want - ref["teacher_prob_mean"]).abs().max() > 0.1 * want.max()  # and not the centred one
    out = run(inp, "triton", torch.float32, pairs=pairs, tau_t=0.1)
    assert_close(ref, out, 2e-5)
    assert_close(ref, out, 1e-5, names=(UNCENTRED,))


@pytest.mark.parametrize("split", [1, 3, 8])
def test_row_pass_k_splits_combine(split):
    """The row kernel alone (lse, P@W, P·c over K, and the lse of the logits + a centre) for 1
    split, uneven splits, and 8 splits of which the last holds no prototype (K = 203 in 32-wide
    tiles) against float64."""
    from icehpc.ssl.kernels.vmf_xent_triton import _row_pass

    inp = make_inputs(37, 37, 203, 48, seed=13)
    x, w, wv = (inp[n].float() for n in ("zs", "ws", "wt"))
    b, c = inp["center"].float(), torch.randn(203, dtype=torch.float64).float()
    centre = 5 * torch.randn(203, dtype=torch.float64)
    lse, o, v, lse_u = _row_pass(x, w, b, 7.0, wv, c, split=split, centre=centre.float())
    logits = inp["zs"] @ inp["ws"].T * 7.0 + inp["center"]
    p = torch.softmax(logits, dim=1)
    for got, want in ((lse, torch.logsumexp(logits, 1)), (o, p @ inp["wt"]), (v, p @ c.double()),
                      (lse_u, torch.logsumexp(logits + centre, 1))):
        assert (got.double() - want).abs().max() <= 2e-6 * want.abs().max()


@pytest.mark.slow
def test_kernels_compile_for_hopper_without_gpu():
    """Ahead-of-time compile (Triton → PTX → ptxas, no GPU needed) of every kernel variant the op
    launches, bf16, D = 256, for sm_90a: catches GPU-only codegen errors and shared-memory overflows
    that the interpreter cannot see. A subprocess, since this process runs the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "vmf_kernel.py"), "--aot", "--aot-first"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith(("row", "col", "chunk"))]
    assert len(lines) == 10 and all(" ok " in ln for ln in lines), res.stdout
    # the bf16 configs each variant autotunes over spill no register (main loops)
    assert all(ln.endswith("spill_bytes=0") for ln in lines), res.stdout


def test_autotune_keeps_each_variants_spill_free_configs(monkeypatch):
    """On the GPU (not the interpreter) each kernel variant autotunes over its own bf16 configs,
    those of the AOT spill table (128×128 / 8 warps / 3 stages where spill-free), fp32 over one."""
    import triton.language as tl

    from icehpc.ssl.kernels import vmf_xent_triton as m

    monkeypatch.setattr(m, "INTERPRET", False)
    rows, cols = m._row_configs(), m._col_configs()
    assert any(c.kwargs == {"BLOCK_N": 128, "BLOCK_K": 128} and c.num_warps == 8 and c.num_stages == 3
               for c in rows + cols)
    for (sw, o, v), want in m.ROW_VARIANT_CONFIGS.items():
        got = m._prune(rows, {}, SAME_W=sw, NEED_O=o, NEED_V=v, DOT=tl.bfloat16)
        assert [(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages) for c in got] == want
    for (a, t, dw), want in m.COL_VARIANT_CONFIGS.items():
        got = m._prune(cols, {}, DO_S=a, DO_T=t, NEED_DW=dw, DOT=tl.bfloat16)
        assert [(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages) for c in got] == want
    assert m._prune(cols, {}, DO_S=1, DO_T=1, NEED_DW=1, DOT=tl.float32) == [m._FP32_CONFIG]
    from icehpc.ssl.kernels import vmf_xent_chunk_triton as ct

    monkeypatch.setattr(ct, "INTERPRET", False)
    chunk = ct._configs()
    for (a, t), want in ct.VARIANT_CONFIGS.items():  # the chunked backend's step likewise
        got = ct._prune(chunk, {"DO_S": a}, TEACHER=t)
        assert [(c.kwargs["BLOCK_K"], c.num_warps) for c in got] == want


# ----------------------------------------------------------------------------------- GPU only

def _err(ref: dict, out: dict) -> dict[str, float]:
    return {n: (out[n] - ref[n]).abs().max().item() / ref[n].abs().max().item() for n in OUTS}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("case", ["patch", "cls"])
def test_gpu_error_no_worse_than_plain_torch(dtype, case):
    """Error vs float64 of the fused op ≤ that of plain PyTorch in the same dtype, plus a margin."""
    if case == "patch":
        inp, pairs = make_inputs(4099, 4099, 8191, 256, seed=21), None
    else:  # DINO [CLS]: 12 crops × 16 images against the other of 2 global teacher crops
        inp, pairs = make_inputs(12 * 16, 2 * 16, 65536, 256, seed=22), crop_pairs(12, 2, 16)
    ref = run(inp, "torch", torch.float64, "cuda", pairs=pairs)
    plain = _err(ref, run(inp, "torch", dtype, "cuda", pairs=pairs))
    floor = 1e-5 if dtype == torch.float32 else 2e-3
    for backend in ("triton", "chunked"):  # chunked: the fused per-chunk Triton step on CUDA
        fused = _err(ref, run(inp, backend, dtype, "cuda", pairs=pairs))
        for n in OUTS:
            assert fused[n] <= 1.5 * plain[n] + floor, (backend, n, fused[n], plain[n])


@pytest.mark.gpu
def test_gpu_large_k_matches_float64():
    """K = 131,072 prototypes (many K tiles, large K offsets)."""
    inp = make_inputs(67, 67, 131072, 256, seed=23)
    ref = run(inp, "torch", torch.float64, "cuda")
    assert_close(ref, run(inp, "triton", torch.float32, "cuda"), 1e-4)


@pytest.mark.gpu
def test_gpu_million_rows_64bit_offsets():
    """N ≈ 1.04·10⁶ rows made of one small block repeated: the loss, per-row gradients and ws
    gradient must equal the small block's (identity pairing, so the mean is unchanged)."""
    reps, n, k, d = 28_000, 37, 1024, 256
    inp = make_inputs(n, n, k, d, seed=24, zero_frac=0.0)
    small = run(inp, "triton", torch.float32, "cuda")
    big_inp = {key: (v.repeat(reps, 1) if key in ("zs", "zt") else
                     v.repeat(reps) if key == "weights" else v) for key, v in inp.items()}
    big = run(big_inp, "triton", torch.float32, "cuda")
    assert big["grad_zs"].shape[0] == n * reps
    big["grad_zs"] = big["grad_zs"][-n:] * reps  # each copy carries 1/reps of the row gradient
    assert_close(small, big, 1e-3)


@pytest.mark.gpu
def test_gpu_peak_memory_has_no_n_by_k_tensor():
    """Patch shape N = 25,088, K = 8,192, D = 256 in bf16: extra peak memory within the issue's
    0.3 GB goal, below a single bf16 N×K tensor (0.41 GB; fp32 logits alone would be 0.82 GB)."""
    n, k, d = 25088, 8192, 256
    inp = make_inputs(n, n, k, d, seed=25)
    dev = torch.device("cuda")
    zs = inp["zs"].to(dev, torch.bfloat16).requires_grad_()
    ws = inp["ws"].to(dev, torch.bfloat16).requires_grad_()
    zt, wt, c, w = (inp[x].to(dev, torch.bfloat16) for x in ("zt", "wt", "center", "weights"))
    vmf_xent(zs, ws, zt, wt, c, 0.1, 0.04, weights=w, backend="triton")[0].backward()  # warm-up
    zs.grad = ws.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    vmf_xent(zs, ws, zt, wt, c, 0.1, 0.04, weights=w, backend="triton")[0].backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 0.3e9 < n * k * 2, f"peak extra {extra / 1e9:.3f} GB"


# ------------------------------------------------------- autotuner behaviour (simulated on the CPU)

def _interp_configs(*shapes):
    import triton

    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=4) for bn, bk in shapes]


@pytest.fixture
def several_configs(monkeypatch):
    """Make the autotuner of both kernels benchmark several configs under the interpreter (which
    otherwise gets one config: its default benchmarker needs a GPU): a CPU "benchmark" that runs
    the config once and reports a time that favours later configs, so the chosen one is not the
    first. Returns the list of (kernel, config) benchmark runs."""
    from icehpc.ssl.kernels import vmf_xent_triton as m

    runs = []
    for name in ("_row_kernel", "_col_kernel"):
        kern = getattr(m, name)

        def bench(kernel_call, quantiles, name=name):
            kernel_call()
            runs.append(name)
            t = 1.0 / len(runs)
            return [t, t, t]

        monkeypatch.setattr(kern, "configs", _interp_configs((16, 32), (32, 16), (16, 64)))
        monkeypatch.setattr(kern, "cache", {})
        monkeypatch.setitem(kern.__dict__, "do_bench", bench)
    return runs


@pytest.mark.parametrize("paired", [False, True], ids=["identity", "pairs"])
def test_first_call_with_autotune_benchmarking_is_correct(several_configs, paired):
    """the FIRST call per autotune key benchmarks every config; the column pass
    accumulates into dw/db/pm (twice in pairs mode), so benchmarking must leave them as they were
    (restore_value), not zero them (reset_to_zero lost the first launch: grad_ws error ~0.8)."""
    ns, nt, k, d = (41, 13, 203, 48) if paired else (37, 37, 203, 48)
    inp = make_inputs(ns, nt, k, d, seed=31 + paired)
    pairs = make_pairs(ns, nt, 3, seed=31) if paired else None
    ref = run(inp, "torch", torch.float64, pairs=pairs)
    out = run(inp, "triton", torch.float32, pairs=pairs)
    assert several_configs.count("_col_kernel") >= 3 * (2 if paired else 1)  # it did benchmark
    assert_close(ref, out, 2e-5)


def test_autotune_key_buckets_rows(several_configs):
    """the masked-patch count changes every step; N = 1000, 1010, 1020 (one log2
    bucket) must benchmark once, not once per N."""
    counts = []
    for n in (1000, 1010, 1020):
        inp = make_inputs(n, n, 40, 16, seed=n)
        run(inp, "triton", torch.float32)
        counts.append(len(several_configs))
    assert counts[0] > 0 and counts[1] == counts[0] and counts[2] == counts[0], counts


def test_triton_enforces_the_shared_memory_bound_on_d():
    """D is one tile; above MAX_D = 256 the sm_90 configs need more than 227 KiB of
    shared memory, so the op refuses (on the CPU too) instead of failing to launch on the GPU."""
    from icehpc.ssl.kernels.vmf_xent_triton import MAX_D

    assert MAX_D == 256
    inp = make_inputs(4, 4, 8, MAX_D + 1)
    with pytest.raises(ValueError, match="227 KiB"):
        run(inp, "triton", torch.float32)


def test_loss_feeds_the_fused_op_the_training_dtype(monkeypatch):
    """under CUDA autocast F.normalize returns fp32, so the head's rows arrive in
    fp32; training in bf16, every operand handed to vmf_xent must be bf16 (not the fp32 kernel)."""
    import icehpc.ssl.kernels as kernels
    from icehpc.ssl.config import LossConfig
    from icehpc.ssl.loss import Centres, ibot_vmf_loss
    from icehpc.ssl.model import HeadOut

    seen = []

    def spy(zs, ws, zt, wt, center, *args, **kwargs):
        seen.append((zs.dtype, ws.dtype, zt.dtype, wt.dtype))
        return kernels.vmf_xent_torch(zs, ws, zt, wt, center, *args[:2], kwargs.get("pairs"),
                                      kwargs.get("weights"), kwargs.get("vmf", True),
                                      kwargs.get("bias_s"), kwargs.get("bias_t"))

    monkeypatch.setattr(kernels, "vmf_xent", spy)
    b, n_local, k, p = 2, 1, 12, 8
    masks = torch.zeros(2 * b, 4, dtype=torch.bool)
    masks[:, :2] = True

    def head(grad):  # fp32, as F.normalize gives under CUDA autocast
        z = F.normalize(torch.randn((2 + n_local) * b, p), dim=1).requires_grad_(grad)
        zp = F.normalize(torch.randn(int(masks.sum()), p), dim=1).requires_grad_(grad)
        w = torch.randn(k, p, requires_grad=grad)
        return HeadOut(z, zp, w, w)

    student, teacher = head(True), head(False)
    out = ibot_vmf_loss(student, teacher, masks, b, n_local, Centres(k, 0.9), 0.1, 0.04,
                        LossConfig(), dtype=torch.bfloat16)
    assert seen and all(d == torch.bfloat16 for ds in seen for d in ds), seen
    out.loss.backward()
    assert student.cls_z.grad is not None and student.cls_z.grad.dtype == torch.float32


@pytest.mark.parametrize("backend", ["torch", "chunked", "triton"])
def test_probability_centring_statistic_needs_no_second_teacher_pass(monkeypatch, backend):
    """With probability centring, ibot_vmf_loss takes its centre statistics (mean uncentred
    teacher probabilities, [CLS] and patches) from vmf_xent's own teacher pass: equal to the float64
    softmax mean to 1e-5, and the only teacher logits loss.py forms itself are the [CLS] rows' (for
    teacher_entropy), never the patch rows' (they were a second fp32 pass over N×K)."""
    import icehpc.ssl.loss as loss_mod
    from icehpc.ssl.config import LossConfig
    from icehpc.ssl.kernels import vmf_bias
    from icehpc.ssl.model import HeadOut

    rows = []
    real = loss_mod.teacher_logits
    monkeypatch.setattr(loss_mod, "teacher_logits",
                        lambda zt, *a, **kw: (rows.append(zt.shape[0]), real(zt, *a, **kw))[1])
    b, n_local, k, p, tau_t = 3, 2, 45, 24, 0.07
    g = torch.Generator().manual_seed(5)
    masks = torch.rand(2 * b, 16, generator=g) < 0.5

    def head(n_cls, grad):
        z = F.normalize(torch.randn(n_cls, p, generator=g), dim=1).requires_grad_(grad)
        zp = F.normalize(torch.randn(int(masks.sum()), p, generator=g), dim=1).requires_grad_(grad)
        w = (2 * torch.randn(k, p, generator=g)).requires_grad_(grad)
        return HeadOut(z, zp, w, (2 * torch.randn(k, p, generator=g)).requires_grad_(grad))

    student, teacher = head((2 + n_local) * b, True), head(2 * b, False)
    centres = loss_mod.Centres(k, 0.9, mode="probability")
    centres.cls, centres.patch = probability_centre(k, 1).exp().float(), probability_centre(k, 2).exp().float()
    out = loss_mod.ibot_vmf_loss(student, teacher, masks, b, n_local, centres, 0.1, tau_t,
                                 LossConfig(backend=backend, vmf=True))
    out.loss.backward()
    assert rows == [2 * b], rows
    for z, w, got in ((teacher.cls_z, teacher.cls_prototypes, out.centre_stat_cls),
                      (teacher.patch_z, teacher.patch_prototypes, out.centre_stat_patch)):
        z64, w64 = z.double(), w.double()
        want = torch.softmax(z64 @ w64.T / tau_t + vmf_bias(w64, tau_t, True), 1).mean(0)
        assert (got.double() - want).abs().max() <= 1e-5 * want.max(), backend


@pytest.mark.parametrize("backend,fused", [("torch", None), ("chunked", False), ("chunked", True)])
def test_statistics_of_no_teacher_rows_are_zeros(monkeypatch, backend, fused):
    """No masked patch on this rank: every statistic is 0 (it is summed across ranks with weight
    0; 0/0 = NaN would reach the other ranks' centres), and the fused chunked step runs."""
    from icehpc.ssl.kernels import vmf_xent_chunked

    monkeypatch.setattr(vmf_xent_chunked, "FUSED", fused)
    inp = make_inputs(0, 0, 9, 8)
    out = run(inp, backend, torch.float64, weights=False)
    assert out["loss"] == 0
    for name in OUTS[3:]:
        assert torch.equal(out[name], torch.zeros(9, dtype=torch.float64)), name


# ------------------------------------------------------------------------------- chunked backend

@pytest.fixture
def small_chunks(monkeypatch):
    """Several chunks at test sizes (K = 203 would give one chunk): 8 rows for the torch step,
    16 for the fused one, the last chunk partial."""
    from icehpc.ssl.kernels import vmf_xent_chunked as mod

    monkeypatch.setattr(mod, "chunk_rows", lambda k, limit=1024: 8)
    monkeypatch.setattr(mod, "fused_chunk_rows", lambda k, b, limit=1024: 16)
    return mod


@pytest.fixture(params=["torch-step", "fused-step"])
def chunked_impl(request, small_chunks, monkeypatch):
    """Both implementations of the chunked backend's per-chunk step; the fused Triton one is
    spied on, so a test of it fails if the torch step ran instead."""
    from icehpc.ssl.kernels import vmf_xent_chunk_triton as ct

    fused = request.param == "fused-step"
    monkeypatch.setattr(small_chunks, "FUSED", fused)
    calls = []
    real = ct.chunk_step
    monkeypatch.setattr(ct, "chunk_step", lambda **kw: (calls.append(1), real(**kw))[1])
    yield request.param
    assert bool(calls) == fused, f"fused chunk_step called {len(calls)} times"


@pytest.mark.parametrize("paired", [False, True], ids=["identity", "pairs"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_chunked_matches_reference(chunked_impl, paired, dtype):
    """The chunked backend (several chunks, the last one partial) against the float64 reference,
    with zero weights, −1 padding, repeated pairs and an all-padding row; the fused Triton step
    runs in float64 for float64 inputs, so it must agree to 1e-12 as well."""
    ns, nt, k, d = (41, 13, 203, 48) if paired else (37, 37, 203, 48)
    inp = make_inputs(ns, nt, k, d, seed=41 + paired)
    pairs = make_pairs(ns, nt, 3, seed=41) if paired else None
    ref = run(inp, "torch", torch.float64, pairs=pairs)
    out = run(inp, "chunked", dtype, pairs=pairs)
    assert_close(ref, out, 1e-12 if dtype == torch.float64 else 2e-5)


@pytest.mark.parametrize("paired", [False, True], ids=["identity", "pairs"])
def test_chunked_uncentred_statistic_with_a_probability_centre(chunked_impl, paired):
    """The chunked backend's probability-centring statistic (both per-chunk steps; the fused one
    keeps the uncentred logsumexp next to the centred one) with a centre spread over ~30 nats."""
    ns, nt, k, d = (41, 13, 203, 48) if paired else (37, 37, 203, 48)
    inp = make_inputs(ns, nt, k, d, seed=81 + paired)
    inp["center"] = probability_centre(k, 81)
    pairs = make_pairs(ns, nt, 3, seed=81) if paired else None
    ref = run(inp, "torch", torch.float64, pairs=pairs, tau_t=0.1)
    assert_close(ref, run(inp, "chunked", torch.float64, pairs=pairs, tau_t=0.1), 1e-12)
    assert_close(ref, run(inp, "chunked", torch.float32, pairs=pairs, tau_t=0.1), 1e-5, names=(UNCENTRED,))


@pytest.mark.parametrize("paired", [False, True], ids=["identity", "pairs"])
def test_chunked_fused_plain_softmax_and_odd_shapes(chunked_impl, paired):
    """vMF off, K and D not multiples of any tile (K < one tile too), one student row."""
    for ns, nt, k, d in ((19, 19, 33, 20), (1, 1, 17, 7)) if not paired else ((23, 5, 33, 20),):
        inp = make_inputs(ns, nt, k, d, seed=ns + k)
        pairs = make_pairs(ns, nt, 2, seed=ns) if paired else None
        ref = run(inp, "torch", torch.float64, pairs=pairs, vmf=False)
        assert_close(ref, run(inp, "chunked", torch.float64, pairs=pairs, vmf=False), 1e-12)


def test_chunked_fused_zero_weights_partial_grads_and_no_grad(chunked_impl):
    """All weights zero: loss and gradients exactly 0; only the gradients asked for; no grad."""
    inp = make_inputs(37, 37, 203, 48, seed=9)
    ref = run(inp, "torch", torch.float64)
    only_w = run(inp, "chunked", torch.float64, grad=(False, True))
    assert only_w["grad_zs"] is None
    assert_close(ref, only_w, 1e-12, names=("loss", "grad_ws", *OUTS[3:]))
    with torch.no_grad():
        assert_close(ref, run(inp, "chunked", torch.float64), 1e-12, names=("loss", *OUTS[3:]))
    inp["weights"] = torch.zeros(37, dtype=torch.float64)
    zero_ref = run(inp, "torch", torch.float64, pairs=make_pairs(37, 37, 2))
    for p in (None, make_pairs(37, 37, 2)):
        out = run(inp, "chunked", torch.float64, pairs=p)
        for n in ("loss", "grad_zs", "grad_ws"):
            assert torch.equal(out[n], torch.zeros_like(out[n])), n
    assert_close(zero_ref, out, 1e-12, names=OUTS[3:])


def test_chunked_fused_first_call_with_autotune_benchmarking(small_chunks, monkeypatch):
    """The fused step's partial sums accumulate across chunks and its teacher-only mode rewrites
    logits into P_t in place: benchmarking several configs on the first call must not change the
    result (restore_value), in both pairing modes."""
    import triton

    from icehpc.ssl.kernels import vmf_xent_chunk_triton as ct

    runs = []

    def bench(kernel_call, quantiles):
        kernel_call()
        runs.append(1)
        t = 1.0 / len(runs)
        return [t, t, t]

    kern = ct._chunk_kernel
    monkeypatch.setattr(kern, "configs", [triton.Config({"BLOCK_K": bk}, num_warps=4)
                                          for bk in (32, 64, 16)])
    monkeypatch.setattr(kern, "cache", {})
    monkeypatch.setitem(kern.__dict__, "do_bench", bench)
    monkeypatch.setattr(small_chunks, "FUSED", True)
    for paired in (False, True):
        ns, nt = (41, 13) if paired else (37, 37)
        inp = make_inputs(ns, nt, 203, 48, seed=51 + paired)
        pairs = make_pairs(ns, nt, 3, seed=51) if paired else None
        before = len(runs)
        out = run(inp, "chunked", torch.float64, pairs=pairs)
        assert len(runs) - before >= 3  # it did benchmark
        assert_close(run(inp, "torch", torch.float64, pairs=pairs), out, 1e-12)


def test_chunked_fused_memory_bound_and_fixed_shapes():
    """Chunk sizes depend on K and the dtype only; at the patch shape (K = 8192, bf16) the fused
    step's [chunk, K] buffers are 40 MiB and the op's extra memory (with fp32 ∂zs, ∂ws, a ∂ws
    chunk product and the partial sums) stays under 0.1 GB at N = 25,088, D = 256."""
    from icehpc.ssl.kernels import vmf_xent_chunk_triton as ct
    from icehpc.ssl.kernels.vmf_xent_chunked import fused_chunk_rows

    n, k, d = 25088, 8192, 256
    chunk = fused_chunk_rows(k, 10)
    assert 512 <= chunk <= 1024
    extra = chunk * k * 10 + n * d * 4 + 2 * k * d * 4 + 2 * ct.programs(chunk) * k * 4 + n * 4
    assert extra <= 0.1e9, extra
    assert fused_chunk_rows(65536, 6) >= 16 and fused_chunk_rows(8192, 24) >= 16


@pytest.mark.gpu
def test_gpu_chunked_fused_no_sync_and_peak_memory():
    """Patch shape in bf16 on CUDA: the fused chunked op (after the autotuning call) runs with no
    host sync and within 0.1 GB of extra memory; its gradients match plain torch."""
    n, k, d = 25088, 8192, 256
    inp = make_inputs(n, n, k, d, seed=26)
    dev = torch.device("cuda")
    zs = inp["zs"].to(dev, torch.bfloat16).requires_grad_()
    ws = inp["ws"].to(dev, torch.bfloat16).requires_grad_()
    zt, wt, c, w = (inp[x].to(dev, torch.bfloat16) for x in ("zt", "wt", "center", "weights"))
    vmf_xent(zs, ws, zt, wt, c, 0.1, 0.04, weights=w, backend="chunked")[0].backward()  # autotune
    zs.grad = ws.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.set_sync_debug_mode("error")
    try:
        vmf_xent(zs, ws, zt, wt, c, 0.1, 0.04, weights=w, backend="chunked")[0].backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base - 2 * (n + k) * d * 2  # minus the two grads
    assert extra < 0.1e9, f"peak extra {extra / 1e9:.3f} GB"


@pytest.mark.gpu
def test_gpu_chunked_fused_captures_in_a_cuda_graph():
    """After the autotuning call, forward + backward of the chunked op (fused per-chunk step) is
    captured in a CUDA graph and its replay on new inputs equals an eager call (no data-dependent
    shapes, no host reads)."""
    n, k, d = 4096, 8192, 256
    dev = torch.device("cuda")
    inp = make_inputs(n, n, k, d, seed=27)
    static = {x: inp[x].to(dev, torch.bfloat16) for x in ("zs", "ws", "zt", "wt", "center", "weights")}
    static["zs"].requires_grad_()
    static["ws"].requires_grad_()

    def step():
        loss, _ = vmf_xent(static["zs"], static["ws"], static["zt"], static["wt"], static["center"],
                           0.1, 0.04, weights=static["weights"], backend="chunked")
        return (loss, *torch.autograd.grad(loss, (static["zs"], static["ws"])))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # autotune and warm up outside the capture
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    new = make_inputs(n, n, k, d, seed=28)
    for x in ("zs", "ws", "zt", "wt"):
        with torch.no_grad():
            static[x].copy_(new[x].to(dev, torch.bfloat16))
    graph.replay()
    torch.cuda.synchronize()
    eager = step()
    for a, b in zip(outs, eager):
        assert torch.allclose(a.float(), b.float(), rtol=1e-3, atol=1e-5)


# ------------------------------------------------------------ vMF bias once per prototype set

@pytest.mark.parametrize("backend", ["torch", "triton", "chunked"])
def test_precomputed_bias_gives_the_same_loss_and_gradients(backend):
    """vmf_xent with bias_s / bias_t computed by the caller (its gradient through the caller's
    graph, −A_p(κ)) equals the op computing them itself: loss, ∂zs and ∂ws (bias part included)."""
    from icehpc.ssl.kernels import vmf_bias

    dt = torch.float32 if backend == "triton" else torch.float64
    inp = {n: t.to(dt) for n, t in make_inputs(19, 19, 45, 24, seed=61).items()}
    outs = []
    for given in (False, True):
        zs = inp["zs"].clone().requires_grad_()
        ws = inp["ws"].clone().requires_grad_()
        kw = dict(bias_s=vmf_bias(ws, 0.1, True), bias_t=vmf_bias(inp["wt"], 0.04, True)) if given else {}
        loss, _ = vmf_xent(zs, ws, inp["zt"], inp["wt"], inp["center"], 0.1, 0.04,
                           weights=inp["weights"], backend=backend, **kw)
        loss.backward()
        outs.append((loss.detach(), zs.grad, ws.grad))
    for a, b in zip(*outs):
        err = (a - b).abs().max() / b.abs().max()
        assert err <= (1e-6 if dt == torch.float32 else 1e-13), (backend, err)
    with pytest.raises(ValueError, match="vmf=False"):
        vmf_xent(inp["zs"], inp["ws"], inp["zt"], inp["wt"], inp["center"], 0.1, 0.04, vmf=False,
                 bias_s=torch.zeros(45, dtype=torch.float64), backend="torch")


@pytest.mark.parametrize("shared", [True, False], ids=["shared-head", "two-heads"])
def test_log_cp_evaluated_once_per_prototype_set_per_step(monkeypatch, shared):
    """log C_p once per prototype set per step. A head shared by the [CLS] and patch
    losses: 2 forward evaluations (student, teacher; teacher_entropy reuses the teacher's) and 1
    backward (−A_p for the student), was 5 + 2; two heads: 4 + 2. Loss unchanged."""
    import icehpc.vmf as vmf_mod
    from icehpc.ssl.config import LossConfig
    from icehpc.ssl.loss import Centres, ibot_vmf_loss
    from icehpc.ssl.model import HeadOut

    calls = {"fwd": 0, "bwd": 0}
    real_f, real_b = vmf_mod.log_cp_t, vmf_mod.bessel_ratio_t
    monkeypatch.setattr(vmf_mod, "log_cp_t", lambda *a: (calls.__setitem__("fwd", calls["fwd"] + 1),
                                                         real_f(*a))[1])
    monkeypatch.setattr(vmf_mod, "bessel_ratio_t", lambda *a: (calls.__setitem__("bwd", calls["bwd"] + 1),
                                                               real_b(*a))[1])
    b, n_local, k, p = 2, 1, 12, 8
    masks = torch.zeros(2 * b, 4, dtype=torch.bool)
    masks[:, :2] = True
    g = torch.Generator().manual_seed(0)

    def head(grad):
        z = F.normalize(torch.randn((2 + n_local) * b, p, generator=g), dim=1).requires_grad_(grad)
        zp = F.normalize(torch.randn(int(masks.sum()), p, generator=g), dim=1).requires_grad_(grad)
        w = torch.randn(k, p, generator=g).requires_grad_(grad)
        return HeadOut(z, zp, w, w if shared else torch.randn(k, p, generator=g).requires_grad_(grad))

    student, teacher = head(True), head(False)
    out = ibot_vmf_loss(student, teacher, masks, b, n_local, Centres(k, 0.9), 0.1, 0.04, LossConfig(vmf=True))
    out.loss.backward()
    assert calls == ({"fwd": 2, "bwd": 1} if shared else {"fwd": 4, "bwd": 2}), calls


@pytest.mark.parametrize("paired", [False, True], ids=["identity", "pairs"])
def test_chunked_bf16_no_worse_than_plain_torch_bf16(chunked_impl, paired):
    """bf16 inputs (G stored in bf16 for the gradient GEMMs): error vs float64 within 1.1× that of
    the plain torch backend in bf16, plus a small margin."""
    inp = make_inputs(37, 13 if paired else 37, 203, 48, seed=3)
    pairs = make_pairs(37, 13, 2) if paired else None
    ref = run(inp, "torch", torch.float64, pairs=pairs)
    plain, out = run(inp, "torch", torch.bfloat16, pairs=pairs), run(inp, "chunked", torch.bfloat16, pairs=pairs)
    for n in OUTS:
        scale = ref[n].abs().max().item()
        e_plain, e_out = ((x[n] - ref[n]).abs().max().item() / scale for x in (plain, out))
        assert e_out <= 1.1 * e_plain + 1e-3, (n, e_out, e_plain)
