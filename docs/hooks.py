"""MkDocs hooks of the npmnv3 site (mkdocs.yml ``hooks:``): everything the build adds to docs/.

* **Notebooks**: every ``notebooks/*.ipynb`` becomes a page ``notebooks/NAME.ipynb`` rendered
  by mkdocs-jupyter from its executed copy in ``build/notebooks/`` (``executed_notebooks.py``):
  the copy the test suite wrote, or one executed here when there is none for the current
  source. The "Notebooks" section of the nav is filled from the same glob, so a new notebook is
  on the site without editing mkdocs.yml.
* **Repository pages**: ``notebooks/README.md``, ``benchmarks/README.md`` and the repository
  files that they and README.md link to are shown at their repository paths
  (``weights/README.md`` ...), so those links resolve on the site too.
* **Generated files**: the landing page's architecture figure (drawn from ``npmnv3.summary``),
  the ``npmnv3`` command's ``--help`` texts (``<!-- cli-help -->`` in a page), and MathJax 3
  (copied from the ``django-static-mathjax`` package: the site loads nothing from the network).
* **Offline check**: a page that loads a script, stylesheet or image from another host fails
  the build (nbconvert's templates load MathJax from a CDN; that block is removed).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import sys
import time
from pathlib import Path

import executed_notebooks as nbx
from mkdocs.exceptions import PluginError
from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, InclusionLevel

log = logging.getLogger("mkdocs.hooks.npmnv3")
ROOT = nbx.ROOT
if str(ROOT) not in sys.path:          # import npmnv3 from this checkout, as mkdocstrings reads it
    sys.path.insert(0, str(ROOT))
NOTEBOOKS_SECTION = "Notebooks"
# Repository files shown on the site at their own paths: these, and every repository file that
# they or README.md link to (a benchmark's plot, a licence file), so those links resolve.
MOUNTED = ("notebooks/README.md", "benchmarks/README.md")
RELATIVE_LINK = re.compile(r"\]\((?![a-z]+:|/|#)([^)#\s]+)")
MATHJAX = "assets/mathjax/tex-svg-full.js"        # must match extra_javascript in mkdocs.yml
FIGURE = "assets/architecture.svg"
CLI_MARKER = "<!-- cli-help -->"
# "<!-- api: npmnv3.kernels -->": the package's docstring and every public module in it.
API_MARKER = re.compile(r"<!-- api: ([\w.]+) -->")
# Replaced by a warning while the npmnv3 of this checkout has no `evaluate` command.
EVALUATE_MARKER = "<!-- evaluate-status -->"
EVALUATE_MISSING = """!!! warning "`npmnv3 evaluate` is not in this version of npmnv3 yet"
    This page describes the command as it is being built (issue 11, item 5). Until it lands,
    `npmnv3 evaluate` stops with "invalid choice"; steps 1 and 2 work today. This box
    disappears from the site by itself once the command exists.
"""
# nbconvert's MathJax 2 block (script from a CDN + its config); the site's MathJax 3 replaces it.
NBCONVERT_MATHJAX = re.compile(r"<!-- Load mathjax -->.*?<!-- End of mathjax configuration -->",
                               re.DOTALL)
EXTERNAL_RESOURCE = re.compile(
    r"<(script|img|iframe|source|audio|video)\b[^>]*\bsrc=[\"']?((?:https?:)?//[^\"' >]+)"
    r"|<link\b[^>]*\bhref=[\"']?((?:https?:)?//[^\"' >]+)", re.IGNORECASE)


def _notebook_title(path: Path) -> str:
    """The first level-1 heading of the notebook's first markdown cell, else its file name."""
    cells = json.loads(path.read_text(encoding="utf-8")).get("cells", [])
    for cell in cells:
        if cell.get("cell_type") == "markdown":
            src = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
            m = re.search(r"^#\s+(.+?)\s*$", src, re.MULTILINE)
            if m:
                return m.group(1)
            break
    return path.stem


def on_config(config):
    """Fill the nav's "Notebooks" section with every notebook, after its index page."""
    for item in config.nav or []:
        if isinstance(item, dict) and NOTEBOOKS_SECTION in item:
            section = item[NOTEBOOKS_SECTION]
            section.extend({_notebook_title(p): f"notebooks/{p.name}"} for p in nbx.sources())
            return config
    raise PluginError(f"mkdocs.yml: the nav needs a '{NOTEBOOKS_SECTION}:' section (a list) "
                      f"for the notebooks")


@event_priority(100)                          # before mkdocs-jupyter turns .ipynb into pages
def on_files(files, config):
    def at(src_uri: str, src_dir: Path, **kw) -> File:   # src_dir/src_uri shown at src_uri
        return File(src_uri, str(src_dir), config.site_dir, config.use_directory_urls, **kw)

    for path in nbx.sources():
        copy = _executed(path)                          # build/notebooks/NAME.ipynb
        files.append(at(f"notebooks/{copy.name}", copy.parent.parent))
    for rel in _mounted():
        if files.get_file_from_path(rel) is None:
            # a linked page need not be in the nav (no "not included in the nav" warning)
            files.append(at(rel, ROOT, inclusion=InclusionLevel.NOT_IN_NAV))
    files.append(File.generated(config, FIGURE, content=architecture_svg()))
    files.append(File.generated(config, MATHJAX, abs_src_path=str(_mathjax_file())))
    return files


def _mounted() -> list[str]:
    """MOUNTED plus the repository files that they and README.md link to (one level)."""
    found = list(MOUNTED)
    for md in ("README.md", *MOUNTED):
        base = (ROOT / md).parent
        for target in RELATIVE_LINK.findall((ROOT / md).read_text(encoding="utf-8")):
            path = (base / target).resolve()
            if path.is_file() and path.is_relative_to(ROOT):
                rel = path.relative_to(ROOT).as_posix()
                if rel not in found and rel != "README.md":
                    found.append(rel)
    return found


def _executed(path: Path) -> Path:
    """The executed copy of a notebook; executed now (offline) if the tests left none."""
    copy = nbx.fresh_copy(path)
    if copy is not None:
        return copy
    log.info(f"executing notebooks/{path.name}: build/notebooks/ has no copy executed from it "
             f"and npmnv3 as they are now (tests/test_notebooks.py writes them)")
    start = time.perf_counter()
    try:
        copy, _ = nbx.ensure_executed(path)
    except Exception as e:                              # nbclient's cell errors and timeouts
        raise PluginError(f"notebooks/{path.name} failed to execute: {e}") from e
    log.info(f"executed notebooks/{path.name} in {time.perf_counter() - start:.1f} s")
    return copy


def _mathjax_file() -> Path:
    try:
        import mathjax  # the django-static-mathjax package
    except ImportError as e:
        raise PluginError("MathJax is missing: pip install -e '.[docs]' "
                          "(django-static-mathjax ships MathJax 3; Django is not needed)") from e
    return Path(mathjax.__file__).parent / "static" / "mathjax" / "es5" / "tex-svg-full.js"


def on_page_markdown(markdown, page, config, files):
    markdown = API_MARKER.sub(lambda m: api_markdown(m.group(1)), markdown)
    if CLI_MARKER in markdown:
        markdown = markdown.replace(CLI_MARKER, cli_help_markdown())
    if EVALUATE_MARKER in markdown:
        status = "" if "evaluate" in cli_commands() else EVALUATE_MISSING
        markdown = markdown.replace(EVALUATE_MARKER, status)
    return markdown


def on_page_content(html, page, config, files):
    if page.file.src_uri.endswith(".ipynb"):
        html = NBCONVERT_MATHJAX.sub("", html)
    return html


def on_post_page(output, page, config):
    m = EXTERNAL_RESOURCE.search(output)
    if m:
        raise PluginError(f"{page.file.src_uri}: the page loads {m.group(2) or m.group(3)} from "
                          f"the network; the site must work offline")
    return output


# ----------------------------------------------------------------------------- generated

def api_markdown(package: str) -> str:
    """mkdocstrings blocks for ``package`` (its docstring, if it says more than its name) and
    for each of its public modules, found on disk: a new module is documented without an edit."""
    import ast

    folder = ROOT.joinpath(*package.split("."))
    if not (folder / "__init__.py").is_file():
        raise PluginError(f"<!-- api: {package} -->: {folder} is not a package")
    doc = ast.get_docstring(ast.parse((folder / "__init__.py").read_text(encoding="utf-8")))
    blocks = []
    if doc and len(doc.split()) > 1:
        blocks.append(f"::: {package}\n    options:\n      members: false\n"
                      f"      show_root_heading: false\n")
    blocks += [f"::: {package}.{p.stem}\n" for p in sorted(folder.glob("*.py"))
               if not p.stem.startswith("_")]
    return "\n".join(blocks)


def cli_commands() -> list[str]:
    """The sub-commands of ``npmnv3``, in the order of its parser."""
    import argparse

    from npmnv3 import cli

    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return list(sub.choices)


def cli_help_markdown() -> str:
    """``npmnv3 --help`` and ``npmnv3 COMMAND --help`` for every sub-command, as Markdown."""
    from npmnv3 import cli

    def help_text(argv):
        out = io.StringIO()
        old = os.environ.get("COLUMNS")
        os.environ["COLUMNS"] = "80"                   # argparse wraps to the terminal width
        try:
            with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
                cli.main([*argv, "--help"])
        finally:
            if old is None:
                del os.environ["COLUMNS"]
            else:
                os.environ["COLUMNS"] = old
        return out.getvalue().rstrip()

    parts = ["```text", f"$ npmnv3 --help\n{help_text([])}", "```", ""]
    for name in cli_commands():
        parts += [f"### `npmnv3 {name}`", "", "```text", f"$ npmnv3 {name} --help",
                  help_text([name]), "```", ""]
    return "\n".join(parts)


def architecture_svg() -> bytes:
    """MACs per top-level module of MobileNetV3-Large and -Small at 224x224, from
    ``npmnv3.summary`` (shape arithmetic on the module tree: nothing is run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import npmnv3

    colours = {"conv": "#4c72b0", "block": "#55a868", "residual": "#8172b2", "head": "#c44e52"}
    labels = {"conv": "convolution (stem, last 1x1)", "block": "inverted residual block",
              "residual": "inverted residual block + skip", "head": "pool + classifier"}
    models = (("MobileNetV3-Large", npmnv3.mobilenet_v3_large()),
              ("MobileNetV3-Small", npmnv3.mobilenet_v3_small()))
    with plt.rc_context({"svg.fonttype": "none", "svg.hashsalt": "npmnv3",
                         "font.size": 9}):
        fig, axes = plt.subplots(1, 2, figsize=(10, 5.2), layout="constrained")
        for ax, (title, model) in zip(axes, models):
            s = npmnv3.summary(model, (224, 224))
            rows = [r for r in s.rows if r.depth == 0 and r.name != "avgpool"]
            kinds = ["head" if r.name == "classifier" else
                     "residual" if "residual" in r.kind.split("+")[-1] else
                     "block" if r.kind.startswith("InvertedResidual") else "conv" for r in rows]
            y = range(len(rows))
            macs = [r.macs / 1e6 for r in rows]
            ax.barh(y, macs, color=[colours[k] for k in kinds])
            for i, (r, m) in enumerate(zip(rows, macs)):
                shape = r.output_shape
                text = (f"{shape[1]}x{shape[2]}x{shape[3]}" if len(shape) == 4
                        else f"{shape[1]} logits")
                ax.text(m + max(macs) * 0.01, i, text, va="center", fontsize=7.5)
            ax.set_yticks(list(y), [r.name for r in rows], fontsize=7.5)
            ax.invert_yaxis()
            ax.set_xlim(0, max(macs) * 1.28)
            ax.set_xlabel("million multiply-accumulates (one 224x224 image)")
            ax.set_title(f"{title}: {s.total_macs / 1e6:.1f} M MACs, "
                         f"{s.total_params / 1e6:.2f} M parameters", fontsize=9.5)
            ax.spines[["top", "right"]].set_visible(False)
        handles = [plt.Rectangle((0, 0), 1, 1, color=colours[k]) for k in colours]
        fig.legend(handles, [labels[k] for k in colours], loc="outside lower center", ncols=4,
                   frameon=False)
        out = io.BytesIO()
        fig.savefig(out, format="svg", metadata={"Date": None})
        plt.close(fig)
    return out.getvalue()
