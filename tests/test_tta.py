"""Test-time augmentation: eval.py tta=[...] and predict.py --tta average a classifier's softmax over batched views."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, run_train
from torch import nn

from trainer.data.tta import TestTimeAugmentation as TTA  # not collected as a test class
from trainer.data.tta import check_tta, with_tta
from trainer.errors import UserError


class Recording(nn.Module):
    """A linear classifier of 4x4 images that records the batches it is given."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(16, 3)
        self.seen = []

    def forward(self, x):
        self.seen.append(x.clone())
        return self.linear(x.flatten(1))


def shifted(x, dy, dx, fill):
    """x (B, 1, 4, 4) with content moved by (dy, dx), by hand: each output pixel read from its source, or filled."""
    out = torch.empty_like(x)
    for y in range(4):
        for xx in range(4):
            sy, sx = y - dy, xx - dx
            if fill == "reflect":
                sy, sx = abs(sy) if sy < 4 else 6 - sy, abs(sx) if sx < 4 else 6 - sx
                out[..., y, xx] = x[..., sy, sx]
            else:
                out[..., y, xx] = x[..., sy, sx] if 0 <= sy < 4 and 0 <= sx < 4 else fill
    return out


@pytest.mark.parametrize("fill", ["reflect", "zeros"])
def test_the_views_are_the_mirror_and_four_shifts_in_one_batch_and_softmax_is_averaged(fill):
    model = Recording()
    zero = torch.tensor([-0.5])  # a 0 pixel after normalisation: the fill of a zero-filled shift
    tta = TTA(model, ["hflip", "shift"], shift=1, fill=fill, zero=zero)
    x = torch.randn(2, 1, 4, 4)
    out = tta(x)
    (batch,) = model.seen  # one forward pass of every view
    assert batch.shape == (12, 1, 4, 4) and tta.num_views == 6
    fill_value = -0.5 if fill == "zeros" else fill
    views = [x, x.flip(3), *(shifted(x, dy, dx, fill_value) for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)))]
    assert torch.allclose(batch, torch.cat(views))
    expected = torch.stack([model.linear(v.flatten(1)).softmax(1) for v in views]).mean(0)  # (2, 3)
    assert torch.allclose(out.softmax(1), expected, atol=1e-6)


def test_no_views_is_the_model_itself_and_names_are_checked():
    model = Recording()
    assert with_tta(model, [], augment_shift=0, random_crop=0, mean=[0.5], std=[0.5]) is model
    assert check_tta(["shift", "hflip", "shift"]) == ["shift", "hflip"]
    with pytest.raises(UserError, match="tta: unknown view 'flip'; the views are hflip, shift"):
        check_tta(["flip"])
    with pytest.raises(UserError, match="the model's task is regression"):
        with_tta(model, ["hflip"], augment_shift=0, random_crop=0, mean=[0.5], std=[0.5], task="regression")


def test_shift_views_follow_the_training_shift():
    model = Recording()
    shifted_like_training = with_tta(model, ["shift"], augment_shift=2, random_crop=0, mean=[0.5], std=[0.25])
    assert (shifted_like_training.shift, shifted_like_training.fill) == (2, "zeros")
    assert float(shifted_like_training.zero) == pytest.approx(-2.0)
    cropped = with_tta(model, ["shift"], augment_shift=0, random_crop=3, mean=[0.5], std=[0.25])
    assert (cropped.shift, cropped.fill) == (3, "reflect")


@pytest.fixture(scope="module")
def trained(faint_root, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("tta") / "run"
    result = run_train(*TINY, f"dataset.root={faint_root}", f"hydra.run.dir={run_dir}", "model=mlp",
                       "model.hidden_sizes=[32]", "trainer.max_epochs=1", "dataset.augment_shift=1")
    assert result.returncode == 0, result.stderr
    return run_dir, faint_root


def test_eval_with_tta_reports_the_views_and_other_metrics(trained, tmp_path):
    run_dir, root = trained
    args = (f"ckpt={run_dir}/checkpoints/best.pt", f"data_root={root}", f"output_root={tmp_path}")
    plain = run_train(*args, script="eval.py")
    views = run_train(*args, "tta=[hflip,shift]", script="eval.py")
    assert plain.returncode == views.returncode == 0, views.stderr[-2000:]
    assert "test-time augmentation (tta=[hflip,shift]): 6 views: the original, its mirror, 4 shifts of 1 px " \
           "(filled with 0); softmax averaged" in views.stdout + views.stderr
    a, b = (json.loads(p.read_text()) for p in sorted(tmp_path.rglob("metrics.json")))
    assert (a["tta"], b["tta"]) == ([], ["hflip", "shift"])
    assert a["test/loss"] != b["test/loss"]  # other predictions (the views changed them), same images
    assert a["images"] == b["images"]


def test_unknown_views_are_one_line_in_eval_and_predict(trained, tmp_path):
    run_dir, root = trained
    ckpt = f"{run_dir}/checkpoints/best.pt"
    bad = run_train(f"ckpt={ckpt}", f"data_root={root}", f"output_root={tmp_path}", "tta=[flip]", script="eval.py")
    assert bad.returncode == 1 and bad.stderr.strip() == "error: tta: unknown view 'flip'; the views are hflip, shift"
    assert not any(tmp_path.rglob("metrics.json"))  # nothing left behind
    image = tmp_path / "x.png"
    from PIL import Image

    Image.fromarray((torch.rand(28, 28) * 255).to(torch.uint8).numpy()).save(image)
    bad = run_train(ckpt, str(image), "--tta", "mirror", script="scripts/predict.py")
    assert bad.returncode == 1 and bad.stderr.strip() == "error: tta: unknown view 'mirror'; the views are hflip, shift"
    good = run_train(ckpt, str(image), "--tta", "hflip,shift", "--top", "2", script="scripts/predict.py")
    assert good.returncode == 0, good.stderr
    probabilities = [float(p.rstrip("%")) for p in good.stdout.split() if p.endswith("%")]
    assert len(probabilities) == 2 and sum(probabilities) <= 100.05


def test_tta_and_a_reflected_pad_reach_torch_reflect():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    tta = TTA(nn.Identity(), ["shift"], shift=1, fill="reflect")
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    assert torch.equal(tta._shifted(x, 1, 0), padded[..., 0:4, 1:5])  # moved down one: row -1 reflected is row 1
