"""Export a saved model (model.npz + model.json) as ONNX, and verify it in onnxruntime.

The graph takes ``pixels`` (N, 784) float32 = pixel/255 and returns ``probabilities``
(N, 10): Sub/Div (preprocessing), then Gemm + Relu/Tanh/Sigmoid per layer, then Softmax.
Needs the optional extra ``digitflow[onnx]`` (onnx, onnxruntime).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from storage import DigitflowError
from storage.atomic import atomic_path, output_path

OPS = {"relu": "Relu", "tanh": "Tanh", "sigmoid": "Sigmoid", "softmax": "Softmax", "linear": None}


def export_onnx(model_dir: str | os.PathLike, out: str | os.PathLike, *, check_inputs: int = 256) -> dict:
    out = output_path(out)  # a folder, a device, a FIFO: one line before any work
    try:
        import onnx
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        raise DigitflowError("ONNX export needs the optional extra: pip install 'digitflow[onnx]'") from None
    import nn

    spec, weights = nn.load_arrays(model_dir)
    pre = spec["preprocessing"]
    n_in = weights[0][0].shape[0]
    inits = [numpy_helper.from_array(np.array([pre["mean"]], np.float32), "mean"),
             numpy_helper.from_array(np.array([pre["std"]], np.float32), "std")]
    nodes = [helper.make_node("Sub", ["pixels", "mean"], ["centered"]),
             helper.make_node("Div", ["centered", "std"], ["a0"])]
    current = "a0"
    for i, ((W, b), layer) in enumerate(zip(weights, spec["layers"])):
        inits += [numpy_helper.from_array(W.astype(np.float32), f"W{i}"),
                  numpy_helper.from_array(b.astype(np.float32), f"b{i}")]
        nodes.append(helper.make_node("Gemm", [current, f"W{i}", f"b{i}"], [f"z{i}"]))
        current = f"z{i}"
        op = OPS[layer["activation"]]
        if op is not None:
            attrs = {"axis": 1} if op == "Softmax" else {}
            nodes.append(helper.make_node(op, [current], [f"a{i + 1}"], **attrs))
            current = f"a{i + 1}"
    nodes.append(helper.make_node("Identity", [current], ["probabilities"]))
    graph = helper.make_graph(
        nodes, "digitflow_mlp",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["N", n_in])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", spec["layers"][-1]["units"]])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="digitflow")
    model.ir_version = min(model.ir_version, 9)
    onnx.checker.check_model(model)

    # Verify: onnxruntime on random and edge inputs against the NumPy network.
    rng = np.random.default_rng(0)
    x = rng.random((check_inputs, n_in), dtype=np.float32)
    x[0], x[1] = 0.0, 1.0
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(["probabilities"], {"pixels": x})[0]
    want = nn.load(model_dir).predict_proba(x)
    if spec["layers"][-1]["activation"] != "softmax":
        raise DigitflowError(f"{model_dir}: only models whose last layer is softmax can be exported")
    diff = float(np.max(np.abs(got - want)))
    if diff > 1e-4 or not np.array_equal(got.argmax(1), want.argmax(1)):
        raise DigitflowError(f"ONNX export of {model_dir} disagrees with NumPy (max difference {diff:.2e})")
    with atomic_path(out) as tmp:
        Path(tmp).write_bytes(model.SerializeToString())
    return {"path": str(out), "max_abs_diff": diff, "checked": check_inputs}
