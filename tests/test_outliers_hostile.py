"""Hostile labels against `icehpc outliers` (issue #20): outliers.csv is opened in spreadsheets, so a
label or key that looks like a formula must come out as text."""
from __future__ import annotations

import csv

import numpy as np

from icehpc.analysis import outliers as outl
from kappa_helpers import write_store


def test_labels_and_keys_that_look_like_formulas_are_escaped_in_outliers_csv(tmp_path):
    rng = np.random.default_rng(0)
    n = 40
    meta = {"habit": np.array(["=1+1", "plate", "+cmd|' /C calc'!A0", "-2"] * 10),
            "key": np.array([f"@k{i}" if i % 2 else f"k{i}" for i in range(n)])}
    path = write_store(tmp_path / "s", rng.normal(size=(n, 6)).astype(np.float32), meta)
    outl.run_outliers(path, tmp_path / "o", outl.OutliersConfig(k=5, label="habit"))
    rows = list(csv.DictReader((tmp_path / "o" / "outliers.csv").open()))
    assert len(rows) == n
    assert {r["habit"] for r in rows} == {"'=1+1", "plate", "'+cmd|' /C calc'!A0", "-2"}  # -2 is a number
    assert {r["key"] for r in rows} == {f"'@k{i}" if i % 2 else f"k{i}" for i in range(n)}
    assert all(float(r["rarity"]) == float(r["rarity"]) for r in rows)
