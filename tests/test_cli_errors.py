"""Every user mistake the CLI sees ends in one clear line on stderr and exit code 2, no traceback;
and a folder holding manifest.csv is read through it."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kappa_helpers import write_store
from cli_helpers import one_clear_line

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("mistakes")
    rng = np.random.default_rng(0)
    write_store(d / "s", rng.normal(size=(60, 8)).astype(np.float32), {"habit": np.array(["a", "b", "c"] * 20),
                                                                        "key": np.array([f"{i:09d}" for i in range(60)])})
    (d / "run").mkdir()
    (d / "run" / "checkpoints").mkdir()
    (d / "empty").mkdir()
    fake = d / "bin"
    fake.mkdir()
    sbatch = fake / "sbatch"  # a Slurm client without a reachable controller
    sbatch.write_text("#!/bin/sh\necho 'sbatch: error: resolve_ctls_from_dns_srv: res_nsearch error' >&2\n"
                      "echo 'sbatch: fatal: Could not establish a configuration source' >&2\nexit 1\n")
    sbatch.chmod(0o755)
    return d


def _store(d: Path) -> str:
    return str(d / "s" / "store.h5")


CASES = {
    "embed-missing-checkpoint": (["embed", "shards", "--checkpoint", "nope.safetensors", "--out", "e.h5"],
                                 "--checkpoint nope.safetensors does not exist"),
    "embed-folder-checkpoint": (["embed", "shards", "--checkpoint", "{d}/run", "--out", "e.h5"],
                                "is a folder, not a backbone file; export one with `icehpc export"),
    "probe-wrong-label": (["probe", "{store}", "--label", "habbit", "--out", "{d}/p"],
                          "no meta column 'habbit' (columns: ['habit', 'key']); choose the class column with --label"),
    "probe-folder-store": (["probe", "{d}/empty", "--out", "{d}/p"], "is a folder without store.h5"),
    "shards-mistyped-manifest": (["shards", "build", "--manifest", "{d}/manifst.csv", "--out", "{d}/o"],
                                 "manifst.csv does not exist"),
    "report-on-h5": (["report", "{store}", "--out", "{d}/r"], "is a file; give the κ folder"),
    "submit-no-slurm": (["submit", "--folder", "{d}/logs", "kappa", "--", "{store}", "--out", "{d}/k"],
                        "could not submit to Slurm (sbatch: fatal: Could not establish a configuration source)"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_user_mistakes_end_in_one_clear_line(case, files):
    argv, message = CASES[case]
    store = _store(files)
    argv = [a.format(d=files, store=store) for a in argv]
    env = {**os.environ, "PATH": f"{files / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run([sys.executable, "-m", "icehpc", *argv], capture_output=True, text=True, timeout=300,
                         cwd=files, env=env)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"icehpc {argv[0]}: error: ") and message in last, out.stderr


def test_folder_with_manifest_uses_it_and_keeps_metadata(tmp_path, icehpc_cmd):
    from PIL import Image

    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    rows = ["path,habit,temperature_c,campaign"]
    for i, habit in enumerate(["column", "plate", "column", "bullet"]):
        Image.fromarray(np.full((12, 12), 40 * i, np.uint8)).save(data / "images" / f"{i}.png")
        rows.append(f"images/{i}.png,{habit},{-10 - i},c1")
    (data / "manifest.csv").write_text("\n".join(rows) + "\n")
    res = subprocess.run([*icehpc_cmd, "shards", "build", str(data), "--out", str(tmp_path / "s"), "--no-progress"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert "holds manifest.csv: using it as the manifest" in res.stderr
    index = json.loads((tmp_path / "s" / "index.json").read_text())
    assert index["totals"]["written"] == 4 and index["totals"]["rejected"] == 0
    from icehpc.data.format import iter_samples, shard_paths

    metas = [json.loads(members["json"]) for shard in shard_paths(tmp_path / "s")
             for _, members in iter_samples(shard)]
    assert sorted(m["habit"] for m in metas) == ["bullet", "column", "column", "plate"]
    assert all(m["temperature_c"] is not None and m["campaign"] == "c1" for m in metas)


# ------------------------------------------------------------------ storage failures (issue #20)
@contextlib.contextmanager
def _tmpfs(folder: Path, options: str):
    """A small tmpfs at ``folder`` (root only; skips the test where mounting is not allowed)."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    if proc.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def _cli_line(args: list[str], code: int, *words: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "icehpc", *args], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    return one_clear_line(proc, *words, code=code)


def test_disk_full_is_one_line_naming_the_folder_in_kappa_and_synth(files, tmp_path):
    with _tmpfs(tmp_path / "full", "size=64k") as full:
        with open(full / "filler", "wb") as fh:  # leave one page: the lock fits, the outputs do not
            fh.write(b"\0" * (60 << 10))
        line = _cli_line(["kappa", _store(files), "--out", str(full / "k"), "--by", "habit"], 1,
                         "icehpc kappa: error: no space left on the device", str(full / "k"), "free space")
        assert "rerun" in line
        assert not (full / "k" / "kappa.json").exists()
        (full / "filler").unlink()
        with open(full / "filler", "wb") as fh:
            fh.write(b"\0" * (56 << 10))
        _cli_line(["synth", "--out", str(full / "s"), "--n", "200", "--workers", "1", "--no-progress"], 1,
                  "icehpc synth: error: no space left on the device", str(full / "s"))


def test_read_only_output_folder_is_one_line(files, tmp_path):
    with _tmpfs(tmp_path / "ro", "size=64k,ro") as ro:
        _cli_line(["kappa", _store(files), "--out", str(ro / "k"), "--by", "habit"], 1,
                  "icehpc kappa: error: the file system is read-only while writing", str(ro / "k"))


@pytest.mark.parametrize("err,words", [(errno.EDQUOT, "disk quota exceeded while writing /x/y"),
                                       (errno.EACCES, "permission denied on /x/y; check its permissions")])
def test_storage_errors_read_as_one_line_and_others_stay_errors(err, words):
    from icehpc.run.stages import storage_error

    assert words in storage_error(OSError(err, os.strerror(err), "/x/y"))
    assert "a file under OUT" in storage_error(OSError(err, os.strerror(err)), "OUT")
    assert storage_error(OSError(errno.EIO, "I/O error")) is None  # not the user's to fix: a traceback


class _Payload:
    def __reduce__(self):  # would run a command when unpickled without weights_only
        return (os.system, ("touch pwned",))


def test_refused_pickle_checkpoint_is_one_line_and_runs_nothing(tmp_path):
    import io

    import torch
    from PIL import Image

    from icehpc.data import shards

    (tmp_path / "img").mkdir()
    rows = []
    for i in range(4):
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (14, 14), dtype=np.uint8), "L").save(buf, "PNG")
        (tmp_path / "img" / f"{i}.png").write_bytes(buf.getvalue())
        rows.append(f"img/{i}.png,plate")
    (tmp_path / "m.csv").write_text("path,habit\n" + "\n".join(rows) + "\n")
    shards.build([str(tmp_path / "m.csv")], tmp_path / "sh", shards.BuildConfig(shard_samples=4), overwrite=True,
                 progress=False)
    torch.save({"state_dict": {}, "evil": _Payload()}, tmp_path / "evil.pth")
    _cli_line(["embed", str(tmp_path / "sh"), "--checkpoint", str(tmp_path / "evil.pth"), "--model",
               "vit_tiny_patch16_224", "--img-size", "16", "--out", str(tmp_path / "e.h5")], 2,
              f"checkpoint {tmp_path / 'evil.pth'}: refused", "GLOBAL posix.system")
    assert not (ROOT / "pwned").exists() and not (tmp_path / "pwned").exists()


# ------------------------------------------------------------------ --out naming a file (issue #21)
#: every stage that writes an --out, with arguments that would otherwise start it ({out}: the path)
OUT_CASES = {
    "synth": ["synth", "--out", "{out}", "--n", "20"],
    "shards": ["shards", "build", "{d}/empty", "--out", "{out}"],
    "pretrain": ["pretrain", "--out", "{out}"],
    "kappa": ["kappa", "{store}", "--out", "{out}", "--by", "habit"],
    "curate": ["curate", "{store}", "--out", "{out}"],
    "outliers": ["outliers", "{store}", "--out", "{out}"],
    "report": ["report", "{d}/run", "--out", "{out}"],
    "probe": ["probe", "{store}", "--out", "{out}", "--label", "habit"],
    "classify": ["classify", "{store}", "--labels", "{d}/labels.csv", "--out", "{out}"],
    "pipeline": ["pipeline", "--out", "{out}"],
    "pipeline --plan": ["pipeline", "--out", "{out}", "--plan"],
    "export": ["export", "{d}/run", "--out", "{out}"],  # a file: a folder is refused
    "embed": ["embed", "{d}/empty", "--random-init", "--out", "{out}"],
}


def test_out_cases_cover_every_stage_that_writes():
    from icehpc.run.stages import STAGES

    assert {argv[0] for argv in OUT_CASES.values()} == set(STAGES) - {"submit"}  # submit: its stage's --out


@pytest.mark.parametrize("case", list(OUT_CASES))
def test_out_naming_a_file_is_one_line_and_touches_nothing(case, files, tmp_path):
    from icehpc.run.stages import stage

    argv = OUT_CASES[case]
    file_out = stage(argv[0]).out_file
    target = tmp_path / "there"
    if file_out:
        target.mkdir()
        (target / "note.txt").write_text("mine\n")
    else:
        target.write_text("mine\n")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    line = _cli_line([a.format(d=files, store=_store(files), out=target) for a in argv], 2,
                     f"icehpc {argv[0]}: error: --out {target} is a ")
    assert line.endswith("a file name" if file_out else "is a file, not a folder; choose a folder"), line
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert (target / "note.txt" if file_out else target).read_text() == "mine\n"


def test_out_inside_a_file_and_a_store_parts_path_taken_by_a_file(files, tmp_path):
    (tmp_path / "f").write_text("mine\n")
    _cli_line(["kappa", _store(files), "--out", str(tmp_path / "f" / "k"), "--by", "habit"], 2,
              f"--out {tmp_path / 'f' / 'k'} is inside {tmp_path / 'f'}, which is a file, not a folder")
    (tmp_path / "e.h5.parts").write_text("mine\n")
    _cli_line(["embed", str(files / "empty"), "--random-init", "--out", str(tmp_path / "e.h5")], 2,
              f"its parts folder {tmp_path / 'e.h5.parts'} is a file, not a folder")
    _cli_line(["pretrain", f"out={tmp_path / 'f'}", "data.shards=" + str(files / "empty")], 2,
              f"icehpc pretrain: error: out {tmp_path / 'f'} is a file, not a folder")  # the config key
    assert (tmp_path / "e.h5.parts").read_text() == (tmp_path / "f").read_text() == "mine\n"


@pytest.mark.mpi
def test_out_naming_a_file_under_mpiexec_is_said_once(files, tmp_path, mpiexec):
    (tmp_path / "f").write_text("mine\n")
    proc = subprocess.run([*mpiexec, "-n", "2", sys.executable, "-m", "icehpc", "kappa", _store(files), "--out",
                           str(tmp_path / "f"), "--by", "habit"], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    said = [ln for ln in proc.stderr.splitlines() if ln.startswith("icehpc kappa: error: ")]
    assert said == [f"icehpc kappa: error: --out {tmp_path / 'f'} is a file, not a folder; choose a folder"]
