"""The backend stand-in's HTTPS listener follows the emulator's TLS Secret."""

from __future__ import annotations

import base64
import socket
import ssl
import time
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography import x509
from kubernetes import client

from sandbox.backend_standin import BackendStandIn
from sandbox.kube_emulator import KubeEmulator
from sandbox.tls_listener import TLSMaterial

NS = "tls"
CERTS = ("cert-manager.io", "v1")
NOT_AFTER = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 5 * 86400))


def certificate() -> dict[str, Any]:
    return {
        "apiVersion": "cert-manager.io/v1",
        "kind": "Certificate",
        "metadata": {"name": "api-tls", "namespace": NS},
        "spec": {"secretName": "api-tls", "dnsNames": ["api.example.com"], "duration": "240h"},
        "status": {
            "notAfter": NOT_AFTER,
            "revision": 1,
            "conditions": [{"type": "Ready", "status": "True", "reason": "Ready"}],
        },
    }


@pytest.fixture
def served() -> Iterator[tuple[KubeEmulator, BackendStandIn]]:
    with KubeEmulator() as emu:
        emu.certificate_delay = 0.05

        def material() -> TLSMaterial | None:
            secret = emu.get("v1", "Secret", NS, "api-tls")
            if secret is None:
                return None
            data = secret["data"]
            return TLSMaterial(
                secret["metadata"]["resourceVersion"],
                base64.b64decode(data["tls.crt"]),
                base64.b64decode(data["tls.key"]),
            )

        emu.seed({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
        emu.seed(certificate())
        # No database or Redis needed: only /health/live is asked for.
        standin = BackendStandIn("postgresql://unused/x", "redis://unused", tls_material=material)
        with standin:
            yield emu, standin


def handshake(emu: KubeEmulator, standin: BackendStandIn) -> tuple[x509.Certificate, bytes]:
    """A verifying TLS handshake (sandbox CA, hostname api.example.com) and one request."""
    context = ssl.create_default_context(cadata=emu.ca_certificate_pem)
    assert standin.tls is not None
    with (
        socket.create_connection(("127.0.0.1", standin.tls.port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="api.example.com") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        tls.sendall(
            b"GET /health/live HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n\r\n"
        )
        answer = b""
        while chunk := tls.recv(4096):
            answer += chunk
    return x509.load_der_x509_certificate(der), answer


def test_serves_the_secrets_certificate_and_reloads_it_when_the_secret_changes(served):
    emu, standin = served
    before, answer = handshake(emu, standin)
    assert answer.startswith(b"HTTP/1.0 200") and b'"alive"' in answer
    assert before.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ") == NOT_AFTER

    custom = client.CustomObjectsApi(client.ApiClient(client.Configuration(host=emu.url)))
    cert = custom.get_namespaced_custom_object(*CERTS, NS, "certificates", "api-tls")
    cert["status"]["conditions"].append(
        {"type": "Issuing", "status": "True", "reason": "ManuallyTriggered"}
    )
    custom.replace_namespaced_custom_object_status(*CERTS, NS, "certificates", "api-tls", cert)
    give_up = time.monotonic() + 5
    while emu.get("cert-manager.io/v1", "Certificate", NS, "api-tls")["status"]["revision"] < 2:
        assert time.monotonic() < give_up
        time.sleep(0.02)

    after, _ = handshake(emu, standin)
    assert after.serial_number != before.serial_number
    assert (after.not_valid_after_utc - after.not_valid_before_utc).days == 10  # 240h


def test_no_secret_no_tls(served):
    emu, standin = served
    emu.fail_certificate_issuance("api-tls", "issuer down")  # the Secret stays deleted
    core = client.CoreV1Api(client.ApiClient(client.Configuration(host=emu.url)))
    core.delete_namespaced_secret("api-tls", NS)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        handshake(emu, standin)
