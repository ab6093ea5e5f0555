"""Saving and loading a model without pickle.

    model.npz   arrays W0, b0, W1, b1, ... (dense layers in order), allow_pickle=False
    model.json  {"layers": [{"units": 256, "activation": "relu"}, ...,
                            {"units": 10, "activation": "softmax"}],
                 "preprocessing": {"mean": m, "std": s}, "input_units": 784, ...}

Input to the network is (pixels/255 - mean) / std. Inference needs only NumPy and these files.
"""

from __future__ import annotations

import json
import math
import os
import zipfile
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from nn.layers import ACTIVATIONS, Dense, Dropout, Layer
from nn.model import Sequential

if TYPE_CHECKING:
    from nn.train import TrainState

FORMAT = "digitflow-mlp"
FORMAT_VERSION = 1
ACTIVATION_NAMES = {cls: name for name, cls in ACTIVATIONS.items()}
KNOWN_ACTIVATIONS = ("relu", "tanh", "sigmoid", "softmax", "linear")


class ModelFormatError(ValueError):
    """A model file is missing, unsafe or inconsistent; the message names the file."""


def describe(model: Sequential) -> dict:
    """The model.json content for ``model``."""
    layers, dense = [], None
    for layer in [l for l in model.layers if not isinstance(l, Dropout)] + [None]:
        if isinstance(layer, Dense) or layer is None:
            if dense is not None:
                layers.append({"units": dense.n_out, "activation": "softmax" if layer is None else "linear"})
            dense = layer
        elif dense is not None and type(layer) in ACTIVATION_NAMES:
            layers.append({"units": dense.n_out, "activation": ACTIVATION_NAMES[type(layer)]})
            dense = None
        else:
            raise ValueError(f"cannot describe layer {layer!r} in model.json")
    first = model.dense_layers[0]
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "input_units": first.n_in,
            "layers": layers, "preprocessing": dict(model.preprocessing), "dtype": str(model.dtype)}


def digest(model: Sequential) -> str:
    """SHA-256 of what a saved model is: its model.json content and every array's bytes.

    Identical weights give identical digests, whatever the .npz container's timestamps.
    """
    import hashlib

    h = hashlib.sha256(json.dumps(describe(model), sort_keys=True).encode())
    for i, layer in enumerate(model.dense_layers):
        for key in ("W", "b"):
            a = np.ascontiguousarray(layer.params[key])
            h.update(f"{key}{i}:{a.dtype.str}:{a.shape}".encode())
            h.update(a.tobytes())
    return h.hexdigest()


def save(model: Sequential, directory: str | os.PathLike) -> dict:
    """Write model.npz and model.json into ``directory`` (each via temp file + os.replace)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for i, layer in enumerate(model.dense_layers):
        arrays[f"W{i}"], arrays[f"b{i}"] = layer.params["W"], layer.params["b"]
    spec = describe(model)
    _replace(directory / "model.npz", lambda f: np.savez(f, **arrays))
    _replace(directory / "model.json", lambda f: f.write((json.dumps(spec, indent=2) + "\n").encode()))
    return spec


def _replace(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# Bounds checked before anything is allocated: no model file can make us reserve more
# memory than its declared layers need, and no declared network may be absurd.
MAX_SPEC_BYTES = 1 << 20
# What zipfile and zlib raise on a damaged archive: a flipped flag bit alone can ask for an
# unknown compression method (NotImplementedError) or a password (RuntimeError).
ZIP_ERRORS = (ValueError, OSError, EOFError, NotImplementedError, RuntimeError, zipfile.BadZipFile, zlib.error)
MAX_LAYERS = 64
MAX_UNITS = 1 << 16
MAX_PARAMETERS = 200_000_000  # 800 MB of float32


def load_arrays(directory: str | os.PathLike) -> tuple[dict, list[tuple[np.ndarray, np.ndarray]]]:
    """Read and check model.json and model.npz: ``(spec, [(W0, b0), (W1, b1), ...])``.

    model.json is checked first (layer sizes, parameter count, finite preprocessing); each
    array's header in the .npz is then checked against it (dtype, shape, stored size) before
    the array is read; every value must be finite. Failures raise ModelFormatError.
    """
    directory = Path(directory)
    spec_path, npz_path = directory / "model.json", directory / "model.npz"
    spec = _read_spec(spec_path)
    layers = spec["layers"]
    shapes, n_in = [], spec["input_units"]
    for layer in layers:
        shapes += [(f"W{len(shapes) // 2}", (n_in, layer["units"])), (f"b{len(shapes) // 2}", (layer["units"],))]
        n_in = layer["units"]
    arrays = _read_npz(npz_path, dict(shapes))
    return spec, [(arrays[f"W{i}"], arrays[f"b{i}"]) for i in range(len(layers))]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _read_spec(spec_path: Path) -> dict:
    try:
        with open(spec_path, "rb") as f:
            raw = f.read(MAX_SPEC_BYTES + 1)
    except FileNotFoundError:
        raise ModelFormatError(f"{spec_path}: missing") from None
    except OSError as e:
        raise ModelFormatError(f"{spec_path}: cannot read ({e.strerror or e})") from None
    if len(raw) > MAX_SPEC_BYTES:
        raise ModelFormatError(f"{spec_path}: larger than {MAX_SPEC_BYTES} bytes; not a model description")
    try:
        spec = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFormatError(f"{spec_path}: not valid JSON ({e})") from None
    if not isinstance(spec, dict):
        raise ModelFormatError(f"{spec_path}: not a JSON object")
    layers = spec.get("layers")
    if not isinstance(layers, list) or not 1 <= len(layers) <= MAX_LAYERS:
        raise ModelFormatError(f"{spec_path}: 'layers' must be a list of 1 to {MAX_LAYERS} layers")
    for i, layer in enumerate(layers):
        if not isinstance(layer, dict) or not _is_int(layer.get("units")) or not 1 <= layer["units"] <= MAX_UNITS:
            raise ModelFormatError(f"{spec_path}: layer {i} needs an integer 'units' in 1..{MAX_UNITS}")
        if layer.get("activation") not in KNOWN_ACTIVATIONS:
            raise ModelFormatError(f"{spec_path}: layer {i} has unknown activation {layer.get('activation')!r}")
    n_in = spec.get("input_units")
    if not _is_int(n_in) or not 1 <= n_in <= MAX_UNITS:
        raise ModelFormatError(f"{spec_path}: 'input_units' must be an integer in 1..{MAX_UNITS}")
    sizes = [n_in] + [layer["units"] for layer in layers]
    parameters = sum(a * b + b for a, b in zip(sizes, sizes[1:]))
    if parameters > MAX_PARAMETERS:
        raise ModelFormatError(f"{spec_path}: {parameters:,} parameters exceed the bound of {MAX_PARAMETERS:,}")
    pre = spec.get("preprocessing", {"mean": 0.0, "std": 1.0})
    if not isinstance(pre, dict) or not all(isinstance(pre.get(k), (int, float)) and not isinstance(pre.get(k), bool)
                                            and math.isfinite(pre[k]) for k in ("mean", "std")) or pre["std"] <= 0:
        raise ModelFormatError(f"{spec_path}: 'preprocessing' needs a finite mean and a finite positive std, "
                               f"got {pre!r}")
    spec["preprocessing"] = pre
    return spec


def _read_npz(npz_path: Path, expected: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Read exactly the arrays ``expected`` (name → shape) from an uncompressed or compressed
    .npz, checking each member's header and stored size before reading its data."""
    import zipfile

    try:
        archive = zipfile.ZipFile(npz_path)
    except FileNotFoundError:
        raise ModelFormatError(f"{npz_path}: missing") from None
    except ZIP_ERRORS as e:
        raise ModelFormatError(f"{npz_path}: not a valid .npz file ({e})") from None
    arrays = {}
    with archive:
        members = {info.filename.removesuffix(".npy"): info for info in archive.infolist()}
        missing = [k for k in expected if k not in members]
        extra = sorted(set(members) - set(expected))
        if missing or extra:
            raise ModelFormatError(f"{npz_path}: arrays {missing or extra} {'missing' if missing else 'unexpected'} "
                                   f"for the {len(expected) // 2} layers in model.json")
        for name, shape in expected.items():
            info = members[name]
            try:
                with archive.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                              else np.lib.format.read_array_header_2_0)(f)
                    got_shape, fortran, dtype = header
                    if dtype.hasobject:
                        raise ModelFormatError(f"{npz_path}: array {name} needs pickle to load; refused")
                    if dtype.kind != "f" or dtype.itemsize > 8:
                        raise ModelFormatError(f"{npz_path}: {name} must be float32 or float64, got {dtype}")
                    if tuple(got_shape) != shape:
                        raise ModelFormatError(f"{npz_path}: {name} has shape {tuple(got_shape)}, model.json needs "
                                               f"{shape}")
                    nbytes = math.prod(shape) * dtype.itemsize
                    if info.file_size != f.tell() + nbytes:
                        raise ModelFormatError(f"{npz_path}: {name} stores {info.file_size - f.tell()} bytes, "
                                               f"its shape needs {nbytes}")
                    data = f.read(nbytes)
            except ModelFormatError:
                raise
            except ZIP_ERRORS as e:  # bad header, CRC, truncation, unknown compression or encryption flags
                raise ModelFormatError(f"{npz_path}: array {name} is damaged ({e})") from None
            if len(data) != nbytes:
                raise ModelFormatError(f"{npz_path}: array {name} is truncated")
            a = np.frombuffer(data, dtype).reshape(shape, order="F" if fortran else "C")
            if not np.isfinite(a).all():
                raise ModelFormatError(f"{npz_path}: {name} holds NaN or infinite values; refused")
            arrays[name] = a
    return arrays


def load(directory: str | os.PathLike, dtype=np.float32, *, expect_digest: str | None = None) -> Sequential:
    """Rebuild a Sequential from a saved model directory.

    With ``expect_digest`` (recorded when the model was trained or published), the loaded
    model must have exactly that ``digest``: a file changed since is refused.
    """
    spec, weights = load_arrays(directory)
    layers: list[Layer] = []
    for (W, b), layer in zip(weights, spec["layers"]):
        dense = Dense(*W.shape)
        dense.params = {"W": W.astype(dtype), "b": b.astype(dtype)}
        layers.append(dense)
        if layer["activation"] in ACTIVATIONS:
            layers.append(ACTIVATIONS[layer["activation"]]())
    model = Sequential(*layers, dtype=dtype)
    model.preprocessing = {"mean": float(spec["preprocessing"]["mean"]), "std": float(spec["preprocessing"]["std"])}
    if expect_digest is not None:
        got = digest(model)
        if got != expect_digest:
            raise ModelFormatError(f"{Path(directory) / 'model.npz'}: weights SHA-256 {got[:16]}… is not the "
                                   f"{expect_digest[:16]}… recorded for it (changed or damaged since); refused")
    return model


def save_checkpoint(path: str | os.PathLike, state: "TrainState") -> None:
    """One training checkpoint (a ``TrainState``) as a single .npz, replaced atomically: its
    arrays by name as they are, everything else as JSON in a uint8 array ``meta``."""
    path = Path(path)
    arrays = state.arrays()
    arrays["meta"] = np.frombuffer(json.dumps(state.meta(), allow_nan=True).encode(), np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    _replace(path, lambda f: np.savez(f, **arrays))


MAX_CHECKPOINT_ARRAYS = 4 * MAX_LAYERS * 8  # params, best params and a few optimizer buffers per layer


def load_checkpoint(path: str | os.PathLike) -> "TrainState":
    """The state ``save_checkpoint`` wrote (without pickle); ModelFormatError if unreadable.
    Only its form is checked here (sizes, JSON, array names); whether it fits a run is
    ``TrainState.check``'s."""
    from nn.train import TrainState

    import zipfile

    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:  # bound the work before reading: member count and sizes
            infos = archive.infolist()
            if len(infos) > MAX_CHECKPOINT_ARRAYS or sum(i.file_size for i in infos) > 4 * 4 * MAX_PARAMETERS:
                raise ModelFormatError(f"{path}: larger than any checkpoint of a model within bounds; refused")
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        meta_bytes = arrays.pop("meta")
        if meta_bytes.dtype != np.uint8 or meta_bytes.ndim != 1 or meta_bytes.size > MAX_SPEC_BYTES * 64:
            raise ValueError("meta is not a bounded byte string")
        meta = json.loads(meta_bytes.tobytes())
        if not isinstance(meta, dict):
            raise ValueError("meta is not an object")
        return TrainState.from_saved(meta, arrays)
    except ModelFormatError:
        raise
    except (KeyError, RecursionError, *ZIP_ERRORS) as e:
        raise ModelFormatError(f"{path}: unreadable checkpoint ({type(e).__name__})") from None
