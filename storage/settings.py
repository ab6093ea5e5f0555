"""Every ``DIGITFLOW_*`` environment variable, typed and bounded in one place. No Prefect.

``settings()`` reads the environment as it is now (a test, or the CLI's ``--verbose``, may change
it) and gives a frozen ``Settings``; a malformed value is one DigitflowError naming the variable.
Flags win over these (``--home`` over ``DIGITFLOW_HOME``, ``--mirror`` over ``DIGITFLOW_MIRRORS``);
credentials of object stores keep their clouds' own variables (``storage.objects``).
"""

from __future__ import annotations

import functools
import os
import re
from typing import Annotated, Literal, TypeVar

from pydantic import BaseModel, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from storage import DigitflowError

PREFIX = "DIGITFLOW_"


class Settings(BaseSettings):
    """digitflow's environment. An empty variable counts as unset."""

    model_config = SettingsConfigDict(env_prefix=PREFIX, env_ignore_empty=True, extra="ignore", frozen=True)

    home: str | None = Field(None, description="the home: a path, s3://bucket/prefix or az://container/prefix "
                                               "(--home wins; default ~/.digitflow)")
    cache: str = Field("~/.cache/digitflow", description="this machine's working copies of homes in object storage")
    mirrors: Annotated[list[str], NoDecode] = Field(default_factory=list, description=(
        "mirror base URLs, comma or space separated (--mirror wins; default: the dataset's public ones)"))
    webhook_url: SecretStr | None = Field(None, description="where alerts are POSTed when no --webhook is given")
    api_token: SecretStr | None = Field(None, description="the bearer token of `digitflow api` (and of the "
                                                          "drift monitor's requests to it)")
    debug: bool = Field(False, description="tracebacks and Prefect's logs on the terminal (what --verbose sets)")
    ephemeral: bool = Field(False, description="Prefect's temporary server per command instead of the local one")
    server_port: int = Field(4200, ge=1, le=65535, description="the local Prefect server's port")
    workerless_grace: float = Field(30.0, gt=0, le=86_400, description=(
        "seconds a sweep's Dask cluster may have no worker before the sweep gives up"))
    # Set by `digitflow api` for its uvicorn workers (not meant to be set by hand).
    api_log_level: Literal["CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG"] = "INFO"
    api_settings: str | None = None

    @field_validator("mirrors", mode="before")
    @classmethod
    def _split(cls, value):
        return [m for m in re.split(r"[,\s]+", value) if m] if isinstance(value, str) else value


def env_name(field: str) -> str:
    """The variable of ``Settings`` field ``field`` (``api_settings`` → ``DIGITFLOW_API_SETTINGS``)."""
    if field not in Settings.model_fields:
        raise KeyError(field)
    return PREFIX + field.upper()


def settings() -> Settings:
    """The environment's ``Settings`` now (parsed once per distinct set of DIGITFLOW_* values)."""
    return _parse(tuple(sorted((k, v) for k, v in os.environ.items() if k.upper().startswith(PREFIX))))


def debug() -> bool:
    """``DIGITFLOW_DEBUG`` (what --verbose sets); False while a malformed variable, perhaps this
    one, is being reported in its one line."""
    try:
        return settings().debug
    except DigitflowError:
        return False


def misspelt() -> list[str]:
    """A warning for each ``DIGITFLOW_*`` variable that is set, names no setting and is one typo
    away from one (``DIGITFLOW_HOMEE``: else silently ignored, and the default home used)."""
    import difflib

    names = [env_name(field) for field in Settings.model_fields]
    warnings = []
    for key in sorted(k for k in os.environ if k.upper().startswith(PREFIX) and k.upper() not in names):
        near = difflib.get_close_matches(key.upper(), names, n=1, cutoff=0.8)
        if near:
            warnings.append(f"{key[:80]} is not a digitflow variable (did you mean {near[0]}?); ignored")
    return warnings[:5]


@functools.lru_cache(maxsize=16)
def _parse(environ: tuple[tuple[str, str], ...]) -> Settings:
    try:
        return Settings(**{})
    except ValidationError as e:
        err = e.errors()[0]
        name = PREFIX + str(err["loc"][0]).upper() if err.get("loc") else PREFIX + "?"
        given = {k.upper(): v for k, v in environ}  # (names are read in any case)
        shown = "…" if name in (PREFIX + "WEBHOOK_URL", PREFIX + "API_TOKEN") else repr(given.get(name, ""))[:80]
        raise DigitflowError(f"{name}={shown}: {err['msg']}") from None


def env_table() -> str:
    """The README's table of the variables (a test keeps the README's copy equal to this)."""
    rows = ["| variable | default | what it sets |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        if field.description is None:  # internal: set by digitflow for its own worker processes
            continue
        default = field.get_default(call_default_factory=True)
        shown = "unset" if default in (None, []) else f"`{default}`"
        bounds = [f"{sign} {value}" for sign, value in limits(field)]
        rows.append(f"| `{PREFIX}{name.upper()}` | {shown}{' (' + ', '.join(bounds) + ')' if bounds else ''} | "
                    f"{field.description} |")
    return "\n".join(rows)


# ---- flags: the one-line error and the help text of a typed group of settings --------------

M = TypeVar("M", bound=BaseModel)


def limits(field) -> list[tuple[str, float]]:
    """A pydantic field's declared bounds as (sign, value): ``[("≥", 1), ("≤", 10)]``."""
    return [(sign, getattr(m, attr)) for m in field.metadata
            for attr, sign in (("gt", ">"), ("ge", "≥"), ("lt", "<"), ("le", "≤")) if hasattr(m, attr)]


def bounds(model: type[BaseModel], name: str) -> tuple[float | None, float | None]:
    """(low, high) of field ``name`` of ``model`` as declared (None: unbounded on that side)."""
    declared = limits(model.model_fields[name])
    low = next((value for sign, value in declared if sign in (">", "≥")), None)
    high = next((value for sign, value in declared if sign in ("<", "≤")), None)
    return low, high


def flag_help(model: type[BaseModel], name: str) -> str:
    """A flag's help: the field's description and its bounds."""
    low, high = bounds(model, name)

    def number(v: float) -> str:
        return f"{int(v):,}" if float(v).is_integer() else f"{v:g}"

    shown = f"; {number(low)} to {number(high)}" if low is not None and high is not None else ""
    return f"{model.model_fields[name].description}{shown}."


def checked(model: type[M], /, **values) -> M:
    """``model(**values)``, or one DigitflowError naming the first flag that does not fit:
    ``--max-body must be an integer in 1024..1073741824, got 12``."""
    try:
        return model(**values)
    except ValidationError as e:
        err = e.errors()[0]
    name = str(err["loc"][0]) if err.get("loc") else "?"
    flag = "--" + name.replace("_", "-")
    low, high = bounds(model, name) if name in model.model_fields else (None, None)
    if err["type"] in ("greater_than_equal", "less_than_equal", "greater_than", "less_than", "int_type",
                       "float_type", "int_from_float", "finite_number") and low is not None and high is not None:
        annotation = model.model_fields[name].annotation
        kind = "an integer" if annotation is int else "a number"
        raise DigitflowError(f"{flag} must be {kind} in {low}..{high}, got {values.get(name)!r}")
    raise DigitflowError(f"{flag}: {err['msg'].removeprefix('Value error, ')}")
