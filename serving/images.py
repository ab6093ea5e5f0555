"""Turn arbitrary digit images into MNIST-style 28×28 inputs. No Prefect.

The steps follow how MNIST itself was made: grayscale; invert when the ink is dark on a light
background (MNIST is light ink on black); crop to the ink; scale into a 20×20 box keeping the
aspect ratio (anti-aliased); place in a 28×28 field so the ink's center of mass is at the center.
"""

from __future__ import annotations

import contextlib
import gzip
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from storage import DigitflowError
from storage.idx import IDXError, check_mnist_images, pixels01, read_header, read_idx


class ImageError(DigitflowError):
    pass


MAX_PIXELS = 40_000_000      # a photo of a digit is far smaller; beyond this: a decompression bomb
MAX_IDX_IMAGES = 1_000_000   # rows of one IDX input (≈ 3 GB as float32)


class ImageTooLarge(ImageError):
    """More pixels than allowed (a decompression bomb, or simply too large): refused before decoding."""


@contextlib.contextmanager
def _image_errors(name: str) -> Iterator[None]:
    """Every way PIL fails on a bad file, as one ImageError (ImageTooLarge for a bomb) naming ``name``."""
    from PIL import Image, UnidentifiedImageError

    try:
        yield
    except FileNotFoundError:
        raise ImageError(f"{name}: no such file") from None
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(f"{name}: refused as a decompression bomb ({e})") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not a readable image (no PNG, JPEG, … header)") from None
    except (OSError, ValueError, SyntaxError, EOFError, TypeError) as e:  # PIL raises all of these on bad files
        raise ImageError(f"{name}: not a readable image ({e})") from None


def open_image(source: str | os.PathLike | bytes, *, name: str = "image", max_pixels: int = MAX_PIXELS):
    """The image ``source`` (a path, or the file's bytes) opened lazily: its header read and its
    size checked against ``max_pixels``, nothing decoded. Decode it with ``gray_of``."""
    import io

    from PIL import Image

    with _image_errors(name):
        img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        width, height = img.size  # from the header: nothing decoded yet
        if width * height > max_pixels:
            img.close()
            raise ImageTooLarge(f"{name}: {width}×{height} pixels exceed the {max_pixels:,}-pixel limit "
                                "(a decompression bomb?); refused")
        return img


def gray_of(img, *, name: str = "image") -> np.ndarray:
    """Decode an ``open_image`` (and close it) into (H, W) float32 in [0, 1]."""
    with _image_errors(name), img:
        img.load()
        return _to_unit_gray(img)


def _to_unit_gray(img) -> np.ndarray:
    """Any PIL mode → (H, W) float32 in [0, 1] at its own bit depth: 16-bit and 32-bit integer
    images are scaled by their range (``convert("L")`` would clip them: a 16-bit 7 became an 8),
    float images clipped to [0, 1], alpha composited on white."""
    from PIL import Image

    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return np.asarray(img, np.float32) / np.float32(65535)
    if img.mode == "I":
        a = np.asarray(img, np.float64)
        top = 65535.0 if a.max(initial=0) <= 65535 and a.min(initial=0) >= 0 else max(float(np.abs(a).max()), 1.0)
        return np.clip(a / top, 0, 1).astype(np.float32)
    if img.mode == "F":
        a = np.nan_to_num(np.asarray(img, np.float32), nan=0.0, posinf=1.0, neginf=0.0)
        return np.clip(a / 255 if a.max(initial=0) > 1 else a, 0, 1).astype(np.float32)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return np.asarray(img.convert("L"), np.float32) / np.float32(255)


def load_gray(source: str | os.PathLike | bytes, *, name: str | None = None,
              max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode a PNG/JPEG/... (a path, or the file's bytes) into a (H, W) float32 array in [0, 1]
    (alpha composited on white; 16-bit images at their own depth). The size is read from the
    header and checked against ``max_pixels`` before anything is decoded."""
    name = name or str(source if not isinstance(source, bytes) else "image")
    return gray_of(open_image(source, name=name, max_pixels=max_pixels), name=name)


def _median(a: np.ndarray) -> np.floating:
    """``np.median`` of a 1-D float array without NaNs, the same bits, without its per-call
    overhead (a tenth of a millisecond, twice per image)."""
    k = a.size // 2
    if a.size % 2:
        return np.partition(a, k)[k]
    part = np.partition(a, (k - 1, k))
    return (part[k - 1] + part[k]) / 2


def mnist_style(gray: np.ndarray, *, name: str = "image") -> np.ndarray:
    """(H, W) grayscale in [0, 1] → (784,) float32 pixels/255 as MNIST would have them."""
    from PIL import Image

    g = gray.astype(np.float32)
    border = np.concatenate([g[0], g[-1], g[:, 0], g[:, -1]])
    if _median(border) > 0.5:  # dark ink on a light background
        g = 1.0 - g
    g = g - _median(np.concatenate([g[0], g[-1], g[:, 0], g[:, -1]]))  # background to 0
    g = np.clip(g, 0, None)
    if g.max() <= 0.05:
        raise ImageError(f"{name}: no ink found (a blank image)")
    g /= g.max()
    rows, cols = np.flatnonzero(g.max(axis=1) > 0.1), np.flatnonzero(g.max(axis=0) > 0.1)
    g = g[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]              # crop to the ink
    h, w = g.shape
    scale = 20.0 / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))   # PIL wants (width, height)
    box = np.asarray(Image.fromarray(g).resize(size, Image.Resampling.LANCZOS), np.float32)
    box = np.clip(box, 0, 1)
    field = np.zeros((28, 28), np.float32)
    top, left = (28 - box.shape[0]) // 2, (28 - box.shape[1]) // 2
    field[top:top + box.shape[0], left:left + box.shape[1]] = box
    total = field.sum()
    ys, xs = np.indices(field.shape)
    dy = int(round(13.5 - (ys * field).sum() / total))
    dx = int(round(13.5 - (xs * field).sum() / total))
    field = np.roll(field, (dy, dx), axis=(0, 1))                  # center of mass to the center
    return field.reshape(784)


def is_idx(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] == b"\x1f\x8b":
        try:
            with gzip.open(path) as f:
                head = f.read(4)
        except (OSError, EOFError) as e:
            raise IDXError(f"{path}: damaged gzip file ({e})") from None
    return len(head) == 4 and head[:2] == b"\x00\x00" and head[2] == 0x08 and head[3] == 3


def read_idx_images(path: Path, shape: tuple[int, int] = (28, 28)) -> np.ndarray:
    """(n, rows·cols) pixels/255 from an IDX3 image file (raw or gzipped) of ``shape`` (MNIST:
    28×28). The header is checked (shape, and for a raw file its exact length) before any image
    data is read or inflated."""
    rows, cols = shape
    pixels = rows * cols
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    if not gzipped:
        n = check_mnist_images(read_header(path), path.name, shape)
        _check_count(path, n)
        images = read_idx(path)
        return pixels01(images.reshape(len(images), pixels))
    try:
        with gzip.open(path) as src:
            head = src.read(16)
            if len(head) < 16 or head[:4] != b"\x00\x00\x08\x03":
                raise IDXError(f"{path.name}: expected uint8 images of shape (n, {rows}, {cols}) "
                               f"(IDX header {head[:4].hex()})")
            n, got_rows, got_cols = (int.from_bytes(head[i:i + 4], "big") for i in (4, 8, 12))
            if (got_rows, got_cols) != (rows, cols):
                raise IDXError(f"{path.name}: expected uint8 images of shape (n, {rows}, {cols}), "
                               f"got (n, {got_rows}, {got_cols})")
            _check_count(path, n)
            data = src.read(n * pixels + 1)  # never inflate more than the header announces, plus one byte
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise IDXError(f"{path.name}: damaged gzip stream ({e})") from None
    if len(data) != n * pixels:
        what = "truncated" if len(data) < n * pixels else "has trailing bytes"
        raise IDXError(f"{path.name}: {what}: the header announces {n} images of {rows}×{cols}")
    return pixels01(np.frombuffer(data, np.uint8).reshape(n, pixels))


def _check_count(path: Path, n: int) -> None:
    if n > MAX_IDX_IMAGES:
        raise IDXError(f"{path.name}: {n:,} images exceed the {MAX_IDX_IMAGES:,} accepted in one input")


def load_inputs(paths: list[str], shape: tuple[int, int] = (28, 28)) -> tuple[list[str], np.ndarray]:
    """Names and (n, rows·cols) inputs for a mix of image files and IDX files (one name per row).
    Image files are prepared the MNIST way, so they are accepted for 28×28 datasets only."""
    names, rows = [], []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise ImageError(f"{p}: no such file")
        if is_idx(path):
            x = read_idx_images(path, tuple(shape))
            names += [f"{p}#{i}" for i in range(len(x))]
            rows.append(x)
        elif tuple(shape) != (28, 28):
            raise ImageError(f"{p}: images of {shape[0]}×{shape[1]} pixels are read from IDX files only "
                             "(the PNG/JPEG preparation makes MNIST-style 28×28 inputs)")
        else:
            names.append(p)
            rows.append(mnist_style(load_gray(path), name=p)[None])
    return names, np.concatenate(rows) if rows else np.zeros((0, shape[0] * shape[1]), np.float32)
