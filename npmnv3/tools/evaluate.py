"""``npmnv3 evaluate``: top-1 / top-5 accuracy of a MobileNetV3 over an image-folder tree.

``evaluate_folder(root, classifier)`` reads ``root/<class>/**/<image>`` (torchvision's
``ImageFolder`` layout, ``IMAGE_EXTENSIONS``), maps each class folder to the model's class index
(``class_mapping``), prepares every image exactly as torchvision's reference evaluation does
(``torchvision/references/classification/train.py`` with the weights' ``transforms()``: the
``ImageFolder`` loader ``Image.open(f).convert("RGB")``, no EXIF rotation, then
``ImageClassification(crop_size, resize_size)``: ``npmnv3.preprocess``, equal to it bit for
bit) and counts the images whose label is the first / among the first five predictions.

Decoding and preprocessing run in worker processes (``multiprocessing``, spawned: no fork of
a process running Numba threads), one batch per task, at most two batches per worker in
flight, so decoding overlaps with inference in the main process (which holds the model) and
memory stays bounded. A file that cannot be read is counted and listed, never a crash.

Class folders (``class_mapping``): ImageNet's WordNet ids (``n01440764`` ... as in ImageNet's
validation set laid out in class folders) map to torchvision's class indices through the
packaged list (their sorted order); otherwise the model's class names (``npmnv3 train``'s
``model.npz`` records them) or a mapping file (``--class-index``): JSON ``{"folder": index}``,
the Keras/torchvision ``imagenet_class_index.json`` ``{"0": ["n01440764", "tench"], ...}``, a
JSON list of folder names in index order, or a text file with one folder name per line in
index order (optionally ``name index`` per line).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections import deque
from pathlib import Path

from .cliargs import HelpFormatter, nonnegative_int, positive_int

TOPK = 5


# ----------------------------------------------------------------------------- class mapping


def _read_mapping(path) -> dict[str, int]:
    """{folder name: class index} from a mapping file (formats in the module docstring)."""
    path = Path(path)
    try:
        text = path.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read the class-index file ({e})") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if isinstance(data, list) and all(isinstance(n, str) for n in data):
            return {n: i for i, n in enumerate(data)}
        if isinstance(data, dict) and all(isinstance(v, list) and v for v in data.values()):
            try:                                    # {"0": ["n01440764", "tench"], ...}
                return {str(v[0]): int(k) for k, v in data.items()}
            except ValueError:
                pass
        if isinstance(data, dict) and all(isinstance(v, int) and not isinstance(v, bool)
                                          for v in data.values()):
            return {str(k): v for k, v in data.items()}
        raise ValueError(f"{path}: expected {{folder: index}}, {{index: [folder, name]}} or a "
                         f"list of folder names")
    out = {}
    for n, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) == 2 and parts[1].isdigit():
            out[parts[0]] = int(parts[1])
        elif len(parts) == 1:
            out[parts[0]] = len(out)
        else:
            raise ValueError(f"{path}:{n}: expected 'folder' or 'folder index', got {line!r}")
    return out


def class_mapping(folders, num_classes: int, categories=(), mapping_file=None):
    """(``{folder: class index}``, how it was found) for the class folders of a tree."""
    from ..io.registry import imagenet_wnids

    folders = list(folders)
    if mapping_file is not None:
        table, how = _read_mapping(mapping_file), f"mapping file {mapping_file}"
    elif num_classes == 1000 and all(f in set(imagenet_wnids()) for f in folders):
        table, how = {w: i for i, w in enumerate(imagenet_wnids())}, "ImageNet WordNet ids"
    elif all(f in set(categories) for f in folders):
        table, how = {c: i for i, c in enumerate(categories)}, "the model's class names"
    else:
        odd = [f for f in folders if f not in set(categories)][:3]
        raise ValueError(f"cannot tell which class index each folder is: {', '.join(odd)} ... "
                         f"are neither ImageNet WordNet ids (n01440764, ...) nor the model's "
                         f"class names; give --class-index FILE")
    missing = [f for f in folders if f not in table]
    if missing:
        raise ValueError(f"{how}: no class index for the folder(s) {', '.join(missing[:5])}")
    bad = {f: table[f] for f in folders if not 0 <= table[f] < num_classes}
    if bad:
        raise ValueError(f"{how}: class indices {sorted(set(bad.values()))[:5]} are outside the "
                         f"model's {num_classes} classes")
    return {f: table[f] for f in folders}, how


def find_samples(root) -> tuple[list[str], list[tuple[str, str]]]:
    """(class folder names, [(image path, folder)]) of an ImageFolder tree, sorted."""
    from ..data.images import image_files

    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: no such directory")
    folders = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not folders:
        raise ValueError(f"{root}: no class folders (expected one sub-directory per class)")
    samples = [(p, f) for f in folders for p in image_files(root / f)]
    if not samples:
        raise ValueError(f"{root}: the class folders hold no image files")
    return folders, samples


# ----------------------------------------------------------------------------- decoding


def _worker_init():
    signal.signal(signal.SIGINT, signal.SIG_IGN)     # Ctrl-C is the main process's to handle


def torchvision_loader(path):
    """``torchvision.datasets.folder.pil_loader``: ``Image.open(f).convert("RGB")``."""
    from PIL import Image

    with open(path, "rb") as f:
        img = Image.open(f)
        return img.convert("RGB")


def prepare_batch(paths, preprocessing):
    """(stacked inputs of the readable images or None, their positions, an error per position
    or None): one task of a worker."""
    import numpy as np

    from ..data.preprocess import preprocess
    from .classify import error_text

    xs, ok, errors = [], [], []
    for i, p in enumerate(paths):
        try:
            xs.append(preprocess(torchvision_loader(p), exif_transpose=False, **preprocessing))
            ok.append(i)
            errors.append(None)
        except Exception as e:        # any decoding failure is one unreadable file, listed
            errors.append(error_text(e, p) if str(e) else type(e).__name__)
    return (np.stack(xs) if xs else None), ok, errors


class _InProcess:
    """The Pool interface ``evaluate_folder`` uses, run in this process (``workers=0``)."""

    def apply_async(self, fn, args):
        value = fn(*args)
        return type("Done", (), {"get": lambda self: value})()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _pool(workers: int):
    if workers == 0:
        return _InProcess()
    import multiprocessing

    return multiprocessing.get_context("spawn").Pool(workers, initializer=_worker_init)


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:                  # not Linux
        return max(1, os.cpu_count() or 1)


# ----------------------------------------------------------------------------- evaluation


def evaluate_folder(root, classifier, *, class_index=None, batch_size: int = 32,
                    workers: int | None = None, progress: bool = False,
                    per_image: bool = False, on_error=None, found=None) -> dict:
    """Top-1/top-5 of ``classifier`` (``load_classifier(...)``) over the tree ``root``; returns
    the report (see ``npmnv3 evaluate --help``). ``class_index``: a mapping file; ``workers``:
    decoding processes (default: one per core; 0: in this process); ``on_error(path, msg)``
    is called for each unreadable file as it is found; ``per_image``: add every image's label
    and top-5 to the report; ``found``: ``find_samples(root)`` if already called."""
    import numpy as np
    from tqdm import tqdm

    t0 = time.perf_counter()
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    workers = default_workers() if workers is None else workers
    model, cats = classifier.model, classifier.categories
    folders, samples = find_samples(root) if found is None else found
    index, how = class_mapping(folders, len(cats), cats, class_index)
    k = min(TOPK, len(cats))
    labels = np.array([index[f] for _, f in samples], dtype=np.int64)
    top = np.full((len(samples), k), -1, dtype=np.int64)
    read = np.zeros(len(samples), dtype=bool)
    unreadable, infer_s = [], 0.0
    starts = range(0, len(samples), batch_size)
    with _pool(workers) as pool, tqdm(total=len(samples), unit="img", file=sys.stderr,
                                      disable=None if progress else True, smoothing=0.1) as bar:
        todo, pending = iter(starts), deque()

        def submit():
            for s in todo:
                paths = [p for p, _ in samples[s:s + batch_size]]
                pending.append((s, pool.apply_async(prepare_batch,
                                                    (paths, classifier.preprocessing))))
                if len(pending) >= 2 * max(workers, 1):
                    return

        submit()
        while pending:
            s, job = pending.popleft()
            x, ok, errors = job.get()
            submit()                                    # keep the workers busy meanwhile
            for i, e in enumerate(errors):
                if e is not None:
                    unreadable.append({"path": samples[s + i][0], "error": e})
                    if on_error is not None:
                        bar.clear()
                        on_error(samples[s + i][0], e)
            if x is not None:
                t = time.perf_counter()
                logits = model(x.astype(getattr(model, "dtype", np.float32), copy=False))
                infer_s += time.perf_counter() - t
                rows = s + np.asarray(ok)
                top[rows] = np.argsort(-logits, axis=1, kind="stable")[:, :k]
                read[rows] = True
            bar.update(len(errors))
    seconds = time.perf_counter() - t0
    return _report(root, classifier, samples, folders, index, how, labels, top, read,
                   unreadable, seconds, infer_s, workers, batch_size, per_image)


def _describe(model) -> str:
    """"MobileNetV3-Large ..." (prefixed "quantized" for the int8 model)."""
    q = type(model).__name__.startswith("Quantized")
    return ("quantized " if q else "") + model.config.describe()


def _report(root, clf, samples, folders, index, how, labels, top, read, unreadable, seconds,
            infer_s, workers, batch_size, per_image) -> dict:
    import numpy as np

    hit1 = read & (top[:, 0] == labels)
    hit5 = read & (top == labels[:, None]).any(axis=1)
    n = int(read.sum())
    folder_of = np.array([f for _, f in samples])
    per_class = {}
    for f in folders:
        m = (folder_of == f) & read
        c = int(m.sum())
        per_class[f] = {"index": index[f], "label": clf.categories[index[f]], "images": c,
                        "top1": float(hit1[m].mean()) if c else None,
                        "top5": float(hit5[m].mean()) if c else None}
    report = {
        "data": str(root), "weights": clf.source, "model": _describe(clf.model),
        "preprocessing": clf.preprocessing, "class_mapping": how,
        "images": len(samples), "evaluated": n, "unreadable": len(unreadable),
        "unreadable_files": unreadable, "classes": len(folders), "topk": top.shape[1],
        "top1": float(hit1.sum() / n) if n else None,
        "top5": float(hit5.sum() / n) if n else None,
        "correct": {"top1": int(hit1.sum()), "top5": int(hit5.sum())},
        "per_class": per_class,
        "timing": {"seconds": seconds, "images_per_second": n / seconds if seconds else None,
                   "inference_seconds": infer_s, "workers": workers, "batch_size": batch_size},
    }
    if per_image:
        report["predictions"] = [{"image": p, "label": int(labels[i]),
                                  "top": top[i].tolist() if read[i] else None}
                                 for i, (p, _) in enumerate(samples)]
    return report


def format_report(r: dict) -> str:
    def pct(v):
        return "n/a" if v is None else f"{100 * v:.3f} %"

    t = r["timing"]
    lines = [f"{r['model']} ({r['weights']}) on {r['data']}: {r['classes']} classes "
             f"({r['class_mapping']})",
             f"evaluated {r['evaluated']:,} of {r['images']:,} images"
             + (f" ({r['unreadable']} unreadable, listed above)" if r["unreadable"] else ""),
             f"top-1 {pct(r['top1'])} ({r['correct']['top1']:,})",
             f"top-{r['topk']} {pct(r['top5'])} ({r['correct']['top5']:,})",
             f"{t['seconds']:.1f} s, {t['images_per_second'] or 0:.1f} images/s "
             f"({t['workers']} decoding worker(s), batch {t['batch_size']})"]
    return "\n".join(lines)


def _write_json(path, data) -> None:
    """Write JSON atomically (a temporary file next to it, then renamed)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=1) + "\n", "utf-8")
        os.replace(tmp, path)
    except OSError as e:
        raise OSError(f"{path}: cannot write the report ({e.strerror or e})") from None
    finally:
        tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- the command


def register(sub) -> None:
    p = sub.add_parser("evaluate", formatter_class=HelpFormatter,
                       help="top-1/top-5 accuracy over an image-folder tree (ImageNet's "
                            "validation set in class folders, or your own)",
                       description="Top-1/top-5 accuracy over DIR/<class>/<images>, images "
                                   "prepared as torchvision's reference evaluation prepares "
                                   "them for these weights.")
    p.set_defaults(run=cmd_evaluate, parser=p, uses_kernels=True)
    p.add_argument("data", metavar="DIR", help="one sub-directory per class: WordNet ids "
                   "(ImageNet), the model's class names, or see --class-index")
    p.add_argument("--model", choices=("large", "small"),
                   help="default: what --weights holds, else large")
    p.add_argument("--weights", metavar="NAME|FILE", help="registry name (default large-v2 / "
                   "small-v1, fetched if needed), a .pth or an npmnv3 .npz")
    p.add_argument("--quantized", action="store_true",
                   help="the int8 model: torchvision's quantized weights (large-qnnpack-v1, "
                        "fetched if needed), or --weights FILE of a quantized/QAT .pth")
    p.add_argument("--class-index", metavar="FILE", help="folder -> class index: JSON "
                   "{folder: index}, imagenet_class_index.json, or one folder name per line")
    p.add_argument("--batch-size", type=positive_int, default=32, metavar="N",
                   help="images per forward pass")
    p.add_argument("--workers", type=nonnegative_int, default=None, metavar="N",
                   help=f"decoding processes (default: one per core, {default_workers()} "
                        f"here; 0: decode in the main process)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--report", metavar="FILE.json", help="also write the JSON report here")
    p.add_argument("--per-image", action="store_true",
                   help="include every image's label and top-5 in the JSON report")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def cmd_evaluate(args) -> int:
    from .classify import load_classifier

    found = find_samples(args.data)             # before fetching weights: a typo costs nothing
    clf = load_classifier(args.model, args.weights, quantized=args.quantized,
                          progress=not args.no_progress)

    def on_error(path, msg):
        print(f"npmnv3 evaluate: {path}: {msg}", file=sys.stderr)

    report = evaluate_folder(args.data, clf, class_index=args.class_index,
                             batch_size=args.batch_size, workers=args.workers,
                             progress=not args.no_progress, per_image=args.per_image,
                             on_error=on_error, found=found)
    if args.report:
        _write_json(args.report, report)
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0
