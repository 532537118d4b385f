"""Files from elsewhere, crafted the way issue 24 found them, through the real commands: each is refused in one
line, within a stated time and a stated amount of memory above a bare process's (tests/bounded.py).

Every file is made here from real formats (torch.save, np.savez, zip, PNG, YAML, JSON) and a real tiny run.
The bound is the process's peak resident memory above `baseline_mib()`; each case before its fix was killed at
6 GB (or hung), so the cap below is what turns a regression into a clear failure instead of a dead machine.
"""

from __future__ import annotations

import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from bounded import baseline_mib, run_bounded
from conftest import MLP, REPO, TINY, run_train

ABOVE_MIB = 512  # the memory a refusal may take above a bare process that imports what the commands import
SECONDS = 30  # and the time: start-up (torch, Hydra) is most of it
CAP_MIB = 3072  # the watchdog: a case past this is killed and reported, not left to take the machine


def refused(argv: list[str], says: str) -> str:
    """Run `python ARGV...` under the bounds; assert one `error:` line containing `says`, in bounds."""
    done = run_bounded(argv, cap_mib=CAP_MIB, timeout=120)
    line = done.one_line()
    assert says in line, line
    assert done.peak_mib < baseline_mib() + ABOVE_MIB, f"peak {done.peak_mib:.0f} MiB, baseline {baseline_mib():.0f}"
    assert done.seconds < SECONDS, f"{done.seconds:.1f} s"
    print(f"refused in {done.seconds:.1f} s at {done.peak_mib - baseline_mib():.0f} MiB above baseline: {line}")
    return line


OWN_DATA = tuple(o for o in TINY if not o.startswith("dataset.verify="))  # TINY, less MNIST's own option


def train(*overrides: str) -> list[str]:
    return [str(REPO / "train.py"), *OWN_DATA, *MLP, "trainer.max_epochs=1", *overrides]


def tensors(path: Path, tmp: Path) -> list[str]:
    return train("dataset=tensors", f"dataset.path={path}", f"output_root={tmp / 'out'}")


# --- item 5: the tensors dataset -------------------------------------------------------------------------------------


def npy_header(shape: tuple[int, ...], dtype: str = "|u1") -> bytes:
    """The bytes np.save writes before an array's data (format 1.0), as np.lib.format makes them."""
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue()  # magic, version, length, the header dict


def raw_zip(path: Path, members: list[tuple[str, bytes, int, int, int]]) -> None:
    """A zip file of (name, stored bytes, method, declared size, crc) members, written as they are: a zip bomb's
    directory declares what its deflated data inflates to, which zipfile would compute by inflating it."""
    out, central = bytearray(), bytearray()
    for name, data, method, size, crc in members:
        local = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0, crc, len(data), size, len(name), 0)
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, method, 0, 0, crc, len(data), size,
                               len(name), 0, 0, 0, 0, 0, len(out)) + name.encode()
        out += local + name.encode() + data
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members), len(central), len(out), 0)
    path.write_bytes(bytes(out + central + end))


def test_a_pt_of_zero_stride_tensors_is_refused_before_it_is_copied(tmp_path):
    # 1.9 KB on disk, 3.1 GB once copied: one stored element, viewed 3.1e9 times
    path = tmp_path / "views.pt"
    torch.save({"train_x": torch.zeros(1, dtype=torch.uint8).expand(4_000_000, 28, 28),
                "train_y": torch.zeros(1, dtype=torch.int64).expand(4_000_000)}, path)
    assert path.stat().st_size < 4096
    refused(tensors(path, tmp_path), "its tensor train_x of shape (4000000, 28, 28) is a view of 3136000000")
    assert [p.name for p in tmp_path.iterdir() if "cache" in p.name] == []  # no 2.4 GB cache beside it


def test_an_npz_declaring_more_than_memory_is_refused_from_its_header(tmp_path):
    # the array header declares 1.6 TB (the was 31 GB: more than any machine this runs on is the point)
    header = npy_header((2_000_000_000, 28, 28))
    data = header + bytes(64)
    path = tmp_path / "huge.npz"
    raw_zip(path, [("train_x.npy", data, 0, len(data), zlib.crc32(data)),
                   ("train_y.npy", npy_header((4,), "<i8") + bytes(32), 0, len(npy_header((4,), "<i8")) + 32,
                    zlib.crc32(npy_header((4,), "<i8") + bytes(32)))])
    line = refused(tensors(path, tmp_path), "more than this machine's")
    assert "the arrays of huge.npz (its train_x.npy alone 1460.3 GiB)" in line and "image_size" not in line, line


def zip_bomb_member(header: bytes, gib: int) -> tuple[bytes, int]:
    """Deflate data inflating to `header` and `gib` GiB of zeros, made without deflating that much: after a full
    flush a deflate block depends on nothing before it, so one block of 64 MiB of zeros is repeated."""
    chunk = bytes(64 * 2**20)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = c.compress(header) + c.flush(zlib.Z_FULL_FLUSH)
    block = c.compress(chunk) + c.flush(zlib.Z_FULL_FLUSH)
    count = gib * 16
    return head + block * count + c.flush(), len(header) + count * len(chunk)


def test_an_npz_zip_bomb_is_refused_before_it_is_inflated(tmp_path):
    # the was 7.6 MB inflating to 7 GiB, killed at 6 GB after 43 s; 3 GiB here, past CAP_MIB, in a plain
    # zip (a member past 4 GiB needs zip64 records)
    header = npy_header((3 * 2**30 // 784, 28, 28))
    data, size = zip_bomb_member(header, 3)
    path = tmp_path / "bomb.npz"
    raw_zip(path, [("train_x.npy", data, 8, size, 0)])  # the CRC is never reached: refused before
    assert path.stat().st_size < 10 * 2**20
    refused(tensors(path, tmp_path), "(a zip bomb, not data")


# --- items 10, 12, 15: resuming a run directory copied in from elsewhere ---------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_root):
    """A real tiny run that trained and tested: the model of predict.py's case and the pattern of the others."""
    out = tmp_path_factory.mktemp("runs")
    run = out / "run"
    result = run_train(*TINY, *MLP, f"dataset.root={tiny_root}", "trainer.max_epochs=1",
                       "trainer.limit_train_batches=4", "trainer.limit_eval_batches=1", "scheduler=none",
                       f"hydra.run.dir={run}", f"output_root={out}")
    assert result.returncode == 0, result.stderr
    return run


@pytest.fixture
def copied_run(finished_run, tmp_path):
    """A copy of the finished run, as one copied in from another machine, under its own output root."""
    run = tmp_path / "outputs" / "2026-12-04" / "10-00-00"
    shutil.copytree(finished_run, run, symlinks=True)
    (run / ".lock").unlink(missing_ok=True)
    return run


def resume(run: Path, root: Path) -> list[str]:
    return [str(REPO / "train.py"), *TINY, *MLP, f"dataset.root={root}", "trainer.max_epochs=2",
            "trainer.limit_train_batches=4", "trainer.limit_eval_batches=1", "scheduler=none",
            f"trainer.resume={run / 'checkpoints' / 'last.pt'}", f"output_root={run.parents[2]}"]


def test_resume_with_metrics_json_linked_to_dev_zero_is_one_line(copied_run, tiny_root):
    (copied_run / "metrics.json").unlink()
    (copied_run / "metrics.json").symlink_to("/dev/zero")
    refused(resume(copied_run, tiny_root), "metrics.json: is a character device, not a regular file")


def test_a_lock_symlink_in_a_resumed_run_is_not_followed(copied_run, tiny_root, tmp_path):
    target = tmp_path / "elsewhere" / "created-through-the-link"
    target.parent.mkdir()
    (copied_run / ".lock").symlink_to(target)
    refused(resume(copied_run, tiny_root), f"{copied_run / '.lock'} is a symbolic link")
    assert not target.exists()


def test_a_resume_into_a_read_only_run_directory_is_one_line_naming_it(copied_run, tiny_root):
    # a run directory on a read-only file system: the resume said OSError(30, 'Read-only file system'), no path
    import subprocess

    (copied_run / "metrics.json").unlink()
    bind = subprocess.run(["mount", "--bind", str(copied_run), str(copied_run)], capture_output=True)
    if bind.returncode != 0:
        pytest.skip(f"cannot bind-mount here ({bind.stderr.decode().strip()})")
    try:
        ro = subprocess.run(["mount", "-o", "remount,bind,ro", str(copied_run)], capture_output=True)
        if ro.returncode != 0:
            pytest.skip(f"cannot remount read-only here ({ro.stderr.decode().strip()})")
        refused(resume(copied_run, tiny_root), f"cannot lock {copied_run} for this run: Read-only file system "
                f"({copied_run / '.lock'})")
    finally:
        subprocess.run(["umount", "-l", str(copied_run)], check=False)


# --- item 12: predict.py ---------------------------------------------------------------------------------------------


def test_predict_on_a_30000_pixel_square_png_is_one_line(finished_run, tmp_path):
    # the PNG header declares 30000x30000; Pillow refuses it from that (DecompressionBombError) before decoding
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    png = tmp_path / "huge.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0))
                    + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    refused([str(REPO / "scripts" / "predict.py"), str(finished_run / "checkpoints" / "best.pt"), str(png)],
            f"{png}: not a readable image (DecompressionBombError")


# --- items 10, 12: run directories read by summarize.py and resume=auto; a data folder; the command line -------------


def summarize(root: Path) -> list[str]:
    return [str(REPO / "scripts" / "summarize.py"), str(root)]


# 340 KB of YAML: one 100 KB override and 60,000 aliases of it. Loaded, it is a list of 60,000 references to one
# string, which summarize.py joined into its overrides column: 6 GB.
ALIASES = '- &a "' + "x" * 100_000 + '"\n' + "- *a\n" * 60_000


# what each file of a copied run becomes, and what the refusal says
COPIED_RUN_FILES = {
    "metrics.json links to /dev/zero": ("metrics.json", lambda p: p.symlink_to("/dev/zero"),
                                        "metrics.json: is a character device, not a regular file"),
    "metrics.json is a FIFO": ("metrics.json", os.mkfifo, "metrics.json: is a FIFO (named pipe), not a regular file"),
    "metrics.json is not JSON": ("metrics.json", lambda p: p.write_text('{"test/acc": 0.5,'),
                                 "metrics.json: not valid JSON"),
    "overrides.yaml of YAML aliases": (".hydra/overrides.yaml", lambda p: p.write_text(ALIASES),
                                       "overrides.yaml: uses a YAML alias (*a)"),
    "overrides.yaml nested 5000 deep": (".hydra/overrides.yaml", lambda p: p.write_text("[" * 5000 + "]" * 5000),
                                        "overrides.yaml: nests deeper than 32 levels"),
}


@pytest.mark.parametrize("case", COPIED_RUN_FILES)
def test_summarize_reads_a_copied_run_directory_within_bounds(copied_run, case):
    name, make, says = COPIED_RUN_FILES[case]
    (copied_run / name).unlink()
    make(copied_run / name)
    refused(summarize(copied_run.parents[2]), says)


def test_resume_auto_passes_over_a_run_directory_it_cannot_read(copied_run, tiny_root, tmp_path):
    # an unfinished run copied in, whose overrides.yaml is malformed: resume=auto warns and passes it over (it
    # stopped every resume=auto under the output root with a traceback)
    (copied_run / "metrics.json").unlink()
    (copied_run / ".hydra" / "overrides.yaml").write_text("- model=mlp\n- [unclosed\n")
    done = run_bounded([str(REPO / "train.py"), *TINY, *MLP, f"dataset.root={tiny_root}", "trainer.resume=auto",
                        f"output_root={copied_run.parents[2]}", "optimized_metric=no/such"],
                       cap_mib=CAP_MIB, timeout=120)
    line = done.one_line()  # refused afterwards for a value of its own: a run is not trained to test this
    assert line.startswith("optimized_metric=no/such: must be one of"), line
    assert f"trainer.resume=auto: passing over {copied_run}" in done.stdout + done.stderr
    assert done.peak_mib < baseline_mib() + ABOVE_MIB and done.seconds < SECONDS, (done.peak_mib, done.seconds)


def test_a_symlink_loop_in_an_image_folder_is_one_line(tmp_path):
    from image_data import image_folder

    image_folder(tmp_path / "d", ["a", "b"], 3)
    (tmp_path / "d" / "a" / "again").symlink_to(tmp_path / "d" / "a")
    refused(train("dataset=image_folder", f"dataset.path={tmp_path / 'd'}", f"output_root={tmp_path / 'out'}"),
            f"{tmp_path / 'd' / 'a' / 'again'}: a symbolic link back to a folder already read")


def test_an_override_nested_3000_deep_is_one_line(tmp_path):
    nested = "[" * 3000 + "]" * 3000
    refused(train(f"model.hidden_sizes={nested}", f"output_root={tmp_path / 'out'}"),
            "model.hidden_sizes=...: nested 3000 levels deep; at most 32")
