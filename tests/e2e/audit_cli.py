"""``phi-gateway audit verify``, as shipped, on every hash-chained audit file an end-to-end
server wrote: each run is a process of its own executing ``python -m phi_gateway`` with the
command line, judged by its exit status and by what it printed.

Started afresh, ``python -m phi_gateway`` spends about a second importing the package; over
the suite's hundred-odd audit files that added a minute and a half to it, even from a
background thread. So one helper process imports the package once and forks a child for each
run: the child runs the package's ``__main__`` exactly as ``-m`` does, less the imports.
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
from pathlib import Path

_FORK_SERVER = r"""
import json, os, runpy, sys, traceback
import phi_gateway.cli  # what every run imports, imported once

for line in sys.stdin:
    read, write = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(read)
        os.dup2(write, 1)
        os.dup2(write, 2)
        sys.argv = ["phi-gateway", *json.loads(line)]
        code = 0
        try:
            runpy.run_module("phi_gateway", run_name="__main__", alter_sys=True)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    os.close(write)
    with os.fdopen(read, encoding="utf-8", errors="replace") as output:
        said = output.read()
    print(json.dumps([os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]), said]), flush=True)
"""

_server: subprocess.Popen[str] | None = None


def run(*args: str) -> tuple[int, str]:
    """``python -m phi_gateway ARGS`` without the runner's ``PHI_GATEWAY_*`` variables: its
    exit status, and its stdout and stderr together."""
    global _server
    if _server is None or _server.poll() is not None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PHI_GATEWAY_")}
        _server = subprocess.Popen(
            [sys.executable, "-c", _FORK_SERVER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=Path(__file__).parents[2],  # the checkout under test, whatever a test chdir'd to
        )
        atexit.register(_stop, _server)
    assert _server.stdin is not None and _server.stdout is not None
    _server.stdin.write(json.dumps(args) + "\n")
    _server.stdin.flush()
    answer = _server.stdout.readline()
    if not answer:
        raise RuntimeError(f"the phi-gateway fork server stopped (exit {_server.wait(10)})")
    status, said = json.loads(answer)
    return status, said


def assert_verifies(path: Path, chain_key_file: Path) -> None:
    """``audit verify`` of a file its gateway has closed: exit 0, every line a record, no torn
    tail."""
    records = len(path.read_bytes().splitlines())
    status, said = run("audit", "verify", str(path), "--chain-key-file", str(chain_key_file))
    assert (status, said) == (0, f"ok: {records} records\n"), f"audit verify {path}: exit {status}: {said}"


def _stop(server: subprocess.Popen[str]) -> None:
    if server.stdin is not None:
        server.stdin.close()
    server.wait(10)
