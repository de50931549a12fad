"""A real training run: MobileNetV3-Small from scratch on scikit-learn's handwritten digits.

    python benchmarks/train_digits.py                  # the measured run (a few minutes, 2 cores)
    python benchmarks/train_digits.py --epochs 3       # a quick look

``sklearn.datasets.load_digits`` ships the 1797 8x8 images (values 0..16) inside the package, so
nothing is downloaded (``pip install scikit-learn``). They are written as an ImageFolder of RGB
PNGs (gray copied to R, G, B; bilinear upscaling to ``--image-size``), with a fixed stratified
20 % test split (``train_test_split(stratify=y, random_state=0)``) in ``val/`` that is never
trained on; ``fit`` evaluates it after every epoch and nothing is selected on it (the number
reported is the last epoch's). Printed: held-out accuracy, seconds per epoch, ms per image for a
training step (with data loading and augmentation) and for inference (eval mode, fused path).

Why these settings: at 32x32 input MobileNetV3-Small's last stages run at 1x1 (output stride
32), where batch norm normalises over the batch alone; 64x64 input keeps them at 2x2 at about
twice the cost of 32x32. Digits are neither flipped nor heavily cropped: no horizontal flip, crop
area (0.5, 1), and validation sees the whole image (resize = crop = input size).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

# The training path calls multi-threaded OpenBLAS between Numba loops (README, "Speed").
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

import numpy as np  # noqa: E402


def write_digits_folder(root, image_size=32, test_fraction=0.2, seed=0) -> tuple[int, int]:
    """root/train/<digit>/*.png and root/val/<digit>/*.png; returns (n_train, n_test)."""
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    idx = np.arange(len(digits.target))
    train_idx, test_idx = train_test_split(idx, test_size=test_fraction, random_state=seed,
                                           stratify=digits.target)
    for split, ids in (("train", train_idx), ("val", test_idx)):
        for i in ids:
            folder = Path(root) / split / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            gray = Image.fromarray(np.round(digits.images[i] * (255 / 16)).astype(np.uint8))
            gray.resize((image_size, image_size), Image.BILINEAR).convert("RGB").save(
                folder / f"{i:04d}.png")
    return len(train_idx), len(test_idx)


def inference_ms_per_image(model, data, batch_size=64, reps=5):
    """Median ms per image of the eval-mode forward alone (images already decoded)."""
    x = np.concatenate([xb for xb, _ in data.batches(batch_size)])[:batch_size]
    model.eval()
    model(x)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - t0)
    return 1e3 * sorted(times)[reps // 2] / len(x)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--width-mult", type=float, default=0.5)
    ap.add_argument("--input-size", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=64, help="side of the PNGs written")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--weight-decay", type=float, default=5e-5)
    ap.add_argument("--label-smoothing", type=float, default=0.1)
    ap.add_argument("--min-scale", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="output directory (default: a temporary one)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    import numba

    from npmnv3 import mobilenet_v3_small
    from npmnv3.train import evaluate, fit, load_folders

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        data_dir = out / "digits"
        n_train, n_test = write_digits_folder(data_dir, args.image_size)
        train, val = load_folders(data_dir, size=args.input_size, scale=(args.min_scale, 1.0),
                                  hflip=0.0, resize_size=args.input_size)
        model = mobilenet_v3_small(width_mult=args.width_mult, num_classes=10, seed=args.seed)
        print(f"# digits: {n_train} train / {n_test} held-out test images, {args.image_size}px "
              f"PNG; MobileNetV3-Small width {args.width_mult}, input {args.input_size}, "
              f"{model.num_parameters():,} parameters")
        print(f"# {platform.machine()}, {os.cpu_count()} cores, Numba threads "
              f"{numba.get_num_threads()}, Python {sys.version.split()[0]}, NumPy "
              f"{np.__version__}; SGD lr {args.lr} momentum 0.9 cosine, wd "
              f"{args.weight_decay}, label smoothing {args.label_smoothing}, batch "
              f"{args.batch_size}, BN momentum 0.1, {args.epochs} epochs, seed {args.seed}")
        t0 = time.perf_counter()
        h = fit(model, train, val, epochs=args.epochs, batch_size=args.batch_size,
                optimizer="sgd", lr=args.lr, momentum=0.9, weight_decay=args.weight_decay,
                label_smoothing=args.label_smoothing, scheduler="cosine", out_dir=out / "run",
                seed=args.seed, progress=not args.no_progress)
        total = time.perf_counter() - t0
        t1 = time.perf_counter()
        _, acc = evaluate(model, val, batch_size=args.batch_size)
        eval_s = time.perf_counter() - t1
        s_epoch = float(np.median(h["train_seconds"]))
        s_best = float(np.min(h["train_seconds"]))
        print("\n| epoch | lr | train loss | train acc | test loss | test acc | train s |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for i, e in enumerate(h["epoch"]):
            print(f"| {e} | {h['lr'][i]:.4f} | {h['train_loss'][i]:.4f} | "
                  f"{h['train_acc'][i]:.4f} | {h['val_loss'][i]:.4f} | {h['val_acc'][i]:.4f} | "
                  f"{h['train_seconds'][i]:.1f} |")
        print(f"\nheld-out test accuracy (last epoch, {n_test} images): {acc:.4f}")
        print(f"training: {s_epoch:.1f} s/epoch median ({s_best:.1f} fastest), "
              f"{1e3 * s_epoch / n_train:.2f} ms/image median ({1e3 * s_best / n_train:.2f} "
              f"fastest; forward + backward + SGD, with PNG decoding and augmentation); whole "
              f"run {total:.0f} s")
        print(f"inference: {1e3 * eval_s / n_test:.2f} ms/image with PNG decoding, "
              f"{inference_ms_per_image(model, val):.3f} ms/image forward only (batch 64)")


if __name__ == "__main__":
    main()
