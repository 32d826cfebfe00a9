"""The ``phi-gateway`` command line: one click group, options also read from PHI_GATEWAY_*."""

from __future__ import annotations

import asyncio
import hashlib
import sys
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import click
import orjson

from phi_gateway import envelope
from phi_gateway.cache import DataKeyCache
from phi_gateway.exceptions import PHIGatewayError
from phi_gateway.jsonvalue import loads_strict
from phi_gateway.keyring import LocalKeyring, create_keyring
from phi_gateway.keys import KeyProvider
from phi_gateway.kms import KmsKeyProvider, KmsSettings

T = TypeVar("T")


def _fail(message: str) -> None:
    click.echo(f"phi-gateway: error: {message}", err=True)
    sys.exit(1)


def _run(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine; any project error becomes one line on stderr and exit status 1."""
    try:
        return asyncio.run(main())
    except PHIGatewayError as exc:
        _fail(str(exc))
        raise AssertionError("unreachable") from None


def _parse_context(items: Sequence[str]) -> dict[str, str]:
    context: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise click.BadParameter(
                f"expected NAME=VALUE, got {name or '(empty)'!r}", param_hint="--context"
            )
        if name in context:
            raise click.BadParameter(f"{name!r} given twice", param_hint="--context")
        context[name] = value
    return context


def key_source_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Where data keys come from: a local keyring file, or AWS KMS master keys."""
    options = [
        click.option(
            "--keyring",
            "keyring_path",
            envvar="PHI_GATEWAY_KEYRING",
            type=click.Path(dir_okay=False),
            help="Local development keyring file (not for production).",
        ),
        click.option(
            "--kms-key-id",
            "kms_key_ids",
            envvar="PHI_GATEWAY_KMS_KEY_ID",
            multiple=True,
            help="KMS key ARN, id or alias; repeat to also accept older keys (first is current).",
        ),
        click.option(
            "--region",
            envvar=["PHI_GATEWAY_KMS_REGION", "AWS_REGION"],
            default="us-east-1",
            show_default=True,
            help="AWS region of the KMS keys.",
        ),
        click.option(
            "--endpoint-url",
            envvar="PHI_GATEWAY_KMS_ENDPOINT_URL",
            help="Override the KMS endpoint (e.g. a local test server).",
        ),
        click.option(
            "--fips/--no-fips",
            envvar="PHI_GATEWAY_KMS_FIPS",
            default=False,
            help="Use the FIPS 140 validated KMS endpoint.",
        ),
        click.option(
            "--context",
            "context_items",
            multiple=True,
            metavar="NAME=VALUE",
            help="Encryption context entry; repeat for several. Must match to decrypt.",
        ),
        click.option(
            "--field",
            default="$",
            show_default=True,
            help="Field path the value belongs to; bound into the token.",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@asynccontextmanager
async def _provider(
    keyring_path: str | None, kms_key_ids: Sequence[str], region: str, endpoint_url: str | None, fips: bool
) -> AsyncIterator[KeyProvider]:
    if bool(keyring_path) == bool(kms_key_ids):
        raise click.UsageError("give exactly one key source: --keyring PATH or --kms-key-id ID")
    if keyring_path:
        yield LocalKeyring.load(keyring_path)
        return
    settings = KmsSettings(region=region, endpoint_url=endpoint_url, use_fips_endpoint=fips)
    async with KmsKeyProvider(kms_key_ids, settings) as kms:
        yield kms


def _read_stdin() -> bytes:
    return sys.stdin.buffer.read()


@click.group(context_settings={"auto_envvar_prefix": "PHI_GATEWAY", "help_option_names": ["-h", "--help"]})
@click.version_option(package_name="phi-gateway")
def main() -> None:
    """phi-gateway: application-layer envelope encryption for PHI in JSON APIs."""


@main.group()
def keys() -> None:
    """Manage local development keyrings."""


@keys.command("init")
@click.argument("path", type=click.Path(dir_okay=False))
def keys_init(path: str) -> None:
    """Create a new local keyring at PATH (mode 0600; never overwrites)."""
    try:
        key_id = create_keyring(path)
    except PHIGatewayError as exc:
        _fail(str(exc))
    click.echo(f"created {path} with master key {key_id}")
    click.echo("note: a local keyring keeps its master key in the file; use AWS KMS in production", err=True)


@main.command()
@key_source_options
def encrypt(
    keyring_path: str | None,
    kms_key_ids: tuple[str, ...],
    region: str,
    endpoint_url: str | None,
    fips: bool,
    context_items: tuple[str, ...],
    field: str,
) -> None:
    """Encrypt one JSON value read from stdin; print its token."""
    context = _parse_context(context_items)

    async def run() -> str:
        value = loads_strict(_read_stdin())
        async with _provider(keyring_path, kms_key_ids, region, endpoint_url, fips) as provider:
            key = await DataKeyCache(provider).encryption_key(context)
            return envelope.encrypt(key, value, context=context, field=field)

    click.echo(_run(run))


@main.command()
@key_source_options
def decrypt(
    keyring_path: str | None,
    kms_key_ids: tuple[str, ...],
    region: str,
    endpoint_url: str | None,
    fips: bool,
    context_items: tuple[str, ...],
    field: str,
) -> None:
    """Decrypt a token read from stdin; print its JSON value."""
    context = _parse_context(context_items)

    async def run() -> bytes:
        token = envelope.parse(_read_stdin().decode("ascii", "replace").strip())
        async with _provider(keyring_path, kms_key_ids, region, endpoint_url, fips) as provider:
            key = await DataKeyCache(provider).decryption_key(token.key_ref, token.wrapped_key, context)
            return orjson.dumps(envelope.decrypt(key, token, context=context, field=field))

    output = _run(run)
    sys.stdout.buffer.write(output + b"\n")


@main.command()
@click.argument("token", default="-")
def inspect(token: str) -> None:
    """Show a token's header (TOKEN or '-' for stdin). Never decrypts, never shows IV or tag."""
    text = _read_stdin().decode("ascii", "replace").strip() if token == "-" else token  # noqa: S105
    try:
        parsed = envelope.parse(text)
    except PHIGatewayError as exc:
        _fail(str(exc))
    fields = {
        "version": parsed.version,
        "algorithm": "AES-256-GCM (96-bit IV, 128-bit tag), JSON payload",
        "key_ref": parsed.key_ref,
        "wrapped_key_bytes": len(parsed.wrapped_key),
        "wrapped_key_sha256": hashlib.sha256(parsed.wrapped_key).hexdigest()[:16],
        "ciphertext_bytes": parsed.ciphertext_length,
        "token_chars": len(text),
    }
    click.echo(orjson.dumps(fields, option=orjson.OPT_INDENT_2).decode())
