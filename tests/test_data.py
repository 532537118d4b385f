import pytest
import torch
from data_args import tiny_mnist

from trainer.data import MNIST, BatchLoader, BatchTransform, FashionMNIST, random_shift
from trainer.errors import UserError


def loader(n=103, batch_size=10, shuffle=False, **kw):
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    return BatchLoader(images, torch.arange(n), batch_size, transform=BatchTransform(0.0, 1 / 255), shuffle=shuffle,
                       **kw)


def test_epoch_visits_every_sample_once_in_a_seeded_order():
    ld = loader(shuffle=True, seed=3)
    ld.set_epoch(0)
    first = torch.cat([y for _, y in ld])
    assert sorted(first.tolist()) == list(range(103))
    assert not torch.equal(first, torch.arange(103))
    ld.set_epoch(1)
    second = torch.cat([y for _, y in ld])
    assert not torch.equal(first, second)
    ld.set_epoch(0)
    assert torch.equal(first, torch.cat([y for _, y in ld]))  # an epoch's order can be rebuilt
    assert torch.equal(first, torch.cat([y for _, y in loader(shuffle=True, seed=3)]))


def test_images_and_labels_stay_paired_and_normalised():
    for x, y in loader(shuffle=True, seed=0):  # image value == label by construction
        assert x.dtype == torch.float32 and x.shape[1:] == (1, 2, 2)
        assert torch.equal(x[:, 0, 0, 0], y.float())


def test_len_drop_last_and_resume_mid_epoch():
    assert len(loader()) == 11 and len(loader(drop_last=True)) == 10
    assert loader(drop_last=True).num_samples == 100
    ld = loader(shuffle=True, seed=1)
    full = [y for _, y in ld]
    resumed = [y for _, y in ld.iter_from(4)]
    assert len(full) == 11 and len(resumed) == 7  # the batches after the first 4, no more, no fewer
    assert all(torch.equal(a, b) for a, b in zip(full[4:], resumed))


def test_random_shift_moves_content_and_fills_zero():
    x = torch.zeros(64, 1, 8, 8, dtype=torch.uint8)
    x[:, :, 4, 4] = 200
    out = random_shift(x, 2)
    assert out.shape == x.shape and out.dtype == torch.uint8
    rows, cols = (out[:, 0] == 200).nonzero()[:, 1:].T
    assert len(rows) == 64 and rows.sub(4).abs().max() <= 2 and cols.sub(4).abs().max() <= 2
    assert len({(r, c) for r, c in zip(rows.tolist(), cols.tolist())}) > 5  # per-sample offsets
    assert int(out.sum()) == 64 * 200  # nothing else appears


def make(cls=MNIST, **kw):
    return tiny_mnist(kw.pop("root"), cls, **{**dict(batch_size=32, eval_batch_size=50, val_size=100, mean=0.1307,
                                                      std=0.3081), **kw})


def test_dataset_splits_and_cache(tiny_root):
    data = make(root=str(tiny_root))
    assert (data.in_shape, data.num_classes) == ((1, 28, 28), 10)
    assert (data.train.num_samples, data.val.num_items, data.test.num_items) == (500, 100, 200)
    # train and val are disjoint views of the one training tensor, together all 600 images
    assert torch.equal(torch.cat([data.train.indices, data.val.indices]).sort().values, torch.arange(600))
    assert torch.equal(data.val.raw()[0], data.train.images[data.val.indices])
    assert data.cache_file.is_file() and data.cache_file.is_relative_to(tiny_root / "MNIST")  # next to the data
    again = make(root=str(tiny_root))
    assert torch.equal(again.val.raw()[0], data.val.raw()[0])
    other = make(root=str(tiny_root), split_seed=1)
    assert not torch.equal(other.val.raw()[1], data.val.raw()[1])
    assert make(FashionMNIST, root=str(tiny_root)).classes[0] == "T-shirt/top"


@pytest.mark.parametrize("key, value", [("batch_size", 0), ("eval_batch_size", -1), ("val_size", -5),
                                        ("val_size", 600), ("augment_shift", -1), ("std", 0)])
def test_bad_dataset_values_are_named(tiny_root, key, value):
    with pytest.raises(UserError, match=f"{key}={value}"):
        make(root=str(tiny_root), **{key: value})


def test_verify_rejects_foreign_files(tiny_root, tmp_path):
    import shutil
    shutil.copytree(tiny_root / "MNIST", tmp_path / "MNIST")  # with the cache made without the MD5 check
    with pytest.raises(UserError, match="md5"):
        make(root=str(tmp_path), verify=True)


def test_random_shift_keeps_channels_and_layout():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.uint8).view(2, 3, 6, 6)
    out = random_shift(x, 1)
    assert out.shape == x.shape and out.is_contiguous()  # NCHW, as every consumer expects
    assert all(set(out[:, c].unique().tolist()) - {0} <= set(x[:, c].unique().tolist()) for c in range(3))


def test_normalisation_is_one_pass_and_equals_the_two_pass_formula():
    # export.py traces the two-op form into exported models; both must give the same bits.
    transform = BatchTransform(0.1307, 0.3081)
    images = torch.arange(256, dtype=torch.uint8).repeat(8, 1, 1, 1)  # (8, 1, 1, 256): every grey level
    out = transform(images)
    assert out.dtype == torch.float32 and out.shape == images.shape
    assert torch.equal(out, transform.exportable()(images))
    assert torch.equal(out, torch.add(transform.bias, images.float(), alpha=transform.scale))
    assert torch.allclose(out, (images.float() / 255 - 0.1307) / 0.3081, atol=1e-5)


def test_cache_is_hit_then_rebuilt_when_a_raw_file_changes(tiny_root, tmp_path, monkeypatch):
    import shutil
    shutil.copytree(tiny_root / "MNIST", tmp_path / "MNIST")
    reads = []
    real_read = MNIST.read
    monkeypatch.setattr(MNIST, "read", lambda self: reads.append(1) or real_read(self))
    first = make(root=str(tmp_path))
    assert first.cache_file.is_file() and len(reads) == 1
    hit = make(root=str(tmp_path))
    assert len(reads) == 1 and torch.equal(hit.test.raw()[0], first.test.raw()[0])  # served from the cache
    raw = tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    blob = bytearray(raw.read_bytes())
    blob[-1] ^= 0xFF  # one pixel of the last test image
    raw.write_bytes(bytes(blob))
    rebuilt = make(root=str(tmp_path))
    assert len(reads) == 2  # the changed file was parsed again, not served stale
    assert int(rebuilt.test.images[-1, 0, -1, -1]) == int(first.test.images[-1, 0, -1, -1]) ^ 0xFF
    assert rebuilt.digest != first.digest


def _always(value):
    """torch.rand that returns `value` everywhere (the rotation angle's draw), to pin an augmentation down."""
    return lambda *size, **kw: torch.full(size if len(size) != 1 or not isinstance(size[0], tuple) else size[0],
                                          float(value), device=kw.get("device"))


def test_rotation_turns_each_image_about_its_centre(monkeypatch):
    from trainer.data.batches import random_rotate_and_shift

    images = torch.randint(0, 256, (3, 2, 6, 6), dtype=torch.uint8)
    monkeypatch.setattr(torch, "rand", _always(1.0))  # the largest angle: +max_degrees
    turned = random_rotate_and_shift(images, 90.0, 0)  # (3, 2, 6, 6) float
    assert turned.dtype == torch.float32
    assert torch.allclose(turned, torch.rot90(images, 1, (2, 3)).float(), atol=1e-3)  # counter-clockwise, no loss
    monkeypatch.setattr(torch, "rand", _always(0.0))
    assert torch.allclose(random_rotate_and_shift(images, 90.0, 0), torch.rot90(images, -1, (2, 3)).float(), atol=1e-3)


def test_shift_inside_the_rotation_pass_is_whole_pixels_filled_with_zero(monkeypatch):
    from trainer.data.batches import random_rotate_and_shift

    images = torch.randint(1, 256, (64, 1, 8, 8), dtype=torch.uint8)
    monkeypatch.setattr(torch, "rand", _always(0.5))  # angle 0
    shifted = random_rotate_and_shift(images, 10.0, 2)
    for image, out in zip(images, shifted):  # each is its image moved by some (dy, dx) in [-2, 2]^2
        matches = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                   if torch.allclose(out, _translated(image.float(), dy, dx), atol=1e-3)]
        assert len(matches) == 1
    assert len({tuple(_offset(i, o)) for i, o in zip(images, shifted)}) > 10  # many different shifts


def _translated(image, dy, dx):
    out = torch.zeros_like(image)
    h, w = image.shape[1:]
    out[:, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = image[:, max(-dy, 0):h - max(dy, 0),
                                                                         max(-dx, 0):w - max(dx, 0)]
    return out


def _offset(image, out):
    return next((dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                if torch.allclose(out, _translated(image.float(), dy, dx), atol=1e-3))


def test_rotation_and_shift_are_one_batched_resampling(monkeypatch):
    from trainer.data import batches

    calls = []
    sample = torch.nn.functional.grid_sample
    monkeypatch.setattr(batches.F, "grid_sample", lambda x, *a, **k: calls.append(x.shape) or sample(x, *a, **k))
    out = batches.BatchTransform(0.1307, 0.3081, max_shift=2, max_degrees=15)(
        torch.randint(0, 256, (128, 1, 28, 28), dtype=torch.uint8))
    assert calls == [(128, 1, 28, 28)] and out.shape == (128, 1, 28, 28)  # the whole batch in one call


def test_cutout_zeroes_one_square_per_image():
    from trainer.data.batches import random_cutout

    torch.manual_seed(0)  # the fraction of whole squares below is a sample: not the RNG state earlier tests left
    images = torch.full((400, 3, 12, 12), 255, dtype=torch.uint8)
    out = random_cutout(images, 4)
    assert out.dtype == torch.uint8
    zero = (out == 0).all(dim=1)  # (400, 12, 12): every channel of a pixel is cut together
    assert ((out == 0).any(dim=1) == zero).all() and ((out == 255) | (out == 0)).all()
    for mask in zero:
        rows, cols = mask.any(1).nonzero().squeeze(1), mask.any(0).nonzero().squeeze(1)
        assert 1 <= mask.sum() <= 16 and mask.sum() == len(rows) * len(cols)  # one rectangle, at most 4x4
        assert (rows.diff() == 1).all() and (cols.diff() == 1).all()
    assert (zero.sum(dim=(1, 2)) == 16).float().mean() > 0.5  # squares inside the image are whole
