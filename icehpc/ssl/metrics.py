"""Training metrics: metrics.jsonl, prototype usage and concentration statistics, progress bar."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from ..fileio import write_atomic


class MetricsLog:
    """metrics.jsonl on rank 0; on resume, records after the checkpoint are dropped (they are redone)."""

    def __init__(self, path: Path, enabled: bool, resume_step: int) -> None:
        self.path = path
        self.enabled = enabled
        if enabled and path.exists():
            kept = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] < resume_step]
            write_atomic(path, "".join(ln + "\n" for ln in kept))
        self._fh = open(path, "a") if enabled else None

    def write(self, record: dict[str, Any]) -> None:
        if self._fh is not None:
            self._fh.write(json.dumps(record) + "\n")
            self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()



class CollapseGuard:
    """Watches the teacher [CLS] entropy H (nats) of every step for DINO's two collapses.

    Uniform: H ≥ (1 − margin)·ln K (the centring won, every prototype equally likely, KL → 0).
    One prototype: H < min_entropy (sharpening won). ``update`` returns a one-line message once
    either has held for ``patience`` consecutive steps (0 = never), else None.
    """

    def __init__(self, k: int, patience: int, margin: float = 0.01, min_entropy: float = 0.1) -> None:
        self.ln_k = math.log(k)
        self.patience, self.margin, self.min_entropy = patience, margin, min_entropy
        self.run, self.kind = 0, ""

    def update(self, step: int, entropy: float) -> str | None:
        if entropy >= (1 - self.margin) * self.ln_k:
            kind = f"uniform (entropy within {self.margin:.0%} of ln K = {self.ln_k:.3f})"
        elif entropy < self.min_entropy:
            kind = f"onto one prototype (entropy < {self.min_entropy} nats)"
        else:
            kind = ""
        self.run = self.run + 1 if kind and kind == self.kind else (1 if kind else 0)
        self.kind = kind
        if self.patience and self.run >= self.patience:
            return (f"teacher collapsed {kind} for {self.run} steps up to step {step} "
                    f"(entropy {entropy:.3f} nats)")
        return None


def _as_float(x: Any) -> float | None:
    if x is None:
        return None
    return float(x)


def prototype_stats(prob_mean: torch.Tensor, prefix: str, threshold: float) -> dict[str, float]:
    """How many prototypes receive teacher mass (partial prototype collapse shows here).

    ``{prefix}_proto_used``: prototypes whose mean teacher probability is ≥ threshold/K;
    ``{prefix}_proto_perplexity``: exp(entropy) of the mean teacher distribution (K = uniform use).
    """
    k = prob_mean.numel()
    p = prob_mean.double().clamp(min=0)
    p = p / p.sum().clamp(min=1e-30)
    entropy = -(p * torch.log(p.clamp(min=1e-30))).sum()
    return {f"{prefix}_proto_used": int((p >= threshold / k).sum()),
            f"{prefix}_proto_perplexity": float(torch.exp(entropy))}


def kappa_stats(prototypes: torch.Tensor, tau: float, prefix: str) -> dict[str, float]:
    """Distribution of the prototype concentrations κ_k = ‖w_k‖/τ_s (min, 5/50/95 %, max)."""
    kappa = prototypes.float().norm(dim=1) / tau
    q = torch.quantile(kappa, torch.tensor([0.0, 0.05, 0.5, 0.95, 1.0], device=kappa.device))
    names = ("min", "p05", "p50", "p95", "max")
    return {f"{prefix}_kappa_{n}": float(v) for n, v in zip(names, q)}


def _progress(enabled: bool, start: int, total: int) -> Any:
    if not enabled:
        return None
    from ..progress import Progress

    return Progress(total, "pretrain", "steps", initial=start)

