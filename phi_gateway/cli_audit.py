"""``phi-gateway audit``: commands for whoever checks the audit trail (docs/audit.md).

Exit status of ``verify``: 0 the chain verifies, 1 it does not, 2 it could not be checked
(unreadable file, bad key file), so scripts can tell tampering from misconfiguration.
"""

from __future__ import annotations

import sys

import click

from phi_gateway.audit_chain import create_chain_key_file, load_chain_key, verify_chain
from phi_gateway.exceptions import AuditError


def _error(message: str, status: int) -> None:
    click.echo(f"phi-gateway: error: {message}", err=True)
    sys.exit(status)


@click.group()
def audit() -> None:
    """Verify hash-chained audit files and manage their chain keys."""


@audit.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option(
    "--chain-key-file",
    required=True,
    type=click.Path(dir_okay=False),
    help="The chain key file the gateway wrote FILE with (base64url text, mode 0600).",
)
@click.option(
    "--expected-last-seq",
    type=click.IntRange(min=0),
    metavar="N",
    help="Fail unless the chain reaches at least seq N (catches records cut off the end).",
)
def verify(file: str, chain_key_file: str, expected_last_seq: int | None) -> None:
    """Check every record of FILE: its MAC, its sequence number and its link to the one before."""
    try:
        report = verify_chain(file, load_chain_key(chain_key_file), expected_last_seq=expected_last_seq)
    except AuditError as exc:
        _error(str(exc), 2)
    if not report.ok:
        click.echo(f"FAIL at seq {report.first_bad_seq}: {report.message}")
        sys.exit(1)
    click.echo(f"ok: {report.records} records" + ("; torn last line ignored" if report.torn_tail else ""))


@audit.command("init-key")
@click.argument("path", type=click.Path(dir_okay=False))
def init_key(path: str) -> None:
    """Create a new random 32-byte chain key file at PATH (mode 0600; never overwrites)."""
    try:
        create_chain_key_file(path)
    except AuditError as exc:
        _error(str(exc), 1)
    click.echo(f"created {path}")
