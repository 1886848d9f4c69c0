"""Tasks for pods and their logs, one API call each, named for the `kubectl` verb they
stand in for: `kubectl get pods -l SELECTOR` and `kubectl logs POD --tail --since
--timestamps -c CONTAINER`. Objects come out as JSON dicts, logs as the API's plain text.
"""

from __future__ import annotations

from typing import Any

from prefect import task

from tasks.kubernetes import _call, _core, _namespace
from tasks.retry_policy import TRANSIENT_RETRIES

JSON = dict[str, Any]


@task(**TRANSIENT_RETRIES)
def list_pods(label_selector: str, namespace: str | None = None) -> list[JSON]:
    """`kubectl get pods -l SELECTOR -o json`: the pods whose labels match, by name."""
    ns = _namespace(namespace)
    result = _call(
        f"list pods -l {label_selector} in {ns}",
        _core().list_namespaced_pod,
        ns,
        label_selector=label_selector,
    )
    return sorted(result.get("items", []), key=lambda pod: pod["metadata"]["name"])


@task(**TRANSIENT_RETRIES)
def read_pod_log(
    name: str,
    tail_lines: int | None = None,
    since_seconds: int | None = None,
    timestamps: bool = True,
    container: str | None = None,
    namespace: str | None = None,
) -> str:
    """`kubectl logs NAME --tail=N --since=Ss --timestamps -c CONTAINER`: the log as text,
    each line prefixed with its RFC 3339 time when `timestamps`."""
    ns = _namespace(namespace)
    options: JSON = {"timestamps": timestamps}
    if tail_lines is not None:
        options["tail_lines"] = tail_lines
    if since_seconds is not None:
        options["since_seconds"] = since_seconds
    if container:
        options["container"] = container
    text: str = _call(
        f"read logs of pod/{name}{f' container {container}' if container else ''} in {ns}",
        _core().read_namespaced_pod_log,
        name,
        ns,
        **options,
    )
    return text
