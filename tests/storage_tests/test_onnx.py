"""storage.onnx_export: artifacts of the trial path run in onnxruntime as the decoded model does,
on uint8 images as stored; compressed representations stay compressed in the ONNX file;
``predict_uint8`` reaches the evaluation's accuracy; ``search.apply --onnx``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models.train import evaluate_split
from objectives.pipeline import Workbench, finish, prepare
from spaces.plan import Plan
from storage.codec import InputSpec, decode, encode, load_artifact
from storage.onnx_export import DENSE, METADATA_KEY, _round_e4m3, onnx_bytes

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

CPU = torch.device("cpu")


def _plan(*steps: tuple[str, dict]) -> Plan:
    return Plan.from_dict({"steps": [{"technique": t, "config": c} for t, c in steps]})


# name -> (plan, the storage its compressed layers must get in the ONNX file, quantized inputs)
PLANS: dict[str, tuple[Plan, str, bool]] = {
    "fp32": (_plan(), DENSE, False),
    "prune+int8": (
        _plan(("prune", {"sparsity": 0.5}), ("int", {"bits": 8})),
        "int8 DequantizeLinear (int8",
        False,
    ),
    "int4-asymmetric": (
        _plan(("int", {"bits": 4, "symmetric": False})),
        "uint8 DequantizeLinear (int4",
        False,
    ),
    "int3-per-tensor": (
        _plan(("int", {"bits": 3, "per_channel": False})),
        "int8 DequantizeLinear (int3",
        False,
    ),
    "prune+kmeans": (
        _plan(("prune", {"sparsity": 0.7}), ("codebook", {"clusters": 16})),
        "uint8 indices + Gather",
        False,
    ),
    "binary": (_plan(("binary", {})), "int8 DequantizeLinear (binary", False),
    "fp16": (_plan(("float", {"format": "fp16"})), "fp16 Cast", False),
    "prune+fp8": (
        _plan(("prune", {"sparsity": 0.5}), ("float", {"format": "fp8_e4m3"})),
        "float8e4m3fn DequantizeLinear",
        False,
    ),
    # Low-rank factors (a bias-free linear factor becomes a MatMul) with int8 inputs.
    "lowrank+int8+act-int8": (
        _plan(
            ("lowrank", {"rank_ratio": 0.5}), ("int", {"bits": 8}), ("actquant", {"format": "int8"})
        ),
        "int8 DequantizeLinear (int8",
        True,
    ),
    "structured+act-fp8": (
        _plan(("structured", {"ratio": 0.3}), ("actquant", {"format": "fp8"})),
        DENSE,
        True,
    ),
}


@pytest.fixture(scope="module")
def artifacts(digits_baseline) -> dict[str, bytes]:
    """The artifact of each plan through the trial path (prepare, finish; no fine-tune)."""
    d = digits_baseline
    bench = Workbench(
        d.preset, d.data, d.fresh(), d.record, len(encode(d.model, spec=d.data.spec)), CPU, 0
    )
    return {
        name: finish(bench, prepare(bench, plan, 0), epochs=0).artifact
        for name, (plan, _, _) in PLANS.items()
    }


@pytest.fixture(scope="module")
def exported(artifacts) -> dict[str, tuple[bytes, dict[str, str]]]:
    return {name: onnx_bytes(decode(blob)) for name, blob in artifacts.items()}


def _logits(model: torch.nn.Module, images: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(model.input_spec.normalize(images)).numpy()


@pytest.mark.parametrize("name", list(PLANS))
def test_onnx_predicts_as_the_decoded_model(
    name: str, artifacts, exported, digits_baseline
) -> None:
    x = digits_baseline.data.x_test
    model = decode(artifacts[name])
    assert model.input_spec == InputSpec.of(digits_baseline.data.spec)  # the trial path records it
    session = ort.InferenceSession(exported[name][0], providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": x.numpy()})[0]  # uint8 images as stored
    want = _logits(model, x)
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.999
    close = np.abs(got - want).max(1) <= 1e-4 * np.maximum(1.0, np.abs(want).max(1))
    if not PLANS[name][2]:
        assert close.all(), np.abs(got - want).max()  # an fp32 graph: fp32 rounding only
    else:
        # A quantized input within an ulp of a rounding boundary may land on the neighbouring
        # level when ONNX Runtime sums in another order: a few images move by about one step.
        assert close.mean() >= 0.95 and np.abs(got - want).max() <= 0.25, np.abs(got - want).max()


@pytest.mark.parametrize("name", list(PLANS))
def test_compressed_weights_stay_compressed_in_the_onnx_file(name: str, exported) -> None:
    data, storage = exported[name]
    expected = PLANS[name][1]
    # The first and last layers are protected (int8 for low-bit representations).
    inner = {
        path: label for path, label in storage.items() if path.split(".")[0] not in ("conv1", "fc2")
    }
    assert inner and all(label.startswith(expected) for label in inner.values()), storage
    weights = [i for i in onnx.load_from_string(data).graph.initializer if len(i.dims) >= 2]
    dense_bytes = sum(
        4 * int(np.prod(i.dims)) for i in weights if i.data_type == onnx.TensorProto.FLOAT
    )
    if expected == DENSE:
        assert all(label == DENSE for label in storage.values())
    else:  # the conv and linear weights are held in 1 or 2 bytes, except a few fp32 codebooks
        assert dense_bytes < 0.05 * len(data), (dense_bytes, len(data))


def test_onnx_input_output_and_metadata(exported, digits_baseline) -> None:
    model = onnx.load_from_string(exported["prune+int8"][0])
    (inp,), (out,) = model.graph.input, model.graph.output
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim] == [
        "batch",
        1,
        8,
        8,
    ]
    assert out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert model.opset_import[0].version >= 17
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta[METADATA_KEY]) == InputSpec.of(digits_baseline.data.spec).to_json()


@pytest.mark.parametrize("name", ["fp32", "prune+int8", "binary", "structured+act-fp8"])
def test_predict_uint8_reaches_the_evaluated_accuracy(
    name: str, artifacts, digits_baseline
) -> None:
    data = digits_baseline.data
    model = decode(artifacts[name])
    predicted = model.predict_uint8(data.x_test)
    accuracy = int((predicted == data.y_test).sum()) / len(data.y_test)
    assert accuracy == pytest.approx(evaluate_split(model, data, "test"), abs=1e-9)
    # N x H x W images, as a numpy array
    assert torch.equal(model.predict_uint8(data.x_test[:, 0].numpy()), predicted)
    if name in ("fp32", "prune+int8"):
        assert accuracy >= 0.95


def test_round_e4m3_is_the_float8_cast_ties_included() -> None:
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[grid.isfinite() & (grid >= 0)].sort().values
    v = torch.cat(
        [
            grid,
            (grid[1:] + grid[:-1]) / 2,
            torch.linspace(0, 448, 200_001),
            torch.rand(20_000) * 2**-5,
        ]
    )
    v = torch.cat([v, -v])
    assert torch.equal(_round_e4m3(v), v.to(torch.float8_e4m3fn).float())


# -------------------------------------------------------------------------------- the CLI


def test_apply_onnx_writes_the_model_beside_the_artifact(
    tmp_path: Path, capsys, digits_baseline
) -> None:
    from search import apply as apply_cli

    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"steps": [{"technique": "int", "config": {"bits": 4}}]}))
    out = tmp_path / "model.pcz"
    assert (
        apply_cli.main(
            [
                str(plan),
                "--preset",
                "digits",
                "--epochs",
                "0",
                "--out",
                str(out),
                "--onnx",
                "--store",
                str(tmp_path / "store"),
                "--data-dir",
                str(tmp_path),
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["onnx"] == str(tmp_path / "model.onnx")
    assert any(
        label.startswith("int8 DequantizeLinear (int4") for label in summary["onnx_layers"].values()
    )
    model = load_artifact(out)
    assert model.input_spec == InputSpec.of(digits_baseline.data.spec)
    x = digits_baseline.data.x_test
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": x.numpy()})[0]
    assert np.array_equal(got.argmax(1), model.predict_uint8(x).numpy())


def test_apply_onnx_refuses_an_onnx_out_before_any_work(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    from search import apply as apply_cli

    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"steps": []}))

    def no_work(*args, **kwargs):
        raise AssertionError("the workbench must not load")

    monkeypatch.setattr(apply_cli, "rebuild", no_work)
    with pytest.raises(SystemExit) as info:
        apply_cli.main(
            [str(plan), "--preset", "digits", "--out", str(tmp_path / "m.onnx"), "--onnx"]
        )
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --out ") and "ends in .onnx" in err and "\n" not in err
