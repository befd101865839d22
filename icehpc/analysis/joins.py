"""Joins checked by content: a stage that reads another run's output refuses one that merely
shares key names with its own inputs.

Each sample carries the sha256 of its source image (``source_sha256``: a shard sample's JSON and
the store's meta column of the same name). Two outputs describe the same samples when every key
they share names the same source; a κ run names its store by a fingerprint of the store's content
(:func:`icehpc.analysis.kappa.fingerprint`); a probe records the sha256 of the store it scored.
Every check here returns None when the inputs match, else one line saying what differs (the caller
raises it as a :class:`~icehpc.config.UserError`: one line, exit 2).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

SOURCE = "source_sha256"  # the provenance column shared by shards (sample JSON) and stores (meta)


def samples_digest(pairs: Iterable[tuple[str, str]]) -> str:
    """sha256 of the sorted (key, source sha256) pairs: which samples, by content, an output holds."""
    h = hashlib.sha256()
    for key, src in sorted(pairs):
        h.update(f"{key}\t{src}\n".encode())
    return h.hexdigest()


def source_mismatch(what: str, mine: Mapping[str, str], theirs: Mapping[str, str], *, need_all: bool = True) -> str | None:
    """Why ``theirs`` (key → source sha256 of another run's output) does not hold the samples of
    ``mine``: a key missing (when ``need_all``) or a key whose source image differs. Empty source
    values (hand-written stores without provenance) are not compared."""
    missing = [k for k in mine if k not in theirs]
    if need_all and missing:
        return (f"{what} is missing {len(missing)} of the {len(mine)} samples (first: {missing[:3]}); "
                "give the output built from the same samples")
    differ = [k for k, s in mine.items() if k in theirs and s and theirs[k] and s != theirs[k]]
    if differ:
        return (f"{what} holds other images under {len(differ)} of the same keys (source_sha256 differs, first: "
                f"{differ[:3]}): it was built from another data set; give the matching one")
    return None


def probe_store_mismatch(probe_json: Mapping[str, Any], store_path: str | os.PathLike, what: str) -> str | None:
    """Why the probe (``probe.json``) did not score the store at ``store_path`` as it is now: the
    store's sha256 differs from the one it recorded. None when they match or nothing is recorded."""
    from .store import open_store

    recorded = (probe_json.get("inputs_sha256") or {}).get("store")
    if not recorded or not Path(store_path).exists():
        return None
    with open_store(store_path, verify=False) as store:
        if store.sha256 == recorded:
            return None
        return (f"{what} scored another store than {store_path} is now (store sha256 {recorded[:12]}… then, "
                f"{store.sha256[:12]}… now): rerun `icehpc probe` on it")


def kappa_store_mismatch(kappa_run: Mapping[str, Any], store_path: str | os.PathLike, what: str = "--store") -> str | None:
    """Why the κ run (``kappa.json``'s ``run`` section) was not computed from the store at
    ``store_path``: another row count or dimension, or another file whose content does not give the
    κ run's fingerprint. The same file that κ read is accepted."""
    from .. import config as cfglib
    from . import kappa as kp
    from .store import open_store

    with open_store(store_path) as store:
        if (kappa_run.get("n_rows"), kappa_run.get("dim")) != (store.n_rows, store.dim):
            return (f"{what} {store_path} holds {store.n_rows} rows of dimension {store.dim} but the κ run was "
                    f"computed from {kappa_run.get('store')} ({kappa_run.get('n_rows')} rows, {kappa_run.get('dim')}-d)")
        recorded = kappa_run.get("fingerprint")
        try:
            same_content = recorded is not None and kp.fingerprint(
                store, cfglib._build(kp.KappaConfig, dict(kappa_run.get("config") or {}))) == recorded
        except Exception:  # an older or newer kappa.json layout: fall back to the path below
            same_content = False
        same_file = kappa_run.get("store") is not None and Path(str(kappa_run["store"])).resolve() == store.path.resolve()
    if same_content or same_file:
        return None
    return (f"{what} {store_path} is not the store the κ run read ({kappa_run.get('store')}; its content does "
            "not give the κ run's fingerprint): give the store the κ folder was computed from")
