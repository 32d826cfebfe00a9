"""Files that hold secrets on disk (local keyring, pepper): created 0600, never overwritten,
refused when others can read them."""

from __future__ import annotations

import os
import stat


def create_private_file(path: str | os.PathLike[str], content: bytes, what: str) -> None:
    """Write ``content`` to a new file with mode 0600; refuse any existing path, links included.

    Raises ``OSError`` subclasses carrying a one-line message that names only ``what`` and the path.
    """
    name = os.fspath(path)
    try:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        raise FileExistsError(f"refusing to overwrite existing file: {name}") from None
    except OSError as exc:
        raise OSError(f"cannot create {what} {name}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        os.unlink(name)  # a half-written secret file would block the next attempt
        raise OSError(f"cannot write {what} {name}: {exc.strerror}") from None


def read_private_file(path: str | os.PathLike[str], what: str) -> bytes:
    """Read a secret file, refusing one that group or others may read."""
    name = os.fspath(path)
    try:
        # One open, then fstat and read of that same file: no window to swap it in between.
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise OSError(f"cannot read {what} {name}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        if stat.S_IMODE(os.fstat(fd).st_mode) & 0o077:
            raise PermissionError(f"{what} {name} is readable by others; chmod 600 it")
        return f.read()
