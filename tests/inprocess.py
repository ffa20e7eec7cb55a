"""Run a script of scripts/ inside the test process, as `python scripts/NAME.py ARGS` would run it.

A fresh interpreter spends about 4 s importing torch, timm and onnxruntime before the script does
anything (measured on the 2-core CI machine); the test process has them imported already. The
script runs as `__main__` with its own argv, so its argument parsing, its `main()` and its exit code
are exactly what a user's run goes through. What a script changes in the process (torch's thread
count, sys.path, the environment, its helper modules such as benchlib) is put back afterwards, so
later tests see the process as it was. Tests whose point is a fresh process (an artifact reloading
in another interpreter, torchrun, a kill) keep using subprocess.
"""

from __future__ import annotations

import contextlib
import io
import os
import runpy
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"


def run_script(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run scripts/SCRIPT with ARGS in this process; its exit code, stdout and stderr."""
    import torch

    path = SCRIPTS / script
    saved_argv, saved_path, saved_env = sys.argv[:], sys.path[:], dict(os.environ)
    saved_modules, saved_threads = set(sys.modules), torch.get_num_threads()
    stdout, stderr = io.StringIO(), io.StringIO()
    code: int | str | None = 0
    try:
        sys.argv = [str(path), *args]
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                runpy.run_path(str(path), run_name="__main__")
            except SystemExit as done:
                code = done.code
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
        os.environ.clear()
        os.environ.update(saved_env)
        torch.set_num_threads(saved_threads)
        for name in set(sys.modules) - saved_modules:  # the scripts' own helpers: fresh next time
            file = getattr(sys.modules[name], "__file__", None) or ""
            if Path(file).resolve().parent == SCRIPTS:
                del sys.modules[name]
    if code is None:
        code = 0
    elif isinstance(code, str):  # sys.exit("message"): printed to stderr, exit status 1
        stderr.write(code + "\n")
        code = 1
    return subprocess.CompletedProcess(
        [sys.executable, str(path), *args], code, stdout.getvalue(), stderr.getvalue()
    )
