"""Finding image files: the one extension list and the one directory walker.

``IMAGE_EXTENSIONS`` is torchvision's ``IMG_EXTENSIONS`` (``torchvision/datasets/folder.py``),
so an image folder holds the same files here as in ``torchvision.datasets.ImageFolder``.
Directories are walked in sorted order, following links, skipping hidden files and folders.
"""

from __future__ import annotations

import os

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def walk_files(folder) -> list[str]:
    """Every file under ``folder`` (following links), sorted, hidden files and folders left
    out."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(os.path.join(dirpath, f) for f in sorted(filenames) if not f.startswith("."))
    return out


def image_files(folder, extensions=IMAGE_EXTENSIONS) -> list[str]:
    """The files under ``folder`` whose extension (any case) is one of ``extensions``."""
    return [p for p in walk_files(folder) if os.path.splitext(p)[1].lower() in extensions]


def find_images(paths) -> list[tuple[str, str | None]]:
    """``(path, error)`` per image: files as given (any extension: reading decides), and the
    image files under each directory. ``error`` is None, or says why the path yields nothing."""
    found = []
    for p in map(str, paths):
        if os.path.isdir(p):
            found += [(f, None) for f in image_files(p)] or [(p, "directory holds no image "
                                                                 "files")]
        elif os.path.exists(p):
            found.append((p, None))
        else:
            found.append((p, "no such file or directory"))
    return found
