"""Shared by the Slurm test modules: reading a job's state from accounting, and releasing a requeued job.

`sbatch --wait` returns when slurmctld sees the job end, but slurmdbd records it a moment later: a
`sacct` read right then can still say PENDING or RUNNING. Every end-state check goes through
`final_state`, which polls accounting until the job has a terminal state."""
from __future__ import annotations

import subprocess
import time

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
            "BOOT_FAIL", "DEADLINE"}


def sacct(job: str, fields: str = "JobID,State,NodeList,NNodes") -> list[list[str]]:
    """All accounting rows of JOB (job and steps), split on '|'."""
    out = subprocess.run(["sacct", "-j", job, "-n", "-P", "-o", fields], capture_output=True, text=True,
                         timeout=30).stdout
    return [line.split("|") for line in out.splitlines() if line.strip()]


def state(job: str) -> str:
    """The job's own state (not a step's) as accounting has it now; UNKNOWN before it is recorded."""
    rows = [r for r in sacct(job, "JobID,State") if r[0] == job]
    return rows[-1][1].split()[0] if rows else "UNKNOWN"


def wait_state(job: str, done, timeout: float) -> str:
    """Poll until ``done(state)``; the state that satisfied it."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        now = state(job)
        if done(now):
            return now
        time.sleep(0.5)
    raise AssertionError(f"job {job} still {state(job)} after {timeout} s")


def final_state(job: str, timeout: float = 60) -> tuple[str, str]:
    """(State, ExitCode) of JOB once accounting records it as ended."""
    wait_state(job, lambda s: s in TERMINAL, timeout)
    rows = [r for r in sacct(job, "JobID,State,ExitCode") if r[0] == job]
    return rows[-1][1].split()[0], rows[-1][2]


def release_when_requeued(job: str, timeout: float = 120) -> None:
    """Slurm holds a requeued job back ~2 min (its begin time moves); start it now, as an admin
    would, so a test does not sit out the back-off."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        queued = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True,
                                timeout=30).stdout.strip()
        if queued == "PENDING":
            # releasing while slurmd still tears down the old steps revokes the new credential
            # ("Job credential revoked") and fails the job: wait until no step of it is left
            while subprocess.run(["squeue", "-h", "-s", "-j", job], capture_output=True, text=True,
                                 timeout=30).stdout.strip() and time.time() < deadline:
                time.sleep(0.3)
            time.sleep(2.0)
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True, timeout=30)
            return
        assert queued, f"job {job} left the queue instead of being requeued"
        time.sleep(0.3)
    raise AssertionError(f"job {job} was not requeued within {timeout} s")
