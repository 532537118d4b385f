"""scripts/export.py: TorchScript and ONNX files from a checkpoint, each verified against the PyTorch model."""

import copy
import json
import subprocess
import sys

import onnx
import onnxruntime
import pytest
import torch
from conftest import REPO, TINY, run_train

from trainer.cli import export  # noqa: E402
from trainer.cli.config import build, model_from_checkpoint  # noqa: E402
from trainer.data import BatchTransform  # noqa: E402

MODELS = ("logistic", "mlp", "cnn")


@pytest.fixture(scope="module")
def runs(tiny_root, tmp_path_factory):
    """A few training steps of each model, the CNN channels_last as by default; one sweep pays the imports once."""
    sweep = tmp_path_factory.mktemp("export") / "sweep"
    result = run_train("-m", *TINY, f"dataset.root={tiny_root}", f"hydra.sweep.dir={sweep}",
                       "hydra.sweep.subdir=${hydra:runtime.choices.model}", "trainer.max_epochs=1",
                       "trainer.limit_train_batches=4", "scheduler=none", f"model={','.join(MODELS)}")
    assert result.returncode == 0, result.stderr
    return {m: sweep / m for m in MODELS}


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` with noise of 1e-3 on its first weight: logits move by about 1e-2."""
    wrong = copy.deepcopy(model)
    with torch.no_grad():
        first = next(wrong.parameters())
        first.add_(1e-3 * torch.randn(first.shape, generator=torch.Generator().manual_seed(0)))
    return wrong


@pytest.mark.parametrize("name", MODELS)
def test_exports_load_take_uint8_images_of_any_batch_size_and_match(runs, tiny_root, name, capsys):
    ckpt = runs[name] / "checkpoints" / "best.pt"
    assert export.main([str(ckpt), "--data-root", str(tiny_root)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in printed] == ["torchscript", "onnx"]
    assert all("201 test images" in line and "same prediction for 201/201" in line for line in printed), printed

    restored = model_from_checkpoint(ckpt)
    normalise = BatchTransform(restored.config.dataset.mean, restored.config.dataset.std)
    images = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8)  # not test images, and a new batch size
    with torch.inference_mode():
        want = restored.model(normalise(images))  # (5, 10)

    exports = runs[name] / "exports"
    assert sorted(p.name for p in exports.iterdir()) == ["best.onnx", "best.torchscript.pt"]  # no temporary files
    meta = {"meta.json": ""}
    with export.quiet_jit():
        scripted = torch.jit.load(exports / "best.torchscript.pt", _extra_files=meta)
    assert json.loads(meta["meta.json"])["classes"] == [str(d) for d in range(10)]
    for batch in (images, images[:1]):
        torch.testing.assert_close(scripted(batch), want[:len(batch)], atol=export.ATOL, rtol=export.RTOL)

    proto = onnx.load(exports / "best.onnx")
    (given,), (returned,) = proto.graph.input, proto.graph.output
    assert (given.name, returned.name) == ("images", "logits") and "uint8" in given.doc_string
    assert given.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [d.dim_param or d.dim_value for d in given.type.tensor_type.shape.dim] == ["batch", 1, 28, 28]
    assert json.loads({p.key: p.value for p in proto.metadata_props}["classes"])[9] == "9"
    session = onnxruntime.InferenceSession(exports / "best.onnx", providers=["CPUExecutionProvider"])
    for batch in (images, images[:1]):
        (logits,) = session.run(None, {"images": batch.numpy()})
        torch.testing.assert_close(torch.from_numpy(logits), want[:len(batch)], atol=export.ATOL, rtol=export.RTOL)


def test_verification_catches_an_export_of_a_different_model(runs, tiny_root, tmp_path, monkeypatch, capsys):
    ckpt = runs["cnn"] / "checkpoints" / "best.pt"
    restored = model_from_checkpoint(ckpt, data_root=tiny_root)
    data = build(restored.config.dataset, device="cpu", seed=restored.config.seed)
    model = export.Normalised(restored.model, restored.config.dataset.mean, restored.config.dataset.std)
    run = export.load_torchscript(export.to_torchscript(model, data.test.images[:2], meta={}))
    assert export.verify(run, restored.model, data.test, batches=2).ok
    caught = export.verify(run, perturbed(restored.model), data.test, batches=2)
    assert not caught.ok and caught.max_abs_diff > 10 * export.ATOL

    def exporting_a_perturbed_copy(model, example, meta):
        return export.to_onnx(perturbed(model), example, meta)

    monkeypatch.setitem(export.FORMATS, "onnx", (exporting_a_perturbed_copy, export.load_onnx, ".onnx"))
    args = [str(ckpt), "--format", "onnx", "--out", str(tmp_path / "out"), "--data-root", str(tiny_root)]
    assert export.main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: the onnx export of {ckpt} does not match the PyTorch model on 201 test images")
    assert "nothing written" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, says", [
    (["{ckpt}", "--format", "tflite"], "--format 'tflite': use torchscript and/or onnx"),
    (["{ckpt}", "--batches", "0"], "--batches=0: must be >= 1"),
    (["{run}/train.log"], "train.log is not a readable checkpoint"),
])
def test_bad_input_is_one_line(runs, args, says, capsys):
    run = runs["logistic"]
    assert export.main([a.format(ckpt=run / "checkpoints" / "best.pt", run=run) for a in args]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and says in err and len(err.strip().splitlines()) == 1, err


def test_missing_checkpoint_from_the_command_line():
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "export.py"), "/nonexistent.pt"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stderr == "error: checkpoint '/nonexistent.pt' does not exist\n"


def test_onnx_without_its_packages_says_what_to_install(runs, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    assert export.main([str(runs["mlp"] / "checkpoints" / "best.pt"), "--format", "onnx"]) == 1
    assert capsys.readouterr().err == ("error: --format onnx needs the packages onnx, onnxscript and onnxruntime "
                                       "(onnxruntime is not installed): pip install 'hydra-torch-trainer[export]' "
                                       "(in a checkout: pip install -e '.[export]'), or export --format torchscript "
                                       "only\n")


def test_default_output_directory(tmp_path):
    run = tmp_path / "run"
    assert export.default_out_dir(run / "checkpoints" / "best.pt", "checkpoints") == run / "exports"
    assert export.default_out_dir(run / "ck" / "pts" / "last.pt", "ck/pts") == run / "exports"
    assert export.default_out_dir(tmp_path / "copied" / "best.pt", "checkpoints") == tmp_path / "copied" / "exports"


@pytest.mark.slow
def test_cnn_export_matches_on_real_test_images(real_root, tmp_path):
    run_dir = tmp_path / "run"
    assert run_train("model=cnn", "trainer.max_epochs=1", "trainer.limit_train_batches=20",
                     "trainer.limit_eval_batches=2", "trainer.device=cpu", f"dataset.root={real_root}",
                     f"hydra.run.dir={run_dir}").returncode == 0
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "export.py"), f"{run_dir}/checkpoints/best.pt"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and all("same prediction for 2561/2561" in line for line in lines), lines
