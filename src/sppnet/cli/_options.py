"""Command-line flags generated from a config declaration (:func:`sppnet.engine.config.option`).

Every setting with a flag becomes one argparse option in a group per nested
config, with its help text, its choices, and a parser that checks the value's
type and declared range, so ``--ft-lr nan`` is refused where it is parsed::

    add_config_options(parser, DetectConfig, presets=PRESETS)
    args = parser.parse_args()
    overrides = config_overrides(args, DetectConfig)   # {"finetune": {"lr": 3e-3}}: only the flags given
    cfg = DetectConfig.from_preset(args.preset or "small", overrides)

Flags left out are absent from the namespace (``argparse.SUPPRESS``), so the
preset's value applies; an optional setting accepts ``none``. Tuples take one
or more values (``--scales 480 688``), or one argument split at the declared
``sep`` (``--lr-steps 40,60``). ``--help`` shows each preset's default.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from sppnet.engine.config import Config, Leaf, check_value, leaves, merge_overrides

__all__ = ["add_config_options", "config_overrides"]


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return " ".join(map(str, value)) or "()"
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _parser(leaf: Leaf) -> Callable[[str], Any]:
    """Text -> value of one element, checked against the declaration (errors name the value)."""

    def parse(text: str) -> Any:
        if leaf.optional and not leaf.sequence and text.lower() == "none":
            return None
        try:
            value = leaf.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {leaf.kind.__name__}, got {text!r}") from None
        check = dataclasses.replace(leaf, sequence=False)
        problem = check_value(check, value)
        if problem is not None:
            raise argparse.ArgumentTypeError(problem)
        return value

    parse.__name__ = leaf.kind.__name__  # argparse names the type in its messages
    return parse


def _split_parser(leaf: Leaf) -> Callable[[str], tuple]:
    """Text ``"40,60"`` -> ``(40, 60)``, each element checked, then the tuple (length, emptiness)."""
    one = _parser(leaf)

    def parse(text: str) -> tuple:
        value = tuple(one(part.strip()) for part in text.split(leaf.meta["sep"]) if part.strip())
        problem = check_value(leaf, value)
        if problem is not None:
            raise argparse.ArgumentTypeError(problem)
        return value

    parse.__name__ = f"{leaf.meta['sep']}-separated {leaf.kind.__name__}s"
    return parse


def _defaults_help(leaf: Leaf, defaults: Mapping[str, Mapping[str, Any]]) -> str:
    """``(default X)``, or ``(small X, paper Y)`` when the presets differ."""
    shown = {name: _show(values[leaf.path]) for name, values in defaults.items()}
    if not shown:
        return f"(default {_show(leaf.default)})"
    if len(set(shown.values())) == 1:
        return f"(default {next(iter(shown.values()))})"
    return "(" + ", ".join(f"{name} {v}" for name, v in shown.items()) + ")"


def add_config_options(
    parser: argparse.ArgumentParser,
    cls: type[Config],
    presets: Mapping[str, Config] | None = None,
    exclude: Sequence[str] = (),
    titles: Mapping[str, str] | None = None,
) -> None:
    """Adds a flag for every setting of ``cls`` that declares one.

    Args:
        parser: the sub-command's parser.
        cls: the config class (nested configs get an argument group each).
        presets: ``{name: resolved config}`` whose values ``--help`` shows as the defaults.
        exclude: dotted paths to leave out (flags the sub-command adds itself).
        titles: group titles by top-level field name (default: the nested class's docstring's first line).
    """
    defaults = {name: cfg.flat() for name, cfg in (presets or {}).items()}
    groups: dict[str, argparse._ArgumentGroup] = {}
    nested = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for leaf in leaves(cls):
        if leaf.flag is None or leaf.path in exclude:
            continue
        head = leaf.path.split(".")[0] if "." in leaf.path else ""
        if head not in groups:
            if head:
                owner = typing.get_type_hints(cls)[nested[head].name]
                title = (titles or {}).get(head) or (owner.__doc__ or head).strip().splitlines()[0].rstrip(".")
                groups[head] = parser.add_argument_group(title)
            else:
                groups[head] = parser.add_argument_group((titles or {}).get("", "run"))
        help_text = f"{leaf.meta.get('help', '')} {_defaults_help(leaf, defaults)}".strip().replace("%", "%%")
        kwargs: dict[str, Any] = {"dest": leaf.path, "default": argparse.SUPPRESS, "help": help_text}
        kwargs["metavar"] = leaf.meta.get("metavar") or leaf.name.upper()
        if leaf.kind is bool and not leaf.sequence:
            del kwargs["metavar"]
            groups[head].add_argument(leaf.flag, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        kwargs["type"] = _parser(leaf)
        if leaf.meta.get("choices") is not None:
            kwargs["choices"] = leaf.meta["choices"]
            if not leaf.meta.get("metavar"):
                kwargs["metavar"] = "{" + ",".join(map(str, leaf.meta["choices"])) + "}"
        if leaf.sequence and leaf.meta.get("sep"):
            kwargs["type"] = _split_parser(leaf)
        elif leaf.sequence:
            kwargs["nargs"] = leaf.meta["length"] if leaf.meta.get("length") else "+"
        groups[head].add_argument(leaf.flag, **kwargs)


def config_overrides(args: argparse.Namespace, cls: type[Config]) -> dict[str, Any]:
    """The settings given on the command line, as nested partial overrides (paths made absolute)."""
    given = vars(args)
    flat: dict[str, Any] = {}
    for leaf in leaves(cls):
        if leaf.flag is None or leaf.path not in given:
            continue
        value = given[leaf.path]
        if isinstance(value, list):
            value = tuple(value)
        if leaf.meta.get("path") and isinstance(value, str):
            value = str(Path(value).resolve())
        flat[leaf.path] = value
    return merge_overrides(flat)
