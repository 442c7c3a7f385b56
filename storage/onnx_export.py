"""ONNX export of a decoded artifact: run a compressed model outside PyTorch.

``to_onnx(model, spec, path)`` writes an ONNX model (opset 19) of a model that
:func:`storage.codec.decode` returned. Its input ``images`` is **uint8** ``(N, C, H, W)``, the
pixels as stored (``N`` free); the graph normalises them itself (``Cast``, ``Mul``, ``Add`` with
the spec's fp32 ``1 / (255 std)`` and ``-mean / std``, the training loader's formula). Its output
``logits`` is float32 ``(N, classes)``. The spec is also in the file's metadata
(``pareto_compress.input_spec``, the artifact header's JSON).

Route: a copy of the model whose compressed layers (``CConv2d`` / ``CLinear``) are replaced by
plain ``Conv2d`` / ``Linear`` layers holding their *effective* weight (representation, then
mask) in fp32, and whose activation quantizers become export-friendly fake-quantizers, is
exported with ``torch.onnx.export(dynamo=False)`` (the dynamo exporter needs ``onnxscript``,
which is no dependency) without BatchNorm folding (folding would rewrite the weights below).
Then, where ONNX can hold a layer's representation, its dense fp32 weight initializer is swapped
for the stored form plus a dequantizing node; each swap is checked to dequantize to the dense
weight first, and a layer that fails the check (or whose weight the exporter renamed) stays
dense. What each layer became is returned (``{layer path: storage}``):

=============================  ==================================================================
representation                 in the ONNX file
=============================  ==================================================================
none (fp32)                    dense fp32
int-k (k <= 8), symmetric      int8 codes + ``DequantizeLinear`` (fp32 scale per channel or per
                               tensor): 1 byte a weight, not packed to k bits
int-k, asymmetric              uint8 codes and zero points + ``DequantizeLinear``
binary                         int8 signs (+1/-1) + ``DequantizeLinear`` (alpha as scale)
codebook (kmeans, gmm, dbscan, uint8 indices (uint16 above 256 entries) + ``Cast`` + ``Gather``
sws)                           from the fp32 centroids; a 0.0 entry serves pruned positions
fp16                           fp16 + ``Cast``
fp8 (e4m3, e5m2)               float8 + ``DequantizeLinear`` (fp32 scale per channel)
masks (prune)                  no sparse storage: pruned positions are stored zeros (or the
                               zero code / the 0.0 entry) of the layer's storage above
low-rank                       its two factor layers, each stored as above
structured pruning             the smaller layers, as above
activations int8 / int4        fp32 fake-quant ops (``Clip``, ``Div``, ``Round``, ``Mul``): the
                               values of the quantized grid, computed in fp32, not int arithmetic
activations fp8                fp32 ops rounding exactly as an e4m3 cast (``Gather`` of the step)
BatchNorm, biases, others      dense fp32 (``BatchNormalization`` kept as its own node)
=============================  ==================================================================

The ONNX logits match the decoded model's within fp32 rounding (different summation order);
with quantized activations a value that lands within an ulp of a rounding boundary may round to
the neighbouring level, so those models agree in their predictions and only to about one
quantization step in the logits.
"""

from __future__ import annotations

import copy
import io
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor, nn

from models.errors import UserError
from models.spec import DataSpec
from spaces.actquant import FORMATS as ACT_FORMATS
from spaces.actquant import ActQuantizer
from spaces.binary import BinaryRepr
from spaces.codebook import CodebookRepr
from spaces.floats import FloatRepr
from spaces.intk import IntRepr
from spaces.layers import CConv2d, CLinear, build_layer, conv_args, linear_args, replace_module
from storage.codec import InputSpec

OPSET = 19  # float8 DequantizeLinear needs 19; the TorchScript exporter goes up to 20
INPUT_NAME, OUTPUT_NAME = "images", "logits"
METADATA_KEY = "pareto_compress.input_spec"
DENSE = "fp32 dense"
_E4M3_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448


def require_onnx(what: str = "--onnx") -> None:
    """Refuse, in one line, an export when the ``onnx`` package is missing (before any work)."""
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise UserError(
            f"{what} needs the onnx package; install it with pip install 'pareto-compress[onnx]'"
        ) from None


# ------------------------------------------------------------------------ the exported model


class _Normalised(nn.Module):
    """uint8 images -> the model's normalised input -> logits."""

    scale: Tensor  # buffers registered in __init__
    shift: Tensor

    def __init__(self, model: nn.Module, spec: InputSpec) -> None:
        super().__init__()
        self.model = model
        scale, shift = spec.scale_shift()
        self.register_buffer("scale", scale)
        self.register_buffer("shift", shift)

    def forward(self, images: Tensor) -> Tensor:
        """Logits of uint8 ``images``."""
        return self.model(images.to(torch.float32) * self.scale + self.shift)


def _round_e4m3(v: Tensor) -> Tensor:
    """``v.to(float8_e4m3fn).float()`` for ``|v| <= 448`` in ops ONNX has (the TorchScript
    exporter cannot cast to float8): round to nearest even on the grid of ``v``'s binade, whose
    step is ``2 ** (e - 3)`` (``e = floor(log2 |v|)``, at least -6 below the normal range).
    The step is counted from comparisons and looked up, so every operation is exact."""
    bounds = torch.tensor([2.0**k for k in range(-5, 9)], dtype=v.dtype)
    steps = torch.tensor([2.0 ** (k - 9) for k in range(15)], dtype=v.dtype)
    count = (v.abs().unsqueeze(-1) >= bounds).to(torch.int64).sum(-1)
    step = steps[count]
    return torch.round(v / step) * step


class _ActQuant(nn.Module):
    """The forward value of :class:`spaces.actquant.ActQuantizer` (``q``, without the
    straight-through arithmetic), from constants fixed at export."""

    lo: Tensor  # buffers registered in __init__ (annotated so the type checker sees Tensors)
    hi: Tensor
    step: Tensor

    def __init__(self, q: ActQuantizer) -> None:
        super().__init__()
        clip = q.clip.detach().float().cpu().clamp_min(1e-12)
        self.fp8 = q.format == "fp8"
        # The same fp32 operations as ActQuantizer.forward, so the grid is the same.
        if self.fp8:
            scale = clip / _E4M3_MAX
        else:
            bits = ACT_FORMATS[q.format]
            scale = clip / (2 ** (bits - 1) - 1 if q.signed else 2**bits - 1)
        self.register_buffer("lo", -clip if q.signed else torch.zeros_like(clip))
        self.register_buffer("hi", clip)
        self.register_buffer("step", scale)

    def forward(self, x: Tensor) -> Tensor:
        """Quantized ``x``."""
        clipped = torch.clamp(x, self.lo, self.hi)
        if self.fp8:
            return _round_e4m3(clipped / self.step) * self.step
        return torch.round(clipped / self.step) * self.step


class _QuantisedInput(nn.Module):
    """A layer whose input goes through an activation quantizer first."""

    def __init__(self, act: nn.Module, layer: nn.Module) -> None:
        super().__init__()
        self.act, self.layer = act, layer

    def forward(self, x: Tensor) -> Tensor:
        """``layer(act(x))``."""
        return self.layer(self.act(x))


def _plain(layer: CConv2d | CLinear) -> nn.Conv2d | nn.Linear:
    """The plain layer computing what ``layer`` computes, its effective weight in fp32."""
    if isinstance(layer, CConv2d):
        spec = {"type": "Conv2d", **conv_args(layer)}
    else:
        spec = {"type": "Linear", **linear_args(layer)}
    plain = cast(nn.Conv2d | nn.Linear, build_layer(spec))
    with torch.no_grad():
        plain.weight.copy_(layer.effective_weight().float())
        if layer.bias is not None and plain.bias is not None:
            plain.bias.copy_(layer.bias.float())
    return plain.eval()


# ------------------------------------------------------------------- compressed initializers

# A swap: the nodes and initializers that compute the weight named ``name``, and the weight
# they dequantize to (computed here the way the nodes compute it, to be checked).
_Swap = tuple[list[Any], list[Any], Tensor, str]


def _channel_shape(w: Tensor) -> tuple[int, ...]:
    return (-1,) + (1,) * (w.ndim - 1)


def _dequantize(
    name: str, codes: Tensor, scale: Tensor, zero: Tensor, onnx_type: int | None = None
) -> tuple[list[Any], list[Any]]:
    """``DequantizeLinear(codes, scale, zero)`` into ``name``: per output channel (axis 0) when
    ``scale`` has more than one entry, else per tensor."""
    from onnx import helper, numpy_helper

    per_channel = scale.numel() > 1
    scale = scale.float().reshape(-1) if per_channel else scale.float().reshape(())
    zero = zero.reshape(-1) if per_channel else zero.reshape(())
    if onnx_type is None:
        q = numpy_helper.from_array(codes.numpy(), f"{name}.codes")
        z = numpy_helper.from_array(zero.numpy(), f"{name}.zero")
    else:  # float8: raw bytes (numpy has no float8 dtype)
        q = helper.make_tensor(
            f"{name}.codes",
            onnx_type,
            list(codes.shape),
            codes.contiguous().view(torch.uint8).numpy().tobytes(),
            raw=True,
        )
        z = helper.make_tensor(
            f"{name}.zero",
            onnx_type,
            list(zero.shape),
            zero.contiguous().view(torch.uint8).numpy().tobytes(),
            raw=True,
        )
    s = numpy_helper.from_array(scale.numpy(), f"{name}.scale")
    inputs = [q.name, s.name, z.name]
    if per_channel:
        node = helper.make_node("DequantizeLinear", inputs, [name], axis=0)
    else:
        node = helper.make_node("DequantizeLinear", inputs, [name])
    return [node], [q, s, z]


def _int_swap(name: str, layer: CConv2d | CLinear, rep: IntRepr) -> _Swap | None:
    if rep.bits > 8:
        return None
    w = layer.weight.detach().float()
    levels = rep.export_weight(w, None).tensor.to(torch.int64) + rep.qmin
    zero = rep.zero.detach().round().to(torch.int64).cpu().expand(rep.scale.numel())
    zero_w = zero.view(_channel_shape(w)) if zero.numel() > 1 else zero.reshape(())
    if layer.mask is not None:  # a pruned position holds the zero point: it dequantizes to 0
        levels = torch.where(layer.mask.cpu(), levels, zero_w.expand_as(levels))
    dtype, lo, hi = (torch.int8, -128, 127) if rep.symmetric else (torch.uint8, 0, 255)
    if not (
        lo <= int(levels.min())
        and int(levels.max()) <= hi
        and lo <= int(zero.min())
        and int(zero.max()) <= hi
    ):
        return None
    scale = rep.scale.detach().float().cpu()
    scale_w = scale.view(_channel_shape(w)) if scale.numel() > 1 else scale.reshape(())
    value = (levels - zero_w).float() * scale_w
    nodes, inits = _dequantize(name, levels.to(dtype), scale, zero.to(dtype))
    return (
        nodes,
        inits,
        value,
        f"{str(dtype).removeprefix('torch.')} DequantizeLinear (int{rep.bits} levels)",
    )


def _binary_swap(name: str, layer: CConv2d | CLinear, rep: BinaryRepr) -> _Swap:
    w = layer.weight.detach().float()
    signs = rep.export_weight(w, None).tensor.to(torch.int64) * 2 - 1
    if layer.mask is not None:
        signs = torch.where(layer.mask.cpu(), signs, torch.zeros_like(signs))
    alpha = rep.alpha.detach().float().cpu()
    value = signs.float() * (
        alpha.view(_channel_shape(w)) if alpha.numel() > 1 else alpha.reshape(())
    )
    zero = torch.zeros(alpha.numel(), dtype=torch.int8)
    nodes, inits = _dequantize(name, signs.to(torch.int8), alpha, zero)
    return nodes, inits, value, "int8 DequantizeLinear (binary signs)"


def _float_swap(name: str, layer: CConv2d | CLinear, rep: FloatRepr) -> _Swap | None:
    from onnx import TensorProto, helper, numpy_helper

    stream = rep.export_weight(layer.weight.detach().float(), None)
    values = stream.tensor.float()
    if layer.mask is not None:
        values = values * layer.mask.cpu()
    if not rep.scaled:  # fp16: stored as fp16, cast to fp32
        half = values.to(torch.float16)
        init = numpy_helper.from_array(half.numpy(), f"{name}.fp16")
        node = helper.make_node("Cast", [init.name], [name], to=TensorProto.FLOAT)
        return [node], [init], half.float(), "fp16 Cast"
    f8 = {
        "f8e4m3": (torch.float8_e4m3fn, TensorProto.FLOAT8E4M3FN, "float8e4m3fn"),
        "f8e5m2": (torch.float8_e5m2, TensorProto.FLOAT8E5M2, "float8e5m2"),
    }
    if stream.dtype not in f8:
        return None
    dtype, onnx_type, label = f8[stream.dtype]
    codes = values.to(dtype)
    scale = rep.scale.detach().float().cpu()
    value = codes.float() * scale.view(_channel_shape(values))
    nodes, inits = _dequantize(
        name, codes, scale, torch.zeros(scale.numel(), dtype=dtype), onnx_type
    )
    return nodes, inits, value, f"{label} DequantizeLinear"


def _codebook_swap(name: str, layer: CConv2d | CLinear, rep: CodebookRepr) -> _Swap | None:
    from onnx import TensorProto, helper, numpy_helper

    table = rep.centroids.detach().float().cpu()
    index = rep.indices.detach().to(torch.int64).cpu()
    if layer.mask is not None:  # pruned positions point at an added 0.0 entry
        table = torch.cat([table, torch.zeros(1)])
        index = torch.where(layer.mask.cpu(), index, torch.full_like(index, len(table) - 1))
    if len(table) > 1 << 16:
        return None
    dtype = np.uint8 if len(table) <= 256 else np.uint16
    idx = numpy_helper.from_array(index.numpy().astype(dtype), f"{name}.indices")
    cents = numpy_helper.from_array(table.numpy(), f"{name}.centroids")
    nodes = [
        helper.make_node("Cast", [idx.name], [f"{name}.indices64"], to=TensorProto.INT64),
        helper.make_node("Gather", [cents.name, f"{name}.indices64"], [name], axis=0),
    ]
    label = f"{np.dtype(dtype).name} indices + Gather ({rep.k} centroids)"
    return nodes, [idx, cents], table[index], label


def _swap(name: str, layer: CConv2d | CLinear) -> _Swap | None:
    """The compressed form of ``layer``'s effective weight, as ONNX nodes, if ONNX holds it."""
    rep = layer.weight_repr
    makers: list[tuple[type, Callable[..., _Swap | None]]] = [
        (IntRepr, _int_swap),
        (BinaryRepr, _binary_swap),
        (FloatRepr, _float_swap),
        (CodebookRepr, _codebook_swap),
    ]
    for cls, make in makers:
        if type(rep) is cls:
            return make(name, layer, rep)
    return None


# ----------------------------------------------------------------------------------- export


def _initializer_of(inits: dict[str, Any], name: str, dense: Tensor) -> tuple[str, bool] | None:
    """The initializer holding a layer's weight ``dense``: ``name``, or, for a linear layer the
    exporter turned into a MatMul, the transposed copy it made (found by its values); and
    whether it is transposed."""
    from onnx import numpy_helper

    if name in inits:
        return name, False
    if dense.ndim != 2:
        return None
    want = dense.T.numpy()
    for other, init in inits.items():
        if tuple(init.dims) == want.shape and np.array_equal(numpy_helper.to_array(init), want):
            return other, True
    return None


def _spec_of(model: nn.Module, spec: InputSpec | DataSpec | None) -> InputSpec:
    if spec is None:
        spec = getattr(model, "input_spec", None)
    if spec is None:
        raise UserError(
            "the model records no input spec (an artifact written before specs were "
            "recorded); pass the dataset's spec, e.g. load_dataset(...).spec"
        )
    spec = InputSpec.of(spec)
    arch = getattr(model, "pc_arch", None)
    if isinstance(arch, dict) and (spec.channels, spec.num_classes) != (
        arch.get("in_channels"),
        arch.get("num_classes"),
    ):
        raise UserError(
            f"input spec of {spec.channels} channels and {spec.num_classes} classes does not fit "
            f"{arch.get('name')} built for {arch.get('in_channels')} and {arch.get('num_classes')}"
        )
    return spec


def onnx_bytes(
    model: nn.Module, spec: InputSpec | DataSpec | None = None
) -> tuple[bytes, dict[str, str]]:
    """The ONNX file of ``model`` (see the module doc) and how each conv/linear layer is stored.

    ``spec`` defaults to ``model.input_spec`` (a decoded artifact's); one is required.
    """
    require_onnx("ONNX export")
    import onnx
    from onnx import helper

    spec = _spec_of(model, spec)
    net = copy.deepcopy(model).cpu().eval()
    storage: dict[str, str] = {}
    # weight initializer name -> (path, original layer, the dense weight exported)
    compressed: dict[str, tuple[str, CConv2d | CLinear, Tensor]] = {}
    for path, layer in list(net.named_modules()):
        if isinstance(layer, CConv2d | CLinear):
            plain = _plain(layer)
            new: nn.Module = plain
            weight = f"model.{path}.weight"
            if layer.act is not None:
                act = _ActQuant(layer.act) if isinstance(layer.act, ActQuantizer) else layer.act
                new, weight = _QuantisedInput(act, new), f"model.{path}.layer.weight"
            replace_module(net, path, new)
            compressed[weight] = (path, layer, plain.weight.detach())
            storage[path] = DENSE
        elif isinstance(layer, nn.Conv2d | nn.Linear):
            storage[path] = DENSE
    graph_model = _Normalised(net, spec).eval()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
        torch.onnx.export(
            graph_model,
            (torch.zeros((1, *spec.shape), dtype=torch.uint8),),
            buf,  # type: ignore[arg-type]  # the TorchScript exporter writes to file objects
            dynamo=False,
            opset_version=OPSET,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            training=torch.onnx.TrainingMode.PRESERVE,  # no BatchNorm folding into the weights
            keep_initializers_as_inputs=False,
        )
    proto = onnx.load_from_string(buf.getvalue())
    graph = proto.graph
    inits = {init.name: init for init in graph.initializer}
    new_nodes: list[Any] = []
    for name, (path, layer, dense) in compressed.items():
        if layer.weight_repr is None:
            continue
        found = _initializer_of(inits, name, dense)
        if found is None:
            storage[path] = f"{DENSE} (the exporter renamed its weight)"
            continue
        made = _swap(name, layer)
        if made is None:
            continue
        nodes, tensors, value, label = made
        # Each representation's ONNX form is checked against the weight the model computes with.
        bound = 1e-5 * float(dense.abs().max()) + 1e-30
        if value.shape != dense.shape or float((value - dense).abs().max()) > bound:
            storage[path] = f"{DENSE} (its {label} did not reproduce the weight)"
            continue
        init_name, transposed = found
        if transposed:  # a bias-free linear layer is a MatMul with the weight transposed
            nodes.append(helper.make_node("Transpose", [name], [init_name], perm=[1, 0]))
        graph.initializer.remove(inits.pop(init_name))
        graph.initializer.extend(tensors)
        new_nodes.extend(nodes)
        storage[path] = label
    for node in reversed(new_nodes):  # weights first: the graph stays topologically sorted
        graph.node.insert(0, node)
    graph.input[0].doc_string = f"uint8 images (N, {', '.join(map(str, spec.shape))}) as stored"
    graph.output[0].doc_string = f"float32 logits (N, {spec.num_classes})"
    helper.set_model_props(proto, {METADATA_KEY: json.dumps(spec.to_json())})
    proto.producer_name = "pareto-compress"
    onnx.checker.check_model(proto)
    return proto.SerializeToString(), storage


def to_onnx(
    model: nn.Module, spec: InputSpec | DataSpec | None, path: str | Path
) -> dict[str, str]:
    """Write the ONNX file of ``model`` (a decoded artifact) to ``path``; return how each
    conv/linear layer is stored in it (``{layer path: storage}``, see the module doc).

    ``spec`` is how the model is fed (None: ``model.input_spec``)."""
    data, storage = onnx_bytes(model, spec)
    Path(path).write_bytes(data)
    return storage
