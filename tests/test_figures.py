"""The pictures logged to TensorBoard: right size, right colours, one cell per class pair."""

import pytest
import torch

from trainer.report.figures import (
    confusion_matrix_image,
    image_grid,
    labelled_grid,
)


def test_confusion_matrix_image_shades_each_cell_by_its_share_of_the_row():
    confusion = torch.tensor([[90, 10, 0], [0, 50, 50], [0, 0, 7]])
    image = confusion_matrix_image(confusion, ("zero", "one", "two"))  # (3, H, W) uint8
    assert image.dtype == torch.uint8 and image.shape[0] == 3
    colours = {tuple(c) for c in image.reshape(3, -1).T.tolist()}
    assert (0, 0, 255) in colours  # a diagonal cell with all of its row: full blue
    assert (255, 127, 127) in colours and (127, 127, 255) in colours  # half of a row: half red / half blue
    assert (255, 229, 229) in colours  # 10% of a row, an error: light red
    assert (255, 0, 0) not in colours  # no error cell holds a whole row


def test_labelled_grid_enlarges_each_image_and_wraps_rows():
    images = torch.zeros(10, 1, 28, 28, dtype=torch.uint8)
    images[3] = 255
    grid = labelled_grid(images, [("pred 1", "true 2")] * 10, columns=8, scale=3)  # (3, H, W)
    assert grid.shape[0] == 3 and grid.shape[2] % 8 == 0  # 8 cells a row
    cell_w, cell_h, pad = grid.shape[2] // 8, grid.shape[1] // 2, 4  # 2 rows
    tile = lambda i: grid[:, (i // 8) * cell_h + pad:(i // 8) * cell_h + pad + 84,  # noqa: E731
                          (i % 8) * cell_w + pad:(i % 8) * cell_w + pad + 84]
    assert (tile(3) == 255).all() and (tile(2) == 0).all() and (tile(9) == 0).all()  # each image 84x84, in order
    assert labelled_grid(images[:2], [("a",), ("b",)], columns=8).shape[2] < grid.shape[2]  # 2 columns only


def test_misclassified_captions_are_legible_at_the_size_tensorboard_shows_them():
    """32 MNIST images as a validation logs them: the grid fits a TensorBoard card (about 300 px) unshrunk,
    and the caption glyphs under the first image stand at least 11 px tall."""
    images = torch.zeros(32, 1, 28, 28, dtype=torch.uint8)
    grid = labelled_grid(images, [("pred 7", "true 2")] * 32)  # (3, H, W)
    assert grid.shape[2] <= 300
    below = grid[0, 4 + 28 * 3:grid.shape[1] // 11, :grid.shape[2] // 3]  # the first cell, under its image
    inked = (below < 128).any(dim=1).nonzero().squeeze(1)  # rows with dark caption pixels
    first_line = inked[inked < inked[0] + 18]  # the first caption line's rows
    assert first_line.max() - first_line.min() + 1 >= 11


@pytest.mark.parametrize("shape", [(64, 1, 28, 28), (5, 3, 12, 18), (9, 3, 7, 5)])
def test_image_grid_draws_what_torchvision_make_grid_draws(shape):
    from torchvision.utils import make_grid

    images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(image_grid(images), make_grid(images, nrow=8, padding=2, pad_value=128))


def test_the_lr_find_plot_shows_the_whole_descent_and_cuts_off_the_divergence():
    from trainer.cli.lr_find import loss_range, plot
    from trainer.loop.lr_find import RangeTest

    smoothed = [2.3] * 20 + [2.3 - 0.1 * i for i in range(20)] + [0.4 + 2 ** i for i in range(10)]  # flat, down, up
    y_lo, y_hi = loss_range(smoothed, smoothed)
    assert y_lo == min(smoothed) and 2.3 < y_hi < 2.5  # the starting loss shows; the climb to 512 does not set it
    lrs = [10 ** (-7 + i / 10) for i in range(len(smoothed))]
    result = RangeTest(lrs=lrs, losses=smoothed, smoothed=smoothed, diverged=True)
    axes = plot(result).axes[0]
    assert axes.get_xscale() == "log" and axes.get_ylim() == (y_lo, y_hi)
    assert axes.lines[-1].get_xdata()[0] == result.suggestion == lrs[39] / 5  # the suggestion's vertical line
    labels = axes.get_legend_handles_labels()[1]
    assert f"suggested {lrs[39] / 5:.2e}" in labels and f"lowest at {lrs[39]:.2e}" in labels
