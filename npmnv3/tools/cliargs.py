"""What every ``npmnv3`` sub-command's parser shares: the help formatter that shows defaults,
argument types that name the option in their error, the architecture options, and
``UsageError`` (a wrong combination of options found after parsing: exit 2 like argparse's own
usage errors, while a bad input file or value exits 1).

Kept free of heavy imports: building the parser must stay fast (``npmnv3 --help``).
"""

from __future__ import annotations

import argparse


class UsageError(Exception):
    """The options do not fit together (exit 2, with the sub-command's usage line)."""


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, with ``(default: X)`` after every option that has a default."""

    def _get_help_string(self, action):
        text = action.help or ""
        d = action.default
        if d is None or d is False or d is argparse.SUPPRESS or "%(default)" in text \
                or "default" in text or not action.option_strings:
            return text
        shown = " ".join(map(str, d)) if isinstance(d, (list, tuple)) else "%(default)s"
        return f"{text} (default: {shown})"


def _int_at_least(minimum: int, what: str):
    """argparse type: an integer >= ``minimum`` (argparse names the option in the error)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
        return value
    parse.__name__ = what
    return parse


positive_int = _int_at_least(1, "a positive integer")
nonnegative_int = _int_at_least(0, "an integer >= 0")


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def positive_float(text: str) -> float:
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value:g}")
    return value


def nonnegative_float(text: str) -> float:
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value:g}")
    return value


def fraction(text: str) -> float:
    """A number in [0, 1]."""
    value = _number(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value:g}")
    return value


def open_fraction(text: str) -> float:
    """A number in (0, 1]."""
    value = _number(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value:g}")
    return value


def add_arch_args(p, *, required: bool, defaults: bool, models=("large", "small")):
    """--model, --width-mult, --reduced-tail, --dilated, --num-classes (torchvision's builder
    arguments). ``defaults=False``: None where not given (the weights decide). ``models``:
    the --model choices (summary also takes the segmentation models)."""
    d = (lambda v: v) if defaults else (lambda v: None)
    p.add_argument("--model", choices=models, required=required,
                   help="mobilenet_v3_large or mobilenet_v3_small"
                        + (" (or lraspp / deeplabv3 on mobilenet_v3_large)"
                           if len(models) > 2 else "")
                        + ("" if required or defaults else " (default: what the weights hold)"))
    p.add_argument("--width-mult", type=positive_float, default=d(1.0), metavar="W",
                   help="channel multiplier (torchvision's width_mult)")
    p.add_argument("--reduced-tail", action="store_true", default=d(False),
                   help="halve the channels of the last stage (torchvision's reduced_tail)")
    p.add_argument("--dilated", action="store_true", default=d(False),
                   help="dilate the last stage: output stride 16 (torchvision's dilated)")
    p.add_argument("--num-classes", type=positive_int, default=d(1000), metavar="N",
                   help="classifier outputs")


def add_input_size(p, *, default, what: str):
    """--input-size H [W] (one number: a square), the same for every command that has it."""
    p.add_argument("--input-size", type=positive_int, nargs="+", default=default,
                   metavar=("H", "W"), help=f"{what}: height and width, or one number for a "
                                            f"square")


def input_size(args) -> tuple[int, int] | None:
    """(H, W) from --input-size (None if not given); more than two numbers is a usage error."""
    size = args.input_size
    if size is None:
        return None
    if len(size) > 2:
        raise UsageError(f"argument --input-size: takes H or H W, got {len(size)} numbers")
    return (size[0], size[-1])
