"""Arguments shared by several sub-commands."""

from __future__ import annotations

import argparse

from sppnet.cli._options import add_config_options, config_overrides
from sppnet.data.limits import set_image_limits
from sppnet.engine.limits import LimitsConfig


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


def add_limits(p: argparse.ArgumentParser, search: bool = True) -> None:
    """The image-limit flags (``--max-image-pixels``, ...) of a command that reads images without training.

    ``train`` gets them from its config (``cfg.limits``, kept by ``--resume``);
    ``search``: also ``--max-search-pixels`` (commands that run selective search).
    """
    exclude = () if search else ("max_search_pixels",)
    add_config_options(p, LimitsConfig, exclude=exclude, titles={"": "image limits"})


def set_limits(args: argparse.Namespace) -> None:
    """Applies the image-limit flags given (:func:`add_limits`; the others take their defaults) process-wide."""
    set_image_limits(LimitsConfig().with_overrides(config_overrides(args, LimitsConfig)).resolved().image_limits())
