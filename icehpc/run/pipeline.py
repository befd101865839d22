"""``icehpc pipeline``: every stage in order on one machine, resumable; or chained on Slurm.

    icehpc pipeline --config configs/demo.yaml --out runs/demo [key.sub=value ...]
    icehpc pipeline --data IMAGES_DIR|ARCHIVE.zip|MANIFEST.csv ... --out runs/mine [key.sub=value ...]

With ``--data`` (config key ``data.inputs``) the plan starts from the user's images instead of
``synth``: shards → pretrain → export → embed (trained, random init) → κ of both (groupings over
columns the data lacks, such as temperature for 2D-S/PIP, are left out) → probe → report.

Fingerprints: every step records (in ``OUT/.pipeline/STEP.json``) a hash of its command, of the
files it reads outside OUT (configs and the user's images: content up to 1 MiB, else size and
mtime; folders by their listing of names, sizes and mtimes) and of the fingerprints of the steps
it waits for. A step is done when its marker exists and its record matches; otherwise it runs,
after its old outputs are removed when the fingerprint changed, and the log says why (``--n 400 →
800``, ``upstream step(s) synth changed``). So a change reruns that step and everything after it.

Plan of the synthetic demo (:func:`plan`): synth → shards → pretrain (N DeepSpeed processes via torch.distributed.run) →
export → embed with the trained and a random-init backbone (N MPI ranks each) → κ of both (N MPI
ranks) → report → probe (trained vs random-init vs geometric baseline); then, for each real probe
archive present under ``real.data_dir`` (the Jaffeux et al. 2022 2D-S and PIP images): shards →
embed (trained, random-init) → probe. A step whose output marker exists (with a matching fingerprint) is
skipped, so a killed run restarted with the same command continues; each marker is written last and
atomically by its stage.
The run ends with ``science.json`` (κ per temperature bin against the planted habit diversity, and
the probe accuracies) and prints where the report is.

The same plan is what ``icehpc submit pipeline -- --config … --out …`` (submitit, afterok
dependencies) and ``jobs/pipeline.sh`` (sbatch, afterok) submit, so all three leave the same files.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .. import config as cfglib
from ..config import UserError, field
from ..fileio import write_atomic
from .stages import stage as stage_info

#: The checkout this package lives in, if any (relative data paths in the shipped configs, such as
#: ``../shared/data/...``, are also looked up from there).
CHECKOUT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------ config
@dataclass
class DataStep:
    inputs: list[str] = field([], help="the user's images: folder trees, .zip files or CSV manifests with metadata "
                                       "(what `shards build` takes; also `--data INPUT...`); empty: the synthetic demo")
    label_column: str = field("habit", help="metadata key of the class (the folder name for trees and zips); "
                                            "the probe and the similarity matrix use it")
    probe: str = field("", help="probe name stored where the input gives none ('': unknown)")
    pixel_um: float = field(0.0, help="pixel size (µm) stored where the input gives none (0: unknown)")


@dataclass
class SynthStep:
    n: int = field(2000, help="synthetic particle images")
    seed: int = field(0, help="seed of the synthetic data")


@dataclass
class ShardStep:
    shard_samples: int = field(250, help="samples per shard (several shards per rank keep ranks busy)")
    workers: int = field(2, help="shard-building processes")


@dataclass
class PretrainStep:
    config: str = field("pretrain-tiny-cpu.yaml", help="pretraining YAML (configs/ is searched)")
    nproc: int = field(2, help="DeepSpeed processes (torch.distributed.run --nproc-per-node)")
    overrides: list[str] = field([], help="dotted overrides for the pretraining config")
    data: str = field("synth", help="what pretraining sees: synth (the synthetic shards) | real (the unlabeled real "
                                    "archives found, one shuffled shard set) | both (real + synthetic)")
    keys: str = field("", help="a curated subset to pretrain on: a CSV with a 'key' column (icehpc curate's "
                               "curated.csv) naming samples of the pretraining shard set built from the same "
                               "inputs; empty = every sample")


@dataclass
class EmbedStep:
    ranks: int = field(2, help="MPI ranks of each embedding job")
    batch_size: int = field(64, help="images per forward pass")


@dataclass
class KappaStep:
    ranks: int = field(2, help="MPI ranks of each κ job")
    config: str = field("", help="κ YAML (a path or a shipped config name; '': built-in defaults)")
    overrides: list[str] = field([], help="dotted overrides for the κ config")


@dataclass
class ProbeStep:
    label: str = field("habit", help="meta column holding the class")
    seed: int = field(0, help="seed of the first stratified split")
    splits: int = field(5, help="stratified 80/20 splits (seeds seed … seed+splits−1); mean ± sd reported")


@dataclass
class RealArchive:
    name: str = field("2ds", help="short name: output goes to OUT/real/NAME")
    file: str = field("2ds_training.zip", help="archive (zip or folder tree) inside real.data_dir")
    probe: str = field("2D-S", help="probe name stored in the metadata")
    pixel_um: float = field(10.0, help="pixel size of the probe (µm)")


@dataclass
class RealStep:
    data_dir: str = field("../shared/data/oap-jaffeux2022",
                          help="folder of the real archives (relative: to the working folder, then the repo); "
                               "archives not found there are skipped")
    archives: list[RealArchive] = field(default_factory=lambda: [
        RealArchive("2ds", "2ds_training.zip", "2D-S", 10.0),
        RealArchive("pip", "pip_training.zip", "PIP", 100.0)],
        help="real probe archives to shard, embed and probe")


@dataclass
class PipelineConfig:
    data: DataStep = field(default_factory=DataStep)
    synth: SynthStep = field(default_factory=SynthStep)
    shards: ShardStep = field(default_factory=ShardStep)
    pretrain: PretrainStep = field(default_factory=PretrainStep)
    embed: EmbedStep = field(default_factory=EmbedStep)
    kappa: KappaStep = field(default_factory=KappaStep)
    probe: ProbeStep = field(default_factory=ProbeStep)
    real: RealStep = field(default_factory=RealStep)


# -------------------------------------------------------------------------------------------- plan
@dataclass
class Step:
    """One stage invocation: ``icehpc STAGE ARGV`` on ``ranks`` processes.

    Complete once ``done`` exists *and* the fingerprint recorded for it in ``record`` is the one
    this plan computes (:func:`fingerprint_steps`): the command, the content or size/mtime of every
    file or folder outside the run folder it reads (configs, the user's images), and the fingerprints
    of the steps it waits for, so a change anywhere upstream reruns everything after it. Before a
    step with a different fingerprint runs, its ``outputs`` are removed (:meth:`prepare`)."""

    name: str
    stage: str
    argv: list[str]
    done: Path
    ranks: int = 1
    after: tuple[str, ...] = ()
    outputs: tuple[Path, ...] = ()
    record: Path | None = None
    parts: dict[str, Any] | None = None
    fingerprint: str = ""

    @property
    def launcher(self) -> str:
        return stage_info(self.stage).launcher

    def command(self) -> list[str]:
        """The local command line, from the stage's launcher kind: torchrun, mpiexec or plain."""
        cli = ["-m", "icehpc", self.stage, *self.argv]
        if self.launcher == "torch" and self.ranks > 1:
            return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc-per-node={self.ranks}", *cli]
        if self.launcher == "mpi" and self.ranks > 1:
            from .launch import mpiexec_prefix

            return [*mpiexec_prefix(), "-n", str(self.ranks), sys.executable, "-u", *cli]
        return [sys.executable, "-u", *cli]

    def recorded(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.record.read_text()) if self.record else None
        except (OSError, ValueError):
            return None

    def is_done(self) -> bool:
        if not self.done.exists():
            return False
        if self.record is None:
            return True
        rec = self.recorded()
        return rec is not None and rec.get("fingerprint") == self.fingerprint

    def why_run(self) -> str:
        """Why this step must run: its output is missing, or what changed since it last ran."""
        rec = self.recorded() if self.record else None
        if rec is not None and rec.get("fingerprint") != self.fingerprint:
            return "inputs changed: " + describe_change(rec.get("parts") or {}, self.parts or {})
        if not self.done.exists():
            return f"no output yet ({self.done.name})" + ("; resuming" if rec is not None else "")
        return "no fingerprint recorded for its output (made by an older icehpc or by hand)"

    def prepare(self) -> None:
        """Before running: remove the outputs of a run with other inputs, record this fingerprint.

        Recording before the run is safe: the outputs of any other fingerprint are gone, so a marker
        that appears later can only come from this command. A killed step keeps its outputs and its
        record, and resumes."""
        if self.record is None:
            return
        rec = self.recorded()
        if rec is None or rec.get("fingerprint") != self.fingerprint:
            import shutil

            for path in self.outputs:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                elif path.exists() or path.is_symlink():
                    path.unlink()
        self.record.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.record, json.dumps({"step": self.name, "fingerprint": self.fingerprint,
                                              "parts": self.parts}, indent=1) + "\n")


#: Files up to this size are hashed for a step's fingerprint; bigger ones (image zips) by size and mtime.
HASH_FILES_UP_TO = 1 << 20


def _file_fact(path: Path) -> Any:
    """What a step's fingerprint knows of a file or folder it reads outside the run folder."""
    import hashlib

    if path.is_dir():
        h = hashlib.sha256()
        n = 0
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for f in sorted(files):
                st = os.stat(os.path.join(root, f))
                h.update(f"{os.path.relpath(os.path.join(root, f), path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
                n += 1
        return {"files": n, "listing_sha256": h.hexdigest()[:16]}
    st = path.stat()
    if st.st_size <= HASH_FILES_UP_TO:
        return {"sha256": hashlib.sha256(path.read_bytes()).hexdigest()[:16]}
    return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def fingerprint_steps(steps: list[Step], out: Path) -> None:
    """Fill every step's ``parts`` and ``fingerprint`` (in plan order: upstream first) and ``record``."""
    import hashlib

    by_name: dict[str, Step] = {}
    for step in steps:
        files = {}
        for token in step.argv:
            candidate = token.partition("=")[2] if "=" in token and not token.startswith("/") else token
            p = Path(candidate)
            if p.is_absolute() and p.exists() and out not in p.parents and p != out:
                files[str(p)] = _file_fact(p)
        step.parts = {"command": [step.stage, *step.argv], "files": files,
                      "upstream": {a: by_name[a].fingerprint for a in step.after if a in by_name}}
        blob = json.dumps(step.parts, sort_keys=True).encode()
        step.fingerprint = hashlib.sha256(blob).hexdigest()[:16]
        step.record = out / ".pipeline" / f"{step.name}.json"
        by_name[step.name] = step


def describe_change(old: dict[str, Any], new: dict[str, Any]) -> str:
    """One line: which command arguments, files or upstream steps differ between two fingerprints."""
    said = []
    a, b = old.get("command") or [], new.get("command") or []
    if a != b and len(a) == len(b):
        said += [(f"{a[i - 1]} " if i and a[i - 1].startswith("--") else "") + f"{a[i]} → {b[i]}"
                 for i in range(len(a)) if a[i] != b[i]]
    elif a != b:
        gone = [t for t in a if t not in b]
        added = [t for t in b if t not in a]
        said.append("command " + (f"{shlex.join(gone) or '∅'} → {shlex.join(added) or '∅'}" if gone or added
                                  else "argument order"))
    fa, fb = old.get("files") or {}, new.get("files") or {}
    changed = sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k))
    if changed:
        said.append("file(s) " + ", ".join(changed[:3]) + (" …" if len(changed) > 3 else ""))
    ua, ub = old.get("upstream") or {}, new.get("upstream") or {}
    up = sorted(k for k in set(ua) | set(ub) if ua.get(k) != ub.get(k))
    if up:
        said.append("upstream step(s) " + ", ".join(up) + " changed")
    return "; ".join(said) or "fingerprint scheme changed"


def _resolve(path: str) -> Path:
    """A relative path as given (working folder), else relative to the repository root."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p.resolve()
    return (CHECKOUT / p).resolve()


def _resolve_existing(path: str, what: str) -> Path:
    p = _resolve(path)
    if not p.exists():
        raise UserError(f"{what}={path} does not exist")
    return p


def pretrain_canvas(cfg: PipelineConfig) -> int:
    """The decode canvas of the pretraining data: embedding must see particles at the same scale."""
    from ..ssl.config import PretrainConfig

    return cfglib.load(PretrainConfig, cfg.pretrain.config, cfg.pretrain.overrides).data.canvas


def plan(cfg: PipelineConfig, out: str | os.PathLike) -> list[Step]:
    """Every step of the pipeline in a valid order, with absolute paths (jobs may start elsewhere),
    each with its fingerprint (:func:`fingerprint_steps`)."""
    o = Path(out).resolve()
    backbone = o / "backbone.safetensors"
    user_data = bool(cfg.data.inputs)
    label = cfg.data.label_column if user_data else cfg.probe.label
    shard_opts = ["--shard-samples", str(cfg.shards.shard_samples), "--workers", str(cfg.shards.workers),
                  "--no-progress"]
    if cfg.pretrain.data not in ("synth", "real", "both"):
        raise ValueError(f"pretrain.data must be synth, real or both, got {cfg.pretrain.data!r}")
    data_dir = _resolve(cfg.real.data_dir)
    pretrain_shards, pretrain_after = o / "shards", ("shards",)
    keys = ["--keys", str(_resolve_existing(cfg.pretrain.keys, "pretrain.keys"))] if cfg.pretrain.keys else []
    if user_data:  # the user's images: pretraining reads the same shards (labels never read there)
        extra = ([f"--label-column={label}"] + ([f"--probe={cfg.data.probe}"] if cfg.data.probe else [])
                 + ([f"--pixel-um={cfg.data.pixel_um}"] if cfg.data.pixel_um else []))
        inputs = [str(_resolve(i)) for i in cfg.data.inputs]
        steps = [Step("shards", "shards", ["build", *inputs, "--out", str(o / "shards"), *extra, *shard_opts],
                      o / "shards" / "index.json", outputs=(o / "shards",))]
        if keys:  # the curated subset of the same inputs (same keys as the full build)
            pretrain_shards, pretrain_after = o / "pretrain-shards", ("pretrain-shards", "shards")
            steps.append(Step("pretrain-shards", "shards", ["build", *inputs, *extra, *keys, "--out",
                                                            str(pretrain_shards), *shard_opts],
                              pretrain_shards / "index.json", outputs=(pretrain_shards,)))
    else:
        steps = [
            Step("synth", "synth", ["--out", str(o / "synth"), "--n", str(cfg.synth.n), "--seed", str(cfg.synth.seed),
                                    "--no-progress"], o / "synth" / "planted.json", outputs=(o / "synth",)),
            Step("shards", "shards", ["build", "--manifest", str(o / "synth" / "manifest.csv"), "--out",
                                      str(o / "shards"), *shard_opts],
                 o / "shards" / "index.json", after=("synth",), outputs=(o / "shards",)),
        ]
        real_sources = [data_dir / a.file for a in cfg.real.archives if (data_dir / a.file).exists()]
        if cfg.pretrain.data != "synth" and not real_sources:
            raise ValueError(f"pretrain.data={cfg.pretrain.data} but no real archive was found under {data_dir}")
        if cfg.pretrain.data != "synth" or keys:
            # one shuffled shard set of the images only: labels are in the metadata but never read by pretraining
            pretrain_shards, pretrain_after = o / "pretrain-shards", ("pretrain-shards", "shards")
            sources = [] if cfg.pretrain.data == "synth" else list(map(str, real_sources))
            manifest = ["--manifest", str(o / "synth" / "manifest.csv")] if cfg.pretrain.data != "real" else []
            steps.append(Step("pretrain-shards", "shards", ["build", *sources, *manifest, "--shuffle", *keys,
                                                            "--out", str(pretrain_shards), *shard_opts],
                              pretrain_shards / "index.json", after=("synth",), outputs=(pretrain_shards,)))
    steps += [
        Step("pretrain", "pretrain", ["--config", str(cfglib.find_config(cfg.pretrain.config)),
                                      f"data.shards={pretrain_shards}", "--out", str(o / "pretrain"),
                                      "train.progress=false", *cfg.pretrain.overrides],
             o / "pretrain" / "backbone.safetensors", ranks=cfg.pretrain.nproc, after=pretrain_after,
             outputs=(o / "pretrain",)),
        Step("export", "export", [str(o / "pretrain"), "--out", str(backbone)], backbone, after=("pretrain",),
             outputs=(backbone,)),
    ]

    def store_outputs(h5: Path) -> tuple[Path, ...]:
        return (h5, Path(f"{h5}.json"), Path(f"{h5}.parts"))

    def embed_pair(prefix: str, shards: Path, dest: Path, after: tuple[str, ...]) -> list[Step]:
        # canvas and framing come from the exported header (as pretraining decoded), for both backbones
        common = ["--batch-size", str(cfg.embed.batch_size)]
        return [
            Step(f"{prefix}embed", "embed", [str(shards), "--checkpoint", str(backbone), "--out",
                                             str(dest / "trained.h5"), *common],
                 dest / "trained.h5.json", cfg.embed.ranks, ("export", *after), store_outputs(dest / "trained.h5")),
            Step(f"{prefix}embed-random", "embed", [str(shards), "--random-init", "--like", str(backbone), "--out",
                                                    str(dest / "random.h5"), *common],
                 dest / "random.h5.json", cfg.embed.ranks, ("export", *after), store_outputs(dest / "random.h5")),
        ]

    def probe(prefix: str, store_dir: Path, shards: Path, dest: Path, label: str) -> Step:
        return Step(f"{prefix}probe", "probe", [str(store_dir / "trained.h5"), "--random-store",
                                                str(store_dir / "random.h5"), "--images", str(shards),
                                                "--label", label, "--seed", str(cfg.probe.seed),
                                                "--splits", str(cfg.probe.splits),
                                                "--out", str(dest)],
                    dest / "probe.json", after=(f"{prefix}embed", f"{prefix}embed-random"), outputs=(dest,))

    steps += embed_pair("", o / "shards", o / "embed", ("shards",))
    kappa_config = ["--config", str(cfglib.find_config(cfg.kappa.config))] if cfg.kappa.config else []
    # the user's data may lack temperature or campaign: leave those groupings out instead of failing
    data_opts = ["drop_empty_columns=true", f"similarity_by={label}"] if user_data else []
    if user_data and label != "habit":
        data_opts.append("groupings=" + json.dumps([label if g == "habit" else g for g in KAPPA_GROUPINGS]))
    for which, after in (("trained", "embed"), ("random", "embed-random")):
        steps.append(Step(f"kappa-{which}", "kappa", [str(o / "embed" / f"{which}.h5"), "--out",
                                                      str(o / "kappa" / which), *kappa_config, *data_opts,
                                                      *cfg.kappa.overrides],
                          o / "kappa" / which / "kappa.json", cfg.kappa.ranks, (after,), (o / "kappa" / which,)))
    steps.append(probe("", o / "embed", o / "shards", o / "probe", label))
    report = [str(o / "kappa" / "trained"), "--out", str(o / "report"), "--random", str(o / "kappa" / "random"),
              "--store", str(o / "embed" / "trained.h5"), "--shards", str(o / "shards"),
              "--probe", str(o / "probe"), "--pretrain", str(o / "pretrain"), "--backbone", str(backbone)]
    if not user_data:
        report += ["--planted", str(o / "synth" / "planted.json")]
    steps.append(Step("report", "report", report, o / "report" / "index.html",
                      after=("kappa-trained", "kappa-random", "probe"), outputs=(o / "report",)))

    for archive in ([] if user_data else cfg.real.archives):
        source = data_dir / archive.file
        if not source.exists():
            continue
        base = o / "real" / archive.name
        prefix = f"real-{archive.name}-"
        steps.append(Step(f"{prefix}shards", "shards", ["build", str(source), "--out", str(base / "shards"),
                                                        "--probe", archive.probe, "--pixel-um", str(archive.pixel_um),
                                                        "--workers", str(cfg.shards.workers), "--no-progress"],
                          base / "shards" / "index.json", outputs=(base / "shards",)))
        steps += embed_pair(prefix, base / "shards", base / "embed", (f"{prefix}shards",))
        steps.append(probe(prefix, base / "embed", base / "shards", base / "probe", cfg.probe.label))
    fingerprint_steps(steps, o)
    return steps


#: κ groupings of a run on the user's data (the label column replaces habit); see KappaConfig.
KAPPA_GROUPINGS = ["campaign", "habit", "temperature_c", "particle_width_um", "campaign:temperature_c",
                   "campaign:particle_width_um"]


# ------------------------------------------------------------------------------------ science check
def _entropy(probabilities: dict[str, float]) -> float:
    import numpy as np

    p = np.array([v for v in probabilities.values() if v > 0])
    return float(-(p * np.log(p)).sum())


def planted_entropy(planted: dict, by_campaign: bool) -> dict[tuple, float]:
    """Shannon entropy (nats) of the planted habit mix per temperature bin (low edge), pooled over
    width bins (and campaigns unless ``by_campaign``) with the observed sample counts as weights."""
    mixes: dict[tuple, dict[str, float]] = {}
    for row in planted["bins"]:
        if not row["count"]:
            continue
        key = (row["campaign"], float(row["temperature_bin_c"][0])) if by_campaign else (
            float(row["temperature_bin_c"][0]),)
        mix = mixes.setdefault(key, {h: 0.0 for h in planted["habits"]})
        for habit, p in row["probabilities"].items():
            mix[habit] += row["count"] * p
    out = {}
    for key, mix in mixes.items():
        total = sum(mix.values())
        out[key] = _entropy({h: v / total for h, v in mix.items()})
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
        entropy = planted_entropy(planted, by_campaign)
        section: dict[str, Any] = {}
        for name, kdir in kappa_dirs.items():
            kappas = kappa_by_temperature(kdir / "kappa.json", by_campaign, min_count)
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


def write_science(out: Path, steps: list[Step], min_count: int) -> dict[str, Any]:
    """science.json: κ vs planted diversity (trained vs random-init) and every probe's accuracies."""
    science: dict[str, Any] = {
        "kappa_vs_planted_diversity": kappa_vs_planted(
            out / "synth" / "planted.json", {"trained": out / "kappa" / "trained", "random_init": out / "kappa" / "random"},
            min_count) if any(s.stage == "synth" for s in steps) else {},
        "probes": {s.name: probe_summary(s.done) for s in steps if s.stage == "probe"},
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


# ------------------------------------------------------------------------------------------ running
def _step_env(step: Step) -> dict[str, str]:
    """Threads: the cores shared among the step's processes (mpiexec/torchrun leave this unset)."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // max(step.ranks, 1))))
    return env


def run_pipeline(cfg: PipelineConfig, out: str | os.PathLike, min_count: int = 20) -> dict[str, Any]:
    """Run every step not yet done, in order; then write and print science.json."""
    o = Path(out).resolve()
    o.mkdir(parents=True, exist_ok=True)
    steps = plan(cfg, o)
    start = time.perf_counter()
    for step in steps:
        if step.is_done():
            print(f"[pipeline] {step.name}: done ({step.done}), skipped", flush=True)
            continue
        print(f"[pipeline] {step.name}: runs, {step.why_run()}", flush=True)
        step.prepare()
        cmd = step.command()
        print(f"[pipeline] {step.name}: {shlex.join(cmd)}", flush=True)
        t = time.perf_counter()
        code = subprocess.run(cmd, env=_step_env(step)).returncode
        if code != 0:
            raise UserError(f"step {step.name} failed with exit code {code} (its messages are above); fix and "
                            f"rerun the same command to continue from this step. Command: {shlex.join(cmd)}")
        if not step.is_done():
            raise RuntimeError(f"step {step.name} ended without writing {step.done}")
        print(f"[pipeline] {step.name}: {time.perf_counter() - t:.1f} s", flush=True)
    return finish(o, steps, min_count, time.perf_counter() - start)


def finish(out: Path, steps: list[Step], min_count: int, seconds: float | None = None) -> dict[str, Any]:
    """Check every step's output, write science.json and say where the report is."""
    missing = [s.name for s in steps if not s.is_done()]
    if missing:
        raise RuntimeError(f"pipeline outputs missing for steps {missing}; rerun the pipeline")
    science = write_science(out, steps, min_count)
    print("[pipeline] science checks (also in science.json):")
    print_science(science)
    took = f" in {seconds:.0f} s" if seconds is not None else ""
    print(f"[pipeline] finished{took}. Report: {out / 'report' / 'index.html'}  "
          f"(probes: {out / 'probe' / 'probe.json'}, science: {out / 'science.json'})", flush=True)
    return science


# ---------------------------------------------------------------------------------------- submission
def submit_pipeline(stage_args: Sequence[str], executor: str = "slurm", *, folder: str | Path = "runs/submitit",
                    nodes: int = 1, tasks_per_node: int = 1, gpus_per_node: int = 0, cpus_per_task: int = 1,
                    time_min: int = 60, partition: str | None = None, mem_gb: float | None = None) -> list[Any]:
    """Submit the pending steps of ``icehpc pipeline STAGE_ARGS`` through submitit, chained afterok.

    Single-process steps get one task. Parallel steps (MPI, torch.distributed) get the plan's rank
    count on one node, unless ``nodes`` or ``tasks_per_node`` is given (> 1): then every parallel
    step runs on ``nodes`` × ``tasks_per_node`` tasks. ``gpus_per_node`` goes to the stages the
    stage table marks as GPU stages. The last job runs :func:`finish` (checks every output, writes
    science.json). Steps already complete are not submitted. Returns the jobs in submission order.
    """
    from . import launch

    parser = argparse.ArgumentParser(prog="icehpc pipeline")
    add_arguments(parser)
    rest, overrides = cfglib.split_overrides(parser, list(stage_args))
    args = parser.parse_args(rest)
    args.overrides = [*args.overrides, *overrides]
    cfg = config_from_args(args)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    jobs: dict[str, Any] = {}
    submitted = []
    common = dict(folder=folder, cpus_per_task=cpus_per_task, time_min=time_min, partition=partition, mem_gb=mem_gb)
    spread = nodes > 1 or tasks_per_node > 1
    steps = plan(cfg, out)
    for step in steps:
        if step.is_done():
            continue
        print(f"[pipeline] {step.name}: submitted, {step.why_run()}", file=sys.stderr, flush=True)
        step.prepare()
        deps = [jobs[name] for name in step.after if name in jobs]
        parallel = step.launcher != "plain"
        shape = (dict(nodes=nodes, tasks_per_node=tasks_per_node) if parallel and spread
                 else dict(nodes=1, tasks_per_node=step.ranks if parallel else 1))
        job = launch.submit_stage(step.stage, step.argv, executor, **shape,
                                  gpus_per_node=gpus_per_node if stage_info(step.stage).gpu else 0,
                                  dependency=deps or None, **common)
        jobs[step.name] = job
        submitted.append(job)
    if executor != "slurm":  # no scheduler to hold the last job: wait here (results(): every task)
        for job in submitted:
            job.results()
    ex = launch.make_executor(executor, folder, cpus_per_task=cpus_per_task, time_min=time_min, partition=partition,
                              mem_gb=mem_gb, dependency=submitted or None, job_name="icehpc-pipeline-finish")
    final = ex.submit(finish, out, steps, args.min_count)
    return [*submitted, final]


def print_plan(steps: list[Step], out: Path) -> None:
    """``# out=DIR``, then one tab-separated line per pending step for jobs/pipeline.sh: name,
    ranks, launcher kind (plain | mpi | torch, from the stage table), the steps it waits for
    (``-``: none), and the shell-quoted ``STAGE ARGV``."""
    print(f"# out={out}")
    for step in steps:
        if step.is_done():
            continue
        # "-" for no dependency: bash `read` would merge two adjacent tabs and shift the fields
        print("\t".join([step.name, str(step.ranks), step.launcher, ",".join(step.after) or "-",
                         shlex.join([step.stage, *step.argv])]))


# --------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="run folder (every stage writes below it)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--finish-only", action="store_true",
                      help="only check every step's output and write science.json (last job of a submission)")
    mode.add_argument("--plan", action="store_true",
                      help="print the pending steps (name, ranks, dependencies, command) for jobs/pipeline.sh")
    parser.add_argument("--min-count", type=int, default=20,
                        help="κ groups with fewer samples are left out of the science check (default 20)")
    parser.add_argument("--data", nargs="+", metavar="INPUT",
                        help="run on these images instead of the synthetic demo: folder trees (label = first "
                             "folder), .zip files, or CSV manifests with metadata (= config key data.inputs)")
    cfglib.add_config_arguments(parser, PipelineConfig)


def config_from_args(args: argparse.Namespace) -> PipelineConfig:
    """``--data`` (absolute paths: steps may run elsewhere) goes in as data.inputs, after the overrides."""
    if getattr(args, "data", None):
        for given in args.data:
            if not Path(given).exists():
                raise UserError(f"--data {given} does not exist (a folder tree, a .zip or a .csv manifest)")
        inputs = [str(Path(d).resolve()) for d in args.data]
        args = argparse.Namespace(**{**vars(args), "overrides": [*args.overrides, f"data.inputs={json.dumps(inputs)}"]})
    return cfglib.from_args(PipelineConfig, args)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    out = Path(args.out).resolve()
    if args.plan:
        steps = plan(cfg, out)
        for step in steps:  # what the caller (jobs/pipeline.sh) submits next: clear stale outputs first
            if not step.is_done():
                print(f"[pipeline] {step.name}: submitted, {step.why_run()}", file=sys.stderr, flush=True)
                step.prepare()
        print_plan(steps, out)
        return 0
    if args.finish_only:
        finish(out, plan(cfg, out), args.min_count)
        return 0
    run_pipeline(cfg, out, args.min_count)
    return 0
