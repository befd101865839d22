"""The checkpoint layout's one owner (icehpc.ssl.checkpoint): commit() seals a tag, model_states()
verifies it before anyone outside the trainer reads it; `icehpc export` refuses what resume rejects."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from backbone_helpers import png_tree
from icehpc import config as cfglib
from icehpc.data import shards
from icehpc.run.cli import main
from icehpc.ssl import checkpoint as ck
from icehpc.ssl.config import PretrainConfig

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
BUILD = dict(progress=False)


def _fake_tag(out: Path, step: int) -> str:
    """A tag as DeepSpeed leaves it (model states with icehpc's client state), sealed by commit()."""
    tag = f"step-{step:08d}"
    d = ck.checkpoint_root(out) / tag
    d.mkdir(parents=True)
    cfg = cfglib.to_dict(PretrainConfig())
    state = {"step": step, "config": cfg, "teacher": {"backbone.vit.cls_token": torch.zeros(1, 1, 4),
                                                      "backbone.vit.pos_embed": torch.full((1, 2, 4), float(step))}}
    torch.save(state, d / ck.MODEL_STATES)
    (d / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"optimizer" * 100)
    ck.commit(out, tag, keep=2)
    return tag


def test_commit_writes_manifest_then_latest_and_prunes(tmp_path):
    for step in (1, 2, 3):
        _fake_tag(tmp_path, step)
    root = ck.checkpoint_root(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000002", "step-00000003"]
    assert ck.latest_tag(tmp_path) == "step-00000003"
    assert ck.check_tag(tmp_path, "step-00000003") is None
    assert ck.resume_tag(tmp_path) == ("step-00000003", [])
    assert ck.model_states(tmp_path) == root / "step-00000003" / ck.MODEL_STATES
    assert ck.model_states(root) == root / "step-00000003" / ck.MODEL_STATES
    assert ck.model_states(root / "step-00000002") == root / "step-00000002" / ck.MODEL_STATES


def test_export_refuses_a_tag_whose_manifest_does_not_verify(tmp_path, capsys):
    tag = _fake_tag(tmp_path, 5)
    out = tmp_path / "b.safetensors"
    assert main(["export", str(tmp_path), "--out", str(out)]) == 0
    from icehpc.ssl.export import read_metadata

    assert read_metadata(out)["step"] == "5"
    capsys.readouterr()
    f = ck.checkpoint_root(tmp_path) / tag / ck.MODEL_STATES
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01  # one byte flipped on disk
    f.write_bytes(bytes(data))
    for target in (tmp_path, ck.checkpoint_root(tmp_path), ck.checkpoint_root(tmp_path) / tag):
        assert main(["export", str(target), "--out", str(tmp_path / "c.safetensors")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "does not match its sha256" in err and "Traceback" not in err, err
    assert not (tmp_path / "c.safetensors").exists()
    with pytest.raises(ck.ResumeError):
        ck.resume_tag(tmp_path)  # resume rejects the same tag


def test_export_refuses_a_tag_without_manifest_or_a_foreign_latest(tmp_path, capsys):
    tag = _fake_tag(tmp_path, 3)
    root = ck.checkpoint_root(tmp_path)
    (root / tag / ck.MANIFEST).unlink()
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "sha256.json is missing" in capsys.readouterr().err
    (root / "latest").write_text("../../elsewhere\n")
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "not a checkpoint name" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nothing"), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "no checkpoint found" in capsys.readouterr().err


# ------------------------------------------------------------------ hostile: damaged checkpoints, foreign `latest`
def _fake_run(tmp_path: Path, steps=(3, 6)) -> Path:
    from icehpc.ssl.checkpoint import checkpoint_root, write_manifest

    out = tmp_path / "run"
    for s in steps:
        tag = checkpoint_root(out) / f"step-{s:08d}"
        (tag / "global_step").mkdir(parents=True)
        (tag / "mp_rank_00_model_states.pt").write_bytes(np.random.default_rng(s).bytes(4096))
        (tag / "global_step" / "zero.pt").write_bytes(np.random.default_rng(s + 1).bytes(1000))
        write_manifest(tag)
    (checkpoint_root(out) / "latest").write_text(f"step-{steps[-1]:08d}\n")
    return out


def test_6_intact_latest_is_resumed(tmp_path):
    from icehpc.ssl.checkpoint import resume_tag

    assert resume_tag(_fake_run(tmp_path)) == ("step-00000006", [])
    assert resume_tag(tmp_path / "fresh") == (None, [])


@pytest.mark.parametrize("fault", ["flip64", "truncate", "empty", "missing_file", "missing_tag", "no_manifest"])
def test_6_damaged_latest_falls_back_to_the_newest_intact_one_with_a_warning(tmp_path, fault):
    import shutil

    from icehpc.ssl.checkpoint import checkpoint_root, resume_tag

    out = _fake_run(tmp_path)
    tag = checkpoint_root(out) / "step-00000006"
    f = tag / "mp_rank_00_model_states.pt"
    data = bytearray(f.read_bytes())
    if fault == "flip64":
        data[1024:1088] = bytes(b ^ 0xFF for b in data[1024:1088])
        f.write_bytes(bytes(data))
    elif fault == "truncate":
        f.write_bytes(bytes(data[:2000]))
    elif fault == "empty":
        f.write_bytes(b"")
    elif fault == "missing_file":
        f.unlink()
    elif fault == "missing_tag":
        shutil.rmtree(tag)
    else:
        (tag / "icehpc-sha256.json").unlink()
    got, warnings = resume_tag(out)
    assert got == "step-00000003"
    assert any("step-00000006" in w for w in warnings) and any("step-00000003 instead" in w for w in warnings)


@pytest.mark.parametrize("latest", ["../../other-run/checkpoints/step-00000009", "/tmp/step-00000009",
                                    "step-00000009/../../../other-run/checkpoints/step-00000009"])
def test_6_latest_may_only_name_a_tag_of_this_run(tmp_path, latest):
    from icehpc.ssl.checkpoint import checkpoint_root, resume_tag

    other = _fake_run(tmp_path / "x", steps=(9,))
    (tmp_path / "other-run").mkdir()
    (other).rename(tmp_path / "other-run" / "_")
    out = _fake_run(tmp_path)
    (checkpoint_root(out) / "latest").write_text(latest + "\n")
    got, warnings = resume_tag(out)
    assert got == "step-00000006" and "not a checkpoint name" in warnings[0]


def test_6_no_intact_checkpoint_is_one_clear_error(tmp_path):
    from icehpc.ssl.checkpoint import ResumeError, checkpoint_root, resume_tag

    out = _fake_run(tmp_path)
    for tag in checkpoint_root(out).glob("step-*"):
        (tag / "mp_rank_00_model_states.pt").write_bytes(b"")
    with pytest.raises(ResumeError, match="no intact checkpoint"):
        resume_tag(out)


@pytest.mark.slow
def test_6_flipped_block_in_a_real_checkpoint_resumes_from_the_older_one_exactly(tmp_path):
    tree = png_tree(tmp_path / "tree", {"plate": 20, "column": 20})
    sh = tmp_path / "shards"
    shards.build([str(tree)], sh, shards.BuildConfig(), **BUILD)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "icehpc", "pretrain", "--config", "pretrain-tiny-cpu.yaml", f"data.shards={sh}",
           f"out={out}", "train.progress=false", "data.batch_size=8", "data.num_workers=0",
           "data.batches_per_epoch=3", "train.epochs=2", "train.checkpoint_every=3", "train.export=false"]
    first = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300, cwd=ROOT)
    assert first.returncode == 0, first.stderr[-3000:]
    reference = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    ckpt = out / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step-00000006"
    states = next((ckpt / "step-00000006").glob("*model_states.pt"))
    data = bytearray(states.read_bytes())
    data[len(data) // 2:len(data) // 2 + 64] = bytes(b ^ 0xFF for b in data[len(data) // 2:len(data) // 2 + 64])
    states.write_bytes(bytes(data))
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reference[:3]))
    cmd = [*cmd[:-3], "train.epochs=2", "train.checkpoint_every=3", "train.export=false"]
    again = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "step-00000003 instead" in again.stderr and "at step 3" in again.stderr
    redone = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in redone] == [r["step"] for r in reference]
    for a, b in zip(redone, reference):
        assert a["loss"] == b["loss"], a["step"]
    (ckpt / "latest").write_text("../../elsewhere/checkpoints/step-00000006\n")
    for tag in ckpt.glob("step-*"):
        next(tag.glob("*model_states.pt")).write_bytes(b"")
    bad = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300, cwd=ROOT)
    assert bad.returncode == 2 and "no intact checkpoint" in bad.stderr and "Traceback" not in bad.stderr
