"""Config loading: defaults < YAML < dotted overrides; errors name the key."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import pytest

from icehpc import config
from icehpc.config import ConfigError


@dataclass
class Optim:
    lr: float = config.field(5e-4, help="base learning rate")
    betas: list[float] = config.field([0.9, 0.999], help="Adam betas")

    def validate(self) -> None:
        if self.lr <= 0:
            raise ValueError("lr must be > 0")


@dataclass
class Schema:
    name: str = config.field("run", help="run name")
    steps: int = config.field(10, help="optimizer steps")
    mode: str | None = config.field(None, help="optional mode")
    optim: Optim = config.field(default_factory=Optim)


def test_defaults_yaml_and_overrides_layer(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("steps: 20\noptim:\n  lr: 1e-3\n")
    cfg = config.load(Schema, cfg_file, ["optim.betas=[0.8, 0.95]", "name=x"])
    assert (cfg.name, cfg.steps, cfg.optim.lr, cfg.optim.betas) == ("x", 20, 1e-3, [0.8, 0.95])
    assert config.load(Schema).optim.betas == [0.9, 0.999]
    # mutable defaults are not shared between instances
    a, b = config.load(Schema), config.load(Schema)
    a.optim.betas.append(1.0)
    assert b.optim.betas == [0.9, 0.999]


@pytest.mark.parametrize("override, key", [
    ("optim.lrr=1", "optim.lrr"),
    ("steps=ten", "steps"),
    ("optim.lr=-1", "optim"),
    ("optim.betas=3", "optim.betas"),
    ("name", "key.sub=value"),
])
def test_bad_overrides_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config.load(Schema, None, [override])


def test_unknown_key_in_file_and_missing_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("optim:\n  momentum: 0.9\n")
    with pytest.raises(ConfigError, match=r"optim\.momentum"):
        config.load(Schema, f)
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(Schema, tmp_path / "nope.yaml")


def test_describe_lists_every_leaf_with_help():
    rows = {k: (d, h) for k, _, d, h in config.describe(Schema)}
    assert set(rows) == {"name", "steps", "mode", "optim.lr", "optim.betas"}
    assert rows["optim.lr"] == (5e-4, "base learning rate")


# ------------------------------------------------------------------ hostile configs (issue #20)
@dataclass
class Model:
    arch_kwargs: dict[str, Any] = config.field({}, help="free-form kwargs")


@dataclass
class Bounded:
    n_bins: int = config.field(10, help="bins", ge=1, le=1000)
    gib: float = config.field(4.0, help="memory cap", ge=0)
    ratio: float = config.field(1.0, help="may be inf", nonfinite=True)
    model: Model = config.field(default_factory=Model)


def _alias_bomb(levels: int = 9) -> str:
    """The classic 'billion laughs' in YAML: ~1 KB that expands to 9**levels strings."""
    lines = ["model:", "  arch_kwargs:", '    l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels):
        lines.append(f"    l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def test_yaml_alias_bomb_in_a_free_form_dict_is_refused_at_once(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(_alias_bomb())
    assert path.stat().st_size < 2048
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=r"bomb.yaml: YAML expands to more than 100000 values"):
        config.load(Bounded, path)
    assert time.perf_counter() - t0 < 5
    with pytest.raises(ConfigError, match=r"override 'model.arch_kwargs': YAML expands"):
        config.load(Bounded, None, ["model.arch_kwargs=" + "{" + _alias_bomb().split("arch_kwargs:\n")[1]
                                    .replace("\n    ", ", ").replace("\n", "").replace("    ", "") + "}"])


def test_yaml_anchors_used_a_few_times_still_work(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("model:\n  arch_kwargs:\n    a: &x {depth: 2}\n    b: *x\n")
    assert config.load(Bounded, path).model.arch_kwargs == {"a": {"depth": 2}, "b": {"depth": 2}}


def test_recursive_alias_and_deep_nesting_are_one_config_error(tmp_path):
    (tmp_path / "rec.yaml").write_text("model:\n  arch_kwargs:\n    a: &r [*r]\n")
    with pytest.raises(ConfigError, match="refers to itself"):
        config.load(Bounded, tmp_path / "rec.yaml")
    (tmp_path / "deep.yaml").write_text("model:\n  arch_kwargs:\n    a: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match="deep"):
        config.load(Bounded, tmp_path / "deep.yaml")
    (tmp_path / "d20.yaml").write_text("model:\n  arch_kwargs:\n    a: " + "[" * 20 + "]" * 20 + "\n")
    with pytest.raises(ConfigError, match=r"model.arch_kwargs.a(\[0\])+: nested deeper than 16"):
        config.load(Bounded, tmp_path / "d20.yaml")


def test_config_files_and_override_values_are_size_capped(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("model:\n  arch_kwargs:\n    x: '" + "a" * config.MAX_CONFIG_BYTES + "'\n")
    with pytest.raises(ConfigError, match="more than a config may hold"):
        config.load(Bounded, big)
    with pytest.raises(ConfigError, match="override 'model.arch_kwargs': value longer than"):
        config.load(Bounded, None, ["model.arch_kwargs={x: '" + "a" * config.MAX_OVERRIDE_BYTES + "'}"])


@pytest.mark.parametrize("value,match", [
    ("{x: .nan}", r"model.arch_kwargs.x: nan is not a finite number"),
    ("{x: !!binary aGVsbG8=}", r"model.arch_kwargs.x: bytes values are not allowed"),
    ("{x: 2026-12-07}", r"model.arch_kwargs.x: date values are not allowed"),
    ("{1: 2}", r"model.arch_kwargs: key 1 is not a string"),
    ("{x: [" + ",".join(["1"] * 10_001) + "]}", r"more than 10000 values"),
])
def test_free_form_values_hold_only_bounded_plain_data(value, match):
    with pytest.raises(ConfigError, match=match):
        config.load(Bounded, None, [f"model.arch_kwargs={value}"])


@pytest.mark.parametrize("override", ["gib=nan", "gib=.inf", "gib=-.inf", "optim.lr=.nan", "optim.betas=[0.9, .nan]"])
def test_float_fields_refuse_nan_and_inf(override):
    schema = Bounded if not override.startswith("optim") else Schema
    with pytest.raises(ConfigError, match=rf"{override.split('=')[0].split('.')[-1]}\S*: expected a finite number"):
        config.load(schema, None, [override])


def test_a_field_may_allow_inf_explicitly():
    assert config.load(Bounded, None, ["ratio=.inf"]).ratio == float("inf")


@pytest.mark.parametrize("override,match", [("n_bins=0", r"^n_bins: must be ≥ 1, got 0$"),
                                            ("n_bins=100000000", r"^n_bins: must be ≤ 1000, got 100000000$"),
                                            ("gib=-1", r"^gib: must be ≥ 0, got -1.0$")])
def test_bounded_counts_name_the_key_and_the_bound(override, match):
    with pytest.raises(ConfigError, match=match):
        config.load(Bounded, None, [override])


@dataclass
class Counts:
    k: int = config.field(20, help="neighbours")
    top: int = config.field(12, help="shown")
    name: str = config.field("x", help="a name")

    def validate(self) -> None:
        if self.k < 1 or self.top < 0:
            raise ValueError("need k ≥ 1 and top ≥ 0")


@pytest.mark.parametrize("overrides,refused", [(["k=-1"], "k=-1"), (["top=-3", "name=y"], "top=-3"),
                                               (["k=0", "top=-1"], None), (["optim.lr=-1"], "optim.lr=-1.0")])
def test_a_lumped_validation_message_names_the_key_that_fails_it(overrides, refused):
    schema = Schema if overrides[0].startswith("optim") else Counts
    with pytest.raises(ConfigError) as info:
        config.load(schema, None, overrides)
    msg = str(info.value)
    if refused is None:  # two keys wrong at once: neither alone is the cause, the check's message stands
        assert msg == "config: need k ≥ 1 and top ≥ 0"
    else:
        assert msg.endswith(f" (refused: {refused})"), msg


def test_help_shows_values_as_yaml_and_docstrings_as_plain_text():
    from typing import Literal, Optional

    @dataclass
    class Spec:
        edges: list = config.field([-1.0, 0.0], help="edges")
        n: int = config.field(3, help="n")

    assert config.show({"t": Spec()}) == "{t: {edges: [-1.0, 0.0], n: 3}}"
    assert [config.show(v) for v in (None, "", "habit", True, ("a", "b:c"))] == [
        "null", "''", "habit", "true", "[a, 'b:c']"]
    assert config.type_name(Literal["auto", "keep"]) == "one of: auto, keep"
    assert config.type_name(Optional[int]) == "int | None"
    assert config.help_text("``DIR/x.tar`` per :func:`status`, *unknown* (a × b * c)") == \
        "DIR/x.tar per status, unknown (a × b * c)"
