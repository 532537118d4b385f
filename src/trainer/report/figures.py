"""Pictures for TensorBoard's Images tab, drawn with Pillow (which torchvision already needs).

Each function returns a (3, H, W) uint8 tensor, the layout `SummaryWriter.add_image` takes. Pillow, not
matplotlib: these are drawn during training, where importing matplotlib would add to every run's start-up. The LR
finder's plot, drawn once at the end of its own command, is matplotlib's (trainer/cli/lr_find.py).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

FONT_SIZE = 11
# TensorBoard fits an image into its card, about 300 px wide at 100% zoom: a grid of 3 columns of 92 px stays at
# full size, so its 16 px captions read as drawn (8 columns were shrunk to captions about 5 px high).
CAPTION_SIZE = 16
PAD = 4
INK, PAPER, FAINT = (20, 20, 20), (255, 255, 255), (90, 90, 90)


def _font(size: int = FONT_SIZE):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)  # Pillow's bundled scalable font: no system fonts needed


def _text_width(draw, text: str, font) -> int:
    left, _, right, _ = draw.textbbox((0, 0), text, font=font)
    return int(right - left)


def _to_tensor(image) -> torch.Tensor:
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).contiguous()  # (3, H, W)


def confusion_matrix_image(confusion: torch.Tensor, classes: Sequence[str]) -> torch.Tensor:
    """A (K, K) count matrix (rows true, columns predicted) as a heat map with the counts written in.

    Each cell is shaded by its share of its row (the true class), so a class's errors stand out however
    many images it has; the diagonal is blue, errors red.
    """
    from PIL import Image, ImageDraw

    counts = confusion.cpu().to(torch.int64)  # (K, K)
    k = counts.shape[0]
    share = (counts / counts.sum(dim=1, keepdim=True).clamp(min=1)).tolist()  # (K, K), rows sum to 1
    font = _font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    labels = [name if name == str(i) else f"{i} {name}" for i, name in enumerate(classes)]  # MNIST: "3", not "3 3"
    label_w = max(_text_width(probe, s, font) for s in labels) + 2 * PAD
    cell = max(_text_width(probe, str(int(counts.max())), font) + 2 * PAD, 2 * FONT_SIZE + PAD)
    line = FONT_SIZE + PAD
    top = 2 * line + PAD  # title, then the column indices
    width, height = label_w + k * cell + PAD, top + k * cell + PAD
    image = Image.new("RGB", (width, height), PAPER)
    draw = ImageDraw.Draw(image)
    draw.text((PAD, PAD), "rows: true class, columns: predicted", fill=INK, font=font)
    for j in range(k):
        draw.text((label_w + j * cell + PAD, PAD + line), str(j), fill=INK, font=font)
    for i in range(k):
        y = top + i * cell
        draw.text((PAD, y + PAD), labels[i], fill=INK, font=font)
        for j in range(k):
            x, s = label_w + j * cell, share[i][j]
            fade = int(255 * (1 - s))  # white at 0, full colour at 1
            colour = (fade, fade, 255) if i == j else (255, fade, fade)
            draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=colour, outline=(220, 220, 220))
            n = int(counts[i, j])
            if n:
                draw.text((x + PAD, y + PAD), str(n), fill=PAPER if s > 0.6 else INK, font=font)
    return _to_tensor(image)


def image_grid(images: torch.Tensor, columns: int = 8, padding: int = 2, pad_value: int = 128) -> torch.Tensor:
    """uint8 images (N, C, h, w) tiled `columns` to a row with `padding` pixels of `pad_value` around each, as
    torchvision's make_grid draws them, without importing torchvision (0.1 s before a run's first step)."""
    images = images.cpu()
    n, c, h, w = images.shape
    columns = max(1, min(columns, n))
    rows = -(-n // columns)
    sheet = torch.full((c, rows * (h + padding) + padding, columns * (w + padding) + padding), pad_value,
                       dtype=images.dtype)  # (C, H, W)
    for i in range(n):
        y, x = padding + (i // columns) * (h + padding), padding + (i % columns) * (w + padding)
        sheet[:, y:y + h, x:x + w] = images[i]
    return sheet.expand(3, -1, -1) if c == 1 else sheet  # grey images drawn in RGB, as make_grid does


def labelled_grid(images: torch.Tensor, captions: Sequence[Sequence[str]], columns: int = 3,
                  scale: int = 3) -> torch.Tensor:
    """uint8 images (N, C, h, w), each enlarged `scale` times, with its caption lines underneath."""
    from PIL import Image, ImageDraw

    images = images.cpu()
    n, _, h, w = images.shape
    font = _font(CAPTION_SIZE)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines = max((len(c) for c in captions), default=0)
    cell_w = max([w * scale] + [_text_width(probe, s, font) for c in captions for s in c]) + 2 * PAD
    cell_h = h * scale + lines * (CAPTION_SIZE + 2) + 2 * PAD
    rows = -(-n // columns)
    sheet = Image.new("RGB", (min(n, columns) * cell_w, rows * cell_h), PAPER)
    draw = ImageDraw.Draw(sheet)
    for idx in range(n):
        x, y = (idx % columns) * cell_w, (idx // columns) * cell_h
        pixels = images[idx].permute(1, 2, 0).numpy()  # (h, w, C)
        tile = Image.fromarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels)
        sheet.paste(tile.resize((w * scale, h * scale), Image.NEAREST).convert("RGB"), (x + PAD, y + PAD))
        for li, text in enumerate(captions[idx]):
            colour = INK if li == 0 else FAINT
            draw.text((x + PAD, y + PAD + h * scale + li * (CAPTION_SIZE + 2)), text, fill=colour, font=font)
    return _to_tensor(sheet)


def reliability_diagram(count: torch.Tensor, confidence: torch.Tensor, correct: torch.Tensor,
                        size: int = 280) -> torch.Tensor:
    """A reliability diagram from calibration bins (`count`, summed `confidence`, summed `correct`, (bins,) each,
    the last bin holding confidence 1.0 exactly): per bin of confidence, a bar as high as the accuracy in it,
    its confidence marked, over the diagonal a calibrated model would follow. Bins with no sample draw nothing."""
    from PIL import Image, ImageDraw

    bins = len(count) - 1  # the last one (confidence exactly 1) is drawn in the top bin
    count, confidence, correct = count.clone(), confidence.clone(), correct.clone()
    for t in (count, confidence, correct):
        t[-2] += t[-1]
    margin, font = 30, _font()
    image = Image.new("RGB", (size + 2 * margin, size + 2 * margin), PAPER)
    draw = ImageDraw.Draw(image)
    x0, y0 = margin, margin + size  # the plot's origin, bottom left
    draw.rectangle((x0, margin, x0 + size, y0), outline=FAINT)
    draw.line((x0, y0, x0 + size, margin), fill=FAINT)  # perfect calibration
    width = size / bins
    for i in range(bins):
        n = float(count[i])
        if not n:
            continue
        left, right = x0 + i * width + 1, x0 + (i + 1) * width - 1
        draw.rectangle((left, y0 - size * float(correct[i]) / n, right, y0), fill=(70, 120, 190))
        mark = y0 - size * float(confidence[i]) / n
        draw.line((left, mark, right, mark), fill=(200, 60, 40), width=2)  # the bin's mean confidence
    draw.text((x0, y0 + 6), "0", fill=INK, font=font)
    draw.text((x0 + size - 4, y0 + 6), "1", fill=INK, font=font)
    draw.text((x0 + size // 2 - 28, y0 + 6), "confidence", fill=INK, font=font)
    draw.text((4, margin - 18), "accuracy (bars) vs confidence (red)", fill=INK, font=font)
    return _to_tensor(image)


def scatter(true: torch.Tensor, predicted: torch.Tensor, name: str, size: int = 280) -> torch.Tensor:
    """Predicted against true values (n,) each, one dot per sample, over the diagonal a perfect model follows;
    both axes span the same range, so a dot's distance from the diagonal is its error."""
    from PIL import Image, ImageDraw

    low = float(min(true.min(), predicted.min())) if true.numel() else 0.0
    high = float(max(true.max(), predicted.max())) if true.numel() else 1.0
    span = high - low or 1.0
    margin, font = 44, _font()  # room for the value axis' numbers at the left
    image = Image.new("RGB", (size + 2 * margin, size + 2 * margin), PAPER)
    draw = ImageDraw.Draw(image)
    x0, y0 = margin, margin + size  # the plot's origin, bottom left
    draw.rectangle((x0, margin, x0 + size, y0), outline=FAINT)
    draw.line((x0, y0, x0 + size, margin), fill=FAINT)
    xs = ((true.float() - low) / span * size + x0).tolist()
    ys = (y0 - (predicted.float() - low) / span * size).tolist()
    for x, y in zip(xs, ys):
        draw.rectangle((x - 1, y - 1, x + 1, y + 1), fill=(70, 120, 190))
    draw.text((x0, y0 + 6), f"{low:.3g}", fill=INK, font=font)  # both axes span low..high
    draw.text((x0 + size - 30, y0 + 6), f"{high:.3g}", fill=INK, font=font)
    draw.text((x0 + size // 2 - 12, y0 + 6), "true", fill=INK, font=font)
    draw.text((2, y0 - FONT_SIZE), f"{low:.3g}", fill=INK, font=font)
    draw.text((2, margin), f"{high:.3g}", fill=INK, font=font)
    draw.text((4, margin - 20), f"{name}: predicted (up) vs true, {len(xs)} samples", fill=INK, font=font)
    return _to_tensor(image)


def png(image: torch.Tensor) -> bytes:
    """A (3, H, W) uint8 picture as PNG bytes."""
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(out, format="PNG")
    return out.getvalue()
