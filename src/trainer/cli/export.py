"""Export a trained checkpoint to TorchScript and ONNX, each verified against the PyTorch model.

    htt-export outputs/<date>/<time>/checkpoints/best.pt [--format torchscript onnx] [--out DIR] [--batches 10]
    python scripts/export.py ...             # the same in a checkout

The model is rebuilt from the config stored in the checkpoint, and the dataset's normalisation is baked in:
the exported model takes uint8 images (batch, C, H, W), grey levels 0-255 exactly as the dataset stores
them, for any batch size, and returns float32 logits (batch, classes). Files go to DIR (default: `exports/`
in the checkpoint's run directory, or beside the checkpoint when it is not in one), named after the
checkpoint: best.torchscript.pt, best.onnx. Before a file is written, the exported model runs on
`--batches` test batches of the checkpoint's dataset (and on one image alone) and must give the PyTorch
model's logits within ATOL + RTOL * |logit| and the same predicted class for every image; otherwise nothing
is written and the script exits 1.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from trainer.cli import checkpoint_arguments, require_dirs
from trainer.cli.config import build, check_fits, data_config, model_from_checkpoint
from trainer.data import BatchLoader, BatchTransform
from trainer.errors import UserError, error_line
from trainer.run.files import atomic_write

ATOL = RTOL = 1e-4
INPUT = ("uint8 images (batch, C, H, W), grey levels 0-255 as the dataset stores them (light content on a "
         "dark background); any batch size >= 1")
OUTPUT = "float32 logits (batch, classes); softmax gives class probabilities"

Runner = Callable[[torch.Tensor], torch.Tensor]  # (B, C, H, W) uint8 -> (B, classes) float32


class Normalised(nn.Module):
    """The trained model with the dataset's normalisation in front, so raw uint8 images go in."""

    def __init__(self, model: nn.Module, mean: float | list[float], std: float | list[float]) -> None:
        super().__init__()
        self.model = model
        self.normalise = BatchTransform(mean, std).exportable()  # the training pipeline's own arithmetic, bit for bit

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) uint8 -> (B, classes)
        return self.model(self.normalise(images))


@contextlib.contextmanager
def quiet_jit() -> Iterator[None]:
    # torch.jit is deprecated in favour of torch.export, but TorchScript is still what libtorch (C++) and
    # older runtimes load, and what this script is asked for: its FutureWarnings are not the user's to fix.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.", category=FutureWarning)
        yield


def to_torchscript(model: Normalised, example: torch.Tensor, meta: dict) -> bytes:
    """Trace `model` on `example`; `meta` goes into the archive as meta.json."""
    buffer = io.BytesIO()
    with quiet_jit():
        # Tracing records tensor sizes as symbolic values, so the batch dimension stays dynamic.
        torch.jit.save(torch.jit.trace(model, example), buffer, _extra_files={"meta.json": json.dumps(meta)})
    return buffer.getvalue()


def load_torchscript(blob: bytes) -> Runner:
    with quiet_jit():
        return torch.jit.load(io.BytesIO(blob))


def onnx_packages() -> tuple:
    """The onnx and onnxruntime modules, imported only when ONNX is asked for (they take a second or two)."""
    try:
        import onnx
        import onnxruntime
        import onnxscript  # noqa: F401  (torch.onnx.export's exporter is written in it)
    except ImportError as e:
        raise UserError(f"--format onnx needs the packages onnx, onnxscript and onnxruntime ({e.name} is not "
                        "installed): pip install 'hydra-torch-trainer[export]' (in a checkout: pip install -e "
                        "'.[export]'), or export --format torchscript only") from None
    return onnx, onnxruntime


def to_onnx(model: Normalised, example: torch.Tensor, meta: dict) -> bytes:
    """Export `model` with torch.export (the dynamo exporter), batch dimension dynamic; `meta` as metadata."""
    onnx, _ = onnx_packages()
    classifier = meta.get("task", "classification") == "classification"
    program = torch.onnx.export(model, (example,), input_names=["images"],
                                output_names=["logits" if classifier else "outputs"],
                                dynamic_shapes={"images": {0: torch.export.Dim("batch")}}, dynamo=True,
                                verbose=False)
    proto = program.model_proto
    what = "classifier" if classifier else f"{meta['task']} model"
    proto.doc_string = f"{meta['dataset']} {what}. Input: {INPUT}. Output: {meta['output']}."
    proto.graph.input[0].doc_string, proto.graph.output[0].doc_string = INPUT, meta["output"]
    onnx.helper.set_model_props(proto, {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()})
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def load_onnx(blob: bytes) -> Runner:
    _, onnxruntime = onnx_packages()
    session = onnxruntime.InferenceSession(blob, providers=["CPUExecutionProvider"])
    return lambda images: torch.from_numpy(session.run(["logits"], {"images": images.numpy()})[0])


FORMATS = {  # name: (exporter, loader, file suffix)
    "torchscript": (to_torchscript, load_torchscript, ".torchscript.pt"),
    "onnx": (to_onnx, load_onnx, ".onnx"),
}


class Mismatch(Exception):
    """An exported model whose outputs differ from the PyTorch model's beyond the tolerance."""


@dataclass(frozen=True)
class Agreement:
    """How closely an exported model's logits follow the PyTorch model's on the same images."""

    images: int
    batches: int  # of the test loader's batch size, after the first image alone
    max_abs_diff: float
    within_tolerance: bool  # every logit within ATOL + RTOL * |PyTorch logit|
    same_prediction: int  # images whose argmax class is the same
    correct: int | None  # images the exported model classifies right (classification)

    @property
    def what(self) -> str:
        return "logit" if self.correct is not None else "output"  # a classifier's logits; other tasks' outputs

    @property
    def ok(self) -> bool:
        return self.within_tolerance and self.same_prediction == self.images

    def __str__(self) -> str:
        return (f"{self.images} test images ({self.batches} batches and the first image alone): "
                f"max |{self.what} diff| {self.max_abs_diff:.2e} (allowed {ATOL:g} + {RTOL:g}*|{self.what}|), "
                f"same {'prediction' if self.correct is not None else 'outputs'} for {self.same_prediction}/"
                f"{self.images}" +
                (f", accuracy {self.correct / self.images:.2%}" if self.correct is not None else ""))


def verify(run: Runner, reference: nn.Module, loader: BatchLoader, batches: int, classify: bool = True) -> Agreement:
    """Compare `run` with the PyTorch model `reference` on the first `batches` batches of `loader` and on its
    first image alone.

    `reference` gets the batches as the loader yields them, normalised by the training pipeline;
    `run` gets the same images as stored (uint8).
    """
    images = same = correct = 0
    diff, within = 0.0, True
    one, label = loader.raw(slice(1))
    first = (one, loader.transform(one), label)  # a batch of one
    # A test loader does not shuffle: its batch i holds the samples at positions [i * batch_size, (i + 1) * batch_size).
    stored = (loader.raw(slice(i * loader.batch_size, (i + 1) * loader.batch_size))[0] for i in range(batches))
    steps = ((raw, x, y) for raw, (x, y) in zip(stored, loader))
    with torch.inference_mode():
        for raw, normalised, labels in (first, *steps):  # (B, C, H, W) uint8, float32, (B,) int64
            want, got = reference(normalised), run(raw)  # (B, classes) each
            images += len(labels)
            diff = max(diff, float((got - want).abs().max()))
            within = within and torch.allclose(got, want, rtol=RTOL, atol=ATOL)
            if classify:  # the same class, and right; another task's outputs agree by value (allclose) alone
                same += int((got.argmax(1) == want.argmax(1)).sum())
                correct += int((got.argmax(1) == labels).sum())
            else:
                same += len(labels) if torch.allclose(got, want, rtol=RTOL, atol=ATOL) else 0
    return Agreement(images, min(batches, len(loader)), diff, within, same, correct if classify else None)


def default_out_dir(ckpt: Path, checkpoint_dir: str) -> Path:
    """`exports/` in the run directory when `ckpt` is in its run's checkpoint folder, else beside `ckpt`."""
    folder, inner = ckpt.resolve().parent, Path(checkpoint_dir).parts
    if not Path(checkpoint_dir).is_absolute() and folder.parts[-len(inner):] == inner:
        return folder.parents[len(inner) - 1] / "exports"
    return folder / "exports"


def export(ckpt: str, formats: list[str], out_dir: Path | None, batches: int, trust: bool = False,
           data_root: Path | None = None, config_dirs: Sequence[Path] = (),
           labels: Path | None = None) -> list[tuple[str, Path, Agreement]]:
    """Export `ckpt` in each of `formats`, verify each and write it; stop at the first that fails to verify.
    `trust`, `data_root` (where the test images are read), `config_dirs` (the user's options): see
    trainer.cli.config.rebuildable_config.

    Raises UserError for a bad argument or checkpoint, Mismatch for an export that does not match.
    """
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise UserError(f"--format {unknown[0]!r}: use {' and/or '.join(FORMATS)}")
    if batches < 1:
        raise UserError(f"--batches={batches}: must be >= 1")
    if "onnx" in formats:
        onnx_packages()  # fail before the slow part
    restored = model_from_checkpoint(ckpt, trust=trust, data_root=data_root, config_dirs=config_dirs)
    trained, dataset, task = restored.config, restored.data, restored.task
    head = task.export_head()  # a regression's outputs in the targets' units
    reference = restored.model if head is None else nn.Sequential(restored.model, head).eval()
    model = Normalised(reference, dataset["mean"], dataset["std"]).eval()
    data = build(data_config(trained, "--data-root PATH", task.targets, labels, "--labels FILE.csv"), device="cpu",
                 seed=trained.seed, targets=task.targets)
    check_fits(data, dataset, ckpt)
    out_dir = out_dir or default_out_dir(Path(ckpt).expanduser(), trained.trainer.checkpoint_dir)
    meta = {"dataset": dataset["name"], "classes": dataset["classes"], "mean": dataset["mean"], "std": dataset["std"],
            "input": INPUT, "output": OUTPUT if task.name == "classification" else task.export_output,
            "task": task.name, "checkpoint": str(ckpt), "epoch": restored.epoch}
    example = data.test.raw(slice(2))[0]  # (2, C, H, W) uint8; not 1, which the ONNX exporter would fix as the size
    results = []
    for name in formats:
        exporter, loader, suffix = FORMATS[name]
        blob = exporter(model, example, meta)
        agreement = verify(loader(blob), reference, data.test, batches, classify=task.name == "classification")
        if not agreement.ok:
            raise Mismatch(f"the {name} export of {ckpt} does not match the PyTorch model on {agreement}; "
                            "nothing written")
        path = out_dir / (Path(ckpt).stem + suffix)
        with atomic_write(path) as f:  # the verified bytes themselves, never a torn file
            f.write(blob)
        results.append((name, path, agreement))
        print(f"{name}: {path}  {agreement}", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    checkpoint_arguments(parser)
    parser.add_argument("--format", nargs="+", default=list(FORMATS), metavar="FORMAT",
                        help=f"any of {', '.join(FORMATS)} (default: all)")
    parser.add_argument("--out", type=Path, help="output directory (default: exports/ in the run directory)")
    parser.add_argument("--batches", type=int, default=10, help="test batches to verify on (default: 10)")
    parser.add_argument("--data-root", type=Path,
                        help="where the checkpoint's dataset is read, to verify on: its dataset.root (default: data/ "
                             "in the current folder) or, for image_folder/tensors data, its dataset.path (required "
                             "then)")
    parser.add_argument("--labels", type=Path, help="for image_folder data trained with a labels CSV "
                        "(dataset.labels): where that file is (never read from the checkpoint)")
    args = parser.parse_args(argv)
    try:
        export(args.ckpt, list(dict.fromkeys(args.format)), args.out, args.batches, args.trust_checkpoint,
               args.data_root, require_dirs(args.config_dir), args.labels)
    except (UserError, Mismatch) as e:
        print(error_line(e), file=sys.stderr)
        return 1
    return 0


def run() -> None:
    """The command (`htt-export`, `python scripts/export.py`), once trainer.cli.entry has prepared the process."""
    sys.exit(main())
