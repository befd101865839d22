"""Issue 22: what the first GPU run would have mis-measured or stalled on, checked on the CPU."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from icehpc.ssl.augment import block_masks

ROOT = Path(__file__).resolve().parent.parent


def _block_masks_cummax(*args):
    """The previous implementation (bench/augment.py's baseline: a cummax over [n, T, gh, gw])."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_augment", ROOT / "bench" / "augment.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench.block_masks_cummax(*args)


@pytest.mark.parametrize("grid, min_patches, candidates", [
    ((14, 14), 16, 32), ((8, 8), 5, 32), ((6, 9), 2, 70), ((14, 14), 16, 1), ((3, 3), 1, 33)])
def test_block_masks_equal_the_cummax_reference(grid, min_patches, candidates):
    """Same generator draws, same masks as the cummax algorithm, bit for bit, over many seeds
    (candidates > 32 exercises the multi-word bit sets; 1 the degenerate prefix)."""
    for seed in range(40):
        args = (48, grid, [0.1, 0.5], min_patches, [0.3, 3.3333], candidates)
        new = block_masks(torch.Generator().manual_seed(seed), *args)
        ref = _block_masks_cummax(torch.Generator().manual_seed(seed), *args)
        assert new.dtype == torch.bool and new.shape == ref.shape
        assert torch.equal(new, ref), seed


# ------------------------------------------------------------------ item 2: the kernel bench's gradient check
def _bench(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_kernel_bench_gradient_check_passes_a_correct_kernel_and_flags_a_wrong_one():
    """bench/vmf_kernel.py compares against the fp64 reference of the same bf16 inputs: a kernel
    computing in fp32 (the torch backend on upcast inputs stands in) prints ok, a gradient 10 % off
    prints WRONG, and plain bf16 PyTorch — the old reference — is itself far off that reference."""
    vk = _bench("vmf_kernel")
    case = vk.make_case(vk.SMALL["patch N=203 K=301"], "cpu", torch.bfloat16)
    ref = vk.reference_grads(case, False, vk.reference_dtype(case))
    assert all(r.dtype == torch.float64 for r in ref)
    ok = vk.grad_error(case, vk.fp32_stand_in, False, ref)
    assert vk.grad_verdict(ok) == "ok" and ok < 1e-2

    def wrong(*args):
        loss, stats = vk.fp32_stand_in(*args)
        return 1.1 * loss, stats

    bad = vk.grad_error(case, wrong, False, ref)
    assert vk.grad_verdict(bad) == "WRONG"
    from icehpc.ssl.kernels import vmf_xent_torch

    assert vk.grad_error(case, vmf_xent_torch, False, ref) > 5 * ok


# ------------------------------------------------------------------ item 8: backend "chunked" selectable
def test_loss_backend_chunked_is_selectable_and_auto_stays_the_default():
    from icehpc.ssl.config import LOSS_BACKENDS, LossConfig
    from icehpc.ssl.kernels import BACKENDS

    assert LOSS_BACKENDS == BACKENDS  # the config accepts exactly what the loss can run
    LossConfig(backend="chunked").validate()
    assert LossConfig().backend == "auto"
    with pytest.raises(ValueError, match="chunked"):
        LossConfig(backend="4gemm").validate()


def test_loss_backend_chunked_trains_like_torch_on_the_cpu():
    """The chunked backend chosen from the config gives the torch backend's loss and gradients."""
    from icehpc.ssl.kernels import crop_pairs, vmf_xent

    g = torch.Generator().manual_seed(0)
    zs = torch.nn.functional.normalize(torch.randn(24, 16, generator=g), dim=1).requires_grad_()
    ws = torch.randn(40, 16, generator=g).requires_grad_()
    zt = torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=1)
    wt, center = torch.randn(40, 16, generator=g), 0.1 * torch.randn(40, generator=g)
    out = {}
    for backend in ("torch", "chunked"):
        loss, _ = vmf_xent(zs, ws, zt, wt, center, 0.1, 0.04, crop_pairs(6, 2, 4), None, True, backend=backend)
        out[backend] = (loss, *torch.autograd.grad(loss, (zs, ws)))
    for a, b in zip(out["torch"], out["chunked"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ item 3: no DeepSpeed sync from step 2 on
@pytest.fixture
def own_environ():
    """An in-process Trainer exports MASTER_ADDR/PORT, RANK, ... into os.environ; restore it, or
    later tests' subprocesses (icehpc pretrain) inherit a dead rendezvous."""
    import os

    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def _fresh_deepspeed_groups() -> None:
    """DeepSpeed caches its process groups in module globals; after a test destroyed the default
    group (tests here and in test_pretrain.py build one CPU Trainer each, in one pytest process),
    a new Trainer would reuse the dead ones ("Group ... is not registered")."""
    from deepspeed.utils import groups

    for name in ("_WORLD_GROUP", "_DATA_PARALLEL_GROUP", "_MODEL_PARALLEL_GROUP",
                 "_TENSOR_MODEL_PARALLEL_GROUP", "_ZERO_PARAM_INTRA_PARALLEL_GROUP", "mpu"):
        if hasattr(groups, name):
            setattr(groups, name, None)


def _trainer_steps(tmp_path, n_steps: int, *overrides: str, between=None):
    """A tiny CPU trainer (tests/test_pretrain.py's), one metrics step, then ``n_steps`` steps
    without reads, ``between`` wrapping them (a context manager factory)."""
    import contextlib

    from test_pretrain import _cpu_trainer

    from icehpc.ssl.schedule import schedule_at

    _fresh_deepspeed_groups()
    cfg, trainer = _cpu_trainer(tmp_path, *overrides)
    device = trainer.device
    images = torch.randint(0, 256, (cfg.data.batch_size, 1, cfg.data.canvas, cfg.data.canvas), dtype=torch.uint8)
    if device.type == "cuda":
        images = images.pin_memory()
    sched = schedule_at(0, cfg, trainer.steps_per_epoch, trainer.world)
    trainer.train_step(images, sched, False, read=True)  # autotune, compile
    trainer.step += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    with (between or contextlib.nullcontext)():
        for _ in range(n_steps):
            trainer.train_step(images, sched, False, read=False)
            trainer.step += 1
    return trainer


def test_deepspeed_throughput_timer_off_no_synchronize_on_steps_2_to_4(tmp_path, monkeypatch, own_environ):
    """DeepSpeed's throughput timer synchronises the device at every forward and step from its
    global step 2 on (the old no-sync test stopped at step 1); the engine is configured with it
    off, and steps 2..4 call the accelerator's synchronize not once."""
    from deepspeed.accelerator import get_accelerator

    calls: list[str] = []
    acc = get_accelerator()
    try:
        trainer = _trainer_steps(tmp_path, 0)
        assert trainer.engine.tput_timer.config.enabled is False
        assert trainer.engine.wall_clock_breakdown() is False
        monkeypatch.setattr(acc, "synchronize", lambda *a, **k: calls.append("synchronize"))
        images = torch.randint(0, 256, (trainer.cfg.data.batch_size, 1, trainer.cfg.data.canvas,
                                        trainer.cfg.data.canvas), dtype=torch.uint8)
        from icehpc.ssl.schedule import schedule_at

        sched = schedule_at(0, trainer.cfg, trainer.steps_per_epoch, trainer.world)
        for _ in range(3):
            trainer.train_step(images, sched, False, read=False)
            trainer.step += 1
        assert trainer.engine.global_steps >= 4
        assert calls == []
    finally:
        torch.distributed.destroy_process_group()
        _fresh_deepspeed_groups()


@pytest.mark.gpu
def test_gpu_train_steps_2_to_4_have_no_sync(tmp_path, own_environ):
    """Steps 2..4 (not only step 1: DeepSpeed's timers start at its step 2) on CUDA under
    set_sync_debug_mode("error")."""
    import contextlib

    @contextlib.contextmanager
    def strict():
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")

    try:
        _trainer_steps(tmp_path, 3, "engine.device=cuda", between=strict)
    finally:
        torch.distributed.destroy_process_group()
        _fresh_deepspeed_groups()


def test_training_loader_pins_memory_when_asked(monkeypatch):
    """The trainer asks for pinned batches on CUDA (so the step's non_blocking copy is async) and
    the training loader hands that to its DataLoader; off on the CPU. On CUDA the decode workers
    also leave the bbox enlargement to the device (issue 23), on the CPU they do it."""
    import icehpc.data.loader as loader_mod
    import icehpc.ssl.trainer as trainer_mod
    from icehpc.ssl.config import PretrainConfig

    seen: list[dict] = []

    class FakeLoader:
        def __init__(self, dataset, **kwargs):
            seen.append(kwargs)

        def with_epoch(self, n):
            return self

        def __iter__(self):
            return iter(())

    monkeypatch.setattr(loader_mod.wds, "WebLoader", FakeLoader)
    monkeypatch.setattr(loader_mod, "read_index", lambda d: {"totals": {"written": 1000}})
    monkeypatch.setattr(loader_mod, "shard_paths", lambda d: ["/nowhere/shard-000000.tar"])
    defers, real_defers = [], loader_mod._defers
    monkeypatch.setattr(loader_mod, "_defers", lambda *a: defers.append(real_defers(*a)) or defers[-1])
    cfg = PretrainConfig()
    assert cfg.data.framing == "bbox"
    trainer_mod._batches(cfg, 0, 0, 1, 3, 0, torch.device("cuda", 0))
    trainer_mod._batches(cfg, 0, 0, 1, 3, 0, torch.device("cpu"))
    assert [s.get("pin_memory") for s in seen] == [True, False] and defers == [True, False]
    import inspect
    import re

    assert re.search(r"_batches\([^)]*self\.device\)", inspect.getsource(trainer_mod.Trainer))  # its own device


# ------------------------------------------------------------------ the shipped production config
@pytest.mark.slow  # ~35 s on one core
def test_production_config_trains_two_steps_on_the_cpu(tmp_path, own_environ):
    """configs/pretrain-vits16.yaml as shipped (ViT-S/16, 2x224 + 10x96 crops, K = 8192) builds and
    trains two steps at batch 2 on the CPU, so a config or shape error never first shows on a GPU."""
    import math
    from pathlib import Path

    from icehpc import config as cfglib
    from icehpc.ssl.config import PretrainConfig
    from icehpc.ssl.schedule import schedule_at
    from icehpc.ssl.trainer import Trainer

    path = Path(__file__).resolve().parent.parent / "configs" / "pretrain-vits16.yaml"
    cfg = cfglib.load(PretrainConfig, path, [f"out={tmp_path}", "data.batch_size=2", "data.batches_per_epoch=1",
                                             "engine.device=cpu", "train.progress=false"])
    assert (cfg.model.arch, cfg.model.n_prototypes) == ("vit_small_patch16_224", 8192)
    assert (cfg.augment.global_size, cfg.augment.local_size, cfg.augment.n_local) == (224, 96, 10)
    _fresh_deepspeed_groups()
    trainer = Trainer(cfg)
    try:
        images = torch.randint(0, 256, (2, 1, cfg.data.canvas, cfg.data.canvas), dtype=torch.uint8,
                               generator=torch.Generator().manual_seed(0))
        before = [p.detach().clone() for p in trainer.engine.module.parameters()]
        losses = []
        for _ in range(2):
            sched = schedule_at(trainer.step, cfg, trainer.steps_per_epoch, trainer.world)
            record = trainer.train_step(images, sched, False, read=True)
            trainer.step += 1
            losses.append(float(record["loss"]))
        assert all(math.isfinite(v) for v in losses)
        moved = sum(not torch.equal(a, b) for a, b in zip(before, trainer.engine.module.parameters()))
        assert moved > 0
    finally:
        torch.distributed.destroy_process_group()
        _fresh_deepspeed_groups()


# ------------------------------------------------------------------ item 4: gpu_check.sh survives a failed import
def test_gpu_check_dry_run_without_deepspeed_runs_the_other_steps(tmp_path):
    """With ``import deepspeed`` failing (a PYTHONPATH shim), the dry run still runs the steps that
    need no DeepSpeed, skips the pretrain step with the reason, and writes at most 8 files to OUT
    (only 8 come back from the GPU machine). The fast part: the pretrain and augment steps."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    shim = tmp_path / "shim" / "deepspeed"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('deepspeed made unimportable by the test')\n")
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "PYTHONPATH": str(tmp_path / "shim"),
           "GPU_CHECK_STEPS": "pretrain augment", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(root / "bench" / "gpu_check.sh"), "--dry-run"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=240)
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and files == ["augment.txt", "pretrain.txt", "setup.txt", "summary.txt"], files
    summary = (out / "summary.txt").read_text()
    assert "step pretrain: skipped, cannot import deepspeed" in summary, summary
    assert "step augment: exit 0" in summary, summary + proc.stderr
    assert "deepspeed FAILED ImportError" in (out / "setup.txt").read_text()
    assert "host side of one batch-4 step" in (out / "augment.txt").read_text()
    assert proc.returncode == 1  # 0 only when every step ran and passed


# ------------------------------------------------------------------ item 6: single-config variants fall back
def test_single_config_variant_falls_back_when_its_launch_runs_out_of_resources(monkeypatch):
    """Triton 3.6 (the device's) allocates differently from 3.8: a variant's only config (the
    identity column pass's) may not fit. A launch raising OutOfResources retries once with the
    small safe config, which the variant keeps; a second failure is raised."""
    from triton.runtime.errors import OutOfResources

    from icehpc.ssl.kernels import vmf_xent_triton as m

    monkeypatch.setattr(m, "_FALLBACK", set())
    flags = dict(DO_S=True, DO_T=True, NEED_DW=True)  # identity column pass: a single config
    assert len(m.variant_configs("col", flags)) == 1
    launched: list[list] = []

    class Kernel:  # the autotuned kernel, launching whatever the prune hook picks
        cache = {("stale key",): "stale config"}

        def __init__(self, fits=lambda cfg: cfg is m._SAFE_CONFIG):
            self.fits = fits

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                picked = m._prune(m.variant_configs("col", flags), {}, **kwargs)
                launched.append(picked)
                if not self.fits(picked[0]):
                    raise OutOfResources(300_000, 232_448, "shared memory")
            return run

    with pytest.warns(RuntimeWarning, match="falling back"):
        m._launch(Kernel(), "col", (1,), "x", **flags)
    assert launched[-1] == [m._SAFE_CONFIG] and len(launched) == 2 and Kernel.cache == {}
    m._launch(Kernel(), "col", (1,), "x", **flags)  # kept for the process: no second failure
    assert launched[-1] == [m._SAFE_CONFIG] and len(launched) == 3
    other = dict(DO_S=False, DO_T=True, NEED_DW=False)  # other variants keep their configs
    assert m._prune(m.variant_configs("col", other), {}, **other) != [m._SAFE_CONFIG]
    row = dict(SAME_W=False, NEED_O=True, NEED_V=True)
    assert m._prune(m.variant_configs("row", row), {}, **row) != [m._SAFE_CONFIG]
    with pytest.raises(OutOfResources):
        m._launch(Kernel(fits=lambda cfg: False), "col", (1,), "x", **flags)


# ------------------------------------------------------------------ item 7: log C_p in ~30 ops on the GPU
class _CountOps(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("p", [32, 33, 256, 768])
def test_tabulated_log_cp_matches_the_float64_reference_in_few_ops(p):
    """The table (what the CUDA step uses) equals the float64 numpy reference to 5e-9 (relative
    to max(|log C_p|, 1)) and its gradient −A_p to 1e-9 relative, for κ from 0 to 1e9, in ~50
    dispatched ops each way (~110 forward + backward) where the exact torch ops take ~870."""
    import numpy as np

    from icehpc import vmf

    k_np = np.concatenate([[0.0, 1e-9], np.logspace(-6, 9, 1501),
                           np.random.default_rng(p).uniform(0, 3000, 300)])
    k = torch.tensor(k_np, requires_grad=True)
    out = vmf.log_cp_tabulated(k, p)
    ref = vmf.log_cp(k_np, p)
    assert np.all(np.abs(out.detach().numpy() - ref) <= 5e-9 * np.maximum(np.abs(ref), 1))
    out.sum().backward()
    a = vmf.bessel_ratio(k_np, p)
    assert np.all(np.abs(-k.grad.numpy() - a) <= 1e-9 * a + 1e-300)
    kappa = torch.linspace(0.5, 900.0, 8192, dtype=torch.float32, requires_grad=True)
    vmf.log_cp_tabulated(kappa, p)  # the table is built once per (p, device), outside the count
    counts = {}
    for name, fn in (("table", vmf.log_cp_tabulated), ("exact", vmf.log_cp_torch)):
        with _CountOps() as ops:
            fn(kappa, p).sum().backward()
        counts[name] = ops.n
    assert counts["table"] <= 120 and counts["exact"] >= 6 * counts["table"], counts


def test_step_uses_the_table_on_cuda_only(monkeypatch):
    from icehpc import vmf

    used = []
    monkeypatch.setattr(vmf, "log_cp_tabulated", lambda k, p: used.append("table") or k)
    monkeypatch.setattr(vmf, "log_cp_torch", lambda k, p: used.append("exact") or k)
    vmf.log_cp_step(torch.ones(3), 8)
    vmf.log_cp_step(torch.ones(3, device="meta"), 8)
    assert used == ["exact", "exact"]
    from icehpc.ssl.kernels.vmf_xent_torch import vmf_bias

    vmf_bias(torch.ones(4, 8), 0.1, True)
    assert used[-1] == "exact"


# ------------------------------------------------------------------ no predictable temp paths in bench/
def test_gpu_check_and_benchmarks_use_private_temp_folders():
    gpu = (ROOT / "bench" / "gpu_check.sh").read_text()
    assert "/tmp/site" not in gpu and "mktemp -d" in gpu
    for py in (ROOT / "bench").glob("*.py"):
        assert 'default="/tmp' not in py.read_text(), py.name
