"""The contract between the CLI, the dashboard and the flows: typed, validated settings.

Every hyperparameter is declared once, in ``nn.presets.Hyperparameters`` (name, type, default,
help text, bounds). From that one declaration this module derives:

- ``Overrides``: the typed, bounded hyperparameter fields (each optional: empty keeps the
  preset's value). ``with_hyperparameters`` makes each of them a keyword parameter of a flow, so
  the dashboard's Run form shows every hyperparameter as a typed field with its bounds and the
  default preset's value, and ``prefect deployment run … --param lr=0.1`` sets one. A sweep's
  grid is a list of ``Overrides``.
- ``parse_value``: the text syntax of one value, shared by the ``--flag`` and the sweep grid
  axis of the same name (``hidden``: ``512`` or ``512x256``).
- the CLI's hyperparameter flags (``cli_options``) and the grid's axes (``parse_grid``).

The defaults and bounds of the other run settings live beside the code they govern: the gate's
floor and tolerance and the model name's pattern in ``storage.registry``, the ingest settings in
``storage.config``; the typed aliases below (``RowsPerShard``, ``Accuracy``, …) carry them into
the flows' signatures.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import typing
from typing import Annotated, Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, create_model

import nn
from nn.presets import Hyperparameters, check_value, describe_bounds
from storage import DigitflowError
from storage.config import DEFAULT_RETRIES, DEFAULT_ROWS_PER_SHARD, DEFAULT_TIMEOUT, IngestSettings  # noqa: F401
from storage.registry import (APPROVAL_BOUNDS, APPROVAL_MODES, APPROVAL_TIMEOUT, DEFAULT_NAME, DEFAULT_TOLERANCE,  # noqa: F401
                              GATE_BOUNDS, MODEL_NAME)

PRESETS = tuple(nn.presets.PRESETS)
Preset = Literal[PRESETS]  # type: ignore[valid-type]


# ---- run settings: typed from the bounds declared beside the code they govern ------------
# (the flows' signatures use these, so the Run form shows and Prefect enforces the bounds)

Accuracy = Annotated[float, Field(ge=GATE_BOUNDS[0], le=GATE_BOUNDS[1])]
Floor = Optional[Accuracy]  # None: the dataset's own floor (storage.datasets.Dataset.floor)
# "required": a version the gate would promote waits for a person's answer (flows/approval.py).
ApprovalMode = Literal[APPROVAL_MODES]  # type: ignore[valid-type]
ApprovalTimeout = Annotated[float, Field(ge=APPROVAL_BOUNDS[0], le=APPROVAL_BOUNDS[1],
                                         description="Seconds to wait for an answer; none is a rejection")]
ModelName = Annotated[str, Field(pattern=f"^{MODEL_NAME.pattern}$")]
# Where the alert webhook's URL is kept (never the URL itself: parameters are public in the dashboard).
Webhook = Optional[Annotated[str, Field(pattern=r"^(env|secret):[A-Za-z0-9_][A-Za-z0-9_-]{0,127}$",
                                        description="env:VARIABLE or secret:PREFECT_SECRET_BLOCK holding the URL")]]
# A built-in dataset's name or the path of a spec file (checked when the flow resolves it).
DatasetName = Annotated[str, Field(min_length=1, max_length=4096,
                                   description="mnist, fashion-mnist, or the path of a dataset spec (.toml/.json)")]


def _base(kind) -> type:
    args = [t for t in (typing.get_args(kind) or (kind,)) if t is not type(None)]
    return args[0]


def _optional(kind) -> bool:
    return type(None) in typing.get_args(kind)


def _ingest(name: str) -> Any:
    """The type of ingest setting ``name``: its field in ``IngestSettings``, bounds included."""
    field = IngestSettings.model_fields[name]
    base = _base(field.annotation)
    kind = Annotated[base, Field(strict=base is int), *field.metadata]
    return Optional[kind] if _optional(field.annotation) else kind


RowsPerShard = _ingest("rows_per_shard")
Timeout = _ingest("timeout")
Retries = _ingest("retries")
Deadline = _ingest("deadline")  # None: from the file's size


# An optional hyperparameter (max_norm, patience: None turns it off) is turned off across the flow
# boundary by OFF, because there None (an empty Run form field) already means "the preset's
# value"; OFF lies outside their bounds, so it means nothing else. The CLI reads "none" as OFF.
OFF = 0


assert all(check_value(name, kind, f.metadata, OFF) is not None  # OFF is never a value of its own
           for name, (kind, f) in Hyperparameters.fields().items() if _optional(kind))


def _help(kind, meta) -> str:
    """A hyperparameter's help as nn/presets.py words it, an optional one's "(none: off)" made
    "(0 or none: off)": the CLI takes either, the Run form and Prefect's CLI OFF."""
    return meta["help"].replace("(none: off)", f"({OFF} or none: off)") if _optional(kind) else meta["help"]


def _field_type(kind, meta) -> Any:
    """The pydantic type of one hyperparameter, bounds included (an optional one's admit OFF)."""
    if meta["items"]:
        low, high = meta["items"]
        return Annotated[list[Annotated[int, Field(ge=low, le=high)]], Field(min_length=1, max_length=meta["max_items"])]
    if meta["choices"]:
        return Literal[tuple(meta["choices"])]  # type: ignore[valid-type]
    base = _base(kind)
    if base is bool:
        return bool
    bounds = {}
    if meta["low"] is not None:
        bounds["ge" if _optional(kind) or not meta["low_open"] else "gt"] = OFF if _optional(kind) else meta["low"]
    if meta["high"] is not None:
        bounds["lt" if meta["high_open"] else "le"] = meta["high"]
    return Annotated[base, Field(strict=base is int, **bounds)] if bounds else base


def _overrides_model() -> type[BaseModel]:
    default = nn.presets.PRESETS["default"]
    fields = {}
    for name, (kind, f) in Hyperparameters.fields().items():
        shown = getattr(default, name)
        shown = ("x".join(map(str, shown)) if isinstance(shown, tuple) else "off" if shown is None
                 else f"{shown:.4g}" if isinstance(shown, float) else str(shown).lower())
        bounds = describe_bounds(f.metadata).capitalize()
        fields[name] = (Optional[_field_type(kind, f.metadata)],
                        Field(None, title=name, description=" ".join(
                            part for part in (_help(kind, f.metadata).rstrip(".") + ".", bounds + "." if bounds else "",
                                              f"Preset 'default': {shown}.") if part)))
    return create_model("Overrides", __config__=ConfigDict(extra="forbid", frozen=True),
                        __doc__="Hyperparameters that override the preset; an empty field keeps the preset's value.",
                        **fields)


Overrides = _overrides_model()


def form_switches() -> dict[str, bool]:
    """The Run form's switch of each on/off hyperparameter opens on the ``default`` preset's value
    (a switch cannot be left empty to mean "the preset's"; every preset agrees on these today)."""
    default = nn.presets.PRESETS["default"]
    return {name: getattr(default, name) for name, (kind, _) in Hyperparameters.fields().items()
            if _base(kind) is bool}


def with_hyperparameters(fn):
    """Give a flow function that ends in ``**overrides`` one keyword parameter per hyperparameter
    (typed and bounded as in ``Overrides``, default None = the preset's value), and one line of
    help each in its docstring's Args. Prefect reads both (signature → Run form and validation,
    docstring → field descriptions); the function still receives them as ``**overrides``."""
    signature = inspect.signature(fn)
    params = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
    docs = []
    for name, field in Overrides.model_fields.items():
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                        annotation=field.annotation))
        docs.append(f"    {name}: {field.description}")
    fn.__signature__ = signature.replace(parameters=params)
    doc = inspect.cleandoc(fn.__doc__ or "")
    fn.__doc__ = doc + ("\n" if "Args:" in doc else "\n\nArgs:\n") + "\n".join(docs)
    return fn


def overrides_dict(overrides: BaseModel | dict | None) -> dict:
    """The set fields of ``overrides`` as a plain dict (``hyperparameters`` checks the values)."""
    if overrides is None:
        return {}
    if isinstance(overrides, BaseModel):
        overrides = overrides.model_dump()
    return {k: v for k, v in overrides.items() if v is not None}


def hyperparameters(preset: str, overrides: BaseModel | dict | None = None, dataset=None) -> Hyperparameters:
    """The preset with overrides, validated against the bounds declared in nn.presets (the same
    bounds as the ``Overrides`` type) and, given the ``dataset`` spec, against the network its
    pixels and classes make: bad values fail here in one line, before any work."""
    values, fields = overrides_dict(overrides), Hyperparameters.fields()
    off = [name for name, value in values.items() if name in fields and _is_off(fields[name][0], value)]
    try:
        hp = nn.presets.get(preset, **{name: value for name, value in values.items() if name not in off})
        hp = dataclasses.replace(hp, **dict.fromkeys(off)).validate()  # (get() reads None as "the preset's")
        return hp if dataset is None else hp.validate(n_in=dataset.pixels, n_out=len(dataset.classes))
    except (ValueError, TypeError) as e:
        raise DigitflowError(str(e)) from None


def _is_off(kind, value) -> bool:
    return _optional(kind) and value == OFF and not isinstance(value, bool)


# ---- text syntax: one parser for a --flag value and a grid axis value --------------------

def parse_value(name: str, text: str):
    """``text`` as a value of hyperparameter ``name`` (not yet bounds-checked)."""
    fields = Hyperparameters.fields()
    if name not in fields:
        raise DigitflowError(f"unknown hyperparameter {name!r}; one of {', '.join(fields)}")
    kind, f = fields[name]
    text = text.strip()
    try:
        if f.metadata["items"]:
            return [int(part) for part in text.replace(",", "x").split("x")]
        base = _base(kind)
        if text.lower() == "none" and _optional(kind):
            return OFF
        if base is bool:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return text.lower() in ("true", "1", "yes")
        return base(text) if base in (int, float) else text
    except ValueError:
        what = ("" if f.metadata["items"] else "true or false" if base is bool
                else "an integer" if base is int else "a number")
        bounds = describe_bounds(f.metadata) + (" written NxN (e.g. 512x256)" if f.metadata["items"] else "")
        raise DigitflowError(f"cannot read {text!r} as {name}: it takes {' '.join(p for p in (what, bounds) if p)}"
                             f"{', or none: off' if _optional(kind) else ''}") from None


def parse_overrides(texts: dict[str, str]) -> BaseModel:
    """The hyperparameter flags' texts (name → text) as an ``Overrides``: each read and checked
    against its bound here, in one line, before any work."""
    fields = Hyperparameters.fields()
    values = {name: parse_value(name, text) for name, text in texts.items()}
    for name, value in values.items():
        kind, f = fields[name]
        if (why := check_value(name, kind, f.metadata, None if _is_off(kind, value) else value)) is not None:
            raise DigitflowError(why.replace(", got ", f", or {OFF} or none (off), got ", 1) if _optional(kind) else why)
    return Overrides(**values)


def parse_grid(items: list[str]) -> list[dict]:
    """["hidden=128,256", "lr=0.05,0.1"] → the 4 override dicts of the Cartesian product.

    Values are comma-separated; a multi-layer hidden value is written with x: hidden=512x256,1024."""
    axes = []
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not values.strip():
            raise DigitflowError(f"grid item {item!r} must look like name=v1,v2")
        try:
            axes.append([(key, parse_value(key, v)) for v in values.split(",")])
        except DigitflowError as e:
            raise DigitflowError(f"grid item {item!r}: {e}") from None
    return [dict(combo) for combo in itertools.product(*axes)]


def cli_options() -> list[tuple[str, str, str, str]]:
    """(name, --flag, metavar, help) of every hyperparameter, for the CLI."""
    options = []
    for name, (kind, f) in Hyperparameters.fields().items():
        meta, base = f.metadata, _base(kind)
        bounds = describe_bounds(meta)
        metavar = ("N[xN...]" if meta["items"] else "|".join(meta["choices"]) if meta["choices"]
                   else "true|false" if base is bool else base.__name__.upper())
        if _optional(kind):
            metavar += "|none"
        options.append((name, "--" + name.replace("_", "-"), metavar,
                        _help(kind, meta) + (f" {bounds[0].upper()}{bounds[1:]}." if bounds else "")))
    return options
