"""Post-training int8 quantization of the digits model: held-out accuracy float vs int8, and the
error of every layer.

    python benchmarks/train_digits.py --out runs/digits       # train once (a few minutes)
    python benchmarks/ptq_digits.py --model runs/digits/run/model.npz

Without ``--model`` the model is trained first with ``train_digits.py``'s defaults. The same
stratified split as training (``train_digits.write_digits_folder``): calibration images are
drawn from the training images (eval transform: no augmentation), accuracy is measured on the
360 held-out test images that neither training nor calibration saw. ``npmnv3.quantize`` folds
batch norm, quantizes weights symmetrically (per output channel, or per tensor) and observes
activation ranges (running min/max, or their moving average); the int8 network then runs on
npmnv3's int8 kernels (torch's qnnpack arithmetic).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")   # what `import npmnv3` sets first

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

VARIANTS = (("per-channel", "minmax"), ("per-channel", "moving_average"),
            ("per-tensor", "minmax"), ("per-tensor", "moving_average"))


def accuracy(model, x, y, batch_size=64):
    pred = np.concatenate([model(x[i:i + batch_size]).argmax(1)
                           for i in range(0, len(x), batch_size)])
    return float(np.mean(pred == y)), pred


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model.npz written by train_digits.py")
    ap.add_argument("--calibration", type=int, default=256, help="calibration images")
    ap.add_argument("--input-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--all-layers", action="store_true",
                    help="every quantized module, not only the end of every block")
    args = ap.parse_args(argv)

    from train_digits import main as train_main
    from train_digits import write_digits_folder

    import npmnv3
    from npmnv3.data.folders import EvalTransform, ImageFolder
    from npmnv3.nn.ptq import layer_errors

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_path = args.model
        if model_path is None:
            train_main(["--out", str(tmp / "train"), "--no-progress"])
            model_path = tmp / "train" / "run" / "model.npz"
        model = npmnv3.load_model(model_path)
        n_train, n_test = write_digits_folder(tmp / "digits", args.input_size)
        tf = EvalTransform(args.input_size, args.input_size)
        train = ImageFolder(tmp / "digits" / "train", transform=tf)
        test = ImageFolder(tmp / "digits" / "val", transform=tf, classes=train.classes)
        xc = next(train.batches(args.calibration, shuffle=True, rng=args.seed))[0]
        xt, yt = map(np.concatenate, zip(*test.batches(128)))

    acc_f, pred_f = accuracy(model, xt, yt)
    print(f"# digits, MobileNetV3-Small width {model.config.width_mult}, input "
          f"{args.input_size}: {len(xc)} calibration images (training split, no augmentation), "
          f"{len(xt)} held-out test images\n")
    print("| model | weights | observer | held-out accuracy | top-1 agrees with float |")
    print("|---|---|---|---:|---:|")
    print(f"| float32 | | | {acc_f:.4f} | |")
    qmodels = {}
    for weights, observer in VARIANTS:
        q = npmnv3.quantize(model, xc, observer=observer, per_channel=weights == "per-channel")
        acc_q, pred_q = accuracy(q, xt, yt)
        qmodels[weights, observer] = q
        print(f"| int8 | {weights} | {observer} | {acc_q:.4f} | "
              f"{np.mean(pred_q == pred_f):.4f} |")

    rows = list(layer_errors(model, qmodels[VARIANTS[0]], xt[:64]))
    if not args.all_layers:                      # the tensor each block (and the head) ends with
        ends = ["quant", "features.0.2"] + [block_end(m) for m in model.features[1:-1]]
        rows = ends + [f"{model.features[-1].name}.2", "classifier.0", "classifier.3"]
    print(f"\nError of {'every quantized module' if args.all_layers else 'every block output'}: "
          f"relative RMS ||int8 - float|| / ||float|| on 64 held-out images, min/max observer, "
          f"accumulated from the input on\n")
    errs = {v: layer_errors(model, qmodels[v], xt[:64]) for v in VARIANTS[:3:2]}
    print("| module | per-channel weights | per-tensor weights |")
    print("|---|---:|---:|")
    for name in rows:
        print(f"| {name} | {errs[VARIANTS[0]][name]:.4f} | {errs[VARIANTS[2]][name]:.4f} |")


def block_end(m):
    """The quantized module whose output is block ``m``'s output."""
    return f"{m.name}.skip_add" if m.spec.use_residual else f"{m.layers[-1].name}.0"


if __name__ == "__main__":
    main()
