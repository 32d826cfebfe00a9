"""The operator CLI, run as a real process against a keyring file and the moto KMS server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REGION

CANARY = "CANARY-987-65-4321"
VALUES = [
    '"123-45-6789"',
    '""',
    '"ünï ✓"',
    "0",
    "-5",
    "9223372036854775807",
    "2.5",
    "-0.0",
    "true",
    "false",
    "null",
    "{}",
    "[]",
    '{"a": [1, {"b": null}], "c": "d"}',
]


def cli(*args: str, stdin: str = "", env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PHI_GATEWAY_")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "phi_gateway", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=full_env,
        timeout=60,
        check=False,
    )


@pytest.fixture(params=["keyring", "kms"])
def key_source(request: pytest.FixtureRequest) -> dict[str, str]:
    """Key source given through the environment, as an operator would in a container."""
    if request.param == "keyring":
        return {"PHI_GATEWAY_KEYRING": str(request.getfixturevalue("keyring_path"))}
    return {
        "PHI_GATEWAY_KMS_KEY_ID": request.getfixturevalue("kms_key"),
        "PHI_GATEWAY_KMS_ENDPOINT_URL": request.getfixturevalue("moto_url"),
        "PHI_GATEWAY_KMS_REGION": REGION,
    }


def encrypt(value: str, env: dict[str, str], *context: str) -> str:
    done = cli("encrypt", *(f"--context={c}" for c in context), "--field", "$.x", stdin=value, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_round_trips_every_json_type_in_one_process_each(key_source: dict[str, str]) -> None:
    for value in VALUES:
        token = encrypt(value, key_source, "patient=p1", "purpose=treatment")
        assert token.startswith("phi:")
        done = cli(
            "decrypt",
            "--context",
            "patient=p1",
            "--context",
            "purpose=treatment",
            "--field",
            "$.x",
            stdin=token,
            env=key_source,
        )
        assert done.returncode == 0, done.stderr
        back: Any = json.loads(done.stdout)
        assert back == json.loads(value) and type(back) is type(json.loads(value))
        assert json.dumps(back) == json.dumps(json.loads(value))


def test_wrong_context_fails_with_one_line_and_no_plaintext(key_source: dict[str, str]) -> None:
    token = encrypt(json.dumps(CANARY), key_source, "patient=p1")
    for args in (
        ["--context", "patient=p2", "--field", "$.x"],
        ["--context", "patient=p1", "--field", "$.y"],
    ):
        done = cli("decrypt", *args, stdin=token, env=key_source)
        assert done.returncode == 1
        assert done.stdout == ""
        assert done.stderr.count("\n") == 1 and "invalid token" in done.stderr
        assert CANARY not in done.stderr


def test_bad_input_is_refused_without_echoing_it(keyring_path: Path) -> None:
    env = {"PHI_GATEWAY_KEYRING": str(keyring_path)}
    for bad in (f'"{CANARY}" trailing', f'{{"{CANARY}": 1, "{CANARY}": 2}}', "NaN", "1" * 30, ""):
        done = cli("encrypt", stdin=bad, env=env)
        assert done.returncode == 1, bad
        assert CANARY not in done.stdout + done.stderr
        assert done.stderr.startswith("phi-gateway: error:")


def test_key_source_must_be_exactly_one(keyring_path: Path) -> None:
    assert cli("encrypt", stdin="1").returncode == 2
    both = cli("encrypt", "--keyring", str(keyring_path), "--kms-key-id", "k", stdin="1")
    assert both.returncode == 2 and "exactly one key source" in both.stderr


def test_unreachable_kms_is_a_one_line_error() -> None:
    env = {
        "PHI_GATEWAY_KMS_KEY_ID": "arn:aws:kms:us-east-1:111122223333:key/x",
        "PHI_GATEWAY_KMS_ENDPOINT_URL": "http://127.0.0.1:9",
    }
    done = cli("encrypt", stdin=json.dumps(CANARY), env=env)
    assert done.returncode == 1 and "KMS DescribeKey unreachable" in done.stderr
    assert CANARY not in done.stderr


def test_keys_init_creates_a_private_keyring_once(tmp_path: Path) -> None:
    path = tmp_path / "ring.json"
    first = cli("keys", "init", str(path))
    assert first.returncode == 0 and "local:" in first.stdout and "production" in first.stderr
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    content = path.read_bytes()
    second = cli("keys", "init", str(path))
    assert second.returncode == 1 and "refusing to overwrite" in second.stderr
    assert path.read_bytes() == content


def test_inspect_shows_the_header_and_never_decrypts(keyring_path: Path) -> None:
    env = {"PHI_GATEWAY_KEYRING": str(keyring_path)}
    token = encrypt(json.dumps(CANARY), env, "patient=p1")
    for done in (cli("inspect", token), cli("inspect", stdin=token)):
        assert done.returncode == 0, done.stderr
        header = json.loads(done.stdout)
        assert header["version"] == 1 and header["key_ref"].startswith("local:")
        assert header["wrapped_key_bytes"] == 61 and header["ciphertext_bytes"] == len(json.dumps(CANARY))
        assert CANARY not in done.stdout and "iv" not in header and "tag" not in header
    broken = cli("inspect", token.replace("phi:AQ", "phi:Ag", 1))  # version byte 2
    assert broken.returncode == 1 and broken.stderr.strip() == "phi-gateway: error: invalid token"


def test_pseudonymized_context_round_trips_and_kms_never_sees_the_patient(
    tmp_path: Path, kms_key: str, moto_url: str
) -> None:
    pepper = tmp_path / "pepper.json"
    assert cli("pepper", "init", str(pepper)).returncode == 0
    env = {
        "PHI_GATEWAY_KMS_KEY_ID": kms_key,
        "PHI_GATEWAY_KMS_ENDPOINT_URL": moto_url,
        "PHI_GATEWAY_PEPPER": str(pepper),
    }
    args = [
        "--context",
        "ResourceId=p-777",
        "--policy",
        "patients",
        "--pseudonymize",
        "ResourceId",
        "--field",
        "$.x",
    ]
    done = cli("encrypt", *args, stdin='"123-45-6789"', env=env)
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip()
    back = cli("decrypt", *args, stdin=token, env=env)
    assert back.returncode == 0 and json.loads(back.stdout) == "123-45-6789"
    plain = cli(
        "decrypt",
        "--context",
        "ResourceId=p-777",
        "--policy",
        "patients",
        "--field",
        "$.x",
        stdin=token,
        env=env,
    )
    assert plain.returncode == 1 and "invalid token" in plain.stderr  # KMS context was the pseudonym
    missing = cli(
        "encrypt", "--context", "ResourceId=p-777", "--pseudonymize", "ResourceId", stdin="1", env=env
    )
    assert missing.returncode == 2 and "--pepper and --policy" in missing.stderr
