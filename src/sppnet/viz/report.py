"""A self-contained HTML report: sections of text, tables and PNGs embedded as data URIs.

Readable straight from disk (no server, no external file, no script).
"""

from __future__ import annotations

import base64
import html
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sppnet.utils import atomic_write_text

_CSS = """
body { font-family: -apple-system, Segoe UI, Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1100px;
       color: #222; line-height: 1.45; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.8em 0; } td, th { border: 1px solid #ccc; padding: 4px 10px; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.9em; color: #555; } .note { color: #555; font-size: 0.92em; }
"""


@dataclass
class Section:
    title: str
    paragraphs: list[str] = field(default_factory=list)
    tables: list[tuple[list[str], list[list[object]]]] = field(default_factory=list)
    figures: list[tuple[Path, str]] = field(default_factory=list)


class Report:
    """Collects sections, then writes one HTML file with every image embedded."""

    def __init__(self, title: str, intro: str = "") -> None:
        self.title = title
        self.intro = intro
        self.sections: list[Section] = []

    def section(self, title: str) -> Section:
        s = Section(title)
        self.sections.append(s)
        return s

    def images(self) -> list[Path]:
        return [p for s in self.sections for p, _ in s.figures]

    def write(self, path: str | os.PathLike) -> Path:
        out = [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>{html.escape(self.title)}</title><style>{_CSS}</style></head><body>",
            f"<h1>{html.escape(self.title)}</h1>",
        ]
        if self.intro:
            out.append(f"<p>{html.escape(self.intro)}</p>")
        for s in self.sections:
            out.append(f"<h2>{html.escape(s.title)}</h2>")
            out += [f"<p>{html.escape(p)}</p>" for p in s.paragraphs]
            for header, rows in s.tables:
                out.append(_table(header, rows))
            for png, caption in s.figures:
                out.append(
                    f'<figure><img alt="{html.escape(caption)}" src="{_data_uri(png)}">'
                    f"<figcaption>{html.escape(caption)}</figcaption></figure>"
                )
        out.append("</body></html>")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, "\n".join(out))
        return path


def _data_uri(png: str | os.PathLike) -> str:
    data = Path(png).read_bytes()
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _cell(v: object) -> str:
    if isinstance(v, float):
        return f'<td class="num">{v:.4g}</td>'
    if isinstance(v, int):
        return f'<td class="num">{v}</td>'
    return f"<td>{html.escape(str(v))}</td>"


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(_cell(v) for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def text_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """The same table as plain text, for the terminal."""
    cells = [[str(h) for h in header]] + [[f"{v:.4g}" if isinstance(v, float) else str(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
