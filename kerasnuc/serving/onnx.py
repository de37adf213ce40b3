"""Keras functional model -> ONNX graph, for prediction without TensorFlow (onnxruntime).

``kerasnuc predict`` spends most of a small job importing TensorFlow, building the Keras model
and tracing its first call; onnxruntime loads a saved graph in a fraction of a second. This
module writes our functional models as ONNX graphs, layer by layer, from the model's own config
(the graph of its layers, nested functional models such as encoders inlined) and weights:

* the graph takes ``image`` ``(B, H, W, 3)`` float32 in ``[0, 1]`` (any ``H, W`` the model takes)
  and returns the model's named outputs, channels last, like the Keras model; inside it runs
  channels first (one transpose at each end), as ONNX convolutions do;
* ``padding="same"`` is ``auto_pad="SAME_UPPER"`` (TensorFlow pads the extra row/column at the
  bottom/right, as SAME_UPPER does); batch normalisation is an ONNX ``BatchNormalization`` in
  inference mode (onnxruntime fuses it into the convolution before it);
* ``UpSampling2D(nearest)`` is ``Resize`` (nearest, asymmetric, floor) and
  :class:`~kerasnuc.layers.resize.ResizeLike` is ``Resize`` (linear, half-pixel centres), to the
  run-time size of its reference, so the graph keeps dynamic height and width;
* with ``float16_weights`` the weights are stored as float16 and cast to float32 in the graph
  (onnxruntime folds the casts when it loads the graph): half the file, float32 arithmetic.

Only the layers our models use are supported; any other layer raises :class:`KerasnucError`
naming it, so a new layer cannot be exported wrong silently.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from kerasnuc.fileutil import KerasnucError, atomic_path

#: ONNX opset of the exported graphs (onnxruntime >= 1.14 runs it).
OPSET = 17
INPUT_NAME = "image"
ONNX_FILE = "model.onnx"
"""File name of the graph in a run or bundled-model folder."""
WEIGHTS_DIGEST_KEY = "kerasnuc_weights_sha256"
"""Metadata key of ``model.onnx``: SHA-256 of the ``model.weights.h5`` it was exported from."""


def weights_digest(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _numpy(variable) -> np.ndarray:
    import keras  # Keras only when exporting: the constants above are read without it

    return np.asarray(keras.ops.convert_to_numpy(variable), np.float32)


def _onnx():
    try:
        import onnx
    except ImportError as err:  # pragma: no cover - the error text is the test
        raise KerasnucError(
            "ONNX export needs the onnx package: pip install 'kerasnuc[onnx]'"
        ) from err
    return onnx


class _Graph:
    """Nodes and initializers of the graph being written."""

    def __init__(self, float16_weights: bool) -> None:
        self.onnx = _onnx()
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self.float16_weights = float16_weights
        self._count = 0

    def name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}__{self._count}"

    def node(self, op: str, inputs: list[str], hint: str, **attrs: Any) -> str:
        out = self.name(hint)
        self.nodes.append(self.onnx.helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def const(self, value: np.ndarray, hint: str, dtype: Any = np.float32) -> str:
        value = np.asarray(value, dtype=dtype)
        name = self.name(hint)
        helper = self.onnx.numpy_helper
        if self.float16_weights and value.dtype == np.float32 and value.size > 1:
            stored = name + "_f16"
            self.initializers.append(helper.from_array(value.astype(np.float16), stored))
            to = self.onnx.TensorProto.FLOAT
            self.nodes.append(self.onnx.helper.make_node("Cast", [stored], [name], to=to))
        else:
            self.initializers.append(helper.from_array(value, name))
        return name


def _refs(args: Any) -> list[tuple[str, int, int]]:
    """The ``(layer, node, tensor)`` history of every Keras tensor in a node's arguments."""
    if isinstance(args, dict):
        if args.get("class_name") == "__keras_tensor__":
            return [tuple(args["config"]["keras_history"])]
        return [r for v in args.values() for r in _refs(v)]
    if isinstance(args, list | tuple):
        return [r for v in args for r in _refs(v)]
    return []


def _activation(g: _Graph, x: str, name: str, activation: Any, where: str) -> str:
    if activation in (None, "linear"):
        return x
    if activation == "relu":
        return g.node("Relu", [x], name)
    if activation == "sigmoid":
        return g.node("Sigmoid", [x], name)
    if activation == "softmax":
        return g.node("Softmax", [x], name, axis=1)
    if activation in ("swish", "silu"):
        return g.node("Mul", [x, g.node("Sigmoid", [x], name)], name)
    raise KerasnucError(f"ONNX export: activation {activation!r} of layer {where} is not supported")


def _check_axis(axis: Any, where: str) -> None:
    if axis not in (-1, 3, [-1], [3]):
        raise KerasnucError(f"ONNX export: layer {where} works on axis {axis}, not channels")


def _conv(g: _Graph, layer: Any, cfg: dict, x: str, depthwise: bool) -> str:
    if cfg.get("data_format", "channels_last") != "channels_last":
        raise KerasnucError(f"ONNX export: layer {layer.name} is not channels_last")
    if cfg["padding"] not in ("same", "valid"):
        raise KerasnucError(f"ONNX export: padding {cfg['padding']!r} of {layer.name}")
    kernel = _numpy(layer.kernel)
    kh, kw = kernel.shape[:2]
    if depthwise:  # (kh, kw, C, m) -> (C * m, 1, kh, kw), one group per input channel
        groups, mult = kernel.shape[2], kernel.shape[3]
        weight = kernel.transpose(2, 3, 0, 1).reshape(groups * mult, 1, kh, kw)
    else:  # (kh, kw, Cin, Cout) -> (Cout, Cin, kh, kw)
        groups = int(cfg.get("groups", 1))
        weight = kernel.transpose(3, 2, 0, 1)
    inputs = [x, g.const(weight, layer.name + "_kernel")]
    if cfg.get("use_bias", True) and getattr(layer, "bias", None) is not None:
        bias = _numpy(layer.bias)
        inputs.append(g.const(bias, layer.name + "_bias"))
    y = g.node(
        "Conv",
        inputs,
        layer.name,
        kernel_shape=[int(kh), int(kw)],
        strides=[int(s) for s in cfg["strides"]],
        dilations=[int(d) for d in cfg["dilation_rate"]],
        group=int(groups),
        auto_pad="SAME_UPPER" if cfg["padding"] == "same" else "VALID",
    )
    return _activation(g, y, layer.name + "_act", cfg.get("activation"), layer.name)


def _batch_norm(g: _Graph, layer: Any, cfg: dict, x: str) -> str:
    _check_axis(cfg.get("axis", -1), layer.name)

    def value(var: Any, default: float) -> np.ndarray:
        if var is None:
            return np.full((int(layer.moving_mean.shape[0]),), default, np.float32)
        return _numpy(var)

    inputs = [
        x,
        g.const(value(layer.gamma if cfg.get("scale", True) else None, 1.0), layer.name + "_g"),
        g.const(value(layer.beta if cfg.get("center", True) else None, 0.0), layer.name + "_b"),
        g.const(value(layer.moving_mean, 0.0), layer.name + "_mean"),
        g.const(value(layer.moving_variance, 1.0), layer.name + "_var"),
    ]
    return g.node("BatchNormalization", inputs, layer.name, epsilon=float(cfg["epsilon"]))


def _layer(g: _Graph, layer: Any, cfg: dict, inputs: list[str]) -> str:
    kind = type(layer).__name__
    x = inputs[0]
    if kind == "Conv2D":
        return _conv(g, layer, cfg, x, depthwise=False)
    if kind == "DepthwiseConv2D":
        return _conv(g, layer, cfg, x, depthwise=True)
    if kind == "BatchNormalization":
        return _batch_norm(g, layer, cfg, x)
    if kind == "ReLU":
        if cfg.get("negative_slope", 0.0) or cfg.get("threshold", 0.0):
            raise KerasnucError(f"ONNX export: leaky/thresholded ReLU {layer.name}")
        if cfg.get("max_value") is None:
            return g.node("Relu", [x], layer.name)
        lo = g.const(np.float32(0.0), layer.name + "_min")
        hi = g.const(np.float32(cfg["max_value"]), layer.name + "_max")
        return g.node("Clip", [x, lo, hi], layer.name)
    if kind == "Activation":
        return g.node(
            "Identity", [_activation(g, x, layer.name, cfg["activation"], layer.name)], layer.name
        )
    if kind in ("Dropout", "SpatialDropout2D"):
        return x
    if kind == "MCDropout":
        if cfg.get("mc"):
            raise KerasnucError(f"ONNX export: {layer.name} is in Monte Carlo mode")
        return x
    if kind == "Rescaling":
        scaled = g.node(
            "Mul", [x, g.const(np.float32(cfg["scale"]), layer.name + "_s")], layer.name
        )
        return g.node(
            "Add", [scaled, g.const(np.float32(cfg["offset"]), layer.name + "_o")], layer.name
        )
    if kind == "Normalization":  # (x - mean) / max(sqrt(variance), 1e-7), as Keras
        _check_axis(list(cfg.get("axis") or [-1])[-1], layer.name)
        mean = _numpy(layer.mean).reshape(1, -1, 1, 1)
        scale = 1.0 / np.maximum(np.sqrt(_numpy(layer.variance)), 1e-7).reshape(1, -1, 1, 1)
        centred = g.node("Sub", [x, g.const(mean, layer.name + "_mean")], layer.name)
        return g.node("Mul", [centred, g.const(scale, layer.name + "_scale")], layer.name)
    if kind == "ZeroPadding2D":
        (top, bottom), (left, right) = cfg["padding"]
        pads = np.array([0, 0, top, left, 0, 0, bottom, right], np.int64)
        return g.node("Pad", [x, g.const(pads, layer.name + "_pads", np.int64)], layer.name)
    if kind == "GlobalAveragePooling2D":
        pooled = g.node("GlobalAveragePool", [x], layer.name)
        return pooled if cfg.get("keepdims") else g.node("Flatten", [pooled], layer.name, axis=1)
    if kind == "Reshape":  # only (B, C) -> (B, 1, 1, C), as in squeeze-and-excitation blocks
        target = list(cfg["target_shape"])
        if len(target) != 3 or target[:2] != [1, 1]:
            raise KerasnucError(f"ONNX export: reshape {layer.name} to {target} is not supported")
        shape = np.array([0, target[2], 1, 1], np.int64)
        return g.node("Reshape", [x, g.const(shape, layer.name + "_shape", np.int64)], layer.name)
    if kind in ("Add", "Multiply"):
        op = "Add" if kind == "Add" else "Mul"
        out = inputs[0]
        for other in inputs[1:]:
            out = g.node(op, [out, other], layer.name)
        return out
    if kind == "Concatenate":
        _check_axis(cfg.get("axis", -1), layer.name)
        return g.node("Concat", inputs, layer.name, axis=1)
    if kind == "UpSampling2D":
        if cfg.get("interpolation", "nearest") != "nearest":
            raise KerasnucError(f"ONNX export: {layer.name} is not nearest upsampling")
        scales = g.const(np.array([1, 1, *cfg["size"]], np.float32), layer.name + "_scales")
        return g.node(
            "Resize",
            [x, "", scales],
            layer.name,
            mode="nearest",
            coordinate_transformation_mode="asymmetric",
            nearest_mode="floor",
        )
    if kind == "ResizeLike":
        batch_channels = g.node(
            "Slice",
            [
                g.node("Shape", [x], layer.name + "_xshape"),
                g.const(np.array([0], np.int64), layer.name + "_s0", np.int64),
                g.const(np.array([2], np.int64), layer.name + "_s2", np.int64),
            ],
            layer.name,
        )
        spatial = g.node(
            "Slice",
            [
                g.node("Shape", [inputs[1]], layer.name + "_rshape"),
                g.const(np.array([2], np.int64), layer.name + "_t2", np.int64),
                g.const(np.array([4], np.int64), layer.name + "_t4", np.int64),
            ],
            layer.name,
        )
        sizes = g.node("Concat", [batch_channels, spatial], layer.name + "_sizes", axis=0)
        return g.node(
            "Resize",
            [x, "", "", sizes],
            layer.name,
            mode="linear",
            coordinate_transformation_mode="half_pixel",
        )
    raise KerasnucError(f"ONNX export: layer {layer.name} ({kind}) is not supported")


def _functional(g: _Graph, model: Any, bound: dict[str, str]) -> list[str]:
    """Write the layers of a functional ``model``; ``bound``: input layer name -> tensor.

    Returns the tensors of ``model``'s outputs in the order of its ``output_layers``.
    """
    config = model.get_config()
    tensors: dict[tuple[str, int, int], str] = {}
    for entry in config["layers"]:
        name = entry["config"]["name"] if "name" not in entry else entry["name"]
        layer = model.get_layer(name)
        if entry["class_name"] == "InputLayer":
            if name not in bound:
                raise KerasnucError(f"ONNX export: input {name} of {model.name} is not bound")
            tensors[(name, 0, 0)] = bound[name]
            continue
        for node_index, node in enumerate(entry["inbound_nodes"]):
            inputs = [tensors[tuple(r)] for r in _refs(node["args"])]
            if hasattr(layer, "get_layer"):  # a nested functional model: inline it
                inner = layer.get_config()["input_layers"]
                inner = [inner] if inner and isinstance(inner[0], str) else inner
                outs = _functional(g, layer, {r[0]: t for r, t in zip(inner, inputs, strict=True)})
            else:
                outs = [_layer(g, layer, entry["config"], inputs)]
            for t, out in enumerate(outs):
                tensors[(name, node_index, t)] = out
    outputs = config["output_layers"]
    if isinstance(outputs, dict):
        outputs = list(outputs.values())
    elif outputs and isinstance(outputs[0], str):
        outputs = [outputs]
    return [tensors[tuple(r)] for r in outputs]


def keras_to_onnx(
    model: Any, float16_weights: bool = False, metadata: dict[str, str] | None = None
) -> Any:
    """The ONNX ``ModelProto`` of a functional Keras model with one image input.

    Args:
        model: functional model taking ``(B, H, W, 3)`` and returning a dict of named outputs
            (or one output, named ``"output"``).
        float16_weights: store the weights as float16 (cast to float32 in the graph).
        metadata: ``{key: value}`` strings stored in the graph's metadata.

    Returns:
        ``onnx.ModelProto`` (checked with ``onnx.checker``).

    Raises:
        KerasnucError: a layer, activation or setting the exporter does not support.
    """
    g = _Graph(float16_weights)
    onnx = g.onnx
    config = model.get_config()
    inputs = config["input_layers"]
    inputs = [inputs] if inputs and isinstance(inputs[0], str) else inputs
    if len(inputs) != 1:
        raise KerasnucError(f"ONNX export: model {model.name} must have one input")
    nchw = g.node("Transpose", [INPUT_NAME], "to_nchw", perm=[0, 3, 1, 2])
    outs = _functional(g, model, {inputs[0][0]: nchw})
    names = (
        list(config["output_layers"]) if isinstance(config["output_layers"], dict) else ["output"]
    )
    value_info = []
    for name, out in zip(names, outs, strict=True):
        g.nodes.append(onnx.helper.make_node("Transpose", [out], [name], perm=[0, 2, 3, 1]))
        channels = model.output[name].shape[-1] if isinstance(model.output, dict) else None
        value_info.append(
            onnx.helper.make_tensor_value_info(
                name, onnx.TensorProto.FLOAT, ["batch", "height", "width", channels]
            )
        )
    graph = onnx.helper.make_graph(
        g.nodes,
        model.name,
        [
            onnx.helper.make_tensor_value_info(
                INPUT_NAME,
                onnx.TensorProto.FLOAT,
                ["batch", "height", "width", model.inputs[0].shape[-1]],
            )
        ],
        value_info,
        initializer=g.initializers,
    )
    proto = onnx.helper.make_model(
        graph,
        opset_imports=[onnx.helper.make_opsetid("", OPSET)],
        producer_name="kerasnuc",
    )
    proto.ir_version = 8  # readable by onnxruntime >= 1.14
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = str(key), str(value)
    onnx.checker.check_model(proto)
    return proto


def export_onnx(
    model: Any,
    path: str | os.PathLike,
    float16_weights: bool = True,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write :func:`keras_to_onnx` of ``model`` to ``path`` (atomically).

    Returns:
        ``path``.
    """
    proto = keras_to_onnx(model, float16_weights=float16_weights, metadata=metadata)
    path = Path(path)
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(proto.SerializeToString())
    return path


def export_run_onnx(run_dir: str | os.PathLike, float16_weights: bool = True) -> Path:
    """Write ``RUN_DIR/model.onnx`` from the run's model and best weights.

    The graph records the SHA-256 of ``model.weights.h5``, so that the prediction path refuses
    it once the weights change (:mod:`kerasnuc.inference.onnx_predictor`).

    Returns:
        The path of the graph.
    """
    from kerasnuc.runs import BEST_WEIGHTS, load_run

    run_dir = Path(run_dir)
    run = load_run(run_dir)
    digest = weights_digest(run_dir / BEST_WEIGHTS)
    return export_onnx(
        run.model, run_dir / ONNX_FILE, float16_weights, {WEIGHTS_DIGEST_KEY: digest}
    )


__all__ = [
    "INPUT_NAME",
    "ONNX_FILE",
    "OPSET",
    "WEIGHTS_DIGEST_KEY",
    "export_onnx",
    "export_run_onnx",
    "keras_to_onnx",
    "weights_digest",
]
