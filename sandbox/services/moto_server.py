"""The moto AWS emulator (S3, Secrets Manager, ...) served over HTTP from a thread."""

from __future__ import annotations

import logging
import threading
import urllib.request
from typing import Any, Self

from .base import LOOPBACK, Service


class MotoServer(Service):
    """The moto AWS emulator (S3, Secrets Manager, ...) served over HTTP from a thread.

    Point boto3 at it with ``boto3.client("s3", **moto.boto3_kwargs())``. Note that moto
    keeps its state per *process*: two MotoServers in one process share buckets and
    secrets; ``reset()`` wipes that state.
    """

    def __init__(self, *, port: int | None = None) -> None:
        # Port 0 lets the OS pick while binding: ThreadedMotoServer binds inside its thread
        # and would wait forever if a pre-picked port had been taken meanwhile.
        self._port = port or 0
        self._server: Any = None
        self._lock = threading.RLock()

    @property
    def host(self) -> str:
        return LOOPBACK

    @property
    def port(self) -> int:
        if not self._port:
            raise RuntimeError("MotoServer has no port yet: call start() first")
        return self._port

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def is_running(self) -> bool:
        return self._server is not None

    def boto3_kwargs(self, region_name: str = "us-east-1") -> dict[str, str]:
        """Keyword arguments for ``boto3.client(...)``: endpoint, region, dummy credentials."""
        return {
            "endpoint_url": self.endpoint_url,
            "region_name": region_name,
            "aws_access_key_id": "testing",
            "aws_secret_access_key": "testing",
        }

    def start(self) -> Self:
        with self._lock:
            if self._server is not None:
                return self
            # moto is a dev dependency: import it only when a moto server is wanted.
            from moto.server import ThreadedMotoServer

            server = ThreadedMotoServer(ip_address=LOOPBACK, port=self._port, verbose=False)
            # werkzeug logs every request at INFO: noise on `make up`'s console.
            logging.getLogger("werkzeug").setLevel(logging.WARNING)
            self._arm_atexit()
            try:
                server.start()
                self._port = int(server.get_host_and_port()[1])
            except BaseException:
                self._disarm_atexit()
                raise
            self._server = server
            return self

    def stop(self) -> None:
        """Stop serving and release the port. Idempotent; ``start()`` reuses the port."""
        with self._lock:
            server, self._server = self._server, None
            if server is not None:
                server.stop()
                # ThreadedMotoServer.stop() leaves the listening socket open.
                wsgi_server = getattr(server, "_server", None)
                if wsgi_server is not None:
                    wsgi_server.server_close()
            self._disarm_atexit()

    def reset(self) -> None:
        """Forget every bucket, secret, ... (moto's ``/moto-api/reset``)."""
        url = f"{self.endpoint_url}/moto-api/reset"  # always http://127.0.0.1
        request = urllib.request.Request(url, method="POST")  # noqa: S310
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            response.read()
