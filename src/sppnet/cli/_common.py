"""Arguments shared by several sub-commands."""

from __future__ import annotations

import argparse


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    p.add_argument("--traceback", action="store_true", help="show full tracebacks for errors")


def add_preset(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--preset",
        choices=("small", "paper"),
        default=None,
        help="small: sized for 2 CPU cores (default without a GPU); paper: Table 1 widths, "
        "sizes and schedules (default with a GPU). Explicit flags override the preset.",
    )
