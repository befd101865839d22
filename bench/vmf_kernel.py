"""Benchmark of ``icehpc.ssl.kernels.vmf_xent`` forward+backward: plain eager PyTorch,
torch.compile of the same reference, the fused Triton op ("fused") and the chunked backend with its
fused per-chunk Triton step ("chunked"), on the three shapes of the issue, with peak extra GPU
memory, ratios, a correctness column (gradients after the first, autotuning call, against the fp64
reference of the same bf16 inputs — fp32 for the largest shape —, as the tests do) and the bf16
matmul floor (the four N×K×D products of the loss). Variants without torch.compile run first for
every shape, the compile variants last; every row is printed as it completes.

    python bench/vmf_kernel.py            # CUDA: all three shapes, bf16
    python bench/vmf_kernel.py --small    # CPU smoke: torch backend vs the Triton interpreter
    python bench/vmf_kernel.py --aot      # no GPU: compile for sm_90a, print smem/registers/spills
    python bench/vmf_kernel.py --loss-cpu # CPU: the whole iBOT-vMF loss step, probability centring

Without CUDA (and without --small) it prints why and exits 0. The vMF bias b[k] = log C_p(‖w_k‖/τ)
goes through icehpc.vmf.log_cp_torch (float64 torch ops on the device, the same in every backend),
so by default it is off and the timings isolate the loss; --vmf includes it.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

# (student rows, teacher rows, K, D, DINO pairing (12 crops, 2 global) or identity, goals ms / GB)
SHAPES = {
    "patch N=25088 K=8192": dict(ns=25088, nt=25088, k=8192, d=256, cls=False, goal_ms=1.0, goal_gb=0.3,
                                 compile=True),
    "patch N=100352 K=8192": dict(ns=100352, nt=100352, k=8192, d=256, cls=False, goal_ms=3.9, goal_gb=1.0,
                                  compile=False),  # torch.compile only where the issue quotes it
    "cls 12x128 K=65536": dict(ns=1536, nt=256, k=65536, d=256, cls=True, goal_ms=0.6, goal_gb=None,
                               compile=True),
}
SMALL = {
    "patch N=203 K=301": dict(ns=203, nt=203, k=301, d=64, cls=False, goal_ms=None, goal_gb=None),
    "cls 12x8 K=513": dict(ns=96, nt=16, k=513, d=64, cls=True, goal_ms=None, goal_gb=None),
}
TAU_S, TAU_T = 0.1, 0.04


def make_case(shape: dict, device: str, dtype: torch.dtype) -> dict:
    """Unit rows, random prototypes, ~45 % masked (weighted) rows as in iBOT, DINO pairs for cls."""
    from icehpc.ssl.kernels import crop_pairs

    g = torch.Generator(device).manual_seed(0)
    ns, nt, k, d = shape["ns"], shape["nt"], shape["k"], shape["d"]

    def rn(*s: int) -> torch.Tensor:
        return torch.randn(*s, generator=g, device=device)

    case = {
        "zs": F.normalize(rn(ns, d), dim=1).to(dtype).requires_grad_(),
        "ws": rn(k, d).to(dtype).requires_grad_(),
        "zt": F.normalize(rn(nt, d), dim=1).to(dtype),
        "wt": rn(k, d).to(dtype),
        "center": (0.1 * rn(k)).to(dtype),
        "pairs": crop_pairs(12, 2, ns // 12, device) if shape["cls"] else None,
    }
    case["weights"] = (None if shape["cls"] else
                       (torch.rand(ns, generator=g, device=device) < 0.45).to(dtype))
    return case


def step_fn(case: dict, loss_fn, vmf: bool):
    """One forward+backward returning the gradients (no accumulation into .grad)."""
    def step():
        loss, _ = loss_fn(case["zs"], case["ws"], case["zt"], case["wt"], case["center"], TAU_S,
                          TAU_T, case["pairs"], case["weights"], vmf)
        return torch.autograd.grad(loss, (case["zs"], case["ws"]))
    return step


def matmul_floor_fn(case: dict):
    """The loss's four bf16 products: student and teacher logits, ∂zs = G@ws, ∂ws = Gᵀ@zs."""
    zs, ws, zt, wt = (case[n].detach() for n in ("zs", "ws", "zt", "wt"))
    grad_logits = torch.randn(zs.shape[0], ws.shape[0], device=zs.device, dtype=zs.dtype)

    def step():
        return zs @ ws.T, zt @ wt.T, grad_logits @ ws, grad_logits.T @ zs
    return step


def gpu_time_ms(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def peak_extra_gb(fn) -> float:
    """Peak GPU memory above what was allocated before one call (inputs excluded), in GB."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 1e9


GRAD_TOL = 2e-2


def reference_dtype(case: dict) -> torch.dtype:
    """float64 where the N×K reference tensors fit comfortably (≤ 3e8 logits, ~2.4 GB each),
    float32 (no TF32) above: both are ~1e-6 from exact, far below the bf16 output rounding."""
    return torch.float64 if case["zs"].shape[0] * case["ws"].shape[0] <= 3e8 else torch.float32


def reference_grads(case: dict, vmf: bool, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """∂zs, ∂ws of the plain-PyTorch reference evaluated in ``dtype`` on the SAME (bf16) inputs,
    cast up: the gradient the kernel (logits in fp32) approximates; tests use the same reference."""
    from icehpc.ssl.kernels import vmf_xent_torch

    up = {n: (None if t is None else t.detach().to(dtype) if t.is_floating_point() else t)
          for n, t in case.items()}
    up["zs"].requires_grad_()
    up["ws"].requires_grad_()
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        return step_fn(up, vmf_xent_torch, vmf)()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def grad_error(case: dict, fn, vmf: bool, ref: tuple[torch.Tensor, ...] | None = None) -> float:
    """max over (∂zs, ∂ws) of max|fn − exact| / max|exact| with ``exact`` the fp64/fp32 reference
    of the same inputs (``reference_grads``), AFTER the first (autotuning) call: the first call per
    autotune key is the one that used to go wrong. (Plain bf16 PyTorch is 4–6e-2 off this reference
    itself, so it cannot be the reference of a 2e-2 check.)"""
    if ref is None:
        ref = reference_grads(case, vmf, reference_dtype(case))
    got = step_fn(case, fn, vmf)()
    return max(((g.to(r.dtype) - r).abs().max() / r.abs().max()).item() for g, r in zip(got, ref))


def grad_verdict(err: float) -> str:
    return "ok" if err < GRAD_TOL else "WRONG"


def chosen_configs() -> list[str]:
    """The autotuner's picks so far, per kernel and key."""
    from icehpc.ssl.kernels import vmf_xent_chunk_triton as c
    from icehpc.ssl.kernels import vmf_xent_triton as m

    out = []
    for mod, name in ((m, "_row_kernel"), (m, "_col_kernel"), (c, "_chunk_kernel")):
        for key, cfg in getattr(mod, name).cache.items():
            out.append(f"{name} key={key} -> {cfg}")
    return out


def _row(name: str, vname: str, ms: float, gb: float, fused_ms: float | None, err: str) -> None:
    ratio = f"{ms / fused_ms:9.2f}" if fused_ms else f"{'-':>9}"
    print(f"{name:<24}{vname:<10}{ms:9.3f}{gb:9.3f}{ratio}{err:>10}", flush=True)


def _measure(name: str, vname: str, case: dict, fn, vmf: bool, ref, fused_ms: float | None
             ) -> tuple[float, float] | None:
    """First call (compile / autotune) outside the timings, then ms, peak GB and the gradient
    error against the fp64/fp32 reference; the row is printed as soon as it is known."""
    step = step_fn(case, fn, vmf)
    try:
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        first_s = time.perf_counter() - t0
        ms, gb = gpu_time_ms(step), peak_extra_gb(step)
        err = grad_error(case, fn, vmf, ref)
    except Exception as exc:  # a failing variant must not hide the others' figures
        print(f"{name:<24}{vname:<10} failed: {type(exc).__name__}: {exc}"[:300], flush=True)
        return None
    checked = vname in ("fused", "chunked")  # eager / compile compute in bf16: context, not checked
    verdict = grad_verdict(err) if checked else "bf16 reference, context"
    _row(name, vname, ms, gb, fused_ms, f"{err:.1e}" + (" WRONG" if verdict == "WRONG" else ""))
    print(f"{name:<24}{vname} first call {first_s:.2f} s; grad rel err vs exact {err:.2e} "
          f"({verdict})", flush=True)
    if checked:
        print(f"SUMMARY|{name} {vname} grad rel err vs exact|{err:.2e}|< {GRAD_TOL:g}|"
              f"{'ok' if verdict == 'ok' else 'FAIL'}", flush=True)
    return ms, gb


def run_gpu(vmf: bool, skip_compile: bool) -> None:
    """Cold-machine order: every shape without torch.compile first (fused, chunked, eager, matmul
    floor, goals), the compile variants last; each row is printed (and flushed into the step's
    output file) as it completes, so a timeout still leaves every figure measured so far."""
    from icehpc.ssl.kernels import vmf_xent_torch
    from icehpc.ssl.kernels.vmf_xent_chunked import vmf_xent_chunked
    from icehpc.ssl.kernels.vmf_xent_triton import vmf_xent_triton

    dev = torch.cuda.get_device_name()
    print(f"# vmf_xent fwd+bwd, bf16 inputs, {dev}, torch {torch.__version__}, vmf={vmf}, "
          f"{time.strftime('%Y-%m-%d')}; grad err vs the fp64 (fp32 for the largest shape) "
          f"reference of the same inputs")
    print(f"{'shape':<24}{'variant':<10}{'ms':>9}{'peak GB':>9}{'x fused':>9}{'grad err':>10}", flush=True)
    fused_of: dict[str, float] = {}
    for name, shape in SHAPES.items():
        case = make_case(shape, "cuda", torch.bfloat16)
        ref = reference_grads(case, vmf, reference_dtype(case))
        res: dict[str, tuple[float, float]] = {}
        for vname, fn in (("fused", vmf_xent_triton), ("chunked", vmf_xent_chunked), ("eager", vmf_xent_torch)):
            got = _measure(name, vname, case, fn, vmf, ref, res.get("fused", (None,))[0])
            if got is not None:
                res[vname] = got
        fused_ms = res.get("fused", (float("nan"),))[0]
        fused_of[name] = fused_ms
        floor_ms = gpu_time_ms(matmul_floor_fn(case))
        print(f"{name:<24}{'matmuls':<10}{floor_ms:9.3f}{'':>9}{floor_ms / fused_ms:9.2f}", flush=True)
        for op in ("fused", "chunked"):  # both candidates for backend="auto", against the goals
            if op not in res:
                continue
            ms, gb = res[op]
            ok_ms = ms <= shape["goal_ms"]
            ok_gb = shape["goal_gb"] is None or gb <= shape["goal_gb"]
            goal_gb = "" if shape["goal_gb"] is None else f", <= {shape['goal_gb']} GB"
            print(f"{name:<24}{op} goal <= {shape['goal_ms']} ms{goal_gb}: "
                  f"{'met' if ok_ms and ok_gb else 'NOT met'} ({op} / matmul floor = "
                  f"{ms / floor_ms:.2f})")
            print(f"SUMMARY|{name} {op} ms|{ms:.3f}|<= {shape['goal_ms']}|{'ok' if ok_ms else 'NOT met'}")
            if shape["goal_gb"] is not None:
                print(f"SUMMARY|{name} {op} peak GB|{gb:.3f}|<= {shape['goal_gb']}|{'ok' if ok_gb else 'NOT met'}")
        if "eager" in res:
            print(f"SUMMARY|{name} eager ms|{res['eager'][0]:.3f}|reference|-")
        for line in chosen_configs():
            print(f"{name:<24}config {line}")
        sys.stdout.flush()
        del case, ref
        torch.cuda.empty_cache()
    if skip_compile:
        return
    print("# torch.compile of the eager reference (last: its first call compiles for minutes)", flush=True)
    for name, shape in SHAPES.items():
        if not shape.get("compile", True):  # torch.compile only where the issue quotes it
            continue
        case = make_case(shape, "cuda", torch.bfloat16)
        ref = reference_grads(case, vmf, reference_dtype(case))
        torch._dynamo.reset()
        got = _measure(name, "compile", case, torch.compile(vmf_xent_torch, dynamic=False), vmf, ref,
                       fused_of.get(name))
        if got is not None:
            print(f"SUMMARY|{name} compile ms|{got[0]:.3f}|reference|-", flush=True)
        del case, ref
        torch.cuda.empty_cache()


def run_small(vmf: bool) -> None:
    """CPU smoke: the fused kernels under the Triton interpreter against the torch backend, and the
    GPU run's gradient check (``grad_error`` vs the fp64 reference of the same bf16 inputs) on a
    kernel stand-in that, like the fused kernel, computes in fp32: it must print ok."""
    from icehpc.ssl.kernels import vmf_xent_torch
    from icehpc.ssl.kernels.vmf_xent_chunked import vmf_xent_chunked
    from icehpc.ssl.kernels.vmf_xent_triton import vmf_xent_triton

    print(f"# CPU smoke (--small): torch backend vs Triton interpreter, fp32, vmf={vmf}; "
          "times are not GPU figures", flush=True)
    for name, shape in SMALL.items():
        case = make_case(shape, "cpu", torch.float32)
        out = {}
        for vname, fn in (("torch", vmf_xent_torch), ("interp", vmf_xent_triton),
                          ("chunked", vmf_xent_chunked)):
            step = step_fn(case, fn, vmf)
            times = []
            for _ in range(3 if vname == "torch" else 1):  # the interpreter takes seconds a call
                t0 = time.perf_counter()
                out[vname] = step()
                times.append(time.perf_counter() - t0)
            print(f"{name:<22}{vname:<8}{1e3 * statistics.median(times):10.1f} ms (CPU)", flush=True)
        for vname in ("interp", "chunked"):
            diff = max((a - b).abs().max().item() for a, b in zip(out["torch"], out[vname]))
            print(f"{name:<22}max |grad torch - grad {vname}| = {diff:.2e}", flush=True)
        bf = make_case(shape, "cpu", torch.bfloat16)
        for vname, fn in (("fp32 stand-in", fp32_stand_in), ("plain bf16", vmf_xent_torch)):
            err = grad_error(bf, fn, vmf)
            print(f"{name:<22}bf16 inputs, {vname}: grad rel err vs exact {err:.2e} "
                  f"({grad_verdict(err)})", flush=True)


# --loss-cpu: a small step of the whole loss (B images, n_local local crops, masked patch rows)
LOSS_CPU = dict(batch=16, n_local=2, patch_rows=2048, k=4096, d=256, reps=5)


def run_loss_cpu(backend: str) -> None:
    """ibot_vmf_loss forward+backward on the CPU with DINO-vMF's probability centring (vMF on,
    fp32): median ms, dispatched aten ops and matmul GFLOP per step (one step counted after a
    warm-up), with log C_p evaluated as the CPU step does (exact torch ops) and as the CUDA step
    does (the float64 table), and log C_p(κ[K]) alone both ways. The teacher's statistic comes out
    of the loss's own teacher pass; before that fold loss.py ran a second fp32 softmax pass over the
    teacher's [CLS] and patch logits."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode

    from icehpc import vmf
    from icehpc.ssl.config import LossConfig
    from icehpc.ssl.loss import Centres, ibot_vmf_loss
    from icehpc.ssl.model import HeadOut

    c = LOSS_CPU
    b, n_local, k, d = c["batch"], c["n_local"], c["k"], c["d"]
    g = torch.Generator().manual_seed(0)
    per_image = -(-c["patch_rows"] // (2 * b))
    masks = torch.zeros(2 * b, 2 * per_image, dtype=torch.bool)
    masks[:, :per_image] = True

    def head(n_cls: int, grad: bool) -> HeadOut:
        def unit(n: int) -> torch.Tensor:
            return F.normalize(torch.randn(n, d, generator=g), dim=1).requires_grad_(grad)
        w = torch.randn(k, d, generator=g).requires_grad_(grad)
        return HeadOut(unit(n_cls), unit(int(masks.sum())), w, w)

    student, teacher = head((2 + n_local) * b, True), head(2 * b, False)
    centres = Centres(k, 0.9, mode="probability")
    cfg = LossConfig(backend=backend, vmf=True)

    def step() -> None:
        out = ibot_vmf_loss(student, teacher, masks, b, n_local, centres, 0.1, 0.04, cfg)
        torch.autograd.grad(out.loss, (student.cls_z, student.patch_z, student.cls_prototypes))

    class Ops(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Ops.n += 1
            return func(*args, **(kwargs or {}))

    def measure(fn) -> tuple[float, int, float]:
        """(median ms, aten ops, matmul GFLOP) of fn() after a warm-up call."""
        fn()
        Ops.n = 0
        with Ops(), FlopCounterMode(display=False) as flops:
            fn()
        times = []
        for _ in range(c["reps"]):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return 1e3 * statistics.median(times), Ops.n, flops.get_total_flops() / 1e9

    kappa = (torch.rand(k, generator=g) * 900 + 0.5).requires_grad_()
    print(f"# ibot_vmf_loss fwd+bwd on the CPU, probability centring, vmf, fp32, backend={backend}: "
          f"B={b}, {n_local} local crops, {int(masks.sum())} masked patch rows, K={k}, D={d}, "
          f"{torch.get_num_threads()} threads; medians of {c['reps']}", flush=True)
    by_device = vmf.log_cp_step
    for name, log_cp in (("exact (CPU step)", vmf.log_cp_torch), ("table (CUDA step)", vmf.log_cp_tabulated)):
        ms, ops, _ = measure(lambda: torch.autograd.grad(log_cp(kappa, d).sum(), kappa))
        print(f"log C_p(κ[{k}], {d}) fwd+bwd, {name}: {ms:.2f} ms, {ops} aten ops", flush=True)
        vmf.log_cp_step = log_cp  # what vmf_bias evaluates
        try:
            ms, ops, gflop = measure(step)
        finally:
            vmf.log_cp_step = by_device
        print(f"loss step, log C_p {name}: {ms:.1f} ms, {ops} aten ops, {gflop:.2f} GFLOP in matmuls",
              flush=True)


def fp32_stand_in(zs, ws, zt, wt, center, *args):
    """The torch backend computing in fp32 from bf16 inputs (as the fused kernel does): the
    stand-in for a correct kernel in the CPU check of ``grad_error``."""
    from icehpc.ssl.kernels import vmf_xent_torch

    return vmf_xent_torch(zs.float(), ws.float(), zt.float(), wt.float(), center.float(), *args)


def run_aot(first_only: bool) -> int:
    """Compile every kernel variant the op launches (bf16, D = 256) for sm_90a without a GPU and
    print shared memory, registers and spilled bytes per autotune config (ptxas -v). Exit 1 if one
    fails to compile or needs more shared memory than an H100/H200 block has (227 KiB)."""
    import re
    import subprocess
    import tempfile

    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from icehpc.ssl.kernels import vmf_xent_triton as m

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    half = {"x_ptr", "wl_ptr", "wv_ptr", "xs_ptr", "ws_ptr", "xt_ptr", "wt_ptr", "y_ptr"}

    def signature(fn) -> dict[str, str]:
        ptr = {"g_ptr": "*bf16", "pairs_ptr": "*i64"}
        return {a: ptr.get(a, "*bf16" if a in half else "*fp32") if a.endswith("_ptr") else
                "i32" if a in ("N", "K", "D", "N_BUCKET", "C") else "fp32" if a.startswith("inv_tau")
                else "constexpr" for a in fn.arg_names}

    # each variant with the bf16 configs its autotuner keeps (vmf_xent_triton.*_VARIANT_CONFIGS)
    # the teacher's row pass (NEED_V) also keeps the uncentred logsumexp (NEED_U)
    variants = [("row", m._row_kernel.fn, m.variant_configs("row", f), f)
                for f in (dict(SAME_W=s, NEED_O=o, NEED_V=v, NEED_U=v)
                          for s, o, v in [(1, 1, 0), (0, 1, 1), (0, 0, 0)])]
    variants += [("col", m._col_kernel.fn, m.variant_configs("col", f), f)
                 for f in (dict(DO_S=a, DO_T=b, NEED_DW=c, Y_IS_XS=d)
                           for a, b, c, d in [(1, 1, 1, 1), (1, 0, 1, 1), (0, 1, 1, 0), (0, 1, 0, 0)])]
    from icehpc.ssl.kernels import vmf_xent_chunk_triton as c

    variants += [("chunk", c._chunk_kernel.fn, c.variant_configs(f), f)
                 for f in (dict(DO_S=a, TEACHER=t, WRITE_PT=w, NEED_G=g, M=mm, ACC=tl.float32, BLOCK_M=c.BLOCK_M)
                           for a, t, w, g, mm in [(1, 1, 0, 1, 1), (0, 1, 1, 0, 1), (1, 2, 0, 1, 2)])]
    failed = 0
    for name, fn, configs, flags in variants:
        for cfg in configs[:1] if first_only else configs:
            const = dict(flags, **cfg.kwargs) if name == "chunk" else dict(
                flags, DOT=tl.bfloat16, PRECISION="ieee", BLOCK_D=256, **cfg.kwargs)
            tag = f"{name} {flags} {cfg.kwargs} warps={cfg.num_warps} stages={cfg.num_stages}"
            try:
                k = triton.compile(ASTSource(fn, signature(fn), const), target=GPUTarget("cuda", 90, 32),
                                   options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
            except Exception as exc:  # report every variant, then fail
                print(f"{tag} FAILED {type(exc).__name__}: {exc}"[:400])
                failed += 1
                continue
            with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
                f.write(k.asm["ptx"])
                f.flush()
                info = subprocess.run([ptxas, "--gpu-name", "sm_90a", "-v", f.name, "-o", os.devnull],
                                      capture_output=True, text=True).stderr
            regs = re.findall(r"Used (\d+) registers", info)
            spill = re.findall(r"(\d+) bytes spill stores", info)
            ok = k.metadata.shared <= 227 * 1024
            failed += not ok
            print(f"{tag} {'ok' if ok else 'SHARED MEMORY OVER 227 KiB'} smem={k.metadata.shared} "
                  f"regs={','.join(regs)} spill_bytes={','.join(spill)}", flush=True)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="CPU smoke run with the Triton interpreter")
    ap.add_argument("--vmf", action="store_true", help="include the vMF bias log C_p(‖w‖/τ)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    ap.add_argument("--aot", action="store_true",
                    help="compile the kernels for sm_90a without a GPU; print smem/registers/spills")
    ap.add_argument("--aot-first", action="store_true", help="with --aot: first autotune config only")
    ap.add_argument("--loss-cpu", choices=["torch", "chunked"], default=None,
                    help="time the whole loss step (probability centring) on the CPU with this backend")
    args = ap.parse_args(argv)
    if args.loss_cpu:
        run_loss_cpu(args.loss_cpu)
        return 0
    if args.aot:
        if os.environ.get("TRITON_INTERPRET") == "1":
            raise SystemExit("--aot compiles real GPU code: unset TRITON_INTERPRET")
        return run_aot(args.aot_first)
    if args.small:
        if not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are defined
        run_small(args.vmf)
        return 0
    if not torch.cuda.is_available():
        print("bench/vmf_kernel.py: no CUDA device here; nothing measured (use --small for a CPU "
              "smoke run).")
        return 0
    run_gpu(args.vmf, args.no_compile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
