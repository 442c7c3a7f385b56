"""The compressed-artifact codec: the bytes every reported size is measured from.

``encode(model)`` writes every tensor needed for inference in the representation its technique
gave it (dense fp32/fp16/fp8, packed int-k codes with scales, codebook indices with centroids,
sign bits with scales), positions of sparse tensors as a bitmap or as Deep Compression's
relative indices (whichever is smaller), each blob zstd-compressed when that makes it smaller.
``decode(bytes)`` rebuilds a model with the same outputs. **Size is ``len(encode(model))``.**

Layout: ``MAGIC | u32 header length | zstd(JSON header) | blobs ... | u32 CRC-32 of all before``.
The header names the architecture (``models.create_model`` arguments), and for every unit (a
registered layer) its JSON spec and its streams: dtype/bits, shape, and where its blobs lie.
No pickle: a corrupt or truncated file is refused with one clear error.

Input spec. ``encode(model, spec=...)`` also records how the model is fed (:class:`InputSpec`:
``C x H x W``, per-channel mean/std of the 0..1-scaled pixels, number of classes, class names or
null) as the header's ``input`` field (header format 2; without a spec the header is format 1,
byte for byte what earlier versions wrote, and both formats decode). ``decode`` returns the model
with ``model.input_spec`` (None for format 1) and ``model.predict_uint8(images)``: class indices
of uint8 images as stored, normalised exactly as training normalised them. ``forward`` still takes
normalised float input. The spec's bytes are part of the header, so they count in the size.

Reading trusts nothing a file declares, checksum or not. Before anything big is allocated,
``decode`` rebuilds the architecture on the meta device and checks the header against it: every
unit path names a layer of that architecture and every layer is provided exactly once; each
unit's spec is probed on the meta device, must rebuild to exactly that spec, replace a module of
its kind, and hold at most ``UNIT_FACTOR`` times the bytes of that module in dense fp32 (plus
``UNIT_SLACK``); its streams must be exactly the ones the encoder writes for that spec, with the
same kinds, shapes, widths, masks and shares; blobs lie back to back, each raw blob has exactly
the length its stream needs and each zstd frame declares exactly that length (checked before
decompressing; zstd trusts a frame's declared size). The header is at most ``MAX_HEADER_BYTES``
of JSON nested at most ``MAX_HEADER_DEPTH`` deep, the architecture at most ``MAX_MODEL_BYTES`` in
dense fp32. So ``decode`` allocates the decoded model's tensors (at most ``UNIT_FACTOR`` times the
architecture's dense fp32 size, plus ``UNIT_SLACK`` a unit), plus working memory while one
stream is read (a few tens of bytes an element of that one tensor: bit unpacking, int64 codes,
the mask), plus the header. Any violation is a :class:`CorruptArtifactError` naming the unit, stream and field. Fields that do
not shape a tensor (a conv's stride, a BatchNorm's eps, an activation format) are taken as
written: they are checked only for being what their layer type accepts. The ``input`` field is
checked like the rest: exactly its keys, channels and classes equal to the architecture's, sides
at most ``MAX_INPUT_SIDE``, one finite mean and std per channel within ``NORM_BOUND`` (std at
least ``MIN_STD``), and null or one non-empty name of at most ``MAX_CLASS_NAME`` characters per
class.
"""

from __future__ import annotations

import json
import re
import struct
import types
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zstandard
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

import spaces  # noqa: F401  (registers every technique's layer types and components)
from models.errors import UserError
from models.registry import create_model, model_arch
from models.spec import DataSpec
from spaces.layers import (
    FLOAT_DTYPES,
    CConv2d,
    CLinear,
    Stream,
    build_layer,
    float_stream,
    iter_units,
    layer_spec,
    layer_type_of,
    replace_module,
)

MAGIC = b"PCZ\x01"
FORMAT_VERSION = 2  # the header holds the input spec ("input")
FORMAT_WITHOUT_SPEC = 1  # no input spec: what encode writes without one, and every older artifact
_ZSTD_LEVEL = 9
_SKIP_BUFFERS = ("num_batches_tracked",)  # bookkeeping, not needed for inference

# Reading limits (see the module doc). Real headers hold well under 100 KB of JSON (115 units of
# MobileNetV2: 63 KB) nested 7 deep; the largest registered model is 45 MB in dense fp32.
MAX_HEADER_BYTES = 2 << 20
MAX_HEADER_DEPTH = 32
MAX_MODEL_BYTES = 1 << 30
# A unit may hold more bytes than the dense fp32 module it replaces: a codebook layer keeps an
# fp32 shadow weight, int64 indices and a bool mask (13 bytes a weight against 4), int-k layers
# per-channel scales and zero points. 6x covers these; the slack covers small layers' codebooks.
UNIT_FACTOR = 6
UNIT_SLACK = 64 << 10
# The input spec: real images are at most a few thousand pixels a side; mean and std are those
# of 0..1-scaled pixels (DataSpec rounds them to 4 decimals, so a real std is >= 1e-4).
MAX_INPUT_SIDE = 1 << 16
MAX_CLASS_NAME = 256
NORM_BOUND = 1e6
MIN_STD = 1e-6


class CorruptArtifactError(UserError):
    """The bytes are not a valid artifact (truncated, corrupted, or another format)."""


# ------------------------------------------------------------------------------- input spec


@dataclass(frozen=True)
class InputSpec:
    """How a model is fed: what the artifact's ``input`` header field records.

    ``forward`` takes float ``(N, C, H, W)`` images normalised per channel as
    ``(pixel / 255 - mean) / std``; :meth:`normalize` makes them from uint8 pixels as stored.

    Attributes:
        channels, height, width: The input image shape ``C x H x W``.
        mean, std: Per-channel mean and standard deviation of the 0..1-scaled pixels.
        num_classes: Number of outputs (logits).
        class_names: The name of each class, where the dataset has them; else None.
    """

    channels: int
    height: int
    width: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int
    class_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(
                f"InputSpec needs one mean and std per channel ({self.channels}), got {self!r}"
            )
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ValueError(
                f"InputSpec needs one class name per class ({self.num_classes}), got {self!r}"
            )

    @classmethod
    def of(cls, spec: InputSpec | DataSpec) -> InputSpec:
        """``spec`` as an :class:`InputSpec` (a dataset's :class:`DataSpec` is square; its class
        names are taken when it carries ``class_names``, which today's datasets do not)."""
        if isinstance(spec, InputSpec):
            return spec
        names = getattr(spec, "class_names", None)
        return cls(
            spec.channels,
            spec.size,
            spec.size,
            tuple(float(v) for v in spec.mean),
            tuple(float(v) for v in spec.std),
            spec.num_classes,
            None if names is None else tuple(str(n) for n in names),
        )

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        return (self.channels, self.height, self.width)

    def to_json(self) -> dict[str, Any]:
        """The header's ``input`` field."""
        return {
            "shape": list(self.shape),
            "mean": [float(v) for v in self.mean],
            "std": [float(v) for v in self.std],
            "num_classes": self.num_classes,
            "class_names": None if self.class_names is None else list(self.class_names),
        }

    def scale_shift(self, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
        """``(scale, shift)`` of shape ``(1, C, 1, 1)`` with ``normalised = pixel * scale +
        shift``, computed in fp32 exactly as :class:`models.loader.DeviceLoader` does."""
        std = torch.tensor(self.std, dtype=torch.float32, device=device)
        mean = torch.tensor(self.mean, dtype=torch.float32, device=device)
        return (1.0 / (255.0 * std)).view(1, -1, 1, 1), (-mean / std).view(1, -1, 1, 1)

    def normalize(self, images: Tensor) -> Tensor:
        """uint8 ``(N, C, H, W)`` pixels -> the float input ``forward`` takes (the training
        loader's fused ``shift + pixel * scale``, so accuracy is that of the evaluation)."""
        scale, shift = self.scale_shift(images.device)
        return torch.addcmul(shift, images, scale)


def predict_uint8(model: nn.Module, images: Tensor | np.ndarray, batch_size: int = 1024) -> Tensor:
    """Class indices (int64, ``(N,)``) of uint8 ``images`` as stored: ``(N, C, H, W)``, or
    ``(N, H, W)`` for one channel, normalised with ``model.input_spec`` (bound to a decoded
    model as ``model.predict_uint8``).

    Raises:
        UserError: the model records no input spec, or the images are not uint8 of its shape.
    """
    spec: InputSpec | None = getattr(model, "input_spec", None)
    if spec is None:
        raise UserError(
            "this model records no input spec (its artifact predates input specs); "
            "rebuild it with python -m search.apply, or normalise the images yourself"
        )
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8:
        raise UserError(
            f"predict_uint8 takes uint8 images (pixels as stored, 0..255), got {x.dtype}; "
            "convert them with .astype(uint8) or feed normalised floats to the model itself"
        )
    if x.ndim == 3 and spec.channels == 1:
        x = x.unsqueeze(1)
    if x.ndim != 4 or tuple(x.shape[1:]) != spec.shape:
        c, h, w = spec.shape
        one = f" or (N, {h}, {w})" if c == 1 else ""
        raise UserError(
            f"images of shape {tuple(x.shape)}; this model takes (N, {c}, {h}, {w}){one}"
        )
    device = next(iter(model.parameters())).device
    out = [torch.zeros(0, dtype=torch.int64, device=device)]
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            out.append(model(spec.normalize(x[start : start + batch_size].to(device))).argmax(1))
    return torch.cat(out)


# ------------------------------------------------------------------------------------ blobs


def _maybe_zstd(raw: bytes, entropy: bool = True) -> tuple[bytes, str]:
    if not entropy or len(raw) < 64:
        return raw, "raw"
    packed = zstandard.ZstdCompressor(level=_ZSTD_LEVEL).compress(raw)
    return (packed, "zstd") if len(packed) < len(raw) else (raw, "raw")


def _show(value: Any, limit: int = 60) -> str:
    """A JSON value as it appears in an error message (one line, cut short)."""
    text = json.dumps(value) if not isinstance(value, bytes | bytearray) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _corrupt(where: str, problem: str) -> CorruptArtifactError:
    return CorruptArtifactError(f"{where}: {problem}; re-export it")


def _inflate(blob: bytes, limit: int, where: str, exact: bool = True) -> bytes:
    """zstd-decompress ``blob`` into exactly ``limit`` bytes (at most ``limit`` unless ``exact``).

    ``ZstdDecompressor().decompress`` allocates whatever size the frame header declares, so the
    declaration is checked first; the encoder always declares it.
    """
    try:
        declared = zstandard.get_frame_parameters(blob).content_size
    except zstandard.ZstdError as exc:
        raise _corrupt(where, f"not a zstd frame ({' '.join(str(exc).split())})") from None
    if (declared != limit) if exact else not 0 < declared <= limit:
        size = "an unknown number of" if declared == zstandard.CONTENTSIZE_UNKNOWN else declared
        bound = limit if exact else f"1..{limit}"
        raise _corrupt(where, f"zstd frame declares {size} bytes, expected {bound}")
    try:
        out = zstandard.ZstdDecompressor().decompress(
            blob, max_output_size=max(limit, 1), allow_extra_data=False
        )
    except zstandard.ZstdError as exc:
        raise _corrupt(where, f"zstd frame is damaged ({' '.join(str(exc).split())})") from None
    if len(out) != declared:
        raise _corrupt(where, f"zstd frame holds {len(out)} bytes, declares {declared}")
    return out


def _blob(enc: Any, blob: bytes, size: int, where: str) -> bytes:
    """The ``size`` bytes a stream needs, from its stored blob (``enc``: "raw" or "zstd")."""
    if enc == "raw":
        if len(blob) != size:
            raise _corrupt(where, f"raw blob of {len(blob)} bytes, expected {size}")
        return blob
    if enc == "zstd":
        return _inflate(blob, size, where)
    raise _corrupt(where, f"unknown blob encoding {_show(enc)} (known: raw, zstd)")


def _int(value: Any, where: str, lo: int, hi: int) -> int:
    """``value`` if it is an integer in ``[lo, hi]`` (not a bool, not a float)."""
    if type(value) is not int or not lo <= value <= hi:
        raise _corrupt(where, f"expected an integer in [{lo}, {hi}], got {_show(value)}")
    return value


def pack_codes(codes: np.ndarray, bits: int) -> bytes:
    """Pack non-negative integers below ``2**bits`` at exactly ``bits`` bits each (LSB first)."""
    codes = np.ascontiguousarray(codes, dtype=np.uint64)
    if codes.size and int(codes.max()) >> bits:
        raise ValueError(f"a code exceeds {bits} bits (max {int(codes.max())})")
    if bits == 8:
        return codes.astype(np.uint8).tobytes()
    bitmat = ((codes[:, None] >> np.arange(bits, dtype=np.uint64)) & 1).astype(np.uint8)
    return np.packbits(bitmat.ravel(), bitorder="little").tobytes()


def unpack_codes(blob: bytes, bits: int, n: int) -> np.ndarray:
    """Inverse of :func:`pack_codes` (int64 codes; ``ValueError`` if ``blob`` is too short)."""
    if not 1 <= bits <= 32:
        raise ValueError(f"codes need 1..32 bits, got {bits}")
    raw = np.frombuffer(blob, dtype=np.uint8)
    if raw.size * 8 < n * bits:
        raise ValueError(f"{raw.size} bytes hold fewer than {n} codes of {bits} bits")
    # Codes are summed one byte (or bit) column at a time: working memory stays near n * (bits
    # + 16) bytes, where an (n, bits) int64 matrix would take 8 * bits bytes a code.
    if bits % 8 == 0:
        columns, step = raw[: n * bits // 8].reshape(n, bits // 8), 8
    else:
        columns = np.unpackbits(raw, count=n * bits, bitorder="little").reshape(n, bits)
        step = 1
    codes = np.zeros(n, dtype=np.int64)
    for i in range(columns.shape[1]):
        codes |= columns[:, i].astype(np.int64) << (step * i)
    return codes


def _relative_symbols(positions: np.ndarray, bits: int) -> np.ndarray:
    """Deep Compression's relative indices: the gap before each kept position, with an escape
    symbol ``2**bits - 1`` meaning 'skip that many positions, no element here'."""
    top = (1 << bits) - 1
    gaps = np.diff(positions, prepend=-1) - 1
    escapes = gaps // top
    symbols = np.full(len(positions) + int(escapes.sum()), top, dtype=np.int64)
    element_at = np.arange(len(positions)) + np.cumsum(escapes)
    symbols[element_at] = gaps % top
    return symbols


def _positions_from_symbols(symbols: np.ndarray, bits: int) -> np.ndarray:
    top = (1 << bits) - 1
    is_element = symbols < top
    advance = symbols + is_element  # an element consumes its gap plus its own position
    ends = np.cumsum(advance)
    return ends[is_element] - 1


def encode_positions(mask: np.ndarray, entropy: bool = True) -> tuple[bytes, dict[str, Any]]:
    """The smaller of a bitmap and relative indices (at the best width) of a bool mask, each
    zstd-compressed when that is smaller (and ``entropy``)."""
    flat = mask.ravel()
    candidates: list[tuple[bytes, str, dict[str, Any]]] = [(*_maybe_zstd(np.packbits(flat, bitorder="little").tobytes(), entropy), {"pos": "bitmap"})]
    positions = np.flatnonzero(flat)
    if len(positions):
        gaps = np.diff(positions, prepend=-1) - 1
        best_bits = min(
            range(1, 17), key=lambda b: b * (len(gaps) + int((gaps // ((1 << b) - 1)).sum()))
        )
        symbols = _relative_symbols(positions, best_bits)
        packed = pack_codes(symbols, best_bits)
        candidates.append((*_maybe_zstd(packed, entropy), {"pos": "relative", "pos_bits": best_bits, "symbols": len(symbols)}))
    blob, enc, meta = min(candidates, key=lambda c: len(c[0]))
    return blob, {**meta, "pos_enc": enc}


def decode_positions(
    blob: bytes, meta: dict[str, Any], numel: int, where: str = "positions"
) -> np.ndarray:
    """Inverse of :func:`encode_positions`: the bool mask, flat.

    Every field of ``meta`` is checked against ``numel`` before anything is allocated; a bad one
    is a :class:`CorruptArtifactError` naming ``where`` and the field.
    """
    pos = meta.get("pos")
    if pos == "bitmap":
        raw = _blob(meta.get("pos_enc"), blob, (numel + 7) // 8, where)
        bitmap = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), count=numel, bitorder="little")
        return bitmap.astype(bool)
    if pos != "relative":
        raise _corrupt(where, f"unknown position encoding {_show(pos)} (known: bitmap, relative)")
    bits = _int(meta.get("pos_bits"), f"{where} pos_bits", 1, 16)
    # At most one symbol a position plus one escape per 2**bits - 1 skipped positions.
    count = _int(meta.get("symbols"), f"{where} symbols", 0, numel + numel // ((1 << bits) - 1))
    raw = _blob(meta.get("pos_enc"), blob, (count * bits + 7) // 8, where)
    positions = _positions_from_symbols(unpack_codes(raw, bits, count), bits)
    if len(positions) and positions[-1] >= numel:
        raise _corrupt(where, f"position {int(positions[-1])} lies outside the {numel} elements")
    mask = np.zeros(numel, dtype=bool)
    mask[positions] = True
    return mask


# ---------------------------------------------------------------------------------- streams


def _value_bytes(stream: Stream, kept: Tensor | None) -> bytes:
    t = stream.tensor.reshape(-1)
    if kept is not None:
        t = t[kept.reshape(-1)]
    if stream.kind == "codes":
        return pack_codes(t.to(torch.int64).numpy(), stream.bits)
    return t.to(FLOAT_DTYPES[stream.dtype]).contiguous().view(torch.uint8).numpy().tobytes()


def _values_from_bytes(raw: bytes, stream: Stream, n: int) -> Tensor:
    """``n`` values of ``stream``'s kind from exactly the bytes they take."""
    if stream.kind == "codes":
        return torch.from_numpy(unpack_codes(raw, stream.bits, n))
    if n == 0:  # a fully pruned layer stores no values (torch.frombuffer refuses empty buffers)
        return torch.zeros(0)
    u8 = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    return u8.view(FLOAT_DTYPES[stream.dtype])[:n].float()


@dataclass
class _Writer:
    blobs: list[bytes] = field(default_factory=list)
    offset: int = 0
    shared: dict[str, dict[str, Any]] = field(default_factory=dict)
    entropy: bool = True  # zstd on code and position blobs when smaller

    def add(self, blob: bytes) -> list[int]:
        self.blobs.append(blob)
        span = [self.offset, len(blob)]
        self.offset += len(blob)
        return span

    def stream(self, stream: Stream) -> dict[str, Any]:
        if stream.share is not None and stream.share in self.shared:
            return {"ref": stream.share}
        numel = stream.tensor.numel()
        meta: dict[str, Any] = {"kind": stream.kind, "shape": list(stream.tensor.shape)}
        if stream.kind == "codes":
            meta["bits"] = stream.bits
        else:
            meta["dtype"] = stream.dtype
        kept = None
        if stream.mask is not None:
            kept = stream.mask.to(torch.bool).cpu()
            pos_blob, pos_meta = encode_positions(kept.numpy(), self.entropy)
            meta.update(pos_meta, pos_span=self.add(pos_blob), nnz=int(kept.sum()))
        raw = _value_bytes(stream, kept)
        blob, enc = _maybe_zstd(raw, self.entropy) if stream.kind == "codes" else (raw, "raw")
        meta.update(enc=enc, span=self.add(blob), n=meta.get("nnz", numel))
        if stream.share is not None:
            self.shared[stream.share] = meta
            meta = {**meta, "share": stream.share}
        return meta


# ------------------------------------------------------------------------------------ units


def export_unit(m: nn.Module) -> dict[str, Stream]:
    """Every stream of one registered unit (recursing into containers)."""
    lt = layer_type_of(m)
    if lt is None:
        raise UserError(f"cannot encode module {type(m).__name__}: it is not a registered layer type")
    streams: dict[str, Stream] = {}
    if lt.children:
        for name in lt.children:
            for key, s in export_unit(getattr(m, name)).items():
                streams[f"{name}.{key}"] = s
        return streams
    if isinstance(m, CConv2d | CLinear):
        w = m.weight.detach()
        if m.weight_repr is not None:
            streams["weight"] = m.weight_repr.export_weight(w, m.mask)
            streams.update({f"weight_repr.{k}": s for k, s in m.weight_repr.export_state().items()})
        else:
            streams["weight"] = float_stream(w.float(), mask=m.mask)
        if m.bias is not None:
            streams["bias"] = float_stream(m.bias.float())
        if m.act is not None:
            streams.update({f"act.{k}": s for k, s in m.act.export_state().items()})
        return streams
    for name, t in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
        if t is not None and name not in _SKIP_BUFFERS:
            streams[name] = float_stream(t.float())
    return streams


def load_unit(m: nn.Module, tensors: dict[str, Tensor], masks: dict[str, Tensor]) -> None:
    """Inverse of :func:`export_unit` into a freshly built unit ``m``."""
    lt = layer_type_of(m)
    assert lt is not None
    if lt.children:
        for name in lt.children:
            pre = f"{name}."
            load_unit(
                getattr(m, name),
                {k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)},
                {k[len(pre):]: v for k, v in masks.items() if k.startswith(pre)},
            )
        return
    if isinstance(m, CConv2d | CLinear):
        if m.weight_repr is not None:
            m.weight_repr.load_state({k[12:]: v for k, v in tensors.items() if k.startswith("weight_repr.")})
            m.weight.data = m.weight_repr.load_weight(tensors["weight"], m.weight.shape).float()
        else:
            m.weight.data = tensors["weight"].float()
        if "weight" in masks:
            m.mask = masks["weight"].reshape(m.weight.shape)
        if m.bias is not None:
            m.bias.data = tensors["bias"].float()
        if m.act is not None:
            m.act.load_state({k[4:]: v for k, v in tensors.items() if k.startswith("act.")})
        return
    for name, t in tensors.items():
        target = getattr(m, name)
        target.data = t.to(target.dtype).reshape(target.shape)


# ------------------------------------------------------------------------------ encode/decode


def _check_covered(model: nn.Module, unit_paths: list[str]) -> None:
    for name, _ in list(model.named_parameters()) + list(model.named_buffers()):
        if name.rsplit(".", 1)[-1] in _SKIP_BUFFERS:
            continue
        if not any(name.startswith(p + ".") for p in unit_paths):
            owner = name.rsplit(".", 1)[0]
            raise UserError(
                f"cannot encode tensor {name!r}: its module {owner!r} "
                f"({type(model.get_submodule(owner)).__name__}) is not a registered layer type"
            )


def encode_with_report(
    model: nn.Module, entropy: bool = True, *, spec: InputSpec | DataSpec | None = None
) -> tuple[bytes, dict[str, int]]:
    """Encode ``model``; also return the bytes of each unit's blobs and of the header.

    ``entropy=False`` stores every blob raw (no zstd), so that sizes follow from the format
    alone (tests, measuring what entropy coding gains); the header is zstd-compressed always.
    ``spec``: how the model is fed, recorded in the header (format 2); default: the
    ``input_spec`` of a decoded model, else none (format 1).
    """
    arch = model_arch(model)
    spec = spec if spec is not None else getattr(model, "input_spec", None)
    if spec is not None:
        spec = InputSpec.of(spec)
        if (spec.channels, spec.num_classes) != (arch["in_channels"], arch["num_classes"]):
            raise UserError(
                f"input spec of {spec.channels} channels and {spec.num_classes} classes does not fit "
                f"{arch['name']} built for {arch['in_channels']} and {arch['num_classes']}; pass the model's own data spec"
            )
    units = list(iter_units(model))
    _check_covered(model, [p for p, _ in units])
    writer = _Writer(entropy=entropy)
    records, breakdown = [], {}
    for path, unit in units:
        before = writer.offset
        streams = {k: writer.stream(s) for k, s in export_unit(unit).items()}
        records.append({"path": path, "spec": layer_spec(unit), "streams": streams})
        breakdown[path] = writer.offset - before
    header: dict[str, Any] = {"format": FORMAT_WITHOUT_SPEC, "arch": arch, "units": records}
    if spec is not None:
        header = {"format": FORMAT_VERSION, "arch": arch, "input": spec.to_json(), "units": records}
    header_z = zstandard.ZstdCompressor(level=19).compress(json.dumps(header, separators=(",", ":")).encode())
    body = MAGIC + struct.pack("<I", len(header_z)) + header_z + b"".join(writer.blobs)
    data = body + struct.pack("<I", zlib.crc32(body))
    breakdown["(header)"] = len(data) - writer.offset
    return data, breakdown


def encode(
    model: nn.Module, entropy: bool = True, *, spec: InputSpec | DataSpec | None = None
) -> bytes:
    """The compressed artifact of ``model`` (see module doc; ``entropy`` and ``spec`` as in
    :func:`encode_with_report`)."""
    return encode_with_report(model, entropy, spec=spec)[0]


def encoded_size(model: nn.Module) -> int:
    """``len(encode(model))``: the one definition of a model's size."""
    return len(encode(model))


# ------------------------------------------------------------------------------------ reading


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)


def _json_depth(text: bytes) -> int:
    """How deep arrays and objects nest in JSON ``text`` (strings skipped; an unterminated one
    only makes the count larger, and such text is no JSON anyway)."""
    chars = np.frombuffer(_JSON_STRING.sub(b"", text), dtype=np.uint8)
    opens = np.isin(chars, (ord("["), ord("{"))).astype(np.int64)
    return int(np.cumsum(opens - np.isin(chars, (ord("]"), ord("}")))).max(initial=0))


def _finite(text: str) -> float:
    value = float(text)
    if not np.isfinite(value):
        raise ValueError(f"number {text[:30]} is not finite")
    return value


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number a header holds")


def _read_header(data: bytes) -> tuple[dict[str, Any], memoryview]:
    if len(data) < len(MAGIC) + 8 or data[: len(MAGIC)] != MAGIC:
        raise CorruptArtifactError(
            "not a pareto-compress artifact (bad magic); expected a .pcz file written by storage.codec.encode"
        )
    (crc,) = struct.unpack("<I", data[-4:])
    if zlib.crc32(data[:-4]) != crc:
        raise CorruptArtifactError(
            f"artifact is corrupt or truncated ({len(data)} bytes, checksum mismatch); re-export it"
        )
    (hlen,) = struct.unpack("<I", data[4:8])
    if 8 + hlen > len(data) - 4:
        raise _corrupt(
            "artifact header", f"length {hlen} runs past the end of the file ({len(data)} bytes)"
        )
    text = _inflate(bytes(data[8 : 8 + hlen]), MAX_HEADER_BYTES, "artifact header", exact=False)
    # json.loads recurses once per nesting level: count the levels before parsing.
    if (depth := _json_depth(text)) > MAX_HEADER_DEPTH:
        raise _corrupt(
            "artifact header", f"JSON nested {depth} levels deep (at most {MAX_HEADER_DEPTH})"
        )
    try:
        header = json.loads(text, parse_float=_finite, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:
        raise _corrupt(
            "artifact header", f"unreadable JSON ({' '.join(str(exc).split())[:200]})"
        ) from None
    if not isinstance(header, dict):
        raise CorruptArtifactError("artifact header is not a JSON object; re-export it")
    fmt = header.get("format")
    if type(fmt) is not int or fmt not in (FORMAT_WITHOUT_SPEC, FORMAT_VERSION):  # true == 1
        raise CorruptArtifactError(
            f"artifact format {_show(fmt)} is not supported (expected {FORMAT_WITHOUT_SPEC} or {FORMAT_VERSION})"
        )
    return header, memoryview(data)[8 + hlen : -4]


def _keys(obj: Any, want: set[str], where: str, noun: str = "field") -> dict[str, Any]:
    """``obj`` if it is a JSON object with exactly the keys ``want``."""
    if not isinstance(obj, dict):
        raise _corrupt(where, f"expected a JSON object, got {_show(obj)}")
    if missing := sorted(want - obj.keys()):
        raise _corrupt(where, f"{noun} {missing[0]!r} is missing")
    if extra := sorted(obj.keys() - want):
        raise _corrupt(where, f"unknown {noun} {_show(extra[0])}")
    return obj


def _preview(names: list[str], limit: int = 6) -> str:
    return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")


# A header that passes the checksum can still be wrong (a bug, a hand-edited file): whatever
# building from it raises is reported as a corrupt artifact, never as a traceback from inside.
_DECODE_ERRORS = (
    KeyError,
    IndexError,
    ValueError,
    RuntimeError,
    TypeError,
    AttributeError,
    ArithmeticError,
    zstandard.ZstdError,
    UserError,
)


@contextmanager
def _as_corrupt(where: str) -> Iterator[None]:
    try:
        yield
    except CorruptArtifactError:
        raise
    except _DECODE_ERRORS as exc:
        detail = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        raise _corrupt(where, detail) from None


# In-place random fills: on a meta tensor they change nothing, yet their first call imports the
# compiler stack (torch._refs, about 2 s), so they are skipped there.
_RANDOM_FILLS = frozenset(
    {
        "normal_",
        "uniform_",
        "bernoulli_",
        "random_",
        "exponential_",
        "cauchy_",
        "log_normal_",
        "geometric_",
    }
)


class _OnMeta(TorchFunctionMode):
    """Tensors created inside are on the meta device even where a call names another device (a
    spec may pass ``device`` to its constructor): probing a spec's size allocates nothing."""

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        if (
            getattr(func, "__name__", "") in _RANDOM_FILLS
            and args
            and getattr(args[0], "is_meta", False)
        ):
            return args[0]
        kwargs = dict(kwargs or {})
        if "device" in kwargs:
            kwargs["device"] = torch.device("meta")
        return func(*args, **kwargs)


@contextmanager
def _on_meta() -> Iterator[None]:
    with torch.device("meta"), _OnMeta():
        yield


def _tensor_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer of ``module`` as held (int64 indices take 8 each)."""
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def _dense_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s tensors in dense fp32 (bookkeeping buffers not counted)."""
    named = [*module.named_parameters(), *module.named_buffers()]
    return 4 * sum(t.numel() for n, t in named if n.rsplit(".", 1)[-1] not in _SKIP_BUFFERS)


def _leaves(unit: nn.Module) -> list[nn.Module]:
    """The layers holding a unit's tensors: the unit, or the leaves of a container's children."""
    lt = layer_type_of(unit)
    if lt is None or not lt.children:
        return [unit]
    return [leaf for name in lt.children for leaf in _leaves(getattr(unit, name))]


def _architecture(arch: Any) -> nn.Module:
    """The registry's model the header's ``arch`` names, on the meta device (no memory)."""
    arch = _keys(arch, {"name", "num_classes", "in_channels"}, "artifact arch")
    name = arch["name"]
    if not isinstance(name, str):
        raise _corrupt("artifact arch.name", f"expected a model name, got {_show(name)}")
    classes = _int(arch["num_classes"], "artifact arch.num_classes", 1, 2**31 - 1)
    channels = _int(arch["in_channels"], "artifact arch.in_channels", 1, 2**31 - 1)
    with _as_corrupt("artifact arch"), _on_meta():
        model = create_model(name, num_classes=classes, in_channels=channels)
    if (size := _dense_bytes(model)) > MAX_MODEL_BYTES:
        raise _corrupt(
            "artifact arch",
            f"{name} with {classes} classes and {channels} input channels takes {size} bytes "
            f"in fp32, more than the {MAX_MODEL_BYTES} a decoder accepts",
        )
    return model


def _floats(value: Any, where: str, n: int, lo: float, hi: float) -> tuple[float, ...]:
    """``value`` if it is a list of ``n`` JSON floats in ``[lo, hi]`` (NaN is in no range)."""
    if not isinstance(value, list) or len(value) != n:
        raise _corrupt(
            where, f"expected a list of {n} numbers (one per input channel), got {_show(value)}"
        )
    for i, v in enumerate(value):
        if type(v) is not float or not lo <= v <= hi:
            raise _corrupt(
                f"{where}[{i}]", f"expected a finite number in [{lo:g}, {hi:g}], got {_show(v)}"
            )
    return tuple(value)


def _input_spec(obj: Any, channels: int, classes: int) -> InputSpec:
    """The header's ``input`` field, checked field by field against the architecture (built
    for ``channels`` inputs and ``classes`` outputs) before anything reads it."""
    where = "artifact input"
    obj = _keys(obj, {"shape", "mean", "std", "num_classes", "class_names"}, where)
    shape = obj["shape"]
    if not isinstance(shape, list) or len(shape) != 3:
        raise _corrupt(f"{where}.shape", f"expected [channels, height, width], got {_show(shape)}")
    c = _int(shape[0], f"{where}.shape[0]", 1, MAX_INPUT_SIDE)
    if c != channels:
        raise _corrupt(f"{where}.shape[0]", f"{c} channels, but the architecture takes {channels}")
    h = _int(shape[1], f"{where}.shape[1]", 1, MAX_INPUT_SIDE)
    w = _int(shape[2], f"{where}.shape[2]", 1, MAX_INPUT_SIDE)
    mean = _floats(obj["mean"], f"{where}.mean", c, -NORM_BOUND, NORM_BOUND)
    std = _floats(obj["std"], f"{where}.std", c, MIN_STD, NORM_BOUND)
    n = _int(obj["num_classes"], f"{where}.num_classes", 1, 2**31 - 1)
    if n != classes:
        raise _corrupt(
            f"{where}.num_classes", f"{n} classes, but the architecture has {classes} outputs"
        )
    names = obj["class_names"]
    if names is not None:
        if not isinstance(names, list) or len(names) != n:
            raise _corrupt(
                f"{where}.class_names", f"expected null or a list of {n} names, got {_show(names)}"
            )
        for i, name in enumerate(names):
            if not isinstance(name, str) or not 1 <= len(name) <= MAX_CLASS_NAME:
                raise _corrupt(
                    f"{where}.class_names[{i}]",
                    f"expected a name of 1..{MAX_CLASS_NAME} characters, got {_show(name)}",
                )
    return InputSpec(c, h, w, mean, std, n, None if names is None else tuple(names))


def _unit_records(units: Any, layers: dict[str, nn.Module], name: str) -> list[dict[str, Any]]:
    """The header's unit records, checked to name every layer of the architecture exactly once."""
    if not isinstance(units, list):
        raise _corrupt("artifact units", f"expected a list, got {_show(units)}")
    records: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, rec in enumerate(units):
        rec = _keys(rec, {"path", "spec", "streams"}, f"artifact units[{i}]")
        path = rec["path"]
        if not isinstance(path, str) or path not in layers:
            raise _corrupt(
                f"artifact units[{i}].path",
                f"{_show(path)} names no layer of {name} (its layers: {_preview(list(layers))})",
            )
        if path in seen:
            raise _corrupt(f"artifact unit {path!r}", "appears twice")
        seen.add(path)
        records.append(rec)
    if missing := [p for p in layers if p not in seen]:
        raise _corrupt(
            "artifact units",
            f"{len(missing)} layer(s) of {name} missing ({_preview(missing)}): "
            "the decoded model would keep random weights there",
        )
    return records


def _build_unit(spec: Any, base: nn.Module, where: str) -> nn.Module:
    """The unit ``spec`` describes, built only after a probe on the meta device showed that it is
    exactly that spec, stands for a module of ``base``'s kind and is no larger than allowed."""
    where = f"{where} spec"
    if not isinstance(spec, dict) or not isinstance(spec.get("type"), str):
        raise _corrupt(where, f"expected an object with a 'type', got {_show(spec)}")
    with _as_corrupt(where):
        with _on_meta():
            probe = build_layer(spec)
        canonical = json.loads(json.dumps(layer_spec(probe)))
        bits = [
            leaf.weight_repr.bits_per_weight()
            for leaf in _leaves(probe)
            if isinstance(leaf, CConv2d | CLinear) and leaf.weight_repr is not None
        ]
    if canonical != spec:
        if extra := sorted(spec.keys() - canonical.keys()):
            raise _corrupt(where, f"unknown field {_show(extra[0])} for a {spec['type']}")
        if missing := sorted(canonical.keys() - spec.keys()):
            raise _corrupt(where, f"field {missing[0]!r} is missing")
        key = next(k for k in sorted(spec) if spec[k] != canonical[k])
        raise _corrupt(
            where,
            f"field {key!r} is {_show(spec[key])}, but the layer it builds has {_show(canonical[key])}",
        )
    base_type = type(base)
    if not all(isinstance(leaf, base_type) for leaf in _leaves(probe)):
        raise _corrupt(
            where,
            f"a {spec['type']} cannot stand for the {base_type.__name__} the architecture has there",
        )
    size, dense = _tensor_bytes(probe), _dense_bytes(base)
    if size > UNIT_FACTOR * dense + UNIT_SLACK:
        raise _corrupt(
            where,
            f"its {spec['type']} holds {size} bytes of tensors, more than the {UNIT_FACTOR} x "
            f"{dense} + {UNIT_SLACK} allowed for the {base_type.__name__} the architecture has there",
        )
    if not all(b <= 32 for b in bits):  # a representation's math may grow with its width
        raise _corrupt(
            where, f"a weight representation uses {max(bits)} bits per weight (at most 32)"
        )
    with _as_corrupt(where):
        return build_layer(spec)


@dataclass
class _Payload:
    """The blobs after the header, taken back to back in the order the header names them."""

    data: memoryview
    offset: int = 0

    def take(self, span: Any, where: str) -> bytes:
        """The blob at ``span`` (``[start, length]``); it must start where the last one ended."""
        if not isinstance(span, list) or len(span) != 2:
            raise _corrupt(where, f"expected [start, length], got {_show(span)}")
        _int(span[0], f"{where} start", self.offset, self.offset)
        length = _int(span[1], f"{where} length", 0, len(self.data) - self.offset)
        self.offset += length
        return bytes(self.data[self.offset - length : self.offset])

    def finish(self) -> None:
        """Refuse bytes that no blob accounts for."""
        if self.offset != len(self.data):
            extra = len(self.data) - self.offset
            raise _corrupt(
                "artifact payload", f"{extra} bytes follow the last blob the header names"
            )


def _read_stream(
    meta: Any, exp: Stream, payload: _Payload, where: str
) -> tuple[Tensor, Tensor | None]:
    """One stream, its fields checked against ``exp`` (what the encoder writes for the unit's
    spec) before its blobs are read: every size read comes from ``exp``, not from the file."""
    masked, numel, shape = exp.mask is not None, exp.tensor.numel(), list(exp.tensor.shape)
    want = {"kind", "shape", "enc", "span", "n", "bits" if exp.kind == "codes" else "dtype"}
    if masked:
        want |= {"pos", "pos_enc", "pos_span", "nnz"}
        if isinstance(meta, dict) and meta.get("pos") == "relative":
            want |= {"pos_bits", "symbols"}
    if exp.share is not None:
        want.add("share")
    _keys(meta, want, where)
    if meta["shape"] != shape:
        raise _corrupt(
            where, f"shape {_show(meta['shape'])} does not match the {shape} its layer spec implies"
        )
    if meta["kind"] != exp.kind:
        raise _corrupt(where, f"kind {_show(meta['kind'])}, but its layer stores {exp.kind!r}")
    if exp.kind == "codes" and (type(meta["bits"]) is not int or meta["bits"] != exp.bits):
        raise _corrupt(
            where, f"bits {_show(meta['bits'])}, but its layer stores {exp.bits}-bit codes"
        )
    if exp.kind == "float" and meta["dtype"] != exp.dtype:
        raise _corrupt(where, f"dtype {_show(meta['dtype'])}, but its layer stores {exp.dtype!r}")
    if exp.share is not None and meta["share"] != exp.share:
        raise _corrupt(where, f"share {_show(meta['share'])}, but its layer shares {exp.share!r}")
    n = _int(meta["nnz"], f"{where} nnz", 0, numel) if masked else numel
    if type(meta["n"]) is not int or meta["n"] != n:
        held = f"its mask keeps {n}" if masked else f"its shape holds {n}"
        raise _corrupt(where, f"n = {_show(meta['n'])} values, but {held}")
    kept = None
    if masked:
        pos_blob = payload.take(meta["pos_span"], f"{where} pos_span")
        flat = decode_positions(pos_blob, meta, numel, f"{where} positions")
        if (count := int(flat.sum())) != n:
            raise _corrupt(where, f"its positions keep {count} elements, nnz says {n}")
        kept = torch.from_numpy(flat)
    size = (n * exp.bits + 7) // 8 if exp.kind == "codes" else n * FLOAT_DTYPES[exp.dtype].itemsize
    raw = _blob(meta["enc"], payload.take(meta["span"], f"{where} span"), size, where)
    values = _values_from_bytes(raw, exp, n)
    if kept is None:
        return values.reshape(shape), None
    full = torch.zeros(numel, dtype=values.dtype)
    full[kept] = values
    return full.reshape(shape), kept.reshape(shape)


_Shared = dict[str, tuple[Stream, nn.Parameter, Tensor | None]]


def _unit_stream(
    meta: Any, exp: Stream, payload: _Payload, shared: _Shared, where: str
) -> tuple[Tensor, Tensor | None]:
    """A unit's stream; a shared one (a global codebook) is stored by its first user, and the
    later ones refer to it (``{"ref": key}``) and hold the same Parameter."""
    if exp.share is not None and exp.share in shared:
        _keys(meta, {"ref"}, where)
        if meta["ref"] != exp.share:
            raise _corrupt(where, f"ref {_show(meta['ref'])}, but its layer shares {exp.share!r}")
        first, param, kept = shared[exp.share]
        if (first.kind, first.dtype, first.bits, first.tensor.shape) != (
            exp.kind,
            exp.dtype,
            exp.bits,
            exp.tensor.shape,
        ):
            have, need = list(first.tensor.shape), list(exp.tensor.shape)
            raise _corrupt(
                where, f"shared stream {exp.share!r} holds {have}, its layer needs {need}"
            )
        return param, kept
    t, kept = _read_stream(meta, exp, payload, where)
    if exp.share is None:
        return t, kept
    param = nn.Parameter(t, requires_grad=t.is_floating_point())
    shared[exp.share] = (exp, param, kept)
    return param, kept


def decode(data: bytes, device: torch.device | str = "cpu") -> nn.Module:
    """Rebuild the model encoded in ``data`` (eval mode, on ``device``).

    The model takes normalised float input, as in training; ``model.input_spec`` is the
    artifact's :class:`InputSpec` (None for an artifact without one) and
    ``model.predict_uint8(images)`` gives class indices of uint8 images as stored
    (:func:`predict_uint8`).

    Anything but what :func:`encode` writes is a :class:`CorruptArtifactError`, found before any
    large allocation (see the module doc for the checks and the memory bound)."""
    header, payload = _read_header(data)
    with _as_corrupt("artifact does not match its header"):
        model, spec = _rebuild(header, payload)
    model = model.to(device).eval()
    # Attributes, not a wrapper: the model keeps its class, paths and pc_arch, so it encodes,
    # trains and compresses like any other (and encode keeps its spec).
    setattr(model, "input_spec", spec)  # noqa: B010 (plain attributes, as models.registry's pc_arch)
    setattr(model, "predict_uint8", types.MethodType(predict_uint8, model))  # noqa: B010
    return model


def _rebuild(header: dict[str, Any], data: memoryview) -> tuple[nn.Module, InputSpec | None]:
    with_spec = header["format"] == FORMAT_VERSION
    _keys(
        header, {"format", "arch", "units"} | ({"input"} if with_spec else set()), "artifact header"
    )
    model = _architecture(header["arch"])  # on the meta device until every unit replaces its part
    arch = header["arch"]
    spec = (
        _input_spec(header["input"], arch["in_channels"], arch["num_classes"])
        if with_spec
        else None
    )
    layers = dict(iter_units(model))
    records = _unit_records(header["units"], layers, header["arch"]["name"])
    payload = _Payload(data)
    shared: _Shared = {}
    for rec in records:
        path = rec["path"]
        where = f"artifact unit {path!r}"
        unit = _build_unit(rec["spec"], layers[path], where)
        with _as_corrupt(f"{where} spec"):
            expected = export_unit(unit)  # exactly the streams the encoder writes for this spec
        streams = _keys(rec["streams"], set(expected), f"{where} streams", noun="stream")
        tensors, masks = {}, {}
        for key, meta in streams.items():  # in header order: the order of the blobs
            tensors[key], kept = _unit_stream(
                meta, expected[key], payload, shared, f"{where} stream {key!r}"
            )
            if kept is not None:
                masks[key] = kept
        with _as_corrupt(where):
            load_unit(unit, tensors, masks)
        replace_module(model, path, unit)
    payload.finish()
    tensors_left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if tensors_left:
        raise _corrupt(
            "artifact units", f"tensor {tensors_left[0]!r} of the architecture is in no unit"
        )
    return model, spec


def save_artifact(
    model: nn.Module, path: str | Path, *, spec: InputSpec | DataSpec | None = None
) -> int:
    """Write ``encode(model, spec=spec)`` to ``path``; return its size in bytes."""
    data = encode(model, spec=spec)
    Path(path).write_bytes(data)
    return len(data)


def load_artifact(path: str | Path, device: torch.device | str = "cpu") -> nn.Module:
    """Read and decode an artifact file: the model (eval mode) with ``model.input_spec`` and
    ``model.predict_uint8(images)`` (see :func:`decode`)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"artifact {p} does not exist")
    return decode(p.read_bytes(), device)
