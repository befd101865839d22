"""Every stage across two Slurm nodes (jobs/local-cluster.sh start --nodes 2: two slurmd, each in its
own network namespace, on a private bridge): MPI ranks on two hosts (κ, embed), DeepSpeed's gloo
rendezvous over TCP with the master taken from SLURM_JOB_NODELIST, USR2 → requeue → resume, the
submitit pipeline with --nodes 2, and a node lost in the middle of `embed`.

Kept small for 2 CPU cores: ~200 synthetic particles, a tiny backbone, a few pretraining steps."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from icehpc.analysis.embed import part_path
from icehpc.analysis.kappa import KappaConfig, run_kappa
from icehpc.analysis.store import open_store
from icehpc.data.format import shard_paths
from icehpc import config as cfgmod
from backbone_helpers import tiny_backbone
from kappa_helpers import cheap_groups, paper_meta, write_store
from slurm_helpers import TERMINAL, release_when_requeued
from slurm_helpers import sacct as _sacct, state as _state, wait_state as _wait_state

pytestmark = [pytest.mark.slurm, pytest.mark.multinode, pytest.mark.mpi]

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "jobs" / "local-cluster.sh"
TINY = "configs/pretrain-tiny-cpu.yaml"
CANVAS = 48


def _env(**extra: str) -> dict[str, str]:
    # ICEHPC_ROOT: the job scripts cd there and run this checkout's code on every node
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "ICEHPC_ROOT": str(ROOT), **extra}


def _run(cmd: list, timeout: float = 240) -> subprocess.CompletedProcess:
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                         env=_env())
    assert res.returncode == 0, f"{cmd}\nstdout:\n{res.stdout[-3000:]}\nstderr:\n{res.stderr[-3000:]}"
    return res


def _sbatch(mn: dict, log: Path, script: str, *args, wait: bool = True, timeout: float = 240,
            extra: tuple = ()) -> tuple[str, subprocess.CompletedProcess]:
    """sbatch -N 2 --ntasks-per-node 1 jobs/SCRIPT ARGS (with --wait: until the job ends)."""
    cmd = ["sbatch", "--parsable", *(["--wait"] if wait else []), "-p", mn["partition"], "-N", "2",
           "--ntasks-per-node", "1", "--cpus-per-task", "1", "-t", "10", f"--output={log}", *extra,
           str(ROOT / "jobs" / script), *[str(a) for a in args]]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=_env())
    return res.stdout.strip().split(";")[0], res


def _logs(folder: Path, pattern: str = "slurm-*.out") -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(folder.glob(pattern)))


def _assert_on_both_nodes(job: str, mn: dict) -> None:
    """The job's srun step (not the batch step) spanned two nodes."""
    steps = {r[0]: r for r in _sacct(job)}
    step = steps.get(f"{job}.0")
    assert step is not None, steps
    hosts = subprocess.run(["scontrol", "show", "hostnames", step[2]], capture_output=True, text=True,
                           timeout=30).stdout.split()
    assert step[3] == "2" and hosts == mn["nodes"][:2], steps


# ------------------------------------------------------------------------------------------- data
@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """200 synthetic particles in 5 shards of 40, built with the real CLI."""
    root = tmp_path_factory.mktemp("mn-data")
    cli = [sys.executable, "-m", "icehpc"]
    _run([*cli, "synth", "--out", root / "synth", "--n", "200", "--seed", "3", "--no-progress"])
    _run([*cli, "shards", "build", root / "synth" / "manifest.csv", "--out", root / "shards",
          "--shard-samples", "40", "--no-progress"])
    return root / "shards"


@pytest.fixture(scope="module")
def backbone(tmp_path_factory) -> Path:
    return tiny_backbone(tmp_path_factory.mktemp("mn-bb") / "b.safetensors")


@pytest.fixture(scope="module")
def one_process(shards, backbone, tmp_path_factory) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The store of one plain process: what the two-node runs must reproduce."""
    store = tmp_path_factory.mktemp("mn-one") / "s.h5"
    _run([sys.executable, "-m", "icehpc", "embed", shards, "--checkpoint", backbone, "--out", store,
          "--canvas", CANVAS])
    return _read(store)


def _read(store: Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    with open_store(store) as s:
        return s.read(0, s.n_rows)


# ------------------------------------------------------------------------------------------ tests
def test_cluster_nodes_are_separate_hosts(multinode, tmp_path):
    """One task per node: two hostnames, two addresses on the private subnet, and each node's own
    loopback (a rendezvous at localhost could not work here, so the tests below would notice one)."""
    res = _run(["srun", "-p", multinode["partition"], "-N", "2", "--ntasks-per-node", "1", "-t", "2", "bash", "-c",
                "echo $SLURM_PROCID $(hostname) $(ip -o -4 addr show scope global | awk '{print $4}')"], timeout=60)
    rows = sorted(line.split() for line in res.stdout.splitlines())
    assert [r[1] for r in rows] == multinode["nodes"][:2], rows
    addrs = [r[2] for r in rows]
    assert len(set(addrs)) == 2 and all(a.startswith(addrs[0].rsplit(".", 1)[0]) for a in addrs), rows


def test_kappa_two_nodes_equals_one_process(multinode, tmp_path):
    n = 9000
    emb, gid = cheap_groups(n, 16, 4, seed=1)
    store = write_store(tmp_path / "store", emb, paper_meta(n, gid, seed=1))
    job, res = _sbatch(multinode, tmp_path / "slurm-%j.out", "kappa.sh", store, "--out", tmp_path / "o",
                       "--bootstrap", "20")
    assert res.returncode == 0, res.stderr + _logs(tmp_path)
    two = json.loads((tmp_path / "o" / "kappa.json").read_text())
    assert two["run"]["ranks"] == 2
    _assert_on_both_nodes(job, multinode)
    one = run_kappa(store, tmp_path / "one", cfgmod.load(KappaConfig, None, ["bootstrap=20"]))
    rows1, rows2 = one["rows"], two["rows"]
    assert [(r["grouping"], r["group"]) for r in rows1] == [(r["grouping"], r["group"]) for r in rows2]
    for a, b in zip(rows1, rows2):
        for k, x in a.items():
            y = b[k]
            if isinstance(x, float) and isinstance(y, float) and not (np.isnan(x) and np.isnan(y)):
                assert abs(x - y) <= 1e-12 * abs(x), (k, a, b)
            elif not isinstance(x, float):
                assert x == y, (k, a, b)
    np.testing.assert_allclose(one["similarity"]["matrix"], two["similarity"]["matrix"], rtol=1e-12, atol=1e-15)


def test_embed_two_nodes_equals_one_process(multinode, shards, backbone, one_process, tmp_path):
    ref, ref_meta = one_process
    store = tmp_path / "s.h5"
    job, res = _sbatch(multinode, tmp_path / "slurm-%j.out", "embed.sh", shards, "--checkpoint", backbone,
                       "--out", store, "--canvas", CANVAS)
    assert res.returncode == 0, res.stderr + _logs(tmp_path)
    _assert_on_both_nodes(job, multinode)
    got, meta = _read(store)
    assert json.loads(Path(f"{store}.json").read_text())["ranks"] == 2
    assert meta["key"].tolist() == ref_meta["key"].tolist()
    for col in ref_meta:
        assert (meta[col] == ref_meta[col]).all() or np.allclose(meta[col], ref_meta[col], equal_nan=True), col
    # one shard is one rank's work, batched the same way: the same bits, not just close
    np.testing.assert_array_equal(got, ref)


def test_pretrain_two_nodes_gloo_usr2_requeue_resume(multinode, shards, tmp_path):
    out, log = tmp_path / "run", tmp_path / "slurm-%j.out"
    job, res = _sbatch(multinode, log, "pretrain.sh", "--config", ROOT / TINY, f"data.shards={shards}",
                       f"out={out}", "train.progress=false", "train.epochs=1", "train.checkpoint_every=100",
                       wait=False, timeout=30)
    assert res.returncode == 0, res.stderr
    metrics = out / "metrics.jsonl"
    try:
        deadline = time.time() + 150
        while not metrics.exists() or len(metrics.read_text().splitlines()) < 3:
            assert time.time() < deadline and _state(job) not in TERMINAL, _logs(tmp_path)[-4000:]
            time.sleep(0.3)
        subprocess.run(["scancel", "--batch", "--signal=USR2", job], check=True, timeout=30)
        release_when_requeued(job)
        state = _wait_state(job, lambda s: s in TERMINAL, timeout=180)
    finally:
        subprocess.run(["scancel", job], timeout=30)
    text = _logs(tmp_path)
    assert state == "COMPLETED", text[-4000:]
    # both ranks, on both nodes, met at the first node's address, named by SLURM_JOB_NODELIST
    first = multinode["nodes"][0]
    for rank, node in enumerate(multinode["nodes"][:2]):
        assert f"rank {rank}/2 on {node}: rendezvous {first}:" in text, text[-4000:]
    assert "rendezvous 127.0.0.1" not in text and "rendezvous localhost" not in text
    assert "requeueing job" in text and "SIGUSR2: checkpoint saved at step" in text and "resumed" in text
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(10))  # no step lost or run twice across the requeue
    assert all(np.isfinite(r["loss"]) for r in rows)
    assert (out / "backbone.safetensors").exists()
    _assert_on_both_nodes(job, multinode)


def test_submitit_pipeline_across_two_nodes(multinode, tmp_path, icehpc_cmd):
    out = tmp_path / "run"
    tiny = ["synth.n=160", "synth.seed=1", "shards.shard_samples=40", "real.archives=[]",
            "pretrain.overrides=[data.batch_size=8, data.batches_per_epoch=2, train.epochs=2, train.checkpoint_every=2]",
            "embed.batch_size=32", "kappa.overrides=[bootstrap=10]"]
    res = subprocess.run([*icehpc_cmd, "submit", "pipeline", "--nodes", "2", "--partition", multinode["partition"],
                          "--folder", str(tmp_path / "logs"), "--time-min", "15", "--wait", "--", "--config",
                          "configs/demo.yaml", "--out", str(out), *tiny],
                         capture_output=True, text=True, timeout=600, cwd=ROOT, env=_env())
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert (out / "science.json").exists()
    ids = [line.split()[2] for line in res.stdout.splitlines() if line.startswith("submitted job")]
    spread = [j for j in ids if any(r[0] == j and r[3] == "2" for r in _sacct(j))]
    names = {j: _sacct(j, "JobID,JobName")[0][1] for j in spread}
    # the parallel stages (DeepSpeed, MPI) each ran on both nodes
    assert {"icehpc-pretrain", "icehpc-embed", "icehpc-kappa"} <= set(names.values()), names
    logs = _logs(tmp_path / "logs", "*_0_log.err")
    assert f"rendezvous {multinode['nodes'][0]}:" in logs and "(submitit)" in logs
    store = next(out.rglob("*.h5.json"))
    summary = json.loads(store.read_text())
    assert summary["ranks"] == 2 and summary["rows"] == 160


def test_node_lost_mid_embed_then_rerun_is_complete(multinode, shards, one_process, tmp_path):
    """SIGKILL everything on node 2 (slurmd, slurmstepd, the MPI rank: a power loss) while `embed`
    runs; the node goes DOWN, the job fails with NODE_FAIL and is requeued; once the node is back
    the requeued job computes only the missing shards: no key twice, none missing."""
    _, ref_meta = one_process
    nodes = multinode["nodes"]
    store = tmp_path / "s.h5"
    # a slower model (ViT-S/16 at 64 px, random init) so the job can be caught half-way
    args = [shards, "--random-init", "--model", "vit_small_patch16_224", "--img-size", "64", "--batch-size", "5",
            "--out", store]
    job, res = _sbatch(multinode, tmp_path / "slurm-%j.out", "embed.sh", *args, wait=False, timeout=30)
    assert res.returncode == 0, res.stderr
    parts = [part_path(store, p) for p in shard_paths(shards)]
    killed = False
    try:
        deadline = time.time() + 240
        while not any(p.exists() for p in parts):
            assert time.time() < deadline and _state(job) not in TERMINAL, _logs(tmp_path)[-3000:]
            time.sleep(0.05)
        subprocess.run(["bash", CLUSTER, "node-kill", "2"], check=True, timeout=60, capture_output=True)
        killed = True
        done_at_kill = sum(p.exists() for p in parts)
        # what slurmctld would decide after SlurmdTimeout (30 s) of silence, now
        subprocess.run(["scontrol", "update", f"NodeName={nodes[1]}", "State=DOWN", "Reason=test-node-lost"],
                       check=True, timeout=30)
        _wait_state(job, lambda s: s in ("NODE_FAIL", "REQUEUED", "PENDING", "FAILED", "CANCELLED"), timeout=60)
        assert not Path(f"{store}.json").exists(), "the job finished before the node was lost"
        assert done_at_kill < len(parts), f"kill came after all {len(parts)} parts"
        subprocess.run(["bash", CLUSTER, "node-start", "2"], check=True, timeout=90, capture_output=True)
        killed = False
        queued = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True,
                                timeout=30).stdout.strip()
        if queued:  # requeued by Slurm (--requeue in embed.sh): start it now instead of after the back-off
            release_when_requeued(job)
            state = _wait_state(job, lambda s: s in TERMINAL - {"NODE_FAIL"} or s == "COMPLETED", timeout=240)
            rerun = job
        else:  # failed for good: the user's rerun is the same command
            rerun, res = _sbatch(multinode, tmp_path / "slurm-%j.out", "embed.sh", *args)
            state = _state(rerun)
    finally:
        if killed:
            subprocess.run(["bash", CLUSTER, "node-start", "2"], timeout=90)
        subprocess.run(["scancel", job], timeout=30)
    text = _logs(tmp_path)
    assert state == "COMPLETED", f"{state}\n{text[-4000:]}"
    _assert_on_both_nodes(rerun, multinode)
    _, meta = _read(store)
    keys = meta["key"].tolist()
    assert len(keys) == len(set(keys)), "a key occurs twice"
    assert sorted(keys) == sorted(ref_meta["key"].tolist()), "keys missing or extra"
    summary = json.loads(Path(f"{store}.json").read_text())
    assert summary["rows"] == len(ref_meta["key"]) and summary["shards_reused"] >= 1, summary
