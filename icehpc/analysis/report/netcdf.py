"""The κ tables as a CF-1.8 netCDF file (``kappa.nc``, for xarray)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .common import UNITS, _axis, _finite, _group_name

def write_netcdf(path: Path, results: dict[str, dict]) -> None:
    """The κ tables as CF-1.8 netCDF: one variable per (statistic, grouping, backbone), on shared
    dimensions per column (categories as string coordinates; bins as centres with bounds)."""
    import xarray as xr

    coords: dict[str, Any] = {}
    levels: dict[str, dict[str, set]] = {}
    for res in results.values():
        for r in res["rows"]:
            for c, lev in r["levels"].items():
                d = levels.setdefault(c, {"bins": set(), "cats": set()})
                if "low" in lev:
                    d["bins"].add((lev["low"], lev["high"]))
                else:
                    d["cats"].add(_group_name(lev["label"]))
    dims: dict[str, tuple[str, list]] = {}
    for c, lev in levels.items():
        if lev["bins"]:  # a binned column: below/above range and missing are in the CSV only
            bounds = sorted(lev["bins"])
            dim = f"{c}_bin"
            units = UNITS.get(c, "1")
            coords[dim] = xr.Variable(dim, np.array([0.5 * (a + b) for a, b in bounds]),
                                      {"long_name": f"{_axis(c)} bin centre", "units": units, "bounds": f"{dim}_bounds",
                                       **({"standard_name": "air_temperature"} if c == "temperature_c" else {})})
            coords[f"{dim}_bounds"] = xr.Variable((dim, "nv"), np.array(bounds, dtype=float), {"units": units})
            dims[c] = (dim, bounds)
        else:
            names = sorted(lev["cats"])
            coords[c] = xr.Variable(c, np.array(names, dtype=object), {"long_name": _axis(c)})
            dims[c] = (c, names)
    stats = {"n": ("valid rows in the group", "1"), "kappa": ("vMF concentration, exact MLE", "1"),
             "kappa_debiased": ("vMF concentration, small-sample debiased", "1"),
             "ci_low": ("lower bound of the Poisson-bootstrap interval of kappa_debiased", "1"),
             "ci_high": ("upper bound of the Poisson-bootstrap interval of kappa_debiased", "1"),
             "rbar": ("mean resultant length of unit embeddings", "1")}
    data_vars: dict[str, Any] = {}
    for backbone, res in results.items():
        by: dict[str, list[dict]] = {}
        for r in res["rows"]:
            by.setdefault(r["grouping"], []).append(r)
        for g, rows in by.items():
            cols = g.split(":")
            shape = [len(dims[c][1]) for c in cols]
            arrays = {s: np.full(shape, np.nan) for s in stats}
            for r in rows:
                idx = []
                for c in cols:
                    lev = r["levels"][c]
                    key = (lev["low"], lev["high"]) if "low" in lev else _group_name(lev["label"])
                    if key not in dims[c][1]:
                        break
                    idx.append(dims[c][1].index(key))
                else:
                    for s in stats:
                        v = r.get(s)
                        arrays[s][tuple(idx)] = v if _finite(v) else np.nan
            name = "_x_".join(cols)
            for s, (long_name, units) in stats.items():
                data_vars[f"{s}_{backbone}_{name}"] = xr.Variable(
                    tuple(dims[c][0] for c in cols), arrays[s],
                    {"long_name": f"{long_name}, {backbone.replace('_', ' ')} backbone, per {' × '.join(map(_axis, cols))}",
                     "units": units})
    ds = xr.Dataset(data_vars, coords=coords, attrs={
        "Conventions": "CF-1.8", "title": "vMF concentration (kappa) of ice-crystal embeddings per group",
        "source": "icehpc kappa", "references": "von Mises-Fisher concentration of L2-normalised embeddings"})
    tmp = path.with_name(path.name + ".tmp")
    ds.to_netcdf(tmp, engine="h5netcdf")
    os.replace(tmp, path)


