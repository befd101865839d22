"""The pipeline's configuration and its plan: every step in a valid order, with absolute paths.

With ``--data`` (config key ``data.inputs``) the plan starts from the user's images instead of
``synth``: shards → pretrain → export → embed (trained, random init) → κ of both → probe → report.
Plan of the synthetic demo: synth → shards → pretrain → export → embed with the trained and a
random-init backbone → κ of both → probe; then, for each real probe archive present under
``real.data_dir``: shards → embed (trained, random-init) → probe; last the report, which shows every
probe (``--real-probe PROBE=OUT/real/NAME/probe`` per archive).

Each step's marker and files come from its stage's contract (:func:`icehpc.run.stages.contract`,
``icehpc.analysis.embed.contract``), never spelled here. Every nested config (pretraining and κ
overrides) is resolved and validated here, before any step runs or anything is removed.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .. import config as cfglib
from ..config import UserError, field
from .stages import contract as stage_contract
from .steps import Output, Step, fingerprint_steps

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
    n: int = field(2000, help="synthetic particle images", ge=1)
    seed: int = field(0, help="seed of the synthetic data", ge=0)


@dataclass
class ShardStep:
    shard_samples: int = field(250, help="samples per shard (several shards per rank keep ranks busy)", ge=1)
    workers: int = field(2, help="shard-building processes", ge=1)


@dataclass
class PretrainStep:
    config: str = field("pretrain-tiny-cpu.yaml", help="pretraining YAML (configs/ is searched)")
    nproc: int = field(2, help="DeepSpeed processes (torch.distributed.run --nproc-per-node)", ge=1)
    overrides: list[str] = field([], help="dotted overrides for the pretraining config")
    data: str = field("synth", help="what pretraining sees: synth (the synthetic shards) | real (the unlabeled real "
                                    "archives found, one shuffled shard set) | both (real + synthetic)")
    keys: str = field("", help="a curated subset to pretrain on: a CSV with a 'key' column (icehpc curate's "
                               "curated.csv) naming samples of the pretraining shard set built from the same "
                               "inputs; empty = every sample")


@dataclass
class EmbedStep:
    ranks: int = field(2, help="MPI ranks of each embedding job", ge=1)
    batch_size: int = field(64, help="images per forward pass", ge=1)


@dataclass
class KappaStep:
    ranks: int = field(2, help="MPI ranks of each κ job", ge=1)
    config: str = field("", help="κ YAML (a path or a shipped config name; '': built-in defaults)")
    overrides: list[str] = field([], help="dotted overrides for the κ config")
    columns: list[str] = field([], help="CSV files with a 'key' column joined onto both stores by key (kappa "
                                        "--columns; name their columns in groupings through kappa.overrides); a "
                                        "changed file reruns the κ steps")


@dataclass
class ProbeStep:
    label: str = field("habit", help="meta column holding the class")
    seed: int = field(0, help="seed of the first stratified split", ge=0)
    splits: int = field(5, help="stratified 80/20 splits (seeds seed … seed+splits−1); mean ± sd reported", ge=1)
    label_fractions: list[float] = field([0.01, 0.05, 0.1, 0.25, 1.0],
                                         help="label-efficiency curve: the probes refitted on these stratified "
                                              "fractions of each split's training labels ([] = none)")

    def validate(self) -> None:
        from ..analysis.probe import check_label_fractions

        check_label_fractions(self.label_fractions)


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


def _made(stage: str, folder: Path) -> dict:
    """A folder stage's marker and files, from its contract."""
    c = stage_contract(stage)
    return {"done": c.marker_path(folder), "owns": (Output(folder, c),)}


def _store(store: Path) -> dict:
    """An embedding store's marker and files, from embed's contract of that store."""
    from ..analysis.embed import contract

    c = contract(store)
    return {"done": c.marker_path(store.parent), "owns": (Output(store.parent, c),)}


def validate_nested(cfg: PipelineConfig, kappa_options: list[str]) -> None:
    """Resolve every config a step will load (pretraining, κ) now: a misspelt key or a bad value
    is one line before anything runs or is removed, not a failure after hours."""
    from ..analysis.kappa import KappaConfig
    from ..ssl.config import PretrainConfig

    for what, schema, path, overrides in (
            ("pretrain", PretrainConfig, cfglib.find_config(cfg.pretrain.config), cfg.pretrain.overrides),
            ("kappa", KappaConfig, cfglib.find_config(cfg.kappa.config) if cfg.kappa.config else None,
             [*kappa_options, *cfg.kappa.overrides])):
        try:
            cfglib.load(schema, path, overrides)
        except (cfglib.ConfigError, ValueError, OSError) as exc:
            raise cfglib.ConfigError(f"{what}.overrides / {what}.config: {exc}") from None


def plan(cfg: PipelineConfig, out: str | os.PathLike) -> list[Step]:
    """Every step of the pipeline in a valid order, with absolute paths (jobs may start elsewhere),
    each with its fingerprint (:func:`fingerprint_steps`). Writes nothing."""
    o = Path(out).resolve()
    backbone = o / "backbone.safetensors"
    user_data = bool(cfg.data.inputs)
    label = cfg.data.label_column if user_data else cfg.probe.label
    shard_opts = ["--shard-samples", str(cfg.shards.shard_samples), "--workers", str(cfg.shards.workers),
                  "--no-progress"]
    if cfg.pretrain.data not in ("synth", "real", "both"):
        raise ValueError(f"pretrain.data must be synth, real or both, got {cfg.pretrain.data!r}")
    # the user's data may lack temperature or campaign: leave those groupings out instead of failing
    data_opts = ["drop_empty_columns=true", f"similarity_by={label}"] if user_data else []
    if user_data and label != "habit":
        data_opts.append("groupings=" + json.dumps([label if g == "habit" else g for g in KAPPA_GROUPINGS]))
    validate_nested(cfg, data_opts)
    data_dir = _resolve(cfg.real.data_dir)
    pretrain_shards, pretrain_after = o / "shards", ("shards",)
    keys = ["--keys", str(_resolve_existing(cfg.pretrain.keys, "pretrain.keys"))] if cfg.pretrain.keys else []
    planted = stage_contract("synth").marker_path(o / "synth")
    if user_data:  # the user's images: pretraining reads the same shards (labels never read there)
        extra = ([f"--label-column={label}"] + ([f"--probe={cfg.data.probe}"] if cfg.data.probe else [])
                 + ([f"--pixel-um={cfg.data.pixel_um}"] if cfg.data.pixel_um else []))
        inputs = [str(_resolve(i)) for i in cfg.data.inputs]
        steps = [Step("shards", "shards", ["build", *inputs, "--out", str(o / "shards"), *extra, *shard_opts],
                      **_made("shards", o / "shards"))]
        if keys:  # the curated subset of the same inputs (same keys as the full build)
            pretrain_shards, pretrain_after = o / "pretrain-shards", ("pretrain-shards", "shards")
            steps.append(Step("pretrain-shards", "shards", ["build", *inputs, *extra, *keys, "--out",
                                                            str(pretrain_shards), *shard_opts],
                              **_made("shards", pretrain_shards)))
    else:
        steps = [
            Step("synth", "synth", ["--out", str(o / "synth"), "--n", str(cfg.synth.n), "--seed", str(cfg.synth.seed),
                                    "--no-progress"], **_made("synth", o / "synth")),
            Step("shards", "shards", ["build", "--manifest", str(o / "synth" / "manifest.csv"), "--out",
                                      str(o / "shards"), *shard_opts], after=("synth",), **_made("shards", o / "shards")),
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
                              after=("synth",), **_made("shards", pretrain_shards)))
    from ..contract import Contract

    steps += [
        Step("pretrain", "pretrain", ["--config", str(cfglib.find_config(cfg.pretrain.config)),
                                      f"data.shards={pretrain_shards}", "--out", str(o / "pretrain"),
                                      "train.progress=false", *cfg.pretrain.overrides],
             ranks=cfg.pretrain.nproc, after=pretrain_after, **_made("pretrain", o / "pretrain")),
        Step("export", "export", [str(o / "pretrain"), "--out", str(backbone)], backbone, after=("pretrain",),
             owns=(Output(o, Contract(backbone.name)),)),
    ]

    def embed_pair(prefix: str, shards: Path, dest: Path, after: tuple[str, ...]) -> list[Step]:
        # canvas and framing come from the exported header (as pretraining decoded), for both backbones
        common = ["--batch-size", str(cfg.embed.batch_size)]
        return [
            Step(f"{prefix}embed", "embed", [str(shards), "--checkpoint", str(backbone), "--out",
                                             str(dest / "trained.h5"), *common],
                 ranks=cfg.embed.ranks, after=("export", *after), **_store(dest / "trained.h5")),
            Step(f"{prefix}embed-random", "embed", [str(shards), "--random-init", "--like", str(backbone), "--out",
                                                    str(dest / "random.h5"), *common],
                 ranks=cfg.embed.ranks, after=("export", *after), **_store(dest / "random.h5")),
        ]

    fractions = (["--label-fractions", ",".join(map(str, cfg.probe.label_fractions))]
                 if cfg.probe.label_fractions else [])

    def probe(prefix: str, store_dir: Path, shards: Path, dest: Path, label: str) -> Step:
        return Step(f"{prefix}probe", "probe", [str(store_dir / "trained.h5"), "--random-store",
                                                str(store_dir / "random.h5"), "--images", str(shards),
                                                "--label", label, "--seed", str(cfg.probe.seed),
                                                "--splits", str(cfg.probe.splits), *fractions,
                                                "--out", str(dest)],
                    after=(f"{prefix}embed", f"{prefix}embed-random"), **_made("probe", dest))

    steps += embed_pair("", o / "shards", o / "embed", ("shards",))
    kappa_config = ["--config", str(cfglib.find_config(cfg.kappa.config))] if cfg.kappa.config else []
    kappa_config += [f"--columns={_resolve_existing(c, 'kappa.columns')}" for c in cfg.kappa.columns]
    for which, after in (("trained", "embed"), ("random", "embed-random")):
        steps.append(Step(f"kappa-{which}", "kappa", [str(o / "embed" / f"{which}.h5"), "--out",
                                                      str(o / "kappa" / which), *kappa_config, *data_opts,
                                                      *cfg.kappa.overrides],
                          ranks=cfg.kappa.ranks, after=(after,), **_made("kappa", o / "kappa" / which)))
    steps.append(probe("", o / "embed", o / "shards", o / "probe", label))
    report = [str(o / "kappa" / "trained"), "--out", str(o / "report"), "--random", str(o / "kappa" / "random"),
              "--store", str(o / "embed" / "trained.h5"), "--shards", str(o / "shards"),
              "--probe", str(o / "probe"), "--pretrain", str(o / "pretrain"), "--backbone", str(backbone)]
    if not user_data:
        report += ["--planted", str(planted)]
    report_after = ["kappa-trained", "kappa-random", "probe"]

    for archive in ([] if user_data else cfg.real.archives):
        source = data_dir / archive.file
        if not source.exists():
            continue
        base = o / "real" / archive.name
        prefix = f"real-{archive.name}-"
        steps.append(Step(f"{prefix}shards", "shards", ["build", str(source), "--out", str(base / "shards"),
                                                        "--probe", archive.probe, "--pixel-um", str(archive.pixel_um),
                                                        "--workers", str(cfg.shards.workers), "--no-progress"],
                          **_made("shards", base / "shards")))
        steps += embed_pair(prefix, base / "shards", base / "embed", (f"{prefix}shards",))
        steps.append(probe(prefix, base / "embed", base / "shards", base / "probe", cfg.probe.label))
        report += ["--real-probe", f"{archive.probe}={base / 'probe'}"]  # the report's table of this archive
        report_after.append(steps[-1].name)
    steps.append(Step("report", "report", report, after=tuple(report_after), **_made("report", o / "report")))
    fingerprint_steps(steps, o)
    return steps


#: κ groupings of a run on the user's data (the label column replaces habit); see KappaConfig.
KAPPA_GROUPINGS = ["campaign", "habit", "temperature_c", "particle_width_um", "campaign:temperature_c",
                   "campaign:particle_width_um"]


# --------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="run folder (every stage writes below it)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--finish-only", action="store_true",
                      help="only check every step's output and write science.json (last job of a submission)")
    mode.add_argument("--plan", action="store_true",
                      help="print the pending steps (name, ranks, dependencies, command) and why each would "
                           "run; changes nothing on disk")
    mode.add_argument("--prepare-step", metavar="STEP",
                      help="remove the stale files of STEP's stage (a run with other inputs) and record its "
                           "inputs; what each job of jobs/pipeline.sh does before its stage starts")
    parser.add_argument("--plan-format", choices=("text", "nul"), default="text",
                        help="--plan output: text (tab-separated, for reading) or nul (NUL-separated fields, "
                             "for jobs/pipeline.sh)")
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
