"""The embedding job: exact [CLS] values, every metadata column, resume per shard, MPI, Slurm."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from backbone_helpers import png, tiny_backbone
from icehpc import fileio
from icehpc.data import shards as shards_lib  # `shards` is the fixture below
from icehpc.data.format import read_index, shard_paths
from icehpc.data.loader import decode_image
from icehpc.analysis.embed import meta_columns, part_path
from icehpc.analysis.store import open_store
from kappa_helpers import small_store

ROOT = Path(__file__).resolve().parent.parent
CANVAS = 48  # decode canvas; the tiny backbone's input side is 32: the job must resize
BUILD = dict(progress=False)


def _run(cmd: list[str], timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    assert res.returncode == 0, f"{cmd}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    return res


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """120 synthetic particles in 5 shards, built with the real CLI."""
    import sys

    root = tmp_path_factory.mktemp("embed-data")
    cli = [sys.executable, "-m", "icehpc"]
    _run([*cli, "synth", "--out", str(root / "synth"), "--n", "120", "--seed", "3", "--no-progress"])
    _run([*cli, "shards", "build", "--manifest", str(root / "synth" / "manifest.csv"), "--out", str(root / "shards"),
          "--shard-samples", "25", "--no-progress"])
    return root / "shards"


@pytest.fixture(scope="module")
def backbone(tmp_path_factory) -> Path:
    """A tiny seeded backbone exported by the real export code (arch and normalisation in the header)."""
    return tiny_backbone(tmp_path_factory.mktemp("backbone") / "b.safetensors")


@pytest.fixture(scope="module")
def trained(shards, backbone, tmp_path_factory) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The single-process store of the exported backbone: the reference other launches must match."""
    import sys

    store = tmp_path_factory.mktemp("trained") / "s.h5"
    _run([sys.executable, "-m", "icehpc", "embed", str(shards), "--checkpoint", str(backbone), "--out",
          str(store), "--canvas", str(CANVAS)])
    return _read(store)


def _read(store: Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    with open_store(store) as s:
        return s.read(0, s.n_rows)


def _reference_cls(shard_dir: Path, backbone: Path, canvas: int = CANVAS, framing: str = "none") -> dict[str, np.ndarray]:
    """[CLS] per key from the exported file loaded by its own loader, images decoded one by one."""
    import tarfile

    from icehpc.ssl.export import load_backbone, read_metadata

    meta = read_metadata(backbone)
    model = load_backbone(backbone)
    mean, std, size = float(meta["input_mean"]), float(meta["input_std"]), int(meta["input_size"])
    out = {}
    for path in shard_paths(shard_dir):
        with tarfile.open(path) as tar:
            for member in tar:
                if member.name.endswith(".png"):
                    img = decode_image(tar.extractfile(member).read(), canvas, framing=framing)[None].float() / 255
                    img = F.interpolate(img, size=(size, size), mode="bilinear", antialias=True)
                    with torch.no_grad():
                        out[member.name.split(".")[0]] = model.forward_features((img - mean) / std)[0, 0].numpy()
    return out


def test_meta_columns_types_and_gaps():
    metas = [{"__key__": "a", "__shard__": "s.tar", "temperature_c": -5.5, "habit": "plate", "extra": 3,
              "conversion": ["exif"], "particle_height_um": None},
             {"__key__": "b", "__shard__": "s.tar", "temperature_c": None, "habit": None, "extra": 4,
              "particle_height_um": None}]
    cols = meta_columns(metas)
    assert cols["key"].tolist() == ["a", "b"] and cols["shard"].tolist() == ["s.tar", "s.tar"]
    np.testing.assert_array_equal(cols["temperature_c"], [-5.5, np.nan])
    assert cols["habit"].tolist() == ["plate", ""]
    assert cols["extra"].dtype == np.float64
    assert cols["conversion"].tolist() == ['["exif"]', ""]
    assert cols["particle_height_um"].dtype == np.float64  # a contract column stays numeric when all missing


def test_embed_exact_cls_all_columns_and_resume(shards, backbone, tmp_path, icehpc_cmd):
    store = tmp_path / "emb" / "store.h5"
    cmd = [*icehpc_cmd, "embed", str(shards), "--checkpoint", str(backbone), "--out", str(store),
           "--canvas", str(CANVAS), "--batch-size", "16"]
    _run(cmd)
    emb, meta = _read(store)
    index = read_index(shards)
    assert emb.shape == (index["totals"]["written"], 32)
    assert len(set(meta["key"])) == len(meta["key"])
    import xarray as xr  # the store in xarray: embeddings and every column along one `sample` dimension
    with xr.open_dataset(store) as ds:
        assert ds["embeddings"].dims == ("sample", "feature") and sorted(ds.variables) == sorted(["embeddings", *meta])
        np.testing.assert_array_equal(ds["embeddings"].values, emb)
        for column, values in meta.items():
            assert ds[column].dims == ("sample",)
            np.testing.assert_array_equal(ds[column].values, values, err_msg=column)

    # values: the [CLS] token after the final norm of the exported backbone, key by key
    reference = _reference_cls(shards, backbone)
    assert sorted(reference) == sorted(meta["key"])
    for row, key in zip(emb, meta["key"]):
        np.testing.assert_allclose(row, reference[key], rtol=1e-4, atol=1e-5)

    # every metadata field of the shard samples is a column, with the same values
    import webdataset as wds
    first = next(iter(wds.WebDataset(shard_paths(shards)[0], shardshuffle=False)))
    sample = json.loads(first["json"])
    row = list(meta["key"]).index(first["__key__"])
    for column, value in sample.items():
        got = meta[column][row]
        if isinstance(value, (int, float)):
            assert got == pytest.approx(value), column
        elif value is not None and isinstance(value, str):
            assert got == value, column

    # resume: a lost part is recomputed, the others are reused untouched
    parts = sorted(part_path(store, p) for p in shard_paths(shards))
    mtimes = {p: p.stat().st_mtime_ns for p in parts}
    parts[2].unlink()
    res = _run(cmd)
    assert "4 reused" in res.stdout
    assert all(p.stat().st_mtime_ns == mtimes[p] for p in parts if p != parts[2])
    emb2, meta2 = _read(store)
    np.testing.assert_array_equal(emb, emb2)
    assert (meta["key"] == meta2["key"]).all()

    # parts of another model are never mixed into this store
    res = subprocess.run([*icehpc_cmd, "embed", str(shards), "--random-init", "--like", str(backbone), "--out",
                          str(store), "--canvas", str(CANVAS)], capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "different run" in res.stderr


def test_embed_random_init_like_and_rgb_timm_checkpoint(shards, backbone, trained, tmp_path, icehpc_cmd):
    # --random-init --like: the exported shape with seeded random weights, the same in every process
    from icehpc.data.loader import ordered_loader
    from icehpc.analysis.embed import eval_transform
    from icehpc.ssl.export import backbone_spec, build_backbone

    _run([*icehpc_cmd, "embed", str(shards), "--random-init", "--like", str(backbone), "--seed", "1",
          "--out", str(tmp_path / "r1" / "s.h5"), "--canvas", str(CANVAS)])
    a, a_meta = _read(tmp_path / "r1" / "s.h5")
    assert a.shape == trained[0].shape and not np.allclose(a, trained[0])
    spec = backbone_spec(None, None, None, seed=1, like=str(backbone))
    assert (spec.img_size, spec.mean, spec.std) == (32, 0.5, 0.25)
    model = build_backbone(spec, seed=1)
    with torch.inference_mode():
        for images, metas in ordered_loader(shard_paths(shards)[:1], batch_size=64, canvas=CANVAS):
            want = model.forward_features(eval_transform(images, 32, 0.5, 0.25, torch.float32))[:, 0].numpy()
            rows = [list(a_meta["key"]).index(m["__key__"]) for m in metas]
            np.testing.assert_allclose(a[rows], want, rtol=1e-4, atol=1e-5)

    # a 3-channel timm checkpoint (.pth) is folded to grayscale: same as summing the RGB filters
    import timm

    kwargs = dict(pretrained=False, num_classes=0, img_size=32)
    torch.manual_seed(0)
    rgb = timm.create_model("vit_tiny_patch16_224", in_chans=3, **kwargs)
    torch.save({"model": rgb.state_dict()}, tmp_path / "rgb.pth")
    _run([*icehpc_cmd, "embed", str(shards), "--checkpoint", str(tmp_path / "rgb.pth"), "--model",
          "vit_tiny_patch16_224", "--img-size", "32", "--out", str(tmp_path / "rgb" / "s.h5"), "--canvas", str(CANVAS)])
    got, meta = _read(tmp_path / "rgb" / "s.h5")
    gray = timm.create_model("vit_tiny_patch16_224", in_chans=1, **kwargs)
    state = rgb.state_dict()
    state["patch_embed.proj.weight"] = state["patch_embed.proj.weight"].sum(dim=1, keepdim=True)
    gray.load_state_dict(state)
    gray.eval()
    first = shard_paths(shards)[0]
    images, metas = next(iter(ordered_loader([first], batch_size=8, canvas=CANVAS)))
    x = F.interpolate(images.float() / 255, size=(32, 32), mode="bilinear", antialias=True)
    with torch.no_grad():
        want = gray.forward_features((x - 0.449) / 0.226)[:, 0].numpy()
    rows = [list(meta["key"]).index(m["__key__"]) for m in metas]
    np.testing.assert_allclose(got[rows], want, rtol=1e-4, atol=1e-5)


def _descendants(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout.split()
    children = [int(p) for p in out]
    return children + [d for c in children for d in _descendants(c)]


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL mpiexec and every rank it started (ranks may sit in their own process groups)."""
    for pid in [*_descendants(proc.pid), proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


@pytest.mark.slow
@pytest.mark.mpi
def test_embed_two_mpi_ranks_equal_one_and_survive_sigkill(shards, backbone, trained, tmp_path, icehpc_cmd,
                                                            mpiexec):
    one, one_meta = trained
    store = tmp_path / "mpi" / "s.h5"
    _run([*mpiexec, "-n", "2", *icehpc_cmd, "embed", str(shards), "--checkpoint", str(backbone), "--out",
          str(store), "--canvas", str(CANVAS), "--batch-size", "8"])
    two, two_meta = _read(store)
    assert (one_meta["key"] == two_meta["key"]).all()
    np.testing.assert_allclose(one, two, rtol=1e-5, atol=1e-6)
    summary = json.loads(Path(f"{store}.json").read_text())
    assert summary["ranks"] == 2 and summary["rows"] == len(one)

    # SIGKILL both ranks once the first part exists; the same command then finishes the store.
    # A bigger model (ViT-S/16 at 64 px, random-init) makes the job slow enough to interrupt.
    killed = tmp_path / "killed" / "s.h5"
    big = ["--random-init", "--model", "vit_small_patch16_224", "--img-size", "64", "--batch-size", "5"]
    cmd = [*mpiexec, "-n", "2", *icehpc_cmd, "embed", str(shards), *big, "--out", str(killed)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = [part_path(killed, p) for p in shard_paths(shards)]
    deadline = time.monotonic() + 240
    while not any(p.exists() for p in parts) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    _kill_tree(proc)
    done_at_kill = sum(p.exists() for p in parts)
    assert 0 < done_at_kill < len(parts), f"kill came at {done_at_kill}/{len(parts)} parts; cannot test resume"
    assert not Path(f"{killed}.json").exists()
    mtimes = {p: p.stat().st_mtime_ns for p in parts if p.exists()}
    res = _run(cmd)
    assert f"{done_at_kill} reused" in res.stdout
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())
    resumed, resumed_meta = _read(killed)

    # the uninterrupted reference, computed here in one pass over all shards
    from icehpc.data.loader import ordered_loader
    from icehpc.analysis.embed import eval_transform
    from icehpc.ssl.export import backbone_spec, build_backbone

    spec = backbone_spec(None, "vit_small_patch16_224", 64, seed=0)
    model = build_backbone(spec, seed=0)
    keys, rows = [], []
    with torch.inference_mode():
        for images, metas in ordered_loader(shard_paths(shards), batch_size=16, canvas=64):
            rows.append(model.forward_features(eval_transform(images, 64, spec.mean, spec.std, torch.float32))[:, 0])
            keys += [m["__key__"] for m in metas]
    assert resumed_meta["key"].tolist() == keys
    np.testing.assert_allclose(resumed, torch.cat(rows).numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["plain", pytest.param("mpi", marks=pytest.mark.mpi)])
def test_ctrl_c_is_one_line_keeps_finished_parts_and_the_rerun_resumes(launcher, shards, tmp_path, icehpc_cmd,
                                                                        request, capsys):
    """Ctrl-C (SIGINT to the foreground process group, as a terminal sends it) once the first part
    exists: one line, no traceback, exit 130; under mpiexec (which stops its ranks with SIGTERM)
    rank 0's line only. Finished parts stay, no temporary or lock is left, and the rerun resumes."""
    from cli_helpers import one_clear_line, sigint_as_in_a_terminal
    from icehpc.analysis.embed import parts_dir

    store = tmp_path / "s.h5"
    side = "128" if launcher == "mpi" else "64"  # slow enough that mpiexec's SIGTERM comes before the last part
    big = ["--random-init", "--model", "vit_small_patch16_224", "--img-size", side, "--batch-size", "5"]
    cmd = [*icehpc_cmd, "embed", str(shards), *big, "--out", str(store)]
    prefix = [*request.getfixturevalue("mpiexec"), "-n", "2"] if launcher == "mpi" else []
    proc = subprocess.Popen([*prefix, *cmd], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            start_new_session=True, preexec_fn=sigint_as_in_a_terminal,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    parts = [part_path(store, p) for p in shard_paths(shards)]
    deadline = time.monotonic() + 240
    while not any(p.exists() for p in parts) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    # progress lines ("[embed] 10/40 images ...", "[embed rank 0/2] ...", from 2 s on in a log) may come
    # first: the rest is one line
    err = "".join(ln for ln in err.splitlines(keepends=True) if not ln.startswith(("[embed] ", "[embed rank ")))
    ended = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    if launcher == "plain":
        one_clear_line(ended, "icehpc embed: interrupted; finished outputs are kept, rerun the same command to "
                              "resume", code=130)
    else:  # mpiexec's own exit code; its ranks got SIGTERM
        one_clear_line(ended, "icehpc embed: stopped by SIGTERM; finished outputs are kept")
    kept = [p for p in parts if p.exists()]
    assert 0 < len(kept) < len(parts), f"stopped at {len(kept)}/{len(parts)} parts; cannot test resume"
    assert not list(parts_dir(store).glob(".*.tmp")) and not Path(f"{store}.json").exists()

    stale = parts_dir(store) / f".{parts[0].name}.killed.tmp"  # what a SIGKILL would leave: the rerun drops it
    stale.write_bytes(b"partial")
    res = _run(cmd)  # the lock was released: the same command resumes
    assert not stale.exists()
    assert f"{len(kept)} reused" in res.stdout and "nan" not in res.stdout, res.stdout
    from icehpc.run.cli import main  # once more, in this process (torch is loaded): all reused, no rate

    assert main(cmd[len(icehpc_cmd):]) == 0
    said = capsys.readouterr().out
    assert f"{len(parts)} reused" in said and "nothing to compute" in said and "nan" not in said, said


@pytest.mark.slow
@pytest.mark.slurm
@pytest.mark.mpi
def test_embed_sbatch_and_submit_on_slurm(shards, backbone, trained, tmp_path, slurm_cluster, icehpc_cmd):
    reference, ref_meta = trained
    out = tmp_path / "slurm" / "s.h5"
    res = subprocess.run(["sbatch", "--parsable", "--wait", "--ntasks=2", f"--partition={slurm_cluster['partition']}",
                          f"--output={tmp_path / 'slurm-%j.out'}", str(ROOT / "jobs" / "embed.sh"), str(shards),
                          "--checkpoint", str(backbone), "--out", str(out), "--canvas", str(CANVAS)],
                         capture_output=True, text=True, timeout=180, cwd=ROOT)
    logs = "\n".join(p.read_text() for p in tmp_path.glob("slurm-*.out"))
    assert res.returncode == 0, f"{res.stderr}\n{logs}"
    got, meta = _read(out)
    assert json.loads(Path(f"{out}.json").read_text())["ranks"] == 2, logs
    assert (meta["key"] == ref_meta["key"]).all()
    np.testing.assert_allclose(got, reference, rtol=1e-5, atol=1e-6)

    out2 = tmp_path / "submitit" / "s.h5"
    res = subprocess.run([*icehpc_cmd, "submit", "embed", "--tasks-per-node", "2", "--partition",
                          slurm_cluster["partition"], "--folder", str(tmp_path / "submitit-logs"), "--time-min", "5",
                          "--wait", "--", str(shards), "--checkpoint", str(backbone), "--out", str(out2),
                          "--canvas", str(CANVAS)], capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    got2, meta2 = _read(out2)
    assert json.loads(Path(f"{out2}.json").read_text())["ranks"] == 2
    assert (meta2["key"] == ref_meta["key"]).all()
    np.testing.assert_allclose(got2, reference, rtol=1e-5, atol=1e-6)


def test_embed_frames_particles_as_pretraining_did_from_the_export_header(shards, tmp_path, icehpc_cmd):
    """The export header records pretraining's canvas and framing; `icehpc embed` (trained and
    random-init --like) uses them without --canvas/--framing, so both see what pretraining saw."""
    from icehpc.ssl.config import DataConfig
    from icehpc.ssl.export import backbone_spec, read_metadata

    path = tiny_backbone(tmp_path / "framed.safetensors", seed=3, depth=1, step=1,
                         data=DataConfig(canvas=64, framing="bbox", framing_margin=0.1))
    meta = read_metadata(path)
    assert (meta["input_canvas"], meta["input_framing"], meta["input_framing_margin"]) == ("64", "bbox", "0.1")
    for spec in (backbone_spec(str(path), None, None, 0), backbone_spec(None, None, None, 0, like=str(path))):
        assert (spec.canvas, spec.framing, spec.framing_margin) == (64, "bbox", 0.1)
    store = tmp_path / "framed.h5"
    _run([*icehpc_cmd, "embed", str(shards), "--checkpoint", str(path), "--out", str(store)])
    emb, meta_cols = _read(store)
    ref = _reference_cls(shards, path, canvas=64, framing="bbox")
    keys = [k.decode() if isinstance(k, bytes) else str(k) for k in meta_cols["key"]]
    np.testing.assert_allclose(emb, np.stack([ref[k] for k in keys]), atol=2e-5, rtol=0)
    assert json.loads(Path(f"{store}.json").read_text())["backbone"]["framing"] == "bbox"
    # the store's contract: the framing and the shard build are part of its fingerprint
    from icehpc.analysis import embed
    from icehpc.run.stages import parse_stage_args

    argv = [str(shards), "--checkpoint", str(path), "--out", str(store)]
    assert embed.status(parse_stage_args("embed", argv)).done
    unframed = parse_stage_args("embed", [*argv, "--framing", "none"])
    assert not embed.status(unframed).done
    proc = _run([*icehpc_cmd, "embed", *argv, "--framing", "none"])
    assert "0 reused" in proc.stdout  # every part recomputed: a bbox part is not a framing=none part
    ref_none = _reference_cls(shards, path, canvas=64, framing="none")
    emb2, _ = _read(store)
    np.testing.assert_allclose(emb2, np.stack([ref_none[k] for k in keys]), atol=2e-5, rtol=0)
    assert embed.status(unframed).done and not embed.status(parse_stage_args("embed", argv)).done


def test_eval_size_is_the_embedding_side_of_trained_and_random_init(shards, tmp_path, icehpc_cmd):
    """augment.eval_size goes into the header as input_size (the weights keep the training grid,
    input_train_size); `icehpc embed` and its random-init control both embed at that side."""
    from icehpc.ssl.export import backbone_spec, read_metadata

    path = tiny_backbone(tmp_path / "fixres.safetensors", seed=4, depth=1, step=1, eval_size=48)
    meta = read_metadata(path)
    assert (meta["input_size"], meta["input_train_size"]) == ("48", "32")
    assert json.loads(meta["timm_kwargs"])["img_size"] == 32
    assert backbone_spec(None, None, None, 0, like=str(path)).img_size == 48
    store = tmp_path / "fixres.h5"
    _run([*icehpc_cmd, "embed", str(shards), "--checkpoint", str(path), "--out", str(store), "--canvas", str(CANVAS)])
    emb, meta_cols = _read(store)
    ref = _reference_cls(shards, path)
    keys = [k.decode() if isinstance(k, bytes) else str(k) for k in meta_cols["key"]]
    np.testing.assert_allclose(emb, np.stack([ref[k] for k in keys]), atol=2e-5, rtol=0)
    at32 = tmp_path / "at32.h5"
    _run([*icehpc_cmd, "embed", str(shards), "--checkpoint", str(path), "--out", str(at32), "--canvas", str(CANVAS),
          "--img-size", "32"])
    assert not np.allclose(_read(at32)[0], emb, atol=1e-3)  # the side matters, so the default is checked
    rand = tmp_path / "rand.h5"
    _run([*icehpc_cmd, "embed", str(shards), "--random-init", "--like", str(path), "--out", str(rand),
          "--canvas", str(CANVAS)])
    assert json.loads(Path(f"{rand}.json").read_text())["backbone"]["img_size"] == 48


# ------------------------------------------------------------------ hostile: stale embedding parts, locks
@pytest.fixture(scope="module")
def small_backbone(tmp_path_factory) -> Path:
    return tiny_backbone(tmp_path_factory.mktemp("bb") / "b.safetensors", size=16, dim=16, depth=1, step=1)


def _manifest_shards(folder: Path, out: Path, offset: float) -> None:
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(12):
        (folder / "img" / f"{i}.png").write_bytes(png(i, 14, 14))
        rows.append(f"img/{i}.png,{'plate' if i % 2 else 'column'},{-20.0 + offset + i}")
    (folder / "m.csv").write_text("path,habit,temperature_c\n" + "\n".join(rows) + "\n")
    shards_lib.build([str(folder / "m.csv")], out, shards_lib.BuildConfig(shard_samples=5), overwrite=True, **BUILD)


def test_2_parts_of_a_rebuilt_shard_folder_are_recomputed(tmp_path, small_backbone):
    from icehpc.analysis.embed import run_embed
    from icehpc.analysis.store import open_store

    kw = dict(checkpoint=str(small_backbone), random_init=False, arch=None, img_size=None, canvas=16,
              batch_size=8, num_workers=0)
    src, sh, store = tmp_path / "src", tmp_path / "shards", tmp_path / "emb" / "store.h5"
    _manifest_shards(src, sh, 0.0)
    run_embed(str(sh), str(store), **kw)
    _manifest_shards(src, sh, 100.0)  # same images, keys and counts; temperatures 100 °C warmer
    summary = run_embed(str(sh), str(store), **kw)
    assert summary["shards_reused"] == 0
    with open_store(store) as st:
        _, meta = st.read(0, st.n_rows, columns=["key", "temperature_c"])
    order = np.argsort(meta["key"])
    np.testing.assert_allclose(meta["temperature_c"][order], 80.0 + np.arange(12))
    again = run_embed(str(sh), str(store), **kw)  # nothing changed: everything reused
    assert again["shards_reused"] == again["shards"] == 3


def test_1_embed_and_kappa_lock_their_output_folders(tmp_path, small_backbone):
    from icehpc.analysis.embed import parts_dir, run_embed
    from icehpc.analysis.kappa import KappaConfig, run_kappa

    src, sh, store = tmp_path / "src", tmp_path / "shards", tmp_path / "emb" / "store.h5"
    _manifest_shards(src, sh, 0.0)
    with fileio.lock_dir(parts_dir(store)):
        with pytest.raises(fileio.LockedError, match=f"PID {os.getpid()}"):
            run_embed(str(sh), str(store), checkpoint=str(small_backbone), random_init=False, arch=None,
                      img_size=None, canvas=16, batch_size=8, num_workers=0)
    assert not list(parts_dir(store).glob("*.h5"))
    master = small_store(tmp_path / "s")
    with fileio.lock_dir(tmp_path / "k"):
        with pytest.raises(fileio.LockedError):
            run_kappa(master, tmp_path / "k", KappaConfig(groupings=["habit"], bootstrap=0, similarity_by=""))
    assert not (tmp_path / "k" / "kappa.json").exists()
