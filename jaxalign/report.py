"""A report as Markdown with embedded PNG figures, and the same report as one self-contained HTML page.

Used by ``jaxalign plot`` and ``jaxalign demo``. A :class:`Report` collects blocks in order (headings,
paragraphs, tables, figures); :meth:`Report.write` writes ``DIR/report.md`` (figures linked by relative
path, so the folder moves as a whole) and ``DIR/report.html`` (Markdown rendered by ``markdown-it-py``,
figures inlined as base64 data, so the page opens anywhere). Figures are saved by
:func:`save_figure` from matplotlib figures.

Example::

    rep = Report("Likelihood displacement")
    rep.text("Numbers from this run.")
    rep.table(["subset", "Δ log π(y+)"], [["high", -3.1], ["low", 0.4]])
    rep.figure(save_figure(fig, out / "delta.png"), "Mean change of log π(y+) per subset")
    md_path, html_path = rep.write(out)
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any, Sequence

from jaxalign import store

_STYLE = """body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;line-height:1.45}
table{border-collapse:collapse;margin:1rem 0}th,td{border:1px solid #bbb;padding:.25rem .6rem;text-align:right}
th{background:#eee}td:first-child,th:first-child{text-align:left}img{max-width:100%}
figure{margin:1rem 0}figcaption{color:#444;font-size:.9rem}code{background:#f4f4f4;padding:0 .2rem}"""


def format_cell(value: Any, digits: int = 4) -> str:
    """A table cell: floats to ``digits`` significant digits, ``nan`` as ``–``, the rest as ``str``."""
    if isinstance(value, bool) or value is None:
        return "–" if value is None else str(value)
    if isinstance(value, float) or type(value).__name__.startswith("float"):
        v = float(value)
        return "–" if math.isnan(v) else f"{v:.{digits}g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 4) -> str:
    """A GitHub-flavoured Markdown table; every row must have one cell per header."""
    lines = ["| " + " | ".join(format_cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    for i, row in enumerate(rows):
        if len(row) != len(headers):
            raise ValueError(f"table row {i} has {len(row)} cells for {len(headers)} headers")
        lines.append("| " + " | ".join(format_cell(c, digits) for c in row) + " |")
    return "\n".join(lines)


def save_figure(fig, path: str | Path, *, dpi: int = 110) -> Path:
    """Save a matplotlib figure as PNG (written atomically), close it and return the path."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return store.write_bytes(path, buf.getvalue())


class Report:
    """An ordered list of Markdown blocks and figures; see the module docstring."""

    def __init__(self, title: str):
        self.title = title
        self._blocks: list[tuple[str, Any]] = []

    def section(self, title: str, level: int = 2) -> "Report":
        self._blocks.append(("md", "#" * level + " " + title))
        return self

    def text(self, markdown: str) -> "Report":
        self._blocks.append(("md", markdown.strip()))
        return self

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 4) -> "Report":
        self._blocks.append(("md", markdown_table(headers, rows, digits)))
        return self

    def figure(self, path: str | Path, caption: str) -> "Report":
        """Add a saved PNG; it must lie in (or below) the folder the report is written to."""
        self._blocks.append(("figure", (Path(path), caption)))
        return self

    def markdown(self, out_dir: Path) -> str:
        parts = [f"# {self.title}"]
        for kind, value in self._blocks:
            if kind == "md":
                parts.append(value)
            else:
                path, caption = value
                rel = Path(path).resolve().relative_to(Path(out_dir).resolve()).as_posix()
                parts.append(f"![{caption}]({rel})\n\n*{caption}*")
        return "\n\n".join(parts) + "\n"

    def html(self) -> str:
        from markdown_it import MarkdownIt

        md = MarkdownIt("commonmark").enable("table")
        body = [f"<h1>{html.escape(self.title)}</h1>"]
        for kind, value in self._blocks:
            if kind == "md":
                body.append(md.render(value))
            else:
                path, caption = value
                data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
                body.append(f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
                            f"<figcaption>{html.escape(caption)}</figcaption></figure>")
        return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
                f"<style>{_STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")

    def write(self, out_dir: str | Path) -> tuple[Path, Path]:
        """Write ``report.md`` and ``report.html`` into ``out_dir``; returns both paths."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        md_path = store.write_bytes(out / "report.md", self.markdown(out).encode("utf-8"))
        html_path = store.write_bytes(out / "report.html", self.html().encode("utf-8"))
        return md_path, html_path
