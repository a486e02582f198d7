"""One self-contained HTML page: inline CSS, plots embedded as base64 PNGs, no script, no network."""

from __future__ import annotations

import base64
import html
from datetime import datetime

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1360px;
       padding: 16px 20px 40px; color: #1d1d1f; }
h1 { font-size: 22px; margin: 8px 0 4px; } h2 { font-size: 17px; margin: 28px 0 8px; }
p.meta { color: #555; margin: 0 0 12px; }
.scroll { overflow-x: auto; border: 1px solid #ddd; border-radius: 6px; }
table { border-collapse: collapse; width: 100%; font-size: 12.5px; }
th, td { padding: 3px 6px; border-bottom: 1px solid #eee; text-align: right; }
th { background: #f5f5f7; vertical-align: bottom; } td.text, th.text { text-align: left; }
span.sd { color: #666; white-space: nowrap; }
tr.bad td { color: #a00; }
figure { margin: 12px 0 20px; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: 13px; }
details summary { cursor: pointer; margin: 8px 0; }
"""


def page(title: str, intro: str, sections: list[tuple[str, str]]) -> str:
    """A page from (heading, inner HTML) sections."""
    body = "\n".join(f'<h2 id="{_anchor(head)}">{html.escape(head)}</h2>\n{inner}' for head, inner in sections)
    stamp = datetime.now().strftime("%Y-%m-%d %H:%M")
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        f'<h1>{html.escape(title)}</h1>\n<p class="meta">{intro} Written {stamp} by '
        "<code>python -m lego.report</code>.</p>\n"
        f"{body}\n</body>\n</html>\n"
    )


def table(columns: list[str], rows: list[list[str]], text_columns: int = 1, bad_rows: set[int] | None = None) -> str:
    """A table that fits a laptop's width: headers and text cells wrap, a 'mean ± sd' cell wraps only before its
    '±' (the sd in grey); the first `text_columns` columns are left-aligned text. Scrolls sideways only when
    even the wrapped table is too wide."""
    bad_rows = bad_rows or set()
    head = "".join(f'<th class="{"text" if i < text_columns else ""}">{html.escape(c)}</th>'
                   for i, c in enumerate(columns))  # fmt: skip
    body = []
    for r, row in enumerate(rows):
        cells = "".join(f'<td class="{"text" if i < text_columns else ""}">{_cell(str(cell))}</td>'
                        for i, cell in enumerate(row))  # fmt: skip
        body.append(f'<tr class="{"bad" if r in bad_rows else ""}">{cells}</tr>')
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def _cell(text: str) -> str:
    mean, sep, sd = text.partition(" ± ")
    if not sep:
        return html.escape(text)
    return f'{html.escape(mean)} <span class="sd">± {html.escape(sd)}</span>'


def figure(png: bytes, alt: str, caption: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def _anchor(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")
