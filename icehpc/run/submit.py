"""``icehpc submit STAGE [resources] [--wait] -- ARGS``: one stage, or the whole pipeline, via submitit."""
from __future__ import annotations

import argparse
from typing import Any

from ..config import UserError, at_least
from . import launch
from .runner import submit_pipeline


def add_resource_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by `icehpc submit` and pipeline submission."""
    g = parser.add_argument_group("resources")
    g.add_argument("--executor", choices=["slurm", "local", "debug"], default="slurm",
                   help="slurm: sbatch via submitit; local: processes on this machine; debug: in-process")
    g.add_argument("--folder", default="runs/submitit", help="submitit log/pickle folder")
    g.add_argument("--nodes", type=at_least(1), default=1, help="nodes of the job (default 1)")
    g.add_argument("--tasks-per-node", type=at_least(1), default=1,
                   help="tasks (ranks) per node (default 1)")
    g.add_argument("--gpus-per-node", type=at_least(0), default=0, help="GPUs per node (default 0)")
    g.add_argument("--cpus-per-task", type=at_least(1), default=1, help="CPU cores per task (default 1)")
    g.add_argument("--time-min", type=at_least(1), default=60, help="wall-clock limit in minutes (default 60)")
    g.add_argument("--partition", default=None, help="Slurm partition (default: the cluster's default)")
    g.add_argument("--mem-gb", type=float, default=None, help="memory per node in GB (default: the cluster's "
                                                               "default)")


def resources(args: argparse.Namespace) -> dict[str, Any]:
    return dict(folder=args.folder, nodes=args.nodes, tasks_per_node=args.tasks_per_node,
                gpus_per_node=args.gpus_per_node, cpus_per_task=args.cpus_per_task,
                time_min=args.time_min, partition=args.partition, mem_gb=args.mem_gb)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.usage = "icehpc submit STAGE [resources] [--wait] -- [stage arguments]"
    parser.add_argument("target", metavar="STAGE", help="stage to run (or `pipeline`)")
    add_resource_arguments(parser)
    parser.add_argument("--wait", action="store_true", help="block until the job ends; exit with its status")
    parser.add_argument("stage_args", nargs=argparse.REMAINDER,
                        help="arguments for the stage, after -- (submit options may stand before the --)")


def split_stage_args(args: argparse.Namespace) -> list[str]:
    """Stage arguments after ``--``; submit options between STAGE and ``--`` are parsed into ``args``.

    argparse hands everything after STAGE to REMAINDER, so ``icehpc submit kappa --wait -- …`` would
    otherwise silently ignore ``--wait``. Options given before STAGE keep their values.
    """
    rest = list(args.stage_args)
    if "--" not in rest:
        return rest
    cut = rest.index("--")
    if cut:
        again = argparse.ArgumentParser(prog=f"icehpc submit {args.target}")
        add_resource_arguments(again)
        again.add_argument("--wait", action="store_true", default=args.wait)
        again.parse_args(rest[:cut], namespace=args)
    return rest[cut + 1:]


def _scheduler_error(exc: BaseException) -> str:
    """The last line sbatch printed (e.g. 'Could not establish a configuration source')."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def run(args: argparse.Namespace) -> int:
    import subprocess

    import submitit

    stage_args = split_stage_args(args)
    try:
        if args.target == "pipeline":
            jobs = submit_pipeline(stage_args, executor=args.executor, **resources(args))
        else:
            jobs = [launch.submit_stage(args.target, stage_args, executor=args.executor, **resources(args))]
    except (submitit.core.utils.FailedJobError, subprocess.CalledProcessError) as exc:
        raise UserError(f"could not submit to Slurm ({_scheduler_error(exc)}); is a Slurm controller reachable "
                        "(`sinfo`)? Without Slurm use --executor local, or run the stage directly") from exc
    for job in jobs:
        print(f"submitted job {job.job_id} (logs in {args.folder})")
    if args.wait:
        for job in jobs:
            job.results()  # raises with the remote traceback when a task failed
            print(f"job {job.job_id} finished: {job.state}")
    return 0
