"""The moto AWS emulator (S3, Secrets Manager, ...) as a subprocess on a loopback port."""

from __future__ import annotations

import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Self

from .base import LOOPBACK, ServerProcess


class MotoServer(ServerProcess):
    """The moto AWS emulator (S3, Secrets Manager, ...) in a process of its own.

    Point boto3 at it with ``boto3.client("s3", **moto.boto3_kwargs())``. moto keeps its
    buckets and secrets per *process*: in a process of its own, each MotoServer has its own
    state, and ``reset()`` (moto's ``/moto-api/reset``) wipes only this one's — a test
    resetting its own moto cannot empty the sandbox's.
    """

    def __init__(self, *, port: int | None = None, startup_timeout: float = 30.0) -> None:
        super().__init__(port=port, startup_timeout=startup_timeout)

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

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
            if self.is_running:
                return self
            self._arm_atexit()
            try:
                self._tmp = Path(tempfile.mkdtemp(prefix="ca-moto-"))
                self._launch(
                    "moto_server",
                    # moto is a dev dependency, run by this interpreter (the project's venv).
                    lambda port: [
                        sys.executable,
                        "-m",
                        "moto.server",
                        "-H",
                        LOOPBACK,
                        "-p",
                        str(port),
                    ],
                    self._tmp / "moto.log",
                    may_move=not self._port_fixed,
                )
                self._port_fixed = True  # a restart comes back on the same port
            except BaseException:
                self.stop()
                raise
            return self

    def reset(self) -> None:
        """Forget every bucket, secret, ... of this server (moto's ``/moto-api/reset``)."""
        url = f"{self.endpoint_url}/moto-api/reset"  # always http://127.0.0.1
        request = urllib.request.Request(url, method="POST")  # noqa: S310
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            response.read()

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(  # noqa: S310 (loopback URL we built)
                f"{self.endpoint_url}/moto-api/", timeout=0.5
            ) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False
