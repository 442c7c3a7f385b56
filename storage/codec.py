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
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zstandard
from torch import Tensor, nn

import spaces  # noqa: F401  (registers every technique's layer types and components)
from models.errors import UserError
from models.registry import create_model, model_arch
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
FORMAT_VERSION = 1
_ZSTD_LEVEL = 9
_SKIP_BUFFERS = ("num_batches_tracked",)  # bookkeeping, not needed for inference


class CorruptArtifactError(UserError):
    """The bytes are not a valid artifact (truncated, corrupted, or another format)."""


# ------------------------------------------------------------------------------------ blobs


def _maybe_zstd(raw: bytes, entropy: bool = True) -> tuple[bytes, str]:
    if not entropy or len(raw) < 64:
        return raw, "raw"
    packed = zstandard.ZstdCompressor(level=_ZSTD_LEVEL).compress(raw)
    return (packed, "zstd") if len(packed) < len(raw) else (raw, "raw")


def _unzstd(blob: bytes, enc: str) -> bytes:
    if enc == "raw":
        return blob
    if enc == "zstd":
        return zstandard.ZstdDecompressor().decompress(blob)
    raise CorruptArtifactError(f"unknown blob encoding {enc!r}")


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
    """Inverse of :func:`pack_codes`."""
    if bits == 8:
        return np.frombuffer(blob, dtype=np.uint8, count=n).astype(np.int64)
    flat = np.unpackbits(np.frombuffer(blob, dtype=np.uint8), count=n * bits, bitorder="little")
    weights = (1 << np.arange(bits, dtype=np.int64))
    return flat.reshape(n, bits).astype(np.int64) @ weights


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


def decode_positions(blob: bytes, meta: dict[str, Any], numel: int) -> np.ndarray:
    """Inverse of :func:`encode_positions`: the bool mask, flat."""
    raw = _unzstd(blob, meta["pos_enc"])
    if meta["pos"] == "bitmap":
        return np.unpackbits(np.frombuffer(raw, dtype=np.uint8), count=numel, bitorder="little").astype(bool)
    symbols = unpack_codes(raw, meta["pos_bits"], meta["symbols"])
    mask = np.zeros(numel, dtype=bool)
    mask[_positions_from_symbols(symbols, meta["pos_bits"])] = True
    return mask


# ---------------------------------------------------------------------------------- streams


def _value_bytes(stream: Stream, kept: Tensor | None) -> bytes:
    t = stream.tensor.reshape(-1)
    if kept is not None:
        t = t[kept.reshape(-1)]
    if stream.kind == "codes":
        return pack_codes(t.to(torch.int64).numpy(), stream.bits)
    return t.to(FLOAT_DTYPES[stream.dtype]).contiguous().view(torch.uint8).numpy().tobytes()


def _values_from_bytes(raw: bytes, meta: dict[str, Any], n: int) -> Tensor:
    if meta["kind"] == "codes":
        return torch.from_numpy(unpack_codes(raw, meta["bits"], n))
    dtype = FLOAT_DTYPES[meta["dtype"]]
    u8 = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    return u8.view(dtype)[:n].float()


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


def encode_with_report(model: nn.Module, entropy: bool = True) -> tuple[bytes, dict[str, int]]:
    """Encode ``model``; also return the bytes of each unit's blobs and of the header.

    ``entropy=False`` stores every blob raw (no zstd), so that sizes follow from the format
    alone (tests, measuring what entropy coding gains); the header is zstd-compressed always.
    """
    units = list(iter_units(model))
    _check_covered(model, [p for p, _ in units])
    writer = _Writer(entropy=entropy)
    records, breakdown = [], {}
    for path, unit in units:
        before = writer.offset
        streams = {k: writer.stream(s) for k, s in export_unit(unit).items()}
        records.append({"path": path, "spec": layer_spec(unit), "streams": streams})
        breakdown[path] = writer.offset - before
    header = {"format": FORMAT_VERSION, "arch": model_arch(model), "units": records}
    header_z = zstandard.ZstdCompressor(level=19).compress(json.dumps(header, separators=(",", ":")).encode())
    body = MAGIC + struct.pack("<I", len(header_z)) + header_z + b"".join(writer.blobs)
    data = body + struct.pack("<I", zlib.crc32(body))
    breakdown["(header)"] = len(data) - writer.offset
    return data, breakdown


def encode(model: nn.Module, entropy: bool = True) -> bytes:
    """The compressed artifact of ``model`` (see module doc; ``entropy`` as in
    :func:`encode_with_report`)."""
    return encode_with_report(model, entropy)[0]


def encoded_size(model: nn.Module) -> int:
    """``len(encode(model))``: the one definition of a model's size."""
    return len(encode(model))


def _read_header(data: bytes) -> tuple[dict[str, Any], memoryview]:
    if len(data) < len(MAGIC) + 8 or data[: len(MAGIC)] != MAGIC:
        raise CorruptArtifactError("not a pareto-compress artifact (bad magic); expected a .pcz file written by storage.codec.encode")
    (crc,) = struct.unpack("<I", data[-4:])
    if zlib.crc32(data[:-4]) != crc:
        raise CorruptArtifactError(f"artifact is corrupt or truncated ({len(data)} bytes, checksum mismatch); re-export it")
    (hlen,) = struct.unpack("<I", data[4:8])
    try:
        header = json.loads(zstandard.ZstdDecompressor().decompress(data[8 : 8 + hlen]))
    except (zstandard.ZstdError, ValueError) as exc:
        raise CorruptArtifactError(f"artifact header is unreadable: {exc}") from None
    if not isinstance(header, dict):
        raise CorruptArtifactError("artifact header is not a JSON object; re-export it")
    if header.get("format") != FORMAT_VERSION:
        raise CorruptArtifactError(f"artifact format {header.get('format')} is not supported (expected {FORMAT_VERSION})")
    return header, memoryview(data)[8 + hlen : -4]


def _read_stream(meta: dict[str, Any], payload: memoryview, shared: dict[str, dict[str, Any]]) -> tuple[Tensor, Tensor | None]:
    if "ref" in meta:
        meta = shared[meta["ref"]]
    elif "share" in meta:
        shared[meta["share"]] = meta
    shape, numel = meta["shape"], int(np.prod(meta["shape"], dtype=np.int64))
    start, length = meta["span"]
    values = _values_from_bytes(_unzstd(bytes(payload[start : start + length]), meta["enc"]), meta, meta["n"])
    if "pos" not in meta:
        return values.reshape(shape), None
    ps, pl = meta["pos_span"]
    kept = torch.from_numpy(decode_positions(bytes(payload[ps : ps + pl]), meta, numel))
    full = torch.zeros(numel, dtype=values.dtype)
    full[kept] = values
    return full.reshape(shape), kept.reshape(shape)


# A header that passes the checksum can still be wrong (a bug, a hand-edited file): whatever
# rebuilding it raises is reported as a corrupt artifact, never as a traceback from inside.
_DECODE_ERRORS = (KeyError, IndexError, ValueError, RuntimeError, TypeError, AttributeError, zstandard.ZstdError)


def decode(data: bytes, device: torch.device | str = "cpu") -> nn.Module:
    """Rebuild the model encoded in ``data`` (eval mode, on ``device``)."""
    header, payload = _read_header(data)
    try:
        model = _rebuild(header, payload)
    except _DECODE_ERRORS as exc:
        detail = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        raise CorruptArtifactError(f"artifact does not match its header ({detail}); re-export it") from None
    return model.to(device).eval()


def _rebuild(header: dict[str, Any], payload: memoryview) -> nn.Module:
    arch = header["arch"]
    model = create_model(arch["name"], num_classes=arch["num_classes"], in_channels=arch["in_channels"])
    shared: dict[str, dict[str, Any]] = {}
    tied: dict[str, nn.Parameter] = {}
    for rec in header["units"]:
        unit = build_layer(rec["spec"])
        tensors, masks = {}, {}
        for key, meta in rec["streams"].items():
            share = meta.get("ref") or meta.get("share")
            t, kept = _read_stream(meta, payload, shared)
            if share is not None:
                t = tied.setdefault(share, nn.Parameter(t, requires_grad=t.is_floating_point()))
            tensors[key] = t
            if kept is not None:
                masks[key] = kept
        load_unit(unit, tensors, masks)
        replace_module(model, rec["path"], unit)
    return model


def save_artifact(model: nn.Module, path: str | Path) -> int:
    """Write ``encode(model)`` to ``path``; return its size in bytes."""
    data = encode(model)
    Path(path).write_bytes(data)
    return len(data)


def load_artifact(path: str | Path, device: torch.device | str = "cpu") -> nn.Module:
    """Read and decode an artifact file."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"artifact {p} does not exist")
    return decode(p.read_bytes(), device)
