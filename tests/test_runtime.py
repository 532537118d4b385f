"""trainer.cli.process.run_then_exit: a script's exit status, atexit handlers and buffered output survive the exit
that skips the interpreter's teardown."""

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import atexit, sys
    from trainer.cli.process import run_then_exit

    def main():
        atexit.register(lambda: print("atexit ran", file=sys.stderr))
        print("unflushed output", end="")  # still in Python's buffer when main returns
        {body}

    run_then_exit(main)
    print("never reached")
""")


@pytest.mark.parametrize("body, code, stderr", [
    ("return 5", 0, "atexit ran"),  # main's return value is not the status (hydra.main returns the sweep result)
    ("sys.exit(3)", 3, "atexit ran"),
    ("sys.exit(None)", 0, "atexit ran"),
    ("sys.exit('error: a message')", 1, "error: a message"),  # left to the normal exit, which prints it
    ("raise ValueError('boom')", 1, "ValueError: boom"),  # a traceback, the normal way
    # a non-daemon thread still running (a sweep launcher's pool): the normal exit, which waits for it
    ("import threading, time; threading.Thread(target=lambda: (time.sleep(0.5), print('thread done', "
     "file=sys.stderr))).start()", 0, "thread done"),
])
def test_run_then_exit_keeps_the_exit_status_and_runs_atexit(tmp_path, body, code, stderr):
    script = tmp_path / "script.py"
    script.write_text(SCRIPT.format(body=body))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # so that the buffer is there to lose
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == code, result.stderr
    assert stderr in result.stderr and "atexit ran" in result.stderr, result.stderr
    assert result.stdout == "unflushed output", result.stdout
