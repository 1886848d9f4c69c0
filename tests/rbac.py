"""Kubernetes RBAC, as far as the runbooks' Role goes: which (apiGroup, resource, verb)
a Role grants, which ones requests needed, and the difference either way. Plain data in,
plain data out; the emulator's access log and the Role file are read by the caller."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROLE_FILE = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes" / "rbac.yaml"


@dataclass(frozen=True, order=True)
class Permission:
    group: str  # "" for the core API
    resource: str  # "deployments" or "deployments/scale"
    verb: str

    def __str__(self) -> str:
        return f"{self.verb} {self.resource}{'.' + self.group if self.group else ''}"


def load_role(path: Path = ROLE_FILE) -> dict[str, Any]:
    """The Role in the RBAC file (the file also holds the ServiceAccount and binding)."""
    roles = [d for d in yaml.safe_load_all(path.read_text()) if d and d["kind"] == "Role"]
    assert len(roles) == 1, f"{path} must hold exactly one Role"
    return roles[0]


def granted(role: dict[str, Any]) -> set[Permission]:
    """Every permission a Role's rules grant. Wildcards and resourceNames are refused:
    least privilege is written out in full."""
    out = set()
    for rule in role["rules"]:
        if "resourceNames" in rule or "nonResourceURLs" in rule:
            raise ValueError(f"rule {rule} narrows by name or URL; write it out instead")
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    if "*" in (group, resource, verb):
                        raise ValueError(f"rule {rule} uses a wildcard")
                    out.add(Permission(group, resource, verb))
    return out


@dataclass(frozen=True)
class Verdict:
    not_allowed: list[str]  # requests the Role would refuse
    unused: list[Permission]  # permissions no request needed


def judge(
    role: dict[str, Any], accesses: Iterable[Any], user_agent_prefix: str
) -> tuple[Verdict, set[Permission]]:
    """Compare a Role with the requests a client made (the emulator's `AccessRecord`s of
    the clients whose User-Agent starts with `user_agent_prefix`); discovery requests
    (non-resource URLs) are every authenticated client's and are not the Role's business."""
    namespace = role["metadata"]["namespace"]
    allowed = granted(role)
    used: set[Permission] = set()
    not_allowed: list[str] = []
    for access in accesses:
        if not access.user_agent.startswith(user_agent_prefix) or access.group is None:
            continue
        resource = access.resource + (f"/{access.subresource}" if access.subresource else "")
        permission = Permission(access.group, resource, access.verb)
        used.add(permission)
        if access.namespace != namespace:
            not_allowed.append(f"{permission} in {access.namespace or 'all namespaces'}")
        elif permission not in allowed:
            not_allowed.append(str(permission))
    return Verdict(sorted(set(not_allowed)), sorted(allowed - used)), used
