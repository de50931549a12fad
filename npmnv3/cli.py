"""The ``npmnv3`` command line (also ``python -m npmnv3``): parsing and the shared run wrapper.

    npmnv3 selfcheck                      every kernel's backward and fast == naive, no torch
    npmnv3 summary --model large          per-layer shapes, parameters and MACs
    npmnv3 convert IN.pth OUT.npz         a MobileNetV3 checkpoint -> .npz with metadata
    npmnv3 compare --model small          module-by-module diff against torchvision (needs torch)
    npmnv3 weights list|fetch NAME|path NAME   the official checkpoints (download, hash check)
    npmnv3 classify IMAGE_OR_DIR...       top-k classes (weights fetched if needed)
    npmnv3 evaluate DIR                   top-1/top-5 accuracy over an image-folder tree
    npmnv3 segment IMAGE_OR_DIR...        VOC segmentation masks with LR-ASPP or DeepLabV3
    npmnv3 train --model small --data DIR --out DIR   train / fine-tune on an image folder

Each sub-command registers itself: a module in ``COMMANDS`` has ``register(subparsers)``, which
adds its parser and sets ``run=<function(args) -> exit code>`` (command bodies live in
``npmnv3/tools/`` and ``npmnv3/train/cli.py``). ``main`` runs the command with one behaviour
for all of them:

* exit 0 on success; 1 when the input is wrong (a missing or malformed file, weights that fit
  no MobileNetV3, an image that could not be read), with one line on stderr; 2 for usage errors
  (argparse's, and options that do not fit together); 130 on Ctrl-C, with one line naming what
  was interrupted (nothing half-written is left: every file is written atomically);
* warnings are printed as one ``npmnv3 CMD: warning: ...`` line;
* before a command that runs Numba kernels on a machine where none is compiled yet, one line
  says so (compiling takes ~10-20 s, once).
"""

from __future__ import annotations

import argparse
import sys
import warnings

# Modules with a ``register(subparsers)``, in the order ``npmnv3 --help`` lists them.
COMMANDS = ("npmnv3.tools.commands", "npmnv3.tools.evaluate", "npmnv3.train.cli")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    from . import __version__
    from .tools.cliargs import HelpFormatter

    ap = argparse.ArgumentParser(
        prog="npmnv3", formatter_class=HelpFormatter,
        description="MobileNetV3 in NumPy and Numba, checked against torchvision.")
    ap.add_argument("--version", action="version", version=f"npmnv3 {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return ap


def one_line(msg) -> str:
    """A multi-line error as one line: its first line, the headings of the following
    (unindented) lines without their lists, and a closing hint in full."""
    lines = [ln for ln in str(msg).splitlines() if ln.strip()] or ["(no message)"]
    parts = [lines[0].rstrip(":")]
    for ln in lines[1:]:
        if ln.startswith("hint:"):
            parts.append(ln)
        elif not ln[0].isspace():
            parts.append(ln.split(":")[0])
    return "; ".join(parts)


def _show_warning(prog):
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"{prog}: warning: {one_line(message)}", file=sys.stderr)
    return show


def _run(args) -> int:
    """Run the parsed command with the shared handling of errors, warnings and Ctrl-C."""
    from .tools.cliargs import UsageError

    prog = f"npmnv3 {args.command}"
    saved = warnings.showwarning
    warnings.showwarning = _show_warning(prog)
    try:
        if getattr(args, "uses_kernels", False):
            from .tools.jitcache import announce_compile
            announce_compile()
        return args.run(args)
    except UsageError as e:
        args.parser.print_usage(sys.stderr)
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:          # CheckpointError, WeightsError: ValueErrors
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        note = getattr(args, "on_interrupt", None)
        print(f"{prog}: interrupted" + (note() if note else ""), file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = saved


def main(argv: list[str] | None = None) -> int:
    """Run ``npmnv3 argv...``; returns the exit code (see the module docstring)."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    try:
        args = build_parser().parse_args(argv)
    except KeyboardInterrupt:
        print("npmnv3: interrupted", file=sys.stderr)
        return 130
    except SystemExit as e:                      # --help, --version, usage errors
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    try:
        return _run(args)
    except KeyboardInterrupt:                    # a second Ctrl-C while reporting the first
        return 130


if __name__ == "__main__":
    sys.exit(main())
