"""``phi-gateway demo`` from a fresh directory, as the README tells a newcomer to run it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.e2e.conftest import free_port


def test_demo_walks_through_and_stops(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "phi_gateway",
            "demo",
            "--no-wait",
            "--port",
            str(free_port()),
            "--upstream-port",
            str(free_port()),
            "--admin-port",
            str(free_port()),
            "--dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "ssn='123-45-6789'" in out  # the client's view
    assert "ssn: phi:" in out and "123-45-6789" not in out.split("2. The same row")[1].split("3.")[0]
    assert "-> 1 match" in out
    assert (tmp_path / "keyring.json").exists() and (tmp_path / "patients.sqlite").exists()
    assert (
        "{" not in out.split("\n", 1)[0] and '"request_id"' not in out
    )  # events go to the trail, not the screen
    verify = subprocess.run(
        [
            sys.executable,
            "-m",
            "phi_gateway",
            "audit",
            "verify",
            str(tmp_path / "audit.jsonl"),
            "--chain-key-file",
            str(tmp_path / "audit-chain.key"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert verify.returncode == 0 and verify.stdout.startswith(
        "ok: 3 records"
    )  # PUT, search, the nurse's read, verify.stdout + verify.stderr
