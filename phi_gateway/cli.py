"""The ``phi-gateway`` command line: one click group, options also read from PHI_GATEWAY_*.

Every failure, from any subcommand, is one line on stderr, ``phi-gateway: error: ...``:
exit status 2 for a usage error (click's, or ours), 1 for anything else. No failure
message carries plaintext: values are read from stdin, and stdin is never echoed.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import sys
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import click
import orjson

from phi_gateway import envelope
from phi_gateway.aws import AwsSettings
from phi_gateway.cache import DataKeyCache
from phi_gateway.exceptions import PHIGatewayError
from phi_gateway.jsonvalue import loads_strict
from phi_gateway.keyring import LocalKeyring, create_keyring, rotate_keyring
from phi_gateway.keys import KeyProvider
from phi_gateway.kms import KmsKeyProvider
from phi_gateway.pepper import Pepper, create_pepper_file
from phi_gateway.rules import POLICY_CONTEXT_KEY

T = TypeVar("T")


def fail(message: str, status: int = 1) -> None:
    click.echo(f"phi-gateway: error: {message}", err=True)
    sys.exit(status)


@contextmanager
def _one_line_errors() -> Iterator[None]:
    """Click's errors (a Usage/Try/Error block) and any unexpected exception become one
    line. An unexpected exception shows only its type: its message could carry data."""
    try:
        yield
    except (click.exceptions.Exit, click.Abort, click.exceptions.NoArgsIsHelpError):
        raise  # --help, --version, ^C, and a group run bare (prints its help)
    except click.ClickException as exc:
        message = " ".join(exc.format_message().splitlines())
        if isinstance(exc, click.UsageError) and exc.ctx is not None:
            message += f" (see '{exc.ctx.command_path} --help')"
        fail(message, exc.exit_code)
    except OSError as exc:
        if exc.errno == errno.EPIPE:
            raise  # a closed stdout: click's own quiet handling
        fail(f"{exc.strerror or type(exc).__name__}" + (f": {exc.filename}" if exc.filename else ""))
    except Exception as exc:
        fail(f"unexpected {type(exc).__name__} (a bug; its message is not shown, as it could hold data)")


class _Main(click.Group):
    """The root group. Parsing happens in ``make_context`` for its own options and in
    ``invoke`` for every subcommand below it (those of cli_*.py modules included), so
    catching there covers the whole command line."""

    def make_context(
        self, info_name: str | None, args: list[str], parent: click.Context | None = None, **extra: Any
    ) -> click.Context:
        with _one_line_errors():
            return super().make_context(info_name, args, parent, **extra)

    def invoke(self, ctx: click.Context) -> Any:
        with _one_line_errors():
            return super().invoke(ctx)


def refuse_arguments(what: str) -> None:
    """``encrypt`` and ``decrypt`` take no arguments: a value typed on the command line by
    mistake would otherwise be echoed in click's "unexpected extra argument (...)"."""
    extra = click.get_current_context().args
    if extra:
        raise click.UsageError(f"{len(extra)} unexpected argument(s), not shown: {what} reads stdin")


def run(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine; a project error or a value the library refused becomes one line on
    stderr and exit status 1. Our messages never carry plaintext, so they are safe to print."""
    try:
        return asyncio.run(main())
    except (PHIGatewayError, ValueError, TypeError) as exc:
        fail(str(exc) if isinstance(exc, PHIGatewayError) else f"{type(exc).__name__}: {exc}")
        raise AssertionError("unreachable") from None


@dataclass(frozen=True, kw_only=True)
class KeySource:
    """The key and context options shared by ``encrypt`` and ``decrypt``."""

    keyring: str | None
    kms_key_ids: tuple[str, ...]
    region: str | None
    endpoint_url: str | None
    fips: bool
    context_items: tuple[str, ...]
    field: str
    policy: str | None
    pseudonymize: tuple[str, ...]
    pepper: str | None

    def contexts(self) -> tuple[dict[str, str], dict[str, str]]:
        """(exact context for the token's associated data, the context KMS sees)."""
        exact: dict[str, str] = {}
        for item in self.context_items:
            name, sep, value = item.partition("=")
            if not sep or not name:
                raise click.BadParameter("expected NAME=VALUE", param_hint="--context")
            if name in exact:
                raise click.BadParameter(f"{name!r} given twice", param_hint="--context")
            exact[name] = value
        if self.policy:
            exact[POLICY_CONTEXT_KEY] = self.policy  # as the gateway binds its tokens
        if not self.pseudonymize:
            return exact, dict(exact)
        if not (self.pepper and self.policy):
            raise click.UsageError("--pseudonymize needs --pepper and --policy")
        pseudonyms = Pepper.load(self.pepper).pseudonymizer(self.policy)
        return exact, pseudonyms.kms_context(exact, self.pseudonymize)

    def aws_settings(self) -> AwsSettings:
        return AwsSettings(region=self.region, endpoint_url=self.endpoint_url, use_fips_endpoint=self.fips)

    @asynccontextmanager
    async def provider(self) -> AsyncIterator[KeyProvider]:
        if bool(self.keyring) == bool(self.kms_key_ids):
            raise click.UsageError("give exactly one key source: --keyring PATH or --kms-key-id ID")
        if self.keyring:
            yield LocalKeyring.load(self.keyring)
            return
        async with KmsKeyProvider(self.kms_key_ids, self.aws_settings()) as kms:
            yield kms


def parse_headers(items: Iterable[str]) -> dict[str, str]:
    """``--header NAME:VALUE`` options as a request's headers (names in lower case)."""
    return {name.strip().lower(): value.strip() for name, _, value in (h.partition(":") for h in items)}


_KEY_SOURCE_OPTIONS = [
    click.option("--keyring", envvar="PHI_GATEWAY_KEYRING", type=click.Path(dir_okay=False),
                 help="Local development keyring file (not for production)."),
    click.option("--kms-key-id", "kms_key_ids", envvar="PHI_GATEWAY_KMS_KEY_ID", multiple=True,
                 help="KMS key ARN, id or alias; repeat to also accept older keys (first is current)."),
    click.option("--region", envvar="PHI_GATEWAY_KMS_REGION",
                 help="AWS region of the KMS keys [default: the region in the first key's ARN, else "
                      "AWS_REGION, AWS_DEFAULT_REGION or the profile's]."),
    click.option("--endpoint-url", envvar="PHI_GATEWAY_KMS_ENDPOINT_URL",
                 help="Override the KMS endpoint (e.g. a local test server)."),
    click.option("--fips/--no-fips", envvar="PHI_GATEWAY_KMS_FIPS", default=False,
                 help="Use the FIPS 140 validated KMS endpoint."),
    click.option("--context", "context_items", multiple=True, metavar="NAME=VALUE",
                 help="Encryption context entry; repeat for several. Must match to decrypt."),
    click.option("--field", default="$", show_default=True,
                 help="Field path the value belongs to; bound into the token."),
    click.option("--policy", help="Policy name, bound into the token as the gateway does."),
    click.option("--pseudonymize", multiple=True, metavar="NAME",
                 help="Context entry that KMS (and so CloudTrail) sees only as a keyed pseudonym."),
    click.option("--pepper", envvar="PHI_GATEWAY_PEPPER", type=click.Path(dir_okay=False),
                 help="Pepper file (docs/pepper.md) for --pseudonymize."),
]  # fmt: skip


def key_source_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Adds the key source options; the command receives them as one ``KeySource``."""

    def wrapper(**options: Any) -> Any:
        names = set(KeySource.__dataclass_fields__)
        source = KeySource(**{k: v for k, v in options.items() if k in names})
        return command(source, **{k: v for k, v in options.items() if k not in names})

    wrapper.__name__, wrapper.__doc__ = command.__name__, command.__doc__
    for option in reversed(_KEY_SOURCE_OPTIONS):
        wrapper = option(wrapper)
    return wrapper


def read_stdin() -> bytes:
    return sys.stdin.buffer.read()


@click.group(
    cls=_Main, context_settings={"auto_envvar_prefix": "PHI_GATEWAY", "help_option_names": ["-h", "--help"]}
)
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
        fail(str(exc))
    click.echo(f"created {path} with master key {key_id}")
    click.echo("note: a local keyring keeps its master key in the file; use AWS KMS in production", err=True)


@keys.command("rotate")
@click.argument("path", type=click.Path(dir_okay=False))
def keys_rotate(path: str) -> None:
    """Add a new master key to the keyring at PATH and make it current (older keys stay,
    for decrypting); then move stored tokens with `phi-gateway rewrap`."""
    try:
        key_id = rotate_keyring(path)
    except PHIGatewayError as exc:
        fail(str(exc))
    click.echo(f"rotated {path}: new current master key {key_id}")


@main.group()
def pepper() -> None:
    """Manage local blind-index peppers."""


@pepper.command("init")
@click.argument("path", type=click.Path(dir_okay=False))
def pepper_init(path: str) -> None:
    """Create a new pepper file at PATH (mode 0600; never overwrites)."""
    try:
        create_pepper_file(path)
    except PHIGatewayError as exc:
        fail(str(exc))
    click.echo(f"created {path}")


@main.command(context_settings={"allow_extra_args": True})
@key_source_options
def encrypt(source: KeySource) -> None:
    """Encrypt one JSON value read from stdin; print its token."""
    refuse_arguments("encrypt")
    exact, kms_context = source.contexts()

    async def go() -> str:
        value = loads_strict(read_stdin())
        async with source.provider() as provider:
            key = await DataKeyCache(provider).encryption_key(kms_context)
            return envelope.encrypt(key, value, context=exact, field=source.field)

    click.echo(run(go))


@main.command(context_settings={"allow_extra_args": True})
@key_source_options
def decrypt(source: KeySource) -> None:
    """Decrypt a token read from stdin; print its JSON value."""
    refuse_arguments("decrypt")
    exact, kms_context = source.contexts()

    async def go() -> bytes:
        token = envelope.parse(read_stdin().decode("ascii", "replace").strip())
        async with source.provider() as provider:
            key = await DataKeyCache(provider).decryption_key(token.key_ref, token.wrapped_key, kms_context)
            return orjson.dumps(envelope.decrypt(key, token, context=exact, field=source.field))

    sys.stdout.buffer.write(run(go) + b"\n")


@main.command()
@click.argument("token", default="-")
def inspect(token: str) -> None:
    """Show a token's header (TOKEN or '-' for stdin). Never decrypts, never shows IV or tag."""
    text = read_stdin().decode("ascii", "replace").strip() if token == "-" else token  # noqa: S105
    try:
        parsed = envelope.parse(text)
    except PHIGatewayError as exc:
        fail(str(exc))
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


# Last, because the policy commands use the helpers above.
from phi_gateway.cli_audit import audit  # noqa: E402
from phi_gateway.cli_policy import policy  # noqa: E402
from phi_gateway.cli_rewrap import rewrap  # noqa: E402
from phi_gateway.cli_serve import demo, serve  # noqa: E402

main.add_command(audit)
main.add_command(policy)
main.add_command(serve)
main.add_command(demo)
main.add_command(rewrap)
