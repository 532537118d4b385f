"""tests/forkserver.py runs a script as a fresh `python` process would: the same exit code, standard streams,
argv, sys.path, atexit handlers, traceback and death by a signal (docs/development.md)."""

import os
import sys

import conftest
import pytest
from conftest import REPO, run_python

# Every case also starts a fresh interpreter (about 5 s of imports each): the slow tier, which CI runs.
pytestmark = pytest.mark.slow

CASES = {
    "refused override": [str(REPO / "train.py"), "model=nope"],
    "argv, path, cwd and exit code": ["-c", "import os, sys; print(sys.argv, repr(sys.path[0]), os.getcwd()); "
                                            "sys.stdout.write('unflushed'); sys.exit(3)", "a", "b=c"],
    "atexit at the end": ["-c", "import atexit, sys; atexit.register(lambda: print('bye', file=sys.stderr))"],
    "uncaught exception": ["-c", "def f():\n    raise ValueError('boom')\nf()"],
    "killed by a signal": ["-c", "import os, signal; print('before', flush=True); "
                                 "os.kill(os.getpid(), signal.SIGTERM)"],
    "KeyboardInterrupt": ["-c", "raise KeyboardInterrupt"],
    "environment": ["-c", "import os; print(os.environ.get('FORKED_TEST_VAR'), 'LD_PRELOAD' in os.environ)"],
}


@pytest.mark.parametrize("argv", CASES.values(), ids=CASES)
def test_a_forked_run_is_what_a_fresh_process_gives(argv):
    env = {**os.environ, "FORKED_TEST_VAR": "42"}
    forked = run_python(argv, env=env, timeout=120, forkable=True)
    fresh = run_python(argv, env=env, timeout=120, forkable=False)
    assert conftest._fork_server is not None and conftest._fork_server.serves(env)  # really forked
    assert (forked.returncode, forked.stdout, forked.stderr) == (fresh.returncode, fresh.stdout, fresh.stderr)


def test_an_environment_that_acts_at_start_up_gets_a_fresh_process():
    env = {**os.environ, "TRAINER_ALLOCATOR": "system"}
    run_python(["-c", "pass"], env=os.environ.copy(), timeout=120, forkable=True)  # the server is up
    assert not conftest._fork_server.serves(env)
    probe = ("from trainer.cli.allocator import preload_mimalloc; preload_mimalloc(); "
             "from trainer.system import allocator_in_use; print(allocator_in_use())")
    result = run_python(["-c", probe], env=env, timeout=120, forkable=True)
    assert result.stdout.split() == ["system"] or sys.platform != "linux", result.stderr
