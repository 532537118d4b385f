"""dataset=image_folder with dataset.labels: multi-label and regression targets from a CSV beside the images.

Each image's grey level encodes its index (10 * i), so every check can tell which image a target travelled with.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from conftest import run_train
from data_args import common
from PIL import Image

import trainer.data.image_folder as image_folder_module
from trainer.data import ImageFolder
from trainer.errors import UserError

N = 12
NAMES = {"values": ["angle", "size"], "multi_hot": ["cat", "dog", "sun"]}


def target(kind: str, i: int) -> list[float]:
    """Image i's targets: two numbers (regression), or the three low bits of i (multi-label)."""
    return [i * 1.5, -i / 4] if kind == "values" else [float(i >> bit & 1) for bit in range(3)]


def folder(root, n: int = N, prefix: str = "sub/dir/"):
    """root/<prefix><i>.png, 8x8 grey of level 10 * i; returns the paths as a CSV lists them."""
    names = []
    for i in range(n):
        (root / prefix).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8), 10 * i, np.uint8)).save(root / f"{prefix}{i}.png")
        names.append(f"{prefix}{i}.png")
    return names


def write_csv(path, kind: str, files: list[str], start: int = 0, newline: str = "\n", bom: bool = False):
    lines = [",".join(["file", *NAMES[kind]])]
    lines += [",".join([f, *(f"{v:g}" for v in target(kind, start + j))]) for j, f in enumerate(files)]
    path.write_text(("\ufeff" if bom else "") + newline.join(lines) + newline, encoding="utf-8", newline="")
    return path


def make(root, labels, targets: str = "values", **overrides):
    return ImageFolder(path=str(root), labels=None if labels is None else str(labels), image_size=None,
                       channels=None, targets=targets,
                       **common(**{"val_size": 2, "test_size": 2, "cache": False, **overrides}))


def pairs(data) -> dict[int, list[float]]:
    """{image index (from its grey level): its targets} over the train, val and test splits."""
    out = {}
    for loader in (data.train, data.val, data.test):
        x, y = loader.raw()
        for image, row in zip(x, y):
            out[int(image[0, 0, 0]) // 10] = row.tolist()
    return out


@pytest.mark.parametrize("kind", ["values", "multi_hot"])
def test_targets_travel_with_their_images(tmp_path, kind):
    files = folder(tmp_path / "d")
    (tmp_path / "d" / "sub" / "dir" / "unlisted.png").write_bytes(b"not even a PNG: never read")
    csv = write_csv(tmp_path / "labels.csv", kind, files, newline="\r\n", bom=True)  # as spreadsheets save it
    data = make(tmp_path / "d", csv, kind)
    assert data.classes == tuple(NAMES[kind])
    assert (data.train.num_items, data.val.num_items, data.test.num_items) == (8, 2, 2)
    x, y = data.train.raw()
    assert (x.dtype, x.shape[1:], y.dtype, y.shape) == (torch.uint8, (1, 8, 8), torch.float32, (8, len(NAMES[kind])))
    assert pairs(data) == {i: target(kind, i) for i in range(N)}


def test_split_layout_rows_go_to_their_folders(tmp_path):
    root = tmp_path / "d"
    train, test = folder(root, 10, "train/x/"), folder(root, 3, "test/")
    rows = [*train, *test]
    data = make(root, write_csv(tmp_path / "labels.csv", "values", rows), test_size=5)  # test/ is used instead
    assert (data.train.num_items, data.val.num_items, data.test.num_items) == (8, 2, 3)
    assert data.test.indices is None  # its own images, not held out of train
    assert sorted(int(v) // 10 for v in data.test.raw()[0][:, 0, 0, 0]) == [0, 1, 2]
    assert sorted(row[0] for row in data.test.raw()[1].tolist()) == [15.0, 16.5, 18.0]  # rows 10-12 of the CSV


def test_task_and_labels_file_must_agree(tmp_path):
    root = tmp_path / "d"
    folder(root, 4, "a/")
    with pytest.raises(UserError) as no_file:
        make(root, None, "values")
    assert str(no_file.value) == ("task=regression reads its targets from a labels file: set dataset.labels=FILE.csv "
                                  "(class folders give class indices only)")
    with pytest.raises(UserError, match=r"^task=multilabel reads its targets from a labels file"):
        make(root, None, "multi_hot")
    csv = write_csv(tmp_path / "labels.csv", "values", ["a/0.png"])
    with pytest.raises(UserError) as classes:
        make(root, csv, "class")
    assert str(classes.value) == (f"dataset.labels={csv}: a labels file is for task=multilabel or task=regression; "
                                  "for classification use class folders")


REFUSED = [  # (kind, the CSV's text, what the one-line message says)
    ("values", "", "empty; the first row is file,<column1>,<column2>,..."),
    ("values", "file,angle\n", "no image rows after its header"),
    ("values", "name,angle\n0.png,1\n", "line 1: the header starts with 'name', not file"),
    ("values", "file\n0.png\n", "line 1: no column names after file"),
    ("multi_hot", "file,cat,cat\n0.png,1,0\n", "line 1: label name 'cat' appears twice"),
    ("values", "file,angle,\n0.png,1,2\n", "line 1: column 2 has no name"),
    ("values", "file,angle,size\n0.png,1\n", "line 2: 2 fields, not 3 (the file, then one value for each of "
                                             "angle, size)"),
    ("values", "file,angle\n0.png,1\n1.png,1,2\n", "line 3: 3 fields, not 2"),
    ("values", "file,angle\n0.png,abc\n", "line 2: 'abc' for column 'angle'; each value is a finite number"),
    ("values", "file,angle\n0.png,\n", "line 2: '' for column 'angle'; each value is a finite number"),
    ("values", "file,angle\n0.png,nan\n", "line 2: 'nan' for column 'angle'"),
    ("values", "file,angle\n0.png,-inf\n", "line 2: '-inf' for column 'angle'"),
    ("values", "file,angle\n0.png,1e39\n", "line 2: '1e39' for column 'angle'; each value is a finite number (at most"),
    ("multi_hot", "file,cat\n0.png,2\n", "line 2: '2' for label 'cat'; each label is 0 (absent) or 1 (present)"),
    ("multi_hot", "file,cat\n0.png,yes\n", "line 2: 'yes' for label 'cat'; each label is 0 (absent) or 1 (present)"),
    ("values", "file,angle\n0.png,1\n\n./0.png,2\n", "line 4: './0.png' is listed twice (first on line 2)"),
    ("values", "file,angle\n/etc/passwd.png,1\n", "line 2: file '/etc/passwd.png' is an absolute path"),
    ("values", "file,angle\n../d/0.png,1\n", "line 2: file '../d/0.png' goes up with '..'"),
    ("values", "file,angle\nsub/../0.png,1\n", "line 2: file 'sub/../0.png' goes up with '..'"),
    ("values", "file,angle\nsub\\0.png,1\n", "line 2: file 'sub\\\\0.png' has a backslash"),
    ("values", "file,angle\nmissing.png,1\n", "line 2: file 'missing.png': cannot read"),
    ("values", "file,angle\nnotes.txt,1\n", "line 2: file 'notes.txt' is not an image file (one of .bmp"),
    ("values", "file,angle\nfolder.png,1\n", "line 2: file 'folder.png' is a directory, not an image file"),
    ("values", "file,angle\n\"0.png\n\",1\n", "line 3: file '0.png\\n' is not an image file"),
]


@pytest.mark.parametrize("kind, text, message", REFUSED, ids=[m[:40] for _, _, m in REFUSED])
def test_a_bad_labels_file_is_refused_in_one_line(tmp_path, kind, text, message):
    root = tmp_path / "d"
    folder(root, 2, "")
    (root / "notes.txt").write_text("not an image")
    (root / "folder.png").mkdir()
    csv = tmp_path / "labels.csv"
    csv.write_text(text, newline="")
    with pytest.raises(UserError) as refused:
        make(root, csv, kind)
    assert str(refused.value).startswith(f"dataset.labels={csv}"), refused.value
    assert message in str(refused.value) and "\n" not in str(refused.value), refused.value


def test_a_split_layout_row_outside_the_splits_is_refused(tmp_path):
    root = tmp_path / "d"
    folder(root, 4, "train/")
    folder(root, 2, "test/")
    folder(root, 1, "other/")
    csv = write_csv(tmp_path / "labels.csv", "values", ["train/0.png", "other/0.png"])
    with pytest.raises(UserError, match=r"line 3: 'other/0.png' is not under train/, val/ or test/"):
        make(root, csv)


def test_unreadable_oversized_and_non_utf8_files_are_refused_before_parsing(tmp_path, monkeypatch):
    root = tmp_path / "d"
    folder(root, 2, "")
    with pytest.raises(UserError, match=r"labels=.*nope\.csv: cannot read it \(No such file or directory\)"):
        make(root, tmp_path / "nope.csv")
    os.mkfifo(tmp_path / "fifo.csv")  # opened without blocking: refused at once, not waited on
    with pytest.raises(UserError, match=r"fifo\.csv: is a FIFO \(named pipe\), not a regular file"):
        make(root, tmp_path / "fifo.csv")
    with pytest.raises(UserError, match=r"labels=.*/d: is a directory, not a regular file; give a CSV file$"):
        make(root, root)
    csv = write_csv(tmp_path / "labels.csv", "values", ["0.png", "1.png"])
    monkeypatch.setattr(image_folder_module, "_labels_bytes_limit", lambda: 20)
    with pytest.raises(UserError, match=r"labels\.csv: larger than 20 B, the most a labels file may be on this "
                                        r"machine \(a 64th of its .* of memory\)$"):
        make(root, csv)
    monkeypatch.undo()
    csv.write_bytes(b"file,angle\n0.png,1\n\xff.png,2\n")
    with pytest.raises(UserError, match=r"labels\.csv line 3: not UTF-8 text \(byte 19\); save the CSV as UTF-8$"):
        make(root, csv)
    with pytest.raises(UserError, match=r"^dataset\.path=.*0\.png: not a directory"):
        make(root / "0.png", csv)


def test_the_cache_follows_the_labels_file(tmp_path, monkeypatch):
    root = tmp_path / "d"
    files = folder(root, N, "")
    csv = write_csv(tmp_path / "labels.csv", "values", files)
    reads = []
    real_read = ImageFolder.read
    monkeypatch.setattr(ImageFolder, "read", lambda self: reads.append(1) or real_read(self))
    first = make(root, csv, cache=True)
    assert first.cache_file.is_file() and first.cache_file.parent == root and len(reads) == 1
    assert make(root, csv, cache=True).digest == first.digest and len(reads) == 1  # a hit
    write_csv(csv, "values", files, start=1)  # other targets for the same images
    os.utime(csv, ns=(0, 10**9))  # another time, however quick the file system's clock
    changed = make(root, csv, cache=True)
    assert len(reads) == 2 and changed.digest != first.digest
    assert pairs(changed) == {i: target("values", i + 1) for i in range(N)}
    other = write_csv(tmp_path / "other.csv", "values", files)  # the same content, another file: its own cache
    assert make(root, other, cache=True).cache_file != changed.cache_file and len(reads) == 3
    # the class-folder key is what it was before labels files: no new option in it
    folder(tmp_path / "c", 4, "k/")
    classes = ImageFolder(path=str(tmp_path / "c"), image_size=None, channels=None, **common(cache=False))
    assert set(classes.cache_options()) == {"path", "image_size", "channels"}


def _metrics(out) -> dict:
    return json.loads(next(out.rglob("metrics.json")).read_text())


@pytest.mark.parametrize("task, kind, metric", [("regression", "values", "test/mae"),
                                                ("multilabel", "multi_hot", "test/map")])
def test_train_py_reads_a_labels_file(tmp_path, task, kind, metric):
    root = tmp_path / "d"
    csv = write_csv(tmp_path / "labels.csv", kind, folder(root, 24, "imgs/"))
    out = tmp_path / "out"
    result = run_train(f"task={task}", "dataset=image_folder", f"dataset.path={root}", f"dataset.labels={csv}",
                       "model=mlp", "trainer.max_epochs=1", "debug=fast_dev_run", "scheduler=none",
                       "dataset.batch_size=8", "trainer.device=cpu", f"output_root={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert metric in result.stdout + result.stderr
    assert metric in _metrics(out)
    if task == "regression":  # eval.py: the folder from data_root, the labels file from labels=: none from the file
        ckpt = next(out.rglob("best.pt"))
        refused = run_train(f"ckpt={ckpt}", f"data_root={root}", "device=cpu", f"output_root={out}",
                            script="eval.py")
        assert refused.returncode == 1 and refused.stderr == (
            "error: the checkpoint's targets came from a labels file (dataset.labels on the machine it was trained "
            "on, which is never read from the file); say where it is here: labels=FILE.csv\n")
        evaluated = run_train(f"ckpt={ckpt}", f"data_root={root}", f"labels={csv}", "device=cpu",
                              f"output_root={out}", script="eval.py")
        assert evaluated.returncode == 0, evaluated.stderr[-3000:]
        assert metric in json.loads(next((out / "eval").rglob("metrics.json")).read_text())


@pytest.mark.parametrize("task, with_labels, says", [
    ("regression", False, "error: task=regression reads its targets from a labels file: set dataset.labels=FILE.csv "
                          "(class folders give class indices only)"),
    ("classification", True, "error: dataset.labels={csv}: a labels file is for task=multilabel or task=regression; "
                             "for classification use class folders"),
    ("multilabel", True, "error: dataset.labels={csv} line 3: '0.5' for label 'cat'; each label is 0 (absent) or 1 "
                         "(present)"),
])
def test_train_py_refuses_in_one_line_and_leaves_no_run(tmp_path, task, with_labels, says):
    root = tmp_path / "d"
    folder(root, 4, "k/")
    csv = tmp_path / "labels.csv"
    csv.write_text("file,cat\nk/0.png,1\nk/1.png,0.5\n")
    out = tmp_path / "out"
    result = run_train(f"task={task}", "dataset=image_folder", f"dataset.path={root}",
                       *([f"dataset.labels={csv}"] if with_labels else []), "trainer.device=cpu", f"output_root={out}")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines() == [says.format(csv=csv)]
    assert not out.exists() or not list(out.rglob("*"))
