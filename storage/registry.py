"""The model registry: immutable integer versions, aliases, gate decisions. No Prefect.

    <home>/models/<name>/v1/, v2/, ...   one immutable folder per version (metadata.json inside)
    <home>/models/<name>/aliases.json    {"latest": N, "champion": M}
    <home>/models/<name>/decisions/vN.json   how version N fared at the gate (and any override)

A version folder is assembled in a staging folder and renamed into place while holding an
exclusive lock (flock, released by the kernel even on kill -9), so versions are allocated
atomically: two publishers at once get two versions and neither overwrites the other. A
crash leaves at most a hidden staging folder, which the next publish clears away.

In a remote home (``s3://…``, ``az://…``) the same folders live in the bucket and ``root`` is this
machine's working copy. Every Registry reads a fresh snapshot of the bucket (``sync``); writes
take, besides the flock, a ``Lease`` in the bucket (``models/<name>/.lock``, created with
``If-None-Match: *``), re-read the snapshot, make their change locally and publish it: a new
version's files first and its ``metadata.json`` last, created with ``If-None-Match: *`` (the
commit point: a version without it is invisible and is overwritten by the next publish);
decisions and ``aliases.json`` with ``If-Match`` on the ETag read. Two machines publishing at
once get two versions and one champion.
"""

from __future__ import annotations

import contextlib
import getpass
import logging
import os
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from storage import DigitflowError
from storage.atomic import (file_lock, read_bounded, read_json as _read_json, remove_leftovers, staged_dir, write_json,
                            writing)
from storage.paths import PathError, inside
from storage.records import ALIASES, Aliases, Answer, Lineage, Metrics, ModelVersion, Verdict, classes_of

log = logging.getLogger("digitflow.registry")

DEFAULT_NAME = "mnist-mlp"
DEFAULT_TOLERANCE = 0.0  # the gate promotes when accuracy ≥ the champion's minus this
GATE_BOUNDS = (0.0, 1.0)  # of the floor and the tolerance (accuracies)
APPROVAL_MODES = ("none", "required")     # required: a version the gate would promote waits for a person
APPROVAL_TIMEOUT = 24 * 3600.0             # seconds a version the gate would promote waits for a person
APPROVAL_BOUNDS = (1.0, 30 * 24 * 3600.0)  # of that timeout
_VERSION = re.compile(r"^v([1-9][0-9]*)$")


class RegistryError(DigitflowError):
    pass


def _info(rel: str, path: Path, etag: str):
    from storage.objects import ObjectInfo

    return ObjectInfo(rel, path.stat().st_size, etag, None)


RECORD_LIMIT = 16 << 20  # bytes of one registry record (metadata, metrics, lineage, decision, aliases)


def read_json(path: Path):
    """A registry record's JSON, bounded: a file over RECORD_LIMIT is damaged, never read."""
    return _read_json(path, limit=RECORD_LIMIT)


def _parsed(record: type, data: dict):
    """``data`` as a ``record``, or None when it does not fit (pydantic's ValidationError)."""
    try:
        return record.model_validate(data)
    except ValueError:
        return None


MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def check_name(name: str) -> str:
    """A model name is a path component and an artifact key part: letters, digits, ._- ."""
    if not isinstance(name, str) or not MODEL_NAME.fullmatch(name):
        raise RegistryError(f"invalid model name {name!r}: use 1–100 letters, digits, '.', '_' or '-', "
                            "starting with a letter or digit")
    return name


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def gate(candidate: float, champion: float | None, *, tolerance: float = DEFAULT_TOLERANCE,
         floor: float) -> tuple[bool, str]:
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
        self.name = check_name(name)
        self.root = inside(Path(home), f"models/{name}", "model name")  # Home.models(name), for a Home or a path
        self.store = getattr(home, "store", None)  # the bucket of a remote home
        self.key = f"models/{name}"
        self._remote: dict[str, str] = {}  # remote key (below self.key) -> ETag, as last read
        self._seen: dict[int, tuple] = {}  # version -> (its files' stamps, what _checked found)
        if self.store is not None:
            self.sync()

    # ---- a remote home's bucket ---------------------------------------------------------

    def sync(self) -> None:
        """Make the working copy what the bucket holds: its committed versions (immutable:
        fetched once, re-fetched if changed here), decisions and aliases. Uncommitted versions
        (no metadata.json: a publisher died mid-upload) are invisible."""
        from storage.remote import fetch

        if self.store is None:
            return
        listing = {k[len(self.key) + 1:]: info for k, info in self.store.list(self.key).items()}
        committed = {int(m.group(1)) for rel in listing if (m := re.fullmatch(r"v([1-9][0-9]*)/metadata\.json", rel))}
        self._remote = {}
        self.root.mkdir(parents=True, exist_ok=True)
        for rel, info in sorted(listing.items(), key=lambda kv: kv[0].endswith("/metadata.json")):
            m = re.match(r"v([1-9][0-9]*)/", rel)
            if rel.startswith(".") or (m and int(m.group(1)) not in committed):
                continue
            try:
                path = inside(self.root, rel, "registry object")  # a key may hold anything, '..' too
            except PathError as e:
                log.warning("%s/%s: %s; ignored", self.store.url(self.key), rel, e)
                continue
            self._remote[rel] = info.etag
            fetch(self.store, f"{self.key}/{rel}", path, info)
        for p in self.root.iterdir():  # what the bucket does not have is not in the registry
            m = _VERSION.match(p.name)
            if m and p.is_dir() and int(m.group(1)) not in committed:
                shutil.rmtree(p, ignore_errors=True)
        for p in [self.root / "aliases.json", *(self.root / "decisions").glob("*.json")]:
            if p.is_file() and p.relative_to(self.root).as_posix() not in self._remote:
                p.unlink()

    def _push(self) -> None:
        """Publish what this working copy changed (under the lease): new versions (files, then
        metadata.json with If-None-Match), then decisions and aliases with If-Match."""
        from storage.objects import Conflict
        from storage.remote import _same, remember, send

        for version in self.versions():
            rel = f"v{version}/metadata.json"
            if rel in self._remote or not (self.root / rel).is_file():
                continue
            prefix = f"{self.key}/v{version}"
            files = sorted(p for p in self.path(version).iterdir() if p.is_file() and p.name != "metadata.json")
            for p in files:
                send(self.store, f"{prefix}/{p.name}", p)
            for stray in set(self.store.list(prefix)) - {f"{prefix}/{p.name}" for p in files}:
                self.store.delete(stray)  # left by a publisher that died before its commit
            try:  # the commit point, last
                self._remote[rel] = self.store.put(f"{prefix}/metadata.json", (self.root / rel).read_bytes(),
                                                   if_none_match=True)
            except Conflict:
                raise RegistryError(f"{self.store.url(prefix)}: another machine published v{version} "
                                    "first; publish again") from None
        mutable = [*(self.root / "decisions").glob("v*.json"), self.root / "aliases.json"]  # aliases last
        for p in mutable:
            rel = p.relative_to(self.root).as_posix()
            if not p.is_file():
                continue
            etag = self._remote.get(rel)
            if etag is not None and _same(p, _info(rel, p, etag), self.store, f"{self.key}/{rel}"):
                continue
            try:
                self._remote[rel] = self.store.put(f"{self.key}/{rel}", p.read_bytes(), if_none_match=etag is None,
                                                   if_match=etag)
                remember(p, self._remote[rel])
            except Conflict:
                raise RegistryError(f"{self.store.url(self.key + '/' + rel)} changed under the registry lease "
                                    "(its holder was too slow?); nothing was overwritten, try again") from None

    # ---- reading ----------------------------------------------------------------------
    # Every read tolerates damage (a stray or empty vN/ folder, truncated JSON): a damaged
    # entry is reported as such and never breaks a listing; writes repair what they can.

    def versions(self) -> list[int]:
        """Every vN/ folder, damaged or not (see ``problem``)."""
        if not self.root.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.root.iterdir() if (m := _VERSION.match(p.name)) and p.is_dir())

    def path(self, version: int) -> Path:
        return self.root / f"v{version}"

    def problem(self, version: int) -> str | None:
        """Why version ``version`` cannot be used (None when it is intact): a file missing, or a
        record that does not read as its type."""
        return self._checked(version)[2]

    _RECORDS = ("metadata.json", "metrics.json", "lineage.json", "model.npz", "model.json")

    def _checked(self, version: int) -> tuple[ModelVersion | None, Metrics | None, str | None]:
        """The version's metadata and metrics, read and validated once while its files stay as
        they were (device, inode, size, modification and change time of each: a file written,
        replaced or touched since is read again, its mtime put back or not); else why not. A
        listing asks each version's status, record and metrics."""
        stamps = []
        for name in self._RECORDS:
            try:
                st = os.stat(self.path(version) / name)
                stamps.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
            except OSError:
                stamps.append(None)
        seen = self._seen.get(version)
        if seen is not None and seen[0] == stamps:
            return seen[1]
        found = self._check(version)
        self._seen[version] = (stamps, found)
        return found

    def _check(self, version: int) -> tuple[ModelVersion | None, Metrics | None, str | None]:
        folder = self.path(version)
        try:
            meta = read_json(folder / "metadata.json")
            if not isinstance(meta, dict) or not isinstance(meta.get("weights_sha256"), str):
                return None, None, "metadata.json has no weights digest"
            record = _parsed(ModelVersion, meta)
            if record is None or record.version != version:
                return None, None, "metadata.json is not a version's record"
            metrics = read_json(folder / "metrics.json")
            if not isinstance(metrics, dict) or not isinstance(metrics.get("test_accuracy"), (int, float)):
                return None, None, "metrics.json has no test accuracy"
            figures = _parsed(Metrics, metrics)
            if figures is None:
                return None, None, "metrics.json is not a version's metrics"
            self.lineage(version)  # a damaged one: the version's classes are unknown
        except RegistryError as e:
            return None, None, str(e).removeprefix(f"v{version}/")
        except FileNotFoundError as e:
            return None, None, f"{Path(e.filename).name} is missing"
        except (OSError, ValueError, RecursionError) as e:
            return None, None, f"unreadable ({type(e).__name__})"
        for name in ("model.npz", "model.json"):
            if not (folder / name).is_file():
                return None, None, f"{name} is missing"
        return record, figures, None

    def intact_versions(self) -> list[int]:
        return [v for v in self.versions() if self.problem(v) is None]

    def aliases(self) -> Aliases:
        """``latest`` and ``champion``; if aliases.json is damaged or points at a damaged
        version, what it should say is worked out from the versions and the gate's decisions."""
        stored, problem = self._stored_aliases()
        return Aliases(**(stored if problem is None else self._rebuilt_aliases(stored)))

    def aliases_problem(self) -> str | None:
        return self._stored_aliases()[1]

    def _stored_aliases(self) -> tuple[dict[str, int], str | None]:
        path = self.root / "aliases.json"
        try:
            stored = read_json(path)
        except FileNotFoundError:
            stored = {}
        except (OSError, ValueError, RecursionError):
            return {}, f"{path} is damaged"
        if not isinstance(stored, dict) or not all(k in ALIASES and type(v) is int and v >= 1 for k, v in stored.items()):
            return {}, f"{path} is damaged"
        intact = self.intact_versions()
        if intact and stored.get("latest") != max(intact):
            return stored, f"{path}: 'latest' is {stored.get('latest')}, the newest intact version is {max(intact)}"
        if "champion" in stored and stored["champion"] not in intact:
            return stored, f"{path}: champion v{stored['champion']} is missing or damaged"
        return stored, None

    def _rebuilt_aliases(self, stored: dict) -> dict[str, int]:
        intact = self.intact_versions()
        aliases = {"latest": max(intact)} if intact else {}
        champion = stored.get("champion")
        if champion not in intact:  # the most recent promotion of an intact version
            promoted = [d for v in intact if (d := self.decision(v)) and d.promoted]
            champion = max(promoted, key=lambda d: (d.at, d.version)).version if promoted else None
        if champion is not None:
            aliases["champion"] = champion
        return aliases

    def resolve(self, ref: str | int) -> int:
        """A version number from 3, "3", "v3", "latest" or "champion"."""
        text = str(ref).strip()
        if text in ALIASES:
            version = self.aliases().of(text)
            if version is None:
                raise RegistryError(f"model {self.name!r} has no {text!r} version yet")
            return version
        m = re.fullmatch(r"v?([1-9][0-9]{0,8})", text)
        if not m:
            raise RegistryError(f"{ref!r} is neither a version number nor one of {', '.join(ALIASES)}")
        version = int(m.group(1))
        if not self.path(version).is_dir():
            raise RegistryError(f"model {self.name!r} has no version {version} (has {self.versions() or 'none'})")
        return version

    def _intact(self, version: int) -> tuple[ModelVersion, Metrics]:
        record, figures, problem = self._checked(version)
        if problem is not None:
            raise RegistryError(f"{self.path(version)}: damaged version ({problem})")
        return record, figures

    def metadata(self, version: int) -> ModelVersion:
        """Version ``version``'s record (RegistryError if it is damaged)."""
        return self._intact(version)[0]

    def metrics(self, version: int) -> Metrics:
        """Version ``version``'s metrics (RegistryError if it is damaged)."""
        return self._intact(version)[1]

    def decision(self, version: int) -> Verdict | None:
        """The gate's verdict on ``version``; None if undecided or the record is damaged (see
        ``decision_problem``: a damaged record is never taken for "undecided" by a write)."""
        return self._decision(version)[0]

    def decision_problem(self, version: int) -> str | None:
        """Why ``decisions/vN.json`` exists but cannot be read as a verdict on ``version``."""
        return self._decision(version)[1]

    def _decision(self, version: int) -> tuple[Verdict | None, str | None]:
        path = self.root / "decisions" / f"v{version}.json"
        try:
            verdict = Verdict.model_validate(read_json(path))
        except FileNotFoundError:
            return None, None
        except (OSError, ValueError, RecursionError):  # (pydantic's ValidationError is a ValueError)
            return None, f"decisions/v{version}.json is damaged"
        if verdict.version != version:
            return None, f"decisions/v{version}.json is the decision on v{verdict.version}"
        return verdict, None

    def _damaged_decision(self, version: int, keep: int = 4096) -> str:
        """The start of a damaged ``decisions/vN.json`` (it may hold a person's rejection): kept in
        the decision that replaces it, never lost."""
        path = self.root / "decisions" / f"v{version}.json"
        try:  # never through a symbolic link (it could point at any file of this machine's)
            return read_bounded(path, keep, head=True, follow_symlinks=False).decode("utf-8", errors="replace")
        except ValueError:
            return "(not read: not a regular file)"
        except OSError as e:
            return f"(not read: {'a symbolic link' if os.path.islink(path) else type(e).__name__})"

    def lineage(self, version: int) -> Lineage | None:
        """What ``version`` was trained from; None when it has no lineage.json. A damaged one is a
        RegistryError: its class names would be guessed, and a version is never served on a guess."""
        try:
            data = read_json(self.path(version) / "lineage.json")
        except FileNotFoundError:
            return None
        except (OSError, ValueError, RecursionError) as e:
            raise RegistryError(f"v{version}/lineage.json is not valid JSON ({type(e).__name__})") from None
        try:
            return Lineage.model_validate(data)
        except ValueError:  # (pydantic's ValidationError)
            raise RegistryError(f"v{version}/lineage.json is not a version's lineage") from None

    def classes(self, version: int) -> list[str]:
        """The class names of a version (recorded from its dataset; MNIST's are the digits)."""
        return classes_of(self.lineage(version))

    def dataset_of(self, version: int) -> str | None:
        """The key of the dataset a version was trained on (``Dataset.key``; MNIST's versions
        record none), or None when its lineage cannot be read (read even when the version is
        damaged elsewhere: it still says which dataset it was)."""
        try:
            lineage = self.lineage(version)
        except RegistryError:
            return None
        if lineage is None:
            return None
        return (lineage.dataset.key or lineage.dataset.name) if lineage.dataset else "mnist"

    def check_dataset(self, key: str) -> None:
        """Refuse, in one line, to put a model of dataset ``key`` into a registry whose versions
        were trained on another dataset (a name is not an identity: see ``Dataset.key``)."""
        owners = {k for v in self.versions() if (k := self.dataset_of(v)) is not None}
        if owners and owners != {key}:
            raise RegistryError(f"model {self.name!r} holds versions trained on dataset {sorted(owners)[0]!r}, not "
                                f"{key!r}: publish this one under another --model-name")

    def load_model(self, version: int, dtype=None):
        """The version's network, verified: its arrays must hash to the digest recorded at
        publish time (a changed or damaged model.npz/model.json is refused)."""
        import nn

        digest = self.metadata(version).weights_sha256
        try:
            return nn.load(self.path(version), **({"dtype": dtype} if dtype is not None else {}),
                           expect_digest=digest)
        except nn.ModelFormatError as e:
            raise RegistryError(str(e)) from None

    def find_digest(self, digest: str) -> int | None:
        for version in self.intact_versions():
            if self.metadata(version).weights_sha256 == digest:
                return version
        return None

    # ---- writing ----------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self):
        """This machine's flock; in a remote home also the bucket's lease, with a fresh snapshot
        on entry and the changes published on a clean exit."""
        with file_lock(self.root / ".lock"):
            if self.store is None:
                yield
                return
            from storage.objects import Lease

            with Lease(self.store, f"{self.key}/.lock") as lease:
                self.sync()
                yield
                lease.confirm()  # still ours, renewed: else LeaseLost, and nothing is pushed
                self._push()

    def publish(self, digest: str, build: Callable[[Path, int], dict], dataset: str = "mnist") -> tuple[int, bool]:
        """Publish a new version unless one with the same weights digest exists.

        ``build(folder, version)`` writes the version's files into ``folder`` and returns its
        metadata (``weights_sha256`` and ``version`` are added). Returns (version, created).
        Damaged aliases are repaired either way. A registry holding another ``dataset``'s
        versions is refused before anything is written.
        """
        with writing(self.root), self.lock():
            self.check_dataset(dataset)
            existing = self.find_digest(digest)
            if existing is not None:
                self._repair_aliases()
                return existing, False
            version = max(self.versions(), default=0) + 1  # never reuse a number, even a damaged one's
            # Under the registry lock; a crashed publisher's staging folder (any version) is cleared.
            remove_leftovers(self.root / "v*")
            with staged_dir(self.path(version), lock=False, replace=False) as staging:
                metadata = dict(build(staging, version) or {})
                metadata.update({"version": version, "name": self.name, "weights_sha256": digest})
                metadata.setdefault("created", now())
                write_json(staging / "metadata.json", ModelVersion.model_validate(metadata).model_dump(mode="json"))
                for p in staging.iterdir():
                    p.chmod(0o444)  # immutable by intent: read-only files
            self._write_aliases(Aliases(**{**self._rebuilt_aliases(self._stored_aliases()[0]), "latest": version}))
            return version, True

    def _repair_aliases(self) -> None:
        stored, problem = self._stored_aliases()
        if problem is not None:
            self._write_aliases(Aliases(**self._rebuilt_aliases(stored)))

    def _write_aliases(self, aliases: Aliases) -> None:
        write_json(self.root / "aliases.json", aliases.model_dump(exclude_none=True))

    def record_decision(self, version: int, *, promoted: bool, reason: str, by: str = "gate",
                        accuracy: float | None = None, champion_before: int | None = None) -> Verdict:
        """Record the gate's verdict (or a manual override) and move ``champion`` if promoted."""
        with self.lock():
            return self._record_decision(version, promoted=promoted, reason=reason, by=by, accuracy=accuracy,
                                         champion_before=champion_before)

    def _record_decision(self, version: int, *, promoted: bool, reason: str, by: str, accuracy: float | None,
                         champion_before: int | None, approval: Answer | None = None) -> Verdict:
        self.resolve(version)
        previous, problem = self._decision(version)
        history = [] if previous is None else [*previous.history, previous.model_copy(update={"history": []})]
        decision = Verdict(version=version, status="promoted" if promoted else "rejected", reason=reason, by=by,
                           at=now(), test_accuracy=accuracy, champion_before=champion_before, approval=approval,
                           history=history, replaced_damaged=self._damaged_decision(version) if problem else None)
        write_json(self.root / "decisions" / f"v{version}.json", decision.model_dump(mode="json"))
        aliases = self.aliases()
        if promoted:
            aliases = aliases.model_copy(update={"champion": version})
        self._write_aliases(aliases)
        return decision

    def preview(self, version: int, *, tolerance: float, floor: float) -> tuple[bool, str]:
        """What the gate would say of ``version`` now (nothing recorded, no lock)."""
        accuracy = self.metrics(version).test_accuracy
        champion = self.aliases().champion
        return gate(accuracy, self.metrics(champion).test_accuracy if champion is not None else None,
                    tolerance=tolerance, floor=floor)

    def decide(self, version: int, *, tolerance: float, floor: float,
               approval: Answer | None = None) -> tuple[Verdict, bool]:
        """The promotion gate, read-decide-write under the registry lock (two publishers finishing
        together cannot both be promoted over each other). The candidate's weights are verified
        first. Returns (decision, decided_now); a version decided before keeps its decision.

        ``approval`` (a person's ``Answer``, or the timeout's)
        is recorded with the decision; the version is promoted only if the gate, run again now,
        promotes it *and* the person approved: a rejection or a timeout leaves the champion as it is."""
        with self.lock():
            previous, problem = self._decision(version)
            if previous is not None:
                return previous, False
            if problem is not None:  # never read as "undecided": it may hold a person's rejection
                raise RegistryError(f"{self.name} v{version}: {problem}; the gate does not decide over it (a person "
                                    "can: `digitflow models promote`, or remove the file)")
            self.load_model(version)  # a damaged candidate is refused, never promoted
            accuracy = self.metrics(version).test_accuracy
            champion = self.aliases().champion
            champion_acc = self.metrics(champion).test_accuracy if champion is not None else None
            promote, reason = gate(accuracy, champion_acc, tolerance=tolerance, floor=floor)
            by = "gate"
            if approval is not None and promote:
                promote, by = approval.approve, approval.by
                reason = (f"{reason}; approved by {by}: {approval.reason}" if promote else
                          f"{approval.reason if by == 'timeout' else f'rejected by {by}: ' + approval.reason} "
                          f"(the gate alone would have promoted it: {reason})")
            return self._record_decision(version, promoted=promote, reason=reason, by=by, accuracy=accuracy,
                                         champion_before=champion, approval=approval), True

    def promote(self, version: int, *, reason: str, by: str | None = None) -> Verdict:
        """A manual override of the gate: make ``version`` the champion, recording who/when/why."""
        if not reason.strip():
            raise RegistryError("a manual promotion needs a reason")
        version = self.resolve(version)
        self.load_model(version)  # never promote weights that changed since they were published
        with self.lock():
            return self._record_decision(version, promoted=True, reason=f"manual override: {reason}",
                                         by=by or getpass.getuser(), accuracy=self.metrics(version).test_accuracy,
                                         champion_before=self.aliases().champion)

    def status(self, version: int, aliases: Aliases | None = None) -> str:
        """champion, rejected, former champion, pending or damaged (pass ``aliases`` when asking
        for many versions: working them out reads every version)."""
        problem = self.problem(version)
        if problem is not None:
            return f"damaged: {problem}"
        if (self.aliases() if aliases is None else aliases).champion == version:
            return "champion"
        decision, problem = self._decision(version)
        if problem is not None:
            return f"damaged: {problem}"
        if decision is None:
            return "pending"
        return "former champion" if decision.promoted else "rejected"
