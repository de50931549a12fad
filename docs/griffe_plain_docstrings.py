"""Griffe extension (mkdocs.yml): show npmnv3's docstrings as written, not reinterpreted.

The docstrings are plain text meant for ``help()``: formulas such as ``dx[n, c, i*s + u*d]``
sit in ordinary lines, a few tables are reStructuredText "simple tables" (``====`` rules).
Markdown would turn ``i*s + u*d`` into emphasis, swallow ``<file>`` as an HTML tag and run a
table together into one paragraph. This extension, applied to every docstring as it is loaded:

* escapes ``*``, ``_`` and ``<`` outside code spans and indented code blocks;
* rewrites simple tables as Markdown tables;
* shows lines indented deeper than their paragraph's first line (aligned formulas) as a code
  block, after the line that introduces them if it ends with a colon.
"""

from __future__ import annotations

import re

import griffe

RULE = re.compile(r"^\s*=+(\s+=+)+\s*$")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
LIST_ITEM = re.compile(r"^\s*([-*+]|\d+[.)])\s")


def _escape(text: str) -> str:
    """Escape Markdown's emphasis and HTML characters outside `code spans`."""
    out, pos = [], 0
    for m in CODE_SPAN.finditer(text):
        out.append(_escape_plain(text[pos:m.start()]))
        out.append(m.group(0))
        pos = m.end()
    out.append(_escape_plain(text[pos:]))
    return "".join(out)


def _escape_plain(s: str) -> str:
    s = s.replace("\\", "\\\\").replace("*", "\\*").replace("_", "\\_")
    return re.sub(r"<(?=[A-Za-z/!])", "&lt;", s)


def _table(lines: list[str]) -> list[str]:
    """A simple table (rule, header, rule, rows, rule) as a Markdown table."""
    rule = lines[0]
    spans = [(m.start(), m.end()) for m in re.finditer(r"=+", rule)]

    def cells(line: str) -> list[str]:
        bounds = [start for start, _ in spans[1:]] + [None]
        starts = [start for start, _ in spans]
        return [_escape(line[a:b].strip()).replace("|", "\\|") for a, b in zip(starts, bounds)]

    header, rows = lines[1], [ln for ln in lines[3:] if ln.strip() and not RULE.match(ln)]
    md = ["| " + " | ".join(cells(header)) + " |", "|" + "---|" * len(spans)]
    return md + ["| " + " | ".join(cells(r)) + " |" for r in rows]


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _paragraph(lines: list[str]) -> list[str]:
    """One paragraph of text (no blank line inside) as Markdown."""
    base = _indent(lines[0])
    out = []
    for k, line in enumerate(lines):
        item = LIST_ITEM.match(line)
        if item:
            if k and not LIST_ITEM.match(lines[k - 1]) and _indent(line) <= base:
                out.append("")                              # Markdown lists need a blank line
            base = item.end()
            out.append(line[:base] + _escape(line[base:]))  # the marker stays a marker
            continue
        if k and _indent(line) > base:                      # hanging lines: a formula block
            head = lines[:k] if lines[k - 1].rstrip().endswith(":") else []
            block = lines[len(head):]
            first = min(_indent(ln) for ln in block)
            return ([_escape(ln) for ln in head] + [""] * bool(head)
                    + ["    " + ln[first:] for ln in block])
        out.append(_escape(line))
    return out


def to_markdown(text: str) -> str:
    paragraphs, current = [], []
    for line in text.splitlines():
        if line.strip():
            current.append(line)
        elif current:
            paragraphs.append(current)
            current = []
    if current:
        paragraphs.append(current)
    out: list[str] = []
    for lines in paragraphs:
        if _indent(lines[0]) >= 4:                          # an indented code block
            out += lines
        elif RULE.match(lines[0]) and len(lines) > 3 and RULE.match(lines[2]):
            out += _table(lines)
        else:
            out += _paragraph(lines)
        out.append("")
    return "\n".join(out).rstrip() + "\n"


class PlainDocstrings(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = to_markdown(obj.docstring.value)
