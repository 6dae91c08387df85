"""One error type a user can act on: a message and a hint, no traceback."""

from __future__ import annotations


class SeedError(Exception):
    """A failure with a message that says what went wrong and what to do."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class BlockInvalid(SeedError):
    """A block whose stored bytes do not match the index (digest or length)."""


class SignatureInvalid(SeedError):
    """A signature that does not verify with any trusted key."""


class MetadataExpired(SeedError):
    """Signed metadata whose expiry time has passed."""


class FormatError(SeedError):
    """A file of the mirror format that cannot be parsed or does not add up."""


def report(prog: str, e: SeedError) -> None:
    """Print an error the way every seedboot command does: one line, then the hint if any."""
    import sys

    print(f"{prog}: error: {e.message}", file=sys.stderr)
    if e.hint:
        print(f"  hint: {e.hint}", file=sys.stderr)
