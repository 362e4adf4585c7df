"""``sppnet`` command line: ``sppnet {classify,detect} {train,val,predict}``,
``sppnet export``, ``sppnet demo``.

Each sub-command lives in its own module with ``add_parser(subparsers)``; the
parsers build the experiment's config dataclass, never pass the namespace into
model code. User mistakes (``UserError`` / ``ValueError`` from the data or the
config) print one line and exit 2, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from sppnet import __version__

_COMMANDS = ("classify", "detect", "export", "demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sppnet",
        description=(
            "SPP-net (He et al., ECCV 2014 / TPAMI 2015) in PyTorch: spatial pyramid pooling "
            "classifiers and the SPP-net detector, trained from scratch."
        ),
        epilog="Examples:\n  sppnet demo --quick\n  sppnet classify train --out runs/cls\n"
        "  sppnet detect train --out runs/det\n  sppnet detect val --run runs/det --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"sppnet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in _COMMANDS:
        try:
            module = importlib.import_module(f"sppnet.cli.{name}")
        except ModuleNotFoundError as e:  # an optional command whose module is absent
            if e.name != f"sppnet.cli.{name}":
                raise
            continue
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        if getattr(args, "traceback", False):
            raise
        print(f"sppnet {args.command}: error: {e}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    raise SystemExit(main())
