"""YAML configs → typed dataclasses, with dotted command-line overrides.

Each stage declares its schema as (nested) dataclasses whose fields carry defaults and a
``metadata={"help": ...}``; that schema is the single source of truth for defaults, types and
documentation (``icehpc STAGE --help`` lists it). Unknown keys and values of the wrong type raise
:class:`ConfigError` naming the dotted key, before any work starts.

Config files: a path as given, else a file of that name among the configs shipped with the package
(``configs/`` of the checkout, installed as the package data ``icehpc.configs``); a ``--config`` that
is neither is an error. Without ``--config`` a stage runs on its schema's built-in defaults.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Sequence, TypeVar

import yaml

T = TypeVar("T")


def shipped_configs() -> Path:
    """The folder of the YAML files shipped with icehpc: the checkout's ``configs/`` when this
    package is imported from a checkout, else the installed package data ``icehpc.configs``."""
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "setup.cfg").is_file() and (checkout / "configs").is_dir():
        return checkout / "configs"
    from importlib.resources import files

    return Path(str(files("icehpc.configs")))


class UserError(ValueError):
    """A mistake in a command line or its inputs (a missing file, a wrong column): the CLI prints the
    message as one line and exits 2, no traceback. The message says what was wrong and what to do."""


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the dotted key and what to do."""


def find_config(name: str | Path) -> Path:
    """``name`` as a path if it exists, else the shipped config of that file name; else ConfigError."""
    p = Path(name)
    if p.is_file():
        return p.resolve()
    if p.exists():
        raise ConfigError(f"config {name} is not a file")
    shipped = shipped_configs()
    if p.parent == Path(".") and (shipped / p.name).is_file():
        return shipped / p.name
    known = ", ".join(sorted(f.name for f in shipped.glob("*.yaml")))
    raise ConfigError(f"config file {name} does not exist (shipped configs: {known})")


#: Bounds on what a config can make icehpc read or build (a hostile or mistyped config must fail
#: with one line before it eats memory): the bytes of a config file and of one override value, the
#: nodes of a YAML document after expanding its aliases, and the nesting depth, nodes and string
#: length of a free-form value (a ``dict[str, Any]`` such as ``model.arch_kwargs``).
MAX_CONFIG_BYTES = 1 << 20
MAX_OVERRIDE_BYTES = 64 << 10
MAX_YAML_NODES = 100_000
MAX_FREEFORM_DEPTH = 16
MAX_FREEFORM_NODES = 10_000
MAX_FREEFORM_STR = 64 << 10


def _expanded_nodes(root: yaml.Node, what: str) -> int:
    """Nodes of a composed YAML document with every alias expanded (what loading builds); a
    ConfigError beyond :data:`MAX_YAML_NODES` (an alias bomb) or for a recursive alias."""
    memo: dict[int, int] = {}
    active: set[int] = set()

    def size(node: yaml.Node, depth: int) -> int:
        key = id(node)
        if key in memo:
            return memo[key]
        if key in active:
            raise ConfigError(f"{what}: a YAML alias refers to itself (recursive structure); write the value out")
        if depth > 100:
            raise ConfigError(f"{what}: YAML nested deeper than 100 levels")
        active.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            children: list = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [x for pair in node.value for x in pair]
        else:
            children = []
        for child in children:
            total += size(child, depth + 1)
            if total > MAX_YAML_NODES:
                break
        active.discard(key)
        memo[key] = total
        if total > MAX_YAML_NODES:
            raise ConfigError(f"{what}: YAML expands to more than {MAX_YAML_NODES} values (aliases '*name' "
                              "repeating anchors); write the values out")
        return total

    return size(root, 0)


def safe_yaml(text: str, what: str) -> Any:
    """``yaml.safe_load`` of a config text, bounded: at most :data:`MAX_CONFIG_BYTES` bytes,
    :data:`MAX_YAML_NODES` values once aliases are expanded, 100 levels deep. ``what`` names the
    file or override in the ConfigError."""
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{what}: {size} bytes, more than a config may hold ({MAX_CONFIG_BYTES} bytes)")
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is None:
            return None
        _expanded_nodes(node, what)
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what}: not valid YAML: {' '.join(str(exc).split())}") from exc
    except RecursionError:
        raise ConfigError(f"{what}: YAML nested too deeply") from None


def _check_freeform(value: Any, key: str) -> Any:
    """A free-form (``Any``) config value: numbers, true/false, null, strings, and lists/mappings
    (string keys) of them, at most :data:`MAX_FREEFORM_DEPTH` deep and :data:`MAX_FREEFORM_NODES`
    values in all; finite numbers only."""
    count = 0

    def walk(v: Any, where: str, depth: int) -> None:
        nonlocal count
        count += 1
        if count > MAX_FREEFORM_NODES:
            raise ConfigError(f"{key}: more than {MAX_FREEFORM_NODES} values in a free-form setting")
        if depth > MAX_FREEFORM_DEPTH:
            raise ConfigError(f"{where}: nested deeper than {MAX_FREEFORM_DEPTH} levels")
        if v is None or isinstance(v, (bool, int)):
            return
        if isinstance(v, float):
            if not math.isfinite(v):
                raise ConfigError(f"{where}: {v!r} is not a finite number")
            return
        if isinstance(v, str):
            if len(v) > MAX_FREEFORM_STR:
                raise ConfigError(f"{where}: a string of {len(v)} characters (at most {MAX_FREEFORM_STR})")
            return
        if isinstance(v, (list, tuple)):
            for i, x in enumerate(v):
                walk(x, f"{where}[{i}]", depth + 1)
            return
        if isinstance(v, dict):
            for k, x in v.items():
                if not isinstance(k, str):
                    raise ConfigError(f"{where}: key {k!r} is not a string")
                walk(x, f"{where}.{k}", depth + 1)
            return
        raise ConfigError(f"{where}: {type(v).__name__} values are not allowed here "
                          "(numbers, true/false, null, strings, lists and mappings)")

    walk(value, key, 0)
    return value


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, key: str, finite: bool = True) -> Any:
    """Check/convert one YAML value against a type hint; raise ConfigError naming ``key``.
    ``finite``: floats must be finite (a field allows NaN/inf with ``field(..., nonfinite=True)``)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return _check_freeform(value, key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, finite)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _build(tp, value, key)
    if origin in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{key}[{i}]", finite) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        vt = args[1] if len(args) == 2 else Any
        if vt is Any:
            _check_freeform(value, key)
        return {k: _coerce(v, vt, f"{key}.{k}", finite) for k, v in value.items()}
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        out = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                out = float(value)
            except OverflowError:
                raise ConfigError(f"{key}: {value} is too large for a number") from None
        elif isinstance(value, str):  # YAML reads "1e-4" (no dot) as a string
            try:
                out = float(value)
            except ValueError:
                pass
        if out is None:
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if finite and not math.isfinite(out):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return out
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def _build(cls: type[T], data: dict, prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            where = f"{prefix}.{k}" if prefix else k
            raise ConfigError(f"unknown config key '{where}' (known at this level: {sorted(names)})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            key = f"{prefix}.{f.name}" if prefix else f.name
            kwargs[f.name] = _coerce(data[f.name], hints[f.name], key, not f.metadata.get("nonfinite", False))
            _check_range(kwargs[f.name], f, key)
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if callable(check):
        try:
            check()
        except ValueError as exc:
            culprits = _culprits(cls, kwargs)
            where = ""
            if culprits:  # name the key(s) the user set that the check refuses, whatever its message says
                where = " (refused: " + ", ".join(f"{prefix + '.' if prefix else ''}{k}={kwargs[k]!r}"
                                                  for k in culprits) + ")"
            raise ConfigError(f"{prefix or 'config'}: {exc}{where}") from exc
    return obj


def _culprits(cls: type, kwargs: dict[str, Any]) -> list[str]:
    """The keys set in ``kwargs`` whose value alone makes ``cls.validate`` fail: those for which
    putting back the default passes it (none when no single key does)."""
    out = []
    for name in kwargs:
        try:
            cls(**{k: v for k, v in kwargs.items() if k != name}).validate()
        except Exception:  # noqa: BLE001 - still failing without it: not (only) this key
            continue
        out.append(name)
    return out


def _check_range(value: Any, f: dataclasses.Field, key: str) -> None:
    """The bounds a field declares (``field(..., ge=1, le=10_000)``), on the value or on every item
    of a list; the message names the key, the bound and the value."""
    lo, hi = f.metadata.get("ge"), f.metadata.get("le")
    if lo is None and hi is None:
        return
    items = value if isinstance(value, (list, tuple)) else [value]
    for v in items:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        if lo is not None and v < lo:
            raise ConfigError(f"{key}: must be ≥ {lo}, got {v}")
        if hi is not None and v > hi:
            raise ConfigError(f"{key}: must be ≤ {hi}, got {v}")


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{p}' is not a section")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=value`` → (``a.b``, YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    if len(raw.encode("utf-8", "surrogatepass")) > MAX_OVERRIDE_BYTES:
        raise ConfigError(f"override '{key}': value longer than {MAX_OVERRIDE_BYTES} bytes; put it in a --config file")
    value = safe_yaml(raw, f"override '{key}'") if raw.strip() else ""
    return key, value


def load(cls: type[T], path: str | Path | None = None, overrides: Iterable[str] = ()) -> T:
    """Build ``cls`` from defaults, then the YAML file at ``path``, then ``key.sub=value`` overrides."""
    data: dict = {}
    if path is not None:
        p = find_config(path)
        size = p.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"config file {p}: {size} bytes, more than a config may hold ({MAX_CONFIG_BYTES} bytes)")
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError) as exc:
            raise ConfigError(f"config file {p}: cannot read it as UTF-8 text ({exc})") from None
        loaded = safe_yaml(text, f"config file {p}") or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p}: top level must be a mapping")
        data = loaded
    for ov in overrides:
        key, value = parse_override(ov)
        _set_dotted(data, key, value)
    return _build(cls, data)


def to_dict(obj: Any) -> dict:
    """Dataclass config → plain dict (for JSON provenance and checkpoints)."""
    return dataclasses.asdict(obj)


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """Flatten a schema into (dotted key, type, default, help) rows, for --help and the README."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if _is_dataclass_type(tp):
            rows.extend(describe(tp, key + "."))
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = None
        rows.append((key, type_name(tp), default, f.metadata.get("help", "")))
    return rows


def type_name(tp: Any) -> str:
    """A type hint as --help shows it: ``int``, ``str | None``, ``one of: auto, keep, invert``."""
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "one of: " + ", ".join(show(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "None"
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _plain(value: Any) -> Any:
    """A config value as YAML data: dataclasses become mappings, tuples lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def show(value: Any) -> str:
    """A config value on one line as a user writes it in a YAML config or a ``key=value`` override
    (``[a, b]``, ``{temperature_c: {edges: [-70.0, 0.0]}}``, ``null``, ``''``), for --help."""
    text = yaml.safe_dump(_plain(value), default_flow_style=True, sort_keys=False, width=1 << 30,
                          allow_unicode=True).strip()
    return text.removesuffix("\n...").strip()


def at_least(lo: int) -> Any:
    """An argparse ``type`` for a count flag (``--workers``, ``--nodes``): an integer ≥ ``lo``; a
    smaller one is argparse's error naming the flag (``argument --workers: must be ≥ 1, got -3``)."""
    def count(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be ≥ {lo}, got {value}")
        return value

    return count


def help_text(doc: str) -> str:
    """A module docstring as --help text: reST markup (````code````, ``:func:`name```, ``*stress*``)
    becomes plain text."""
    doc = re.sub(r":\w+:`~?([^`]+)`", r"\1", doc)
    doc = re.sub(r"``(.+?)``", r"\1", doc, flags=re.S)
    return re.sub(r"(?<![\w*])\*(\w[^*]*?)\*(?![\w*])", r"\1", doc)


#: A command-line token that is a dotted config override (``a.b=value``), wherever it stands.
_OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*=")


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, flags: dict[str, str] | None = None) -> None:
    """``--config FILE`` (default: the schema's built-in defaults), ``key.sub=value`` overrides
    anywhere on the command line (see :func:`split_overrides`), and ``--flag`` shortcuts for the
    config keys in ``flags`` (``{flag name: dotted key}``); the epilog lists every key.

    Precedence: built-in defaults < the ``--config`` file < ``key=value`` < flags.
    """
    parser.add_argument("--config", default=None, help="YAML config: a path, or the name of a shipped config "
                        "(default: built-in defaults, see the keys below)")
    parser.set_defaults(overrides=[], _config_schema=cls, _config_flags=dict(flags or {}))
    hints = _flat_hints(cls)
    helps = {k: h for k, _, _, h in describe(cls)}
    for flag, key in (flags or {}).items():
        tp = hints[key]
        kind = tp if tp in (int, float, str) else None
        if kind is None and typing.get_origin(tp) in (typing.Union, types.UnionType):
            kind = next((a for a in typing.get_args(tp) if a in (int, float, str)), None)
        choices = f"; {type_name(tp)}" if typing.get_origin(tp) is typing.Literal else ""
        opts: dict[str, Any] = {"dest": "_flag_" + key.replace(".", "__"), "default": None,
                                "help": f"{helps[key]} (= config key {key}{choices})"}
        if tp is bool:
            opts.update(action=argparse.BooleanOptionalAction)
        else:
            opts.update(type=kind or str, metavar=key.split(".")[-1].upper())
        parser.add_argument(flag, **opts)
    lines = [f"  {k} ({t}; default {show(d)}): {h}" for k, t, d, h in describe(cls)]
    parser.epilog = ("config keys (set as key=value anywhere, or in a --config YAML):\n" + "\n".join(lines)
                     + ("\n\n" + parser.epilog if parser.epilog else ""))
    parser.formatter_class = argparse.RawDescriptionHelpFormatter


def _flat_hints(cls: type, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if _is_dataclass_type(tp):
            out.update(_flat_hints(tp, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = tp
    return out


def _value_options(parser: argparse.ArgumentParser) -> set[str]:
    """Option strings (of the parser and its sub-commands) that take a value as the next token."""
    out: set[str] = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                out |= _value_options(sub)
        elif action.option_strings and action.nargs != 0:
            out.update(action.option_strings)
    return out


def split_overrides(parser: argparse.ArgumentParser, argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(argv without the ``key=value`` overrides, the overrides in order).

    argparse takes positionals only as one contiguous run, so overrides are taken out first: a
    token is an override when it looks like ``dotted.key=value``, is not the value of an option
    (``--bins temperature_c=...``) and does not stand after ``--``.
    """
    takes_value = _value_options(parser)
    rest: list[str] = []
    overrides: list[str] = []
    it = iter(argv)
    for tok in it:
        if tok == "--":
            rest.append(tok)
            rest.extend(it)
            break
        if tok.startswith("-"):
            rest.append(tok)
            if "=" not in tok and tok in takes_value:
                nxt = next(it, None)
                if nxt is not None:
                    rest.append(nxt)
            continue
        (overrides if _OVERRIDE.match(tok) else rest).append(tok)
    return rest, overrides


def from_args(cls: type[T], args: argparse.Namespace) -> T:
    """The stage's config: defaults, ``--config``, ``key=value`` overrides, then flags."""
    flags = [f"{key}={json.dumps(value) if isinstance(value, str) else value}"
             for flag, key in getattr(args, "_config_flags", {}).items()
             if (value := getattr(args, "_flag_" + key.replace(".", "__"), None)) is not None]
    return load(cls, args.config, [*args.overrides, *flags])


def provenance(args: argparse.Namespace, cfg: Any = None) -> dict[str, Any]:
    """Where a stage's config came from: the file (resolved path; None = built-in defaults) and the
    overrides, plus the resolved ``values`` when ``cfg`` is given, for the stage's output."""
    out = {"file": str(find_config(args.config)) if args.config else None,
           "overrides": list(getattr(args, "overrides", []))}
    if cfg is not None:
        out["values"] = to_dict(cfg)
    return out


def field(default: Any = dataclasses.MISSING, help: str = "", *, ge: float | None = None, le: float | None = None,
          nonfinite: bool = False, **kw: Any) -> Any:
    """``dataclasses.field`` with a help string (mutable defaults go through default_factory).

    ``ge``/``le``: bounds on the value (every item of a list), checked when the config is built, the
    message naming the key; ``nonfinite``: a float field that accepts NaN/inf (others refuse them)."""
    meta: dict[str, Any] = {"help": help}
    if ge is not None:
        meta["ge"] = ge
    if le is not None:
        meta["le"] = le
    if nonfinite:
        meta["nonfinite"] = True
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=meta, **kw)
    return dataclasses.field(default=default, metadata=meta, **kw)
