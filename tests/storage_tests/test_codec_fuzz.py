"""storage.codec against hostile files: real artifacts of a tiny model, mutated.

Byte damage, header edits (re-compressed and re-checksummed so that they reach the parser),
huge shapes, emptied or duplicated units, paths such as ``__class__`` and zstd bombs. Every
mutated file either decodes to a model with the original logits or raises
``CorruptArtifactError``, never another exception, and decoding it allocates less than
``MEMORY_LIMIT``. The regression tests at the end are the escapes a user reported.
"""

from __future__ import annotations

import copy
import functools
import json
import struct
import tracemalloc
import zlib
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from models.registry import create_model
from spaces.actquant import ActQuantConfig
from spaces.binary import BinaryConfig
from spaces.codebook import CodebookConfig
from spaces.floats import FloatConfig
from spaces.intk import IntConfig
from spaces.lowrank import LowRankConfig
from spaces.plan import Plan, Step, apply_plan
from spaces.policy import LayerPolicy
from spaces.prune import PruneConfig
from spaces.registry import ApplyContext
from spaces.structured import StructuredConfig
from storage.codec import MAGIC, CorruptArtifactError, decode, encode

# digits_cnn is 0.75 MB in dense fp32 and the codec's documented bound for it is under 10 MB
# (tensors at most 6x dense, working memory of one stream, a header of at most 2 MiB). The
# probe counts every torch storage ever created during a decode, not only the live ones, so the
# limit leaves room; the allocations users reported (0.8 GB, 1.2 GB) exceed it more than tenfold.
MEMORY_LIMIT = 64 << 20
FUZZ = settings(
    max_examples=50,
    deadline=None,
    derandomize=True,  # the same examples on every run: a failure reproduces
    database=None,  # nothing written into the repository
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# Spec fields that shape no tensor: an edit makes another valid model, which may decode.
TRUSTED_FIELDS = {
    "stride",
    "padding",
    "dilation",
    "padding_mode",
    "eps",
    "momentum",
    "clip",
    "format",
    "signed",
}

_STEPS: dict[str, tuple[Step, ...]] = {
    "prune+int4": (Step("prune", PruneConfig(sparsity=0.7)), Step("int", IntConfig(bits=4))),
    "prune+global codebook": (
        Step("prune", PruneConfig(sparsity=0.5)),
        Step("codebook", CodebookConfig(clusters=8, scope="global")),
    ),
    "lowrank+fp16": (
        Step("lowrank", LowRankConfig(rank_ratio=0.3)),
        Step("float", FloatConfig(format="fp16")),
    ),
    "structured+binary+actquant": (
        Step("structured", StructuredConfig(ratio=0.3)),
        Step("binary", BinaryConfig()),
        Step("actquant", ActQuantConfig()),
    ),
}


def _inputs() -> torch.Tensor:
    return torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))


@functools.cache
def _artifacts() -> dict[str, tuple[bytes, torch.Tensor]]:
    """name -> (artifact of digits_cnn compressed by that plan, its logits on ``_inputs()``)."""
    out = {}
    batches = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    for name, steps in _STEPS.items():
        torch.manual_seed(0)
        model = create_model("digits_cnn").eval()
        ctx = ApplyContext(policy=LayerPolicy(), calibration=lambda: iter([batches]))
        apply_plan(model, Plan(steps), ctx).finalize()
        data = encode(model.eval())
        with torch.no_grad():
            logits = model(_inputs())
            assert torch.equal(decode(data)(_inputs()), logits), name
        out[name] = (data, logits)
    return out


# ------------------------------------------------------------------------------ memory probe


class _TorchAllocations(TorchDispatchMode):
    """Bytes of the CPU tensor storages created under it, each counted once (torch's allocator
    is invisible to tracemalloc)."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0
        self._seen: set[tuple[int, int]] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN204
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key = (storage.data_ptr(), storage.nbytes())
                if key not in self._seen:
                    self._seen.add(key)
                    self.total += storage.nbytes()
        return out


def _measured(fn: Any) -> tuple[Any, int]:
    """``fn()`` (or the ``CorruptArtifactError`` it raised) and the bytes it allocated: the
    tracemalloc peak (Python objects, numpy arrays, zstd output) plus every torch storage."""
    with _TorchAllocations():  # its first use imports modules: not to be counted below
        torch.zeros(1)
    torch_bytes = _TorchAllocations()
    tracing = tracemalloc.is_tracing()
    if not tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    try:
        with torch_bytes:
            try:
                result = fn()
            except CorruptArtifactError as exc:
                result = exc
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        if not tracing:
            tracemalloc.stop()
    return result, peak + torch_bytes.total


def _decode_bounded(data: bytes) -> nn.Module | CorruptArtifactError:
    """``decode(data)`` or its ``CorruptArtifactError``; any other exception fails the test, and
    so does an allocation beyond ``MEMORY_LIMIT``."""
    result, used = _measured(lambda: decode(data))
    assert used < MEMORY_LIMIT, f"decoding allocated {used / 2**20:.0f} MiB"
    if isinstance(result, CorruptArtifactError):
        assert str(result) and "\n" not in str(result)
    return result


def test_memory_probe_sees_torch_and_numpy_allocations() -> None:
    import numpy as np

    _, used = _measured(lambda: torch.ones(4 << 20))  # 16 MiB in torch's allocator
    assert used >= 16 << 20
    _, used = _measured(lambda: np.ones(2 << 20))  # 16 MiB through numpy
    assert used >= 16 << 20
    assert _measured(lambda: torch.zeros(1 << 30, device="meta"))[1] < 1 << 20


# ----------------------------------------------------------------------------- file surgery


def _split(data: bytes) -> tuple[dict[str, Any], bytes]:
    (hlen,) = struct.unpack("<I", data[4:8])
    header = json.loads(zstandard.ZstdDecompressor().decompress(data[8 : 8 + hlen]))
    return header, data[8 + hlen : -4]


def _seal(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


def _join(header: dict[str, Any] | bytes, payload: bytes) -> bytes:
    """An artifact of ``header`` (JSON, or an already compressed frame) and ``payload``, with
    the checksum recomputed so that the parser sees the edit."""
    z = (
        header
        if isinstance(header, bytes)
        else zstandard.ZstdCompressor().compress(json.dumps(header).encode())
    )
    return _seal(MAGIC + struct.pack("<I", len(z)) + z + payload)


def _rle_frame(fill: int, size: int, tail: bytes = b"", declare: bool = True) -> bytes:
    """A zstd frame of ``size`` bytes ``fill`` then ``tail``, written by hand: each RLE block
    stands for 128 KiB with 4 bytes, so gigabytes fit in kilobytes."""
    block = 128 << 10
    # Frame header: magic, descriptor (an 8-byte content size or none), a 1 MiB window.
    out = [b"\x28\xb5\x2f\xfd", bytes([0xC0 if declare else 0x00]), bytes([10 << 3])]
    if declare:
        out.append(struct.pack("<Q", size + len(tail)))
    chunks = [(1, min(block, size - i), bytes([fill])) for i in range(0, size, block)]
    chunks += [
        (0, len(tail[i : i + block]), tail[i : i + block]) for i in range(0, len(tail), block)
    ]
    for j, (kind, n, content) in enumerate(chunks):
        last = int(j == len(chunks) - 1)
        out.append((last | kind << 1 | n << 3).to_bytes(3, "little") + content)
    return b"".join(out)


def test_hand_written_bombs_are_real_zstd_frames() -> None:
    bomb = _rle_frame(ord(" "), 300 << 20, tail=b'{"a": 1}')
    assert len(bomb) < 12_000
    assert zstandard.get_frame_parameters(bomb).content_size == (300 << 20) + 8
    reader = zstandard.ZstdDecompressor().stream_reader(bomb)
    assert reader.read(1 << 20) == b" " * (1 << 20)
    small = _rle_frame(0, 300_000, tail=b"end", declare=False)
    assert zstandard.ZstdDecompressor().decompressobj().decompress(small) == bytes(300_000) + b"end"


def _streams(header: dict[str, Any]) -> Iterator[tuple[dict[str, Any], str, dict[str, Any]]]:
    """(unit record, stream key, stream meta) of every stream, in the header's order."""
    for rec in header["units"]:
        for key, meta in rec["streams"].items():
            yield rec, key, meta


def _blobs(header: dict[str, Any], payload: bytes) -> list[tuple[dict[str, Any], str, bytes]]:
    """Every (stream meta, span field, blob) in payload order."""
    out = []
    for _, _, meta in _streams(header):
        for field in ("pos_span", "span"):
            if field in meta:
                start, length = meta[field]
                out.append((meta, field, payload[start : start + length]))
    return out


def _respan(blobs: list[tuple[dict[str, Any], str, bytes]]) -> bytes:
    """The payload of ``blobs`` with every span rewritten to where its blob now lies."""
    offset = 0
    for meta, field, blob in blobs:
        meta[field] = [offset, len(blob)]
        offset += len(blob)
    return b"".join(blob for _, _, blob in blobs)


# ------------------------------------------------------------------------------------- fuzz


@FUZZ
@given(
    name=st.sampled_from(sorted(_STEPS)),
    op=st.sampled_from(["flip", "truncate", "insert"]),
    where=st.floats(0.0, 1.0),
    value=st.integers(0, 255),
    reseal=st.booleans(),
)
def test_damaged_bytes_are_refused(
    name: str, op: str, where: float, value: int, reseal: bool
) -> None:
    data, logits = _artifacts()[name]
    body = bytearray(data[:-4])
    at = min(int(where * len(body)), len(body) - 1)
    if op == "flip":
        body[at] ^= value or 1
    elif op == "truncate":
        del body[at:]
    else:
        body[at:at] = bytes([value]) * (1 + value % 7)
    damaged = _seal(bytes(body)) if reseal else bytes(body) + data[-4:]
    result = _decode_bounded(damaged)
    if not reseal:  # the checksum catches any damage of this size
        assert isinstance(result, CorruptArtifactError)
    elif not isinstance(result, CorruptArtifactError):
        # A changed value byte with a valid checksum is another model of the same architecture.
        reference = decode(data)
        assert {k: v.shape for k, v in result.state_dict().items()} == {
            k: v.shape for k, v in reference.state_dict().items()
        }
        with torch.no_grad():
            assert result(_inputs()).shape == logits.shape


def _nodes(tree: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """The path of every node of a JSON tree (the root excluded)."""
    children = (
        tree.items()
        if isinstance(tree, dict)
        else enumerate(tree)
        if isinstance(tree, list)
        else ()
    )
    for key, child in children:
        yield (*path, key)
        yield from _nodes(child, (*path, key))


def _deep(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


_NASTY = [
    -1,
    0,
    1,
    7,
    2**31,
    2**63,
    2**70,
    200_000_000,
    2e8,
    1e308,
    -0.5,
    True,
    None,
    "",
    "x",
    "__class__",
    [],
    {},
    [2**70],
    [16000, 16000],
    {"ref": "global"},
    _deep(40),
]


@st.composite
def _header_edit(draw: Any, header: dict[str, Any]) -> tuple[str, set[str], dict[str, Any]]:
    """A description of an edit, the object keys on its path, and the edited copy of ``header``."""
    edited = copy.deepcopy(header)
    units = edited["units"]
    kind = draw(st.sampled_from(["value", "value", "delete", "add", "units", "shape", "path"]))
    if kind in ("value", "delete", "add"):
        path = draw(st.sampled_from(list(_nodes(edited))))
        *parent_path, key = path
        parent = functools.reduce(lambda node, k: node[k], parent_path, edited)
        old = parent[key]
        if kind == "value":
            derived = [old + 1, old - 1, old * 2] if type(old) is int else []
            new = draw(st.sampled_from(_NASTY + derived))
            parent[key] = new
            keys = {k for k in path if isinstance(k, str)}
            return f"{path} = {json.dumps(new)[:40]} (was {json.dumps(old)[:40]})", keys, edited
        if kind == "delete":
            del parent[key]
            return f"del {path}", set(), edited
        target = old if isinstance(old, dict) else parent if isinstance(parent, dict) else edited
        target[draw(st.sampled_from(["device", "extra", "dtype"]))] = draw(st.sampled_from(_NASTY))
        return f"key added at {path}", set(), edited
    if kind == "units":
        i, j = draw(st.integers(0, len(units) - 1)), draw(st.integers(0, len(units) - 1))
        op = draw(st.sampled_from(["empty", "drop", "duplicate", "swap"]))
        if op == "empty":
            units.clear()
        elif op == "drop":
            del units[i]
        elif op == "duplicate":
            units.insert(j, copy.deepcopy(units[i]))
        else:
            units[i], units[j] = units[j], units[i]
        return f"units: {op} {i} {j}", set(), edited
    if kind == "shape":
        _, key, meta = draw(st.sampled_from([s for s in _streams(edited) if "shape" in s[2]]))
        field = draw(st.sampled_from(["shape", "n", "nnz", "symbols", "bits", "span"]))
        meta[field] = draw(
            st.sampled_from([[2**70], [16000, 16000], 200_000_000, 2**70, -1, [0, 2**40]])
        )
        return f"stream {key!r} {field} = {meta[field]}", set(), edited
    rec = draw(st.sampled_from(units))
    rec["path"] = draw(
        st.sampled_from(
            ["__class__", "", "conv1.weight", "relu1", "fc1.first", *[u["path"] for u in units]]
        )
    )
    return f"path -> {rec['path']!r}", set(), edited


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # edits to 0 channels
@settings(FUZZ, max_examples=150)  # the edits that reach the parser: the most to explore
@given(name=st.sampled_from(sorted(_STEPS)), data=st.data())
def test_header_edits_are_refused_or_harmless(name: str, data: st.DataObject) -> None:
    artifact, logits = _artifacts()[name]
    header, payload = _split(artifact)
    what, keys, edited = data.draw(_header_edit(header), label="edit")
    result = _decode_bounded(_join(edited, payload))
    if isinstance(result, CorruptArtifactError) or keys & TRUSTED_FIELDS:
        return
    with torch.no_grad():
        assert torch.equal(result(_inputs()), logits), f"{what}: decoded to other logits"


@FUZZ
@given(
    name=st.sampled_from(sorted(_STEPS)),
    pick=st.floats(0.0, 1.0),
    size=st.sampled_from([300 << 20, 1 << 30]),
    declare=st.booleans(),
    as_zstd=st.booleans(),
)
def test_zstd_bombs_in_blobs_are_refused(
    name: str, pick: float, size: int, declare: bool, as_zstd: bool
) -> None:
    header, payload = _split(_artifacts()[name][0])
    blobs = _blobs(header, payload)
    meta, field, _ = blobs[min(int(pick * len(blobs)), len(blobs) - 1)]
    blobs = [
        (m, f, _rle_frame(0, size, declare=declare) if (m, f) == (meta, field) else b)
        for m, f, b in blobs
    ]
    if as_zstd:  # a raw blob turned into a bomb claims to be zstd
        meta["pos_enc" if field == "pos_span" else "enc"] = "zstd"
    result = _decode_bounded(_join(header, _respan(blobs)))
    assert isinstance(result, CorruptArtifactError)


def test_respanned_artifacts_still_decode() -> None:
    """The surgery helpers themselves: re-laying every blob keeps a valid artifact valid."""
    for data, logits in _artifacts().values():
        header, payload = _split(data)
        rebuilt = _join(header, _respan(_blobs(header, payload)))
        with torch.no_grad():
            assert torch.equal(decode(rebuilt)(_inputs()), logits)


# ------------------------------------------------------------------- reported escapes (#10)


def _int4() -> tuple[dict[str, Any], bytes]:
    return _split(_artifacts()["prune+int4"][0])


def _refused(data: bytes, match: str) -> str:
    result = _decode_bounded(data)
    assert isinstance(result, CorruptArtifactError), "decoded without an error"
    assert match in str(result), str(result)
    return str(result)


@pytest.mark.parametrize("path", ["extra", "fc1"])
def test_a_16000x16000_layer_is_refused_before_allocating(path: str) -> None:
    header, payload = _int4()
    bitmap = _rle_frame(0, 16000 * 16000 // 8)  # all pruned: 1 KB stands for 1 GB of fp32
    huge = {
        "path": path,
        "spec": {
            "type": "CLinear",
            "in_features": 16000,
            "out_features": 16000,
            "bias": False,
            "masked": True,
            "weight_repr": None,
            "act": None,
        },
        "streams": {
            "weight": {
                "kind": "float",
                "shape": [16000, 16000],
                "dtype": "f32",
                "pos": "bitmap",
                "pos_enc": "zstd",
                "pos_span": [len(payload), len(bitmap)],
                "nnz": 0,
                "enc": "raw",
                "span": [len(payload) + len(bitmap), 0],
                "n": 0,
            }
        },
    }
    if path == "extra":
        header["units"].append(huge)
    else:
        header["units"] = [huge if u["path"] == path else u for u in header["units"]]
    data = _join(header, payload + bitmap)
    assert len(data) < 50_000
    _refused(
        data,
        "'fc1' spec: its CLinear holds"
        if path == "fc1"
        else '"extra" names no layer of digits_cnn',
    )


def test_a_header_bomb_is_refused_before_decompressing() -> None:
    header, payload = _int4()
    # 800 MiB of JSON whitespace, then the real header: valid JSON, 25 KB compressed.
    bomb = _rle_frame(ord(" "), 800 << 20, tail=json.dumps(header).encode())
    data = _join(bomb, payload)
    assert len(data) < 100_000
    _refused(
        data, f"artifact header: zstd frame declares {(800 << 20) + len(json.dumps(header))} bytes"
    )


def test_an_empty_unit_list_is_refused() -> None:
    header, payload = _int4()
    header["units"] = []
    _refused(_join(header, payload), "layer(s) of digits_cnn missing (conv1, bn1,")


@pytest.mark.parametrize("replace", [True, False])
def test_a_unit_path_class_is_refused(replace: bool) -> None:
    header, payload = _int4()
    if replace:  # conv1's unit goes to model.__class__: conv1 would keep random weights
        header["units"][0]["path"] = "__class__"
    else:
        header["units"].append(
            {"path": "__class__", "spec": header["units"][1]["spec"], "streams": {}}
        )
    _refused(_join(header, payload), '"__class__" names no layer of digits_cnn')


def test_a_shape_of_2_70_is_refused() -> None:
    header, payload = _int4()
    header["units"][0]["streams"]["weight"]["shape"] = [2**70]
    message = _refused(
        _join(header, payload),
        "artifact unit 'conv1' stream 'weight': shape [1180591620717411303424]",
    )
    assert "does not match the [32, 1, 3, 3]" in message


def test_deeply_nested_json_is_refused() -> None:
    header, payload = _int4()
    text = json.dumps(header).replace('"units": [', '"units": ' + "[" * 100_000 + "[", 1)
    text = text[:-1] + "]" * 100_000 + "}"
    frame = zstandard.ZstdCompressor().compress(text.encode())
    _refused(_join(frame, payload), "levels deep (at most 32)")


def test_a_code_count_of_2e8_is_refused() -> None:
    header, payload = _int4()
    codes = next(m for _, _, m in _streams(header) if m.get("bits", 8) != 8)  # int4 codes
    codes["n"] = 200_000_000
    _refused(_join(header, payload), "n = 200000000 values, but its")
