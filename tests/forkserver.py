"""A process that has imported what train.py imports, and forks a child for each script run a test asks for.

Why: a `python train.py ...` process spends about 4.5 s of CPU importing torch, torch._dynamo, torchvision,
Hydra and its plugins before it reads its first override, and the suite starts some hundred of them; most
are refused in under a second after that, or train for a second or two. A child forked from this server
starts with those modules imported and then runs the script exactly as `python SCRIPT ARGS...` would, as
`__main__`, from its own working directory, environment, argv and standard streams, and ends through the
interpreter's normal exit (atexit, exit code, a traceback for an uncaught exception, death by a signal).

The server itself runs no torch operation, so it starts no OpenMP or other threads that a fork would leave
behind. It runs under mimalloc, as train.py re-executes itself to (trainer/cli/allocator.py), so its children
do too. conftest.run_train falls back to a real process for anything that is decided before the first
import (another allocator, thread count or environment than the server started with); a fresh process is
also what `FORKSERVER=0` gives every test.

Protocol, one JSON object per line on stdin: {"argv": [...], "cwd": ..., "env": {...}, "stdout": path,
"stderr": path}. Answers on stdout, a line each: the child's pid, then its wait status once it has ended.
"""

from __future__ import annotations

import json
import os
import sys


def serve() -> dict:
    """Answer requests until stdin closes (then exit); in a forked child, return its request."""
    from trainer.cli.allocator import preload_mimalloc

    preload_mimalloc()  # re-executes this server under mimalloc, once
    import hydra  # noqa: F401
    import omegaconf  # noqa: F401
    import torch  # noqa: F401
    import torch._dynamo  # noqa: F401  (the first optimizer constructor imports it: 1.1 s)
    import torch.utils.tensorboard  # noqa: F401
    import torchvision  # noqa: F401
    from hydra.core.plugins import Plugins
    from PIL import Image  # noqa: F401  (scripts/predict.py)

    import trainer.cli.config  # noqa: F401
    import trainer.cli.paths  # noqa: F401  (each script registers its resolver itself, as a fresh process would)
    import trainer.loop.trainer  # noqa: F401
    import trainer.run.checkpoint  # noqa: F401

    Plugins.instance()  # Hydra's plugin scan (it imports every installed launcher and sweeper)
    requests, answers = os.fdopen(0, "rb", buffering=0), 1
    os.write(answers, b"ready\n")
    while line := _read_line(requests):
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            requests.close()
            os.close(answers)
            return request
        os.write(answers, f"{pid}\n".encode())
        _, status = os.waitpid(pid, 0)
        os.write(answers, f"{status}\n".encode())
    sys.exit(0)


def _read_line(stream) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        chunk = stream.read(1)
        if not chunk:
            return b""
        line += chunk
    return line


def become(request: dict) -> None:
    """Turn this forked child into `python ARGV...` started from the request's directory and environment."""
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, request["stdout"], os.O_WRONLY | os.O_CREAT),
                            (2, request["stderr"], os.O_WRONLY | os.O_CREAT)):
        opened = os.open(path, flags, 0o644)
        os.dup2(opened, fd)
        os.close(opened)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    # train.py's preload_mimalloc() returns at once for a process that already runs under mimalloc (this one).
    os.environ["_TRAINER_MIMALLOC_PRELOADED"] = request["env"].get("LD_PRELOAD", "")
    sys.argv = list(request["argv"])
    # An uncaught exception's traceback starts in the script, as a fresh process prints it, not in this file.
    show = sys.excepthook

    def from_the_script(kind, value, tb):
        while tb is not None and (tb.tb_frame.f_code.co_filename in (__file__, "<frozen runpy>")
                                  or tb.tb_frame.f_code.co_filename.endswith("runpy.py")):
            tb = tb.tb_next
        show(kind, value.with_traceback(tb), tb)  # the default hook prints value.__traceback__

    sys.excepthook = from_the_script


if __name__ == "__main__":
    request = serve()
    become(request)
    if sys.argv[0] == "-c":  # python -c CODE ARGS...: sys.path[0] is the working directory ("")
        code, sys.argv = sys.argv[1], ["-c", *sys.argv[2:]]
        sys.path[0] = ""
        exec(compile(code, "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
    else:  # python SCRIPT ARGS...: sys.path[0] is the script's directory
        import runpy

        sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))
        runpy.run_path(sys.argv[0], run_name="__main__")
