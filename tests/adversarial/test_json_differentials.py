"""JSON differentials: bodies another parser could read differently from the gateway.

The gateway forwards its own serialization of what it parsed (DESIGN rule 2), so what
matters is what *it* accepts: anything ambiguous is refused with a stable code before the
upstream hears of it, and what it accepts reaches the upstream re-serialized, tokens in
place of PHI. Each case runs against the standalone proxy and the middleware; each carries
its own canary SSN (8xx-66-nnnn), so a leak names its case.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from phi_gateway import envelope
from tests.e2e.conftest import AUTH, Deployment, Upstream, middleware_deployment, proxy_deployment

MAX_BODY = 64 * 1024
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module", params=["proxy", "middleware"])
def gateway(
    request: pytest.FixtureRequest,
    upstream_process: Upstream,
    secrets_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Deployment]:
    if request.param == "proxy":
        upstream_process.reset(data=True)
        with proxy_deployment(upstream_process, secrets_dir, max_body=MAX_BODY) as deployment:
            yield deployment
    else:
        with middleware_deployment(
            secrets_dir, tmp_path_factory.mktemp("mw"), max_body=MAX_BODY
        ) as deployment:
            yield deployment


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    """One client for the module: a new httpx client costs ~50 ms (its TLS context)."""
    with httpx.Client(timeout=20, headers=AUTH) as client:
        yield client


def received(http: httpx.Client, gateway: Deployment) -> list[dict[str, Any]]:
    return http.get(f"{gateway.upstream.url}/_received").json()  # type: ignore[no-any-return]


def send(
    http: httpx.Client, gateway: Deployment, method: str, path: str, raw: bytes, headers: Any
) -> httpx.Response:
    http.delete(f"{gateway.upstream.url}/_received")
    return http.request(method, gateway.url + path, content=raw, headers=headers)


def canary(case: str) -> str:
    n = zlib.crc32(case.encode())
    return f"8{n % 100:02d}-66-{n // 100 % 10000:04d}"


@dataclass
class Case:
    """A request body (``@SSN@`` stands for the case's canary) and what must come of it."""

    id: str
    body: str | bytes
    status: int = 200
    code: str | None = None  # the error code, for refusals
    headers: dict[str, str] | list[tuple[str, str]] = field(default_factory=lambda: dict(JSON))
    method: str = "PUT"
    path: str = "/patients/jd-{id}"
    encoding: str = "utf-8"  # how a str body becomes bytes
    compress: Any = None  # a function applied to the bytes

    def request(self) -> tuple[str, str, bytes]:
        ssn = canary(self.id)
        raw = self.body.encode(self.encoding) if isinstance(self.body, str) else self.body
        raw = raw.replace(b"@SSN@", ssn.encode())
        if self.compress is not None:
            raw = self.compress(raw)
        return ssn, self.path.format(id=self.id), raw


SEARCH = "/patients/search"
PHI = '{"first_name": "Differential", "ssn": "@SSN@", "dob": "1961-06-15"}'
DEEP = 30_000  # levels of arrays; objects take more bytes per level, so a third


def refused(id: str, body: str | bytes, status: int = 400, code: str = "invalid_json", **kw: Any) -> Case:
    return Case(id, body, status, code, **kw)


def media(id: str, *types: str | None) -> Case:
    headers = [("content-type", t) for t in types if t is not None]
    return Case(id, PHI, 415, "unsupported_media_type", headers=headers)


def coded(id: str, encoding: str, compress: Any, status: int, code: str) -> Case:
    return Case(id, PHI, status, code, headers={**JSON, "content-encoding": encoding}, compress=compress)


CODING = "unsupported_content_encoding"


def gz_members(raw: bytes) -> bytes:
    return gzip.compress(raw[:10]) + gzip.compress(raw[10:])


def bomb(raw: bytes) -> bytes:
    return raw[:-1] + b', "pad": "' + b"0" * 20_000_000 + b'"}'


REFUSED = [
    # duplicate keys, at any depth, however spelled
    refused("duplicate-key", '{"ssn": "@SSN@", "ssn": "000-00-0000"}'),
    refused("duplicate-key-in-phi-array", '{"ssn": "@SSN@", "diagnoses": [{"code": "E11", "code": "Z00"}]}'),
    refused("duplicate-key-deep", '{"ssn": "@SSN@", "meta": {"a": [{"b": {"c": 1, "c": 2}}]}}'),
    refused("duplicate-key-by-escape", '{"ssn": "@SSN@", "\\u0073sn": "000-00-0000"}'),
    refused("duplicate-key-by-escape-first", '{"\\u0073sn": "000-00-0000", "ssn": "@SSN@"}'),
    # a protected name in another case: Go, Json.NET and ASP.NET Core bind it to the field
    refused("case-variant-key", '{"SSN": "@SSN@"}', code="field_ambiguous"),
    refused("case-variant-by-case-fold", '{"\\u017fsn": "@SSN@"}', code="field_ambiguous"),
    refused("case-variant-nested", '{"diagnoses": [{"Code": "@SSN@"}]}', code="field_ambiguous"),
    refused("case-variant-index", '{"ssn": "@SSN@", "SSN_BIDX": "1:00000000"}', code="field_ambiguous"),
    refused("case-variant-search", '{"Ssn": "@SSN@"}', code="field_ambiguous", method="POST", path=SEARCH),
    # encodings of the text
    refused("bom", b'\xef\xbb\xbf{"ssn": "@SSN@"}'),
    refused("utf-16-le-bom", '{"ssn": "@SSN@"}', encoding="utf-16"),
    refused("utf-16-be", '{"ssn": "@SSN@"}', encoding="utf-16-be"),
    refused("utf-32", '{"ssn": "@SSN@"}', encoding="utf-32"),
    refused("invalid-utf-8", b'{"ssn": "@SSN@\xff"}'),
    refused("overlong-utf-8", b'{"ssn": "@SSN@", "x": "\xc0\xaf"}'),
    refused("utf-8-encoded-surrogate", b'{"ssn": "@SSN@", "x": "\xed\xa0\x80"}'),
    refused("lone-surrogate-escape", '{"ssn": "@SSN@", "x": "\\ud800"}'),
    refused("lone-surrogate-in-phi", '{"ssn": "@SSN@\\udc00"}', code="value_not_encryptable"),
    refused("lone-surrogate-in-key", '{"ssn": "@SSN@", "\\udfff": 1}'),
    # extensions some parsers accept
    refused("comment-line", '{"ssn": "@SSN@" // who\n}'),
    refused("comment-block", '{/* who */ "ssn": "@SSN@"}'),
    refused("trailing-comma-object", '{"ssn": "@SSN@",}'),
    refused("trailing-comma-array", '{"ssn": "@SSN@", "diagnoses": [{"code": "E11.9"},]}'),
    refused("single-quotes", "{'ssn': '@SSN@'}"),
    refused("unquoted-key", '{ssn: "@SSN@"}'),
    refused("raw-control-character", '{"ssn": "@SSN@\n"}'),
    refused("two-documents", '{"ssn": "@SSN@"}{"ssn": "000-00-0000"}'),
    refused("trailing-garbage", '{"ssn": "@SSN@"} x'),
    refused("trailing-nul", b'{"ssn": "@SSN@"}\x00'),
    # numbers
    refused("nan", '{"ssn": "@SSN@", "weight_kg": NaN}'),
    refused("infinity", '{"ssn": "@SSN@", "weight_kg": Infinity}'),
    refused("minus-infinity", '{"ssn": "@SSN@", "weight_kg": -Infinity}'),
    refused("1e400", '{"ssn": "@SSN@", "weight_kg": 1e400}'),
    refused("minus-1e400", '{"ssn": "@SSN@", "weight_kg": -1E400}'),
    refused("integer-beyond-64-bits", '{"ssn": "@SSN@", "n": 123456789012345678901234567890}'),
    refused("integer-5000-digits", '{"ssn": "@SSN@", "n": ' + "9" * 5000 + "}"),
    refused("integer-5000-digits-in-phi", '{"ssn": ' + "1" * 5000 + ', "dob": "@SSN@"}'),
    # shape
    refused("nesting-over-limit", '{"ssn": "@SSN@", "x": ' + "[" * 64 + "]" * 64 + "}"),
    refused("nesting-30000-arrays", '{"ssn": "@SSN@", "x": ' + "[" * DEEP + "]" * DEEP + "}"),
    refused(
        "nesting-10000-objects",
        '{"ssn": "@SSN@", "x": ' + '{"a":' * (DEEP // 3) + "1" + "}" * (DEEP // 3) + "}",
    ),
    refused("empty-body", b""),
    refused("whitespace-body", b" \r\n\t "),
    refused("bare-string", '"@SSN@"', code="record_not_object"),
    refused("bare-array", '[{"ssn": "@SSN@"}]', code="record_not_object"),
    refused("bare-null", "null", code="record_not_object"),
    # media types
    media("text-plain", "text/plain"),
    media("no-content-type", None),
    media("form-urlencoded", "application/x-www-form-urlencoded"),
    media("text-json", "text/json"),
    media("application-jsonx", "application/jsonx"),
    media("charset-utf-16", "application/json; charset=utf-16"),
    media("charset-latin-1", "application/json; charset=iso-8859-1"),
    media("two-content-types", "application/json", "text/plain"),
    # content codings
    coded("raw-deflate", "deflate", lambda b: zlib.compress(b)[2:-4], 400, "bad_content_encoding"),
    coded("gzip-bomb", "gzip", lambda b: gzip.compress(bomb(b)), 413, "body_too_large"),
    coded("deflate-bomb", "deflate", lambda b: zlib.compress(bomb(b), 9), 413, "body_too_large"),
    coded("not-gzip", "gzip", None, 400, "bad_content_encoding"),
    coded("truncated-gzip", "gzip", lambda b: gzip.compress(b)[:-9], 400, "bad_content_encoding"),
    coded("gzip-trailing-garbage", "gzip", lambda b: gzip.compress(b) + b"{}", 400, "bad_content_encoding"),
    coded("gzip-two-members", "gzip", gz_members, 400, "bad_content_encoding"),
    coded("gzip-of-gzip", "gzip", lambda b: gzip.compress(gzip.compress(b)), 400, "invalid_json"),
    coded("gzip-gzip-coding", "gzip, gzip", lambda b: gzip.compress(gzip.compress(b)), 415, CODING),
    coded("brotli", "br", None, 415, CODING),
    refused("over-max-body", '{"ssn": "@SSN@"}' + " " * MAX_BODY, 413, "body_too_large"),
    # a value no blind index can normalize
    refused("index-value-invalid", '{"ssn": "@SSN@", "phone": "555-1234"}', code="index_value_invalid"),
]


@pytest.mark.parametrize("case", REFUSED, ids=[c.id for c in REFUSED])
def test_ambiguous_bodies_are_refused_and_reach_nothing(
    http: httpx.Client, gateway: Deployment, case: Case
) -> None:
    assert case.code is not None
    ssn, path, raw = case.request()
    response = send(http, gateway, case.method, path, raw, case.headers)
    assert response.status_code == case.status, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"]["code"] == case.code
    assert ssn not in response.text
    reached = received(http, gateway)
    assert reached == [], f"the upstream received {len(reached)} request(s)"


def upstream_body(http: httpx.Client, gateway: Deployment, ssn: str, path: str) -> tuple[str, dict[str, Any]]:
    """The one request the upstream got: the gateway's serialization, with no canary."""
    reached = received(http, gateway)
    assert [r["path"] for r in reached] == [path]
    text = repr(reached)
    assert ssn not in text and ssn.replace("-", "") not in text, "plaintext reached the upstream"
    assert "content-encoding" not in reached[0]["headers"]
    raw: str = reached[0]["body"]
    doc = json.loads(raw)
    assert envelope.is_token(doc["ssn"])
    return raw, doc


ACCEPTED = [
    Case("fhir-json", PHI, headers={"content-type": "application/fhir+json"}),
    Case("merge-patch-json", PHI, headers={"content-type": "application/merge-patch+json"}),
    Case("upper-case-type", PHI, headers={"content-type": "APPLICATION/JSON"}),
    Case("charset-upper-case", PHI, headers={"content-type": "application/json; charset=UTF-8"}),
    Case("charset-quoted", PHI, headers={"content-type": 'application/json;charset="utf-8"'}),
    Case("odd-spacing-and-params", PHI, headers={"content-type": "Application/Json ; Charset=utf8 ; v=1"}),
    Case("gzip", PHI, headers={**JSON, "content-encoding": "gzip"}, compress=gzip.compress),
    Case("deflate", PHI, headers={**JSON, "content-encoding": "deflate"}, compress=zlib.compress),
    Case("gzip-upper-case", PHI, headers={**JSON, "content-encoding": "GZIP"}, compress=gzip.compress),
]


@pytest.mark.parametrize("case", ACCEPTED, ids=[c.id for c in ACCEPTED])
def test_json_by_any_spelling_reaches_the_upstream_as_tokens(
    http: httpx.Client, gateway: Deployment, case: Case
) -> None:
    ssn, path, raw = case.request()
    response = send(http, gateway, case.method, path, raw, case.headers)
    assert response.status_code == 200, response.text
    assert response.json()["ssn"] == ssn
    _, doc = upstream_body(http, gateway, ssn, path)
    assert envelope.is_token(doc["first_name"]) and envelope.is_token(doc["dob"])


def put(http: httpx.Client, gateway: Deployment, case: str, raw: bytes) -> tuple[str, str, dict[str, Any]]:
    ssn = canary(case)
    path = f"/patients/jd-{case}"
    response = send(http, gateway, "PUT", path, raw.replace(b"@SSN@", ssn.encode()), JSON)
    assert response.status_code == 200, response.text
    assert response.json()["ssn"] == ssn
    raw_sent, doc = upstream_body(http, gateway, ssn, path)
    return ssn, raw_sent, doc


def test_a_key_spelled_with_escapes_reaches_the_upstream_as_the_key_it_names(
    http: httpx.Client, gateway: Deployment
) -> None:
    """``"\\u0073sn"`` is ``ssn``: encrypted as ssn, and the upstream reads the key as ssn."""
    _, raw, doc = put(
        http, gateway, "escaped-key", b'{"\\u0073sn": "@SSN@", "\\u0066irst_name": "Differential"}'
    )
    assert set(doc) >= {"ssn", "first_name", "ssn_bidx"}
    assert "\\u" not in raw and envelope.is_token(doc["first_name"])


def test_an_escaped_value_is_encrypted_as_the_text_it_spells(http: httpx.Client, gateway: Deployment) -> None:
    ssn = canary("escaped-value")
    escaped = "".join(f"\\u{ord(ch):04x}" for ch in ssn)
    path = "/patients/jd-escaped-value"
    response = send(http, gateway, "PUT", path, f'{{"ssn": "{escaped}"}}'.encode(), JSON)
    assert response.status_code == 200 and response.json()["ssn"] == ssn
    raw, _ = upstream_body(http, gateway, ssn, path)
    assert escaped not in raw and escaped.lower() not in raw


def test_numbers_and_whitespace_reach_the_upstream_canonical(http: httpx.Client, gateway: Deployment) -> None:
    """Whatever the client's spelling, the upstream reads the value the gateway parsed."""
    body = (
        b'{\n  "ssn" : "@SSN@",\n  "weight_kg" : 71.500000000000000000001, "height_cm": 1.7E2,'
        b' "visits": -0, "max": 18446744073709551615, "x": ' + b"[" * 63 + b"]" * 63 + b"\n}"
    )
    _, raw, doc = put(http, gateway, "canonical", body)
    assert '"weight_kg":71.5,' in raw and '"height_cm":170.0,' in raw and '"visits":0,' in raw
    assert doc["max"] == 2**64 - 1  # the widest integer the gateway passes
    assert "\n" not in raw and " :" not in raw
