"""A listing through the gateway with AWS KMS (moto's server) as the key service: KMS sees one
Decrypt per data key the listing needs, never one per record or per field."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from phi_gateway.envelope import PREFIX
from tests.conftest import _create_key
from tests.e2e.conftest import AUTH, POLICIES, Upstream, proxy_deployment
from tests.e2e.test_operations import metrics

RECORDS = 30


def _policies(tmp: Path, data_key: str) -> str:
    directory = tmp / data_key
    directory.mkdir()
    text = (POLICIES / "patients.yaml").read_text()
    assert "data_key: per_record" in text
    text = text.replace("data_key: per_record", f"data_key: {data_key}")
    if data_key == "per_policy":  # the patient is bound through the associated data only
        text = text.replace(", kms: pseudonymize", "")
    (directory / "patients.yaml").write_text(text)
    return str(directory)


def _decrypt_calls(admin_url: str) -> float:
    return sum(
        value
        for (name, labels), value in metrics(admin_url).items()
        if name == "phi_gateway_aws_calls_total" and ("operation", "Decrypt") in labels
    )


@pytest.fixture
def kms_key_arn(moto_url: str) -> str:
    return asyncio.run(_create_key(moto_url))


@pytest.mark.parametrize(("data_key", "expected_keys"), [("per_policy", 1), ("per_record", RECORDS)])
def test_a_listing_costs_one_kms_decrypt_per_data_key(
    data_key: str,
    expected_keys: int,
    tmp_path: Path,
    moto_url: str,
    kms_key_arn: str,
    secrets_dir: Path,
    upstream_process: Upstream,
) -> None:
    upstream_process.reset(data=True)
    settings = {
        "policies": [_policies(tmp_path, data_key)],
        "keyring": None,
        "kms_key_ids": [kms_key_arn],
        "aws_endpoint_url": moto_url,
    }
    patients = [{"id": f"list-{i}", "ssn": f"123-45-{i:04d}", "dob": "1980-02-29"} for i in range(RECORDS)]
    with (
        proxy_deployment(upstream_process, secrets_dir, **settings) as writer,
        httpx.Client(base_url=writer.url, headers=AUTH, timeout=30) as client,
    ):
        for patient in patients:
            assert client.post("/patients", json=patient).status_code in (200, 201)
    for patient in patients:  # stored as tokens
        at_rest = httpx.get(f"{upstream_process.url}/patients/{patient['id']}").json()
        assert at_rest["ssn"].startswith(PREFIX) and patient["ssn"] not in at_rest["ssn"]
    # A new gateway: a cold cache, so every data key the listing needs is a KMS Decrypt.
    with proxy_deployment(upstream_process, secrets_dir, **settings) as reader:
        assert reader.admin_url is not None
        before = _decrypt_calls(reader.admin_url)
        with httpx.Client(base_url=reader.url, headers=AUTH, timeout=30) as client:
            listing = client.get("/patients")
        assert listing.status_code == 200, listing.text
        assert sorted(r["ssn"] for r in listing.json()) == sorted(p["ssn"] for p in patients)
        assert _decrypt_calls(reader.admin_url) - before == expected_keys
