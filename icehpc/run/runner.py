"""Running a plan: locally step by step, through submitit, or as data for ``jobs/pipeline.sh``.

Locally (:func:`run_pipeline`) each pending step (:func:`icehpc.run.steps.evaluate`) is prepared
(its own stale files removed, its record written) and run; a step that ends without its stage
saying "done" stops the pipeline; a Ctrl-C stops the running step and the pipeline in one line
(:func:`run_step`), and the same command resumes. ``--plan`` (:func:`print_plan`) only prints: the
pending steps with the reason each would run, as text or as NUL-separated fields for
``jobs/pipeline.sh``, whose step jobs each call ``icehpc pipeline … --prepare-step NAME``
(:func:`prepare_step`) when they start.
"""
from __future__ import annotations

import codecs
import contextlib
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Sequence

from ..analysis.science import print_science, write_science
from ..config import UserError
from ..progress import use_bar
from .plan import PipelineConfig, plan
from .stages import Stopped, stage as stage_info, stop_signal
from .steps import Step, evaluate


def _step_env(step: Step) -> dict[str, str]:
    """Threads: the cores shared among the step's processes (mpiexec/torchrun leave this unset).
    Progress: bars when this process writes to a terminal (the step's stderr is a pipe to it)."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // max(step.ranks, 1))))
    if use_bar():
        env.setdefault("ICEHPC_PROGRESS", "1")
    return env


def _relay(src: Any, muted: threading.Event) -> None:
    """Copy a step's stderr to ours as it comes (bars' carriage returns too), dropping it once muted."""
    text = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for chunk in iter(lambda: os.read(src.fileno(), 1 << 16), b""):
        if not muted.is_set():
            sys.stderr.write(text.decode(chunk))
            sys.stderr.flush()


def run_step(step: Step) -> int:
    """Run a step's command; its exit code. The step runs in a session of its own, its stderr
    relayed through this process, so a Ctrl-C (or SIGTERM) reaches this process only: it passes the
    signal on to the step, drops what the step prints from then on (each launcher's and rank's
    account of the stop: tracebacks, torchrun's warnings), waits for it to end (a second Ctrl-C
    kills it) and raises :class:`~icehpc.run.stages.Stopped` naming the step: one line in all."""
    proc = subprocess.Popen(step.command(), env=_step_env(step), stderr=subprocess.PIPE, start_new_session=True)
    muted = threading.Event()
    relay = threading.Thread(target=_relay, args=(proc.stderr, muted), daemon=True)
    relay.start()
    try:
        code = proc.wait()
    except KeyboardInterrupt as exc:
        muted.set()
        signum = stop_signal(exc)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signum)
        while proc.poll() is None:
            try:
                proc.wait()
            except KeyboardInterrupt:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
        raise Stopped(signum, f"during step {step.name}") from None
    relay.join(timeout=10)  # EOF once the step and its ranks are gone
    return code


def _say_removed(step: Step, gone: list[Path]) -> None:
    if gone:
        print(f"[pipeline] {step.name}: removed {len(gone)} stale file(s) of its stage (other files kept)",
              file=sys.stderr, flush=True)


def run_pipeline(cfg: PipelineConfig, out: str | os.PathLike, min_count: int = 20) -> dict[str, Any]:
    """Run every pending step, in order; then write and print science.json."""
    o = Path(out).resolve()
    o.mkdir(parents=True, exist_ok=True)
    steps = plan(cfg, o)
    evaluate(steps)
    start = time.perf_counter()
    reran: set[str] = set()
    for step in steps:
        if not step.pending and not any(a in reran for a in step.after):
            print(f"[pipeline] {step.name}: done ({step.done}), skipped", flush=True)
            continue
        print(f"[pipeline] {step.name}: runs, {step.why or 'upstream step(s) rerun'}", flush=True)
        _say_removed(step, step.prepare())
        cmd = step.command()
        print(f"[pipeline] {step.name}: {shlex.join(cmd)}", flush=True)
        t = time.perf_counter()
        code = run_step(step)
        if code != 0:
            raise UserError(f"step {step.name} failed with exit code {code} (its messages are above); fix and "
                            f"rerun the same command to continue from this step. Command: {shlex.join(cmd)}")
        if not step.is_done():
            raise RuntimeError(f"step {step.name} ended without a complete output ({step.status().why})")
        reran.add(step.name)
        print(f"[pipeline] {step.name}: {time.perf_counter() - t:.1f} s", flush=True)
    return finish(o, steps, min_count, time.perf_counter() - start)


def finish(out: Path, steps: list[Step], min_count: int, seconds: float | None = None) -> dict[str, Any]:
    """Check every step's output, write science.json and say where the report is."""
    missing = [s.name for s in steps if not s.is_done()]
    if missing:
        raise RuntimeError(f"pipeline outputs missing for steps {missing}; rerun the pipeline")
    by_name = {s.name: s for s in steps}
    synth = by_name.get("synth")
    kappa_dirs = {"trained": by_name["kappa-trained"].owns[0].folder, "random_init": by_name["kappa-random"].owns[0].folder}
    science = write_science(out, synth.done if synth else None, kappa_dirs,
                            {s.name: s.done for s in steps if s.stage == "probe"}, min_count)
    print("[pipeline] science checks (also in science.json):")
    print_science(science)
    from ..analysis.report.build import PAGE

    took = f" in {seconds:.0f} s" if seconds is not None else ""
    print(f"[pipeline] finished{took}. Report: {by_name['report'].done.parent / PAGE}  "
          f"(probes: {by_name['probe'].done}, science: {out / 'science.json'})", flush=True)
    return science


def prepare_step(cfg: PipelineConfig, out: str | os.PathLike, name: str) -> list[Path]:
    """What a submitted step's job does first (one process, before its ranks start): remove its
    stage's files of a run with another record and record this one (:meth:`Step.prepare`)."""
    steps = {s.name: s for s in plan(cfg, Path(out).resolve())}
    if name not in steps:
        raise UserError(f"--prepare-step {name}: no such step in this plan (steps: {', '.join(steps)})")
    gone = steps[name].prepare()
    _say_removed(steps[name], gone)
    return gone


def submit_pipeline(stage_args: Sequence[str], executor: str = "slurm", *, folder: str | Path = "runs/submitit",
                    nodes: int = 1, tasks_per_node: int = 1, gpus_per_node: int = 0, cpus_per_task: int = 1,
                    time_min: int = 60, partition: str | None = None, mem_gb: float | None = None) -> list[Any]:
    """Submit the pending steps of ``icehpc pipeline STAGE_ARGS`` through submitit, chained afterok.

    Single-process steps get one task. Parallel steps (MPI, torch.distributed) get the plan's rank
    count on one node, unless ``nodes`` or ``tasks_per_node`` is given (> 1): then every parallel
    step runs on ``nodes`` × ``tasks_per_node`` tasks. ``gpus_per_node`` goes to the stages the
    stage table marks as GPU stages. The last job runs :func:`finish` (checks every output, writes
    science.json). Steps already complete are not submitted; a submitted step's stale files are
    removed at submission (its own files only). Returns the jobs in submission order.
    """
    import argparse

    from .. import config as cfglib
    from . import launch
    from .plan import add_arguments, config_from_args

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
    for step in evaluate(steps):
        print(f"[pipeline] {step.name}: submitted, {step.why}", file=sys.stderr, flush=True)
        _say_removed(step, step.prepare())
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


def print_plan(steps: list[Step], out: Path, fmt: str = "text") -> None:
    """Print the pending steps; writes nothing. Each step's reason goes to stderr.

    ``text``: ``# out=DIR``, then one tab-separated line per pending step: name, ranks, launcher
    kind, the steps it waits for (``-``: none) and the shell-quoted ``STAGE ARGV`` (for reading).
    ``nul``: NUL-terminated fields, for ``jobs/pipeline.sh`` (no field is ever parsed as shell):
    ``out``, DIR; then per pending step ``step``, name, ranks, launcher, waits-for (comma-separated,
    ``-``: none), the argv length N, then N fields: STAGE and its arguments."""
    pending = evaluate(steps)
    for step in pending:
        print(f"[pipeline] {step.name}: would run, {step.why}", file=sys.stderr, flush=True)
    if not pending:
        print("[pipeline] every step is done; nothing would run", file=sys.stderr, flush=True)
    if fmt == "nul":
        fields = ["out", str(out)]
        for step in pending:
            argv = [step.stage, *step.argv]
            fields += ["step", step.name, str(step.ranks), step.launcher, ",".join(step.after) or "-",
                       str(len(argv)), *argv]
        if any("\0" in f for f in fields):
            raise UserError("a path or argument holds a NUL byte; it cannot be passed to a job")
        sys.stdout.buffer.write(b"".join(f.encode("utf-8", "surrogateescape") + b"\0" for f in fields))
        sys.stdout.flush()
        return
    print(f"# out={out}")
    for step in pending:
        # "-" for no dependency: bash `read` would merge two adjacent tabs and shift the fields
        print("\t".join([step.name, str(step.ranks), step.launcher, ",".join(step.after) or "-",
                         shlex.join([step.stage, *step.argv])]))
