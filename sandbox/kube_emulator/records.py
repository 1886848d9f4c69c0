"""What the emulator tells a test afterwards: the client's writes and the controllers'
transitions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class WriteRecord:
    """One mutating request (POST/PUT/PATCH/DELETE) a client made, and how it was answered."""

    at: float  # time.time() when the request arrived
    method: str
    path: str  # without the query string
    kind: str  # "Deployment"; "" when the path named no known resource
    namespace: str | None
    name: str | None
    subresource: str | None  # "scale", "status", ...
    body: Any  # the parsed JSON body, or None
    status: int  # the HTTP status answered
    dry_run: bool = False  # `?dryRun=All`: answered, nothing stored


@dataclass(frozen=True)
class HistoryEvent:
    """A controller transition, stamped with the time it was written."""

    at: float
    kind: str
    namespace: str | None
    name: str
    what: str  # "RolloutComplete", "ProgressDeadlineExceeded", "JobComplete", ...
