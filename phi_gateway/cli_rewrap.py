"""``phi-gateway rewrap``: move stored tokens to the current master key (``docs/rotation.md``)."""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import IO

import click
import orjson

from phi_gateway.cli import KeySource, fail, parse_headers, run
from phi_gateway.exceptions import PolicyError
from phi_gateway.keys import KeyProvider
from phi_gateway.kms import KmsKeyProvider
from phi_gateway.pepper import Pepper
from phi_gateway.policy import load_policies
from phi_gateway.rewrap import Rewrapper, Summary, Target, rewrap_document, rewrap_lines
from phi_gateway.transform import Scope

_LISTED_FAILURES = 20


def _target(provider: KeyProvider, kms_key_ids: tuple[str, ...], policy_key: str | None) -> Target:
    """The policy's own master key if it names one (as the gateway writes), else the current one."""
    if not isinstance(provider, KmsKeyProvider):
        master = policy_key or provider.default_master_key
        return Target(master, master)
    arns = dict(zip(kms_key_ids, provider.master_key_arns, strict=True))
    arns.update((arn, arn) for arn in provider.master_key_arns)
    master = policy_key or kms_key_ids[0]
    if master not in arns:
        raise click.UsageError(f"the policy's master key {master} is not among --kms-key-id")
    return Target(master, arns[master])


class _Progress:
    """Documents done (and a percentage of a file) on stderr, at most a few times a second."""

    def __init__(self, total: int | None, stream: IO[str], clock: Callable[[], float] = time.monotonic):
        self.total = total
        self.stream = stream
        self.clock = clock
        self.tty = stream.isatty()
        self.every = 0.2 if self.tty else 5.0
        self.last = -self.every
        self.shown = False

    def __call__(self, documents: int, consumed: int) -> None:
        now = self.clock()
        if now - self.last < self.every:
            return
        self.last = now
        share = f" ({100 * consumed // self.total}%)" if self.total else ""
        start, end = ("\r", "") if self.tty else ("", "\n")
        self.stream.write(f"{start}rewrap: {documents} documents{share}{end}")
        self.stream.flush()
        self.shown = True

    def close(self) -> None:
        if self.shown and self.tty:
            self.stream.write("\n")


@contextlib.contextmanager
def _output(path: str) -> Iterator[IO[bytes]]:
    """A temporary file (mode 0600) that becomes ``path``, or goes to stdout, only when the
    block finishes: an aborted run writes nothing."""
    directory = os.path.dirname(os.path.abspath(path)) if path != "-" else None
    try:
        fd, temporary = tempfile.mkstemp(prefix=".rewrap-", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot write {exc.strerror}", path) from None
    try:
        with os.fdopen(fd, "w+b") as out:
            yield out
            out.flush()
            if path == "-":
                out.seek(0)
                while chunk := out.read(1 << 20):
                    sys.stdout.buffer.write(chunk)
                sys.stdout.buffer.flush()
            else:
                os.fsync(out.fileno())
                os.replace(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)


@contextlib.contextmanager
def _input(path: str) -> Iterator[tuple[IO[bytes], int | None]]:
    if path == "-":
        yield sys.stdin.buffer, None
        return
    with open(path, "rb") as f:
        yield f, os.fstat(f.fileno()).st_size


def _is_json_lines(path: str, first: bytes) -> bool:
    if path.endswith((".jsonl", ".ndjson")) or not first.strip():
        return True
    if path.endswith(".json"):
        return False
    try:  # a pretty-printed document's first line is not a whole JSON value
        orjson.loads(first)
    except orjson.JSONDecodeError:
        return False
    return True


def summary_lines(summary: Summary, *, allow_outside: bool) -> list[str]:
    """The human summary: counts per key before and after, never a value."""
    verb = "re-encrypted" if summary.mode == "reencrypt" else "re-wrapped"
    lines = [
        f"rewrap: {summary.documents} documents, {summary.records} records, "
        f"{summary.found} tokens at decrypt paths; target key {summary.target}",
    ]
    for title, counts in (("before", summary.before), ("after", summary.after)):
        for n, (key_ref, count) in enumerate(sorted(counts.items())):
            lines.append(f"  {title if n == 0 else '':<7}{count:>9}  {key_ref}")
    lines.append(
        f"  {verb} {summary.rewrapped + summary.reencrypted}, already current {summary.current}, "
        f"failed {summary.failed}"
    )
    if summary.source_pepper_versions:
        versions = ", ".join(f"v{v}: {n}" for v, n in sorted(summary.source_pepper_versions.items()))
        lines.append(f"  pepper version of the contexts they were wrapped under: {versions}")
    calls = ", ".join(f"{name} {n}" for name, n in sorted(summary.calls.items()) if n)
    lines.append(f"  key service calls: {calls or 'none'}")
    if summary.plaintext:
        lines.append(f"  values at decrypt paths that are not tokens (left as they are): {summary.plaintext}")
    outside = sum(summary.outside.values())
    if outside:
        note = "left as they are" if allow_outside else "left as they are; --allow-outside to accept"
        lines.append(f"  tokens outside the route's decrypt paths ({note}): {outside}")
        lines += [f"    {where}" for where in summary.outside_at[:_LISTED_FAILURES]]
    for failure in summary.failures[:_LISTED_FAILURES]:
        lines.append(f"  failed: {failure}")
    more = len(summary.failures) + summary.unlisted - _LISTED_FAILURES
    if more > 0:
        lines.append(f"  ... and {more} more failures (see --summary-json)")
    return lines


@click.command()
@click.argument(
    "input_path",
    metavar="[INPUT]",
    default="-",
    type=click.Path(exists=True, dir_okay=False, allow_dash=True),
)
@click.option(
    "--policies",
    "policy_paths",
    envvar="PHI_GATEWAY_POLICIES",
    multiple=True,
    default=["policies"],
    show_default=True,
    type=click.Path(exists=True),
    help="Policy files or directories.",
)
@click.option(
    "--route",
    "route_text",
    required=True,
    metavar='"METHOD /path"',
    help="The request whose response rule describes the documents, as the upstream "
    "serves them (e.g. 'GET /patients'); path parameters come from the path.",
)
@click.option(
    "--header",
    "headers",
    multiple=True,
    metavar="NAME:VALUE",
    help="Request header, for context entries taken from headers.",
)
@click.option(
    "--output",
    "-o",
    default="-",
    type=click.Path(dir_okay=False, allow_dash=True),
    help="Where to write the documents (default stdout); written only when the run completes.",
)
@click.option(
    "--format",
    "input_format",
    type=click.Choice(["auto", "json", "jsonl"]),
    default="auto",
    show_default=True,
    help="One JSON document, or JSON Lines (one document per line).",
)
@click.option(
    "--reencrypt", is_flag=True, help="Decrypt every value and encrypt it again under a fresh data key."
)
@click.option(
    "--trust-current",
    is_flag=True,
    help="Count tokens already under the target key as current without checking their "
    "KMS context uses the current pepper version.",
)
@click.option(
    "--allow-outside",
    is_flag=True,
    help="Exit 0 even when tokens are found outside the route's decrypt paths.",
)
@click.option(
    "--summary-json", type=click.Path(dir_okay=False), help="Also write the summary as JSON to this file."
)
@click.option(
    "--progress/--no-progress", default=None, help="Progress on stderr (default: when stderr is a terminal)."
)
@click.option(
    "--concurrency",
    type=click.IntRange(1, 256),
    default=16,
    show_default=True,
    help="Key service calls in flight at most.",
)
# The key source of encrypt/decrypt (cli.py), without their single-value context options.
@click.option(
    "--keyring",
    envvar="PHI_GATEWAY_KEYRING",
    type=click.Path(dir_okay=False),
    help="Local development keyring file (its current key is the target).",
)
@click.option(
    "--kms-key-id",
    "kms_key_ids",
    envvar="PHI_GATEWAY_KMS_KEY_ID",
    multiple=True,
    help="KMS key ARN, id or alias; the first is the target, repeat for the older keys to move from.",
)
@click.option(
    "--region",
    envvar="PHI_GATEWAY_KMS_REGION",
    help="AWS region of the KMS keys [default: the region in the first key's ARN, else AWS_REGION,"
    " AWS_DEFAULT_REGION or the profile's].",
)
@click.option(
    "--endpoint-url",
    envvar="PHI_GATEWAY_KMS_ENDPOINT_URL",
    help="Override the AWS endpoint (e.g. a local test server).",
)
@click.option(
    "--fips/--no-fips", envvar="PHI_GATEWAY_KMS_FIPS", default=False, help="Use FIPS 140 validated endpoints."
)
@click.option(
    "--pepper",
    envvar="PHI_GATEWAY_PEPPER",
    type=click.Path(dir_okay=False),
    help="Pepper file, for contexts that pseudonymize (docs/pepper.md).",
)
@click.option(
    "--pepper-secret-id",
    envvar="PHI_GATEWAY_PEPPER_SECRET_ID",
    help="Secrets Manager secret holding the pepper, instead of --pepper.",
)
def rewrap(
    input_path: str,
    policy_paths: tuple[str, ...],
    route_text: str,
    headers: tuple[str, ...],
    output: str,
    input_format: str,
    reencrypt: bool,
    trust_current: bool,
    allow_outside: bool,
    summary_json: str | None,
    progress: bool | None,
    concurrency: int,
    keyring: str | None,
    kms_key_ids: tuple[str, ...],
    region: str | None,
    endpoint_url: str | None,
    fips: bool,
    pepper: str | None,
    pepper_secret_id: str | None,
) -> None:
    """Re-wrap every token in stored documents (INPUT, default stdin) under the current
    master key, and print a summary of the tokens per key on stderr.

    The first --kms-key-id is the key tokens move to; list the older ones after it so
    their tokens can be opened. Exit status 1 when any token could not be moved or tokens
    were found outside the route's decrypt paths (unless --allow-outside).
    """
    method, _, path = route_text.strip().partition(" ")
    try:
        policies = load_policies(policy_paths)
    except PolicyError as exc:
        fail(f"policies do not load:\n{exc}")
    found = policies.match(method, path.strip().partition("?")[0])
    if found is None or found.route.response is None:
        fail(f"no policy route with a response rule matches {route_text.strip()!r}")
        return
    if pepper and pepper_secret_id:
        raise click.UsageError("give at most one of --pepper and --pepper-secret-id")
    rule = found.route.response
    for entry in rule.context.entries:
        value = found.params.get(entry.value, "") if entry.source == "param" else ""
        if value.startswith("{") and value.endswith("}"):
            # The template itself matched: its text would become every record's context.
            raise click.UsageError(f"the route's context takes {value} from the path: give a real path")
    scope = Scope(found.params, parse_headers(headers))
    source = KeySource(
        keyring=keyring,
        kms_key_ids=kms_key_ids,
        region=region,
        endpoint_url=endpoint_url,
        fips=fips,
        context_items=(),
        field="$",
        policy=None,
        pseudonymize=(),
        pepper=None,
    )
    show = sys.stderr.isatty() if progress is None else progress

    async def go() -> Summary:
        peppers = None
        if pepper:
            peppers = Pepper.load(pepper)
        elif pepper_secret_id:
            peppers = await Pepper.from_secrets_manager(pepper_secret_id, source.aws_settings())
        async with source.provider() as provider:
            target = _target(provider, kms_key_ids, found.route.key)
            rewrapper = Rewrapper(
                provider,
                rule,
                scope,
                target,
                pepper=peppers,
                reencrypt=reencrypt,
                trust_current=trust_current,
                concurrency=concurrency,
            )
            with _input(input_path) as (stream, size), _output(output) as out:
                lines = iter(stream.readline, b"")
                head = []  # blank lines, then the first document's line: enough to tell the format
                for line in lines:
                    head.append(line)
                    if line.strip():
                        break
                first = head[-1] if head else b""
                rest = itertools.chain(head, lines)
                as_lines = input_format == "jsonl" or (
                    input_format == "auto" and _is_json_lines(input_path, first)
                )
                if as_lines:
                    meter = _Progress(size, sys.stderr) if show else None
                    try:
                        await rewrap_lines(rest, out.write, rewrapper, progress=meter)
                    finally:
                        if meter is not None:
                            meter.close()
                else:
                    out.write(await rewrap_document(b"".join(rest), rewrapper))
            return rewrapper.summary

    try:
        summary = run(go)
    except OSError as exc:  # the input, output or summary file; never a document's content
        fail(f"{exc.strerror}: {exc.filename}")
        return
    for line in summary_lines(summary, allow_outside=allow_outside):
        click.echo(line, err=True)
    if summary_json:
        try:
            with open(summary_json, "wb") as f:
                f.write(orjson.dumps(summary.as_json(), option=orjson.OPT_INDENT_2) + b"\n")
        except OSError as exc:
            fail(f"{exc.strerror}: {exc.filename}")
    if summary.failed or summary.failures or (summary.outside and not allow_outside):
        sys.exit(1)
