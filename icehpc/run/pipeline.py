"""``icehpc pipeline``: every stage in order on one machine, resumable; or chained on Slurm.

    icehpc pipeline --config configs/demo.yaml --out runs/demo [key.sub=value ...]
    icehpc pipeline --data IMAGES_DIR|ARCHIVE.zip|MANIFEST.csv ... --out runs/mine [key.sub=value ...]

With ``--data`` (config key ``data.inputs``) the plan starts from the user's images instead of
``synth``: shards → pretrain → export → embed (trained, random init) → κ of both (groupings over
columns the data lacks, such as temperature for 2D-S/PIP, are left out) → probe → report.

Fingerprints: every step records (in ``OUT/.pipeline/STEP.json``) a hash of its command, of the
files it reads outside OUT (configs and the user's images: content up to 1 MiB, else size and
mtime; folders, and the images a CSV manifest names, by their names, sizes and mtimes) and of the
fingerprints of the steps it waits for. A step is done when its stage says so (``status(args)``:
its marker verifies every file it wrote, for this fingerprint) and its record matches; otherwise
it runs, and so does every step after it; the log says why (``--n 400 → 800``, ``upstream step(s)
synth changed``). Before a step with another record runs, only its stage's own files are removed
(never a folder: a user's files under OUT stay). ``--plan`` only prints what would run and why.

Plan of the synthetic demo (:func:`plan`): synth → shards → pretrain (N DeepSpeed processes via torch.distributed.run) →
export → embed with the trained and a random-init backbone (N MPI ranks each) → κ of both (N MPI
ranks) → probe (trained vs random-init vs geometric baseline); then, for each real probe
archive present under ``real.data_dir`` (the Jaffeux et al. 2022 2D-S and PIP images): shards →
embed (trained, random-init) → probe; last the report (every probe, a table per real archive). A step whose output is complete (with a matching fingerprint) is
skipped, so a killed run restarted with the same command continues; each marker is written last and
atomically by its stage. Layout: :mod:`.plan` (config, steps in order), :mod:`.steps` (a step, its
record, "must it run?"), :mod:`.runner` (local run, submission, ``--plan``); the science checks are
:mod:`icehpc.analysis.science`.
The run ends with ``science.json`` (κ per temperature bin against the planted habit diversity, and
the probe accuracies) and prints where the report is.

The same plan is what ``icehpc submit pipeline -- --config … --out …`` (submitit, afterok
dependencies) and ``jobs/pipeline.sh`` (sbatch, afterok) submit, so all three leave the same files.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .plan import add_arguments, config_from_args, plan  # noqa: F401  (add_arguments: the stage table's entry)
from .runner import finish, prepare_step, print_plan, run_pipeline

# --------------------------------------------------------------------------------------------- CLI
def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    out = Path(args.out).resolve()
    if args.plan:
        print_plan(plan(cfg, out), out, args.plan_format)
        return 0
    if args.prepare_step:
        prepare_step(cfg, out, args.prepare_step)
        return 0
    if args.finish_only:
        finish(out, plan(cfg, out), args.min_count)
        return 0
    run_pipeline(cfg, out, args.min_count)
    return 0
