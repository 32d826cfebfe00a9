"""Gateway configuration: a YAML file, then ``PHI_GATEWAY_*`` environment variables, then
command-line flags, each overriding the one before. Reference: the README's table."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from phi_gateway.exceptions import PHIGatewayError


class ConfigError(PHIGatewayError):
    """The gateway configuration is incomplete or contradictory."""


@dataclass(kw_only=True)
class GatewayConfig:
    upstream: str = ""
    policies: list[str] = field(default_factory=lambda: ["policies"])
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    # keys: exactly one of keyring / kms_key_ids
    keyring: str | None = None
    kms_key_ids: list[str] = field(default_factory=list)
    aws_region: str | None = None  # None: the first key ARN's region, else AWS_REGION, the profile's
    aws_endpoint_url: str | None = None
    aws_fips: bool = False
    # pepper: a file, or a Secrets Manager secret id
    pepper: str | None = None
    pepper_secret_id: str | None = None
    # caller identity: trusted proxy headers and/or a verified bearer JWT
    principal_header: str | None = None
    roles_header: str | None = None
    trusted_proxies: list[str] = field(default_factory=list)
    jwt_secret_file: str | None = None
    jwt_public_key_file: str | None = None
    jwt_jwks_file: str | None = None
    jwt_algorithms: list[str] = field(default_factory=list)
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    jwt_roles_claim: str = "roles"
    break_glass_role: str | None = None
    break_glass_reason_header: str = "X-Break-Glass-Reason"
    # audit trail: "stdout" (JSON lines), "file" (hash-chained JSON lines), "cloudwatch" or "none"
    audit_sink: str = "stdout"
    audit_log_group: str | None = None  # cloudwatch
    audit_log_stream: str = "phi-gateway-{host}-{pid}"
    # One name across restarts: the chain resumes where it stopped, so a file deleted or
    # truncated between runs shows. {pid} (needed with several workers): one chain per process.
    audit_file: str = "audit.jsonl"
    audit_chain_key_file: str | None = None
    audit_on_failure: str = "block"  # or "drop"
    audit_max_queue: int = 10_000
    # data-key cache
    cache_ttl: float = 300.0
    cache_max_uses: int = 2**20
    cache_capacity: int = 10_000
    # limits
    max_body: int = 1 << 20
    max_response: int = 16 << 20
    max_depth: int = 64
    body_timeout: float = 30.0
    response_timeout: float = 60.0
    header_timeout: float = 10.0
    upstream_connect_timeout: float = 5.0
    upstream_read_timeout: float = 30.0
    upstream_max_connections: int = 100
    preserve_host: bool = False
    # TLS on the gateway's own port (PEM files); without them it speaks plain HTTP
    tls_certfile: str | None = None
    tls_keyfile: str | None = None
    # operations: the admin port (/healthz, /readyz, /metrics), logs, policy hot reload
    admin_host: str = "127.0.0.1"
    admin_port: int = 9090  # 0: no admin server
    log_format: str = "json"  # or "text"
    log_level: str = "info"
    policy_reload_interval: float = 5.0  # seconds between looks at the policy files; 0: SIGHUP only

    def check(self) -> GatewayConfig:
        if not self.upstream:
            raise ConfigError("an upstream URL is required (--upstream or PHI_GATEWAY_UPSTREAM)")
        if bool(self.keyring) == bool(self.kms_key_ids):
            raise ConfigError("configure exactly one key source: keyring or kms_key_ids")
        if self.pepper and self.pepper_secret_id:
            raise ConfigError("configure at most one pepper source: pepper or pepper_secret_id")
        if self.workers < 1:
            raise ConfigError("workers must be at least 1")
        if self.audit_sink not in ("stdout", "file", "cloudwatch", "none"):
            raise ConfigError("audit_sink must be stdout, file, cloudwatch or none")
        if self.audit_sink == "cloudwatch" and not self.audit_log_group:
            raise ConfigError("the cloudwatch audit sink needs audit_log_group")
        if self.audit_sink == "file" and not self.audit_chain_key_file:
            raise ConfigError(
                "the file audit sink needs audit_chain_key_file (phi-gateway audit init-key PATH)"
            )
        if self.audit_sink == "file" and self.workers > 1 and "{pid}" not in self.audit_file:
            # The chained file is locked by the process that writes it.
            raise ConfigError(
                f"workers: {self.workers} with the file audit sink needs {{pid}} in audit_file "
                "(one chain per worker process), e.g. audit-{pid}.jsonl"
            )
        if self.audit_on_failure not in ("block", "drop"):
            raise ConfigError("audit_on_failure must be block or drop")
        if not 0 <= self.admin_port <= 65535:
            raise ConfigError("admin_port must be a port number, or 0 for none")
        if self.admin_port and self.workers > 1:
            # Each worker would bind the port, and each has its own metrics and readiness.
            raise ConfigError(
                f"workers: {self.workers} needs the admin port off: set admin_port: 0 "
                "(--admin-port 0, PHI_GATEWAY_ADMIN_PORT=0) to run several workers without "
                "/healthz, /readyz and /metrics, or keep them with workers: 1 (one worker per "
                "container, scaled with replicas)"
            )
        if bool(self.tls_certfile) != bool(self.tls_keyfile):
            raise ConfigError("TLS needs both tls_certfile and tls_keyfile")
        for tls_file in (self.tls_certfile, self.tls_keyfile):
            if tls_file and not Path(tls_file).is_file():
                raise ConfigError(f"TLS file {tls_file} does not exist")
        if self.log_format not in ("json", "text"):
            raise ConfigError("log_format must be json or text")
        if self.log_level.lower() not in ("critical", "error", "warning", "info", "debug"):
            raise ConfigError("log_level must be critical, error, warning, info or debug")
        if self.policy_reload_interval < 0:
            raise ConfigError("policy_reload_interval cannot be negative")
        return self

    def to_env(self) -> dict[str, str]:
        """The config as environment variables, for worker processes to read back."""
        out = {}
        for name, value in asdict(self).items():
            if value is None:
                continue
            out[f"PHI_GATEWAY_{name.upper()}"] = ",".join(value) if isinstance(value, list) else str(value)
        return out


_FIELDS = {f.name: f for f in fields(GatewayConfig)}
_BOOLEANS = {
    **dict.fromkeys(("1", "true", "yes", "on"), True),
    **dict.fromkeys(("0", "false", "no", "off"), False),
}


def _coerce(name: str, value: Any, source: str | None = None) -> Any:
    """``value`` as the setting's type. Errors name the setting as ``source`` (the variable,
    the flag) and never echo the value: some settings are secrets."""
    kind = str(_FIELDS[name].type)
    if value is None or value == "":
        return [] if kind.startswith("list") else None
    if kind.startswith("list"):
        return [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else list(value)
    if kind not in ("bool", "int", "float"):
        return str(value)
    try:
        if kind == "bool":
            # A typo must not quietly mean false (aws_fips: ture would leave FIPS off).
            return value if isinstance(value, bool) else _BOOLEANS[str(value).strip().lower()]
        return int(value) if kind == "int" else float(value)
    except (KeyError, TypeError, ValueError):
        expected = "true or false" if kind == "bool" else kind
        raise ConfigError(f"{source or name}: expected {expected}") from None


def load_config(
    path: str | None = None, env: Mapping[str, str] | None = None, overrides: Mapping[str, Any] | None = None
) -> GatewayConfig:
    values: dict[str, Any] = {}
    if path:
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read config {path}: {type(exc).__name__}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config {path} must be a mapping")
        unknown = set(data) - _FIELDS.keys()
        if unknown:
            raise ConfigError(f"config {path}: unknown keys {sorted(unknown)}")
        values.update({k: _coerce(k, v, f"config {path}: {k}") for k, v in data.items()})
    environ = os.environ if env is None else env
    for name in _FIELDS:
        key = f"PHI_GATEWAY_{name.upper()}"
        if key in environ:
            values[name] = _coerce(name, environ[key], key)
    for name, value in (overrides or {}).items():
        if value is not None and value != ():
            values[name] = _coerce(name, value)  # click has checked the flags' types
    return GatewayConfig(**values)
