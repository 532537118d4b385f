"""train.py re-executes itself once with mimalloc preloaded (trainer/cli/allocator.py): it must really run under
mimalloc, leave child processes and a user's own allocator alone, and be switchable off."""

import json
import os
import subprocess
import sys

import pytest
from conftest import TINY, run_train

from trainer.cli.allocator import mimalloc_library

pytestmark = pytest.mark.skipif(sys.platform != "linux" or mimalloc_library() is None,
                                reason="mimalloc is preloaded on Linux with cmeel-mimalloc installed")

# A script that preloads as train.py does, then says what it runs under and what its children would inherit.
PROBE = ("from trainer.cli.allocator import preload_mimalloc; preload_mimalloc(); "
         "from trainer.system import allocator_in_use; import os; "
         "print(allocator_in_use(), repr(os.environ.get('LD_PRELOAD')), '_TRAINER_MIMALLOC_PRELOADED' in os.environ)")


def probe(env: dict[str, str]) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "TRAINER_ALLOCATOR")}
    return subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env={**clean, **env},
                          timeout=60)


def test_preload_reexecutes_under_mimalloc_and_children_inherit_nothing():
    result = probe({})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["mimalloc", "None", "False"]


def test_callers_ld_preload_is_kept_beside_it():
    libm = next(p for p in ("/lib/x86_64-linux-gnu/libm.so.6", "/usr/lib/x86_64-linux-gnu/libm.so.6",
                            "/lib64/libm.so.6", "/lib/aarch64-linux-gnu/libm.so.6") if os.path.exists(p))
    result = probe({"LD_PRELOAD": libm})
    assert result.stdout.split() == ["mimalloc", repr(libm), "False"], result.stderr


def test_users_own_allocator_is_left_alone():
    result = probe({"LD_PRELOAD": "/nonexistent/libtcmalloc.so"})  # ld.so warns that it cannot load it, and runs on
    assert result.stdout.split() == ["system", "'/nonexistent/libtcmalloc.so'", "False"], result.stderr


def test_opt_out_and_bad_choice():
    assert probe({"TRAINER_ALLOCATOR": "system"}).stdout.split()[0] == "system"
    bad = probe({"TRAINER_ALLOCATOR": "tcmalloc"})
    assert bad.returncode == 1
    assert bad.stderr.strip() == "error: TRAINER_ALLOCATOR='tcmalloc': use one of mimalloc, system"


def test_an_impossible_allocation_fails_at_once_under_mimalloc():
    """mimalloc maps with MAP_NORESERVE, so torch.empty of 3 TB "succeeded" and filling it ended in an out-of-memory
    kill; under the RLIMIT_DATA cap the preloaded process sets, it fails at once, as under glibc (issue 24)."""
    code = ("from trainer.cli.allocator import preload_mimalloc; preload_mimalloc(); "
            "from trainer.system import allocator_in_use; import torch\n"
            "try:\n    torch.empty(3 << 40, dtype=torch.uint8)\nexcept RuntimeError as e:\n"
            "    print(allocator_in_use(), 'refused:', str(e).splitlines()[0])\n")
    clean = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "TRAINER_ALLOCATOR")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=clean, timeout=60)
    assert result.stdout.startswith("mimalloc refused:") and "can't allocate memory" in result.stdout, result


@pytest.mark.parametrize("choice", ["mimalloc", "system"])
def test_train_py_records_its_allocator(tiny_root, tmp_path, choice):
    run_dir = tmp_path / "run"
    result = run_train(*TINY, f"dataset.root={tiny_root}", "model=mlp", "trainer.max_epochs=1",
                       f"hydra.run.dir={run_dir}", env={"TRAINER_ALLOCATOR": choice})
    assert result.returncode == 0, result.stderr
    assert json.loads((run_dir / "metrics.json").read_text())["allocator"] == choice
    assert f"(malloc: {choice})" in result.stderr + result.stdout
