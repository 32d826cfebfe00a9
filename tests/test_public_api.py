from __future__ import annotations

import phi_gateway
from phi_gateway.context import Pseudonymizer
from phi_gateway.keyring import LocalKeyring


def test_all_is_sorted_and_importable() -> None:
    assert phi_gateway.__all__ == sorted(phi_gateway.__all__)
    for name in phi_gateway.__all__:
        assert getattr(phi_gateway, name) is not None


def test_every_exception_belongs_to_the_one_tree() -> None:
    errors = [
        getattr(phi_gateway, n)
        for n in phi_gateway.__all__
        if n.endswith(("Error", "Token", "Key", "Denied", "Throttled", "Unavailable", "Encryptable"))
    ]
    errors = [e for e in errors if isinstance(e, type) and issubclass(e, Exception)]
    assert len(errors) >= 8
    assert all(issubclass(e, phi_gateway.PHIGatewayError) for e in errors)


def test_holders_of_secrets_hide_them() -> None:
    secret = bytes(range(32))
    shown = [
        repr(phi_gateway.DataKey("local:k", b"w" * 8, secret)),
        repr(Pseudonymizer(secret)),
        repr(LocalKeyring({"local:k": secret}, "local:k")),
    ]
    for text in shown:
        assert secret.hex() not in text
        assert repr(secret) not in text
        assert secret.decode("latin-1") not in text
