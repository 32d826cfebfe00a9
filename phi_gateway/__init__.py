"""phi-gateway: application-layer envelope encryption for PHI in JSON APIs."""

from __future__ import annotations

from phi_gateway.aws import AwsSettings
from phi_gateway.bodies import Limits
from phi_gateway.cache import CacheStats, DataKeyCache
from phi_gateway.config import GatewayConfig
from phi_gateway.context import Pseudonymizer, encode_context
from phi_gateway.envelope import Token, decrypt, encrypt, is_token, parse
from phi_gateway.exceptions import (
    DocumentError,
    HTTPError,
    InvalidToken,
    KeyAccessDenied,
    KeyAccessError,
    KeyringError,
    KeyThrottled,
    KeyUnavailable,
    PepperError,
    PHIGatewayError,
    PolicyError,
    UnknownMasterKey,
    ValueNotEncryptable,
)
from phi_gateway.gateway import Gateway
from phi_gateway.keyring import LocalKeyring, create_keyring
from phi_gateway.keys import DataKey, KeyProvider
from phi_gateway.kms import KmsKeyProvider
from phi_gateway.middleware import PHIMiddleware
from phi_gateway.pepper import Pepper
from phi_gateway.policy import load_policies
from phi_gateway.proxy import ProxyApp, UpstreamSettings
from phi_gateway.rules import PolicySet
from phi_gateway.search import rewrite_query
from phi_gateway.transform import Scope, decrypt_response, encrypt_request

__all__ = [
    "AwsSettings",
    "CacheStats",
    "DataKey",
    "DataKeyCache",
    "DocumentError",
    "Gateway",
    "GatewayConfig",
    "HTTPError",
    "InvalidToken",
    "KeyAccessDenied",
    "KeyAccessError",
    "KeyProvider",
    "KeyThrottled",
    "KeyUnavailable",
    "KeyringError",
    "KmsKeyProvider",
    "Limits",
    "LocalKeyring",
    "PHIGatewayError",
    "PHIMiddleware",
    "Pepper",
    "PepperError",
    "PolicyError",
    "PolicySet",
    "ProxyApp",
    "Pseudonymizer",
    "Scope",
    "Token",
    "UnknownMasterKey",
    "UpstreamSettings",
    "ValueNotEncryptable",
    "create_keyring",
    "decrypt",
    "decrypt_response",
    "encode_context",
    "encrypt",
    "encrypt_request",
    "is_token",
    "load_policies",
    "parse",
    "rewrite_query",
]
