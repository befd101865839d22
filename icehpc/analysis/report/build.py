"""The report's assembler: reads and cross-checks the inputs, asks each section (:mod:`.sections`)
for its html, downloads and warnings, and writes the page.

Outputs as a set: the report is built in a temporary folder inside OUT (``.report.tmp-PID/``); only
when every section succeeded are its files moved into OUT, ``index.html`` last, then ``report.json``
(:data:`CONTRACT`'s marker) seals them with the sha256 of every file and of every input. A failure
leaves the previous complete report as it was; files the previous report wrote that the new one
does not are removed, and nothing else in OUT (a user's ``final_figures.pdf``) is ever touched.
"""
from __future__ import annotations

import argparse
import hashlib
import html
import json
import os
import shutil
from pathlib import Path
from typing import Any

from ...contract import Contract, Status
from ...fileio import file_sha256, lock_dir
from ...fileio import write_atomic
from ...data.format import INDEX
from ...ssl.config import METRICS, RUN_CONFIG
from ..joins import kappa_store_mismatch, probe_store_mismatch
from . import backbone as backbone_summary
from . import label_efficiency, sections
from .common import CSS, MAP_SAMPLE, Page, ReportError

#: The page a user opens.
PAGE = "index.html"
#: report.json (written last) seals every file of the report; patterns: every name the report writes.
CONTRACT = Contract("report.json", (
    PAGE, "kappa_*.png", "kappa_*.svg", "kappa_*.pdf", "similarity.png", "similarity.svg", "similarity.pdf",
    "embedding_map.png", "embedding_map.svg", "embedding_map.pdf", "embedding_map.csv", "examples.csv",
    "confusion_*.png", "confusion_*.svg", "confusion_*.pdf", "pretrain_curves.png", "pretrain_curves.svg",
    "pretrain_curves.pdf", "kappa.csv", "similarity.csv", "kappa.json", "kappa_random_init.csv", "kappa.nc",
    "probe_summary.csv", "probe_summary_*.csv", METRICS, *label_efficiency.FILES, ".report.tmp-*"))
TMP_PREFIX = ".report.tmp-"


# ------------------------------------------------------------------------------------------ inputs
def load_kappa(src: Path) -> dict:
    if src.is_file():
        raise ReportError(f"{src} is a file; give the κ folder written by `icehpc kappa STORE --out KAPPA_DIR` "
                          f"(it holds kappa.json), e.g. `icehpc kappa {src} --out KDIR && icehpc report KDIR --out R`")
    try:
        res = json.loads((src / "kappa.json").read_text())
    except FileNotFoundError as exc:
        raise ReportError(f"{src}/kappa.json not found: run `icehpc kappa STORE --out {src}` first") from exc
    except ValueError as exc:
        raise ReportError(f"{src}/kappa.json is not valid JSON ({exc})") from exc
    if not isinstance(res, dict) or not isinstance(res.get("run"), dict) or not isinstance(res.get("rows"), list):
        raise ReportError(f"{src}/kappa.json is not the output of `icehpc kappa` (no rows/run sections)")
    return res


def load_json(path: Path, what: str, hint: str) -> dict:
    """A JSON object another stage wrote, or one line saying why it is not one."""
    try:
        data = json.loads(path.read_text())
    except UnicodeDecodeError:
        data = None
    except ValueError as exc:
        raise ReportError(f"{what} {path} is not valid JSON ({exc}); {hint}") from None
    except OSError as exc:
        raise ReportError(f"{what} {path} cannot be read ({exc.strerror or exc})") from None
    if not isinstance(data, dict):
        raise ReportError(f"{what} {path} is not a JSON object; {hint}")
    return data


def parse_real_probes(values: list[str] | None) -> dict[str, Path]:
    """``--real-probe NAME=DIR`` (repeatable) → {NAME: DIR}, or one line saying what is wrong."""
    out: dict[str, Path] = {}
    for value in values or []:
        name, sep, folder = value.partition("=")
        if not sep or not name.strip() or not folder:
            raise ReportError(f"--real-probe {value}: give NAME=DIR, e.g. --real-probe 2D-S=runs/demo/real/2ds/probe")
        if name in out:
            raise ReportError(f"--real-probe {name} is given twice")
        out[name] = Path(folder)
    return out


def load_real_probes(folders: dict[str, Path]) -> dict[str, tuple[Path, dict]]:
    """Each real archive's probe.json (the folder must hold one: these are not optional inputs)."""
    from ..probe import CONTRACT as PROBE_CONTRACT

    loaded = {}
    for name, folder in folders.items():
        marker = PROBE_CONTRACT.marker_path(folder)
        if not marker.is_file():
            raise ReportError(f"--real-probe {name}={folder}: no {marker.name} there; run `icehpc probe STORE "
                              f"--out {folder}` first")
        pj = load_json(marker, f"--real-probe {name}", "give the output folder of `icehpc probe`")
        if not isinstance(pj.get("results"), dict):
            raise ReportError(f"--real-probe {name}: {marker} is not the output of `icehpc probe` (no results)")
        loaded[name] = (folder, pj)
    return loaded


def check_joins(res: dict, ctl_res: dict | None, *, store: Path | None, pj: dict | None, probe: Path | None) -> None:
    """Refuse, in one line, inputs that belong to other runs: a store the κ run did not read, a
    random-init κ run over other samples, a probe of another store."""
    run = res["run"]
    if store is not None:
        why = kappa_store_mismatch(run, store, "--store")
        if why:
            raise ReportError(why)
    if ctl_res is not None and ctl_res["run"].get("n_rows") != run.get("n_rows"):
        raise ReportError(f"--random κ run covers {ctl_res['run'].get('n_rows')} rows but the κ run "
                          f"{run.get('n_rows')}: the control must embed the same samples")
    reference = store if store is not None else (Path(str(run["store"])) if run.get("store") else None)
    why = probe_store_mismatch(pj or {}, reference, f"--probe {probe}") if reference is not None else None
    if why:
        raise ReportError(why)


def _sha(path: Path | None) -> str:
    if path is None or not path.exists():
        return ""
    if path.is_dir():
        from ..store import MASTER_NAME

        path = path / MASTER_NAME
    return file_sha256(path) if path.is_file() else ""


def inputs_sha256(kappa_dir: Path, *, random: Path | None, planted: Path | None, store: Path | None,
                  shards: Path | None, probe: Path | None, pretrain: Path | None,
                  backbone: Path | None, real_probes: dict[str, Path] | None = None) -> dict[str, str]:
    """The content of every input file the report reads, by sha256 ("" when not given or absent)."""
    from ..probe import CONTRACT as PROBE_CONTRACT

    real = {f"real_probe {name}": _sha(PROBE_CONTRACT.marker_path(folder)) for name, folder in (real_probes or {}).items()}
    return {**real, "kappa": _sha(kappa_dir / "kappa.json"), "random": _sha(random / "kappa.json") if random else "",
            "planted": _sha(planted), "store": _sha(store),
            "shards": _sha(shards / INDEX) if shards else "",
            "probe": _sha(probe / "probe.json") if probe else "",
            "metrics": _sha(pretrain / METRICS) if pretrain else "",
            "pretrain_config": _sha(pretrain / RUN_CONFIG) if pretrain else "", "backbone": _sha(backbone)}


def fingerprint(inputs: dict[str, str], options: dict[str, Any]) -> str:
    blob = json.dumps({"inputs": inputs, "options": options}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------- page
def assemble(out: Path, res: dict, ctl: bool, parts: dict[str, sections.Section]) -> str:
    """index.html of the sections (warnings first, downloads last)."""
    rows, run, sim = res["rows"], res["run"], res.get("similarity")
    min_count = run["config"]["min_count"]
    page = Page(out)
    page.add(parts["backbone"].html)
    warnings = [w for s in parts.values() for w in s.warnings]
    groupings = {r["grouping"] for r in rows}
    flagged = [r for r in rows if r.get("flag")]
    page.add(f"<p class='summary'><b>{run['n_rows']:,}</b> embeddings of dimension <b>{run['dim']}</b> from "
             f"<code>{html.escape(str(run['store']))}</code>; {len(rows)} groups in {len(groupings)} groupings; "
             f"{len(flagged)} flagged; {run['rows_nonfinite']:,} non-finite and {run['rows_zero_norm']:,} "
             f"zero-norm rows skipped. κ is the concentration of L2-normalised embeddings around their "
             f"group mean direction: high κ = low habit diversity. Groups with fewer than {min_count} valid rows "
             "are not estimated." + (" The random-init backbone is drawn beside the trained one as a control: an "
                                     "ordering both share comes from image statistics, not from learning."
                                     if ctl else "") + "</p>")
    page.add(("<div class='warn'><b>Warnings</b><ul>" + "".join(f"<li>{html.escape(w)}</li>" for w in warnings)
              + "</ul></div>") if warnings else "<div class='ok'>No warnings.</div>")
    titled = [("kappa", "κ per group", "kappa"),
              ("similarity", f"Inter-class similarity ({(sim or {}).get('column')})", "similarity"),
              ("map", "Embedding map", "map"), ("examples", "Example images", "examples"),
              ("probe", "Probe results", "probe"), ("label_efficiency", "Label efficiency", "label-efficiency"),
              ("real", "Probes on real archives", "real"),
              ("pretraining", "Pretraining curves", "pretraining")]
    for key, title, anchor in titled:
        sec = parts.get(key)
        if sec is not None and (sec.html or key == "kappa"):
            page.h2(anchor, title)
            page.add(sec.html)
    page.h2("flagged", f"Flagged groups ({len(flagged)})")
    page.add("<p>Flags: <code>n&lt;min</code> too few rows (not estimated), <code>empty</code> no valid rows, "
             "<code>mle_outside_ci</code> the MLE's small-sample bias exceeds the CI, <code>ci_unstable</code> too "
             "few usable bootstrap replicates, <code>degenerate</code> identical directions (κ = inf).</p>")
    page.add(sections._table(flagged, ["grouping", "group", "n", "n_skipped", "kappa", "kappa_debiased", "ci_low",
                                       "ci_high", "flag"]) if flagged else "<p>None.</p>")
    page.add("<details><summary>table of every group (also kappa.csv)</summary>"
             + sections._table(rows, ["grouping", "group", "n", "rbar", "kappa", "kappa_debiased",
                                      "kappa_closed_form", "ci_low", "ci_high", "flag"]) + "</details>")
    page.h2("provenance", "Provenance")
    page.add(parts["provenance"].html)
    downloads = [d for s in parts.values() for d in s.downloads]
    page.h2("downloads", "Downloads")
    page.add("<ul>" + "".join(f"<li><a href='{html.escape(f)}'>{html.escape(f)}</a>: {html.escape(d)}</li>"
                              for f, d in downloads) + "</ul>")
    nav = "<nav>" + "".join(f"<a href='#{a}'>{html.escape(t)}</a>" for a, t in page.toc) + "</nav>"
    return ("<!doctype html><html lang='en'><head><meta charset='utf-8'><title>icehpc κ report</title>"
            f"<style>{CSS}</style></head><body><h1>vMF concentration (κ) report</h1>{nav}"
            + "\n".join(page.parts) + "</body></html>\n")


def _sections(tmp: Path, res: dict, ctl_res: dict | None, *, src: Path, random: Path | None,
              planted_data: dict | None, store: Path | None, shards: Path | None, pj: dict | None,
              probe: Path | None, pretrain: Path | None, header: dict[str, str], spec: dict,
              real: dict[str, tuple[Path, dict]], backbone: Path | None, backbone_sha256: str, map_sample: int,
              examples: int) -> dict[str, sections.Section]:
    from .common import _plt

    plt = _plt()
    run, sim = res["run"], res.get("similarity")
    label = (sim or {}).get("column") or run["config"].get("similarity_by") or "habit"
    probes = {**({f"this store ({pj.get('label', '')})": pj} if pj is not None else {}),
              **{name: rpj for name, (_, rpj) in real.items()}}
    parts = {"backbone": backbone_summary.section(header, spec, pretrain, probes),
             "warnings": sections.kappa_warnings(res),
             "kappa": sections.kappa_figures(plt, tmp, res, ctl_res, planted_data),
             "copies": sections.kappa_copies(tmp, src, random, ctl_res),
             "netcdf": sections.netcdf(tmp, res, ctl_res),
             "similarity": sections.similarity(plt, tmp, sim)}
    if store is not None:
        x, meta, n_rows, parts["store"] = sections.store_sample(store, label, map_sample)
        parts["map"] = sections.embedding_map(plt, tmp, x, meta, n_rows, label)
        if shards is not None:
            parts["examples"] = sections.examples(tmp, shards, x, meta, label,
                                                  run.get("bins", {}).get("temperature_c"), examples)
    if pj is not None and probe is not None:
        parts["probe"] = sections.probe(tmp, probe, pj)
        parts["label_efficiency"] = label_efficiency.section(tmp, probe, pj)
    if real:
        parts["real"] = sections.real_probes(tmp, real)
    if pretrain is not None and (pretrain / METRICS).exists():
        parts["pretraining"] = sections.pretraining(plt, tmp, pretrain)
    parts["provenance"] = sections.provenance(run, store=store, shards=shards, pretrain=pretrain, backbone=backbone,
                                              backbone_sha256=backbone_sha256)
    return parts


def build_report(kappa_dir: str | os.PathLike, out_dir: str | os.PathLike, *, random: str | os.PathLike | None = None,
                 planted: str | os.PathLike | None = None, store: str | os.PathLike | None = None,
                 shards: str | os.PathLike | None = None, probe: str | os.PathLike | None = None,
                 pretrain: str | os.PathLike | None = None, backbone: str | os.PathLike | None = None,
                 real_probes: dict[str, str | os.PathLike] | None = None,
                 map_sample: int = MAP_SAMPLE, examples: int = 5) -> Path:
    """Read ``kappa_dir``/kappa.json (+ the optional inputs), check that they belong together, and
    write figures, CSVs, kappa.nc, index.html and report.json into ``out_dir`` as one set.
    ``real_probes``: name of a real archive (e.g. 2D-S) → its `icehpc probe` folder."""
    src, out = Path(kappa_dir), Path(out_dir)
    given = lambda p: Path(p) if p and Path(p).exists() else None  # noqa: E731 (absent inputs: sections left out)
    random_p, planted_p, store_p, shards_p = (Path(random) if random else None), given(planted), given(store), given(shards)
    probe_p, pretrain_p, backbone_p = given(probe), given(pretrain), given(backbone)
    res = load_kappa(src)
    ctl_res = load_kappa(random_p) if random_p else None
    planted_data = load_json(planted_p, "--planted", "give synth's planted.json") if planted_p else None
    pj = None
    if probe_p is not None and (probe_p / "probe.json").exists():
        pj = load_json(probe_p / "probe.json", "--probe", "give the output folder of `icehpc probe`")
    check_joins(res, ctl_res, store=store_p, pj=pj, probe=probe_p)
    real_p = {name: Path(folder) for name, folder in (real_probes or {}).items()}
    real = load_real_probes(real_p)
    options = {"map_sample": map_sample, "examples": examples}
    inputs = inputs_sha256(src, random=random_p, planted=planted_p, store=store_p, shards=shards_p, probe=probe_p,
                           pretrain=pretrain_p, backbone=backbone_p, real_probes=real_p)
    header, spec = backbone_summary.read_header(backbone_p), backbone_summary.store_backbone(store_p)
    backbone_summary.check_backbone(spec, backbone_p, inputs["backbone"], f"--store {store_p}")
    for name, (folder, rpj) in real.items():
        backbone_summary.check_real_probe(name, folder, rpj, backbone_p, inputs["backbone"])
    with lock_dir(out, "report folder"):
        for stale in out.glob(TMP_PREFIX + "*"):  # left by a killed report (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = out / f"{TMP_PREFIX}{os.getpid()}"
        tmp.mkdir()
        try:
            parts = _sections(tmp, res, ctl_res, src=src, random=random_p, planted_data=planted_data,
                              store=store_p, shards=shards_p, pj=pj, probe=probe_p, pretrain=pretrain_p,
                              header=header, spec=spec, real=real, backbone=backbone_p,
                              backbone_sha256=inputs["backbone"], map_sample=map_sample,
                              examples=examples)
            write_atomic(tmp / PAGE, assemble(tmp, res, ctl_res is not None, parts), durable=False)
            _commit(out, tmp, {"report": {"fingerprint": fingerprint(inputs, options), "inputs_sha256": inputs,
                                          "options": options, "kappa_dir": str(src)}})
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out / PAGE


def _commit(out: Path, tmp: Path, record: dict) -> None:
    """Move the finished set from ``tmp`` into ``out`` (index.html last), drop what the previous
    report wrote and this one did not, and seal the set with report.json."""
    old = CONTRACT.read(out) or {}
    CONTRACT.marker_path(out).unlink(missing_ok=True)  # no seal while the set changes
    names = sorted(p.name for p in tmp.iterdir() if p.is_file() and p.name != "index.html") + ["index.html"]
    for name in names:
        os.replace(tmp / name, out / name)
    for rel in (old.get("outputs") or {}):
        if rel not in names and CONTRACT.owns(rel) and "/" not in rel:
            (out / rel).unlink(missing_ok=True)
    CONTRACT.seal(out, record, names)


def status(args: argparse.Namespace) -> Status:
    """Whether ``icehpc report`` with ``args`` would find its report complete and current (read-only):
    report.json verifies (every file as sealed) and records the sha256 of the inputs given now."""
    out = Path(args.out)
    record = CONTRACT.verify(out)
    if record is None:
        return Status(False, f"{out / CONTRACT.marker} missing, incomplete or changed")
    p = lambda v: Path(v) if v and Path(v).exists() else None  # noqa: E731
    want = fingerprint(inputs_sha256(Path(args.kappa_dir), random=Path(args.random) if args.random else None,
                                     planted=p(args.planted), store=p(args.store), shards=p(args.shards),
                                     probe=p(args.probe), pretrain=p(args.pretrain), backbone=p(args.backbone),
                                     real_probes=parse_real_probes(args.real_probe)),
                       {"map_sample": MAP_SAMPLE, "examples": 5})
    if (record.get("report") or {}).get("fingerprint") != want:
        return Status(False, "an input of the report changed since it was written")
    return Status(True, f"up to date (fingerprint {want})")
