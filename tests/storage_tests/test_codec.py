"""storage.codec: bit packing, sparse positions, exact sizes, corrupt input, exact round trips."""

from __future__ import annotations

import json
import math
import struct
import zlib

import numpy as np
import pytest
import torch
import zstandard
from torch import nn

from models.errors import UserError
from models.registry import create_model, get_model_info
from spaces.intk import IntConfig
from spaces.plan import Plan, Step, apply_plan
from spaces.policy import LayerPolicy
from spaces.represent import compressed_layers
from storage.codec import (
    MAGIC,
    CorruptArtifactError,
    InputSpec,
    _relative_symbols,
    decode,
    decode_positions,
    encode,
    encode_positions,
    encode_with_report,
    pack_codes,
    unpack_codes,
)

FIXED_BYTES = 4 + 4 + 4  # magic, u32 header length, CRC-32


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return create_model(name).eval()


def _intk(model: nn.Module, bits: int, policy: LayerPolicy) -> nn.Module:
    plan = Plan((Step("int", IntConfig(bits=bits)),), policy=policy)
    applied = apply_plan(model, plan)
    applied.finalize()
    return model.eval()


def _pruned(model: nn.Module, sparsity: float) -> nn.Module:
    for _, layer in compressed_layers(model):
        w = layer.weight.detach().abs()
        layer.set_mask(w > w.flatten().kthvalue(int(sparsity * w.numel())).values)
    return model


def _inputs(name: str, n: int = 2) -> torch.Tensor:
    spec = get_model_info(name).data_spec
    return torch.randn(n, spec.channels, spec.size, spec.size, generator=torch.Generator().manual_seed(0))


# --------------------------------------------------------------------------------- bit packing


@pytest.mark.parametrize("bits", [*range(1, 17), 24, 32])
def test_pack_unpack_round_trip(bits: int) -> None:
    rng = np.random.default_rng(bits)
    for n in (0, 1, 7, 8, 9, 13, 64, int(rng.integers(100, 5000))):
        codes = rng.integers(0, 2**bits, size=n, dtype=np.uint64)
        blob = pack_codes(codes, bits)
        assert len(blob) == math.ceil(n * bits / 8)
        assert np.array_equal(unpack_codes(blob, bits, n), codes.astype(np.int64))


def test_pack_refuses_codes_wider_than_bits() -> None:
    with pytest.raises(ValueError, match="exceeds 3 bits"):
        pack_codes(np.array([8]), 3)


# ----------------------------------------------------------------------------------- positions


def _smallest_raw_encoding(mask: np.ndarray) -> int:
    positions = np.flatnonzero(mask)
    sizes = [math.ceil(mask.size / 8)]
    if len(positions):
        sizes += [len(pack_codes(_relative_symbols(positions, b), b)) for b in range(1, 17)]
    return min(sizes)


@pytest.mark.parametrize(("density", "expected"), [(0.003, "relative"), (0.05, "relative"), (0.5, "bitmap"), (0.95, "bitmap")])
def test_positions_pick_the_smaller_encoding_and_invert(density: float, expected: str) -> None:
    rng = np.random.default_rng(0)
    mask = rng.random(20_000) < density
    mask[-1] = True  # a tie between a bitmap and 1-bit relative indices goes to the bitmap
    raw_blob, meta = encode_positions(mask, entropy=False)
    assert meta["pos"] == expected, meta
    assert len(raw_blob) == _smallest_raw_encoding(mask)
    assert np.array_equal(decode_positions(raw_blob, meta, mask.size), mask)
    # With zstd a bitmap and 1-bit relative indices (its complement) may swap places.
    blob, meta = encode_positions(mask, entropy=True)
    assert len(blob) <= len(raw_blob)
    assert np.array_equal(decode_positions(blob, meta, mask.size), mask)


@pytest.mark.parametrize("fill", [False, True])
def test_positions_of_empty_and_full_masks(fill: bool) -> None:
    mask = np.full((30, 7), fill)
    blob, meta = encode_positions(mask)
    assert np.array_equal(decode_positions(blob, meta, mask.size), mask.ravel())


def test_relative_indices_escape_long_gaps() -> None:
    # bits=2: the escape symbol 3 skips 3 positions; gap 6 before position 7 is two escapes.
    assert _relative_symbols(np.array([0, 7]), 2).tolist() == [0, 3, 3, 0]
    assert _relative_symbols(np.array([3]), 2).tolist() == [3, 0]  # gap a multiple of 3
    mask = np.zeros(300_000, dtype=bool)
    mask[:3000:3] = True
    mask[[250_000, 299_999]] = True  # a gap longer than 2**16 - 1: escapes at any width
    blob, meta = encode_positions(mask, entropy=False)
    assert meta["pos"] == "relative" and meta["symbols"] > mask.sum(), meta
    assert np.array_equal(decode_positions(blob, meta, mask.size), mask)


# ------------------------------------------------------------------------------ exact sizes


def _assert_layout(data: bytes, streams: int) -> None:
    assert data[:4] == MAGIC
    (header_len,) = struct.unpack("<I", data[4:8])
    assert len(data) == FIXED_BYTES + header_len + streams


def test_int4_lenet300_size_follows_from_the_format() -> None:
    model = _intk(_model("lenet300"), 4, LayerPolicy(keep_first=False, keep_last=False))
    data, report = encode_with_report(model, entropy=False)
    # Per layer: packed 4-bit codes, one fp32 scale per output channel, fp32 bias.
    expected = {
        "fc1": 784 * 300 // 2 + 300 * 4 + 300 * 4,
        "fc2": 300 * 100 // 2 + 100 * 4 + 100 * 4,
        "fc3": 100 * 10 // 2 + 10 * 4 + 10 * 4,
    }
    assert {k: v for k, v in report.items() if k != "(header)"} == expected
    _assert_layout(data, sum(expected.values()))


def test_protected_layers_are_stored_at_int8() -> None:
    model = _intk(_model("lenet300"), 4, LayerPolicy(max_share=1.0))  # protect the ends whatever their size
    data, report = encode_with_report(model, entropy=False)
    expected = {"fc1": 784 * 300 + 300 * 8, "fc2": 300 * 100 // 2 + 100 * 8, "fc3": 100 * 10 + 10 * 8}
    assert {k: v for k, v in report.items() if k != "(header)"} == expected
    _assert_layout(data, sum(expected.values()))


@pytest.mark.parametrize("name", ["lenet300", "resnet_mini"])
def test_fp32_size_is_four_bytes_per_tensor_element(name: str) -> None:
    model = _model(name)
    elements = sum(t.numel() for t in model.parameters())
    elements += sum(t.numel() for k, t in model.named_buffers() if not k.endswith("num_batches_tracked"))
    data, report = encode_with_report(model)
    assert sum(v for k, v in report.items() if k != "(header)") == 4 * elements  # floats stay raw
    assert 4 * elements < len(data) <= 1.01 * 4 * elements


def test_entropy_coding_never_grows_an_artifact() -> None:
    for model in (_intk(_model("lenet300"), 2, LayerPolicy(keep_first=False, keep_last=False)),
                  _pruned(_model("lenet300"), 0.7)):
        assert len(encode(model)) <= len(encode(model, entropy=False))
        x = _inputs("lenet300")
        assert torch.equal(decode(encode(model, entropy=False))(x), decode(encode(model))(x))


# ---------------------------------------------------------------------------- corrupt input


def _with_crc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


def _with_header(header: object) -> bytes:
    z = zstandard.ZstdCompressor().compress(json.dumps(header).encode())
    return _with_crc(MAGIC + struct.pack("<I", len(z)) + z)


def _corruptions(data: bytes) -> dict[str, bytes]:
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x40
    good_header = json.loads(zstandard.ZstdDecompressor().decompress(data[8 : 8 + struct.unpack("<I", data[4:8])[0]]))
    bad_unit = json.loads(json.dumps(good_header))
    bad_unit["units"][0]["spec"]["type"] = "NoSuchLayer"
    class_path = json.loads(json.dumps(good_header))
    class_path["units"][0]["path"] = "__class__"
    return {
        "flipped byte": bytes(flipped),
        "truncated": data[: len(data) // 3],
        "wrong magic": b"PK\x03\x04" + data[4:],
        "random bytes": np.random.default_rng(0).bytes(4096),
        "empty": b"",
        "header not an object": _with_header([1, 2, 3]),
        "header without arch": _with_header({"format": 1, "units": []}),
        "unknown layer type": _with_header(bad_unit),
        "no units": _with_header({**good_header, "units": []}),
        "unit path __class__": _with_header(class_path),
        "header length past the end": _with_crc(MAGIC + struct.pack("<I", 10**9) + b"\x00" * 32),
    }


def test_corrupt_artifacts_raise_one_clear_error() -> None:
    data = encode(_intk(_model("lenet300"), 4, LayerPolicy()))
    for what, bad in _corruptions(data).items():
        with pytest.raises(CorruptArtifactError) as info:
            decode(bad)
        assert isinstance(info.value, UserError), what
        assert "\n" not in str(info.value) and str(info.value), what


def test_unregistered_module_with_parameters_is_refused() -> None:
    model = _model("lenet300")
    model.relu1 = nn.PReLU()
    with pytest.raises(UserError, match=r"relu1.*PReLU"):
        encode(model)


# ------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("name", ["lenet300", "resnet_mini", "mobilenetv2"])
def test_fp32_round_trip_reproduces_logits_exactly(name: str) -> None:
    model = _model(name)
    x = _inputs(name)
    with torch.no_grad():
        assert torch.equal(decode(encode(model))(x), model(x))


def test_a_fully_pruned_layer_round_trips() -> None:
    model = _pruned(_model("lenet300"), 0.7)
    model.fc3.set_mask(torch.zeros_like(model.fc3.mask))  # no values stored at all
    decoded = decode(encode(model))
    x = _inputs("lenet300")
    with torch.no_grad():
        assert torch.equal(decoded(x), model(x))
    assert not decoded.fc3.mask.any()


def test_pruned_int4_round_trip_reproduces_logits_and_masks() -> None:
    model = _intk(_pruned(_model("lenet300"), 0.7), 4, LayerPolicy())
    decoded = decode(encode(model))
    x = _inputs("lenet300")
    with torch.no_grad():
        assert torch.equal(decoded(x), model(x))
    assert torch.equal(decoded.fc2.mask, model.fc2.mask)


# -------------------------------------------------------------------------------- input spec

DIGITS_INPUT = InputSpec(1, 8, 8, (0.3053,), (0.3759,), 10, tuple("0123456789"))


def _header(data: bytes) -> dict:
    return json.loads(
        zstandard.ZstdDecompressor().decompress(data[8 : 8 + struct.unpack("<I", data[4:8])[0]])
    )


def _reheadered(data: bytes, header: dict) -> bytes:
    """``data`` with another header, its blobs kept (a valid checksum: only the decoder's checks
    stand between the header and the model)."""
    payload = data[8 + struct.unpack("<I", data[4:8])[0] : -4]
    z = zstandard.ZstdCompressor().compress(json.dumps(header).encode())
    return _with_crc(MAGIC + struct.pack("<I", len(z)) + z + payload)


def test_input_spec_round_trips_and_counts_in_the_size() -> None:
    model = _model("digits_cnn")
    plain, specced = encode(model), encode(model, spec=DIGITS_INPUT)
    assert _header(plain)["format"] == 1 and "input" not in _header(plain)  # as before specs
    assert _header(specced)["format"] == 2
    assert 0 < len(specced) - len(plain) < 200  # a few dozen bytes of header
    decoded = decode(specced)
    assert decoded.input_spec == DIGITS_INPUT
    assert encode(decoded) == specced  # a decoded model keeps its spec when encoded again
    assert decode(plain).input_spec is None
    spec = get_model_info("digits_cnn").data_spec  # a dataset's DataSpec: no class names
    assert decode(encode(model, spec=spec)).input_spec == InputSpec(
        1, 8, 8, spec.mean, spec.std, 10, None
    )


def test_predict_uint8_normalises_as_training_does() -> None:
    model = decode(encode(_model("digits_cnn"), spec=DIGITS_INPUT))
    images = torch.randint(
        0, 256, (5, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    x = (images.float() / 255 - 0.3053) / 0.3759
    with torch.no_grad():
        assert torch.equal(model.predict_uint8(images), model(x).argmax(1))
    assert torch.equal(model.predict_uint8(images[:, 0].numpy()), model.predict_uint8(images))
    with pytest.raises(UserError, match="uint8"):
        model.predict_uint8(images.float())
    with pytest.raises(UserError, match=r"this model takes \(N, 1, 8, 8\)"):
        model.predict_uint8(torch.zeros(2, 1, 9, 9, dtype=torch.uint8))
    with pytest.raises(UserError, match="no input spec"):
        decode(encode(_model("digits_cnn"))).predict_uint8(images)
    with pytest.raises(UserError, match="3 channels"):
        encode(_model("digits_cnn"), spec=InputSpec(3, 8, 8, (0.0,) * 3, (1.0,) * 3, 10))


def _spec_corruptions(header: dict) -> dict[str, tuple[dict, str]]:
    """Header edits -> the field the error must name."""

    def edit(**fields: object) -> dict:
        h = json.loads(json.dumps(header))
        h["input"].update(fields)
        return h

    no_input = {k: v for k, v in header.items() if k != "input"}
    return {
        "input missing": (no_input, "field 'input' is missing"),
        "input in format 1": ({**header, "format": 1}, 'unknown field "input"'),
        "format true": ({**header, "format": True}, "format true is not supported"),
        "input not an object": ({**header, "input": [1]}, "artifact input: expected a JSON object"),
        "unknown key": (edit(extra=1), 'artifact input: unknown field "extra"'),
        "shape of two": (edit(shape=[1, 8]), "artifact input.shape"),
        "channels": (edit(shape=[3, 8, 8]), "artifact input.shape[0]: 3 channels"),
        "height zero": (edit(shape=[1, 0, 8]), "artifact input.shape[1]"),
        "width huge": (edit(shape=[1, 8, 10**12]), "artifact input.shape[2]"),
        "height a float": (edit(shape=[1, 8.0, 8]), "artifact input.shape[1]"),
        "mean too long": (edit(mean=[0.1, 0.2]), "artifact input.mean: expected a list of 1"),
        "mean a string": (edit(mean=["0.3"]), "artifact input.mean[0]"),
        "mean an int": (edit(mean=[0]), "artifact input.mean[0]"),
        "mean huge": (edit(mean=[1e300]), "artifact input.mean[0]"),
        "std zero": (edit(std=[0.0]), "artifact input.std[0]"),
        "std negative": (edit(std=[-0.5]), "artifact input.std[0]"),
        "classes": (edit(num_classes=11), "artifact input.num_classes: 11 classes"),
        "classes a bool": (edit(num_classes=True), "artifact input.num_classes"),
        "names short": (edit(class_names=["a"]), "artifact input.class_names"),
        "names not strings": (edit(class_names=list(range(10))), "artifact input.class_names[0]"),
        "name empty": (edit(class_names=["", *"123456789"]), "artifact input.class_names[0]"),
        "name too long": (
            edit(class_names=["x" * 1000, *"123456789"]),
            "artifact input.class_names[0]",
        ),
    }


def test_a_corrupt_input_spec_is_refused_naming_the_field() -> None:
    data = encode(_model("digits_cnn"), spec=DIGITS_INPUT)
    for what, (header, field) in _spec_corruptions(_header(data)).items():
        with pytest.raises(CorruptArtifactError) as info:
            decode(_reheadered(data, header))
        assert field in str(info.value), (what, str(info.value))
        assert "\n" not in str(info.value), what
    assert (
        decode(_reheadered(data, _header(data))).input_spec == DIGITS_INPUT
    )  # the edits alone fail
