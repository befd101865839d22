"""Synthetic CPI-like particle images with *planted* habit physics.

A stand-in for Cloud Particle Imager (CPI) data so the whole pipeline runs anywhere: 8-bit
grayscale crops of one particle each, dark on a light, slightly uneven background, with defocus
blur, sensor noise and ~12 % of particles cut by the crop edge. Nine habits (:data:`HABITS`).

Planted physics (what later stages must recover): for a sample with temperature ``T`` (°C),
particle width ``D`` (µm) and campaign ``c``, the habit is drawn from ``softmax(logit_h(T, D, c))``
(:func:`habit_probabilities`): plates near −3 and −10…−22 °C, dendrites near −15, needles near
−5, columns near −7 and below −22, bullet rosettes below −25, droplets (``sphere``) only above
≈ −36 (homogeneous freezing), rimed particles only where supercooled liquid exists, and
aggregates/rimed particles dominating large sizes. Each campaign (:data:`CAMPAIGNS`) has its own
temperature and size distribution and riming strength. ``planted.json`` holds, per (campaign,
temperature bin, width bin) on the paper's default bins (:data:`TEMPERATURE_EDGES_C`,
:data:`WIDTH_EDGES_UM`), the exact expected habit mix (integrated over the campaign's density
inside the bin), its Shannon entropy (the planted diversity) and the expected/observed counts.

Sizes: ``particle_width_um`` is the longer side of the particle's bounding box (10…1000 µm),
``particle_height_um`` the shorter side; both describe the whole particle even when the crop cuts
it. Pixels are ``pixel_um`` = 2.3 µm, except that crop sides are clipped to 16…256 px to keep the
demo cheap: particles that would need a larger crop are drawn at a coarser ``pixel_um`` (stored per
sample), so physical sizes in the metadata stay exact.

Determinism: sample ``i`` uses its own RNG seeded by ``(seed, i)``, so the output is byte-identical
for any worker count; reruns skip images already written (atomic writes), so a killed run resumes.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import math
import os
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from scipy.special import ndtr, ndtri

from .. import config as cfg
from ..contract import Contract, Status
from ..fileio import write_atomic
from .format import METADATA_KEYS
from .shards import default_workers

PIXEL_UM = 2.3
HABITS: tuple[str, ...] = ("column", "needle", "plate", "dendrite", "bullet_rosette", "aggregate",
                           "compact_irregular", "rimed", "sphere")
# Drawn by `render` but never sampled: shapes to plant as a habit the set does not otherwise hold
# (bench/outliers_planted.py). A capped column is a real CPI habit (a column with a plate on each end).
PLANT_ONLY_HABITS: tuple[str, ...] = ("capped_column",)
# The paper's default κ bins: 10 °C temperature bins from −70 to 0 °C, and 10 equal width bins
# over 10…1000 µm with the last two merged (the largest sizes are rare).
TEMPERATURE_EDGES_C: tuple[float, ...] = tuple(float(t) for t in range(-70, 1, 10))
_W10 = np.linspace(10.0, 1000.0, 11)
WIDTH_EDGES_UM: tuple[float, ...] = tuple(float(w) for w in np.delete(_W10, 9))
T_RANGE_C = (TEMPERATURE_EDGES_C[0], TEMPERATURE_EDGES_C[-1])
WIDTH_RANGE_UM = (WIDTH_EDGES_UM[0], WIDTH_EDGES_UM[-1])


@dataclasses.dataclass(frozen=True)
class Campaign:
    """One field campaign: where it flew decides its temperatures, sizes and riming."""
    name: str
    t_mean_c: float
    t_sd_c: float
    log10_width_mean: float  # log10(µm) at t_mean_c
    log10_width_sd: float
    riming: float            # logit boost of `rimed` (supercooled-liquid availability)
    surface_t_c: float       # for the standard-atmosphere pressure
    start: str               # ISO date of the first flight
    days: float = 30.0


CAMPAIGNS: tuple[Campaign, ...] = (
    Campaign("arctic-mixed-phase", -11.0, 5.0, 2.05, 0.35, 1.0, -5.0, "2019-03-20"),
    Campaign("midlatitude-frontal", -20.0, 9.0, 2.15, 0.40, 0.0, 12.0, "2020-01-15"),
    Campaign("tropical-anvil", -33.0, 11.0, 2.00, 0.40, 0.3, 28.0, "2021-08-01"),
    Campaign("midlatitude-cirrus", -52.0, 7.0, 1.80, 0.30, -2.0, 10.0, "2022-04-10"),
)
WIDTH_T_SLOPE = 0.01  # log10(µm) per °C: colder clouds hold smaller particles
LAPSE_K_PER_KM = 6.5


# ---------------------------------------------------------------- planted physics
def _bump(t: np.ndarray, mu: float, sd: float) -> np.ndarray:
    return np.exp(-0.5 * ((t - mu) / sd) ** 2)


def _sig(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


# per habit: (temperature affinity φ_h(T) ≥ 0, log-size slope per decade, riming slope)
def _affinity(t: np.ndarray) -> np.ndarray:
    """Temperature affinity of each habit, ``[len(HABITS), *t.shape]`` (classic habit diagram)."""
    return np.stack([
        1.0 * _bump(t, -7.0, 2.0) + 1.0 * _sig((-22.0 - t) / 3.0),   # column
        1.5 * _bump(t, -5.0, 1.5),                                  # needle
        1.0 * _bump(t, -3.0, 2.5) + 1.2 * _bump(t, -16.0, 4.0),     # plate
        1.5 * _bump(t, -15.0, 2.0),                                 # dendrite
        1.2 * _sig((-25.0 - t) / 3.0),                              # bullet_rosette
        0.3 + 0.5 * _bump(t, -15.0, 5.0) + 0.6 * _bump(t, -3.0, 3.0),  # aggregate
        0.6 * np.ones_like(t),                                      # compact_irregular
        0.8 * _sig((t + 20.0) / 3.0),                               # rimed (needs liquid)
        0.8 * _sig((t + 36.0) / 2.0),                               # sphere (liquid drops)
    ])


_FLOOR = np.array([0.02] * 8 + [1e-5])  # every habit occurs a little, except drops below −38 °C
_SIZE_SLOPE = np.array([-0.3, 0.2, 0.0, 0.5, 0.3, 2.0, -0.6, 1.6, -1.5])
_RIMING_SLOPE = np.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.5])


def habit_probabilities(t_c: np.ndarray, width_um: np.ndarray, riming: float) -> np.ndarray:
    """Planted P(habit | T, D, campaign riming): ``[len(HABITS), *shape]``, sums to 1 over axis 0."""
    t = np.asarray(t_c, dtype=np.float64)
    decades = np.log10(np.asarray(width_um, dtype=np.float64) / 100.0)
    logits = (np.log(_FLOOR.reshape(-1, *[1] * t.ndim) + _affinity(t))
              + _SIZE_SLOPE.reshape(-1, *[1] * t.ndim) * decades
              + _RIMING_SLOPE.reshape(-1, *[1] * t.ndim) * riming)
    logits -= logits.max(axis=0, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(axis=0, keepdims=True)


def _truncnorm_bounds(mu: np.ndarray | float, sd: float, lo: float, hi: float) -> tuple[Any, Any]:
    return ndtr((lo - mu) / sd), ndtr((hi - mu) / sd)


def _width_mean(c: Campaign, t: np.ndarray | float) -> np.ndarray | float:
    return c.log10_width_mean + WIDTH_T_SLOPE * (t - c.t_mean_c)


def planted_table(quad: int = 48) -> list[dict]:
    """Exact expected habit mix per (campaign, T bin, width bin), by midpoint quadrature.

    ``mass`` is the probability that a sample of the campaign falls in the bin; ``probabilities``
    the habit mix there, integrated over the campaign's joint (T, log D) density inside the bin;
    ``entropy_nats`` = −Σ p ln p (the planted diversity: higher means a more mixed population).
    """
    rows = []
    lw_lo, lw_hi = math.log10(WIDTH_RANGE_UM[0]), math.log10(WIDTH_RANGE_UM[1])
    for c in CAMPAIGNS:
        a, b = _truncnorm_bounds(c.t_mean_c, c.t_sd_c, *T_RANGE_C)
        for ti in range(len(TEMPERATURE_EDGES_C) - 1):
            t0, t1 = TEMPERATURE_EDGES_C[ti], TEMPERATURE_EDGES_C[ti + 1]
            t = t0 + (np.arange(quad) + 0.5) * (t1 - t0) / quad
            p_t = np.exp(-0.5 * ((t - c.t_mean_c) / c.t_sd_c) ** 2) / (c.t_sd_c * math.sqrt(2 * math.pi) * (b - a))
            mu = _width_mean(c, t)
            za, zb = _truncnorm_bounds(mu, c.log10_width_sd, lw_lo, lw_hi)
            for wi in range(len(WIDTH_EDGES_UM) - 1):
                l0, l1 = math.log10(WIDTH_EDGES_UM[wi]), math.log10(WIDTH_EDGES_UM[wi + 1])
                lw = l0 + (np.arange(quad) + 0.5) * (l1 - l0) / quad
                z = (lw[None, :] - mu[:, None]) / c.log10_width_sd
                p_w = np.exp(-0.5 * z ** 2) / (c.log10_width_sd * math.sqrt(2 * math.pi) * (zb - za)[:, None])
                weight = p_t[:, None] * p_w * ((t1 - t0) / quad) * ((l1 - l0) / quad)
                probs = habit_probabilities(np.broadcast_to(t[:, None], weight.shape),
                                            10.0 ** np.broadcast_to(lw[None, :], weight.shape), c.riming)
                mass = float(weight.sum())
                mix = (probs * weight).sum(axis=(1, 2)) / mass
                nz = mix[mix > 0]
                rows.append({
                    "campaign": c.name, "t_index": ti, "temperature_bin_c": [t0, t1],
                    "w_index": wi, "width_bin_um": [WIDTH_EDGES_UM[wi], WIDTH_EDGES_UM[wi + 1]],
                    "mass": mass, "probabilities": dict(zip(HABITS, map(float, mix))),
                    "entropy_nats": float(-(nz * np.log(nz)).sum()),
                })
    return rows


def bin_index(value: float, edges: Sequence[float]) -> int:
    """Bin of ``value`` for half-open bins ``[e_i, e_{i+1})``, the last bin closed; −1 outside."""
    if value < edges[0] or value > edges[-1]:
        return -1
    return min(int(np.searchsorted(edges, value, side="right")) - 1, len(edges) - 2)


# ---------------------------------------------------------------- sampling
def _truncnorm(rng: np.random.Generator, mu: float, sd: float, lo: float, hi: float) -> float:
    a, b = _truncnorm_bounds(mu, sd, lo, hi)
    return float(np.clip(mu + sd * ndtri(rng.uniform(a, b)), lo, hi))


def sample_metadata(seed: int, i: int, pixel_um: float = PIXEL_UM) -> tuple[dict, np.random.Generator]:
    """Metadata of sample ``i`` and its RNG (reused for drawing, so one seed decides everything)."""
    rng = np.random.default_rng([seed, i])
    c = CAMPAIGNS[int(rng.integers(len(CAMPAIGNS)))]
    t = _truncnorm(rng, c.t_mean_c, c.t_sd_c, *T_RANGE_C)
    lw = _truncnorm(rng, float(_width_mean(c, t)), c.log10_width_sd,
                    math.log10(WIDTH_RANGE_UM[0]), math.log10(WIDTH_RANGE_UM[1]))
    width = 10.0 ** lw
    p = habit_probabilities(np.array(t), np.array(width), c.riming)
    habit = HABITS[int(rng.choice(len(HABITS), p=p))]
    when = datetime.fromisoformat(c.start).replace(tzinfo=timezone.utc) + timedelta(
        seconds=float(rng.uniform(0, c.days * 86400)))
    t_k, t0_k = t + 273.15, c.surface_t_c + 273.15
    pressure = 1013.25 * min(1.0, t_k / t0_k) ** (9.80665 / (287.05 * LAPSE_K_PER_KM * 1e-3))
    meta = {
        "campaign": c.name, "time": when.isoformat(timespec="seconds"),
        "temperature_c": round(t, 3), "pressure_hpa": round(pressure + float(rng.normal(0, 4.0)), 2),
        "particle_width_um": width, "particle_height_um": None, "habit": habit, "probe": "CPI",
        "pixel_um": pixel_um,
    }
    return meta, rng


# ---------------------------------------------------------------- drawing
Poly = tuple[np.ndarray, int]  # (vertices [n, 2] in particle units, darkness 0..255)


def _circle(cx: float, cy: float, r: float, n: int = 28) -> np.ndarray:
    a = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + r * np.cos(a), cy + r * np.sin(a)], axis=1)


def _rect(x0: float, x1: float, half_w: float, angle: float = 0.0, ox: float = 0.0, oy: float = 0.0) -> np.ndarray:
    """Bar along the direction ``angle`` from distance x0 to x1, centred on (ox, oy)."""
    pts = np.array([[x0, -half_w], [x1, -half_w], [x1, half_w], [x0, half_w]])
    return _rotate(pts, angle) + [ox, oy]


def _rotate(pts: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return pts @ np.array([[c, s], [-s, c]])


def _hexagon(r: float, phase: float = 0.0) -> np.ndarray:
    a = phase + np.arange(6) * np.pi / 3
    return np.stack([r * np.cos(a), r * np.sin(a)], axis=1)


def _column(rng: np.random.Generator, aspect: tuple[float, float]) -> list[Poly]:
    hw = 0.5 * rng.uniform(*aspect)
    outer = np.array([[-0.5, -hw], [0.5, -hw], [0.5, hw], [-0.5, hw]])
    shapes: list[Poly] = [(outer, 255)]
    if hw > 0.08:  # hollow ends: lighter cones seen through the prism
        d = rng.uniform(0.1, 0.3)
        shapes += [(np.array([[-0.45, -hw * 0.6], [-0.45 + d, 0], [-0.45, hw * 0.6]]), 150),
                   (np.array([[0.45, -hw * 0.6], [0.45 - d, 0], [0.45, hw * 0.6]]), 150)]
    return shapes


def _capped_column(rng: np.random.Generator) -> list[Poly]:
    """Side view: a column along x with a plate, seen edge-on, across each end."""
    length, hw = rng.uniform(0.35, 0.8), rng.uniform(0.06, 0.14)
    cap, thick = rng.uniform(max(0.35, 3 * hw), 0.5), rng.uniform(0.02, 0.04)
    shapes: list[Poly] = [(_rect(-length / 2, length / 2, hw), 255)]
    for end in (-1, 1):
        x = end * length / 2
        shapes.append((np.array([[x - thick, -cap], [x + thick, -cap], [x + thick, cap], [x - thick, cap]]), 255))
    return shapes


def _plate(rng: np.random.Generator) -> list[Poly]:
    phase = rng.uniform(0, np.pi / 3)
    return [(_hexagon(0.5, phase), 255), (_hexagon(rng.uniform(0.32, 0.42), phase), int(rng.integers(110, 170)))]


def _dendrite(rng: np.random.Generator) -> list[Poly]:
    phase, hw = rng.uniform(0, np.pi / 3), rng.uniform(0.025, 0.045)
    shapes: list[Poly] = [(_hexagon(0.09, phase), 255)]
    for k in range(6):
        a = phase + k * np.pi / 3
        shapes.append((_rect(0.0, 0.5 * rng.uniform(0.85, 1.0), hw, a), 255))
        for pos in rng.uniform(0.12, 0.42, size=int(rng.integers(2, 5))):
            length = rng.uniform(0.3, 0.6) * (0.5 - pos)
            ox, oy = pos * math.cos(a), pos * math.sin(a)
            for side in (-1, 1):
                shapes.append((_rect(0.0, length, hw * 0.7, a + side * np.pi / 3, ox, oy), 255))
    return shapes


def _rosette(rng: np.random.Generator) -> list[Poly]:
    shapes: list[Poly] = [(_circle(0, 0, 0.06), 255)]
    for a in rng.uniform(0, 2 * np.pi, size=int(rng.integers(3, 8))):
        length, hw = 0.5 * rng.uniform(0.6, 1.0), rng.uniform(0.04, 0.07)
        bullet = np.array([[0.0, 0.0], [0.12, -hw], [length, -hw], [length, hw], [0.12, hw]])
        shapes.append((_rotate(bullet, a), 255))
    return shapes


def _irregular(rng: np.random.Generator, n: int = 64) -> np.ndarray:
    a = np.linspace(0, 2 * np.pi, n, endpoint=False)
    r = np.ones(n)
    for k in range(2, 7):
        r += rng.uniform(0, 0.14) / k * np.cos(k * a + rng.uniform(0, 2 * np.pi))
    r *= 0.5 / r.max()
    return np.stack([r * np.cos(a) * rng.uniform(0.75, 1.0), r * np.sin(a)], axis=1)


def _aggregate(rng: np.random.Generator) -> list[Poly]:
    shapes: list[Poly] = []
    pos = np.zeros(2)
    for _ in range(int(rng.integers(3, 9))):
        part = [_plate, _dendrite, _rosette, lambda r: _column(r, (0.2, 0.5))][int(rng.integers(4))](rng)
        scale, angle = rng.uniform(0.25, 0.45), rng.uniform(0, 2 * np.pi)
        shapes += [(_rotate(p * scale, angle) + pos, d) for p, d in part]
        pos = pos + _rotate(np.array([[rng.uniform(0.12, 0.22), 0.0]]), rng.uniform(0, 2 * np.pi))[0]
    return shapes


def _rimed(rng: np.random.Generator) -> list[Poly]:
    core = _irregular(rng) if rng.uniform() < 0.6 else _hexagon(0.45, rng.uniform(0, 1))
    shapes: list[Poly] = [(core, 255)]
    for idx in rng.integers(0, len(core), size=int(rng.integers(25, 70))):
        edge = core[idx] * rng.uniform(0.9, 1.05)
        shapes.append((_circle(edge[0], edge[1], rng.uniform(0.02, 0.05), 10), 255))
    return shapes


def _sphere(rng: np.random.Generator) -> list[Poly]:
    # In-focus droplets image as dark discs with a bright centre spot (the drop acts as a lens).
    return [(_circle(0, 0, 0.5, 48), 255), (_circle(0, 0, rng.uniform(0.15, 0.3), 32), int(rng.integers(20, 70)))]


_SHAPES = {
    "column": lambda r: _column(r, (0.25, 0.55)),
    "needle": lambda r: _column(r, (0.04, 0.12)),
    "plate": _plate,
    "dendrite": _dendrite,
    "bullet_rosette": _rosette,
    "aggregate": _aggregate,
    "compact_irregular": lambda r: [(_irregular(r), 255)],
    "rimed": _rimed,
    "sphere": _sphere,
    "capped_column": _capped_column,
}
_TILTED = {"plate", "dendrite", "bullet_rosette"}  # 3-D orientation foreshortens one axis


def render(meta: dict, rng: np.random.Generator, min_side: int = 16, max_side: int = 256,
           cutoff_fraction: float = 0.12) -> np.ndarray:
    """Draw the particle of ``meta`` (filling in ``particle_height_um``/``pixel_um``): uint8 [h, w]."""
    shapes = _SHAPES[meta["habit"]](rng)
    flat = ((1.0, rng.uniform(0.45, 1.0)) if meta["habit"] in _TILTED else (1.0, 1.0))
    angle = rng.uniform(0, 2 * np.pi)
    shapes = [(_rotate(p * flat, angle), d) for p, d in shapes]
    allv = np.concatenate([p for p, _ in shapes])
    lo, hi = allv.min(axis=0), allv.max(axis=0)
    ext = hi - lo
    centre = (lo + hi) / 2
    long_side = float(ext.max())
    pixel = meta["pixel_um"]
    margin = rng.uniform(1.15, 1.5)
    d_px = meta["particle_width_um"] / pixel
    if d_px * margin + 6 > max_side:  # too big for the crop limit: coarser pixels, same µm
        d_px = (max_side - 6) / margin
        pixel = meta["particle_width_um"] / d_px
    k = d_px / long_side  # px per particle unit
    meta["pixel_um"] = round(pixel, 6)
    meta["particle_height_um"] = float(ext.min() / long_side * meta["particle_width_um"])
    w = int(np.clip(math.ceil(ext[0] * k * margin + 6), min_side, max_side))
    h = int(np.clip(math.ceil(ext[1] * k * margin + 6), min_side, max_side))
    shift = np.zeros(2)
    if rng.uniform() < cutoff_fraction:  # particle partly outside the sample volume / crop
        axis = int(rng.integers(2))
        shift[axis] = rng.choice([-1, 1]) * rng.uniform(0.3, 0.6) * (w, h)[axis]
    ss = 3 if max(w, h) <= 96 else 2  # supersampling for anti-aliased edges
    dark = Image.new("L", (w * ss, h * ss), 0)
    draw = ImageDraw.Draw(dark)
    origin = np.array([w / 2, h / 2]) + shift
    for p, d in shapes:
        xy = ((p - centre) * k + origin) * ss
        draw.polygon([tuple(v) for v in xy.tolist()], fill=d)
    dark = dark.reduce(ss).filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 1.3)))
    alpha = np.asarray(dark, dtype=np.float32) * np.float32(1 / 255)
    bg = (rng.uniform(195, 235) + rng.uniform(-8, 8) * np.linspace(-1, 1, w, dtype=np.float32)[None, :]
          + rng.uniform(-8, 8) * np.linspace(-1, 1, h, dtype=np.float32)[:, None]).astype(np.float32)
    ink = np.float32(rng.uniform(15, 70))
    noise = rng.standard_normal((h, w), dtype=np.float32) * np.float32(rng.uniform(1.5, 4.0))
    img = bg + (ink - bg) * alpha + noise + np.float32(0.5)
    return np.clip(img, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- driver
@dataclasses.dataclass
class SynthConfig:
    n: int = cfg.field(3000, help="number of particle images")
    seed: int = cfg.field(0, help="random seed; output is identical for any --workers")
    pixel_um: float = cfg.field(PIXEL_UM, help="nominal pixel size (µm) of the simulated probe")
    min_side: int = cfg.field(16, help="smallest crop side (px)")
    max_side: int = cfg.field(256, help="largest crop side (px); bigger particles get coarser pixels")
    cutoff_fraction: float = cfg.field(0.12, help="fraction of particles cut by the crop edge")

    def validate(self) -> None:
        if self.n < 1:
            raise ValueError("n must be >= 1")
        if not 8 <= self.min_side <= self.max_side:
            raise ValueError("need 8 <= min_side <= max_side")
        if not 0 <= self.cutoff_fraction <= 1:
            raise ValueError("cutoff_fraction must be in [0, 1]")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0 (numpy seeds are non-negative), got {self.seed}")
        if not (math.isfinite(self.pixel_um) and self.pixel_um > 0):
            raise ValueError(f"pixel_um must be a finite number > 0, got {self.pixel_um}")


def image_path(i: int) -> str:
    """Relative path of image ``i`` (1000 per folder keeps directories small)."""
    return f"images/{i // 1000:04d}/{i:07d}.png"


def make_sample(c: SynthConfig, i: int) -> tuple[dict, bytes]:
    """Metadata and PNG bytes of sample ``i`` (pure function of the config and ``i``)."""
    meta, rng = sample_metadata(c.seed, i, c.pixel_um)
    pixels = render(meta, rng, c.min_side, c.max_side, c.cutoff_fraction)
    buf = io.BytesIO()
    Image.fromarray(pixels, "L").save(buf, format="PNG", compress_level=1)  # noise barely compresses
    meta["particle_width_um"] = round(meta["particle_width_um"], 3)
    meta["particle_height_um"] = round(meta["particle_height_um"], 3)
    return meta, buf.getvalue()


def _make_range(c: SynthConfig, out: str, start: int, stop: int) -> list[dict]:
    metas = []
    for i in range(start, stop):
        meta, png = make_sample(c, i)
        path = Path(out) / image_path(i)
        if not path.exists():  # images are written atomically: an existing one is complete
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, png, durable=False)  # no fsync: safe against kills, not power cuts
        metas.append(meta)
    return metas


def synthesize(out: str | os.PathLike, c: SynthConfig, workers: int = 1, progress: bool = True,
               provenance: dict[str, Any] | None = None) -> dict:
    """Write ``out/images/…png``, ``out/manifest.csv`` and ``out/planted.json``; return the latter."""
    from ..progress import Progress

    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    params = cfg.to_dict(c)
    marker = root / ".synth-params.json"
    if marker.exists() and json.loads(marker.read_text()) != params:
        raise cfg.ConfigError(f"{root} holds a synth run with other parameters "
                              f"({marker.read_text().strip()}); choose another --out or delete it")
    planted_path = root / "planted.json"
    if planted_path.exists() and (root / "manifest.csv").exists():
        planted = json.loads(planted_path.read_text())
        if planted["params"] == params:
            return planted
    write_atomic(marker, json.dumps(params, sort_keys=True).encode())
    chunk = 250
    ranges = [(s, min(s + chunk, c.n)) for s in range(0, c.n, chunk)]
    metas: list[dict] = []
    with Progress(c.n, "synth", "images", enabled=progress) as bar:
        if workers <= 1:
            for s, e in ranges:
                metas += _make_range(c, str(root), s, e)
                bar.update(e - s)
        else:
            with ProcessPoolExecutor(workers) as pool:
                for (s, e), part in zip(ranges, pool.map(_make_range, [c] * len(ranges), [str(root)] * len(ranges),
                                                          *zip(*ranges))):
                    metas += part
                    bar.update(e - s)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", *METADATA_KEYS])
    for i, m in enumerate(metas):
        writer.writerow([image_path(i), *(m[k] for k in METADATA_KEYS)])
    write_atomic(root / "manifest.csv", buf.getvalue().encode())
    planted = {**_planted_json(c, metas), "config": cfg.to_dict(c), "config_source": provenance}
    write_atomic(planted_path, (json.dumps(planted, indent=1) + "\n").encode())
    return planted


def _planted_json(c: SynthConfig, metas: list[dict]) -> dict:
    table = planted_table()
    counts: dict[tuple[str, int, int], int] = {}
    per_campaign: dict[str, int] = {}
    for m in metas:
        key = (m["campaign"], bin_index(m["temperature_c"], TEMPERATURE_EDGES_C),
               bin_index(m["particle_width_um"], WIDTH_EDGES_UM))
        counts[key] = counts.get(key, 0) + 1
        per_campaign[m["campaign"]] = per_campaign.get(m["campaign"], 0) + 1
    for row in table:
        row["count"] = counts.get((row["campaign"], row["t_index"], row["w_index"]), 0)
        row["expected_count"] = row["mass"] * per_campaign.get(row["campaign"], 0)
    return {
        "description": "planted P(habit | campaign, temperature bin, width bin) and its Shannon entropy "
                       "(nats); bins are [lo, hi) with the last one closed; see icehpc/synth.py",
        "params": cfg.to_dict(c),
        "habits": list(HABITS),
        "temperature_edges_c": list(TEMPERATURE_EDGES_C),
        "width_edges_um": list(WIDTH_EDGES_UM),
        "campaigns": [dataclasses.asdict(x) for x in CAMPAIGNS],
        "bins": table,
    }


#: synth's output contract: ``planted.json`` is written last (its ``params`` are the run's config).
CONTRACT = Contract("planted.json", ("images/*", "manifest.csv", ".synth-params.json", ".*.tmp"))


def status(args: argparse.Namespace) -> Status:
    """Read-only: is ``args.out`` a finished synth run of these parameters? ``planted.json`` (the
    marker, written last) must hold them, and every image the manifest lists must be there."""
    c = cfg.from_args(SynthConfig, args)
    root = Path(args.out)
    planted = CONTRACT.read(root)
    if planted is None:
        return Status(False, f"no finished synth run in {root}")
    if planted.get("params") != cfg.to_dict(c):
        return Status(False, f"{root} holds a synth run with other parameters")
    try:
        with open(root / "manifest.csv", newline="") as f:
            paths = [row["path"] for row in csv.DictReader(f)]
    except (OSError, KeyError, csv.Error):
        return Status(False, f"{root}/manifest.csv missing or unreadable")
    if len(paths) != c.n or any(not (root / p).is_file() for p in paths):
        return Status(False, f"{root}: images missing")
    return Status(True, f"up to date ({c.n} images, seed {c.seed})")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder (images/, manifest.csv, planted.json)")
    parser.add_argument("--workers", type=cfg.at_least(1), default=default_workers(),
                        help="processes (default: CPUs available; output does not depend on it)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    cfg.add_config_arguments(parser, SynthConfig, {"--n": "n", "--seed": "seed"})


def run(args: argparse.Namespace) -> int:
    c = cfg.from_args(SynthConfig, args)
    planted = synthesize(args.out, c, workers=args.workers, progress=not args.no_progress,
                         provenance=cfg.provenance(args))
    n_bins = sum(1 for b in planted["bins"] if b["count"] > 0)
    print(f"synth: {c.n} images in {args.out} (seed {c.seed}); planted habit mix for {n_bins} "
          f"occupied (campaign, T, width) bins in {Path(args.out) / 'planted.json'}")
    return 0
