"""Print the README's segmentation parity table (a measurement, not a test; ~2 min on 2 cores).

    python benchmarks/seg_parity.py

For LR-ASPP and DeepLabV3 (with its aux head) on checkpoints torchvision writes with randomised
batch-norm statistics: the error of ``out`` (and ``aux``), of the worst module output, of dL/dx
and of the worst parameter gradient, in eval and train mode. float64 is against torchvision in
float64; float32 against that float64 truth, next to torchvision float32's own error (the
"torch float32" rows). The numbers are those ``tests/test_segmentation.py`` computes and
asserts (its ``compare``, on its checkpoints): a failing case raises here as it fails there.
Errors: max |difference| / max |reference| (gradients: relative to max(own largest value,
1e-3 x the network's largest gradient), see tests/seg_support.py).
"""

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]     # this checkout's npmnv3 and test helpers

import numpy as np  # noqa: E402
import test_segmentation as T  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402

# (H, W) and batch of each mode: odd, non-square; train batch as the test's (see TRAIN_BATCH)
EVAL_SIZE, EVAL_BATCH, TRAIN_SIZE = (65, 49), 2, (41, 31)


def row(*cells):
    print("| " + " | ".join(cells) + " |")


def errors(w):
    return [f"{w[k]:.1e}" for k in ("out", "modules", "dx", "grads")]


def main():
    checkpoints = T.make_checkpoints(torch, torchvision, tempfile.mkdtemp())
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
          f"numpy {np.__version__}\n")
    row("model", "mode", "dtype", "input", "out", "worst module", "dL/dx",
        "worst parameter gradient")
    row(*["---"] * 4, *["---:"] * 4)
    for kind in T.BUILDERS:
        for training in (False, True):
            size = TRAIN_SIZE if training else EVAL_SIZE
            n = T.TRAIN_BATCH[kind] if training else EVAL_BATCH
            for dt in (np.float64, np.float32):
                w = T.compare(kind, checkpoints, dt, size, training=training, batch=n)
                # out: worst of "out" and "aux" (DeepLabV3's aux head)
                w["out"] = max(w.pop(k) for k in ("out", "aux") if k in w)
                row(kind, "train" if training else "eval", np.dtype(dt).name,
                    f"{n}x3x{size[0]}x{size[1]}", *errors(w))
                if "torch" in w:
                    row("", "", "torch float32", "", *errors(w["torch"]))


if __name__ == "__main__":
    main()
