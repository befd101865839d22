"""Config loading: defaults < YAML < dotted overrides; errors name the key."""
from __future__ import annotations

from dataclasses import dataclass

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
