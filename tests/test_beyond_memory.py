"""Data larger than the memory budget (dataset.memory_budget_gib): decoded into a scratch file on disk, cached, and
trained on window by window from the memory-mapped cache, in a seeded, resume-exact, rank-identical order."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import run_train
from data_args import common
from image_data import arrays, mixed_folder

from trainer.data import ImageFolder, TensorsFile
from trainer.data.batches import BatchLoader, StreamingLoader
from trainer.errors import UserError

KIB = 2**-20  # one KiB in GiB, for dataset.memory_budget_gib


def streaming(n, block, window_blocks, batch_size=4, seed=0, indices=None):
    images = torch.arange(n, dtype=torch.int64).view(n, 1, 1, 1)  # each image: its own row
    return StreamingLoader(images, torch.arange(n), batch_size, block=block, window_blocks=window_blocks,
                           transform=lambda x: x, shuffle=True, seed=seed, indices=indices)


def rows(loader, start=0):
    return [x.flatten().tolist() for x, _ in loader.iter_from(start)]


def test_an_epoch_visits_every_image_once_window_by_window():
    loader = streaming(103, block=5, window_blocks=4)  # windows of 20 images: 5 batches of 4
    order = loader.epoch_order()
    assert sorted(order.tolist()) == list(range(103))
    for w in range(0, 103, loader.window):
        window = order[w:w + loader.window]
        blocks = set((window // 5).tolist())
        # a window is whole blocks (the last block of 3 images is short) in shuffled order
        assert sorted(window.tolist()) == sorted(i for b in blocks for i in range(5 * b, min(5 * b + 5, 103)))
    seen = [r for batch in rows(loader) for r in batch]
    assert seen == order.tolist()  # the batches follow the order, each image once
    assert rows(loader, 7) == rows(loader)[7:]  # a resume mid-epoch (mid-window) continues it exactly
    again = streaming(103, block=5, window_blocks=4)
    assert torch.equal(again.epoch_order(), order)  # a function of (seed, epoch)
    again.set_epoch(1)
    assert not torch.equal(again.epoch_order(), order)


def test_it_reads_the_stored_rows_of_its_split_and_ranks_share_the_draws():
    split = torch.tensor(sorted(np.random.default_rng(0).choice(200, 90, replace=False).tolist()))
    one = streaming(200, block=4, window_blocks=3, batch_size=8, indices=split)
    seen = sorted(r for batch in rows(one) for r in batch)
    assert seen == split.tolist()
    ranks = [streaming(200, block=4, window_blocks=3, batch_size=4, indices=split) for _ in range(2)]
    for r, rank in enumerate(ranks):
        rank.shard(r, 2)
    together = [a + b for a, b in zip(rows(ranks[0]), rows(ranks[1]))]
    assert together == rows(one)[:len(together)] and len(together) == 90 // 8  # drop_last under two ranks
    with pytest.raises(ValueError, match="indices must be sorted"):
        streaming(200, block=4, window_blocks=3, indices=split.flip(0))


@pytest.fixture(scope="module")
def array_file(tmp_path_factory):
    x, y = arrays(900, 4, 16, 16, 3)  # 900 x 768 bytes: 675 KiB
    path = tmp_path_factory.mktemp("beyond") / "data.npz"
    np.savez(path, train_x=x, train_y=y)
    return path


def mapped_from(address):
    """The file whose memory mapping holds `address` in this process, or None (anonymous memory)."""
    for line in open("/proc/self/maps"):
        span, *rest = line.split(maxsplit=5)
        low, high = (int(a, 16) for a in span.split("-"))
        if low <= address < high:
            return rest[-1].strip() if len(rest) == 5 and rest[-1].startswith("/") else None
    return None


def test_over_the_budget_it_trains_from_the_mapped_cache_on_the_same_images(array_file):
    kept = TensorsFile(**common(path=str(array_file), memory_budget_gib=None))
    streamed = TensorsFile(**common(path=str(array_file), memory_budget_gib=256 * KIB, batch_size=32))
    assert not kept.streaming and isinstance(kept.train, BatchLoader) and not isinstance(kept.train, StreamingLoader)
    assert streamed.streaming and isinstance(streamed.train, StreamingLoader)
    assert streamed.digest == kept.digest and streamed.train.num_items == kept.train.num_items == 720
    assert mapped_from(streamed.train.images.data_ptr()) == str(streamed.cache_file)  # not read into memory
    assert mapped_from(kept.train.images.data_ptr()) is None

    def epoch(loader):
        return sorted(tuple(int(v) for v in x.flatten()[:8]) + (int(y),) for xs, ys in loader for x, y in zip(xs, ys))

    assert epoch(streamed.train) == epoch(kept.train)  # the same training images and labels, once each
    for split in ("val", "test"):
        assert epoch(getattr(streamed, split)) == epoch(getattr(kept, split))


def test_an_image_folder_over_the_budget_decodes_into_a_scratch_file_not_memory(tmp_path):
    folder = mixed_folder(tmp_path / "photos", ["a", "b", "c"], 300)  # 300 x 3 x 24 x 24: 506 KiB
    streamed = ImageFolder(**common(path=str(folder), memory_budget_gib=256 * KIB, batch_size=16, image_size=None,
                                    channels=None, labels=None))
    assert streamed.streaming and not list(folder.glob(".*.tmp"))  # the scratch file is gone once cached
    assert len(list(folder.glob("*.cache.pt"))) == 1
    for cache in folder.glob("*.cache.pt"):
        cache.unlink()
    kept = ImageFolder(**common(path=str(folder), image_size=None, channels=None, labels=None))
    assert kept.digest == streamed.digest  # decoded to disk or in memory: the same bytes


@pytest.mark.parametrize("overrides, words", [
    ({"memory_budget_gib": 64 * KIB, "batch_size": 128}, "dataset.memory_budget_gib=6.103515625e-05: a window of a "
     "quarter of it (16.0 KiB) is smaller than one batch of 128 images (96.0 KiB); raise it or lower "
     "dataset.batch_size"),
    ({"memory_budget_gib": 256 * KIB, "cache": False}, "training beyond memory reads them from the cache on disk: "
     "set dataset.cache=true"),
    ({"memory_budget_gib": 256 * KIB, "sampler": "balanced"}, "use loss.class_weights=auto instead"),
    ({"memory_budget_gib": -1}, "dataset.memory_budget_gib=-1: must be a number > 0 (GiB), or null"),
])
def test_a_budget_it_cannot_work_with_is_one_line_and_leaves_nothing(array_file, overrides, words):
    before = sorted(p.name for p in array_file.parent.iterdir())
    with pytest.raises(UserError) as e:
        TensorsFile(**common(path=str(array_file), **overrides))
    assert words in str(e.value) and "\n" not in str(e.value)
    assert not [p for p in array_file.parent.iterdir() if p.name.endswith(".tmp")]
    assert set(before) <= {p.name for p in array_file.parent.iterdir()}


def test_train_py_over_the_budget(array_file, tmp_path):
    result = run_train("dataset=tensors", f"dataset.path={array_file}", "model=mlp", "model.hidden_sizes=[32]",
                       "trainer.max_epochs=2", "dataset.batch_size=32", f"dataset.memory_budget_gib={256 * KIB}",
                       f"output_root={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    said = result.stdout + result.stderr
    assert "over dataset.memory_budget_gib (256.0 KiB): training reads them from" in said
    assert "test/acc" in said
