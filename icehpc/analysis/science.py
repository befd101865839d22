"""The demo's science checks: κ per temperature bin against the planted habit diversity, and the
probes' accuracies (``science.json`` of ``icehpc pipeline``; ``bench/kappa_ceiling.py``).

:func:`planted_entropy` is the one definition of the planted habit entropy per temperature bin.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..fileio import write_atomic
from .kappa import CONTRACT as KAPPA_CONTRACT


def planted_entropy(planted: dict, by: str | None = None) -> dict[tuple[str, float], float]:
    """(level of the column ``by``, or ``"all"``; temperature-bin low edge) → Shannon entropy (nats)
    of the planted habit mix, pooled over the other bins with the observed sample counts as weights."""
    import numpy as np

    mixes: dict[tuple[str, float], dict[str, float]] = {}
    for row in planted.get("bins", []):
        if not row.get("count"):
            continue
        key = (str(row.get(by, "all")) if by else "all", float(row["temperature_bin_c"][0]))
        mix = mixes.setdefault(key, {h: 0.0 for h in planted.get("habits", [])})
        for habit, p in row["probabilities"].items():
            mix[habit] = mix.get(habit, 0.0) + row["count"] * p
    out = {}
    for key, mix in mixes.items():
        total = sum(mix.values())
        p = np.array([v / total for v in mix.values() if v / total > 0])
        out[key] = float(-(p * np.log(p)).sum())
    return out


def kappa_by_temperature(kappa_json: Path, by_campaign: bool, min_count: int) -> dict[tuple, dict[str, float]]:
    """κ estimates per temperature bin (low edge) from a kappa.json; groups under min_count left out."""
    result = json.loads(kappa_json.read_text())
    grouping = "campaign:temperature_c" if by_campaign else "temperature_c"
    out = {}
    for row in result["rows"]:
        if row["grouping"] != grouping or row["n"] < min_count:
            continue
        t = row["levels"]["temperature_c"]
        if "low" not in t:
            continue
        key = (row["levels"]["campaign"]["label"], t["low"]) if by_campaign else (t["low"],)
        out[key] = {"n": row["n"], "kappa": row["kappa"], "kappa_debiased": row["kappa_debiased"]}
    return out


def kappa_vs_planted(planted_json: Path, kappa_dirs: dict[str, Path], min_count: int = 20) -> dict[str, Any]:
    """Spearman ρ between κ and the planted habit entropy across temperature bins, per backbone.

    High κ means low diversity, so a backbone that sees habits should give ρ < 0.
    """
    import numpy as np
    from scipy.stats import spearmanr

    planted = json.loads(planted_json.read_text())
    out: dict[str, Any] = {}
    for by_campaign, label in ((False, "temperature_bins"), (True, "campaign_x_temperature_bins")):
        entropy = {(k if by_campaign else k[1:]): h
                   for k, h in planted_entropy(planted, "campaign" if by_campaign else None).items()}
        section: dict[str, Any] = {}
        for name, kdir in kappa_dirs.items():
            kappas = kappa_by_temperature(KAPPA_CONTRACT.marker_path(kdir), by_campaign, min_count)
            keys = sorted(k for k in kappas if k in entropy and np.isfinite(kappas[k]["kappa_debiased"]))
            rows = [{"bin": list(k), "n": kappas[k]["n"], "planted_entropy_nats": entropy[k],
                     "kappa": kappas[k]["kappa"], "kappa_debiased": kappas[k]["kappa_debiased"]} for k in keys]
            stats = {"n_bins": len(keys), "rows": rows}
            for estimator in ("kappa_debiased", "kappa"):
                if len(keys) >= 3:
                    rho, p = spearmanr([kappas[k][estimator] for k in keys], [entropy[k] for k in keys])
                    stats[f"spearman_{estimator}"] = {"rho": float(rho), "p_value": float(p)}
                else:
                    stats[f"spearman_{estimator}"] = None
            section[name] = stats
        out[label] = section
    return out


def probe_summary(probe_json: Path) -> dict[str, dict[str, float]]:
    result = json.loads(probe_json.read_text())
    return {f"{rep}/{method}": {k: m[k] for k in ("accuracy", "balanced_accuracy", "accuracy_sd",
                                                  "balanced_accuracy_sd") if k in m}
            for rep, res in result["results"].items() for method, m in res.items() if isinstance(m, dict)}


def write_science(out: Path, planted: Path | None, kappa_dirs: dict[str, Path], probes: dict[str, Path],
                  min_count: int) -> dict[str, Any]:
    """``out``/science.json: κ vs planted diversity (``planted``: the synth run's planted.json, None
    without one; ``kappa_dirs``: backbone → κ folder) and every probe's accuracies (name → probe.json)."""
    science: dict[str, Any] = {
        "kappa_vs_planted_diversity": kappa_vs_planted(planted, kappa_dirs, min_count) if planted else {},
        "probes": {name: probe_summary(path) for name, path in probes.items()},
    }
    write_atomic(out / "science.json", json.dumps(science, indent=1) + "\n")
    return science


def print_science(science: dict[str, Any]) -> None:
    for label, section in science["kappa_vs_planted_diversity"].items():
        for name, stats in section.items():
            s = stats["spearman_kappa_debiased"]
            rho = f"rho = {s['rho']:+.2f} (p = {s['p_value']:.2g})" if s else "too few bins"
            print(f"  κ vs planted entropy over {stats['n_bins']:2d} {label:<28} {name:<12} {rho}")
    for probe_name, results in science["probes"].items():
        for rep, m in results.items():
            print(f"  {probe_name:<16} {rep:<22} accuracy {_num(m['accuracy'])}  balanced {_num(m['balanced_accuracy'])}")


def _num(v: Any) -> str:
    """A probe metric: a number, or a {mean, sd} over splits."""
    if isinstance(v, dict) and "mean" in v:
        return f"{v['mean']:.3f} ± {v.get('sd', float('nan')):.3f}"
    return f"{v:.3f}" if isinstance(v, (int, float)) else str(v)


