"""The one exception tree of phi-gateway.

    PHIGatewayError
    ├── InvalidToken          a token did not parse or did not authenticate (opaque, no detail)
    ├── KeyAccessError        a key could not be used: the request may succeed later or elsewhere
    │   ├── UnknownMasterKey      the token names a master key this gateway is not configured for
    │   ├── KeyAccessDenied       the key service refused (IAM, key policy, grant)
    │   ├── KeyThrottled          the key service throttled us past the retry budget
    │   └── KeyUnavailable        the key service is unreachable, timed out, or the key is disabled
    ├── KeyringError          the local keyring file is missing, malformed or would be overwritten
    ├── PepperError           the blind-index pepper is missing, malformed or too short
    ├── AuditError            the audit trail cannot be written, its file or chain key is unusable
    ├── PolicyError           policy files do not load: every problem, as file:line: message
    ├── InvalidPath           a JSONPath expression does not parse (also a ValueError)
    ├── DocumentError         a body cannot be transformed under its policy (has a stable ``code``)
    ├── HTTPError             what the gateway answers a client with: status, stable code, message
    └── ValueNotEncryptable   a value is not plain JSON (e.g. an integer beyond 64 bits)

Errors from botocore/aiohttp are translated once, in ``aws.py`` (``translate``). No
message in this tree ever carries plaintext, key bytes, an IV or a tag: messages are
fixed strings or name only identifiers (key ids, file paths).
"""

from __future__ import annotations

from collections.abc import Sequence


class PHIGatewayError(Exception):
    """Base of every error phi-gateway raises on purpose."""


class InvalidToken(PHIGatewayError):
    """A token is malformed, truncated, tampered with, or bound to another context.

    Deliberately carries no detail: which check failed is information an attacker could use.
    """

    def __init__(self) -> None:
        super().__init__("invalid token")


class KeyAccessError(PHIGatewayError):
    """A data or master key could not be used.

    Raised as this class itself for a configuration problem: no AWS region, a key ARN in
    another region, a key the key service does not know."""


class UnknownMasterKey(KeyAccessError):
    """The master key named by a token is not one this gateway may use."""


class KeyAccessDenied(KeyAccessError):
    """The key service denied the operation."""


class KeyThrottled(KeyAccessError):
    """The key service kept throttling after the configured retries."""


class KeyUnavailable(KeyAccessError):
    """The key service could not be reached in time, or the key is not usable now."""


class KeyringError(PHIGatewayError):
    """The local development keyring cannot be created or read."""


class PepperError(PHIGatewayError):
    """The blind-index pepper cannot be created, read or used."""


class AuditError(PHIGatewayError):
    """The audit trail cannot take events, or its file or chain key cannot be used.

    Messages name files and counts, never an event's content.
    """


class PolicyError(PHIGatewayError):
    """Policy files failed to load; ``problems`` lists each as ``file:line: message``."""

    def __init__(self, problems: Sequence[object]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(map(str, self.problems)))


class DocumentError(PHIGatewayError):
    """A JSON body or query does not fit its policy. ``code`` is stable, for API error bodies.

    Messages name fields and context entries, never values.
    """

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)


class HTTPError(PHIGatewayError):
    """An error the gateway sends to its client as ``{"error": {"code", "message"}}``."""

    def __init__(self, status: int, code: str, message: str, *, retry_after: int | None = None) -> None:
        self.status = status
        self.code = code
        self.retry_after = retry_after
        super().__init__(message)


class ValueNotEncryptable(PHIGatewayError):
    """A value cannot be serialized as plain JSON, so it cannot round-trip exactly."""
