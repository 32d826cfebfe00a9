"""``load_config``: a YAML file, then ``PHI_GATEWAY_*`` variables, then flags; typed values
checked at load, with errors that name the setting and never echo its value."""

from __future__ import annotations

from pathlib import Path

import pytest

from phi_gateway.config import ConfigError, GatewayConfig, load_config
from phi_gateway.exceptions import KeyAccessError
from phi_gateway.gateway import Gateway
from phi_gateway.keyring import create_keyring
from phi_gateway.pepper import create_pepper_file

POLICIES = Path(__file__).resolve().parents[1] / "policies"
BASE = {"PHI_GATEWAY_UPSTREAM": "http://127.0.0.1:1", "PHI_GATEWAY_KEYRING": "k"}


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("true", True),
        ("TRUE", True),
        (" yes ", True),
        ("on", True),
        ("1", True),
        ("false", False),
        ("No", False),
        ("off", False),
        ("0", False),
    ],
)
def test_booleans_in_the_environment(text: str, value: bool) -> None:
    assert load_config(env={**BASE, "PHI_GATEWAY_AWS_FIPS": text}).aws_fips is value


@pytest.mark.parametrize("text", ["ture", "flase", "2", "enabled", "y e s"])
def test_a_boolean_typo_is_refused_by_name_without_its_value(text: str) -> None:
    with pytest.raises(ConfigError, match="PHI_GATEWAY_AWS_FIPS: expected true or false") as refused:
        load_config(env={**BASE, "PHI_GATEWAY_AWS_FIPS": text})
    assert text not in str(refused.value)


def test_a_boolean_in_the_file_is_checked_too(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text("preserve_host: true\naws_fips: off\n")  # YAML's own booleans
    loaded = load_config(str(config), env=BASE)
    assert (loaded.preserve_host, loaded.aws_fips) == (True, False)
    config.write_text('preserve_host: "ture"\n')
    with pytest.raises(ConfigError, match=r"gateway\.yaml: preserve_host: expected true or false"):
        load_config(str(config), env=BASE)


def test_a_number_setting_is_refused_by_name_without_its_value() -> None:
    secret_looking = "hunter2-not-a-port"
    with pytest.raises(ConfigError, match="PHI_GATEWAY_PORT: expected int") as refused:
        load_config(env={**BASE, "PHI_GATEWAY_PORT": secret_looking})
    assert secret_looking not in str(refused.value)


def test_file_then_environment_then_flags(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text("port: 1001\nmax_body: 2048\nbody_timeout: 5\npolicies: [a, b]\n")
    from_file = load_config(str(config), env=BASE)
    assert (from_file.port, from_file.max_body, from_file.body_timeout, from_file.policies) == (
        1001,
        2048,
        5.0,
        ["a", "b"],
    )
    env = {**BASE, "PHI_GATEWAY_PORT": "1002", "PHI_GATEWAY_MAX_BODY": "4096", "PHI_GATEWAY_POLICIES": "c, d"}
    from_env = load_config(str(config), env=env)
    assert (from_env.port, from_env.max_body, from_env.body_timeout, from_env.policies) == (
        1002,
        4096,
        5.0,
        ["c", "d"],
    )
    flagged = load_config(str(config), env=env, overrides={"port": 1003, "policies": ("e",), "workers": None})
    assert (flagged.port, flagged.max_body, flagged.policies, flagged.workers) == (1003, 4096, ["e"], 1)


def test_the_config_round_trips_through_the_environment_for_workers() -> None:
    """``serve`` hands its config to worker processes as variables; they must read back the
    same config, booleans included."""
    config = GatewayConfig(
        upstream="http://127.0.0.1:1",
        keyring="k",
        aws_fips=True,
        workers=2,
        admin_port=0,
        policies=["a", "b"],
    )
    assert load_config(env=config.to_env()) == config


def test_several_workers_need_the_admin_port_off() -> None:
    with pytest.raises(ConfigError) as refused:
        load_config(env={**BASE, "PHI_GATEWAY_WORKERS": "2"}).check()
    message = str(refused.value)
    assert "workers: 2 needs the admin port off" in message
    assert "--admin-port 0" in message and "PHI_GATEWAY_ADMIN_PORT=0" in message
    both = load_config(env={**BASE, "PHI_GATEWAY_ADMIN_PORT": "0"}, overrides={"workers": 2}).check()
    assert (both.workers, both.admin_port) == (2, 0)
    assert load_config(env=BASE).check().admin_port == 9090  # one worker keeps the default


def test_several_workers_with_the_file_sink_need_one_chain_each() -> None:
    env = {
        **BASE,
        "PHI_GATEWAY_ADMIN_PORT": "0",
        "PHI_GATEWAY_WORKERS": "2",
        "PHI_GATEWAY_AUDIT_SINK": "file",
    }
    env["PHI_GATEWAY_AUDIT_CHAIN_KEY_FILE"] = "chain.key"
    with pytest.raises(ConfigError, match=r"needs \{pid\} in audit_file"):
        load_config(env=env).check()
    assert load_config(env={**env, "PHI_GATEWAY_AUDIT_FILE": "a-{pid}.jsonl"}).check().workers == 2
    one = load_config(env={**env, "PHI_GATEWAY_WORKERS": "1"}).check()
    assert one.audit_file == "audit.jsonl"  # one name across restarts: the chain resumes


def _gateway(tmp_path: Path, **settings: object) -> Gateway:
    if not (tmp_path / "pepper.json").exists():
        create_pepper_file(tmp_path / "pepper.json")
    config = GatewayConfig(
        upstream="http://127.0.0.1:1",
        policies=[str(POLICIES)],
        pepper=str(tmp_path / "pepper.json"),
        audit_sink="none",
        admin_port=0,
        **settings,  # type: ignore[arg-type]
    )
    return Gateway(config, open_audit=False)


def test_the_aws_region_comes_from_the_key_arn_when_not_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_REGION", "us-west-2")
    arn = "arn:aws:kms:eu-west-1:111122223333:key/k"
    assert _gateway(tmp_path, kms_key_ids=[arn]).aws.region == "eu-west-1"
    assert _gateway(tmp_path, kms_key_ids=["alias/phi"]).aws.region == "us-west-2"
    assert (
        _gateway(tmp_path, kms_key_ids=["alias/phi"], aws_region="eu-central-1").aws.region == "eu-central-1"
    )
    with pytest.raises(KeyAccessError, match="not in this provider's region eu-central-1"):
        _gateway(tmp_path, kms_key_ids=[arn], aws_region="eu-central-1")


def test_no_region_anywhere_stops_an_aws_gateway_but_not_a_keyring_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    with pytest.raises(KeyAccessError, match="region"):
        _gateway(tmp_path, kms_key_ids=["alias/phi"])
    create_keyring(tmp_path / "keyring.json")
    assert _gateway(tmp_path, keyring=str(tmp_path / "keyring.json")).aws.region is None
