"""The top of the report: which backbone made these embeddings, how long and on what it was
pretrained, with which recipe, and how well its embeddings tell the classes apart.

Read from the exported file's header (``--backbone``: arch, timm kwargs, input side, step), the
pretraining run (``--pretrain``: config.yaml for the data and the recipe, metrics.jsonl for the last
step) and the store's record of the backbone that embedded it (``--store``; a random-init store has
no weights file and says so). :func:`check_backbone` refuses a ``--backbone`` that did not embed the
store, :func:`check_real_probe` a real-archive probe of another backbone or of a changed store.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ...data.format import INDEX, read_index
from ...ssl.config import METRICS, RUN_CONFIG
from .common import ReportError, Section, _finite, _table
from .sections import METHODS, RANDOM, TRAINED, _fmt_ms, _metric


def store_backbone(store: Path | None) -> dict[str, Any]:
    """The ``backbone`` record (:class:`icehpc.ssl.export.BackboneSpec`) of the embedding run that
    wrote ``store`` ({} when the store or its record is not there)."""
    if store is None:
        return {}
    from ..embed import contract
    from ..store import MASTER_NAME

    path = store / MASTER_NAME if store.is_dir() else store
    found = (contract(path).read(path.parent) or {}).get("backbone")
    return found if isinstance(found, dict) else {}


def read_header(backbone: Path | None) -> dict[str, str]:
    """The exported backbone's header (:func:`icehpc.ssl.export.read_metadata`), or one line."""
    if backbone is None:
        return {}
    from ...ssl.export import read_metadata

    try:
        return read_metadata(backbone)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise ReportError(f"--backbone {backbone} is not a readable .safetensors export ({exc}); give the "
                          "file `icehpc export` or `icehpc pretrain` wrote") from None


def check_backbone(spec: dict[str, Any], backbone: Path | None, backbone_sha: str, what: str) -> None:
    """``what`` (the store, or a real archive's probe) must have been embedded by ``--backbone``."""
    if backbone is None or not spec:
        return
    recorded = spec.get("weights_sha256") or ""
    if recorded != backbone_sha:
        by = f"weights sha256 {recorded[:12]}…" if recorded else str(spec.get("weights"))
        raise ReportError(f"{what} was embedded by another backbone ({by}) than --backbone {backbone} "
                          f"(sha256 {backbone_sha[:12]}…): give the backbone that embedded it, or re-embed")


def check_real_probe(name: str, folder: Path, pj: dict, backbone: Path | None, backbone_sha: str) -> None:
    """A real archive's probe must be complete (its seal verifies), of the store as it is now, and of
    embeddings by ``--backbone``."""
    from ..joins import probe_store_mismatch
    from ..probe import CONTRACT as PROBE_CONTRACT

    what = f"--real-probe {name}={folder}"
    if PROBE_CONTRACT.verify(folder) is None:
        raise ReportError(f"{what}: {PROBE_CONTRACT.marker} does not verify (incomplete or changed); rerun "
                          "`icehpc probe` there")
    store = (pj.get("inputs") or {}).get(TRAINED)
    if not store or not Path(store).exists():
        return
    why = probe_store_mismatch(pj, store, what)
    if why:
        raise ReportError(why)
    check_backbone(store_backbone(Path(store)), backbone, backbone_sha, f"{what} (store {store})")


def read_pretrain(pretrain: Path | None) -> tuple[dict[str, Any], int | None]:
    """(resolved pretraining config, last step logged in metrics.jsonl) of ``--pretrain``."""
    if pretrain is None:
        return {}, None
    cfg: dict[str, Any] = {}
    if (pretrain / RUN_CONFIG).exists():
        import yaml

        try:
            loaded = yaml.safe_load((pretrain / RUN_CONFIG).read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ReportError(f"--pretrain {pretrain}/config.yaml is not valid YAML ({exc}); give the run folder "
                              "of `icehpc pretrain`") from None
        cfg = loaded if isinstance(loaded, dict) else {}
    from .pretraining import read_metrics

    steps = [r["step"] for r in read_metrics(pretrain / METRICS) if isinstance(r.get("step"), int)] \
        if (pretrain / METRICS).exists() else []
    return cfg, (steps[-1] if steps else None)


def _shards_text(shards: str) -> str:
    """What a pretraining shard set holds, from its shard index (images, sources, label column)."""
    try:
        index = read_index(shards)
    except (OSError, ValueError):
        return f"{shards} ({INDEX} not readable here)"
    totals, inputs = index.get("totals") or {}, index.get("inputs") or []
    sources = ", ".join(f"{i.get('name')} ({i.get('files', 0):,} files)" for i in inputs if isinstance(i, dict))
    written = totals.get("written")
    return (f"{written:,} images" if isinstance(written, int) else "images") + (f" from {sources}" if sources else "") \
        + f"; shards {shards}"


def summary_rows(header: dict[str, str], spec: dict[str, Any], cfg: dict[str, Any],
                 last_step: int | None) -> list[dict[str, str]]:
    """(item, value) rows of the backbone summary."""
    rows: list[dict[str, str]] = []
    arch = header.get("arch") or spec.get("arch") or (cfg.get("model") or {}).get("arch")
    try:
        kw = json.loads(header["timm_kwargs"]) if "timm_kwargs" in header else dict(spec.get("timm_kwargs") or {})
    except ValueError:
        kw = {}
    kw = {**((cfg.get("model") or {}).get("arch_kwargs") or {}), **kw}
    random_init = bool(spec) and not spec.get("weights_sha256")  # no weights file: seeded random init
    if arch:
        shape = [f"patch {kw['patch_size']} px" if "patch_size" in kw else "",
                 f"embed dim {kw['embed_dim']}" if "embed_dim" in kw else "",
                 f"depth {kw['depth']}" if "depth" in kw else "", f"{kw['num_heads']} heads" if "num_heads" in kw else ""]
        size = header.get("input_size") or spec.get("img_size")
        canvas = header.get("input_canvas") or spec.get("canvas")
        seen = (f"; embeds {size}-px inputs" if size else "") + (f" from a {canvas}-px canvas" if canvas else "") \
            + (f" ({header.get('input_framing') or spec.get('framing')} framing)"
               if header.get("input_framing") or spec.get("framing") else "")
        rows.append({"item": "backbone", "value": f"{arch} ({', '.join(s for s in shape if s) or 'timm defaults'}){seen}"})
    if random_init:
        rows.append({"item": "weights", "value": f"{spec.get('weights')}: random initialisation, no pretraining "
                                                 "(the embeddings show what the architecture alone does)"})
        return rows
    if not rows and not cfg:
        return [{"item": "backbone", "value": "not recorded (give --backbone, --pretrain or --store)"}]
    step = header.get("step")
    train, data = cfg.get("train") or {}, cfg.get("data") or {}
    if step or last_step is not None:
        planned = (f" of {float(train['epochs']) * int(data['batches_per_epoch']):g} planned "
                   f"({train['epochs']:g} epochs × {data['batches_per_epoch']} steps each)"
                   if _finite(train.get("epochs")) and isinstance(data.get("batches_per_epoch"), int) else
                   (f" ({train['epochs']:g} epochs configured)" if _finite(train.get("epochs")) else ""))
        rows.append({"item": "trained", "value": f"{int(step) if step else last_step + 1:,} steps" + planned})
    if data.get("shards"):
        rows.append({"item": "pretrained on", "value": _shards_text(str(data["shards"]))})
    model, loss, optim = cfg.get("model") or {}, cfg.get("loss") or {}, cfg.get("optim") or {}
    if model or loss:
        recipe = ["iBOT-vMF" if loss.get("vmf", True) else "iBOT (no vMF normaliser)",
                  f"K = {model['n_prototypes']:,} prototypes" if isinstance(model.get("n_prototypes"), int) else "",
                  f"KoLeo weight {loss['lambda_koleo']:g}" + (" (off)" if not loss["lambda_koleo"] else "")
                  if _finite(loss.get("lambda_koleo")) else "",
                  f"batch {data['batch_size']} per rank" if isinstance(data.get("batch_size"), int) else "",
                  f"seed {train['seed']}" if isinstance(train.get("seed"), int) else "",
                  f"lr {optim['lr']:g} per 256 images" if _finite(optim.get("lr")) else ""]
        rows.append({"item": "recipe", "value": ", ".join(r for r in recipe if r)})
    return rows


def probe_headline(probes: dict[str, dict]) -> list[dict[str, str]]:
    """Per probed data set: balanced accuracy (mean ± sd over splits) of the trained backbone, of
    random init and of the geometric baseline, per method."""
    rows = []
    for where, pj in probes.items():
        res = pj.get("results") or {}
        row = {"probe data": where, "classes": str(len(pj.get("classes") or []))}
        for method, name in METHODS.items():
            for rep, label in ((TRAINED, "trained"), (RANDOM, "random init")):
                m = (res.get(rep) or {}).get(method)
                row[f"{name} {label}"] = _fmt_ms(*_metric(m, "balanced_accuracy")) if isinstance(m, dict) else "–"
        geo = (res.get("geometric") or {}).get("logreg")
        row["geometric LR"] = _fmt_ms(*_metric(geo, "balanced_accuracy")) if isinstance(geo, dict) else "–"
        rows.append(row)
    return rows


def section(header: dict[str, str], spec: dict[str, Any], pretrain: Path | None,
            probes: dict[str, dict]) -> Section:
    """The summary box at the top of the page (``probes``: data-set name → probe.json)."""
    rows = summary_rows(header, spec, *read_pretrain(pretrain))
    text = "<div class='summary'><b>Backbone</b>" + _table(rows, ["item", "value"])
    headline = probe_headline(probes)
    if headline:
        cols = ["probe data", "classes", *(f"{m} {r}" for m in METHODS.values() for r in ("trained", "random init")),
                "geometric LR"]
        text += ("<b>How well it tells the classes apart</b>: balanced accuracy of probes on the embeddings "
                 "(kNN: cosine nearest neighbours, LR: logistic regression; geometric: contour features, no "
                 "network), mean ± sd over splits; details below." + _table(headline, cols))
    return Section(text + "</div>")
