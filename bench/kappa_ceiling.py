"""How well can κ track the planted habit entropy at all? The science check's ceiling.

The science check ranks κ (debiased) of the synthetic embeddings per temperature bin against the
Shannon entropy of the planted habit mix (Spearman ρ, target ≤ −0.9). κ sees the mix only through
the geometry of the habits in embedding space, so ρ depends on that geometry as much as on how
well a backbone separates habits. This bench keeps the synthetic store's rows, metadata and bins
and swaps the embedding vectors, then runs the real κ stage and the pipeline's comparison on each:

- ``store``: the backbone's own embeddings (what the pipeline reports);
- ``store centred``: the same, minus their mean over the store before κ normalises them;
- ``habit means``: each row replaced by its habit's mean embedding of this backbone (perfect
  within-habit agreement, the backbone's between-habit geometry);
- ``habit means centred``: the same after centring;
- ``oracle orthogonal``: one orthonormal direction per habit + isotropic noise (σ = 0.5);
- ``oracle random``: one random unit direction per habit in the store's D + noise (σ = 0.5).

    python bench/kappa_ceiling.py RUN_DIR        # a finished `icehpc pipeline` run folder
      (reads RUN/embed/{trained,random}.h5 and RUN/synth/planted.json; writes nothing there)
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from icehpc.analysis import kappa
from icehpc.analysis.store import open_store, write_master, write_part
from icehpc.analysis.science import kappa_vs_planted


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def variants(emb: np.ndarray, habit: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    habits, idx = np.unique(habit, return_inverse=True)
    n, d = emb.shape
    x = _unit(emb.astype(np.float64))
    centred = emb - emb.mean(axis=0)
    means = np.stack([x[idx == h].mean(axis=0) for h in range(len(habits))])
    cmeans = np.stack([_unit(centred)[idx == h].mean(axis=0) for h in range(len(habits))])
    ortho = np.linalg.qr(rng.normal(size=(d, len(habits))))[0].T
    rand = _unit(rng.normal(size=(len(habits), d)))
    noise = 0.5 * rng.normal(size=(n, d)) / np.sqrt(d)
    return {"store": emb, "store centred": centred, "habit means": means[idx],
            "habit means centred": cmeans[idx], "oracle orthogonal": ortho[idx] + noise,
            "oracle random": rand[idx] + noise}


def rho(planted: Path, folder: Path, name: str, emb: np.ndarray, meta: dict[str, np.ndarray]) -> dict[str, float]:
    store = folder / name.replace(" ", "_") / "store.h5"
    store.parent.mkdir(parents=True)
    write_part(store.parent / "part-0.h5", emb.astype(np.float32), meta)
    write_master(store, [store.parent / "part-0.h5"])
    kappa.run_kappa(store, store.parent / "kappa", kappa.KappaConfig(bootstrap=0))
    result = kappa_vs_planted(planted, {name: store.parent / "kappa"})
    return {label: section[name]["spearman_kappa_debiased"]["rho"] for label, section in result.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a finished pipeline run folder")
    args = ap.parse_args()
    planted = args.run / "synth" / "planted.json"
    table = {}
    with tempfile.TemporaryDirectory() as tmp:
        for backbone in ("trained", "random"):
            with open_store(args.run / "embed" / f"{backbone}.h5") as s:
                emb, meta = s.read(0, s.n_rows, ["key", "habit", "campaign", "temperature_c", "particle_width_um"])
            for name, e in variants(emb, meta["habit"]).items():
                if backbone == "random" and name.startswith("oracle"):
                    continue
                label = f"{backbone}: {name}" if not name.startswith("oracle") else name
                table[label] = rho(planted, Path(tmp) / backbone, name, e, meta)
                print(f"{label:<32} ρ over T bins {table[label]['temperature_bins']:+.2f}   over campaign × T "
                      f"{table[label]['campaign_x_temperature_bins']:+.2f}", flush=True)
    print(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
