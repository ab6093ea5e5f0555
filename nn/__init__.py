"""A feedforward neural network written from scratch in NumPy — to read and to run.

    import nn
    model = nn.Sequential(nn.Dense(784, 256), nn.ReLU(), nn.Dense(256, 10), seed=0)
    logits = model.forward(x, training=False)                  # x: (batch, 784) float32
    loss, dlogits = nn.softmax_cross_entropy(logits, labels)   # mean loss, dL/dlogits
    model.backward(dlogits)                                    # fills layer.grads
    opt = nn.SGD(model.parameters(), lr=0.05, momentum=0.9)
    opt.step()

Read in this order: layers.py (forward/backward of each layer), losses.py (softmax +
cross-entropy), model.py (the chain rule over a list of layers), optim.py, train.py (fit),
io.py (saving without pickle). No Prefect, no autograd: NumPy only.
"""

import os

# OpenBLAS's idle workers spin for 2^n cycles before sleeping (default n = 28, ~0.1 s): on two
# cores that spinning slows the element-wise work of a training step by up to a third. With n = 4
# they sleep at once and every product pays to wake them (~15 % of the products' time). 2^20
# cycles (~0.3 ms) keeps them awake across the gaps between one step's products, and no longer.
# Only effective before NumPy loads: import nn first (flows/ and the benchmarks do).
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "20")

from nn.augment import random_distort, random_shift
from nn.io import (ModelFormatError, describe, digest, load, load_arrays, load_checkpoint, save,
                   save_checkpoint)
from nn.layers import ACTIVATIONS, Dense, Dropout, Layer, ReLU, Sigmoid, Tanh
from nn.losses import SoftmaxCrossEntropy, softmax, softmax_cross_entropy
from nn.model import Param, Sequential
from nn.optim import (Adam, Constant, CosineLR, Optimizer, RMSprop, SGD, StepLR, clip_grad_norm,
                      make as make_optimizer, max_norm_)
from nn.train import CheckpointMismatch, History, NonFiniteLossError, TrainState, evaluate, fit, split_validation
from nn import presets

__all__ = [
    "ACTIVATIONS", "Adam", "CheckpointMismatch", "Constant", "CosineLR", "Dense", "Dropout", "History", "Layer", "ModelFormatError",
    "NonFiniteLossError", "Optimizer", "Param", "RMSprop", "ReLU", "SGD", "Sequential", "Sigmoid", "SoftmaxCrossEntropy",
    "StepLR", "Tanh", "TrainState", "clip_grad_norm", "describe", "digest", "evaluate", "fit", "load", "load_arrays",
    "load_checkpoint", "save_checkpoint", "make_optimizer",
    "max_norm_", "presets", "random_distort", "random_shift", "save", "softmax", "softmax_cross_entropy", "split_validation",
]
