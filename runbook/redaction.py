"""Keep customer data and credentials out of what a run publishes.

PostgreSQL quotes rows in its error messages (`Failing row contains (…)`, `Key (email)=(…)`,
`COPY users, line 3: "…"`), and a client program's stderr or a Job's log can be megabytes.
Anything such text reaches — an exception, a state message, an artifact, chat — gets it
through `redact_output` first: row data replaced, credentials in URLs and `password=`
pairs masked, and only the last lines kept. Pure functions, no Prefect, no clients.
"""

from __future__ import annotations

import re

REDACTED = "[redacted]"
MAX_LINES = 20
MAX_CHARS = 2000

_ROW_PATTERNS = (
    # DETAIL:  Failing row contains (1, alice@example.com, …).
    (re.compile(r"(Failing row contains )\(.*\)", re.IGNORECASE), r"\1" + f"({REDACTED})"),
    # DETAIL:  Key (email)=(alice@example.com) already exists.  Also "is duplicated" (a
    # unique index built over existing rows: a migration), "is still referenced", …
    (
        re.compile(
            r"(Key \([^)]*\)=)\(.*?\)"
            r"(?= already exists| is duplicated| is still referenced| is not present"
            r"| conflicts|\.|$)"
        ),
        r"\1" + f"({REDACTED})",
    ),
    # CONTEXT:  COPY users, line 3: "…"   /   COPY users, line 3, column email: "…"
    (re.compile(r"(COPY [^,\n]+, line \d+(?:, column [^:\n]+)?): .*"), r"\1: " + REDACTED),
    # ERROR: invalid input syntax for type integer: "abc"
    (re.compile(r"(invalid input (?:syntax|value) for [^:\n]*): .*"), r"\1: " + REDACTED),
)
_CREDENTIAL_PATTERNS = (
    (re.compile(r"(\w+://[^:/@\s]+:)[^@\s]+@"), r"\1" + REDACTED + "@"),
    (re.compile(r"(password\s*=\s*)('[^']*'|\S+)", re.IGNORECASE), r"\1" + REDACTED),
)


def redact_row_data(text: str) -> str:
    """`text` with every quoted row or field value PostgreSQL put in it replaced."""
    for pattern, replacement in _ROW_PATTERNS + _CREDENTIAL_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def tail(text: str, max_lines: int = MAX_LINES, max_chars: int = MAX_CHARS) -> str:
    """The last `max_lines` lines of `text`, at most `max_chars` characters, marked when cut."""
    lines = text.rstrip("\n").splitlines()
    kept = lines[-max_lines:]
    out = "\n".join(kept)
    if len(out) > max_chars:
        out = out[-max_chars:]
    if len(kept) < len(lines) or len(out) < len("\n".join(kept)):
        out = f"[… {len(lines) - len(kept)} earlier lines cut]\n" + out
    return out


def redact_output(text: str, max_lines: int = MAX_LINES, max_chars: int = MAX_CHARS) -> str:
    """A program's stderr or a Job's log, fit to publish: row data redacted, tail only."""
    return tail(redact_row_data(text), max_lines, max_chars)
