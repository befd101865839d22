"""``icehpc embed``: [CLS] embeddings of every sample of a shard folder, MPI-parallel, resumable.

Each MPI rank (mpiexec, ``srun --mpi=pmix``, or one plain process) takes its shards from
:func:`icehpc.data.assign_shards`, runs the backbone on the evaluation transform (decode on the
canvas, resize to the model's input size, the pretraining normalisation; no augmentation) under
``torch.inference_mode`` (bf16 autocast on GPU, fp32 on CPU) and writes ONE store part per shard,
atomically: ``STORE.parts/<shard>.h5`` with the [CLS] token after the final norm and every metadata
column of the shard samples plus ``key``. A restarted job therefore recomputes only the shards whose
part is missing. After a barrier rank 0 writes the master ``STORE`` (virtual datasets over the
parts, :func:`icehpc.analysis.store.write_master`) and checks that its row count equals ``index.json``'s
total and that no key occurs twice. ``STORE.parts/embed.json`` pins the model of the parts, so parts
of a different model are never mixed into one store, and each part records the sha256 of its shard
(from ``index.json``) and the model's digest: a part whose shard was rebuilt since, or that another
model wrote, is recomputed, never reused. Rank 0 holds the lock of ``STORE.parts`` for the whole job:
a second job on the same store stops at once naming the holder, and the temporaries a killed job
left there are removed. Ctrl-C keeps the finished parts (one line: :func:`icehpc.run.stages.run_stage`).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import config as cfglib
from ..config import field
from ..data.format import NUMERIC_COLUMNS, STRING_COLUMNS
from ..contract import Contract, Status
from ..fileio import LockedError, file_sha256, check_output_path, write_atomic
from ..ssl.export import DEFAULT_ARCH, BackboneSpec, backbone_spec, build_backbone



@dataclass
class EmbedConfig:
    arch: str | None = field(None, help=f"timm architecture (default: from the exported file, else {DEFAULT_ARCH})")
    img_size: int | None = field(None, help="model input side (default: from the exported file, else 224)", ge=1)
    canvas: int | None = field(None, help="decode canvas side (default: the export header's pretraining canvas, "
                                          "else the input side)", ge=1)
    framing: str | None = field(None, help="particle framing none | bbox (default: the export header's, as in "
                                           "pretraining; else none)")
    batch_size: int = field(64, help="images per forward pass", ge=1)
    workers: int | None = field(None, help="decode workers per rank (default: 0 on CPU, 6 on GPU)", ge=0)
    seed: int = field(0, help="seed of the random-init backbone", ge=0)

    def validate(self) -> None:
        if self.framing not in (None, "none", "bbox"):
            raise ValueError(f"framing must be none or bbox, got {self.framing!r}")



def check_backbone_file(flag: str, path: str | None) -> None:
    """A missing file or a folder (e.g. a pretraining run folder) given as a backbone: say what to give."""
    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        from ..ssl.checkpoint import checkpoint_root

        hint = (f"; it is a pretraining run folder: use {p / 'backbone.safetensors'}"
                if (p / "backbone.safetensors").is_file() else
                f"; export one with `icehpc export {p} --out BACKBONE.safetensors`" if checkpoint_root(p).is_dir()
                else "")
        raise cfglib.UserError(f"{flag} {path} is a folder, not a backbone file{hint}")
    if not p.is_file():
        raise cfglib.UserError(f"{flag} {path} does not exist (an exported .safetensors from `icehpc export`, "
                               "or a timm/DINO checkpoint file)")


def eval_transform(images, img_size: int, mean: float, std: float, dtype):
    """uint8 [B, 1, canvas, canvas] → normalised float [B, 1, img_size, img_size] (no augmentation)."""
    import torch.nn.functional as F

    x = images.to(dtype) / 255.0
    if x.shape[-1] != img_size:
        x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", antialias=True, align_corners=False)
    return (x - mean) / std


# --------------------------------------------------------------------------- metadata columns
def _is_number(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def meta_columns(metas: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Per-sample JSON dicts → one array per column (float64 or str), plus ``key`` and ``shard``.

    Numbers with gaps become NaN; strings with gaps become ""; nested values are stored as JSON.
    """
    names = sorted({k for m in metas for k in m if not k.startswith("__")})
    columns: dict[str, np.ndarray] = {
        "key": np.array([m["__key__"] for m in metas], dtype=str),
        "shard": np.array([m["__shard__"] for m in metas], dtype=str),
    }
    for name in names:
        values = [m.get(name) for m in metas]
        numeric = name in NUMERIC_COLUMNS or (name not in STRING_COLUMNS and all(_is_number(v) for v in values)
                                              and any(v is not None for v in values))
        if numeric:
            columns[name] = _float_or_nan(values)
        else:
            columns[name] = np.array(["" if v is None else v if isinstance(v, str) else json.dumps(v)
                                      for v in values], dtype=str)
    return columns


def _float_or_nan(values: list[Any]) -> np.ndarray:
    """float64 column; None and non-numeric values (the shard builder's missing values) → NaN."""
    out = np.full(len(values), np.nan)
    for i, v in enumerate(values):
        try:
            out[i] = float(v)
        except (TypeError, ValueError):
            pass
    return out


# --------------------------------------------------------------------------- the job
def parts_dir(store: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(store)}.parts")


def part_path(store: str | os.PathLike, shard: str) -> Path:
    return parts_dir(store) / (Path(shard).name.split(".")[0] + ".h5")


#: What makes two embeddings of one image comparable: a part records the digest of these
#: (:func:`model_digest`) and is recomputed when any differs (another framing included).
MODEL_KEYS = ("backbone", "seed", "canvas", "framing")
#: Of those, what a store's parts folder is pinned to: another backbone, seed or canvas into the
#: same ``--out`` is refused (a different model's store); another framing recomputes every part.
PIN_KEYS = ("backbone", "seed", "canvas")


def model_digest(manifest: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps({k: manifest[k] for k in MODEL_KEYS}, sort_keys=True).encode()).hexdigest()


def contract(store: str | os.PathLike) -> Contract:
    """The output contract of one store ``STORE`` (in its folder): the marker ``STORE.json``
    (written last: the run's summary, its fingerprint and every file's sha256), the master and
    every file under ``STORE.parts/``."""
    name = Path(store).name
    return Contract(f"{name}.json", (name, f"{name}.parts/*"))


def store_fingerprint(manifest: dict[str, Any], index_sha256: str) -> str:
    """What the whole store depends on: the model (:data:`MODEL_KEYS`, the framing included) and
    the shard build it embedded (the sha256 of its index.json, which lists every shard's sha256)."""
    blob = json.dumps({"model": {k: manifest[k] for k in MODEL_KEYS}, "index_sha256": index_sha256}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _pin_run(store: Path, manifest: dict[str, Any]) -> None:
    """Create STORE.parts/embed.json, or check that existing parts came from the same model.

    The shard folder may change between runs (rebuilt shards): parts are pinned to their shard's
    sha256 one by one and recomputed where it differs, so only the record of the inputs is updated."""
    path = parts_dir(store) / "embed.json"
    if path.exists():
        old = json.loads(path.read_text())
        diff = sorted(k for k in PIN_KEYS if old.get(k) != manifest[k])
        if diff:
            raise ValueError(f"{parts_dir(store)} holds parts of a different run (differs in {diff}); "
                             "use another --out or delete that folder")
        if old == manifest:
            return
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(manifest, indent=2) + "\n")


def _drop_temporaries(store: Path) -> None:
    """Remove the temporaries a killed job left in STORE.parts (SIGKILL: no cleanup ran). Rank 0
    holds the lock, so no other job is writing them."""
    for tmp in parts_dir(store).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def part_is_current(part: Path, shard_sha256: str, model: str) -> bool:
    """True when ``part`` exists and records this shard content and this model (else recompute it)."""
    if not part.exists():
        return False
    import h5py

    try:
        with h5py.File(part, "r") as f:
            return f.attrs.get("shard_sha256") == shard_sha256 and f.attrs.get("model") == model
    except OSError:
        return False


def embed_shards(shard_paths: list[str], shard_counts: dict[str, int], store: Path, spec: BackboneSpec, *,
                 seed: int, canvas: int, batch_size: int, num_workers: int, device: str,
                 shard_sha256: dict[str, str] | None = None, model_id: str = "",
                 progress: str | None = None, framing: str | None = None) -> dict[str, Any]:
    """Embed the given shards of this rank, one atomic part per shard; returns timing counters.

    A part is reused only when it records the shard's sha256 (``shard_sha256``, from index.json)
    and ``model_id`` (:func:`model_digest`); any other part is recomputed. ``progress``: the label
    of a progress bar / periodic log line of this rank's images (None: quiet). ``framing``: the
    particle framing (default: the backbone's, from its export header).
    """
    import torch

    from ..data.loader import ordered_loader
    from ..progress import Progress
    from .store import write_part

    sha = shard_sha256 or {}
    todo = [p for p in shard_paths
            if not part_is_current(part_path(store, p), sha.get(Path(p).name, ""), model_id)]
    stats = {"shards_done": len(shard_paths) - len(todo), "shards_computed": 0, "images": 0, "seconds": 0.0}
    if not todo:
        return stats
    model = build_backbone(spec, seed).to(device)
    on_gpu = device.startswith("cuda")
    pending: dict[str, tuple[list[np.ndarray], list[dict]]] = {}
    start = time.perf_counter()
    total = sum(shard_counts[Path(p).name] for p in todo)
    def route(cls: Any, metas: list[dict], event: Any = None) -> None:
        if event is not None:  # the non-blocking copy of this batch has landed in host memory
            event.synchronize()
            cls = cls.numpy()
        # Batches from several loader workers interleave shards: route rows by their shard.
        for row, meta in zip(cls, metas):
            name = meta["__shard__"]
            embeddings, rows = pending.setdefault(name, ([], []))
            embeddings.append(row)
            rows.append(meta)
            if len(rows) == shard_counts[name]:
                write_part(part_path(store, name), np.stack(embeddings).astype(np.float32), meta_columns(rows),
                           attrs={"shard_sha256": sha.get(name, ""), "model": model_id})
                del pending[name]
                stats["shards_computed"] += 1
        stats["images"] += len(metas)
        bar.update(len(metas))

    # On a GPU the [CLS] rows of batch i are copied to pinned host memory without blocking and read
    # (after their event) while batch i+1 runs, so the device never waits for the host; on a CPU the
    # same loop runs with no copy and no event.
    in_flight = None
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_gpu), \
            Progress(total, progress or "embed", "images", enabled=progress is not None) as bar:
        for images, metas in ordered_loader(todo, batch_size=batch_size, canvas=canvas, num_workers=num_workers,
                                            framing=framing or spec.framing, margin=spec.framing_margin,
                                            device=device):  # on a GPU: pinned, windows enlarged there
            x = eval_transform(images, spec.img_size, spec.mean, spec.std, torch.float32)  # on the device
            cls = model.forward_features(x)[:, 0].float()
            event = None
            if on_gpu:
                host = torch.empty(cls.shape, dtype=cls.dtype, pin_memory=True)
                host.copy_(cls, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
                cls = host
            if in_flight is not None:
                route(*in_flight)
            if event is not None:
                in_flight = (cls, metas, event)
                continue
            in_flight = None
            route(cls.numpy(), metas)
        if in_flight is not None:
            route(*in_flight)
    stats["seconds"] = time.perf_counter() - start
    if pending:
        raise RuntimeError(f"shards ended early: {({k: len(v[1]) for k, v in pending.items()})} samples read "
                           f"vs index counts {({k: shard_counts[k] for k in pending})}; run "
                           "`icehpc shards verify` on the shard folder")
    return stats


def finalize_store(store: Path, shard_names: list[str], expected_rows: int) -> tuple[int, int]:
    """Write the master over all parts (index order), check row count and key uniqueness.

    Returns (rows, embedding dimension).
    """
    from .store import open_store, write_master

    parts = [part_path(store, name) for name in shard_names]
    missing = [str(p) for p in parts if not p.exists()]
    if missing:
        raise RuntimeError(f"{len(missing)} store parts missing after all ranks finished: {missing[:3]}")
    write_master(str(store), [str(p) for p in parts])
    with open_store(str(store)) as opened:
        if opened.n_rows != expected_rows:
            raise RuntimeError(f"{store}: {opened.n_rows} rows but index.json lists {expected_rows} samples")
        _, meta = opened.read(0, opened.n_rows, columns=["key"], embeddings=False)
        keys, counts = np.unique(meta["key"], return_counts=True)
        if len(keys) != opened.n_rows:
            raise RuntimeError(f"{store}: keys occur more than once, e.g. {keys[counts > 1][:3].tolist()}; "
                               "the shards hold duplicate sample keys")
        return opened.n_rows, opened.dim


def resolve(shard_dir: str, *, checkpoint: str | None, arch: str | None, img_size: int | None,
            canvas: int | None, seed: int, like: str | None, framing: str | None) -> tuple[dict, BackboneSpec, dict]:
    """(index.json, backbone spec, run manifest) of an embedding run: canvas and framing default
    to the export header's (as pretraining decoded). Reads headers only (no torch)."""
    from ..data.format import read_index

    index = read_index(shard_dir)
    counts = {Path(s["name"]).name: int(s["samples"]) for s in index["shards"] if s["samples"] > 0}
    spec = backbone_spec(checkpoint, arch, img_size, seed, like=like)
    canvas = canvas or spec.canvas or spec.img_size
    framing = framing or spec.framing
    manifest = {"backbone": asdict(spec), "seed": seed, "canvas": canvas, "framing": framing,
                "shards": str(Path(shard_dir).resolve()), "shard_counts": counts}
    return index, spec, manifest


def _index_sha256(shard_dir: str) -> str:
    from ..data.format import INDEX

    return file_sha256(Path(shard_dir) / INDEX)


def status(args: argparse.Namespace) -> Status:
    """Would ``icehpc embed ARGS`` find its store complete and current? Read-only: the store's
    marker must record this model (framing included) and this shard build, and every file it
    lists (master, parts) must still match."""
    cfg = cfglib.from_args(EmbedConfig, args)
    store = Path(args.out)
    con = contract(store)
    if con.read(store.parent) is None:
        return Status(False, f"no output yet ({con.marker_path(store.parent)})")
    try:
        _, _, manifest = resolve(args.shards, checkpoint=args.checkpoint, arch=cfg.arch, img_size=cfg.img_size,
                                 canvas=cfg.canvas, seed=cfg.seed, like=args.like, framing=cfg.framing)
        fp = store_fingerprint(manifest, _index_sha256(args.shards))
    except (OSError, ValueError, KeyError) as exc:
        return Status(False, f"its inputs cannot be read yet ({exc})")
    if con.verify(store.parent, fp) is not None:
        return Status(True, f"up to date (fingerprint {fp})")
    old = (con.read(store.parent) or {}).get("fingerprint")
    if old != fp:
        return Status(False, f"backbone, framing or shards changed (fingerprint {old} → {fp})")
    return Status(False, "a file of the store changed or is missing since its marker was sealed")


def _torch_threads(local_world: int) -> None:
    """One rank per core share when the launcher left OMP_NUM_THREADS unset (mpiexec does)."""
    import torch

    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // max(local_world, 1)))


def run_embed(shard_dir: str, store: str, *, checkpoint: str | None, random_init: bool, arch: str | None,
              img_size: int | None, canvas: int | None, batch_size: int, num_workers: int | None,
              seed: int = 0, like: str | None = None, framing: str | None = None,
              provenance: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The whole MPI job (every rank calls this); returns the summary on rank 0, None elsewhere."""
    with contextlib.ExitStack() as held:  # the store lock, released however the job ends
        return _run_embed(shard_dir, store, checkpoint=checkpoint, random_init=random_init, arch=arch,
                          img_size=img_size, canvas=canvas, batch_size=batch_size, num_workers=num_workers,
                          seed=seed, like=like, framing=framing, held=held, provenance=provenance)


def _run_embed(shard_dir: str, store: str, *, checkpoint: str | None, random_init: bool, arch: str | None,
               img_size: int | None, canvas: int | None, batch_size: int, num_workers: int | None,
               seed: int, like: str | None, framing: str | None, held: contextlib.ExitStack,
               provenance: dict[str, Any] | None) -> dict[str, Any] | None:
    import torch

    from .. import dist
    from ..data.format import shard_paths
    from ..data.loader import assign_shards

    if bool(checkpoint) == bool(random_init):
        raise ValueError("give exactly one of --checkpoint PATH and --random-init")
    if like and checkpoint:
        raise ValueError("--like only goes with --random-init (a checkpoint's header already says its shape)")
    for flag, path in (("--checkpoint", checkpoint), ("--like", like)):
        check_backbone_file(flag, path)
    check_output_path(parts_dir(store), f"--out {store}: its parts folder")  # every rank alike, no collective yet
    comm = dist.mpi_comm()
    rank, world = comm.Get_rank(), comm.Get_size()
    env = dist.from_env()
    store_path = Path(store)
    try:
        index, spec, manifest = resolve(shard_dir, checkpoint=checkpoint, arch=arch, img_size=img_size,
                                        canvas=canvas, seed=seed, like=like, framing=framing)
        index_sha256 = _index_sha256(shard_dir)
        paths = shard_paths(shard_dir)
        counts = manifest["shard_counts"]
        shas = {Path(s["name"]).name: str(s.get("sha256", "")) for s in index["shards"]}
        canvas, framing = manifest["canvas"], manifest["framing"]
        # one job per store: rank 0 holds the lock of STORE.parts until the end
        dist.lock_on_root(comm, held, parts_dir(store_path), "embedding store")
        dist.run_on_root(comm, lambda: _pin_run(store_path, manifest))
        dist.run_on_root(comm, lambda: _drop_temporaries(store_path))
        device = f"cuda:{env.local_rank % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu"
        if device == "cpu":
            _torch_threads(env.local_world_size)
        workers = num_workers if num_workers is not None else (0 if device == "cpu" else 6)
        mine = assign_shards(paths, rank, world)
        stats = embed_shards(mine, counts, store_path, spec, seed=seed, canvas=canvas, batch_size=batch_size,
                             num_workers=workers, device=device, shard_sha256=shas, model_id=model_digest(manifest),
                             framing=framing,
                             progress=f"embed rank 0/{world}" if world > 1 and rank == 0 else
                             ("embed" if rank == 0 else None))
    except LockedError:
        raise  # every rank got the same answer from rank 0
    except Exception:  # one failing rank must not leave the others waiting in the barrier forever
        if world > 1:
            traceback.print_exc()
            sys.stderr.flush()
            comm.Abort(1)
        raise
    all_stats = comm.gather(stats, root=0)
    comm.Barrier()
    summary = None
    if rank == 0:
        con = contract(store_path)
        folder = store_path.resolve().parent
        con.marker_path(folder).unlink(missing_ok=True)  # no seal while the master is rewritten
        rows, dim = finalize_store(store_path, list(counts), int(index["totals"]["written"]))
        computed = sum(s["images"] for s in all_stats)
        wall = max(s["seconds"] for s in all_stats)
        summary = {"store": str(store_path), "rows": rows, "dim": dim,
                   "ranks": world, "device": device,
                   "shards": len(counts), "shards_reused": sum(s["shards_done"] for s in all_stats),
                   "images_computed": computed, "seconds": wall,
                   "images_per_s": computed / wall if computed and wall > 0 else None, "backbone": asdict(spec),
                   "framing": framing, "canvas": canvas,
                   "fingerprint": store_fingerprint(manifest, index_sha256),
                   "shards_index_sha256": index_sha256, "shards_fingerprint": index.get("fingerprint"),
                   "config": provenance}
        files = [store_path, parts_dir(store_path) / "embed.json", *(part_path(store_path, n) for n in counts)]
        sealed = con.seal(folder, summary, [f.resolve() for f in files])
        summary = {k: v for k, v in sealed.items() if k != "outputs"}
    comm.Barrier()
    return summary


# --------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("shards", help="shard folder (with index.json) from `icehpc shards build`")
    weights = parser.add_mutually_exclusive_group(required=True)
    weights.add_argument("--checkpoint", help="exported backbone (.safetensors from `icehpc export`) or any "
                                              "local timm/DINO/iBOT checkpoint")
    weights.add_argument("--random-init", action="store_true", help="a seeded random-init backbone (baseline)")
    parser.add_argument("--out", required=True, help="master store file; parts go to OUT.parts/")
    parser.add_argument("--like", help="with --random-init: an exported backbone whose architecture, input "
                                       "size and normalisation to copy (its weights are not used)")
    cfglib.add_config_arguments(parser, EmbedConfig, {
        "--model": "arch", "--img-size": "img_size", "--canvas": "canvas", "--framing": "framing",
        "--batch-size": "batch_size", "--workers": "workers", "--seed": "seed"})


def run(args: argparse.Namespace) -> int:
    cfg = cfglib.from_args(EmbedConfig, args)
    summary = run_embed(args.shards, args.out, checkpoint=args.checkpoint, random_init=args.random_init,
                        arch=cfg.arch, img_size=cfg.img_size, canvas=cfg.canvas, batch_size=cfg.batch_size,
                        num_workers=cfg.workers, seed=cfg.seed, like=args.like, framing=cfg.framing,
                        provenance=cfglib.provenance(args, cfg))
    if summary is not None:
        rate = summary["images_per_s"]
        print(f"embedded {summary['rows']} samples ({summary['dim']}-d, {summary['shards']} shards, "
              f"{summary['shards_reused']} reused) on {summary['ranks']} rank(s): "
              f"{f'{rate:.1f} img/s' if rate is not None else 'nothing to compute'} → {summary['store']}")
    return 0
