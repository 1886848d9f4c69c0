"""Least privilege: the runbooks' Role (deploy/kubernetes/rbac.yaml) allows exactly what
the runbooks ask the Kubernetes API for.

The emulator logs every request as RBAC sees it (group, resource, subresource, verb,
namespace, User-Agent). `test_role_allows_exactly_what_the_runbooks_asked_for` runs last
(tests/conftest.py moves it there), so it judges every request the session's runbooks
made, whatever runbooks exist when the suite runs: any request the Role would refuse fails
it; on a whole-suite run, so does any permission nothing used.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sandbox.kube_emulator.records import AccessRecord
from tasks import kubernetes as k8s
from tests.rbac import Permission, granted, judge, load_role

RUNS_LAST = "test_role_allows_exactly_what_the_runbooks_asked_for"
NS = "complianceagent"
RUNBOOKS = k8s.USER_AGENT


def _role(*rules: tuple[str, str, list[str]]) -> dict:
    return {
        "metadata": {"namespace": NS},
        "rules": [{"apiGroups": [g], "resources": [r], "verbs": v} for g, r, v in rules],
    }


def _access(group, resource, sub, verb, namespace=NS, agent=RUNBOOKS) -> AccessRecord:
    return AccessRecord(group, resource, sub, verb, namespace, agent)


def test_judge_finds_what_is_refused_and_what_is_unused():
    role = _role(("apps", "deployments", ["get", "patch"]), ("apps", "deployments/scale", ["get"]))
    accesses = [
        _access("apps", "deployments", "", "get"),
        _access("apps", "deployments", "scale", "patch"),  # not granted
        _access("", "secrets", "", "get", agent="test-harness"),  # not the runbooks: ignored
        _access(None, "/apis", "", "get"),  # discovery: not the Role's business
        _access("apps", "deployments", "", "get", namespace="kube-system"),  # other namespace
    ]
    verdict, _ = judge(role, accesses, RUNBOOKS)
    assert verdict.not_allowed == [
        "get deployments.apps in kube-system",
        "patch deployments/scale.apps",
    ]
    assert verdict.unused == [
        Permission("apps", "deployments", "patch"),
        Permission("apps", "deployments/scale", "get"),
    ]


@pytest.mark.parametrize(
    "rule",
    [
        {"apiGroups": ["apps"], "resources": ["*"], "verbs": ["get"]},
        {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["*"]},
        {
            "apiGroups": ["apps"],
            "resources": ["deployments"],
            "verbs": ["get"],
            "resourceNames": ["x"],
        },
    ],
)
def test_wildcards_and_names_are_refused(rule):
    with pytest.raises(ValueError):
        granted({"metadata": {"namespace": NS}, "rules": [rule]})


def test_the_role_file_binds_the_runbooks_service_account():
    import yaml

    docs = {d["kind"]: d for d in yaml.safe_load_all(Path(load_role.__defaults__[0]).read_text())}
    assert docs["RoleBinding"]["roleRef"]["name"] == docs["Role"]["metadata"]["name"]
    account = docs["ServiceAccount"]["metadata"]
    assert docs["RoleBinding"]["subjects"] == [
        {"kind": "ServiceAccount", "name": account["name"], "namespace": account["namespace"]}
    ]
    assert granted(docs["Role"])  # parses, no wildcards


def test_emulator_logs_requests_as_rbac_sees_them(platform):
    from kubernetes import client

    before = platform.kube.accesses
    k8s.read_deployment_scale.fn("backend")
    k8s.list_deployment_revisions.fn("backend")
    with client.ApiClient(client.Configuration(host=platform.kube.url)) as harness:
        client.CoreV1Api(harness).list_namespace()
    after = platform.kube.accesses
    new = {a: n - before.get(a, 0) for a, n in after.items() if n > before.get(a, 0)}

    # (Other runs of the session may still be talking to the emulator: look for ours.)
    assert _access("apps", "deployments", "scale", "get") in new
    assert _access("apps", "replicasets", "", "list") in new
    [harness_request] = [a for a in new if a.resource == "namespaces"]
    assert (harness_request.verb, harness_request.namespace) == ("list", None)
    assert not harness_request.user_agent.startswith(RUNBOOKS)  # the test's own client


def _whole_suite(config: pytest.Config) -> bool:
    """Run as `make test` runs it: every test path, nothing deselected."""
    args = [Path(a).resolve() for a in config.args]
    everything = [Path(config.rootpath, p).resolve() for p in config.getini("testpaths")]
    return (
        args in ([], everything)
        and not config.option.keyword
        and not config.option.markexpr
        and not config.getoption("lf", False)
        and not config.getoption("deselect", None)
    )


def test_role_allows_exactly_what_the_runbooks_asked_for(sandbox, request):
    verdict, used = judge(load_role(), sandbox.kube.accesses.keys(), RUNBOOKS)
    if not used:
        pytest.skip("no runbook talked to Kubernetes in this session")
    observed = "\n".join(f"  {p}" for p in sorted(used))
    assert verdict.not_allowed == [], (
        "the runbooks asked for what deploy/kubernetes/rbac.yaml does not allow; "
        f"add a rule with the runbook that needs it. Used in this session:\n{observed}"
    )
    if _whole_suite(request.config):
        assert verdict.unused == [], (
            "deploy/kubernetes/rbac.yaml allows what no runbook used in the whole suite; "
            f"remove it. Used:\n{observed}"
        )
