"""The gateway process: ``PHIMiddleware(ProxyApp(upstream))`` built from a ``GatewayConfig``,
with the key provider, pepper, upstream pool, policy reloader and admin port started and
stopped by the ASGI lifespan."""

from __future__ import annotations

import logging
import os
import socket
from typing import Literal

import aioboto3
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from phi_gateway.admin import AdminServer, Readiness, admin_app
from phi_gateway.audit import AuditEmitter, AuditSink, StdoutSink
from phi_gateway.audit_chain import ChainedFileSink, load_chain_key
from phi_gateway.audit_cloudwatch import CloudWatchSink, caller_identity
from phi_gateway.aws import AwsSettings
from phi_gateway.bodies import Limits
from phi_gateway.cache import DataKeyCache
from phi_gateway.config import GatewayConfig, load_config
from phi_gateway.exceptions import PHIGatewayError
from phi_gateway.identity import Identity, IdentitySettings
from phi_gateway.keyring import LocalKeyring
from phi_gateway.keys import KeyProvider
from phi_gateway.kms import KmsKeyProvider
from phi_gateway.metrics import Metrics
from phi_gateway.middleware import PHIMiddleware
from phi_gateway.pepper import Pepper
from phi_gateway.policy_reload import PolicyReloader
from phi_gateway.proxy import ProxyApp, UpstreamSettings
from phi_gateway.server import HeaderDeadlineProtocol

log = logging.getLogger("phi_gateway")


class Gateway:
    """The ASGI app that ``phi-gateway serve`` runs."""

    def __init__(self, config: GatewayConfig, *, open_audit: bool = True) -> None:
        """``open_audit=False`` builds everything but the audit sink: for checking a config
        in a process that will not serve (the sink locks its file)."""
        config.check()
        self.config = config
        self.metrics = Metrics()
        self.aws = AwsSettings(
            region=config.aws_region,
            endpoint_url=config.aws_endpoint_url,
            use_fips_endpoint=config.aws_fips,
            observer=self.metrics.aws_call,
        )
        if config.kms_key_ids or config.pepper_secret_id or config.audit_sink == "cloudwatch":
            # One region for KMS, Secrets Manager, CloudWatch Logs and STS, settled at startup.
            resource = config.kms_key_ids[0] if config.kms_key_ids else config.pepper_secret_id
            self.aws = self.aws.resolve(aioboto3.Session(), resource)
        self.policies = PolicyReloader(
            config.policies, interval=config.policy_reload_interval, metrics=self.metrics
        )
        provider: KeyProvider = (
            LocalKeyring.load(config.keyring)
            if config.keyring
            else KmsKeyProvider(config.kms_key_ids, self.aws)
        )
        self.proxy = ProxyApp(
            config.upstream,
            UpstreamSettings(
                connect_timeout=config.upstream_connect_timeout,
                read_timeout=config.upstream_read_timeout,
                max_connections=config.upstream_max_connections,
                preserve_host=config.preserve_host,
                body_timeout=config.body_timeout,  # pass-through bodies; policy routes' in Limits
            ),
        )
        self.middleware = PHIMiddleware(
            self.proxy,
            policies=self.policies.policies,
            keys=DataKeyCache(
                provider, ttl=config.cache_ttl, max_uses=config.cache_max_uses, capacity=config.cache_capacity
            ),
            pepper=Pepper.load(config.pepper) if config.pepper else None,
            limits=Limits(
                max_body=config.max_body,
                max_response=config.max_response,
                max_depth=config.max_depth,
                body_timeout=config.body_timeout,
                response_timeout=config.response_timeout,
            ),
            identity=Identity(
                IdentitySettings(
                    principal_header=config.principal_header,
                    roles_header=config.roles_header,
                    trusted_proxies=tuple(config.trusted_proxies),
                    jwt_secret_file=config.jwt_secret_file,
                    jwt_public_key_file=config.jwt_public_key_file,
                    jwt_jwks_file=config.jwt_jwks_file,
                    jwt_algorithms=tuple(config.jwt_algorithms),
                    jwt_issuer=config.jwt_issuer,
                    jwt_audience=config.jwt_audience,
                    jwt_roles_claim=config.jwt_roles_claim,
                    break_glass_role=config.break_glass_role,
                    break_glass_reason_header=config.break_glass_reason_header,
                )
            ),
        )
        self.middleware.audit = _audit(config, self.aws) if open_audit else None
        self.middleware.metrics = self.metrics
        self.metrics.watch(self.middleware.keys, self.middleware.audit)
        self.readiness = Readiness(
            policies=self.policies.policies,
            keys=self.middleware.keys,
            audit=lambda: self.middleware.audit,
            metrics=self.metrics,
        )
        self.admin = (
            AdminServer(admin_app(self.readiness, self.metrics), config.admin_host, config.admin_port)
            if config.admin_port
            else None
        )
        if not self.middleware.identity.configured:
            log.warning("no caller identity configured: routes that require a principal answer 401")

    async def _learn_identity(self) -> None:
        """Who this gateway is to AWS, for every audit event; unknown is logged, not fatal."""
        try:
            self.middleware.gateway_identity = await caller_identity(self.aws)
        except PHIGatewayError as exc:
            log.warning("own AWS identity unknown (%s): audit events will say null", exc)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.middleware(scope, receive, send)
            return

        async def startup_first() -> Message:
            message = await receive()
            if message["type"] == "lifespan.startup":
                if self.config.pepper_secret_id:
                    self.middleware.pepper = await Pepper.from_secrets_manager(
                        self.config.pepper_secret_id, self.aws
                    )
                uses_aws = self.config.kms_key_ids or self.config.pepper_secret_id
                if uses_aws or self.config.audit_sink == "cloudwatch":
                    await self._learn_identity()
                self.policies.start()
                if self.admin is not None:
                    await self.admin.start()
            elif message["type"] == "lifespan.shutdown":
                if self.admin is not None:
                    await self.admin.stop()
                await self.policies.stop()
            return message

        await self.middleware(scope, startup_first, send)


def _audit(config: GatewayConfig, aws: AwsSettings) -> AuditEmitter | None:
    sink: AuditSink
    if config.audit_sink == "none":
        log.warning("audit trail disabled (audit_sink: none)")
        return None
    if config.audit_sink == "cloudwatch":
        assert config.audit_log_group is not None
        stream = config.audit_log_stream.replace("{host}", socket.gethostname()).replace(
            "{pid}", str(os.getpid())
        )
        sink = CloudWatchSink(config.audit_log_group, stream, aws)
    elif config.audit_sink == "file":
        assert config.audit_chain_key_file is not None
        path = config.audit_file.replace("{pid}", str(os.getpid()))
        sink = ChainedFileSink(path, load_chain_key(config.audit_chain_key_file))
    else:
        sink = StdoutSink()
    on_failure: Literal["block", "drop"] = "drop" if config.audit_on_failure == "drop" else "block"
    return AuditEmitter(sink, max_queue=config.audit_max_queue, on_failure=on_failure)


def create_app() -> ASGIApp:
    """Factory for uvicorn workers: the config comes through ``PHI_GATEWAY_*`` variables."""
    config = load_config(os.environ.get("PHI_GATEWAY_CONFIG") or None)
    HeaderDeadlineProtocol.header_timeout = config.header_timeout  # read when connections open
    return Gateway(config)
