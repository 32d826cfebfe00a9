"""The canary sweep can fail: a canary in any of the forms it looks for, in any artifact a
server leaves behind, is found and named; and a patient made of canaries goes through every
kind of request, allowed and refused, on both deployments, leaving none behind. The audit
file a server leaves is also checked by ``phi-gateway audit verify``, which can fail too."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import uuid
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote, quote_plus

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from phi_gateway.audit_chain import ChainedFileSink, load_chain_key
from tests.e2e import canary
from tests.e2e.conftest import AuditFile, Deployment, ThreadServer, canary_patient

# Non-ASCII, a slash, spaces and "???" (base64 "Pz8/": a "/" at every alignment), so that
# every form is spelled differently from every other.
FANCY = " ??? Ñandú/Zoë"


def fancy() -> str:
    value = f"{canary.PREFIX}{uuid.uuid4()}{FANCY}"
    canary.register(value)
    return value


def b64(data: bytes, *, urlsafe: bool, padded: bool) -> str:
    text = (base64.urlsafe_b64encode if urlsafe else base64.b64encode)(data).decode()
    return text if padded else text.rstrip("=")


ENCODINGS: dict[str, tuple[str, Callable[[str], str]]] = {
    "raw": ("raw", lambda v: f"note: {v}."),
    "json": ("JSON-escaped", lambda v: json.dumps({"note": v})),
    "quote": ("URL-encoded (quote)", lambda v: f"/search?q={quote(v)}&x=1"),
    "quote_plus": ("URL-encoded (quote_plus)", lambda v: f"q={quote_plus(v)}&x=1"),
    "hex": ("hex", lambda v: "0x" + (b"<" + v.encode() + b">").hex()),
    "HEX": ("HEX", lambda v: (b"<" + v.encode() + b">").hex().upper()),
    **{
        f"{name}-{'padded' if padded else 'unpadded'}-offset-{offset}": (
            f"{name} (offset {offset})",
            lambda v, o=offset, u=urlsafe, p=padded: (
                "b64:" + b64(b"ab"[:o] + v.encode() + b"!", urlsafe=u, padded=p)
            ),
        )
        for name, urlsafe in (("base64", False), ("base64url", True))
        for padded in (True, False)
        for offset in range(3)
    },
}


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_each_form_of_a_canary_is_found_and_named(encoding: str) -> None:
    value = fancy()
    form, encode = ENCODINGS[encoding]
    assert len(set(canary.forms(value).values())) == len(canary.forms(value)) == 12
    evidence = canary.Evidence()
    evidence.add("a fake artifact", encode(value))
    assert [(leak.artifact, leak.form, leak.value) for leak in evidence.leaks()] == [
        ("a fake artifact", form, value)
    ]
    with pytest.raises(AssertionError, match=rf"{value[:43]}.* in a fake artifact \({re.escape(form)}, at"):
        evidence.assert_clean()


def test_text_without_a_registered_value_is_clean() -> None:
    evidence = canary.Evidence()
    evidence.add("a log line", f"nothing here but {canary.PREFIX}{uuid.uuid4()}, never registered")
    evidence.add("an error body", b'{"error": {"code": "invalid_json"}}')
    assert evidence.leaks() == []
    evidence.assert_clean()


def test_short_or_plain_values_are_not_registered() -> None:
    for plain in ("abc12", "--12--", "  ab  ", ""):
        canary.register(plain)
        assert not canary.registered(plain)


def test_a_registered_number_is_found_where_no_digit_touches_it() -> None:
    digits = str(uuid.uuid4().int)[:12]
    canary.register(digits)
    assert canary.find("x", f"ssn={digits}&a=1")[0].form == "raw"
    assert canary.find("x", f"0.{digits}7") == []  # a longer number is another number
    assert canary.find("x", base64.b64encode(f"7{digits}7".encode()).decode())  # encoded: anywhere


def test_other_phi_is_named_by_its_first_characters_only() -> None:
    phone = f"+1 555 {uuid.uuid4().int % 10**7:07d}"
    canary.register(phone)
    evidence = canary.Evidence()
    evidence.add("metrics", f'm{{x="{phone}"}} 1')
    with pytest.raises(AssertionError) as caught:
        evidence.assert_clean()
    assert phone not in str(caught.value) and "'+1'… (14 characters) in metrics (raw" in str(caught.value)


# Each artifact a ThreadServer keeps, made to carry a canary by a small app.
log = logging.getLogger("phi_gateway.test")


def leaking_app(kind: str, value: str) -> Callable[[Scope, Receive, Send], object]:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": f"{message['type']}.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        status, body = 200, b"{}"
        if kind == "error body":
            status, body = 400, json.dumps({"error": {"message": f"bad {value}"}}).encode()
        elif kind == "log line":
            log.info("saw %s", base64.b64encode(value.encode()).decode())
        elif kind == "logged exception":
            try:
                raise ValueError(f"cannot parse {value!r}")
            except ValueError:
                log.exception("parse failed")  # the log line names the type only
        elif kind == "exception uvicorn logs":
            raise RuntimeError(value)
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": body})

    return app


@pytest.mark.parametrize(
    ("kind", "artifact", "form"),
    [
        ("error body", "error response 400 to GET /", "JSON-escaped"),
        ("log line", r"log record \(phi_gateway.test, INFO\)", "base64 (offset 0)"),
        ("logged exception", r"exception in log record \(phi_gateway.test, ERROR\)", "raw"),
        ("exception uvicorn logs", r"exception in log record \(uvicorn.error, ERROR\)", "raw"),
        ("metrics", "metrics", "hex"),
        ("audit", "audit file audit.jsonl", "base64url (offset 1)"),
    ],
)
def test_a_server_that_leaks_fails_when_it_stops(
    kind: str, artifact: str, form: str, secrets_dir: Path, tmp_path: Path
) -> None:
    value = fancy()
    metrics, audit = None, None
    if kind == "metrics":
        metrics = lambda: f'phi_gateway_x{{label="{value.encode().hex()}"}} 1.0\n'  # noqa: E731
    if kind == "audit":
        audit = AuditFile(tmp_path / "audit.jsonl", secrets_dir / "chain.key")
        sink = ChainedFileSink(audit.path, load_chain_key(audit.chain_key_file))
        note = base64.urlsafe_b64encode(b"x" + value.encode()).decode()
        asyncio.run(sink.write([{"note": note}]))
        asyncio.run(sink.close())
    expected = rf"{value[:43]}.* in {artifact} \({re.escape(form)}, at"
    server = ThreadServer(leaking_app(kind, value), metrics=metrics, audit=audit)
    with pytest.raises(AssertionError, match=expected) as caught, server:
        httpx.get(server.url + "/", timeout=10)
    assert "canaries leaked" in str(caught.value)


def test_an_audit_file_that_does_not_verify_fails_when_its_server_stops(
    secrets_dir: Path, tmp_path: Path
) -> None:
    audit = AuditFile(tmp_path / "audit.jsonl", secrets_dir / "chain.key")
    sink = ChainedFileSink(audit.path, load_chain_key(audit.chain_key_file))
    asyncio.run(sink.write([{"n": 1}, {"n": 2}, {"n": 3}]))
    asyncio.run(sink.close())
    first, _, third = audit.path.read_text().splitlines()
    audit.path.write_text(f"{first}\n{third}\n")  # the second record deleted
    server = ThreadServer(leaking_app("nothing", ""), audit=audit)
    with pytest.raises(AssertionError, match=r"audit verify .*audit.jsonl: exit 1: FAIL at seq 2"), server:
        httpx.get(server.url + "/", timeout=10)


def test_the_log_line_of_an_exception_carries_no_message() -> None:
    value = fancy()
    server = ThreadServer(leaking_app("logged exception", value))
    with pytest.raises(AssertionError), server:
        httpx.get(server.url + "/", timeout=10)
    leaks = server.evidence.leaks()
    assert [leak.artifact for leak in leaks] == ["exception in log record (phi_gateway.test, ERROR)"]
    line = dict(server.evidence.artifacts)["log record (phi_gateway.test, ERROR)"]
    assert json.loads(line)["exception"]["type"] == "ValueError"


def test_a_canary_patient_through_every_kind_of_request(deployment: Deployment) -> None:
    """Written, read under each role, searched three ways, and refused nine ways, each refusal
    carrying canaries; the sweep when the deployment stops finds none of them."""
    patient = canary_patient("cs-1")
    ssn, notes = patient["ssn"], patient["notes"]
    with deployment.client() as clinician:
        assert clinician.put("/patients/cs-1", json=patient).json()["ssn"] == ssn
        assert clinician.get("/patients/cs-1").json()["notes"] == notes
        assert [p["id"] for p in clinician.get("/patients", params={"ssn": ssn}).json()] == ["cs-1"]
        assert [p["id"] for p in clinician.get("/patients", params={"phone": patient["phone"]}).json()] == [
            "cs-1"
        ]
        criteria = {"last_name": patient["last_name"], "dob": patient["dob"]}
        assert [p["id"] for p in clinician.post("/patients/search", json=criteria).json()] == ["cs-1"]
        refusals = {
            "invalid_json": clinician.put(
                "/patients/cs-2",
                content=f'{{"ssn": "{canary.new()}",}}',
                headers={"content-type": "application/json"},
            ),
            "field_ambiguous": clinician.put("/patients/cs-2", json={"SSN": canary.new()}),
            "index_value_invalid": clinician.put("/patients/cs-2", json={"phone": canary.new()}),
            "query_ambiguous": clinician.get("/patients", params={"SSN": canary.new()}),
            "body_too_large": clinician.put("/patients/cs-2", json={"notes": canary.new() * 2000}),
            "unexpected_body": clinician.request("GET", "/patients/cs-1", json={"ssn": canary.new()}),
            "method_not_allowed": clinician.patch("/patients/cs-1", json={"ssn": canary.new()}),
        }
    with deployment.client(roles="nurse") as nurse:
        seen = nurse.get("/patients/cs-1").json()
    assert seen["ssn"] == "*" * (len(ssn) - 4) + ssn[-4:] and "notes" not in seen
    with deployment.client(roles="emergency") as responder:
        refusals["break_glass_reason_required"] = responder.get("/patients/cs-1")
        reason = {"X-Break-Glass-Reason": "unconscious patient"}
        assert responder.get("/patients/cs-1", headers=reason).json()["notes"] == notes
    with httpx.Client(base_url=deployment.url) as anonymous:
        refusals["authentication_required"] = anonymous.put("/patients/cs-3", json=canary_patient("cs-3"))
    assert {code: r.json()["error"]["code"] for code, r in refusals.items()} == {c: c for c in refusals}
    assert deployment.evidence is not None
    answered = [name for name in deployment.evidence.names() if name.startswith("error response")]
    assert len(answered) == len(refusals)
