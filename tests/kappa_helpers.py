"""Builders of small embedding stores for the store/kappa/report tests (no test logic here)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.stats import vonmises_fisher

from icehpc.analysis.store import write_master, write_part


def sample_vmf(p: int, kappa: float, n: int, seed: int) -> np.ndarray:
    """n unit vectors [n, p] from vMF(μ, κ) with a random μ, via scipy (float64)."""
    mu = np.random.default_rng(seed + 10_000).normal(size=p)
    mu /= np.linalg.norm(mu)
    return vonmises_fisher(mu, kappa).rvs(n, random_state=seed)


def cheap_groups(n: int, p: int, n_groups: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Clustered (not vMF) embeddings [n, p] float32 and group ids [n]: fast, for exactness tests."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_groups, p))
    gid = rng.integers(0, n_groups, size=n)
    spread = 0.3 + gid[:, None] * 0.4
    x = centres[gid] + spread * rng.normal(size=(n, p))
    x *= rng.uniform(0.2, 5.0, size=(n, 1))  # norms must not matter
    return x.astype(np.float32), gid


def paper_meta(n: int, gid: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Metadata in the shard schema: campaign, habit, temperature_c, particle_width_um, key."""
    rng = np.random.default_rng(seed + 1)
    campaigns = np.array(["HALO-2020", "ICE-GÉNÉRAL", "SOCRATES"])
    return {
        "campaign": campaigns[rng.integers(0, 3, n)],
        "habit": np.array([f"habit_{g}" for g in gid]),
        "temperature_c": rng.uniform(-75.0, 5.0, n),
        "particle_width_um": rng.gamma(2.0, 150.0, n) + 25.0,
        "key": np.array([f"img{i:07d}" for i in range(n)]),
    }


def write_store(folder: Path, emb: np.ndarray, meta: dict[str, np.ndarray], n_parts: int = 3) -> Path:
    """Split rows into ``n_parts`` part files plus a virtual master ``folder/store.h5``."""
    folder.mkdir(parents=True, exist_ok=True)
    cuts = np.linspace(0, len(emb), n_parts + 1).astype(int)
    parts = []
    for i in range(n_parts):
        s = slice(cuts[i], cuts[i + 1])
        path = folder / f"part-{i:05d}.h5"
        write_part(path, emb[s], {k: v[s] for k, v in meta.items()})
        parts.append(path)
    write_master(folder / "store.h5", parts)
    return folder / "store.h5"


def small_store(folder: Path, n: int = 60, parts: int = 3) -> Path:
    """A ``parts``-part store of ``n`` clustered rows in 3 groups with paper metadata (seed 1)."""
    x, gid = cheap_groups(n, 8, 3, seed=1)
    return write_store(folder, x, paper_meta(n, gid, seed=1), n_parts=parts)
