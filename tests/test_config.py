"""The shared config base (``engine/config.py``) and the flags generated from it (``cli/_options.py``)."""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from typing import ClassVar

import pytest

from sppnet.cli._options import add_config_options, config_overrides
from sppnet.engine.common import UserError
from sppnet.engine.config import Config, ConfigError, check_resume, leaves, option


@dataclass
class Inner(Config):
    """Inner stage."""

    flag_prefix: ClassVar[str] = "in-"

    lr: float = option(0.1, help="learning rate", min=0, min_open=True)
    steps: tuple[int, ...] = option((3, 5), help="steps", min=0)
    pair: tuple[float, ...] = option((0.1, 0.5), help="a pair", length=2, min=0, max=1)
    cap: int | None = option(None, help="a cap", min=1, flag="--cap")
    epochs: tuple[int, ...] = option((4,), help="comma-separated", min=0, sep=",", nonempty=False)
    flip: bool = option(True, help="flip")

    def check(self) -> None:
        if self.cap is not None and self.cap < len(self.steps):
            raise ConfigError(f"--cap must be at least the number of --in-steps, got {self.cap}")


@dataclass
class Outer(Config):
    mode: str = option("a", help="mode", choices=("a", "b"))
    workers: int = option(2, help="workers", min=0)
    folder: str | None = option(None, help="a folder", path=True)
    inner: Inner = field(default_factory=Inner)
    hidden: int = option(7, help="no flag", flag=False)


def test_leaves_and_flags_come_from_the_declaration():
    got = {leaf.path: leaf.flag for leaf in leaves(Outer)}
    assert got == {
        "mode": "--mode",
        "workers": "--workers",
        "folder": "--folder",
        "inner.lr": "--in-lr",
        "inner.steps": "--in-steps",
        "inner.pair": "--in-pair",
        "inner.cap": "--cap",
        "inner.epochs": "--in-epochs",
        "inner.flip": "--in-flip",
        "hidden": None,
    }


def test_dict_round_trip_through_json_restores_tuples_and_nesting():
    cfg = Outer(inner=Inner(steps=(1, 2, 9)))
    back = Outer.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and isinstance(back.inner.steps, tuple) and isinstance(back.inner, Inner)
    assert cfg.to_dict()["inner"]["lr"] == 0.1
    # missing keys take the defaults
    assert Outer.from_dict({"inner": {"lr": 0.5}}) == Outer(inner=Inner(lr=0.5))


def test_unknown_keys_are_refused_with_their_names():
    with pytest.raises(ConfigError, match=r"unknown Outer settings \['typo'\]"):
        Outer.from_dict({"typo": 1})
    with pytest.raises(ConfigError, match=r"unknown Inner settings \['lrr'\] in inner"):
        Outer.from_dict({"inner": {"lrr": 1}})
    with pytest.raises(ConfigError, match="unknown"):
        Outer().with_overrides({"inner": {"nope": 1}})


def test_partial_nested_and_dotted_overrides():
    base = Outer()
    a = base.with_overrides({"inner": {"lr": 0.3}}, workers=0)
    b = base.with_overrides(**{"inner.lr": 0.3, "workers": 0})
    assert a == b and a.inner.steps == (3, 5) and a.inner.lr == 0.3 and a.workers == 0
    assert base.inner.lr == 0.1  # the original is untouched
    assert base.with_overrides({"inner": {"steps": [4]}}).inner.steps == (4,)
    assert base.with_overrides({"inner": {"cap": None}}).inner.cap is None  # None is a value


@pytest.mark.parametrize(
    "override, message",
    [
        ({"inner": {"lr": math.nan}}, r"inner.lr \(--in-lr\) must be a finite number, got nan"),
        ({"inner": {"lr": 0.0}}, r"inner.lr \(--in-lr\) must be > 0, got 0.0"),
        ({"inner": {"lr": -1}}, r"must be > 0, got -1"),
        ({"inner": {"lr": math.inf}}, "finite"),
        ({"inner": {"steps": (1, -2)}}, r"inner.steps \(--in-steps\) must be >= 0, got -2 in \(1, -2\)"),
        ({"inner": {"steps": ()}}, "at least one value"),
        ({"inner": {"pair": (0.1,)}}, "must hold 2 values"),
        ({"inner": {"pair": (0.1, 1.5)}}, "must be >= 0 and <= 1, got 1.5"),
        ({"inner": {"cap": 0}}, r"inner.cap \(--cap\) must be >= 1, got 0"),
        ({"inner": {"flip": 1}}, "true or false"),
        ({"mode": "c"}, r"mode \(--mode\) must be one of a, b, got 'c'"),
        ({"workers": True}, "must be an integer"),
        ({"workers": 1.5}, "must be an integer"),
        ({"hidden": None}, r"hidden must be set"),
        ({"inner": {"cap": 1}}, r"--cap must be at least the number of --in-steps, got 1"),  # a nested check()
    ],
)
def test_validate_checks_every_declared_range_recursively(override, message):
    cfg = Outer().with_overrides(override)
    with pytest.raises(ConfigError, match=message):
        cfg.validate()
    assert isinstance(ConfigError("x"), UserError)


def test_valid_configs_pass():
    assert Outer().validate() == Outer()
    assert Outer().with_overrides({"inner": {"cap": 5, "lr": 2}}).validate().inner.cap == 5


def test_check_resume_refuses_changes_except_the_mutable_ones():
    saved = Outer()
    given = saved.with_overrides(workers=0)
    assert check_resume(saved, given, mutable=("workers",)).workers == 0
    assert check_resume(saved, None) is saved
    with pytest.raises(UserError, match=r"inner.lr: run has 0.1, given 0.2"):
        check_resume(saved, saved.with_overrides({"inner": {"lr": 0.2}}), mutable=("workers",))
    assert check_resume(saved, saved.with_overrides(mode="b"), ignore=("mode",)).mode == "a"


# ----------------------------------------------------------------- the CLI


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="t")
    add_config_options(p, Outer, presets={"small": Outer(), "big": Outer(workers=8)})
    return p


def test_flags_give_only_what_was_typed_as_nested_overrides(tmp_path):
    args = parser().parse_args(["--in-lr", "0.5", "--in-steps", "1", "2", "--no-in-flip", "--folder", "rel"])
    got = config_overrides(args, Outer)
    assert got["inner"] == {"lr": 0.5, "steps": (1, 2), "flip": False}
    assert got["folder"].startswith("/") and got["folder"].endswith("rel")
    assert set(got) == {"inner", "folder"}
    assert config_overrides(parser().parse_args(["--cap", "none"]), Outer) == {"inner": {"cap": None}}
    assert config_overrides(parser().parse_args([]), Outer) == {}
    assert config_overrides(parser().parse_args(["--in-epochs", "3,7"]), Outer) == {"inner": {"epochs": (3, 7)}}
    assert config_overrides(parser().parse_args(["--in-epochs", ""]), Outer) == {"inner": {"epochs": ()}}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--in-lr", "nan"], "--in-lr: must be a finite number, got nan"),
        (["--in-lr", "-1"], "--in-lr: must be > 0, got -1.0"),
        (["--in-lr", "abc"], "expected float, got 'abc'"),
        (["--workers", "-1"], "--workers: must be >= 0, got -1"),
        (["--in-pair", "0.1"], "--in-pair"),
        (["--mode", "z"], "--mode"),
        (["--in-epochs", "3,-1"], "--in-epochs: must be >= 0, got -1"),
    ],
)
def test_bad_values_are_refused_where_they_are_parsed(argv, message, capsys):
    p = argparse.ArgumentParser(prog="t")
    add_config_options(p, Outer)
    with pytest.raises(SystemExit):
        p.parse_args(argv)
    assert message in capsys.readouterr().err


def test_help_shows_every_presets_default(capsys):
    p = parser()
    with pytest.raises(SystemExit):
        p.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "workers (small 2, big 8)" in text and "learning rate (default 0.1)" in text
    assert "Inner stage" in text  # a group per nested config
    assert "--hidden" not in text
