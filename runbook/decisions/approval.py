"""Who asked for a change, and whether an approver may approve it (four eyes).

Where a requester's identity comes from, most trusted first:
1. `prefect-cloud` — the run's `created_by` of type USER (Prefect Cloud fills it; the
   open-source server never does);
2. `proxy tag` — a `requested-by:<name>` tag on the run, which an authenticating proxy
   in front of the Prefect API stamps on each run it lets through (or a person adds with
   `prefect deployment run --tag requested-by:<name>`);
3. `parameter` — the flow's own `requested_by` parameter, typed by whoever started it.

None of them: the requester is unknown, recorded as such, and any approver is accepted.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

REQUESTED_BY_TAG = "requested-by:"


@dataclass(frozen=True)
class Requester:
    name: str
    source: str  # "prefect-cloud", "proxy tag" or "parameter"

    def describe(self) -> str:
        return f"{self.name} (from the {self.source})"


def requester_of(
    parameters: Mapping[str, Any],
    tags: Iterable[str],
    created_by_type: str | None = None,
    created_by_name: str | None = None,
) -> Requester | None:
    """The requester of a run, from what the run carries; None when nothing names one."""
    if created_by_type == "USER" and created_by_name and created_by_name.strip():
        return Requester(created_by_name.strip(), "prefect-cloud")
    for tag in tags:
        if tag.startswith(REQUESTED_BY_TAG) and tag[len(REQUESTED_BY_TAG) :].strip():
            return Requester(tag[len(REQUESTED_BY_TAG) :].strip(), "proxy tag")
    named = parameters.get("requested_by")
    if isinstance(named, str) and named.strip():
        return Requester(named.strip(), "parameter")
    return None


def same_person(requester: Requester | None, approver: str) -> bool:
    """Whether `approver` names the requester: compared without case, surrounding blanks
    or a leading `@` (`@Alice ` is `alice`). Unknown requester: never the same."""
    if requester is None:
        return False

    def canonical(name: str) -> str:
        return name.strip().removeprefix("@").strip().casefold()

    return canonical(requester.name) == canonical(approver)
