"""A real Prometheus (Debian's `prometheus`) on a free loopback port, scraping the sandbox.

It scrapes the given targets every `interval` (1 s in the sandbox, so an alert fires in
seconds, not minutes), evaluates the rule files it is given at the same interval, and
sends its alerts to an Alertmanager when it is given one's URL. The TSDB lives in a
temporary directory that `stop()` removes.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Self
from urllib.parse import urlsplit

import httpx
import yaml

from .base import LOOPBACK, SandboxDependencyError, ServerProcess

PROMETHEUS_BINARIES = ("/usr/bin/prometheus", "/usr/local/bin/prometheus")


def find_prometheus() -> str:
    """The Prometheus binary, or how to install it."""
    found = shutil.which("prometheus")
    found = found or next((p for p in PROMETHEUS_BINARIES if Path(p).is_file()), None)
    if found is None:
        raise SandboxDependencyError(
            "Prometheus is not installed, and the sandbox runs a real one. Run the "
            "project's setup script (it installs Debian's `prometheus`)."
        )
    return found


def prometheus_config(
    targets: Mapping[str, Sequence[str]],
    rule_files: Sequence[Path],
    alertmanager_url: str | None,
    interval: str,
) -> dict[str, Any]:
    """Prometheus' configuration: one scrape job per entry of `targets` (job → host:port)."""
    config: dict[str, Any] = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [str(path) for path in rule_files],
        "scrape_configs": [
            {
                "job_name": job,
                "scrape_timeout": interval,
                "static_configs": [{"targets": list(addresses)}],
            }
            for job, addresses in targets.items()
        ],
    }
    if alertmanager_url:
        parts = urlsplit(alertmanager_url)
        config["alerting"] = {
            "alertmanagers": [
                {
                    "scheme": parts.scheme or "http",
                    "path_prefix": parts.path or "/",
                    "static_configs": [{"targets": [parts.netloc]}],
                }
            ]
        }
    return config


class PrometheusServer(ServerProcess):
    """`with PrometheusServer(targets={"backend": ["127.0.0.1:8000"]}) as prom:`;
    `prom.url` is its HTTP API base (`/api/v1/query`, `/api/v1/alerts`, ...).

    `alertmanager_url` is where alerts go (none: Prometheus evaluates rules and shows
    alerts on `/api/v1/alerts`, but sends them nowhere). `rule_clock=(window, hold)`
    runs the rule files with their ranges made `window` and their `for:` made `hold`
    (`time_compressed_rules`).
    """

    def __init__(
        self,
        targets: Mapping[str, Sequence[str]],
        rule_files: Sequence[Path] = (),
        *,
        alertmanager_url: str | None = None,
        interval: str = "1s",
        rule_clock: tuple[str, str] | None = None,
        port: int | None = None,
        startup_timeout: float = 20.0,
    ) -> None:
        super().__init__(port=port, startup_timeout=startup_timeout)
        self.targets = {job: list(addresses) for job, addresses in targets.items()}
        self.rule_files = [Path(path) for path in rule_files]
        self.alertmanager_url = alertmanager_url
        self.interval = interval
        self.rule_clock = rule_clock

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> Self:
        binary = find_prometheus()
        with self._starting("ca-prometheus-") as tmp:
            if tmp is None:
                return self
            rule_files = self.rule_files
            if self.rule_clock is not None:
                window, hold = self.rule_clock
                rule_files = [
                    time_compressed_rules(path, tmp / f"{i}-{path.name}", window=window, hold=hold)
                    for i, path in enumerate(self.rule_files)
                ]
            config = tmp / "prometheus.yml"
            settings = prometheus_config(
                self.targets, rule_files, self.alertmanager_url, self.interval
            )
            config.write_text(yaml.safe_dump(settings, sort_keys=False))
            self._launch(
                "prometheus",
                lambda port: [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp / 'data'}",
                    f"--web.listen-address={LOOPBACK}:{port}",
                    "--log.level=warn",
                ],
                tmp / "prometheus.log",
                may_move=not self._port_fixed,
            )
        return self

    # --- reading it back (tests, drills) -------------------------------------------

    def query(self, expr: str) -> list[dict[str, Any]]:
        """`GET /api/v1/query`: the instant vector's samples."""
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=5)
        response.raise_for_status()
        result: list[dict[str, Any]] = response.json()["data"]["result"]
        return result

    def alerts(self) -> list[dict[str, Any]]:
        """`GET /api/v1/alerts`: pending and firing alerts with their labels and state."""
        response = httpx.get(f"{self.url}/api/v1/alerts", timeout=5)
        response.raise_for_status()
        found: list[dict[str, Any]] = response.json()["data"]["alerts"]
        return found

    def _answers(self) -> bool:
        try:
            return httpx.get(f"{self.url}/-/ready", timeout=0.5).status_code == 200
        except httpx.HTTPError:
            return False


_RANGE = re.compile(r"\[(\d+(?:ms|[smhdwy]))\]")


def time_compressed_rules(source: Path, destination: Path, *, window: str, hold: str) -> Path:
    """Write `source`'s rules to `destination` with every range selector (`[5m]`) made
    `[window]` and every `for:` made `hold`: the same expressions, thresholds and labels,
    on the sandbox's clock (a 1 s scrape fires an alert in seconds instead of 5 minutes).
    """
    document = yaml.safe_load(source.read_text())
    for group in document.get("groups") or []:
        for rule in group.get("rules") or []:
            rule["expr"] = _RANGE.sub(f"[{window}]", rule["expr"])
            if "for" in rule:
                rule["for"] = hold
    destination.write_text(yaml.safe_dump(document, sort_keys=False))
    return destination
