"""iBOT-vMF pretraining: loss assembly and schedules (unit), then real runs of the tiny config:
2 DeepSpeed ranks on gloo, exact resume, preemption by SIGUSR2, NaN stop, init from a local file,
and the Slurm launches (sbatch script, submitit requeue) on the real local cluster."""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.utils._python_dispatch

from slurm_helpers import TERMINAL, final_state, release_when_requeued, state
from icehpc import config as cfglib
from icehpc.ssl.kernels import vmf_xent
from icehpc.ssl.checkpoint import PREEMPTED_EXIT
from icehpc.ssl.config import PretrainConfig
from icehpc.ssl.engine import ema_update
from icehpc.ssl.loss import (Centres, cls_pairs, ibot_vmf_loss, koleo, patch_weights, resolve_centering,
                             teacher_targets)
from icehpc.ssl.metrics import CollapseGuard, prototype_stats
from icehpc.ssl.schedule import schedule_at
from icehpc.ssl.trainer import COLLAPSE_EXIT, NONFINITE_EXIT

ROOT = Path(__file__).resolve().parent.parent
TINY = "configs/pretrain-tiny-cpu.yaml"
LOSS_KEYS = ("loss", "loss_cls", "loss_patch", "cls_kl", "cls_proto_used", "head_kappa_p50")


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _latest(out: Path) -> str:
    return (out / "checkpoints" / "latest").read_text().strip()


def _pretrain_cmd(shards: Path, out: Path, *overrides: str, nproc: int = 2) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    if nproc == 1:
        launcher = [sys.executable]  # a plain single process, no launcher at all
    return [*launcher, "-m", "icehpc", "pretrain", "--config", TINY, f"data.shards={shards}", f"out={out}",
            "train.progress=false", *overrides]


def _run(cmd: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Synthetic CPI images → shards, through the real CLI stages."""
    base = tmp_path_factory.mktemp("pretrain-data")
    icehpc = [sys.executable, "-m", "icehpc"]
    for cmd in ([*icehpc, "synth", "--out", str(base / "synth"), "--n", "400", "--seed", "3", "--no-progress"],
                [*icehpc, "shards", "build", str(base / "synth" / "manifest.csv"), "--out", str(base / "shards"),
                 "--shard-samples", "50", "--no-progress"]):
        proc = _run(cmd)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return base / "shards"


@pytest.fixture(scope="module")
def full_run(shards, tmp_path_factory) -> Path:
    """20 uninterrupted steps on 2 ranks (2 epochs × 10 batches), checkpoints at 7, 14 and 20."""
    out = tmp_path_factory.mktemp("pretrain-full") / "run"
    proc = _run(_pretrain_cmd(shards, out, "train.epochs=2", "train.checkpoint_every=7", "train.keep_checkpoints=3"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    (out.parent / "console.txt").write_text(proc.stdout + proc.stderr)
    return out


# ------------------------------------------------------------------------------------------ unit
def _cfg(*overrides: str) -> PretrainConfig:
    return cfglib.load(PretrainConfig, ROOT / TINY, overrides)


def test_schedules_follow_the_config():
    cfg = _cfg("optim.lr=0.002", "optim.min_lr=1e-5", "optim.warmup_epochs=2", "train.epochs=10",
               "loss.teacher_temp=0.04", "loss.teacher_temp_final=0.07", "loss.teacher_temp_warmup_epochs=4",
               "optim.freeze_last_layer_epochs=1", "data.batch_size=32")
    spe, world = 5, 4
    peak = 0.002 * 32 * 4 / 256
    s = [schedule_at(i, cfg, spe, world) for i in range(50)]
    assert s[0].lr == 0 and s[5].lr == pytest.approx(peak / 2) and s[10].lr == pytest.approx(peak)
    assert all(a.lr >= b.lr for a, b in zip(s[10:], s[11:]))
    assert schedule_at(50, cfg, spe, world).lr == pytest.approx(1e-5)
    assert s[0].weight_decay == pytest.approx(0.04) and schedule_at(50, cfg, spe, world).weight_decay == pytest.approx(0.4)
    assert s[0].momentum == pytest.approx(0.996) and schedule_at(50, cfg, spe, world).momentum == pytest.approx(1.0)
    assert s[10].teacher_temp == pytest.approx(0.055) and s[20].teacher_temp == pytest.approx(0.07)
    assert [x.last_layer_frozen for x in s[:6]] == [True] * 5 + [False]


def test_loss_pairing_and_weights_match_explicit_loops():
    """The batched [CLS]/patch loss equals the per-pair / per-image average written as loops."""
    torch.manual_seed(0)
    b, n_local, k, p = 3, 2, 7, 5

    def unit(n: int) -> torch.Tensor:
        return torch.nn.functional.normalize(torch.randn(n, p, dtype=torch.float64), dim=1)

    zs, zt = unit((2 + n_local) * b), unit(2 * b)
    ws, wt = torch.randn(k, p, dtype=torch.float64), torch.randn(k, p, dtype=torch.float64)
    centre = torch.randn(k, dtype=torch.float64)
    loss, _ = vmf_xent(zs, ws, zt, wt, centre, 0.1, 0.05, pairs=cls_pairs(b, n_local, torch.device("cpu")),
                       vmf=False, backend="torch")

    def xent(i: int, j: int) -> torch.Tensor:
        pt = torch.softmax(zt[j] @ wt.T / 0.05 - centre, 0)
        return -(pt * torch.log_softmax(zs[i] @ ws.T / 0.1, 0)).sum()

    terms = []
    for v in range(2 + n_local):
        for img in range(b):
            teachers = [1 - v] if v < 2 else [0, 1]
            terms += [xent(v * b + img, t * b + img) for t in teachers]
    torch.testing.assert_close(loss, torch.stack(terms).mean())

    masks = torch.tensor([[1, 0, 1, 1], [0, 1, 0, 0]], dtype=torch.bool)
    zs_p, zt_p = unit(4), unit(4)
    patch, _ = vmf_xent(zs_p, ws, zt_p, wt, centre, 0.1, 0.05, weights=patch_weights(masks).double(),
                        vmf=False, backend="torch")
    per_row = [-(torch.softmax(zt_p[r] @ wt.T / 0.05 - centre, 0) * torch.log_softmax(zs_p[r] @ ws.T / 0.1, 0)).sum()
               for r in range(4)]
    torch.testing.assert_close(patch, (torch.stack(per_row[:3]).mean() + per_row[3]) / 2)


def test_koleo_matches_a_float64_loop_and_spreads_the_closest_pair():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2 * 6, 5, generator=g, dtype=torch.float64)
    ref = []
    for v in range(2):
        rows = torch.nn.functional.normalize(x[v * 6:(v + 1) * 6], dim=1).tolist()
        for i, a in enumerate(rows):
            ref.append(-math.log(min(math.dist(a, b) for j, b in enumerate(rows) if j != i) + 1e-8))
    torch.testing.assert_close(koleo(x, views=2), torch.tensor(sum(ref) / len(ref), dtype=torch.float64))
    # a gradient step on it moves the two closest rows of a view apart
    y = x.clone()
    y[1] = y[0] + 1e-2 * torch.randn(5, generator=g, dtype=torch.float64)
    y.requires_grad_(True)
    koleo(y, views=2).backward()

    def gap(t):
        u = torch.nn.functional.normalize(t[:2], dim=1)
        return float((u[0] - u[1]).norm())

    assert gap(y.detach() - 1e-3 * y.grad) > gap(y.detach())


def test_koleo_weight_enters_the_loss_and_zero_leaves_it_alone():
    """λ_koleo · KoLeo(student global-view backbone [CLS]) is added to the total; at 0 (the default)
    the total is the iBOT-vMF loss bit for bit and the backbone tokens get no gradient from it."""
    from icehpc.ssl.config import LossConfig
    from icehpc.ssl.model import HeadOut

    torch.manual_seed(0)
    b, n_local, k, p, d = 4, 1, 12, 8, 16
    masks = torch.zeros(2 * b, 4, dtype=torch.bool)
    masks[:, :2] = True

    def head(grad):
        z = torch.nn.functional.normalize(torch.randn((2 + n_local) * b, p), dim=1).requires_grad_(grad)
        zp = torch.nn.functional.normalize(torch.randn(int(masks.sum()), p), dim=1).requires_grad_(grad)
        w = torch.randn(k, p, requires_grad=grad)
        return HeadOut(z, zp, w, w, torch.randn((2 + n_local) * b, d, requires_grad=grad))

    student, teacher = head(True), head(False)
    run = lambda lam: ibot_vmf_loss(student, teacher, masks, b, n_local, Centres(k, 0.9, mode="probability"),
                                    0.1, 0.04, LossConfig(lambda_koleo=lam))
    off, on = run(0.0), run(0.5)
    assert float(off.koleo) == 0.0 and torch.equal(off.loss, off.cls + off.patch)
    torch.testing.assert_close(on.koleo, koleo(student.cls_tokens[: 2 * b], views=2))
    torch.testing.assert_close(on.loss, off.loss + 0.5 * on.koleo)
    off.loss.backward()
    assert student.cls_tokens.grad is None
    on.loss.backward()
    assert student.cls_tokens.grad[: 2 * b].abs().sum() > 0 and not student.cls_tokens.grad[2 * b:].any()


def test_koleo_config_errors_are_one_line():
    from icehpc.config import ConfigError

    with pytest.raises(ConfigError, match=r"lambda_koleo > 0 needs data\.batch_size >= 2"):
        cfglib.load(PretrainConfig, None, ["loss.lambda_koleo=0.1", "data.batch_size=1"])
    with pytest.raises(ConfigError, match=r"loss: loss weights"):
        cfglib.load(PretrainConfig, None, ["loss.lambda_koleo=-0.1"])
    assert cfglib.load(PretrainConfig, None, ["data.batch_size=1"]).loss.lambda_koleo == 0


def _targets_after_centring(vmf: bool, mode: str, steps: int = 150) -> torch.Tensor:
    """Teacher targets on a fixed batch after ``steps`` centre updates; prototypes of unequal norms."""
    from icehpc.ssl.loss import teacher_logits

    torch.manual_seed(0)
    k, p, n = 16, 8, 64
    zt = torch.nn.functional.normalize(torch.randn(n, p, dtype=torch.float64), dim=1)
    directions = torch.nn.functional.normalize(torch.randn(k, p, dtype=torch.float64), dim=1)
    wt = directions * torch.linspace(0.6, 1.4, k, dtype=torch.float64)[:, None]
    centres = Centres(k, 0.9, mode=mode)
    centres.cls = centres.cls.double()
    for _ in range(steps):
        stat = (teacher_targets(zt, wt, torch.zeros(k), 0.1, vmf).double().mean(0)  # uncentred
                if mode == "probability" else teacher_logits(zt, wt, 0.1, vmf).double().mean(0))
        centres.update(stat, centres.patch, patch_rows=torch.zeros(()))
    return teacher_targets(zt, wt, centres.offset("cls"), 0.1, vmf)


def test_probability_centring_keeps_the_vmf_term_that_logit_centring_cancels():
    """The vMF term b_k = log C_p(‖w_k‖/τ) is a per-prototype constant: logit centring absorbs it
    into the centre (once the centre has caught up, vMF on and off give the same targets, so the
    prototype norms act only through w·z); DINO-vMF's probability centring, the default with vmf
    on, keeps its effect."""
    assert resolve_centering("auto", vmf=True) == "probability" and resolve_centering("auto", vmf=False) == "logit"
    default = resolve_centering("auto", vmf=True)
    moved = (_targets_after_centring(True, default) - _targets_after_centring(False, default)).abs().max()
    assert moved > 1e-2, "with the default vMF centring, the κ term log C_p(‖w‖/τ) must change the targets"
    # logit centring (the old default): the κ term's effect on the targets is cancelled
    cancelled = (_targets_after_centring(True, "logit") - _targets_after_centring(False, "logit")).abs().max()
    assert cancelled < 1e-4 < moved


def test_probability_centre_is_the_ema_of_uncentred_teacher_probabilities():
    torch.manual_seed(1)
    zt = torch.nn.functional.normalize(torch.randn(10, 4), dim=1)
    wt = torch.randn(6, 4)
    centres = Centres(6, 0.5, mode="probability")
    torch.testing.assert_close(centres.cls, torch.full((6,), 1 / 6))
    stat = teacher_targets(zt, wt, torch.zeros(6), 0.2, vmf=True).mean(0)  # uncentred probabilities
    centres.update(stat, torch.zeros(6), patch_rows=torch.zeros(()))
    torch.testing.assert_close(centres.cls, 0.5 / 6 + 0.5 * stat)
    torch.testing.assert_close(centres.patch, torch.full((6,), 1 / 6))  # no masked patch: unchanged
    centres.update(stat, stat, patch_rows=torch.full((), 3.0))
    torch.testing.assert_close(centres.patch, 0.5 / 6 + 0.5 * stat)  # masked patches: EMA step
    torch.testing.assert_close(centres.offset("cls"), torch.log(centres.cls))


def test_collapse_guard_fires_after_patience_consecutive_steps_only():
    import math

    k = 256
    guard = CollapseGuard(k, patience=3, margin=0.01, min_entropy=0.1)
    uniform, healthy = 0.995 * math.log(k), 3.0
    assert [guard.update(i, e) for i, e in enumerate([uniform, uniform, healthy, uniform, uniform])] == [None] * 5
    message = guard.update(5, uniform)
    assert message and "uniform" in message and "step 5" in message
    sharp = CollapseGuard(k, patience=2, min_entropy=0.1)
    assert sharp.update(0, 0.05) is None and "one prototype" in sharp.update(1, 0.01)
    assert CollapseGuard(k, patience=0).update(0, uniform) is None  # 0 = off


def test_ema_and_prototype_usage():
    teacher, student = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    t0 = teacher.weight.detach().clone()
    ema_update(teacher, student, 0.9)
    torch.testing.assert_close(teacher.weight.detach(), 0.9 * t0 + 0.1 * student.weight.detach())
    uniform = prototype_stats(torch.full((100,), 0.01), "cls", 0.1)
    assert uniform == {"cls_proto_used": 100, "cls_proto_perplexity": pytest.approx(100)}
    collapsed = torch.zeros(100)
    collapsed[:4] = 0.25
    assert prototype_stats(collapsed, "cls", 0.1) == {"cls_proto_used": 4, "cls_proto_perplexity": pytest.approx(4)}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA exit")
def test_gpu_benchmark_exits_cleanly_without_cuda():
    proc = _run([sys.executable, "bench/pretrain.py"], timeout=120)
    assert proc.returncode == 0 and "no CUDA device" in proc.stdout, proc.stderr[-2000:]


# ------------------------------------------------------------------------------------- real runs
@pytest.mark.slow
def test_two_rank_run_learns_logs_and_exports(full_run):
    rows = _metrics(full_run)
    assert [r["step"] for r in rows] == list(range(20))
    first, last = rows[:5], rows[-5:]

    def mean(rs, key):
        return sum(r[key] for r in rs) / len(rs)

    # the total and the patch loss fall; the [CLS] loss = H(teacher) + KL, and its KL part falls
    assert mean(last, "loss") < mean(first, "loss") - 0.2
    assert mean(last, "loss_patch") < mean(first, "loss_patch") - 1.0
    assert mean(last, "cls_kl") < mean(first, "cls_kl") - 0.1
    for key in ("lr", "wd", "momentum", "teacher_temp", "img_per_s", "cls_proto_used", "patch_proto_perplexity",
                "head_kappa_min", "head_kappa_max", "grad_norm", "mask_ratio"):
        assert all(r[key] is not None for r in rows), key
    assert rows[0]["last_layer_frozen"] and not rows[-1]["last_layer_frozen"]
    assert sorted(p.name for p in (full_run / "checkpoints").glob("step-*")) == [
        "step-00000007", "step-00000014", "step-00000020"]

    from safetensors.torch import load_file

    from icehpc.ssl.export import load_backbone

    exported = load_file(str(full_run / "backbone.safetensors"))
    state = torch.load(full_run / "checkpoints" / "step-00000020" / "mp_rank_00_model_states.pt",
                       map_location="cpu", weights_only=True)
    for name, tensor in exported.items():
        assert torch.equal(tensor, state["teacher"]["backbone.vit." + name]), name
    vit = load_backbone(full_run / "backbone.safetensors")
    assert vit(torch.zeros(2, 1, 32, 32)).shape == (2, 64)


def test_a_run_prints_no_deepspeed_or_torch_notes_a_user_cannot_act_on(full_run):
    """Two ranks on CPU: no "Setting accelerator to CPU" per rank, no FutureWarning of the torch
    collective DeepSpeed calls; only icehpc's own last line."""
    console = (full_run.parent / "console.txt").read_text()
    assert "Setting accelerator" not in console and "Warning" not in console, console
    assert console.strip().splitlines()[-1].startswith("icehpc pretrain: step 20/20"), console


def test_deepspeed_keeps_its_other_warnings_and_errors():
    import logging
    import warnings

    from icehpc.ssl.engine import import_deepspeed

    import_deepspeed()
    logger = logging.getLogger("DeepSpeed")

    def record(level: int, msg: str) -> logging.LogRecord:
        return logger.makeRecord("DeepSpeed", level, __file__, 1, msg, (), None)

    assert not logger.filter(record(logging.WARNING, "Setting accelerator to CPU. If you have GPU ..."))
    assert logger.filter(record(logging.WARNING, "Setting accelerator to CUDA failed"))
    assert logger.filter(record(logging.ERROR, "NCCL error"))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        import_deepspeed()  # filters in front of "default": only its own message is dropped
        warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated. Please use ...", FutureWarning)
        warnings.warn("`torch.load` with weights_only=False is deprecated", FutureWarning)
    assert [str(w.message)[:11] for w in seen] == ["`torch.load"]


@pytest.mark.slow
def test_export_cli_from_a_checkpoint(full_run, tmp_path):
    from icehpc.run.cli import main
    from icehpc.ssl.export import read_metadata

    out = tmp_path / "again.safetensors"
    assert main(["export", str(full_run / "checkpoints" / "step-00000014"), "--out", str(out)]) == 0
    meta = read_metadata(out)
    assert meta["step"] == "14" and json.loads(meta["timm_kwargs"])["in_chans"] == 1
    assert main(["export", str(full_run), "--out", str(out)]) == 0  # run folder → latest checkpoint
    assert read_metadata(out)["step"] == "20"


@pytest.mark.slow
def test_resume_mid_epoch_gives_the_same_losses(full_run, shards, tmp_path):
    """Roll a copy of the run back to its step-7 checkpoint (mid-epoch) and restart it: steps 7-19
    must log exactly the same losses and end with the same exported teacher, bit for bit."""
    out = tmp_path / "run"
    shutil.copytree(full_run, out)
    for later in ("step-00000014", "step-00000020"):
        shutil.rmtree(out / "checkpoints" / later)
    (out / "checkpoints" / "latest").write_text("step-00000007\n")
    (out / "backbone.safetensors").unlink()
    proc = _run(_pretrain_cmd(shards, out, "train.epochs=2", "train.checkpoint_every=7", "train.keep_checkpoints=3"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resumed" in proc.stderr and "at step 7" in proc.stderr
    resumed, reference = _metrics(out), _metrics(full_run)
    assert [r["step"] for r in resumed] == list(range(20))  # records after the checkpoint were redone, not duplicated
    for a, b in zip(resumed, reference):
        assert {k: a[k] for k in LOSS_KEYS} == {k: b[k] for k in LOSS_KEYS}, a["step"]
    from safetensors.torch import load_file

    again, first = load_file(str(out / "backbone.safetensors")), load_file(str(full_run / "backbone.safetensors"))
    assert all(torch.equal(again[k], first[k]) for k in first)


def _dino_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """An RGB timm ViT of the tiny shape at 64 px (16×16 grid), saved in DINO's full layout."""
    import timm

    torch.manual_seed(5)
    rgb = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, img_size=64, patch_size=4,
                            embed_dim=64, depth=2, num_heads=2)
    state = rgb.state_dict()
    torch.save({"teacher": {f"backbone.{k}": v for k, v in state.items()}, "epoch": 100}, path)
    return state


@pytest.mark.slow
def test_single_process_init_preemption_and_nan_stop(shards, tmp_path):
    """One process, no launcher: start from a local DINO-layout file, get preempted by SIGUSR2
    mid-run, then diverge with a huge learning rate and stop with the last good checkpoint kept."""
    from timm.layers import resample_abs_pos_embed

    source = _dino_checkpoint(tmp_path / "dino.pth")
    out = tmp_path / "run"
    base = ("train.epochs=3", f"init.path={tmp_path / 'dino.pth'}")

    # 1. preemption: SIGUSR2 → finish the step, checkpoint, exit 75
    proc = subprocess.Popen(_pretrain_cmd(shards, out, *base, nproc=1), cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while len(_metrics(out)) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGUSR2)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT, err[-4000:]
    done = len(_metrics(out))
    assert 3 <= done < 30 and _latest(out) == f"step-{done:08d}"
    assert "SIGUSR2: checkpoint saved" in err

    # the run started from the file: a few warm-up steps (lr ≤ 2e-4, teacher momentum 0.996) move
    # the teacher by < 1e-3, a different initialisation would differ by ~0.1
    teacher = torch.load(out / "checkpoints" / f"step-{done:08d}" / "mp_rank_00_model_states.pt",
                         map_location="cpu", weights_only=True)["teacher"]
    expected = {"blocks.1.attn.qkv.weight": source["blocks.1.attn.qkv.weight"],
                "patch_embed.proj.weight": source["patch_embed.proj.weight"].sum(1, keepdim=True),
                "pos_embed": resample_abs_pos_embed(source["pos_embed"], new_size=(8, 8), old_size=(16, 16))}
    for name, value in expected.items():
        assert (teacher["backbone.vit." + name] - value).abs().max() < 5e-3, name

    # 2. divergence: a huge lr blows the weights up → clear error, nothing newer than the last good checkpoint
    proc = _run(_pretrain_cmd(shards, out, *base, "optim.lr=1e30", "train.checkpoint_every=1000", nproc=1))
    assert proc.returncode == NONFINITE_EXIT, proc.stderr[-4000:]
    assert "non-finite" in proc.stderr and f"step-{done:08d}" in proc.stderr
    assert _latest(out) == f"step-{done:08d}"
    assert all(r["step"] < done + 3 for r in _metrics(out))


@pytest.mark.slow
def test_collapsed_teacher_stops_the_run_loudly_with_a_checkpoint(shards, tmp_path):
    """A collapse threshold every healthy run meets (entropy below 100 nats) stands in for a real
    collapse: the run stops after `patience` steps with exit 4, one clear line and a checkpoint."""
    out = tmp_path / "run"
    proc = _run(_pretrain_cmd(shards, out, "train.collapse_patience=3", "train.collapse_min_entropy=100",
                              "train.checkpoint_every=1000", nproc=1))
    assert proc.returncode == COLLAPSE_EXIT, proc.stderr[-4000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("icehpc pretrain:")]
    assert len(lines) == 1 and "teacher collapsed" in lines[0] and "step-00000003" in lines[0]
    assert _latest(out) == "step-00000003" and len(_metrics(out)) == 3
    assert {"cls_teacher_entropy", "cls_kl", "cls_proto_used", "cls_proto_perplexity"} <= set(_metrics(out)[0])


# ------------------------------------------------------------------------------------------ slurm
def _wait_for_steps(out: Path, n: int, is_over, timeout: float = 150) -> None:
    deadline = time.time() + timeout
    while len(_metrics(out)) < n:
        assert time.time() < deadline and not is_over(), f"run never reached step {n}"
        time.sleep(0.3)


@pytest.mark.slurm
@pytest.mark.slow
def test_sbatch_two_tasks_requeue_on_usr2_and_resume(slurm_cluster, shards, tmp_path):
    """`sbatch jobs/pretrain.sh` with 2 srun tasks; USR2 to the batch shell (what `--signal=B:USR2@T`
    sends before the time limit) → ranks checkpoint → the script requeues → the job resumes and ends."""
    out, log = tmp_path / "run", tmp_path / "slurm-%j.out"
    submit = subprocess.run(
        ["sbatch", "--parsable", f"--partition={slurm_cluster['partition']}", "--ntasks-per-node=2",
         "--cpus-per-task=1", "--time=10", f"--output={log}", "jobs/pretrain.sh", "--config", str(ROOT / TINY),
         f"data.shards={shards}", f"out={out}", "train.progress=false", "train.epochs=1.5"],
        cwd=ROOT, env={**_env(), "ICEHPC_ROOT": str(ROOT)}, capture_output=True, text=True, timeout=30)
    assert submit.returncode == 0, submit.stderr
    job = submit.stdout.strip().split(";")[0]
    try:
        _wait_for_steps(out, 3, lambda: state(job) in TERMINAL)
        subprocess.run(["scancel", "--batch", "--signal=USR2", job], check=True, timeout=30)
        release_when_requeued(job)
        ended = final_state(job, timeout=180)
    finally:
        subprocess.run(["scancel", job], timeout=30)
    text = Path(str(log).replace("%j", job)).read_text()
    assert ended[0] == "COMPLETED", text[-4000:]
    assert "requeueing job" in text and "SIGUSR2: checkpoint saved at step" in text and "resumed" in text
    assert [r["step"] for r in _metrics(out)] == list(range(15))
    assert (out / "backbone.safetensors").exists()


@pytest.mark.slurm
@pytest.mark.slow
def test_submitit_timeout_requeues_and_resumes(slurm_cluster, shards, tmp_path, monkeypatch):
    """`icehpc submit pretrain` path: submitit job with 2 tasks, `job._interrupt(timeout=True)` sends
    USR2 like a time limit; the job checkpoints, is requeued with the same command and completes."""
    from icehpc.run.launch import submit_stage

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "run"
    job = submit_stage("pretrain", ["--config", str(ROOT / TINY), f"data.shards={shards}", f"out={out}",
                                    "train.progress=false", "train.epochs=1.5"],
                       executor="slurm", folder=tmp_path / "submitit", tasks_per_node=2, cpus_per_task=1,
                       time_min=10, partition=slurm_cluster["partition"])
    try:
        _wait_for_steps(out, 3, job.done)
        job._interrupt(timeout=True)
        release_when_requeued(str(job.job_id))
        deadline = time.time() + 180
        while not job.done():
            assert time.time() < deadline, f"job {job.job_id} did not finish"
            time.sleep(1)
        job.results()  # raises with the remote traceback when a task failed
    finally:
        job.cancel(check=False)
    err = job.stderr() or ""
    assert "SIGUSR2: checkpoint saved at step" in err and "resumed" in err, err[-4000:]
    assert [r["step"] for r in _metrics(out)] == list(range(15))
    assert (out / "backbone.safetensors").exists()


# ------------------------------------------------------------------- host syncs of the training step

class _HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every op that makes the host wait for the device: a scalar read (.item(), float(),
    int(), bool() all reach aten._local_scalar_dense), nonzero/masked_select/unique, boolean-mask
    indexing and repeat_interleave with tensor repeats (their output size is data-dependent).
    ``paused`` lets host-side code (augmentation parameters drawn on the CPU) run unrecorded."""

    ops = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim",
           "unique_consecutive", "is_nonzero", "equal"}

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        bad = name in self.ops
        bad |= name == "repeat_interleave" and isinstance(args[0 if len(args) == 1 else 1], torch.Tensor)
        bad |= name in ("index", "index_put", "index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in (args[1] or ()))
        if bad and not self.paused:
            import traceback

            frames = [f for f in traceback.extract_stack() if "icehpc" in f.filename]
            self.seen.append(f"{func} at " + " <- ".join(f"{Path(f.filename).name}:{f.lineno}"
                                                         for f in reversed(frames[-3:])))
        return func(*args, **(kwargs or {}))


def _cpu_trainer(tmp_path, *overrides):
    from icehpc.ssl.trainer import Trainer

    cfg = _cfg(f"out={tmp_path}", "train.progress=false", *overrides)
    return cfg, Trainer(cfg)


def test_train_step_reads_nothing_from_the_device_between_metrics(tmp_path, monkeypatch):
    ref_module = sys.modules["icehpc.ssl.kernels.vmf_xent_torch"]

    """a step that is not a metrics step has no host sync in icehpc's code (no scalar
    read before backward, no boolean indexing, no data-dependent repeat_interleave, no
    int(pairs.max())), checked on the CPU by recording the ops that would sync on a GPU.
    Augmentation parameters are drawn on the CPU by design and run unrecorded. The GPU test
    below checks the same step under torch.cuda.set_sync_debug_mode("error")."""
    cfg, trainer = _cpu_trainer(tmp_path, "loss.lambda_koleo=0.1")  # every term of the loss
    try:
        guard = _HostReads()
        draw = trainer.multicrop

        def multicrop(*args, **kwargs):
            guard.paused = True
            try:
                return draw(*args, **kwargs)
            finally:
                guard.paused = False

        trainer.multicrop = multicrop
        # DeepSpeed's optimizer step is not icehpc's code (torch AdamW reads its CPU step counter);
        # the GPU test below covers it. The pairs range check is the CUDA one (_assert_async).
        ds_step = trainer.engine.step

        def engine_step(*args, **kwargs):
            guard.paused = True
            try:
                return ds_step(*args, **kwargs)
            finally:
                guard.paused = False

        trainer.engine.step = engine_step
        monkeypatch.setattr(ref_module, "check_pairs",
                            lambda p, nt: torch._assert_async(p.max() < nt))
        images = torch.randint(0, 256, (cfg.data.batch_size, 1, cfg.data.canvas, cfg.data.canvas),
                               dtype=torch.uint8)
        sched = schedule_at(0, cfg, trainer.steps_per_epoch, trainer.world)
        assert trainer.train_step(images, sched, False, read=True) is not None  # warm-up, reads
        trainer.step += 1
        with guard:
            assert trainer.train_step(images, sched, False, read=False) is None
        assert not guard.seen, "\n".join(guard.seen)
        trainer.step += 1
        record = trainer.train_step(images, sched, False, read=True)
        assert math.isfinite(record["loss"]) and record["step"] == 2
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.gpu
def test_gpu_train_step_has_no_sync(tmp_path):
    """One non-metrics training step on CUDA under set_sync_debug_mode("error")."""
    cfg, trainer = _cpu_trainer(tmp_path, "engine.device=cuda")
    try:
        images = torch.randint(0, 256, (cfg.data.batch_size, 1, cfg.data.canvas, cfg.data.canvas),
                               dtype=torch.uint8).pin_memory()
        sched = schedule_at(0, cfg, trainer.steps_per_epoch, trainer.world)
        trainer.train_step(images, sched, False, read=True)  # autotune, compile
        trainer.step += 1
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            trainer.train_step(images, sched, False, read=False)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    finally:
        torch.distributed.destroy_process_group()
