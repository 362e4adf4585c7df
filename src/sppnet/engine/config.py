"""Configs composed of small dataclasses, each setting declared once beside its field.

A task's config (``DetectConfig``, ``ClassifyConfig``) is a dataclass whose
fields are settings or smaller configs, one per stage (proposals, backbone,
features, fine-tuning, ...), like detectron2's config tree without its
machinery. Each setting is declared with :func:`option`: its default, its help
text, its command-line flag and its valid range, once::

    @dataclass
    class FinetuneConfig(Config):
        flag_prefix: ClassVar[str] = "ft-"

        lr: float = option(3e-3, help="learning rate", min=0, min_open=True)
        lr_steps: tuple[int, ...] = option((1000,), help="iterations at which lr is divided by 10", min=0)

From that declaration :class:`Config` gives

* :meth:`~Config.to_dict` / :meth:`~Config.from_dict`: the nested JSON form
  saved as ``config.json`` (tuples restored, unknown keys refused);
* :meth:`~Config.with_overrides`: partial nested overrides
  (``{"finetune": {"lr": 1e-4}}`` or ``{"finetune.lr": 1e-4}``), which is
  also what a preset is;
* :meth:`~Config.validate`: every declared type, choice and range, recursively
  (floats must be finite), then each config's :meth:`~Config.check` of several
  settings together, with messages that name the flag and the value;
* :func:`check_resume`: the settings a resumed run may not change;

and :mod:`sppnet.cli._options` turns the same declaration into argparse flags.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Self, TypeVar

from sppnet.engine.common import UserError

__all__ = [
    "Config",
    "ConfigError",
    "Leaf",
    "check_resume",
    "check_value",
    "leaves",
    "merge_overrides",
    "option",
]


class ConfigError(UserError):
    """A setting out of its declared type or range (the CLI prints it without a traceback)."""


def option(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    flag: str | bool | None = None,
    choices: Sequence[Any] | None = None,
    min: float | None = None,
    max: float | None = None,
    min_open: bool = False,
    max_open: bool = False,
    length: int | None = None,
    nonempty: bool = True,
    path: bool = False,
    metavar: str | None = None,
    sep: str | None = None,
) -> Any:
    """A dataclass field with its help text, command-line flag and valid range.

    Args:
        default: the default (tuples for sequences, never lists).
        help: one line for ``--help`` (the default is appended by the CLI).
        flag: the command-line flag; ``None``: ``--`` + the class's ``flag_prefix``
            + the field name with dashes; ``False``: no flag.
        choices: the allowed values.
        min, max: bounds of a number (of each element of a tuple); inclusive
            unless ``min_open`` / ``max_open``.
        length: a tuple's exact length; ``nonempty``: a tuple must not be empty.
        path: a file or folder (the CLI makes it absolute).
        metavar: the flag's argument name in ``--help``.
        sep: a tuple's flag takes one argument split at ``sep`` (``--lr-steps 40,60``)
            instead of one argument per value (``--scales 480 688``).

    A nested config is a plain ``dataclasses.field(default_factory=FinetuneConfig)``.
    """
    meta = {
        "help": help,
        "flag": flag,
        "choices": tuple(choices) if choices is not None else None,
        "min": min,
        "max": max,
        "min_open": min_open,
        "max_open": max_open,
        "length": length,
        "nonempty": nonempty,
        "path": path,
        "metavar": metavar,
        "sep": sep,
    }
    if isinstance(default, list):
        raise TypeError("option defaults must be immutable: use a tuple, not a list")
    return dataclasses.field(default=default, metadata={"option": meta})


# ----------------------------------------------------------------- field types


@dataclass(frozen=True)
class Leaf:
    """One setting of a config tree, as the CLI and the checks see it.

    Attributes:
        path: dotted path from the root config (``"finetune.lr"``).
        name: the field's name.
        kind: ``bool``, ``int``, ``float`` or ``str``: the value's (or each element's) type.
        sequence: the value is a tuple of ``kind``.
        optional: ``None`` is allowed.
        meta: the :func:`option` metadata (``help``, ``flag``, ``choices``, ``min``, ...).
        flag: the resolved command-line flag, or ``None`` for none.
        default: the declared default.
    """

    path: str
    name: str
    kind: type
    sequence: bool
    optional: bool
    meta: Mapping[str, Any]
    flag: str | None
    default: Any


def _field_type(owner: type, f: dataclasses.Field) -> Any:
    hints = typing.get_type_hints(owner)
    return hints[f.name]


def _analyse(hint: Any) -> tuple[Any, bool, bool]:
    """``(base, sequence, optional)`` of a field's annotation: ``int | None`` -> ``(int, False, True)``."""
    optional = False
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        if len(args) != 1:
            raise TypeError(f"a config field must have one type (or that type | None), got {hint}")
        hint = args[0]
        origin = typing.get_origin(hint)
    if origin is tuple:
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        if len(set(args)) != 1:
            raise TypeError(f"a tuple config field must hold one type, got {hint}")
        return args[0], True, optional
    return hint, False, optional


def _is_config(t: Any) -> bool:
    return isinstance(t, type) and issubclass(t, Config)


def leaves(cls: type[Config], prefix: str = "") -> Iterator[Leaf]:
    """Every setting of a config class, nested configs expanded, in declaration order."""
    for f in dataclasses.fields(cls):
        hint = _field_type(cls, f)
        if _is_config(hint):
            yield from leaves(hint, f"{prefix}{f.name}.")
            continue
        kind, sequence, optional = _analyse(hint)
        meta = dict(f.metadata.get("option") or {"help": "", "flag": False})
        flag = meta.get("flag")
        if flag is None:
            flag = "--" + cls.flag_prefix + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        yield Leaf(
            f"{prefix}{f.name}",
            f.name,
            kind,
            sequence,
            optional,
            meta,
            flag or None,
            default,
        )


def _describe_range(leaf: Leaf) -> str:
    m = leaf.meta
    parts = []
    if m.get("min") is not None:
        parts.append(f"{'>' if m.get('min_open') else '>='} {m['min']:g}")
    if m.get("max") is not None:
        parts.append(f"{'<' if m.get('max_open') else '<='} {m['max']:g}")
    return " and ".join(parts)


def _name(leaf: Leaf) -> str:
    return f"{leaf.path} ({leaf.flag})" if leaf.flag else leaf.path


def _check_scalar(leaf: Leaf, v: Any) -> str | None:
    """What is wrong with one value (an element of a tuple), or None."""
    m = leaf.meta
    kind = leaf.kind
    if kind is bool:
        if not isinstance(v, bool):
            return f"must be true or false, got {v!r}"
    elif kind is int:
        if isinstance(v, bool) or not isinstance(v, int):
            return f"must be an integer, got {v!r}"
    elif kind is float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return f"must be a number, got {v!r}"
        if not math.isfinite(v):
            return f"must be a finite number, got {v!r}"
    elif kind is str and not isinstance(v, str):
        return f"must be a string, got {v!r}"
    if m.get("choices") is not None and v not in m["choices"]:
        return f"must be one of {', '.join(map(str, m['choices']))}, got {v!r}"
    if kind in (int, float):
        lo, hi = m.get("min"), m.get("max")
        low_bad = lo is not None and (v <= lo if m.get("min_open") else v < lo)
        high_bad = hi is not None and (v >= hi if m.get("max_open") else v > hi)
        if low_bad or high_bad:
            return f"must be {_describe_range(leaf)}, got {v!r}"
    return None


def check_value(leaf: Leaf, value: Any) -> str | None:
    """What is wrong with ``value`` for ``leaf`` (its type, choices, range), or None if it is valid."""
    if value is None:
        return None if leaf.optional else f"must be set, got {value!r}"
    if not leaf.sequence:
        return _check_scalar(leaf, value)
    if not isinstance(value, tuple):
        return f"must be a tuple, got {value!r}"
    if leaf.meta.get("length") is not None and len(value) != leaf.meta["length"]:
        return f"must hold {leaf.meta['length']} values, got {value!r}"
    if leaf.meta.get("nonempty", True) and not value:
        return f"must hold at least one value, got {value!r}"
    for v in value:
        problem = _check_scalar(leaf, v)
        if problem is not None:
            return f"{problem} in {value!r}"
    return None


# ------------------------------------------------------------------- the base


def merge_overrides(*layers: Mapping[str, Any] | None) -> dict[str, Any]:
    """Nested partial overrides merged left to right; dotted keys (``"finetune.lr"``) are split."""
    out: dict[str, Any] = {}
    for layer in layers:
        for key, value in (layer or {}).items():
            head, _, rest = key.partition(".")
            if rest:
                value, key = {rest: value}, head
            if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
                out[key] = merge_overrides(out[key], value)
            elif isinstance(value, Mapping):
                out[key] = merge_overrides(value)
            else:
                out[key] = value
    return out


class Config:
    """Base of the config dataclasses (subclasses are ``@dataclass``; see the module docstring).

    Class attributes:
        flag_prefix: put before the field names of this class's flags
            (``"ft-"``: ``lr`` -> ``--ft-lr``) unless :func:`option` names the flag.
    """

    flag_prefix: ClassVar[str] = ""

    # -------------------------------------------------------------- dict form
    def to_dict(self) -> dict[str, Any]:
        """The nested dict saved as ``config.json`` (nested configs as dicts)."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "") -> Self:
        """Inverse of :meth:`to_dict` after a JSON round trip; missing keys take the defaults.

        Raises:
            ConfigError: a key the config does not have, or a nested config that is not a dict.
        """
        if not isinstance(d, Mapping):
            raise ConfigError(f"{where or cls.__name__} must be a dict of settings, got {d!r}")
        fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise ConfigError(
                f"unknown {cls.__name__} settings {unknown}{' in ' + where if where else ''}; known: {sorted(fields)}"
            )
        values: dict[str, Any] = {}
        for name, value in d.items():
            hint = _field_type(cls, fields[name])
            if _is_config(hint):
                values[name] = value if isinstance(value, hint) else hint.from_dict(value, f"{where}{name}.")
            elif isinstance(value, list):
                values[name] = tuple(value)
            else:
                values[name] = value
        return cls(**values)

    def with_overrides(self, overrides: Mapping[str, Any] | None = None, /, **dotted: Any) -> Self:
        """A copy with some settings replaced: nested partial dicts or dotted keys.

        ``cfg.with_overrides({"finetune": {"lr": 1e-4}}, workers=0)``; a value is
        taken as given (``None`` included); lists become tuples.

        Raises:
            ConfigError: an unknown setting.
        """
        merged = merge_overrides(overrides, dotted)
        fields = {f.name: f for f in dataclasses.fields(self)}  # type: ignore[arg-type]
        unknown = sorted(set(merged) - set(fields))
        if unknown:
            raise ConfigError(f"unknown {type(self).__name__} settings {unknown}; known: {sorted(fields)}")
        changes: dict[str, Any] = {}
        for name, value in merged.items():
            current = getattr(self, name)
            if isinstance(current, Config) and isinstance(value, Mapping):
                changes[name] = current.with_overrides(value)
            elif isinstance(value, list):
                changes[name] = tuple(value)
            else:
                changes[name] = value
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    def flat(self) -> dict[str, Any]:
        """``{dotted path: value}`` of every setting."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            if isinstance(v, Config):
                out.update({f"{f.name}.{k}": x for k, x in v.flat().items()})
            else:
                out[f.name] = v
        return out

    def get(self, path: str) -> Any:
        """The setting at a dotted path."""
        value: Any = self
        for part in path.split("."):
            value = getattr(value, part)
        return value

    # ----------------------------------------------------------------- checks
    def validate(self) -> Self:
        """Checks every declared type, choice and range, nested configs included, then each
        config's :meth:`check`; returns ``self``.

        Raises:
            ConfigError: naming the setting, its flag and the value.
        """
        values = self.flat()
        for leaf in leaves(type(self)):
            problem = check_value(leaf, values[leaf.path])
            if problem is not None:
                raise ConfigError(f"{_name(leaf)} {problem}")
        self._check_all()
        return self

    def _check_all(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, Config):
                value._check_all()
        self.check()

    def check(self) -> None:
        """Checks that involve several settings (override; the declared ranges are already checked).

        Raises:
            ConfigError: naming the flags and values.
        """

    def complete(self) -> Self:
        """A copy with derived defaults filled in (e.g. ``None`` meaning "depends on another setting").

        The base class completes nested configs; subclasses override and call ``super().complete()``.
        """
        changes = {
            f.name: getattr(self, f.name).complete()
            for f in dataclasses.fields(self)  # type: ignore[arg-type]
            if isinstance(getattr(self, f.name), Config)
        }
        return dataclasses.replace(self, **changes) if changes else self  # type: ignore[type-var]

    def resolved(self) -> Self:
        """:meth:`complete`, then :meth:`validate`: the config a run uses and saves."""
        return self.complete().validate()


C = TypeVar("C", bound=Config)


def check_resume(saved: C, given: C | None, mutable: Sequence[str] = (), ignore: Sequence[str] = ()) -> C:
    """The config of a resumed run: ``saved``, with the ``mutable`` settings taken from ``given``.

    Args:
        saved: the run's config (from its ``config.json``).
        given: the config asked for now (``None``: resume as saved).
        mutable: dotted paths a resumed run may change (``"workers"``, ``"device"``).
        ignore: dotted paths not compared and kept as saved (``"preset"``).

    Raises:
        UserError: listing every other setting that differs.
    """
    if given is None:
        return saved
    a, b = saved.flat(), given.flat()
    skip = set(mutable) | set(ignore)
    diff = [f"{k}: run has {a[k]!r}, given {b[k]!r}" for k in a if k not in skip and a[k] != b[k]]
    if diff:
        raise UserError("cannot change these settings when resuming: " + "; ".join(diff))
    return saved.with_overrides({k: b[k] for k in mutable})
