"""A small document model for reports: built once from the results, rendered to Markdown and HTML.

A `Document` is a title and a list of blocks (`Heading`, `Paragraph`, `BulletList`, `Table`,
`Figures`, `CodeBlock`, `Section`). Text in paragraphs and list items is inline Markdown of two
kinds only, `**bold**` and `` `code` ``: written as is to Markdown and converted (everything else
escaped) for HTML. Table cells are plain text, or `Examples` (prompt → response pairs), which
each format lays out its own way. `to_markdown` and `to_html` are the two renderers; the
Markdown they write is what the report has always written, byte for byte.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union


@dataclass
class Heading:
    text: str
    level: int = 2
    # Markdown: the content follows on the next line, without a blank line (the report's
    # failure, plot and configuration sections have always been written that way).
    tight: bool = False


@dataclass
class Paragraph:
    text: str  # inline Markdown: **bold**, `code`


@dataclass
class BulletList:
    items: list[str]
    # literal: the items are plain text (error messages), not inline Markdown; HTML shows them
    # as preformatted lines, so a long traceback line keeps its shape.
    literal: bool = False


@dataclass
class Examples:
    """A table cell holding (prompt, response) pairs, numbered from 1."""

    pairs: list[tuple[str, str]]


Cell = Union[str, Examples]


@dataclass
class Table:
    header: list[str]
    rows: list[list[Cell]]
    best: set[tuple[int, int]] = field(default_factory=set)  # (row, column) cells marked best
    css_class: str = ""  # HTML: the table's class
    column_classes: list[str] | None = None  # HTML: each column's cell class (where none is marked best)


@dataclass
class Image:
    path: Path  # the PNG, read (and embedded) by the HTML renderer
    alt: str
    link: str  # what the Markdown links to (relative to the report where possible)
    wide: bool = False  # HTML: the page's width instead of 640 px


@dataclass
class Figures:
    images: list[Image]


@dataclass
class CodeBlock:
    text: str
    language: str = ""


@dataclass
class Section:
    """Blocks kept together; in HTML a <section> of the given class."""

    blocks: list["Block"]
    css_class: str = ""


Block = Union[Heading, Paragraph, BulletList, Table, Figures, CodeBlock, Section]


@dataclass
class Document:
    title: str
    blocks: list[Block] = field(default_factory=list)
    style: str = ""  # HTML: the page's CSS

    def add(self, *blocks: Block) -> "Document":
        self.blocks.extend(blocks)
        return self


# ----------------------------------------------------------------------------- Markdown


def markdown_table(header: list[str], body: list[list[str]], best: set[tuple[int, int]] | None = None) -> str:
    """A Markdown table; cells in `best` ((row, column) pairs) in bold."""
    def cell(i: int, j: int, c: str) -> str:
        c = c.replace("|", "\\|")
        return f"**{c}**" if best and (i, j) in best else c

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(i, j, c) for j, c in enumerate(r)) + " |" for i, r in enumerate(body)]
    return "\n".join(lines)


def _md_cell(c: Cell) -> str:
    if isinstance(c, Examples):
        return " · ".join(f"{i + 1}. {p} → {a}" for i, (p, a) in enumerate(c.pairs)) or "-"
    return c


def _md_block(b: Block) -> str:
    if isinstance(b, Heading):
        return "#" * b.level + " " + b.text
    if isinstance(b, Paragraph):
        return b.text
    if isinstance(b, BulletList):
        return "\n".join(f"- {x}" for x in b.items)
    if isinstance(b, Table):
        return markdown_table(b.header, [[_md_cell(c) for c in r] for r in b.rows], b.best)
    if isinstance(b, Figures):
        return "\n".join(f"![{im.alt}]({im.link})" for im in b.images)
    if isinstance(b, CodeBlock):
        return f"```{b.language}\n{b.text}\n```"
    if isinstance(b, Section):
        return _md_blocks(b.blocks)
    raise TypeError(f"not a document block: {b!r}")


def _md_blocks(blocks: list[Block]) -> str:
    out = ""
    for k, b in enumerate(blocks):
        if k:
            prev = blocks[k - 1]
            out += "\n" if isinstance(prev, Heading) and prev.tight else "\n\n"
        out += _md_block(b)
    return out


def to_markdown(doc: Document) -> str:
    """The document as Markdown: blocks separated by a blank line, a newline at the end."""
    return _md_blocks([Heading(doc.title, level=1), *doc.blocks]) + "\n"


# ----------------------------------------------------------------------------- HTML


def inline_html(text: str) -> str:
    """Inline Markdown (**bold**, `code`) as HTML, everything else escaped. A backtick without
    its pair is kept as a character."""
    out = []
    for k, part in enumerate(text.split("**")):
        pieces = part.split("`")
        if len(pieces) % 2 == 0:  # an odd number of backticks: no code span
            pieces = [part]
        s = "".join(f"<code>{html.escape(p)}</code>" if i % 2 else html.escape(p) for i, p in enumerate(pieces))
        out.append(f"<strong>{s}</strong>" if k % 2 else s)
    return "".join(out)


def _thin_pm(text: str) -> str:
    # thin spaces around ±: wide tables (17 columns) fit a 1400 px page without wrapping
    return text.replace(" ± ", "\u2009±\u2009")


def html_table(h: list[str], b: list[list[Cell]], best: set[tuple[int, int]] | None = None, css_class: str = "",
               column_classes: list[str] | None = None) -> str:
    """An HTML table (in a horizontally scrolling box); cells in `best` get class "best"."""
    th = "".join(f"<th>{html.escape(x)}</th>" for x in h)

    def td(i: int, j: int, c: Cell) -> str:
        if isinstance(c, Examples):
            inner = "".join(f'<p class="ex">{k + 1}. {html.escape(p)} <span class="resp">→ {html.escape(a)}</span></p>'
                            for k, (p, a) in enumerate(c.pairs)) or "-"
            return f'<td class="examples">{inner}</td>'
        cls = "best" if best and (i, j) in best else (column_classes[j] if column_classes and j < len(column_classes) else "")
        return f"<td{f' class={chr(34)}{cls}{chr(34)}' if cls else ''}>{_thin_pm(html.escape(c))}</td>"

    trs = "".join("<tr>" + "".join(td(i, j, c) for j, c in enumerate(r)) + "</tr>" for i, r in enumerate(b))
    cls = f' class="{css_class}"' if css_class else ""
    return f'<div class="scroll"><table{cls}><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table></div>'


def _png_data_url(p: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(p).read_bytes()).decode()


def _html_block(b: Block) -> str:
    if isinstance(b, Heading):
        return f"<h{b.level}>{html.escape(b.text)}</h{b.level}>"
    if isinstance(b, Paragraph):
        return f"<p>{inline_html(b.text)}</p>"
    if isinstance(b, BulletList):
        if b.literal:
            return "<pre>" + html.escape("\n".join(b.items)) + "</pre>"
        return "<ul>" + "".join(f"<li>{inline_html(x)}</li>" for x in b.items) + "</ul>"
    if isinstance(b, Table):
        return html_table(b.header, b.rows, b.best, b.css_class, b.column_classes)
    if isinstance(b, Figures):
        return "".join(f'<figure class="{"wide" if im.wide else ""}"><img src="{_png_data_url(im.path)}" alt="{html.escape(im.alt)}">'
                       f"<figcaption>{html.escape(im.alt)}</figcaption></figure>" for im in b.images)
    if isinstance(b, CodeBlock):
        return f"<pre>{html.escape(b.text)}</pre>"
    if isinstance(b, Section):
        inner = "".join(_html_block(x) for x in b.blocks)
        return f'<section class="{b.css_class}">{inner}</section>' if b.css_class else f"<section>{inner}</section>"
    raise TypeError(f"not a document block: {b!r}")


def to_html(doc: Document) -> str:
    """The document as one self-contained HTML page (images embedded as base64 PNGs)."""
    body = "\n".join(_html_block(b) for b in [Heading(doc.title, level=1), *doc.blocks])
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(doc.title)}</title>\n'
            f"<style>\n{doc.style}</style></head><body>\n{body}\n</body></html>\n")
