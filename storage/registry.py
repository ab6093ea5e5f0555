"""The model registry: immutable integer versions, aliases, gate decisions. No Prefect.

    <home>/models/<name>/v1/, v2/, ...   one immutable folder per version (metadata.json inside)
    <home>/models/<name>/aliases.json    {"latest": N, "champion": M}
    <home>/models/<name>/decisions/vN.json   how version N fared at the gate (and any override)

A version folder is assembled in a staging folder and renamed into place while holding an
exclusive lock (flock, released by the kernel even on kill -9), so versions are allocated
atomically: two publishers at once get two versions and neither overwrites the other. A
crash leaves at most a hidden staging folder, which the next publish clears away.
"""

from __future__ import annotations

import getpass
import os
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from storage import DigitflowError
from storage.atomic import file_lock, fsync_dir, make_staging_dir, read_json, remove_leftovers, write_json

DEFAULT_NAME = "mnist-mlp"
ALIASES = ("latest", "champion")
_VERSION = re.compile(r"^v([1-9][0-9]*)$")


class RegistryError(DigitflowError):
    pass


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def gate(candidate: float, champion: float | None, *, tolerance: float = 0.0, floor: float = 0.97) -> tuple[bool, str]:
    """Promote when accuracy ≥ floor and ≥ champion - tolerance. Returns (promote, reason)."""
    if candidate < floor:
        return False, f"test accuracy {candidate:.4f} is below the floor {floor:.4f}"
    if champion is not None and candidate < champion - tolerance:
        return False, (f"test accuracy {candidate:.4f} is below the champion's {champion:.4f}"
                       + (f" minus tolerance {tolerance:.4f}" if tolerance else ""))
    if champion is None:
        return True, f"test accuracy {candidate:.4f} ≥ floor {floor:.4f}, and there was no champion"
    return True, f"test accuracy {candidate:.4f} ≥ champion's {champion:.4f}" + (
        f" minus tolerance {tolerance:.4f}" if tolerance else "")


class Registry:
    def __init__(self, home: str | os.PathLike, name: str = DEFAULT_NAME):
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
            raise RegistryError(f"invalid model name {name!r}")
        self.name = name
        self.root = Path(home) / "models" / name

    # ---- reading ----------------------------------------------------------------------

    def versions(self) -> list[int]:
        if not self.root.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.root.iterdir() if (m := _VERSION.match(p.name)) and p.is_dir())

    def path(self, version: int) -> Path:
        return self.root / f"v{version}"

    def aliases(self) -> dict[str, int]:
        try:
            return read_json(self.root / "aliases.json")
        except FileNotFoundError:
            return {}

    def resolve(self, ref: str | int) -> int:
        """A version number from 3, "3", "v3", "latest" or "champion"."""
        text = str(ref).strip()
        if text in ALIASES:
            version = self.aliases().get(text)
            if version is None:
                raise RegistryError(f"model {self.name!r} has no {text!r} version yet")
            return version
        m = re.fullmatch(r"v?([1-9][0-9]*)", text)
        if not m:
            raise RegistryError(f"{ref!r} is neither a version number nor one of {', '.join(ALIASES)}")
        version = int(m.group(1))
        if not self.path(version).is_dir():
            raise RegistryError(f"model {self.name!r} has no version {version} (has {self.versions() or 'none'})")
        return version

    def metadata(self, version: int) -> dict:
        return read_json(self.path(version) / "metadata.json")

    def metrics(self, version: int) -> dict:
        return read_json(self.path(version) / "metrics.json")

    def decision(self, version: int) -> dict | None:
        try:
            return read_json(self.root / "decisions" / f"v{version}.json")
        except FileNotFoundError:
            return None

    def find_digest(self, digest: str) -> int | None:
        for version in self.versions():
            try:
                if self.metadata(version).get("weights_sha256") == digest:
                    return version
            except FileNotFoundError:
                continue
        return None

    # ---- writing ----------------------------------------------------------------------

    def lock(self):
        return file_lock(self.root / ".lock")

    def publish(self, digest: str, build: Callable[[Path, int], dict]) -> tuple[int, bool]:
        """Publish a new version unless one with the same weights digest exists.

        ``build(folder, version)`` writes the version's files into ``folder`` and returns its
        metadata (``weights_sha256`` and ``version`` are added). Returns (version, created).
        """
        with self.lock():
            existing = self.find_digest(digest)
            if existing is not None:
                return existing, False
            remove_leftovers(self.root / "v*")  # a crashed publisher's staging folder
            version = max(self.versions(), default=0) + 1
            staging = make_staging_dir(self.path(version))
            try:
                metadata = dict(build(staging, version) or {})
                metadata.update({"version": version, "name": self.name, "weights_sha256": digest})
                metadata.setdefault("created", now())
                write_json(staging / "metadata.json", metadata)
                for p in staging.iterdir():
                    p.chmod(0o444)  # immutable by intent: read-only files
                os.rename(staging, self.path(version))  # fails rather than overwrite a version
                fsync_dir(self.root)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            self._set_aliases(latest=version)
            return version, True

    def _set_aliases(self, **moves: int) -> None:
        aliases = self.aliases()
        aliases.update(moves)
        write_json(self.root / "aliases.json", aliases)

    def record_decision(self, version: int, *, promoted: bool, reason: str, by: str = "gate",
                        accuracy: float | None = None, champion_before: int | None = None) -> dict:
        """Record the gate's verdict (or a manual override) and move ``champion`` if promoted."""
        with self.lock():
            self.resolve(version)
            decision = {"version": version, "status": "promoted" if promoted else "rejected", "reason": reason,
                        "by": by, "at": now(), "test_accuracy": accuracy, "champion_before": champion_before}
            previous = self.decision(version)
            if previous is not None:
                decision["history"] = previous.get("history", []) + [
                    {k: v for k, v in previous.items() if k != "history"}]
            write_json(self.root / "decisions" / f"v{version}.json", decision)
            if promoted:
                self._set_aliases(champion=version)
            return decision

    def promote(self, version: int, *, reason: str, by: str | None = None) -> dict:
        """A manual override of the gate: make ``version`` the champion, recording who/when/why."""
        if not reason.strip():
            raise RegistryError("a manual promotion needs a reason")
        version = self.resolve(version)
        return self.record_decision(version, promoted=True, reason=f"manual override: {reason}",
                                    by=by or getpass.getuser(), accuracy=self.metrics(version).get("test_accuracy"),
                                    champion_before=self.aliases().get("champion"))

    def status(self, version: int) -> str:
        if self.aliases().get("champion") == version:
            return "champion"
        decision = self.decision(version)
        if decision is None:
            return "pending"
        return "rejected" if decision["status"] == "rejected" else "former champion"

