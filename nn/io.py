"""Saving and loading a model without pickle.

    model.npz   arrays W0, b0, W1, b1, ... (dense layers in order), allow_pickle=False
    model.json  {"layers": [{"units": 256, "activation": "relu"}, ...,
                            {"units": 10, "activation": "softmax"}],
                 "preprocessing": {"mean": m, "std": s}, "input_units": 784, ...}

Input to the network is (pixels/255 - mean) / std. Inference needs only NumPy and these files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from nn.layers import ACTIVATIONS, Dense, Dropout, Layer
from nn.model import Sequential

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


def load_arrays(directory: str | os.PathLike) -> tuple[dict, list[tuple[np.ndarray, np.ndarray]]]:
    """Read and check model.json and model.npz: ``(spec, [(W0, b0), (W1, b1), ...])``."""
    directory = Path(directory)
    spec_path, npz_path = directory / "model.json", directory / "model.npz"
    try:
        spec = json.loads(spec_path.read_text())
    except FileNotFoundError:
        raise ModelFormatError(f"{spec_path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFormatError(f"{spec_path}: not valid JSON ({e})") from None
    layers = spec.get("layers")
    if not isinstance(layers, list) or not layers:
        raise ModelFormatError(f"{spec_path}: 'layers' must be a non-empty list")
    for i, layer in enumerate(layers):
        if not isinstance(layer, dict) or not isinstance(layer.get("units"), int) or layer["units"] < 1:
            raise ModelFormatError(f"{spec_path}: layer {i} needs a positive integer 'units'")
        if layer.get("activation") not in KNOWN_ACTIVATIONS:
            raise ModelFormatError(f"{spec_path}: layer {i} has unknown activation {layer.get('activation')!r}")
    pre = spec.get("preprocessing", {"mean": 0.0, "std": 1.0})
    if not all(isinstance(pre.get(k), (int, float)) for k in ("mean", "std")) or pre["std"] == 0:
        raise ModelFormatError(f"{spec_path}: 'preprocessing' needs numeric mean and non-zero std")
    try:
        npz = np.load(npz_path, allow_pickle=False)
    except FileNotFoundError:
        raise ModelFormatError(f"{npz_path}: missing") from None
    except (ValueError, OSError) as e:
        raise ModelFormatError(f"{npz_path}: not a valid .npz file ({e})") from None
    with npz:
        expected = [f"{p}{i}" for i in range(len(layers)) for p in "Wb"]
        missing = [k for k in expected if k not in npz.files]
        extra = sorted(set(npz.files) - set(expected))
        if missing or extra:
            raise ModelFormatError(f"{npz_path}: arrays {missing or extra} {'missing' if missing else 'unexpected'} "
                                   f"for the {len(layers)} layers in model.json")
        weights = []
        n_in = spec.get("input_units") or None
        for i, layer in enumerate(layers):
            try:
                W, b = npz[f"W{i}"], npz[f"b{i}"]
            except ValueError:  # an object array: loading it would need pickle
                raise ModelFormatError(f"{npz_path}: array W{i} or b{i} needs pickle to load; refused") from None
            n_in = n_in or W.shape[0]
            if W.dtype.kind != "f" or b.dtype.kind != "f":
                raise ModelFormatError(f"{npz_path}: W{i}/b{i} must be floating point, got {W.dtype}/{b.dtype}")
            if W.shape != (n_in, layer["units"]) or b.shape != (layer["units"],):
                raise ModelFormatError(f"{npz_path}: W{i} {W.shape} / b{i} {b.shape} do not match "
                                       f"({n_in}, {layer['units']}) / ({layer['units']},) from model.json")
            weights.append((W, b))
            n_in = layer["units"]
    spec["preprocessing"] = pre
    return spec, weights


def load(directory: str | os.PathLike, dtype=np.float32) -> Sequential:
    """Rebuild a Sequential from a saved model directory."""
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
    return model
