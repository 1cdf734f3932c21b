"""Real faults for the tests that need a wrong artifact (never a tolerance below rounding noise).

* :func:`swap_output_channels` swaps two output channels of the last weighted layer of an ONNX
  file (rows of a Gemm/Conv weight and their biases): the model computes something else, as a
  wrong channel order after compaction would.
* :func:`perturb_initializer` moves the weights of one output channel of an ONNX file.
* :func:`nudge_initializers` moves every float weight by one unit in the last place: a difference
  at rounding level, which a check must accept.
* :func:`faulty_onnx_target` registers an ``onnx`` target that writes the real export, then swaps
  two output channels in it; the pipeline's validation then meets a genuinely wrong artifact.
  ``python -m tests.faulty_cli ARGS`` runs the command line with it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

_WEIGHTED = ("Gemm", "Conv", "ConvTranspose", "MatMul")


def _load(path: Path) -> onnx.ModelProto:
    model = onnx.load(str(path))
    for t in model.graph.initializer:
        assert not onnx.external_data_helper.uses_external_data(t), f"{path}: external data is not handled here"
    return model


def _replace(model: onnx.ModelProto, name: str, array: np.ndarray) -> None:
    for i, t in enumerate(model.graph.initializer):
        if t.name == name:
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(array, name))
            return
    raise AssertionError(f"no initializer {name!r}")


def _out_axis(node: onnx.NodeProto, ndim: int) -> int:
    attrs = {a.name: a for a in node.attribute}
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        return 0 if "transB" in attrs and attrs["transB"].i == 1 else 1
    return ndim - 1  # MatMul: (in, out)


def _last_weighted(model: onnx.ModelProto, path: Path) -> tuple[onnx.NodeProto, np.ndarray]:
    inits = {t.name: t for t in model.graph.initializer}
    for node in reversed(model.graph.node):
        if node.op_type in _WEIGHTED and len(node.input) > 1 and node.input[1] in inits:
            return node, numpy_helper.to_array(inits[node.input[1]]).copy()
    raise AssertionError(f"{path}: no weighted node with a constant weight")


def swap_output_channels(path: str | Path, a: int = 0, b: int = 1) -> str:
    """Swap output channels ``a`` and ``b`` of the last weighted node; returns the weight's name."""
    path = Path(path)
    model = _load(path)
    inits = {t.name: t for t in model.graph.initializer}
    node, weight = _last_weighted(model, path)
    axis = _out_axis(node, weight.ndim)
    w = np.moveaxis(weight, axis, 0)
    assert not np.array_equal(w[a], w[b]), "the two channels are equal: swapping them changes nothing"
    w[[a, b]] = w[[b, a]]
    _replace(model, node.input[1], weight)
    if len(node.input) > 2 and node.input[2] in inits and node.op_type != "MatMul":
        bias = numpy_helper.to_array(inits[node.input[2]]).copy()
        if bias.ndim == 1 and bias.shape[0] == w.shape[0]:
            bias[[a, b]] = bias[[b, a]]
            _replace(model, node.input[2], bias)
    onnx.save_model(model, str(path))
    return node.input[1]


def _float_weights(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16)
    return [t for t in model.graph.initializer if t.data_type in floats and int(np.prod(t.dims)) > 1]


def perturb_initializer(path: str | Path, relative: float = 0.5) -> str:
    """Add ``relative`` x max|w| to every weight of output channel 0 of the last weighted layer (no
    activation after it can hide the change); returns the weight's name."""
    path = Path(path)
    model = _load(path)
    node, weight = _last_weighted(model, path)
    w = np.moveaxis(weight, _out_axis(node, weight.ndim), 0)
    w[0] += relative * float(np.abs(weight).max())
    _replace(model, node.input[1], weight)
    onnx.save_model(model, str(path))
    return node.input[1]


def nudge_initializers(path: str | Path) -> int:
    """Move every float weight one ulp away from zero (a rounding-level change); returns how many."""
    path = Path(path)
    model = _load(path)
    weights = _float_weights(model)
    for t in weights:
        w = numpy_helper.to_array(t)
        away = np.where(w >= 0, np.inf, -np.inf).astype(w.dtype)  # same dtype: one ulp of *that* type
        nudged = np.nextafter(w, away)
        assert nudged.dtype == w.dtype and not np.array_equal(nudged, w)
        _replace(model, t.name, nudged)
    onnx.save_model(model, str(path))
    return len(weights)


class _SwappingOnnx:
    """The built-in ONNX target whose artifact gets two output channels swapped after it is written."""

    def __init__(self) -> None:
        from deployprune.converters import onnx as real

        self._real = real
        self.OPTIONS = real.OPTIONS
        self.SUFFIX = real.SUFFIX
        self.swapped: list[Path] = []

    def convert(self, model: Any, example_inputs: tuple, path: Any, **options: Any) -> Any:
        result = self._real.convert(model, example_inputs, path, **options)
        swap_output_channels(result.path)
        self.swapped.append(Path(result.path))
        return result

    def __getattr__(self, name: str) -> Any:  # anything else a caller asks the target for
        return getattr(self._real, name)


@contextlib.contextmanager
def faulty_onnx_target() -> Iterator[_SwappingOnnx]:
    """Inside, ``converters.get("onnx")`` writes wrong artifacts (two output channels swapped)."""
    from deployprune import converters

    target = _SwappingOnnx()
    converters.register("onnx", target, replace=True)
    try:
        yield target
    finally:
        converters._unregister("onnx")
