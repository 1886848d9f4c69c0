"""A real Prometheus Alertmanager (Debian's `prometheus-alertmanager`) on a free loopback
port, clustering off, state in a temporary directory, configured by the platform's own
monitoring/alertmanager.yml.

The platform's alerts are routed through it; runbooks silence them for a planned
maintenance window (`POST /api/v2/silences`, `DELETE /api/v2/silence/{id}`). With a
`webhook_url` it delivers each alert group there (the alert bridge), grouped by alertname,
after `group_wait` (short in the sandbox, so an alert reaches Prefect in seconds); a
critical alert mutes the warning of the same metric.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Self

import httpx
import yaml

from .base import LOOPBACK, SandboxDependencyError, ServerProcess

ALERTMANAGER_BINARIES = ("/usr/bin/prometheus-alertmanager", "/usr/local/bin/alertmanager")

# The platform's Alertmanager configuration: its route, receiver and inhibit rules.
ALERTMANAGER_CONFIG = Path(__file__).resolve().parents[2] / "monitoring" / "alertmanager.yml"


def alertmanager_config(
    webhook_url: str | None, *, group_wait: str, group_interval: str, repeat_interval: str
) -> str:
    """monitoring/alertmanager.yml as production runs it (grouping, inhibit rules), with
    the webhook pointed at `webhook_url` — or at nothing without one — and the sandbox's
    timings."""
    config: dict[str, Any] = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    config["route"].update(
        group_wait=group_wait, group_interval=group_interval, repeat_interval=repeat_interval
    )
    [receiver] = config["receivers"]
    if webhook_url is None:
        receiver.pop("webhook_configs")
    else:
        [webhook] = receiver["webhook_configs"]
        webhook["url"] = webhook_url
    return yaml.safe_dump(config, sort_keys=False)


def find_alertmanager() -> str:
    """The Alertmanager binary, or how to install it."""
    found = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
    found = found or next((p for p in ALERTMANAGER_BINARIES if Path(p).is_file()), None)
    if found is None:
        raise SandboxDependencyError(
            "Alertmanager is not installed, and the sandbox runs a real one. Run the "
            "project's setup script (it installs Debian's `prometheus-alertmanager`)."
        )
    return found


class AlertmanagerServer(ServerProcess):
    """`with AlertmanagerServer() as am:` then `am.url` is its API base (`/api/v2/...`)."""

    def __init__(
        self,
        *,
        webhook_url: str | None = None,
        # A new alert group waits this long for companions before its first webhook: the
        # largest leg of alert → incident in the sandbox (`python -m bench alerts`).
        group_wait: str = "200ms",
        group_interval: str = "5s",
        repeat_interval: str = "4h",
        port: int | None = None,
        startup_timeout: float = 15.0,
    ) -> None:
        super().__init__(port=port, startup_timeout=startup_timeout)
        self.webhook_url = webhook_url
        self.route_timing = {
            "group_wait": group_wait,
            "group_interval": group_interval,
            "repeat_interval": repeat_interval,
        }

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> Self:
        binary = find_alertmanager()
        with self._starting("ca-alertmanager-") as tmp:
            if tmp is None:
                return self
            config = tmp / "alertmanager.yml"
            config.write_text(alertmanager_config(self.webhook_url, **self.route_timing))
            self._launch(
                "prometheus-alertmanager",
                lambda port: [
                    binary,
                    f"--config.file={config}",
                    f"--storage.path={tmp / 'data'}",
                    f"--web.listen-address={LOOPBACK}:{port}",
                    "--cluster.listen-address=",  # one instance: no gossip port
                    "--log.level=warn",
                ],
                tmp / "alertmanager.log",
                may_move=not self._port_fixed,
            )
        return self

    def silences(self) -> list[dict[str, object]]:
        """`GET /api/v2/silences`: every silence, with its `status.state`."""
        response = httpx.get(f"{self.url}/api/v2/silences", timeout=5)
        response.raise_for_status()
        found: list[dict[str, object]] = response.json()
        return found

    def _answers(self) -> bool:
        try:
            return httpx.get(f"{self.url}/-/ready", timeout=0.5).status_code == 200
        except httpx.HTTPError:
            return False
