"""The alert bridge: takes Alertmanager's webhook and turns each alert into a Prefect event.

`POST /alertmanager` with Alertmanager's webhook body (version 4):

- 200 `{"events": n}`: every alert is now an event in Prefect (`runbook/alert_events.py`:
  names, resource, ids). A redelivery posts the same event ids, which Prefect drops.
- 400: not JSON, or not a version-4 webhook (the pydantic error names the field).
- 413: body larger than `max_body_bytes` (read no further than that).
- 422: an alertname no rule in monitoring/rules defines; the whole payload is refused and
  nothing is posted (the sandbox and production routes group by alertname, so a group
  is one alert rule; an unknown name is a misrouted or forged alert, not ours to run).
- 503: Prefect unreachable, timing out or answering 5xx. Alertmanager retries only 5xx,
  so this is the only case it should: nothing else gets better by retrying.
- 502: Prefect refused the events (4xx): our bug; the detail says what it said.

`GET /healthz` answers 200 when the process serves. Run it with `python -m bridge`.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Self

import httpx
import yaml
from pydantic import (
    AliasChoices,
    AnyHttpUrl,
    Field,
    SecretStr,
    ValidationError,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from runbook.alert_events import AlertmanagerWebhook, alert_events, unknown_alertnames

logger = logging.getLogger("alert_bridge")

PROJECT_ROOT = Path(__file__).resolve().parent.parent
RULES_DIR = PROJECT_ROOT / "monitoring" / "rules"


class BridgeSettings(BaseSettings):
    """`ALERT_BRIDGE_*` environment variables (Prefect's URL and key also as `PREFECT_*`)."""

    model_config = SettingsConfigDict(env_prefix="ALERT_BRIDGE_", extra="ignore", frozen=True)

    host: str = Field(default="127.0.0.1", description="Address to listen on.")
    port: int = Field(default=9094, ge=1, le=65535, description="Port to listen on.")
    prefect_api_url: AnyHttpUrl = Field(
        default=AnyHttpUrl("http://127.0.0.1:4200/api"),
        validation_alias=AliasChoices("ALERT_BRIDGE_PREFECT_API_URL", "PREFECT_API_URL"),
        description="Prefect API the events are posted to.",
    )
    prefect_api_key: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("ALERT_BRIDGE_PREFECT_API_KEY", "PREFECT_API_KEY"),
        description="Bearer token for a Prefect API behind authentication (Prefect Cloud).",
    )
    prefect_api_auth_string: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices(
            "ALERT_BRIDGE_PREFECT_API_AUTH_STRING", "PREFECT_API_AUTH_STRING"
        ),
        description="`user:password` for a self-hosted server's basic auth "
        "(its PREFECT_SERVER_API_AUTH_STRING), as Prefect's own client sends it.",
    )

    @model_validator(mode="after")
    def _one_credential(self) -> Self:
        if self.prefect_api_key is not None and self.prefect_api_auth_string is not None:
            raise ValueError(
                "set prefect_api_key (Prefect Cloud) or prefect_api_auth_string "
                "(self-hosted basic auth), not both"
            )
        return self

    max_body_bytes: int = Field(
        default=1024 * 1024,
        ge=1024,
        le=64 * 1024 * 1024,
        description="Largest webhook body accepted; larger is refused with 413.",
    )
    prefect_timeout_seconds: float = Field(
        default=10, gt=0, le=60, description="How long to wait for Prefect before 503."
    )
    rules_dir: Path = Field(
        default=RULES_DIR, description="Alert rule files: the alert names the bridge accepts."
    )


def load_runbooks(rules_dir: Path) -> dict[str, str]:
    """alertname → `runbook` label, from every rule file in `rules_dir`."""
    found: dict[str, str] = {}
    for path in sorted(rules_dir.glob("*.y*ml")):
        for group in (yaml.safe_load(path.read_text()) or {}).get("groups") or []:
            for rule in group.get("rules") or []:
                if "alert" in rule:
                    found[rule["alert"]] = (rule.get("labels") or {}).get(
                        "runbook", "incident-response"
                    )
    if not found:
        raise ValueError(f"no alert rules in {rules_dir}: the bridge would refuse every alert")
    return found


class _TooLarge(Exception):
    pass


async def _read_capped(request: Request, limit: int) -> bytes:
    """The body, refusing (without reading on) once it passes `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _TooLarge
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _TooLarge
    return bytes(body)


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


def _authorization(settings: BridgeSettings) -> dict[str, str]:
    if settings.prefect_api_key is not None:
        return {"Authorization": f"Bearer {settings.prefect_api_key.get_secret_value()}"}
    if settings.prefect_api_auth_string is not None:
        encoded = base64.b64encode(settings.prefect_api_auth_string.get_secret_value().encode())
        return {"Authorization": f"Basic {encoded.decode()}"}
    return {}


def create_app(
    settings: BridgeSettings | None = None, runbooks: Mapping[str, str] | None = None
) -> Starlette:
    settings = settings or BridgeSettings()
    known = dict(runbooks) if runbooks is not None else load_runbooks(settings.rules_dir)
    events_url = f"{str(settings.prefect_api_url).rstrip('/')}/events"
    headers = _authorization(settings)

    async def receive_webhook(request: Request) -> JSONResponse:
        # 1. Read at most max_body_bytes.
        try:
            body = await _read_capped(request, settings.max_body_bytes)
        except _TooLarge:
            return _error(413, f"webhook body larger than {settings.max_body_bytes} bytes")
        # 2. Validate: JSON, Alertmanager's version-4 webhook.
        try:
            webhook = AlertmanagerWebhook.model_validate(json.loads(body))
        except (ValueError, ValidationError) as exc:
            detail = (
                exc.errors(include_url=False, include_input=False)
                if isinstance(exc, ValidationError)
                else str(exc)
            )
            return _error(400, "not an Alertmanager webhook (version 4)", detail=detail)
        # 3. Only alerts our rules define start anything.
        unknown = unknown_alertnames(webhook, known)
        if unknown:
            return _error(422, "alerts no rule defines; nothing was posted", unknown=unknown)
        # 4. One Prefect event per alert, in one request.
        events = alert_events(webhook, known, now=dt.datetime.now(dt.UTC))
        try:
            async with httpx.AsyncClient(timeout=settings.prefect_timeout_seconds) as client:
                response = await client.post(events_url, json=events, headers=headers)
        except httpx.HTTPError as exc:
            logger.warning("Prefect unreachable at %s: %s", events_url, type(exc).__name__)
            return _error(503, f"Prefect unreachable ({type(exc).__name__}); retry later")
        if response.status_code >= 500:
            return _error(503, f"Prefect answered {response.status_code}; retry later")
        if response.status_code >= 400:
            logger.error("Prefect refused events: %s %s", response.status_code, response.text)
            return _error(
                502, f"Prefect refused the events ({response.status_code})", detail=response.text
            )
        logger.info("group %s: %s", webhook.groupKey, ", ".join(f"{e['event']}" for e in events))
        return JSONResponse({"events": len(events), "ids": [e["id"] for e in events]})

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "alerts": sorted(known)})

    return Starlette(
        routes=[
            Route("/alertmanager", receive_webhook, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
        ]
    )
