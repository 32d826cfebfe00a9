"""The operations parts in isolation: log formatting, metrics labels and AWS outcomes, the
readiness checks, policy hot reload, and the settings that go with them. End to end (a real
admin port, KMS going away, SIGHUP to ``serve``) is ``tests/e2e/test_operations.py``."""

from __future__ import annotations

import asyncio
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from phi_gateway.admin import Readiness
from phi_gateway.aws import AwsSettings, calling
from phi_gateway.cache import DataKeyCache
from phi_gateway.config import ConfigError, GatewayConfig
from phi_gateway.exceptions import KeyThrottled, KeyUnavailable
from phi_gateway.keyring import LocalKeyring
from phi_gateway.logs import Formatter, log_config, request_id
from phi_gateway.metrics import Metrics, method_label
from phi_gateway.policy_reload import PolicyReloader
from phi_gateway.transform import Report

CANARY = "CANARY-078-05-1120"
POLICIES = Path(__file__).parent.parent / "policies"


def record(message: str, *args: object, exc: BaseException | None = None) -> logging.LogRecord:
    exc_info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    return logging.LogRecord("phi_gateway", logging.ERROR, __file__, 1, message, args, exc_info)


def raised(message: str) -> BaseException:
    try:
        raise ValueError(message)
    except ValueError as exc:
        return exc


@pytest.mark.parametrize("style", ["json", "text"])
def test_logged_exceptions_show_type_and_frames_never_their_message(style: str) -> None:
    line = Formatter(style).format(record("transform failed", exc=raised(f"bad value {CANARY}")))
    assert CANARY not in line
    assert "ValueError" in line and "test_operations.py" in line and "raised" in line


def test_json_log_lines_carry_the_request_id() -> None:
    import orjson

    token = request_id.set("req-42")
    try:
        entry = orjson.loads(Formatter("json").format(record("%d fields", 3)))
    finally:
        request_id.reset(token)
    assert entry["request_id"] == "req-42" and entry["message"] == "3 fields" and entry["level"] == "error"
    assert entry["time"].endswith("Z")
    assert "request_id" not in orjson.loads(Formatter("json").format(record("outside a request")))


def test_log_config_refuses_an_unknown_format() -> None:
    with pytest.raises(ValueError, match="json"):
        log_config("xml")
    assert log_config("text")["formatters"]["phi"]["style"] == "text"


def test_client_chosen_methods_do_not_become_labels() -> None:
    assert method_label("GET") == "GET"
    assert method_label("PROPFIND") == "other" and method_label("get") == "other"


def test_field_counts_are_labelled_by_policy_and_action_only() -> None:
    metrics = Metrics()
    report = Report()
    report.encrypted.update({"$.ssn": 2, "$.dob": 1})
    report.withheld["$.notes"] = 1
    metrics.report("patients", report)
    text = metrics.render().decode()
    assert 'phi_gateway_fields_total{action="encrypted",policy="patients"} 3.0' in text
    assert 'phi_gateway_fields_total{action="withheld",policy="patients"} 1.0' in text
    assert "$.ssn" not in text and 'action="decrypted"' not in text


def _client_error(code: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": CANARY}}, "Decrypt")


async def _call(settings: AwsSettings, error: BaseException | None = None, wait: float = 0) -> None:
    async with calling("KMS", "Decrypt", settings):
        await asyncio.sleep(wait)
        if error is not None:
            raise error


async def test_every_aws_call_is_observed_with_its_outcome() -> None:
    seen: list[tuple[str, str, str, float]] = []
    settings = AwsSettings(deadline=0.05, observer=lambda *call: seen.append(call))
    await _call(settings)
    with pytest.raises(KeyThrottled):
        await _call(settings, _client_error("ThrottlingException"))
    with pytest.raises(KeyUnavailable):
        await _call(settings, wait=1)  # past the deadline
    task = asyncio.create_task(_call(settings, wait=1))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert [outcome for _, _, outcome, _ in seen] == ["ok", "throttled", "unavailable", "cancelled"]
    assert all(service == "KMS" and op == "Decrypt" and seconds >= 0 for service, op, _, seconds in seen)
    assert AwsSettings(observer=print) == AwsSettings()  # not part of the settings' identity


def test_cache_and_audit_counters_are_read_at_scrape_time(keyring: LocalKeyring) -> None:
    metrics = Metrics()
    cache = DataKeyCache(keyring)
    metrics.watch(cache, None)
    cache.stats.encrypt_misses = 7
    text = metrics.render().decode()
    assert 'phi_gateway_cache_misses_total{kind="encrypt"} 7.0' in text
    assert "phi_gateway_cache_entries 0.0" in text and "audit" not in text


class _Provider:
    def __init__(self, error: Exception | None = None, delay: float = 0) -> None:
        self.error, self.delay, self.calls = error, delay, 0

    async def check(self) -> None:
        self.calls += 1
        await asyncio.sleep(self.delay)
        if self.error is not None:
            raise self.error


class _Audit:
    def __init__(self, accepting: bool, on_failure: str) -> None:
        self.accepting, self.on_failure = accepting, on_failure


def _readiness(provider: Any, audit: Any = None, **options: Any) -> Readiness:
    from phi_gateway.policy import load_policies

    cache = DataKeyCache(provider)
    policies = load_policies([POLICIES])
    return Readiness(policies=lambda: policies, keys=cache, audit=lambda: audit, **options)


async def test_readiness_reports_each_check() -> None:
    assert await _readiness(_Provider()).check() == (
        True,
        {"policies": "ok", "keys": "ok", "audit": "disabled"},
    )
    ready, checks = await _readiness(_Provider(KeyUnavailable("KMS DescribeKey unreachable (X)"))).check()
    assert not ready and checks["keys"] == "KMS DescribeKey unreachable (X)"
    ready, checks = await _readiness(_Provider(delay=1), timeout=0.05).check()
    assert not ready and "did not answer" in checks["keys"]


async def test_a_failing_audit_sink_is_fatal_only_in_block_mode() -> None:
    ready, checks = await _readiness(_Provider(), _Audit(False, "block")).check()
    assert not ready and checks["audit"].startswith("not accepting")
    ready, checks = await _readiness(_Provider(), _Audit(False, "drop")).check()
    assert ready and checks["audit"].startswith("not accepting")  # reported, serving on as asked


async def test_probes_that_arrive_together_share_one_key_service_check() -> None:
    provider = _Provider(delay=0.05)
    now = [0.0]
    readiness = _readiness(provider, clock=lambda: now[0], reuse=1.0)
    results = await asyncio.gather(*(readiness.check() for _ in range(20)))
    assert provider.calls == 1 and all(r[0] for r in results)
    await readiness.check()
    assert provider.calls == 1  # within the reuse window
    now[0] = 5.0
    await readiness.check()
    assert provider.calls == 2


def _copy_policies(tmp_path: Path) -> Path:
    target = tmp_path / "policies"
    shutil.copytree(POLICIES, target)
    return target


async def test_reload_swaps_a_valid_set_and_keeps_the_old_one_for_a_broken_set(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    policies = _copy_policies(tmp_path)
    metrics = Metrics()
    reloader = PolicyReloader([policies], interval=0, metrics=metrics)
    first = reloader.policies()
    (policies / "patients.yaml").write_text("version: 1\nname: patients\nroutes: nope\n")
    assert await reloader.reload("test") is False
    assert reloader.policies() is first
    assert "rejected" in caplog.text and "patients.yaml:" in caplog.text
    shutil.copy(POLICIES / "patients.yaml", policies / "patients.yaml")
    (policies / "fhir-patient.yaml").unlink()
    assert await reloader.reload("test") is True
    assert reloader.policies() is not first and reloader.policies().names == ("patients",)
    text = metrics.render().decode()
    assert 'phi_gateway_policy_reloads_total{outcome="rejected"} 1.0' in text
    assert 'phi_gateway_policy_reloads_total{outcome="loaded"} 1.0' in text


async def test_the_watcher_reloads_on_change_only(tmp_path: Path) -> None:
    policies = _copy_policies(tmp_path)
    reloader = PolicyReloader([policies], interval=0.01)
    loaded: list[str] = []
    original = reloader.reload

    async def counting(reason: str) -> bool:
        loaded.append(reason)
        return await original(reason)

    reloader.reload = counting  # type: ignore[method-assign]
    reloader.start()
    try:
        await asyncio.sleep(0.1)
        assert loaded == []  # nothing changed
        (policies / "fhir-patient.yaml").unlink()
        for _ in range(200):
            if reloader.policies().names == ("patients",):
                break
            await asyncio.sleep(0.01)
        assert loaded == ["files changed"] and reloader.policies().names == ("patients",)
    finally:
        await reloader.stop()


def test_a_broken_set_at_startup_is_fatal(tmp_path: Path) -> None:
    from phi_gateway.exceptions import PolicyError

    (tmp_path / "p.yaml").write_text("version: 1\n")
    with pytest.raises(PolicyError):
        PolicyReloader([tmp_path])


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"workers": 2}, "one worker per container"),
        ({"admin_port": 70000}, "admin_port"),
        ({"log_format": "xml"}, "log_format"),
        ({"log_level": "loud"}, "log_level"),
        ({"policy_reload_interval": -1.0}, "policy_reload_interval"),
    ],
)
def test_operations_settings_are_checked(settings: dict[str, Any], message: str) -> None:
    config = GatewayConfig(upstream="http://127.0.0.1:1", keyring="k", **settings)
    with pytest.raises(ConfigError, match=message):
        config.check()
    if "workers" in settings:
        GatewayConfig(upstream="http://127.0.0.1:1", keyring="k", admin_port=0, **settings).check()


async def test_a_context_taken_from_a_header_reads_the_clients_header_on_both_sides(
    tmp_path: Path, keyring: LocalKeyring
) -> None:
    """The gateway rewrites some headers it forwards (Accept-Encoding: identity on routes it
    decrypts); a context entry taken from such a header must see the client's value when the
    response is decrypted, as when the request was encrypted, or the echo fails to open."""
    import httpx
    import orjson
    from starlette.types import Receive, Scope, Send

    from phi_gateway.middleware import PHIMiddleware
    from phi_gateway.policy import load_policies

    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "echo.yaml").write_text(
        "version: 1\nname: echo\nrequire_principal: false\nroutes:\n"
        '  - match: {methods: [PUT], path: "/things/{id}"}\n'
        "    request:\n      context: {Encoding: {header: Accept-Encoding, kms: plain}}\n"
        "      encrypt: [$.secret]\n"
        "    response:\n      context: {Encoding: {header: Accept-Encoding, kms: plain}}\n"
        "      decrypt: [$.secret]\n"
    )
    seen: list[Any] = []

    async def echo(scope: Scope, receive: Receive, send: Send) -> None:
        body = (await receive())["body"]
        seen.append((orjson.loads(body), dict(scope["headers"]).get(b"accept-encoding")))
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})

    app = PHIMiddleware(echo, policies=load_policies([policies]), keys=DataKeyCache(keyring))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
        answer = await client.put("/things/1", json={"secret": CANARY}, headers={"Accept-Encoding": "gzip"})
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"secret": CANARY}
    ((stored, forwarded_encoding),) = seen
    assert stored["secret"].startswith("phi:") and forwarded_encoding == b"identity"
