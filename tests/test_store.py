"""HDF5 embedding store: round trip through parts + virtual master, hand-written files, and
every way a store can be broken (each must be a clear StoreError, never silent zeros)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from icehpc.analysis.store import StoreError, open_store, write_master, write_part
from kappa_helpers import small_store, write_store

ROOT = Path(__file__).resolve().parent.parent


def _data(n: int, d: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(n, d)).astype(np.float32)
    meta = {"habit": np.array(["plate", "colonne", "agrégat", "needle"])[rng.integers(0, 4, n)],
            "temperature_c": rng.uniform(-60, 0, n), "count": np.arange(n, dtype=np.int64)}
    return emb, meta


def test_round_trip_across_parts(tmp_path):
    emb, meta = _data(103)
    path = write_store(tmp_path / "s", emb, meta, n_parts=4)
    with open_store(path) as st:
        assert (st.n_rows, st.dim) == (103, 8)
        assert st.columns == ["count", "habit", "temperature_c"]
        assert len(st.parts) == 4
        x, m = st.read(0, 103)
        assert x.dtype == np.float32 and np.array_equal(x, emb)
        assert list(m["habit"]) == list(meta["habit"])  # UTF-8 survives
        assert np.array_equal(m["temperature_c"], meta["temperature_c"])
        x, m = st.read(20, 60, columns=["count"])  # spans part boundaries
        assert np.array_equal(x, emb[20:60]) and np.array_equal(m["count"], np.arange(20, 60))
        assert list(m) == ["count"]
    with open_store(tmp_path / "s") as st:  # a folder means folder/store.h5
        assert st.n_rows == 103


def test_store_folder_can_be_moved(tmp_path, monkeypatch):
    emb, meta = _data(30)
    write_store(tmp_path / "a", emb, meta, n_parts=2)
    shutil.move(tmp_path / "a", tmp_path / "b")
    monkeypatch.chdir(tmp_path)  # sources are relative to the master, not to the working directory
    with open_store(tmp_path / "b" / "store.h5") as st:
        assert np.array_equal(st.read(0, 30)[0], emb)


def test_float16_part_and_hand_written_file(tmp_path):
    emb, meta = _data(10)
    write_part(tmp_path / "half.h5", emb.astype(np.float16), meta)
    with open_store(tmp_path / "half.h5") as st:
        x, _ = st.read(0, 10)
        assert x.dtype == np.float32 and np.allclose(x, emb, atol=1e-2)
    with h5py.File(tmp_path / "hand.h5", "w") as f:  # what a user writes without icehpc
        f["embeddings"] = emb
        f["meta/campaign"] = np.array([b"A", b"B"] * 5)  # fixed-length bytes
        f["meta/temperature_c"] = meta["temperature_c"]
    with open_store(tmp_path / "hand.h5") as st:
        _, m = st.read(0, 10)
        assert list(m["campaign"]) == ["A", "B"] * 5 and st.column_kinds["campaign"] == "str"


def test_writes_are_atomic_and_leave_no_temp_files(tmp_path):
    emb, meta = _data(5)
    write_part(tmp_path / "p.h5", emb, meta)
    with pytest.raises(StoreError):
        write_part(tmp_path / "p.h5", emb, {"habit": ["x"] * 4})  # bad column: old file must survive
    with open_store(tmp_path / "p.h5") as st:
        assert st.n_rows == 5
    assert sorted(os.listdir(tmp_path)) == ["p.h5"]


def test_missing_part_is_an_error_not_zeros(tmp_path):
    emb, meta = _data(40)
    path = write_store(tmp_path / "s", emb, meta, n_parts=3)
    os.remove(tmp_path / "s" / "part-00001.h5")
    with pytest.raises(StoreError, match="part-00001.h5 is missing"):
        open_store(path)


def test_part_lost_after_open_is_caught_by_the_fill_marker(tmp_path):
    emb, meta = _data(40)
    path = write_store(tmp_path / "s", emb, meta, n_parts=2)
    with open_store(path) as st:
        assert np.array_equal(st.read(0, 10)[0], emb[:10])
        os.remove(tmp_path / "s" / "part-00001.h5")
        with pytest.raises(StoreError, match="missing or truncated part"):
            st.read(0, 40)


def test_part_rewritten_with_other_row_count(tmp_path):
    emb, meta = _data(40)
    path = write_store(tmp_path / "s", emb, meta, n_parts=2)
    write_part(tmp_path / "s" / "part-00000.h5", emb[:5], {k: v[:5] for k, v in meta.items()})
    with pytest.raises(StoreError, match="rebuild the master"):
        open_store(path)


def test_master_refuses_inconsistent_parts(tmp_path):
    emb, meta = _data(10)
    write_part(tmp_path / "a.h5", emb, meta)
    write_part(tmp_path / "b.h5", np.zeros((3, 9), np.float32), {k: v[:3] for k, v in meta.items()})
    with pytest.raises(StoreError, match="dimension mismatch"):
        write_master(tmp_path / "m.h5", [tmp_path / "a.h5", tmp_path / "b.h5"])
    write_part(tmp_path / "c.h5", emb[:3], {"habit": meta["habit"][:3]})
    with pytest.raises(StoreError, match="meta columns differ"):
        write_master(tmp_path / "m.h5", [tmp_path / "a.h5", tmp_path / "c.h5"])
    write_part(tmp_path / "d.h5", emb[:3].astype(np.float16), {k: v[:3] for k, v in meta.items()})
    with pytest.raises(StoreError, match="dtype mismatch"):
        write_master(tmp_path / "m.h5", [tmp_path / "a.h5", tmp_path / "d.h5"])
    assert not (tmp_path / "m.h5").exists()


def test_bad_files_and_shapes(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        open_store(tmp_path / "nope.h5")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(StoreError, match="not a readable HDF5"):
        open_store(tmp_path / "junk.h5")
    with h5py.File(tmp_path / "short.h5", "w") as f:
        f["embeddings"] = np.zeros((4, 3), np.float32)
        f["meta/habit"] = np.array([b"a"] * 3)
    with pytest.raises(StoreError, match="meta/habit has shape"):
        open_store(tmp_path / "short.h5")
    with pytest.raises(StoreError, match=r"must be \[n, D\]"):
        write_part(tmp_path / "x.h5", np.zeros(4, np.float32), {})
    emb, meta = _data(6)
    write_part(tmp_path / "ok.h5", emb, meta)
    with open_store(tmp_path / "ok.h5") as st:
        with pytest.raises(StoreError, match="outside"):
            st.read(0, 7)
        with pytest.raises(StoreError, match="no meta column 'campaign'"):
            st.read(0, 6, columns=["campaign"])


def test_empty_part_is_allowed(tmp_path):
    emb, meta = _data(6)
    write_part(tmp_path / "a.h5", emb, meta)
    write_part(tmp_path / "e.h5", emb[:0], {k: v[:0] for k, v in meta.items()})
    write_master(tmp_path / "m.h5", [tmp_path / "e.h5", tmp_path / "a.h5"])
    with open_store(tmp_path / "m.h5") as st:
        assert st.n_rows == 6 and np.array_equal(st.read(0, 6)[0], emb)


def test_mpi_open_verifies_parts_on_rank_0_only(tmp_path, monkeypatch):
    """kappa/curate/outliers on N ranks: the parts are hashed once (rank 0), not N times."""
    from icehpc.analysis import store as store_mod

    rng = np.random.default_rng(0)
    path = write_store(tmp_path / "s", rng.normal(size=(90, 4)).astype(np.float32),
                       {"key": np.array([f"k{i}" for i in range(90)])}, n_parts=3)
    hashed = []
    real = store_mod.file_sha256
    monkeypatch.setattr(store_mod, "file_sha256", lambda p: hashed.append(Path(p).name) or real(p))

    class Comm:
        def __init__(self, rank):
            self.rank = rank

        def Get_rank(self):
            return self.rank

        def bcast(self, value, root=0):
            return value if self.rank == 0 else (True, None)  # rank 0's verdict reaches the others

    for rank, parts_hashed in ((0, 3), (1, 0)):
        hashed.clear()
        store_mod.open_store_mpi(path, Comm(rank)).close()
        assert sum(n.startswith("part-") for n in hashed) == parts_hashed, (rank, hashed)


# ------------------------------------------------------------------ hostile hand-written stores (issue #20)
def _hand(path: Path, d: int = 8, n: int = 30) -> h5py.File:
    f = h5py.File(path, "w")
    f["embeddings"] = np.random.default_rng(0).normal(size=(n, d)).astype(np.float32)
    f.create_dataset("meta/habit", data=np.array(["a", "b", "c"] * (n // 3), dtype=object),
                     dtype=h5py.string_dtype("utf-8"))
    return f


def _d1(path: Path) -> None:
    _hand(path, d=1).close()


def _nested(path: Path) -> None:
    with _hand(path) as f:
        f["meta/sub/x"] = np.arange(30)


def _latin1_in_ascii(path: Path) -> None:  # vlen strings declared ASCII holding non-ASCII, non-UTF-8 bytes
    with _hand(path) as f:
        f.create_dataset("meta/campaign", data=np.array([b"\xe9t\xe9", b"ok"] * 15, dtype=object),
                         dtype=h5py.string_dtype("ascii"))


def _latin1_fixed(path: Path) -> None:  # numpy bytes: h5py stores them as fixed-length ASCII
    with _hand(path) as f:
        f["meta/campaign"] = np.array([b"\xff\xfe", b"ok"] * 15)


def _meta_dataset(path: Path) -> None:
    f = h5py.File(path, "w")
    f["embeddings"] = np.ones((30, 4), np.float32)
    f["meta"] = np.arange(30)
    f.close()


def _emb_group(path: Path) -> None:
    with h5py.File(path, "w") as f:
        f["embeddings/x"] = np.ones((30, 4), np.float32)


HOSTILE_STORES = {
    "d1": (_d1, "D=1 feature(s) per row; directions (cosines, κ) need D ≥ 2"),
    "nested": (_nested, "meta/sub is a group; meta/ holds only columns"),
    "latin1_in_ascii": (_latin1_in_ascii, "meta/campaign holds bytes that are not UTF-8 text"),
    "latin1_fixed": (_latin1_fixed, "meta/campaign holds bytes that are not UTF-8 text"),
    "meta_dataset": (_meta_dataset, "'meta' must be a group of columns"),
    "emb_group": (_emb_group, "'embeddings' must be a float [N, D] array, got a group"),
}


@pytest.mark.parametrize("case", list(HOSTILE_STORES))
def test_hostile_hand_written_stores_are_one_store_error(tmp_path, case):
    make, message = HOSTILE_STORES[case]
    make(tmp_path / "s.h5")
    with pytest.raises(StoreError, match=re.escape(message)):
        with open_store(tmp_path / "s.h5") as st:
            st.read(0, st.n_rows)


@pytest.mark.parametrize("case", ["d1", "nested", "latin1_in_ascii"])
def test_kappa_on_a_hostile_store_is_one_line_exit_2(tmp_path, case):
    make, message = HOSTILE_STORES[case]
    make(tmp_path / "s.h5")
    proc = subprocess.run([sys.executable, "-m", "icehpc", "kappa", str(tmp_path / "s.h5"), "--out",
                           str(tmp_path / "k"), "--by", "habit,campaign", "drop_empty_columns=true"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0], proc.stderr


def test_utf8_bytes_in_an_ascii_declared_column_are_read_as_text(tmp_path):
    with _hand(tmp_path / "s.h5") as f:  # what h5py writes for numpy bytes that hold UTF-8
        f["meta/campaign"] = np.array(["agrégat".encode(), b"ok"] * 15)
    with open_store(tmp_path / "s.h5") as st:
        _, meta = st.read(0, 4, ["campaign"])
    assert meta["campaign"].tolist() == ["agrégat", "ok", "agrégat", "ok"]


@pytest.mark.parametrize("damage", ["no_parts", "latin1_parts", "rows_not_numbers", "rows_short"])
def test_damaged_master_attributes_are_one_store_error(tmp_path, damage):
    emb, meta = _data(20)
    path = write_store(tmp_path / "s", emb, meta, n_parts=2)
    with h5py.File(path, "r+") as f:
        if damage == "no_parts":
            del f.attrs["parts"]
        elif damage == "latin1_parts":
            f.attrs["parts"] = np.array([b"\xe9.h5", b"b.h5"])
        elif damage == "rows_not_numbers":
            f.attrs["part_rows"] = np.array([b"x", b"y"])
        else:
            f.attrs["part_rows"] = np.array([20], dtype=np.int64)
    with pytest.raises(StoreError, match="the master lists 2 parts but 1 row counts" if damage == "rows_short"
                       else "the master's part list is damaged"):
        open_store(path).close()


# ------------------------------------------------------------------ hostile: store parts, keys, umask, names
def _h5_edit(path: Path, fn) -> None:
    import h5py

    with h5py.File(path, "r+") as f:
        fn(f)


def test_3_part_missing_a_meta_dataset_is_an_error_not_fill_values(tmp_path):
    from icehpc.analysis.store import StoreError, open_store

    master = small_store(tmp_path / "s")
    _h5_edit(tmp_path / "s" / "part-00001.h5", lambda f: f["meta"].__delitem__("temperature_c"))
    with pytest.raises(StoreError, match="part-00001"):
        with open_store(master) as st:
            st.read(0, st.n_rows)


def test_3_part_rewritten_with_the_same_rows_or_copied_is_an_error(tmp_path):
    from kappa_helpers import cheap_groups, paper_meta

    from icehpc.analysis.store import StoreError, open_store, write_part

    master = small_store(tmp_path / "s")
    part = tmp_path / "s" / "part-00002.h5"
    x, gid = cheap_groups(20, 8, 3, seed=9)  # same row count and columns, other numbers
    write_part(part, x, paper_meta(20, gid, seed=9))
    with pytest.raises(StoreError, match="part-00002.*sha256"):
        open_store(master)
    master = small_store(tmp_path / "t")
    (tmp_path / "t" / "part-00002.h5").write_bytes((tmp_path / "t" / "part-00000.h5").read_bytes())
    with pytest.raises(StoreError, match="part-00002"):
        open_store(master)


def test_3_duplicate_keys_are_refused_also_in_a_single_file(tmp_path):
    from kappa_helpers import cheap_groups, paper_meta

    from icehpc.analysis.store import StoreError, open_store, write_part

    x, gid = cheap_groups(10, 8, 2, seed=2)
    meta = paper_meta(10, gid, seed=2)
    meta["key"][5:] = meta["key"][:5]
    write_part(tmp_path / "one.h5", x, meta)
    with pytest.raises(StoreError, match="more than once"):
        open_store(tmp_path / "one.h5")


def test_store_files_respect_the_umask(tmp_path):
    from icehpc.analysis.store import write_part

    old = os.umask(0o077)
    try:
        write_part(tmp_path / "p.h5", np.zeros((2, 3), np.float32), {"key": ["a", "b"]})
    finally:
        os.umask(old)
    assert (os.stat(tmp_path / "p.h5").st_mode & 0o777) == 0o600


def test_7_store_refuses_column_names_hdf5_cannot_hold(tmp_path):
    from icehpc.analysis.store import StoreError, write_part

    for bad in ("a/b", ".", "x.y", ""):
        with pytest.raises(StoreError, match="column name"):
            write_part(tmp_path / "p.h5", np.zeros((1, 2), np.float32), {bad: ["v"]})


# ------------------------------------------------------------------ the store in xarray (netCDF dimensions, issue #21)
def _keyed(n: int, seed: int = 0):
    emb, meta = _data(n, seed=seed)
    return emb, {**meta, "key": np.array([f"s{seed}-{i:04d}" for i in range(n)])}


def _xr_matches_h5py(path: Path, engine: str | None) -> None:
    """xarray (engine as given, None = its default) reads the store as one Dataset along `sample`,
    with the values h5py and open_store read, and no phony dimensions (no warning)."""
    import warnings

    import xarray as xr

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an unnamed dimension is a warning in xarray's h5netcdf backend
        ds = xr.open_dataset(path, engine=engine)
    with ds, h5py.File(path, "r") as f, open_store(path) as st:
        _, meta = st.read(0, st.n_rows)
        assert dict(ds.sizes) == {"sample": st.n_rows, "feature": st.dim}
        assert ds["embeddings"].dims == ("sample", "feature")
        assert f["sample"].id.get_storage_size() == 0  # a dimension's scale holds no data
        np.testing.assert_array_equal(ds["embeddings"].values, f["embeddings"][:])
        assert sorted(ds.variables) == sorted(["embeddings", *meta])
        for column, values in meta.items():
            assert ds[column].dims == ("sample",), column
            assert f[column] == f[f"meta/{column}"], column  # one dataset under two names, not a copy
            got = ds[column].values
            if st.column_kinds[column] == "str":
                assert all(isinstance(v, str) for v in got), column  # decoded text, not bytes
            np.testing.assert_array_equal(got, values, err_msg=column)
        assert list(ds.coords) == ["key"]
        row = st.n_rows // 2  # `key` selects rows once it is the index
        np.testing.assert_array_equal(ds.set_index(sample="key").sel(sample=meta["key"][row])["embeddings"],
                                      f["embeddings"][row])


@pytest.mark.parametrize("engine", [None, "h5netcdf"])
def test_xarray_reads_a_master_store_as_one_dataset_along_sample(tmp_path, engine):
    emb, meta = _keyed(103)
    path = write_store(tmp_path / "s", emb, meta, n_parts=4)
    _xr_matches_h5py(path, engine)
    with open_store(path) as st:  # h5py readers unchanged: same rows, same columns, parts verified
        x, m = st.read(0, 103)
        assert st.columns == sorted(meta) and np.array_equal(x, emb) and list(m["habit"]) == list(meta["habit"])


@pytest.mark.parametrize("engine", [None, "h5netcdf"])
def test_xarray_reads_a_single_part_and_an_empty_one(tmp_path, engine):
    emb, meta = _keyed(10)
    write_part(tmp_path / "one.h5", emb, meta)
    _xr_matches_h5py(tmp_path / "one.h5", engine)
    write_part(tmp_path / "empty.h5", np.zeros((0, 8), np.float32), {k: v[:0] for k, v in meta.items()})
    write_master(tmp_path / "m.h5", [tmp_path / "empty.h5", tmp_path / "one.h5"])
    _xr_matches_h5py(tmp_path / "m.h5", engine)


def test_xarray_a_column_named_like_a_root_dataset_stays_under_meta(tmp_path):
    import xarray as xr

    emb, meta = _data(12)
    meta = {**meta, "sample": np.arange(12.0) * 2, "embeddings": np.array(["x"] * 12)}
    path = write_store(tmp_path / "s", emb, meta, n_parts=2)
    with xr.open_dataset(path) as ds:  # no key column: no coordinate
        assert ds["embeddings"].dims == ("sample", "feature") and not ds.coords
        assert sorted(ds.data_vars) == ["count", "embeddings", "habit", "temperature_c"]
    with xr.open_dataset(path, group="meta") as ds:  # every column, on the root's `sample` dimension
        np.testing.assert_array_equal(ds["sample"].values, meta["sample"])
        assert ds["embeddings"].dims == ("sample",) and list(ds["embeddings"].values) == ["x"] * 12
    with open_store(path) as st:
        assert st.columns == sorted(meta)
        np.testing.assert_array_equal(st.read(0, 12, columns=["sample"])[1]["sample"], meta["sample"])


def test_part_losing_a_meta_dataset_still_linked_at_the_root_is_caught_without_checksums(tmp_path):
    """The master maps meta/<column>; deleting it from a part leaves the root link to the same data, so
    the recorded layout lists every name (not every object once), also where sha256 is not checked."""
    emb, meta = _keyed(30)
    path = write_store(tmp_path / "s", emb, meta, n_parts=2)
    with h5py.File(tmp_path / "s" / "part-00001.h5", "r+") as f:
        del f["meta/habit"]
    with pytest.raises(StoreError, match=r"part-00001.h5 datasets differ .*meta/habit"):
        open_store(path, verify=False)


def test_stores_written_without_dimension_scales_still_open(tmp_path):
    """A store from before the dimension scales: parts and master without `sample`/`feature` and root
    links. open_store verifies and reads it as before (the previous writer recorded each part's
    datasets once by name, which is what is recorded for such a part now); xarray sees embeddings on
    phony dimensions and no metadata at the root."""
    import xarray as xr

    emb, meta = _keyed(20)
    parts = []
    for i, s in enumerate((slice(0, 8), slice(8, 20))):  # the previous write_part's layout
        parts.append(tmp_path / "s" / f"part-{i:05d}.h5")
        parts[-1].parent.mkdir(exist_ok=True)
        with h5py.File(parts[-1], "w") as f:
            f["embeddings"] = emb[s]
            for k, v in meta.items():
                f.create_dataset(f"meta/{k}", data=v[s].astype(object) if v.dtype.kind == "U" else v[s],
                                 dtype=h5py.string_dtype("utf-8") if v.dtype.kind == "U" else v.dtype)
            f["icehpc/present"] = np.ones(s.stop - s.start, np.uint8)
            f.attrs["icehpc_store"] = "part"
    master = tmp_path / "s" / "store.h5"
    write_master(master, parts)
    with h5py.File(master, "r+") as f:  # back to the previous master's layout
        for name in f["meta"]:
            del f[name]
        for ds in (f["embeddings"], f["icehpc/present"], *f["meta"].values()):
            for dim, scale in zip(ds.dims, ("sample", "feature")):
                dim.detach_scale(f[scale])
        del f["sample"], f["feature"], f["embeddings"].attrs["coordinates"]
        for i, part in enumerate(parts):
            with h5py.File(part, "r") as pf:
                old: dict[str, list] = {}
                pf.visititems(lambda n, o: old.__setitem__(n, [list(o.shape), str(o.dtype)])
                              if isinstance(o, h5py.Dataset) else None)
            assert json.loads(f.attrs["part_datasets"][i]) == old
    with open_store(master) as st:
        x, m = st.read(0, 20)
        assert np.array_equal(x, emb) and list(m["key"]) == list(meta["key"])
    with pytest.warns(UserWarning, match="phony_dims"), xr.open_dataset(master) as ds:
        assert list(ds.data_vars) == ["embeddings"] and ds["embeddings"].dims[0].startswith("phony_dim_")
