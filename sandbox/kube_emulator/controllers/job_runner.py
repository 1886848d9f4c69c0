"""Run a Job's container for real: its command as a local process, in a directory that
stands for its image's working directory, with the container's env resolved the way the
kubelet resolves it (`value`, `valueFrom.secretKeyRef`, `envFrom.secretRef`).

Used for images the sandbox knows how to run (the backend's: its alembic project), so a
migration Job really migrates the sandbox's PostgreSQL and its log is the real output.
"""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ..cluster import Cluster
from ..resources import JSON, SECRETS

# What the runner's own PATH holds first: the sandbox's Python environment (alembic etc.).
_TOOLS = str(Path(sys.executable).parent)


class ContainerConfigError(RuntimeError):
    """The pod cannot start: a referenced Secret or key is missing (CreateContainerConfigError)."""


@dataclass(frozen=True)
class Outcome:
    succeeded: bool
    logs: str
    reason: str = ""
    message: str = ""


def container_env(cluster: Cluster, namespace: str, container: JSON) -> dict[str, str]:
    """The container's environment as the kubelet builds it; envFrom first, env wins."""
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        ref = source.get("secretRef")
        if ref:
            secret = _secret(cluster, namespace, ref["name"], ref.get("optional", False))
            env.update({(source.get("prefix") or "") + k: v for k, v in secret.items()})
    for variable in container.get("env") or []:
        if "value" in variable:
            env[variable["name"]] = str(variable["value"])
            continue
        ref = (variable.get("valueFrom") or {}).get("secretKeyRef")
        if ref:
            secret = _secret(cluster, namespace, ref["name"], ref.get("optional", False))
            if ref["key"] not in secret:
                if ref.get("optional"):
                    continue
                raise ContainerConfigError(
                    f"couldn't find key {ref['key']} in Secret {namespace}/{ref['name']}"
                )
            env[variable["name"]] = secret[ref["key"]]
    return env


def _secret(cluster: Cluster, namespace: str, name: str, optional: bool) -> dict[str, str]:
    secret = cluster.get(SECRETS, namespace, name)
    if secret is None:
        if optional:
            return {}
        raise ContainerConfigError(f'secret "{name}" not found')
    decoded = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
    return {**decoded, **(secret.get("stringData") or {})}


class LocalProcess:
    """One container's command running as a local process; `kill()` stops it early."""

    def __init__(
        self, container: JSON, workdir: Path, env: dict[str, str], deadline: float | None
    ) -> None:
        self.argv = [*(container.get("command") or []), *(container.get("args") or [])]
        self.workdir = workdir
        self.env = {"PATH": f"{_TOOLS}:/usr/local/bin:/usr/bin:/bin", "HOME": str(workdir), **env}
        self.deadline = deadline
        self._proc: subprocess.Popen[bytes] | None = None

    def run(self) -> Outcome:
        """Run to the end (or the deadline); stdout and stderr together are the pod's log."""
        if not self.argv:
            return Outcome(False, "", "Error", "the container has no command")
        self._proc = subprocess.Popen(
            self.argv,
            cwd=self.workdir,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # so a deadline kills the shell's children too
        )
        try:
            output, _ = self._proc.communicate(timeout=self.deadline)
        except subprocess.TimeoutExpired:
            self.kill()
            output, _ = self._proc.communicate()
            return Outcome(
                False,
                output.decode(errors="replace"),
                "DeadlineExceeded",
                "Job was active longer than specified deadline",
            )
        logs = output.decode(errors="replace")
        if self._proc.returncode == 0:
            return Outcome(True, logs)
        return Outcome(
            False,
            logs,
            "BackoffLimitExceeded",
            f"Job has reached the specified backoff limit (exit code {self._proc.returncode})",
        )

    def kill(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
