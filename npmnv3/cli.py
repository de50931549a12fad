"""The ``npmnv3`` command line (also ``python -m npmnv3``)."""

from __future__ import annotations

import argparse
import sys


def _cmd_selfcheck(args) -> int:
    from .selfcheck import run_selfcheck

    rows = run_selfcheck(seed=args.seed)
    width = max(len(r.kernel) for r in rows)
    for r in rows:
        mark = "ok  " if r.ok else "FAIL"
        print(f"{mark} {r.kernel:<{width}}  {r.check:<32} rel. error {r.error:.1e} "
              f"(tolerance {r.tolerance:.0e})")
    bad = sum(not r.ok for r in rows)
    print(f"{len(rows)} checks, {bad} over tolerance" + ("" if bad else ": all kernels agree"))
    return 1 if bad else 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="npmnv3",
        description="MobileNetV3 in NumPy and Numba, checked against torchvision.")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("selfcheck", help="check every kernel's backward by finite differences "
                                         "and fast == naive (no torch needed)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_selfcheck)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
