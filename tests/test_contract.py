"""The output contract: the marker seals a set of files, and removal touches only the stage's own."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from icehpc.contract import Contract

C = Contract("done.json", ("result.csv", "parts/part-*.h5"))


def _write(root, rel, data=b"x"):
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return p


def test_seal_then_verify_the_whole_set(tmp_path):
    _write(tmp_path, "result.csv", b"a,b\n")
    _write(tmp_path, "parts/part-0.h5", b"h5")
    C.seal(tmp_path, {"fingerprint": "abc"}, ["result.csv", "parts/part-0.h5"])
    assert C.verify(tmp_path, "abc") is not None
    assert C.verify(tmp_path, "other") is None


def test_a_changed_listed_file_breaks_the_seal_even_with_the_same_size_and_mtime(tmp_path):
    p = _write(tmp_path, "result.csv", b"a,b\n")
    C.seal(tmp_path, {"fingerprint": "f"}, ["result.csv"])
    st = p.stat()
    p.write_bytes(b"c,d\n")  # another run's result of the same size
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert C.verify(tmp_path, "f") is not None  # the quick check trusts size+mtime ...
    assert C.verify(tmp_path, "f", full=True) is None  # ... the full check does not
    p.write_bytes(b"c,d,e\n")
    assert C.verify(tmp_path, "f") is None


def test_touched_but_identical_file_still_verifies(tmp_path):
    p = _write(tmp_path, "result.csv", b"a,b\n")
    C.seal(tmp_path, {"fingerprint": "f"}, ["result.csv"])
    os.utime(p, ns=(1, 1))
    assert C.verify(tmp_path, "f") is not None


def test_marker_without_outputs_is_not_up_to_date(tmp_path):
    (tmp_path / "done.json").write_text('{"fingerprint": "f"}')
    assert C.verify(tmp_path, "f") is None


def test_remove_leaves_foreign_files(tmp_path):
    _write(tmp_path, "result.csv")
    _write(tmp_path, "parts/part-1.h5")
    _write(tmp_path, "parts/.part-2.h5.123.tmp")
    _write(tmp_path, "notes.txt", b"mine")
    _write(tmp_path, "parts/README", b"mine too")
    C.seal(tmp_path, {}, ["result.csv"])
    assert C.foreign(tmp_path) == ["notes.txt", "parts/README"]
    C.remove(tmp_path)
    left = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert left == ["notes.txt", "parts/README"]


def test_seal_refuses_a_file_outside_the_contract(tmp_path):
    _write(tmp_path, "notes.txt")
    with pytest.raises(ValueError):
        C.seal(tmp_path, {}, ["notes.txt"])


def test_a_shared_folder_keeps_the_other_stages_temporaries_and_the_users_empty_folders(tmp_path):
    """embed and embed-random write beside each other in OUT/embed: removing one's files must not
    take the other's in-flight temporaries (``.random.h5.123.tmp``) or a user's empty folder."""
    trained = Contract("trained.h5.json", ("trained.h5", "trained.h5.parts/*"))
    _write(tmp_path, "trained.h5")
    _write(tmp_path, ".trained.h5.77.tmp")
    _write(tmp_path, "trained.h5.parts/part-0.h5")
    _write(tmp_path, ".random.h5.123.tmp")
    (tmp_path / "my-empty-folder").mkdir()
    trained.remove(tmp_path)
    left = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    assert left == [".random.h5.123.tmp", "my-empty-folder"]


def test_seal_takes_the_writers_paths_under_a_relative_folder(tmp_path, monkeypatch):
    """``icehpc kappa STORE --out k`` writes ``k/kappa.csv``: sealing ``k`` must accept that spelling."""
    monkeypatch.chdir(tmp_path)
    rel = Path("k")
    _write(tmp_path, "k/result.csv")
    C.seal(rel, {"fingerprint": "f"}, [rel / "result.csv"])
    assert list(C.read(rel)["outputs"]) == ["result.csv"]
    assert C.verify(rel, "f") is not None
