"""phi-gateway: application-layer envelope encryption for PHI in JSON APIs."""

from __future__ import annotations

from phi_gateway.cache import CacheStats, DataKeyCache
from phi_gateway.context import Pseudonymizer, encode_context
from phi_gateway.envelope import Token, decrypt, encrypt, is_token, parse
from phi_gateway.exceptions import (
    InvalidToken,
    KeyAccessDenied,
    KeyAccessError,
    KeyringError,
    KeyThrottled,
    KeyUnavailable,
    PHIGatewayError,
    UnknownMasterKey,
    ValueNotEncryptable,
)
from phi_gateway.keyring import LocalKeyring, create_keyring
from phi_gateway.keys import DataKey, KeyProvider
from phi_gateway.kms import KmsKeyProvider, KmsSettings

__all__ = [
    "CacheStats",
    "DataKey",
    "DataKeyCache",
    "InvalidToken",
    "KeyAccessDenied",
    "KeyAccessError",
    "KeyProvider",
    "KeyThrottled",
    "KeyUnavailable",
    "KeyringError",
    "KmsKeyProvider",
    "KmsSettings",
    "LocalKeyring",
    "PHIGatewayError",
    "Pseudonymizer",
    "Token",
    "UnknownMasterKey",
    "ValueNotEncryptable",
    "create_keyring",
    "decrypt",
    "encode_context",
    "encrypt",
    "is_token",
    "parse",
]
