"""The adversarial suite (``pytest tests/adversarial``; ``docs/security-testing.md``) runs on the
end-to-end fixtures: the recording demo upstream process, gateway deployments on loopback,
the moto KMS server."""

from tests.e2e.conftest import secrets_dir, upstream_process  # noqa: F401  (fixtures)
