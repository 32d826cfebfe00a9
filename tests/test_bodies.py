"""Request bodies: gzip and deflate inflate within both caps, the size and the ratio, each
of which alone refuses a body."""

from __future__ import annotations

import gzip
import zlib

import pytest
from starlette.datastructures import Headers
from starlette.types import Message

from phi_gateway.bodies import Limits, read_body
from phi_gateway.exceptions import HTTPError

DOCUMENT = b'{"notes": "' + b"a" * 20_000 + b'"}'  # compresses about 200 to 1


async def _read(body: bytes, encoding: str, limits: Limits) -> bytes:
    async def receive() -> Message:
        return {"type": "http.request", "body": body, "more_body": False}

    headers = Headers(
        raw=[
            (b"content-type", b"application/json"),
            (b"content-encoding", encoding.encode()),
            (b"content-length", str(len(body)).encode()),
        ]
    )
    return await read_body(receive, headers, limits)


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_a_body_inflates_within_both_caps(encoding: str) -> None:
    packed = gzip.compress(DOCUMENT) if encoding == "gzip" else zlib.compress(DOCUMENT)
    assert await _read(packed, encoding, Limits(max_inflate_ratio=1000)) == DOCUMENT


@pytest.mark.parametrize(
    ("limits", "why"),
    [
        (Limits(max_inflate_ratio=100), "ratio"),  # 20 KB is far under max_body, but 200:1
        (Limits(max_body=10_000, max_inflate_ratio=1000), "size"),  # 1000:1 allowed, 10 KB is not
    ],
)
async def test_either_cap_alone_refuses_a_body(limits: Limits, why: str) -> None:
    packed = gzip.compress(DOCUMENT)
    over_size = len(DOCUMENT) > limits.max_body
    over_ratio = len(DOCUMENT) > len(packed) * limits.max_inflate_ratio
    assert (over_size, over_ratio) == (why == "size", why == "ratio")  # one cap at a time
    with pytest.raises(HTTPError) as refused:
        await _read(packed, "gzip", limits)
    assert (refused.value.status, refused.value.code) == (413, "body_too_large")
