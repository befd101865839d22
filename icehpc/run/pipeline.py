"""``icehpc pipeline``: every stage in order on one machine, resumable; or chained on Slurm.

    icehpc pipeline --config configs/demo.yaml --out runs/demo [key.sub=value ...]

Plan (:func:`plan`): synth → shards → pretrain (N DeepSpeed processes via torch.distributed.run) →
export → embed with the trained and a random-init backbone (N MPI ranks each) → κ of both (N MPI
ranks) → report → probe (trained vs random-init vs geometric baseline); then, for each real probe
archive present under ``real.data_dir`` (the Jaffeux et al. 2022 2D-S and PIP images): shards →
embed (trained, random-init) → probe. A step whose output marker exists is skipped, so a killed run
restarted with the same command continues; each marker is written last and atomically by its stage.
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
from ..config import field
from ..fileio import write_atomic
from .stages import stage as stage_info

#: The checkout this package lives in, if any (relative data paths in the shipped configs, such as
#: ``../shared/data/...``, are also looked up from there).
CHECKOUT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------ config
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


@dataclass
class EmbedStep:
    ranks: int = field(2, help="MPI ranks of each embedding job")
    batch_size: int = field(64, help="images per forward pass")


@dataclass
class KappaStep:
    ranks: int = field(2, help="MPI ranks of each κ job")
    config: str = field("kappa.yaml", help="κ YAML (configs/ is searched)")
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
    """One stage invocation: ``icehpc STAGE ARGV`` on ``ranks`` processes, complete once ``done`` exists."""

    name: str
    stage: str
    argv: list[str]
    done: Path
    ranks: int = 1
    after: tuple[str, ...] = ()

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

    def is_done(self) -> bool:
        return self.done.exists()


def _resolve(path: str) -> Path:
    """A relative path as given (working folder), else relative to the repository root."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p.resolve()
    return (CHECKOUT / p).resolve()


def pretrain_canvas(cfg: PipelineConfig) -> int:
    """The decode canvas of the pretraining data: embedding must see particles at the same scale."""
    from ..ssl.config import PretrainConfig

    return cfglib.load(PretrainConfig, cfg.pretrain.config, cfg.pretrain.overrides).data.canvas


def plan(cfg: PipelineConfig, out: str | os.PathLike) -> list[Step]:
    """Every step of the pipeline in a valid order, with absolute paths (jobs may start elsewhere)."""
    o = Path(out).resolve()
    backbone = o / "backbone.safetensors"
    if cfg.pretrain.data not in ("synth", "real", "both"):
        raise ValueError(f"pretrain.data must be synth, real or both, got {cfg.pretrain.data!r}")
    data_dir = _resolve(cfg.real.data_dir)
    real_sources = [data_dir / a.file for a in cfg.real.archives if (data_dir / a.file).exists()]
    if cfg.pretrain.data != "synth" and not real_sources:
        raise ValueError(f"pretrain.data={cfg.pretrain.data} but no real archive was found under {data_dir}")
    steps = [
        Step("synth", "synth", ["--out", str(o / "synth"), "--n", str(cfg.synth.n), "--seed", str(cfg.synth.seed),
                                "--no-progress"], o / "synth" / "planted.json"),
        Step("shards", "shards", ["build", "--manifest", str(o / "synth" / "manifest.csv"), "--out", str(o / "shards"),
                                  "--shard-samples", str(cfg.shards.shard_samples), "--workers",
                                  str(cfg.shards.workers), "--no-progress"],
             o / "shards" / "index.json", after=("synth",)),
    ]
    pretrain_shards, pretrain_after = o / "shards", ("shards",)
    if cfg.pretrain.data != "synth":
        # one shuffled shard set of the images only: labels are in the metadata but never read by pretraining
        pretrain_shards, pretrain_after = o / "pretrain-shards", ("pretrain-shards", "shards")
        manifest = ["--manifest", str(o / "synth" / "manifest.csv")] if cfg.pretrain.data == "both" else []
        steps.append(Step("pretrain-shards", "shards", ["build", *map(str, real_sources), *manifest, "--shuffle",
                                                        "--out", str(pretrain_shards), "--shard-samples",
                                                        str(cfg.shards.shard_samples), "--workers",
                                                        str(cfg.shards.workers), "--no-progress"],
                          pretrain_shards / "index.json", after=("synth",)))
    steps += [
        Step("pretrain", "pretrain", ["--config", str(cfglib.find_config(cfg.pretrain.config)),
                                      f"data.shards={pretrain_shards}", f"out={o / 'pretrain'}", "train.progress=false",
                                      *cfg.pretrain.overrides],
             o / "pretrain" / "backbone.safetensors", ranks=cfg.pretrain.nproc, after=pretrain_after),
        Step("export", "export", [str(o / "pretrain"), "--out", str(backbone)], backbone, after=("pretrain",)),
    ]

    def embed_pair(prefix: str, shards: Path, dest: Path, after: tuple[str, ...]) -> list[Step]:
        # canvas and framing come from the exported header (as pretraining decoded), for both backbones
        common = ["--batch-size", str(cfg.embed.batch_size)]
        return [
            Step(f"{prefix}embed", "embed", [str(shards), "--checkpoint", str(backbone), "--out",
                                             str(dest / "trained.h5"), *common],
                 dest / "trained.h5.json", cfg.embed.ranks, ("export", *after)),
            Step(f"{prefix}embed-random", "embed", [str(shards), "--random-init", "--like", str(backbone), "--out",
                                                    str(dest / "random.h5"), *common],
                 dest / "random.h5.json", cfg.embed.ranks, ("export", *after)),
        ]

    def probe(prefix: str, store_dir: Path, shards: Path, dest: Path) -> Step:
        return Step(f"{prefix}probe", "probe", [str(store_dir / "trained.h5"), "--random-store",
                                                str(store_dir / "random.h5"), "--images", str(shards),
                                                "--label", cfg.probe.label, "--seed", str(cfg.probe.seed),
                                                "--splits", str(cfg.probe.splits),
                                                "--out", str(dest)],
                    dest / "probe.json", after=(f"{prefix}embed", f"{prefix}embed-random"))

    steps += embed_pair("", o / "shards", o / "embed", ("shards",))
    kappa_config = ["--config", str(cfglib.find_config(cfg.kappa.config))]
    for which, after in (("trained", "embed"), ("random", "embed-random")):
        # overrides right after the store: argparse takes positionals only as one contiguous run
        steps.append(Step(f"kappa-{which}", "kappa", [str(o / "embed" / f"{which}.h5"), *cfg.kappa.overrides,
                                                      "--out", str(o / "kappa" / which), *kappa_config],
                          o / "kappa" / which / "kappa.json", cfg.kappa.ranks, (after,)))
    steps.append(Step("report", "report", [str(o / "kappa" / "trained"), "--out", str(o / "report")],
                      o / "report" / "index.html", after=("kappa-trained",)))
    steps.append(probe("", o / "embed", o / "shards", o / "probe"))

    for archive in cfg.real.archives:
        source = data_dir / archive.file
        if not source.exists():
            continue
        base = o / "real" / archive.name
        prefix = f"real-{archive.name}-"
        steps.append(Step(f"{prefix}shards", "shards", ["build", str(source), "--out", str(base / "shards"),
                                                        "--probe", archive.probe, "--pixel-um", str(archive.pixel_um),
                                                        "--workers", str(cfg.shards.workers), "--no-progress"],
                          base / "shards" / "index.json"))
        steps += embed_pair(prefix, base / "shards", base / "embed", (f"{prefix}shards",))
        steps.append(probe(prefix, base / "embed", base / "shards", base / "probe"))
    return steps


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
            min_count),
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
            sd, bsd = m.get("accuracy_sd", 0.0), m.get("balanced_accuracy_sd", 0.0)
            print(f"  {probe_name:<16} {rep:<22} accuracy {m['accuracy']:.3f} ± {sd:.3f}  "
                  f"balanced {m['balanced_accuracy']:.3f} ± {bsd:.3f}")


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
        cmd = step.command()
        print(f"[pipeline] {step.name}: {shlex.join(cmd)}", flush=True)
        t = time.perf_counter()
        code = subprocess.run(cmd, env=_step_env(step)).returncode
        if code != 0:
            raise RuntimeError(f"step {step.name} failed with exit code {code}: {shlex.join(cmd)}")
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
    args = parser.parse_args(list(stage_args))
    cfg = cfglib.from_args(PipelineConfig, args)
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
    cfglib.add_config_arguments(parser, PipelineConfig, "configs/demo.yaml")


def run(args: argparse.Namespace) -> int:
    cfg = cfglib.from_args(PipelineConfig, args)
    out = Path(args.out).resolve()
    if args.plan:
        print_plan(plan(cfg, out), out)
        return 0
    if args.finish_only:
        finish(out, plan(cfg, out), args.min_count)
        return 0
    run_pipeline(cfg, out, args.min_count)
    return 0
