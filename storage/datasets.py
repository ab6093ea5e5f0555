"""Datasets as specs: which IDX files, where to fetch them, how each is pinned, what the images
and classes are. No Prefect.

MNIST and Fashion-MNIST are built in; a user's own dataset is a small TOML or JSON file:

    name = "shapes"                      # letters, digits, ._- : the home's data/<name>/ folder
    image_shape = [16, 16]               # rows, columns of each image (uint8 IDX)
    classes = ["circle", "square", "triangle"]
    mirrors = ["https://example.org/shapes/"]   # tried in order

    [[files]]
    name = "train-images-idx3-ubyte.gz"  # the archive's name on the mirrors
    split = "train"                      # any split names; "train" and "test" are required
    kind = "images"                      # images | labels
    sha256 = "…"                         # SHA-256 of the decompressed IDX file, and
    size = 65552                         # its size in bytes (pins the content), or else
    # archive_md5 = "…" / archive_sha256 = "…"  plus size: the published archive checksum

A file's identity is the SHA-256 and size of its decompressed content where known (it holds
for every honest mirror, whatever gzip settings it used). Where only the archive's published
checksum is known, the archive bytes are verified against it and the decompressed size
against ``size``; the provenance says so. A spec without any checksum is refused unless the
user allows unpinned files, and then the provenance records the hash that was seen.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from storage import DigitflowError
from storage.text import has_control

NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
KINDS = ("images", "labels")
MAX_ARCHIVE_BYTES = 1 << 31  # bound on an archive whose decompressed size is not pinned
MAX_IDX_BYTES = 1 << 32      # bound on what such an archive may inflate to
MAX_CLASSES = 1000
MAX_SIDE = 1024
BUILTIN_NAMES = ("mnist", "fashion-mnist")  # a spec may not call itself one of these
MAX_CLASS_NAME = 100
MAX_PIXELS = 1 << 16   # network inputs per image (nn.io.MAX_UNITS)
MAX_FILES, MAX_MIRRORS = 64, 16


def _short(value, limit: int = 200) -> str:
    """A value quoted in an error line, cut to ``limit`` characters (a spec may hold megabytes)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


class SpecError(DigitflowError):
    pass


@dataclass(frozen=True)
class DatasetFile:
    name: str                            # archive name on the mirrors, e.g. "train-images-idx3-ubyte.gz"
    split: str                           # "train" | "test" | …
    kind: str                            # "images" | "labels"
    idx_sha256: str | None = None        # SHA-256 of the decompressed IDX content (the strongest pin)
    idx_size: int | None = None          # its size in bytes
    archive_sha256: str | None = None    # the canonical archive's SHA-256 (MNIST: recorded, not required)
    archive_size: int | None = None
    archive_md5: str | None = None       # a published archive checksum (Fashion-MNIST publishes MD5)

    @property
    def idx_name(self) -> str:
        return self.name.removesuffix(".gz")

    @property
    def pin(self) -> str:
        """How the content is pinned: "sha256" (decompressed content), "archive-sha256",
        "archive-md5" (archive bytes + decompressed size), or "none"."""
        if self.idx_sha256:
            return "sha256"
        if self.archive_sha256 and self.idx_size is not None:
            return "archive-sha256"
        if self.archive_md5 and self.idx_size is not None:
            return "archive-md5"
        return "none"

    @property
    def max_archive_bytes(self) -> int:
        # gzip never grows data by more than a few bytes per 32 KiB block; anything larger
        # than the decompressed size plus slack is not an honest archive.
        return self.idx_size + (1 << 20) if self.idx_size is not None else MAX_ARCHIVE_BYTES

    @property
    def expected_archive_bytes(self) -> int:
        """For the default per-mirror deadline: the archive's size where known."""
        return self.archive_size or self.idx_size or 50 << 20


@dataclass(frozen=True)
class Dataset:
    name: str
    files: tuple[DatasetFile, ...]
    mirrors: tuple[str, ...]
    image_shape: tuple[int, int] = (28, 28)
    classes: tuple[str, ...] = tuple(str(d) for d in range(10))
    source: str = "built-in"             # "built-in" or the spec file's path
    floor: float = 0.0                   # the gate's default: never promote below this test accuracy
    notes: dict = field(default_factory=dict, compare=False)
    expect: dict = field(default_factory=dict, compare=False)  # {split: checks.Expectation}: what ingest checks

    @property
    def pixels(self) -> int:
        return self.image_shape[0] * self.image_shape[1]

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(f.split for f in self.files))

    @property
    def builtin(self) -> bool:
        return self.source == "built-in"

    @property
    def identity(self) -> str:
        """SHA-256 of what makes the data what it is: image shape, classes, and every file's
        split, kind, name and pins (for a file without a pin: the mirrors it comes from)."""
        material = {"image_shape": list(self.image_shape), "classes": list(self.classes),
                    "files": sorted([f.split, f.kind, f.name, f.idx_sha256, f.idx_size, f.archive_sha256,
                                     f.archive_md5] for f in self.files),
                    "mirrors": list(self.mirrors) if self.unpinned else []}
        return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()

    @property
    def key(self) -> str:
        """The name its raw files, shards and default model live under: a built-in's own name;
        for a spec, its name plus 12 hex digits of its identity. Two different datasets never
        share a folder or a registry, whatever they call themselves."""
        return self.name if self.builtin else f"{self.name}-{self.identity[:12]}"

    @property
    def default_model_name(self) -> str:
        return f"{self.key}-mlp"  # mnist-mlp, fashion-mnist-mlp, shapes-1a2b3c4d5e6f-mlp

    def lineage(self) -> dict:
        """What a published version records of its data (MNIST's lineage stays without it)."""
        return {"name": self.name, "key": self.key, "identity": self.identity, "classes": list(self.classes),
                "source": self.source}

    @property
    def unpinned(self) -> list[str]:
        return [f.name for f in self.files if f.pin == "none"]

    def file(self, name: str) -> DatasetFile:
        for f in self.files:
            if f.name == name:
                return f
        raise SpecError(f"dataset {self.name!r} has no file {name!r}")

    def file_for(self, split: str, kind: str) -> DatasetFile:
        return next(f for f in self.files if f.split == split and f.kind == kind)

    def to_dict(self) -> dict:
        """The spec as plain data (recorded in lineage; ``from_dict`` reads it back)."""
        return {"name": self.name, "image_shape": list(self.image_shape), "classes": list(self.classes),
                "mirrors": list(self.mirrors), "source": self.source, "floor": self.floor,
                "files": [{k: v for k, v in f.__dict__.items() if v is not None} for f in self.files]}


# ---- validation: every mistake, one clear line each ---------------------------------------

_TOP = {"name", "image_shape", "classes", "mirrors", "files", "notes", "floor", "expect"}
_EXPECT = {"rows", "class_counts", "pixel_mean", "pixel_std"}
_FILE = {"name": "name", "split": "split", "kind": "kind", "sha256": "idx_sha256", "size": "idx_size",
         "archive_sha256": "archive_sha256", "archive_size": "archive_size", "archive_md5": "archive_md5"}
_HEX = {"sha256": 64, "archive_sha256": 64, "archive_md5": 32}


def from_dict(data, source: str = "built-in") -> Dataset:
    """Validate a spec (as parsed from TOML/JSON); raise SpecError listing every mistake."""
    where = Path(source).name if source != "built-in" else "spec"
    errors: list[str] = []

    def bad(msg: str) -> None:
        errors.append(f"{where}: {msg}")

    if not isinstance(data, dict):
        raise SpecError(f"{where}: a dataset spec is a table/object with name, image_shape, classes, mirrors, files")
    for key in sorted(set(data) - _TOP):
        bad(f"unknown key {_short(key)} (known: {', '.join(sorted(_TOP))})")
    name = data.get("name")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        bad(f"name must be 1–64 lowercase letters, digits, '.', '_' or '-', got {_short(name)}")
    elif source != "built-in" and name in BUILTIN_NAMES:
        bad(f"name {_short(name)} is the built-in dataset's; give your dataset a name of its own")
    shape = data.get("image_shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(type(v) is int and 1 <= v <= MAX_SIDE for v in shape)):
        bad(f"image_shape must be [rows, columns], each an integer in 1..{MAX_SIDE}, got {_short(shape)}")
        shape = None
    elif shape[0] * shape[1] > MAX_PIXELS:
        bad(f"image_shape {shape[0]}×{shape[1]} makes {shape[0] * shape[1]:,} network inputs, more than the "
            f"{MAX_PIXELS:,} a network can take")
        shape = None
    classes = data.get("classes")
    if not (isinstance(classes, list) and 2 <= len(classes) <= MAX_CLASSES
            and all(isinstance(c, str) and c.strip() for c in classes)):
        bad(f"classes must be a list of 2..{MAX_CLASSES} non-empty names, got {_short(classes)}")
        classes = None
    elif bad_names := [c for c in classes if len(c) > MAX_CLASS_NAME or has_control(c)]:
        bad(f"class names must be one line of at most {MAX_CLASS_NAME} characters, without control "
            f"characters: {bad_names[0][:MAX_CLASS_NAME]!r}")
    elif len(set(classes)) != len(classes):
        bad("classes must be distinct names")
    mirrors = data.get("mirrors", [])
    if not (isinstance(mirrors, list) and len(mirrors) <= MAX_MIRRORS
            and all(isinstance(m, str) and 0 < len(m) <= 2048 and not has_control(m) for m in mirrors)):
        bad(f"mirrors must be a list of at most {MAX_MIRRORS} base URLs, got {_short(mirrors)}")
        mirrors = []
    floor = data.get("floor", 0.0)
    if type(floor) not in (int, float) or not 0.0 <= floor <= 1.0:
        bad(f"floor must be a test accuracy in 0..1 (the gate never promotes below it), got {_short(floor)}")
    if not isinstance(data.get("notes", {}), dict):
        bad(f"notes must be a table, got {_short(data.get('notes'))}")
    files_in = data.get("files")
    files: list[DatasetFile] = []
    if not isinstance(files_in, list) or not 0 < len(files_in) <= MAX_FILES:
        bad(f"files must list the IDX archives (1 to {MAX_FILES} [[files]] tables with name, split, kind and a "
            "checksum)")
        files_in = []
    seen: set[str] = set()
    for i, f in enumerate(files_in):
        errors_before = len(errors)
        label = f"files[{i}]"
        if not isinstance(f, dict):
            bad(f"{label} must be a table with name, split, kind, sha256/size or archive_md5/size")
            continue
        label = f"files[{i}] ({_short(f.get('name'))})" if isinstance(f.get("name"), str) else label
        for key in sorted(set(f) - set(_FILE)):
            bad(f"{label}: unknown key {_short(key)} (known: {', '.join(_FILE)})")
        fname = f.get("name")
        if not isinstance(fname, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,200}", fname) \
                or fname.removesuffix(".gz").endswith(".json"):
            bad(f"{label}: name must be a plain file name (not ending in .json), got {_short(fname)}")
        elif fname.removesuffix(".gz") in seen:  # "x.gz" and "x" would land on the same raw file
            bad(f"{label}: {_short(fname)} is listed twice")
        else:
            seen.add(fname.removesuffix(".gz"))
        if not isinstance(f.get("split"), str) or not NAME.fullmatch(f.get("split") or ""):
            bad(f"{label}: split must be a lowercase name such as train or test, got {_short(f.get('split'))}")
        if f.get("kind") not in KINDS:
            bad(f"{label}: kind must be images or labels, got {_short(f.get('kind'))}")
        for key, length in _HEX.items():
            value = f.get(key)
            if value is not None and not (isinstance(value, str) and re.fullmatch(f"[0-9a-f]{{{length}}}", value)):
                bad(f"{label}: {key} must be {length} lowercase hex digits, got {_short(value)}")
        for key in ("size", "archive_size"):
            value = f.get(key)
            if value is not None and not (type(value) is int and 0 < value <= 1 << 40):
                bad(f"{label}: {key} must be a positive number of bytes, got {_short(value)}")
        if (f.get("sha256") or f.get("archive_md5") or f.get("archive_sha256")) and f.get("size") is None:
            bad(f"{label}: a checksum needs the decompressed size too (size = bytes)")
        if shape and f.get("kind") in KINDS and type(f.get("size")) is int:
            item = shape[0] * shape[1] if f["kind"] == "images" else 1
            header = 16 if f["kind"] == "images" else 8
            if (f["size"] - header) % item or f["size"] < header:
                bad(f"{label}: size {f['size']} is not a {f['kind']} IDX file of "
                    f"{'×'.join(map(str, shape)) if f['kind'] == 'images' else 'one byte'} per item "
                    f"({header} + n × {item} bytes)")
        if len(errors) == errors_before:
            files.append(DatasetFile(**{_FILE[k]: v for k, v in f.items() if k in _FILE}))
    if not errors:
        pairs = {(f.split, f.kind) for f in files}
        splits = dict.fromkeys(f.split for f in files)
        for split in splits:
            for kind in KINDS:
                if (split, kind) not in pairs:
                    bad(f"split {split!r} has no {kind} file")
                elif sum(1 for f in files if (f.split, f.kind) == (split, kind)) > 1:
                    bad(f"split {split!r} has more than one {kind} file")
        for split in ("train", "test"):
            if split not in splits:
                bad(f"a {split!r} split is required")
        for split in splits:
            sizes = {f.kind: f.idx_size for f in files if f.split == split}
            if sizes.get("images") and sizes.get("labels") and shape:
                n_images, n_labels = (sizes["images"] - 16) // (shape[0] * shape[1]), sizes["labels"] - 8
                if n_images != n_labels:
                    bad(f"split {split!r}: the images file holds {n_images} items, the labels file {n_labels}")
    expect = _expectations(data.get("expect", {}), {f.split for f in files}, classes, bad)
    if errors:
        raise SpecError("\n".join(errors))
    return Dataset(name=name, files=tuple(files), mirrors=tuple(mirrors), image_shape=tuple(shape),
                   classes=tuple(classes), source=source, notes=data.get("notes") or {}, floor=float(floor),
                   expect=expect)


def _expectations(data, splits: set[str], classes, bad) -> dict:
    """``[expect.<split>]`` tables: what the data checks compare each split with."""
    from storage.checks import Expectation

    if not isinstance(data, dict):
        bad(f"expect must be a table of splits, got {_short(data)}")
        return {}
    out = {}
    for split, table in data.items():
        where = f"expect.{_short(split)[1:-1]}"
        if split not in splits:
            bad(f"{where}: the spec has no split {_short(split)}")
            continue
        if not isinstance(table, dict):
            bad(f"{where} must be a table with {', '.join(sorted(_EXPECT))}")
            continue
        ok = True
        for key in sorted(set(table) - _EXPECT):
            bad(f"{where}: unknown key {_short(key)} (known: {', '.join(sorted(_EXPECT))})")
            ok = False
        rows, counts = table.get("rows"), table.get("class_counts")
        if rows is not None and not (type(rows) is int and 0 < rows <= 1 << 32):
            bad(f"{where}.rows must be a positive number of rows, got {_short(rows)}")
            ok = False
        if counts is not None and not (isinstance(counts, list) and classes and len(counts) == len(classes)
                                       and all(type(c) is int and 0 <= c <= 1 << 32 for c in counts)):
            bad(f"{where}.class_counts must list one row count per class ({len(classes or [])}), "
                f"got {_short(counts)}")
            ok = False
        elif counts is not None and type(rows) is int and sum(counts) != rows:
            bad(f"{where}: class_counts add up to {sum(counts)}, not rows = {rows}")
            ok = False
        for key in ("pixel_mean", "pixel_std"):
            value = table.get(key)
            if value is not None and not (type(value) in (int, float) and 0.0 <= value <= 1.0):
                bad(f"{where}.{key} must be a number in 0..1 (of pixel/255), got {_short(value)}")
                ok = False
        if ok:
            out[split] = Expectation(rows=rows, class_counts=tuple(counts) if counts is not None else None,
                                     pixel_mean=table.get("pixel_mean"), pixel_std=table.get("pixel_std"))
    return out


def load_spec(path: str | Path) -> Dataset:
    """A user's dataset spec from a TOML or JSON file, validated."""
    import tomllib

    path = Path(path)
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise SpecError(f"{path}: no such dataset spec file") from None
    except OSError as e:
        raise SpecError(f"{path}: cannot read the dataset spec ({e.strerror})") from None
    if len(text) > 1 << 20:
        raise SpecError(f"{path}: a dataset spec over 1 MiB is not a spec")
    kind = "JSON" if path.suffix.lower() == ".json" else "TOML"
    if _depth(text) > MAX_DEPTH:  # a parser would recurse once per level: refused before parsing
        raise SpecError(f"{path}: nested more than {MAX_DEPTH} levels deep; a dataset spec needs 3")
    try:
        data = json.loads(text) if kind == "JSON" else tomllib.loads(text.decode("utf-8"))
    except RecursionError:
        raise SpecError(f"{path}: nested too deeply to be a dataset spec") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise SpecError(f"{path}: not valid {kind} ({_short(str(e))[1:-1]})") from None
    return from_dict(data, source=str(path.resolve()))


MAX_DEPTH = 16


def _depth(text: bytes) -> int:
    """The deepest nesting of brackets and braces in ``text`` (an upper bound: brackets inside
    strings count too), found without parsing."""
    import numpy as np

    b = np.frombuffer(text, np.uint8)
    steps = np.isin(b, (ord("["), ord("{"))).astype(np.int32) - np.isin(b, (ord("]"), ord("}")))
    return int(np.cumsum(steps).max(initial=0))


def resolve(dataset: "str | Dataset | None" = None) -> Dataset:
    """A built-in dataset by name (default mnist), or a spec file by path."""
    from storage.fashion_mnist import FASHION_MNIST
    from storage.mnist import MNIST

    if isinstance(dataset, Dataset):
        return dataset
    builtins = {d.name: d for d in (MNIST, FASHION_MNIST)}
    if dataset in (None, ""):
        return MNIST
    if dataset in builtins:
        return builtins[dataset]
    if dataset.endswith((".toml", ".json")) or "/" in dataset or Path(dataset).is_file():
        return load_spec(dataset)
    raise SpecError(f"unknown dataset {dataset!r}: use {', '.join(builtins)} or a spec file (.toml or .json)")


def class_names(classes) -> list[str] | None:
    """The names worth showing beside a predicted label: None when they are just the label
    numbers (MNIST's digits)."""
    classes = list(classes)
    return None if classes == [str(i) for i in range(len(classes))] else classes


def dataset_and_model(dataset: "str | Dataset | None", model_name: str | None,
                      allow_unpinned: bool = True) -> tuple[Dataset, str]:
    """The dataset spec (validated: one line per mistake, before any work; pinned unless
    ``allow_unpinned``) and the model name (default: the dataset's, mnist-mlp for MNIST)."""
    from storage.registry import check_name

    spec = resolve(dataset)
    check_pinned(spec, allow_unpinned)
    return spec, check_name(model_name or spec.default_model_name)


def check_pinned(dataset: Dataset, allow_unpinned: bool) -> None:
    if dataset.unpinned and not allow_unpinned:
        raise SpecError(f"dataset {dataset.name!r}: {', '.join(dataset.unpinned)} "
                        f"{'has' if len(dataset.unpinned) == 1 else 'have'} no checksum; add sha256 + size "
                        "(or the published archive_md5/archive_sha256 + size), or pass --allow-unpinned to accept "
                        "whatever the mirror serves (the provenance then records the hash seen)")
