"""Is a lock a lock, and is a plan still the truth? Two small verdicts, over plain data.

`lock_problem`: a Prefect global concurrency limit keeps two changes apart only if it is
active and has exactly one slot. An inactive limit grants every request at once; a limit
of 5 lets five runs change one Deployment together. Either way the run would be
unprotected while believing it holds the lock.

`plan_changes`: an approved plan is acted on only if the target is still exactly as the
plan showed. The flow fingerprints the target when it builds the plan (generation of a
Deployment, backup id and checksum, replica counts, certificate revision, secret
version…) and again once it holds the lock after the approval; any difference refuses
the run.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from runbook.decisions.deployment import deployment_view

STALE_PLAN = "changed since the plan was approved"


def lock_problem(name: str, active: bool, limit: int) -> str | None:
    """Why the limit `name` would not keep changes apart, or None when it would."""
    if not active:
        return (
            f"lock {name} is inactive: Prefect grants an inactive limit to everyone at once. "
            f"Re-activate it (`prefect gcl update {name} --enable`) once nothing holds it"
        )
    if limit != 1:
        return (
            f"lock {name} allows {limit} holders at once, not 1: it would let {limit} "
            f"changes of one target interleave. Set it back with "
            f"`prefect gcl update {name} --limit 1`"
        )
    return None


def plan_changes(planned: Mapping[str, str], live: Mapping[str, str]) -> tuple[str, ...]:
    """What differs between the fingerprint shown in the plan and the live one, as
    `what: planned → live` lines; empty when the plan is still the truth."""
    changes = []
    for key in sorted(set(planned) | set(live)):
        before, now = planned.get(key, "absent"), live.get(key, "absent")
        if before != now:
            changes.append(f"{key}: {before} → {now}")
    return tuple(changes)


def stale_plan_message(title: str, changes: tuple[str, ...]) -> str:
    """The refusal: names what moved, and that nothing was done."""
    return (
        f"{title}: refused, the target {STALE_PLAN} ({'; '.join(changes)}). "
        "Nothing was changed; start a new run to plan against the current state."
    )


def deployment_fingerprint(deployment: Mapping[str, Any]) -> dict[str, str]:
    """What a plan about a Deployment's pods rests on: its revision and its pod template.

    Not `generation` nor `resourceVersion`: an autoscaler changing `spec.replicas`, or an
    annotation on the object (a maintenance window, a recorded intent), moves them without
    touching what a deploy or rollback changes; with an HPA, an hour-long approval would
    then almost always be refused. Any change to the pod template (image, env,
    `kubectl rollout restart`) changes the hash and, once rolled, the revision.
    """
    view = deployment_view(dict(deployment))
    template = json.dumps(view.template, sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(template.encode()).hexdigest()[:12]
    return {
        f"deployment/{view.name} revision": str(view.revision),
        f"deployment/{view.name} pod template": f"sha256:{digest}",
    }


def restore_fingerprint(
    backup_id: str,
    sha256: str | None,
    replicas: Mapping[str, int],
    schema_version: str | None,
) -> dict[str, str]:
    """What a restore's plan rests on: the backup (gone, or rewritten, is a change), the
    writers' replica counts it scales back to, and the live schema version it was
    compared with."""
    fingerprint = {
        f"backup {backup_id}": f"sha256:{sha256[:12]}" if sha256 else "absent",
        "live schema version": schema_version or "none",
    }
    for name, count in sorted(replicas.items()):
        fingerprint[f"deployment/{name} replicas"] = str(count)
    return fingerprint


def certificate_fingerprint(name: str, revision: int, not_after: str) -> dict[str, str]:
    """What a forced renewal's plan rests on: the Certificate's revision and notAfter (a
    renewal by cert-manager during the pause changes both)."""
    return {
        f"certificate/{name} revision": str(revision),
        f"certificate/{name} notAfter": not_after,
    }


def retention_fingerprint(keep: Iterable[str], delete: Iterable[str]) -> dict[str, str]:
    """What an approved retention rests on: which backups it keeps and which it deletes.
    A backup taken, deleted or completed during the pause changes the split."""
    return {
        "backups kept": ", ".join(sorted(keep)) or "none",
        "backups deleted": ", ".join(sorted(delete)) or "none",
    }


# --- who holds a lease: recorded outside the holder's process -----------------------------

# `runbook-lease-<lease id>`: a Prefect Variable per held lease, written when a run takes a
# lock and deleted when it releases it. A SIGKILLed run leaves its records behind, so
# reconcile can free its locks at once instead of waiting for the lease to expire.
LEASE_VARIABLE_PREFIX = "runbook-lease-"
LEASE_TAG = "runbook-lease"


@dataclass(frozen=True)
class LeaseRecord:
    """Run `run_id` holds the lock on `target` through lease `lease_id`."""

    lease_id: str
    run_id: str
    target: str

    @property
    def variable(self) -> str:
        return LEASE_VARIABLE_PREFIX + self.lease_id.lower()

    def value(self) -> dict[str, str]:
        return {"lease_id": self.lease_id, "run_id": self.run_id, "target": self.target}


def parse_lease_record(value: Any) -> LeaseRecord | None:
    """A variable's value as a `LeaseRecord`, or None when it is not one."""
    if not isinstance(value, Mapping):
        return None
    try:
        return LeaseRecord(str(value["lease_id"]), str(value["run_id"]), str(value["target"]))
    except KeyError:
        return None
