"""The checkpoint layout's one owner (icehpc.ssl.checkpoint): commit() seals a tag, model_states()
verifies it before anyone outside the trainer reads it; `icehpc export` refuses what resume rejects."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from icehpc import config as cfglib
from icehpc.run.cli import main
from icehpc.ssl import checkpoint as ck
from icehpc.ssl.config import PretrainConfig


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
