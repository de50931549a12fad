"""Throughput of ``npmnv3 evaluate``: images/s over an ImageFolder tree of synthetic JPEGs.

    cpu time python benchmarks/bench_evaluate.py [--images 768] [--model large] [--reps 3]

Builds (once, in a temporary directory) ``--images`` random 500x375 JPEGs (ImageNet's typical
size) in 10 class folders and random-weight .npz of the model (the arithmetic is the same as
with the official weights), then runs ``npmnv3 evaluate`` in a fresh process per run, with the
default two decoding workers and with ``--workers 0`` (decoding in the main process),
interleaved, and prints the images/s of each run from its JSON report (decoding, preprocessing,
the network and the bookkeeping: the whole command, minus interpreter start-up). Run it under
``cpu time`` so nothing else shares the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def make_tree(root: Path, n: int, seed: int = 0) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        d = root / f"class{i % 10}"
        d.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 256, (1, 1, 3))
        px = np.clip(base + rng.integers(-40, 40, (375, 500, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(px).save(d / f"{i}.jpg", quality=90)
    return root


def make_weights(path: Path, arch: str) -> Path:
    sys.path.insert(0, str(REPO))
    import npmnv3
    from npmnv3.data.preprocess import imagenet_preprocessing
    from npmnv3.io.load import save_weights

    model = getattr(npmnv3, f"mobilenet_v3_{arch}")(num_classes=10, seed=0)
    save_weights(path, model, classes=[f"class{i}" for i in range(10)],
                 preprocessing=imagenet_preprocessing(256, 224))
    return path


def run(tree: Path, weights: Path, workers: int | None, batch_size: int) -> dict:
    report = tree.parent / "report.json"
    argv = [sys.executable, "-m", "npmnv3", "evaluate", str(tree), "--weights", str(weights),
            "--batch-size", str(batch_size), "--no-progress", "--report", str(report)]
    if workers is not None:
        argv += ["--workers", str(workers)]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL)
    return json.loads(report.read_text())["timing"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=768)
    ap.add_argument("--model", choices=("large", "small"), default="large")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tree = make_tree(Path(tmp) / "val", args.images)
        weights = make_weights(Path(tmp) / "model.npz", args.model)
        run(tree, weights, 0, args.batch_size)          # warm the Numba cache, page cache
        rows = {"2 workers (default)": [], "--workers 0": []}
        for _ in range(args.reps):
            for name, workers in (("2 workers (default)", None), ("--workers 0", 0)):
                t = run(tree, weights, workers, args.batch_size)
                rows[name].append((t["images_per_second"], t["inference_seconds"] / t["seconds"]))
    print(f"npmnv3 evaluate, MobileNetV3-{args.model}, {args.images} JPEGs 500x375, batch "
          f"{args.batch_size}, {args.reps} runs")
    print("| decoding | images/s (runs) | range | network share of the time |")
    print("|---|---|---:|---:|")
    for name, r in rows.items():
        ips = [x for x, _ in r]
        share = [s for _, s in r]
        print(f"| {name} | {', '.join(f'{x:.1f}' for x in ips)} | {min(ips):.1f}-{max(ips):.1f} "
              f"| {100 * min(share):.0f}-{100 * max(share):.0f} % |")


if __name__ == "__main__":
    main()
