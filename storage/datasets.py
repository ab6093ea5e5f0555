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
from typing import Annotated, Literal, Optional

from pydantic_core import PydanticCustomError
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, ValidationError,
                      ValidationInfo, field_validator, model_validator)

from storage import DigitflowError
from storage.records import DatasetLineage
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

    def lineage(self) -> DatasetLineage:
        """What a published version records of its data (MNIST's lineage stays without it)."""
        return DatasetLineage(name=self.name, key=self.key, identity=self.identity, classes=list(self.classes),
                              source=self.source)

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


# ---- the spec file: one pydantic model, every mistake one clear line -----------------------

Name = Annotated[str, StringConstraints(pattern=f"^{NAME.pattern}$")]
Bytes = Annotated[int, Field(gt=0, le=1 << 40)]
Count = Annotated[int, Field(ge=0, le=1 << 32)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
Hex64 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


def _one_plain_line(text: str) -> str:
    if not text.strip() or has_control(text):  # (newlines, escapes, bidi overrides: storage.text)
        raise PydanticCustomError("rule", "not one plain line")  # (said in the field's words: _MUST)
    return text


ClassName = Annotated[str, StringConstraints(max_length=MAX_CLASS_NAME), AfterValidator(_one_plain_line)]
Mirror = Annotated[str, StringConstraints(max_length=2048), AfterValidator(_one_plain_line)]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class FileSpec(_Spec):
    """One ``[[files]]`` table: an IDX archive, its split and kind, and how it is pinned."""

    name: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$")]
    split: Name
    kind: Literal[KINDS]  # type: ignore[valid-type]
    sha256: Optional[Hex64] = None
    size: Optional[Bytes] = None
    archive_sha256: Optional[Hex64] = None
    archive_size: Optional[Bytes] = None
    archive_md5: Optional[Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")]] = None

    @field_validator("name")
    @classmethod
    def _not_json(cls, name: str) -> str:
        if name.removesuffix(".gz").endswith(".json"):
            raise PydanticCustomError("rule", "ends in .json")
        return name

    @model_validator(mode="after")
    def _sized(self) -> "FileSpec":
        if (self.sha256 or self.archive_md5 or self.archive_sha256) and self.size is None:
            raise ValueError("a checksum needs the decompressed size too (size = bytes)")
        return self

    def file(self) -> DatasetFile:
        return DatasetFile(self.name, self.split, self.kind, idx_sha256=self.sha256, idx_size=self.size,
                           archive_sha256=self.archive_sha256, archive_size=self.archive_size,
                           archive_md5=self.archive_md5)


class ExpectSpec(_Spec):
    """An ``[expect.<split>]`` table: what the data checks compare the split with."""

    rows: Optional[Annotated[int, Field(gt=0, le=1 << 32)]] = None
    class_counts: Optional[list[Count]] = None
    pixel_mean: Optional[Fraction] = None   # of pixel/255 over the whole split
    pixel_std: Optional[Fraction] = None

    @model_validator(mode="after")
    def _adds_up(self) -> "ExpectSpec":
        if self.class_counts is not None and self.rows is not None and sum(self.class_counts) != self.rows:
            raise ValueError(f"class_counts add up to {sum(self.class_counts)}, not rows = {self.rows}")
        return self


class DatasetSpec(_Spec):
    """A dataset spec file (TOML or JSON), as the module's docstring shows it."""

    name: Name
    image_shape: Annotated[list[Annotated[int, Field(ge=1, le=MAX_SIDE)]], Field(min_length=2, max_length=2)]
    classes: Annotated[list[ClassName], Field(min_length=2, max_length=MAX_CLASSES)]
    mirrors: Annotated[list[Mirror], Field(max_length=MAX_MIRRORS)] = []
    files: Annotated[list[FileSpec], Field(min_length=1, max_length=MAX_FILES)]
    floor: Fraction = 0.0
    notes: dict = {}
    expect: dict[str, ExpectSpec] = {}

    @field_validator("name")
    @classmethod
    def _own_name(cls, name: str, info: ValidationInfo) -> str:
        if (info.context or {}).get("source", "built-in") != "built-in" and name in BUILTIN_NAMES:
            raise ValueError(f"name {name!r} is the built-in dataset's; give your dataset a name of its own")
        return name

    @field_validator("image_shape")
    @classmethod
    def _fits_a_network(cls, shape: list[int]) -> list[int]:
        if shape[0] * shape[1] > MAX_PIXELS:
            raise ValueError(f"image_shape {shape[0]}×{shape[1]} makes {shape[0] * shape[1]:,} network inputs, more "
                             f"than the {MAX_PIXELS:,} a network can take")
        return shape

    @field_validator("classes")
    @classmethod
    def _distinct(cls, classes: list[str]) -> list[str]:
        if len(set(classes)) != len(classes):
            raise ValueError("classes must be distinct names")
        return classes

    @model_validator(mode="after")
    def _consistent(self) -> "DatasetSpec":
        """What no single field shows (``_cross_checks``)."""
        problems = _cross_checks(self.image_shape, len(self.classes), list(enumerate(self.files)), self.expect,
                                 every_file=True)
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def dataset(self, source: str) -> Dataset:
        from storage.checks import Expectation

        expect = {split: Expectation(rows=t.rows, class_counts=tuple(t.class_counts) if t.class_counts else None,
                                     pixel_mean=t.pixel_mean, pixel_std=t.pixel_std) for split, t in self.expect.items()}
        return Dataset(name=self.name, files=tuple(f.file() for f in self.files), mirrors=tuple(self.mirrors),
                       image_shape=(self.image_shape[0], self.image_shape[1]), classes=tuple(self.classes),
                       source=source, notes=self.notes, floor=float(self.floor), expect=expect)


def _cross_checks(shape: list[int] | None, n_classes: int | None, files: list[tuple[int, FileSpec]],
                  expect: dict[str, ExpectSpec], every_file: bool) -> list[str]:
    """What no single field shows: files named twice, sizes that do not fit the image shape,
    splits without both kinds, train and test missing, expectations of other splits. Given the
    parts of a spec that are valid (``shape``/``n_classes`` None when those fields are not; ``files``
    the valid tables by index; ``every_file`` False when some are not), so that a spec with field
    errors is told these mistakes in the same message."""
    problems, seen = [], set()
    for i, f in files:
        label = f"files[{i}] ({_short(f.name)})"
        if f.name.removesuffix(".gz") in seen:  # "x.gz" and "x" would land on the same raw file
            problems.append(f"{label}: {_short(f.name)} is listed twice")
        seen.add(f.name.removesuffix(".gz"))
        if shape is None:
            continue
        rows, cols = shape
        item, header = (rows * cols, 16) if f.kind == "images" else (1, 8)
        if f.size is not None and ((f.size - header) % item or f.size < header):
            problems.append(f"{label}: size {f.size} is not {'an' if f.kind == 'images' else 'a'} {f.kind} IDX file of "
                            f"{f'{rows}×{cols}' if f.kind == 'images' else 'one byte'} per item "
                            f"({header} + n × {item} bytes)")
    splits = dict.fromkeys(f.split for _, f in files)
    if not problems and every_file:
        for split in splits:
            for kind in KINDS:
                n = sum(1 for _, f in files if (f.split, f.kind) == (split, kind))
                if n != 1:
                    problems.append(f"split {split!r} has {'no' if n == 0 else 'more than one'} {kind} file")
        problems += [f"a {split!r} split is required" for split in ("train", "test") if split not in splits]
    if not problems and every_file and shape is not None:
        rows, cols = shape
        for split in splits:
            sizes = {f.kind: f.size for _, f in files if f.split == split}
            if sizes["images"] and sizes["labels"] and (sizes["images"] - 16) // (rows * cols) != sizes["labels"] - 8:
                problems.append(f"split {split!r}: the images file holds {(sizes['images'] - 16) // (rows * cols)} "
                                f"items, the labels file {sizes['labels'] - 8}")
    for split, table in expect.items():
        where = f"expect.{_short(split)[1:-1]}"
        if every_file and split not in splits:
            problems.append(f"{where}: the spec has no split {_short(split)}")
        elif n_classes is not None and table.class_counts is not None and len(table.class_counts) != n_classes:
            problems.append(f"{where}.class_counts must list one row count per class ({n_classes}), "
                            f"got {_short(table.class_counts)}")
    return problems


def _valid_parts(data: dict, error: ValidationError) -> list[str]:
    """``_cross_checks`` on the parts of a spec that no field error points at (its fields failed;
    a model-level error alone means they were all checked already)."""
    locs = [err["loc"] for err in error.errors() if err["loc"]]
    if not locs:
        return []
    bad = {loc[0] for loc in locs}
    bad_files = {loc[1] for loc in locs if loc[0] == "files" and len(loc) > 1}
    bad_expect = {loc[1] for loc in locs if loc[0] == "expect" and len(loc) > 1}

    # (a field no error points at is as the model validated it)
    shape, classes = (None if name in bad else data[name] for name in ("image_shape", "classes"))
    files, every_file = [], isinstance(data.get("files"), list) and 0 < len(data["files"]) <= MAX_FILES
    every_file = every_file and not ("files" in bad and not bad_files)  # (the list itself was wrong)
    for i, table in enumerate(data.get("files") if every_file else ()):
        if i in bad_files:
            every_file = False
            continue
        try:
            files.append((i, FileSpec.model_validate(table, strict=True)))
        except ValidationError:
            every_file = False
    expect = {}
    for split, table in (data.get("expect") if isinstance(data.get("expect"), dict) else {}).items():
        if split in bad_expect:
            continue
        try:
            expect[split] = ExpectSpec.model_validate(table, strict=True)
        except ValidationError:
            pass
    return _cross_checks(shape, len(classes) if classes else None, files, expect, every_file)


# What a field must be, said once per field in the words of the spec (pydantic's own message
# names the rule broken; this names what to write). {got} is the value given, shortened.
_MUST = {
    "name": "name must be 1–64 lowercase letters, digits, '.', '_' or '-', got {got}",
    "image_shape": f"image_shape must be [rows, columns], each an integer in 1..{MAX_SIDE}, got {{got}}",
    "classes": f"classes must be a list of 2..{MAX_CLASSES} distinct names of 1..{MAX_CLASS_NAME} characters, "
               "one line each, got {got}",
    "mirrors": f"mirrors must be a list of at most {MAX_MIRRORS} base URLs, got {{got}}",
    "files": f"files must list the IDX archives (1 to {MAX_FILES} [[files]] tables with name, split, kind and a "
             "checksum)",
    "floor": "floor must be a test accuracy in 0..1 (the gate never promotes below it), got {got}",
    "notes": "notes must be a table, got {got}",
    "expect": "expect must be a table of splits, got {got}",
    "files.*": "{label} must be a table with name, split, kind, sha256/size or archive_md5/size",
    "files.name": "{label}: name must be a plain file name (not ending in .json), got {got}",
    "files.split": "{label}: split must be a lowercase name such as train or test, got {got}",
    "files.kind": "{label}: kind must be images or labels, got {got}",
    "files.sha256": "{label}: sha256 must be 64 lowercase hex digits, got {got}",
    "files.archive_sha256": "{label}: archive_sha256 must be 64 lowercase hex digits, got {got}",
    "files.archive_md5": "{label}: archive_md5 must be 32 lowercase hex digits, got {got}",
    "files.size": "{label}: size must be a positive number of bytes, got {got}",
    "files.archive_size": "{label}: archive_size must be a positive number of bytes, got {got}",
    "expect.*": "{label} must be a table with " + ", ".join(ExpectSpec.model_fields),
    "expect.rows": "{label}.rows must be a positive number of rows, got {got}",
    "expect.class_counts": "{label}.class_counts must list one row count per class, got {got}",
    "expect.pixel_mean": "{label}.pixel_mean must be a number in 0..1 (of pixel/255), got {got}",
    "expect.pixel_std": "{label}.pixel_std must be a number in 0..1 (of pixel/255), got {got}",
}


def _lines(error: ValidationError, data) -> list[str]:
    """One line per mistake (a field wrong in three ways is one line), unknown keys first."""
    lines: list[str] = []
    for err in sorted(error.errors(), key=lambda e: e["type"] != "extra_forbidden"):
        loc = err["loc"]
        group, rest = (loc[0], loc[1:]) if loc and loc[0] in ("files", "expect") else (None, loc)
        label, value = None, (data.get(group) if group is not None else data)
        if group is not None and rest:
            table = data[group][rest[0]] if isinstance(data.get(group), (list, dict)) else None
            name = table.get("name") if group == "files" and isinstance(table, dict) else None
            label = (f"files[{rest[0]}]" + (f" ({_short(name)})" if isinstance(name, str) else "") if group == "files"
                     else f"expect.{_short(rest[0])[1:-1]}")
            rest, value = rest[1:], table
        key = rest[0] if rest else None
        if err["type"] == "extra_forbidden":
            known = ", ".join(sorted((FileSpec if group == "files" else ExpectSpec).model_fields)
                              if label else sorted(DatasetSpec.model_fields))
            line = f"{label + ': ' if label else ''}unknown key {_short(key)} (known: {known})"
        elif err["type"] == "value_error":  # a validator's own words
            message = err["msg"].removeprefix("Value error, ")
            line = "\n".join(f"{label + ': ' if label else ''}{part}" if label and not part.startswith(label)
                             else part for part in message.split("\n"))
        else:
            rule = f"{group}.{key}" if label and key else f"{group}.*" if label else str(key if key else group)
            got = value.get(key) if isinstance(value, dict) and key is not None else value
            where = ".".join(map(str, (label, *rest) if label else rest)) or "spec"
            template = _MUST.get(rule)  # (the fallback is not a template: it may hold the spec's braces)
            line = template.format(label=label, got=_short(got)) if template else f"{where}: {err['msg']}"
        lines += [part for part in line.split("\n") if part not in lines]
    return lines


def from_dict(data, source: str = "built-in") -> Dataset:
    """Validate a spec (as parsed from TOML/JSON) against ``DatasetSpec``; raise SpecError
    listing every mistake, one line each."""
    where = Path(source).name if source != "built-in" else "spec"
    if not isinstance(data, dict):
        raise SpecError(f"{where}: a dataset spec is a table/object with name, image_shape, classes, mirrors, files")
    try:
        spec = DatasetSpec.model_validate(data, context={"source": source})
    except ValidationError as e:
        lines = _lines(e, data)
        said = set(lines)
        lines += [line for line in _valid_parts(data, e) if line not in said]  # (cross-field: at once)
        raise SpecError("\n".join(f"{where}: {line}" for line in lines)) from None
    return spec.dataset(source)


def load_spec(path: str | Path) -> Dataset:
    """A user's dataset spec from a TOML or JSON file, validated."""
    import tomllib

    from storage.atomic import read_bounded

    path = Path(path)
    try:
        text = read_bounded(path, 1 << 20)  # a regular file only, never more than 1 MiB read
    except FileNotFoundError:
        raise SpecError(f"{path}: no such dataset spec file") from None
    except OSError as e:
        raise SpecError(f"{path}: cannot read the dataset spec ({e.strerror})") from None
    except ValueError as e:
        raise SpecError(f"{path}: not a dataset spec ({e}; a spec is a file of at most 1 MiB)") from None
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


def class_names(classes) -> list[str] | None:
    """The names worth showing beside a predicted label: None when they are just the label
    numbers (MNIST's digits)."""
    classes = list(classes)
    return None if classes == [str(i) for i in range(len(classes))] else classes


def check_pinned(dataset: Dataset, allow_unpinned: bool) -> None:
    if dataset.unpinned and not allow_unpinned:
        raise SpecError(f"dataset {dataset.name!r}: {', '.join(dataset.unpinned)} "
                        f"{'has' if len(dataset.unpinned) == 1 else 'have'} no checksum; add sha256 + size "
                        "(or the published archive_md5/archive_sha256 + size), or pass --allow-unpinned to accept "
                        "whatever the mirror serves (the provenance then records the hash seen)")
