"""`python -m bridge`: serve the alert bridge (settings: `ALERT_BRIDGE_*`, bridge/app.py)."""

from __future__ import annotations

import logging

import uvicorn

from bridge.app import BridgeSettings, create_app


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    settings = BridgeSettings()
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info")


if __name__ == "__main__":
    main()
