"""The operator CLI, run as a real process against a keyring file and the moto KMS server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from phi_gateway.cli import _Main
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


def cli(
    *args: str, stdin: str = "", env: Mapping[str, str | None] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the CLI in a new process; ``env`` adds variables, or removes those set to None."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PHI_GATEWAY_")}
    for name, value in (env or {}).items():
        if value is None:
            full_env.pop(name, None)
        else:
            full_env[name] = value
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


def one_line(done: subprocess.CompletedProcess[str], status: int) -> str:
    """The failure's one stderr line, after checking the exit status and that nothing else
    was written."""
    assert done.returncode == status, done.stderr
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("phi-gateway: error: "), done.stderr
    return done.stderr


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
        message = one_line(cli("decrypt", *args, stdin=token, env=key_source), 1)
        assert "invalid token" in message and CANARY not in message


def test_bad_input_is_refused_without_echoing_it(keyring_path: Path) -> None:
    env = {"PHI_GATEWAY_KEYRING": str(keyring_path)}
    for bad in (f'"{CANARY}" trailing', f'{{"{CANARY}": 1, "{CANARY}": 2}}', "NaN", "1" * 30, ""):
        done = cli("encrypt", stdin=bad, env=env)
        assert done.returncode == 1, bad
        assert CANARY not in done.stdout + done.stderr
        assert done.stderr.startswith("phi-gateway: error:")


def test_key_source_must_be_exactly_one(keyring_path: Path) -> None:
    assert "exactly one key source" in one_line(cli("encrypt", stdin="1"), 2)
    both = cli("encrypt", "--keyring", str(keyring_path), "--kms-key-id", "k", stdin="1")
    assert "exactly one key source" in one_line(both, 2)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["encrypt", "--bogus"], "No such option '--bogus'"),
        (["encrypt", "--context", "no-equals-sign"], "expected NAME=VALUE"),
        (["encrypt", "--context"], "requires an argument"),
        (["--bogus"], "No such option"),
        (["no-such-command"], "No such command"),
        (["keys", "init"], "Missing argument 'PATH'"),
        # Subcommands from the cli_*.py modules pass through the same root group.
        (["rewrap", "--concurrency", "many"], "--concurrency"),
        (["policy", "preview"], "--route"),
        (["serve", "--port", "eighty"], "--port"),
        (["audit", "verify"], "Missing argument"),
    ],
)
def test_usage_errors_are_one_line_with_status_2(args: list[str], expected: str) -> None:
    message = one_line(cli(*args, env={"PHI_GATEWAY_KEYRING": "unused.json"}), 2)
    assert expected in message and "Usage:" not in message


def test_plaintext_given_as_an_argument_is_counted_not_echoed(keyring_path: Path) -> None:
    env = {"PHI_GATEWAY_KEYRING": str(keyring_path)}
    for command in ("encrypt", "decrypt"):
        message = one_line(cli(command, CANARY, f'"{CANARY}"', env=env), 2)
        assert "2 unexpected argument(s)" in message and CANARY not in message


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (RuntimeError(CANARY), "phi-gateway: error: unexpected RuntimeError (a bug;"),
        (PermissionError(13, "Permission denied", "ring.json"), "Permission denied: ring.json"),
        (OSError(5, "Input/output error"), "phi-gateway: error: Input/output error\n"),
    ],
    ids=["bug", "file", "io"],
)
def test_an_unexpected_failure_is_one_line_too(error: Exception, expected: str) -> None:
    group = _Main()

    @group.command()
    def boom() -> None:
        raise error

    done = CliRunner().invoke(group, ["boom"])
    assert done.exit_code == 1 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and expected in done.stderr and CANARY not in done.stderr


def test_a_bare_group_prints_its_help() -> None:
    done = cli("keys")
    assert done.returncode == 2 and "init" in done.stderr + done.stdout


def test_unreachable_kms_is_a_one_line_error() -> None:
    env = {
        "PHI_GATEWAY_KMS_KEY_ID": "arn:aws:kms:us-east-1:111122223333:key/x",
        "PHI_GATEWAY_KMS_ENDPOINT_URL": "http://127.0.0.1:9",
    }
    message = one_line(cli("encrypt", stdin=json.dumps(CANARY), env=env), 1)
    assert "KMS DescribeKey unreachable" in message and CANARY not in message


NO_AMBIENT_REGION: dict[str, str | None] = {
    "AWS_REGION": None,
    "AWS_DEFAULT_REGION": None,
    "AWS_PROFILE": None,
    "AWS_CONFIG_FILE": os.devnull,
}


def test_kms_flags_round_trip_against_the_moto_server(kms_key: str, moto_url: str) -> None:
    """The key source as flags instead of the environment; then with no region at all,
    which the key's ARN supplies."""
    explicit = ["--kms-key-id", kms_key, "--region", REGION, "--endpoint-url", moto_url]
    from_arn = ["--kms-key-id", kms_key, "--endpoint-url", moto_url]
    for flags in (explicit, from_arn):
        for value in ('"123-45-6789"', '{"a": [1, {"b": null}], "c": -0.0}'):  # every type: above
            args = [*flags, "--context", "patient=p1", "--field", "$.x"]
            done = cli("encrypt", *args, stdin=value, env=NO_AMBIENT_REGION)
            assert done.returncode == 0, done.stderr
            back = cli("decrypt", *args, stdin=done.stdout, env=NO_AMBIENT_REGION)
            assert back.returncode == 0, back.stderr
            assert json.dumps(json.loads(back.stdout)) == json.dumps(json.loads(value))


def test_no_region_anywhere_is_a_one_line_error(moto_url: str) -> None:
    args = ["--kms-key-id", "alias/patients", "--endpoint-url", moto_url]
    message = one_line(cli("encrypt", *args, stdin=json.dumps(CANARY), env=NO_AMBIENT_REGION), 1)
    assert "no AWS region" in message and CANARY not in message


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
