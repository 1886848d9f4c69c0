"""What a TLS endpoint really serves: a verifying handshake (stdlib `ssl`), and the
certificate it presented, read with `cryptography`.

The handshake checks the chain against the given CAs and the hostname against the name
given (sent as SNI), so "the served certificate is the new one" is proven on the wire,
not read back from the Secret.
"""

from __future__ import annotations

import base64
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from prefect import task

from tasks.logs import run_logger
from tasks.retry_policy import TRANSIENT_RETRIES, DeadlineExceeded, PlatformCallError

HANDSHAKE_POLL_SECONDS = 0.5


@dataclass(frozen=True)
class ServedCertificate:
    """A certificate's identity: serial (hex), validity end, names, issuer."""

    serial: str
    not_after: str  # RFC 3339, seconds, Z
    dns_names: tuple[str, ...]
    issuer: str


def _facts(certificate: x509.Certificate) -> ServedCertificate:
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names = tuple(san.value.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        names = ()
    return ServedCertificate(
        serial=format(certificate.serial_number, "x"),
        not_after=certificate.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
        dns_names=names,
        issuer=certificate.issuer.rfc4514_string(),
    )


def certificate_facts(pem_base64: str) -> ServedCertificate:
    """The identity of a base64-encoded PEM certificate (a CertificateRequest's
    `status.certificate`: what the issuer signed)."""
    return _facts(x509.load_pem_x509_certificate(base64.b64decode(pem_base64)))


def split_address(address: str) -> tuple[str, int]:
    """`host:port` (`[v6]:port` too) → (host, port)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"not a host:port address: {address!r}")
    return host.strip("[]"), int(port)


def _context(ca_pem: str | None, ca_bundle: Path | None) -> ssl.SSLContext:
    if ca_bundle is not None:
        return ssl.create_default_context(cafile=str(ca_bundle))
    if ca_pem:
        return ssl.create_default_context(cadata=ca_pem)
    return ssl.create_default_context()


def _handshake(
    address: str, server_name: str, context: ssl.SSLContext, timeout: float
) -> ServedCertificate:
    host, port = split_address(address)
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=server_name) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
    except ssl.SSLCertVerificationError as exc:
        # Served, but not trusted or not for this name: no retry will change that soon.
        raise PlatformCallError(
            f"TLS {address} ({server_name}): certificate not accepted: {exc.verify_message}"
        ) from None
    except (ssl.SSLError, OSError) as exc:
        raise PlatformCallError(
            f"TLS {address} ({server_name}): no handshake: {type(exc).__name__}: {exc}",
            transient=True,
        ) from None
    if der is None:
        raise PlatformCallError(f"TLS {address} ({server_name}): no certificate presented")
    return _facts(x509.load_der_x509_certificate(der))


@task(**TRANSIENT_RETRIES)
def fetch_served_certificate(
    address: str,
    server_name: str,
    ca_pem: str | None = None,
    ca_bundle: Path | None = None,
    timeout_seconds: float = 5.0,
) -> ServedCertificate:
    """`openssl s_client -connect ADDRESS -servername NAME -verify_return_error`: one
    verifying handshake; returns the certificate presented.

    Trust: `ca_bundle` if given, else `ca_pem`, else the system's store.
    """
    return _handshake(address, server_name, _context(ca_pem, ca_bundle), timeout_seconds)


@task(**TRANSIENT_RETRIES)
def wait_for_served_certificate(
    address: str,
    server_name: str,
    serial: str,
    deadline_seconds: float,
    ca_pem: str | None = None,
    ca_bundle: Path | None = None,
    timeout_seconds: float = 5.0,
) -> ServedCertificate:
    """Handshake until the endpoint presents the certificate with `serial` (a server
    reloads its Secret a moment after cert-manager writes it); returns it.

    Raises `DeadlineExceeded` naming the serial still served after `deadline_seconds`.
    """
    context = _context(ca_pem, ca_bundle)
    give_up_at = time.monotonic() + deadline_seconds
    while True:
        try:
            served = _handshake(address, server_name, context, timeout_seconds)
            seen = f"serial {served.serial}"
        except PlatformCallError as exc:
            if not exc.transient:
                raise
            served, seen = None, str(exc)
        if served is not None and served.serial == serial:
            run_logger().info("%s serves serial %s (%s)", address, serial, server_name)
            return served
        if time.monotonic() >= give_up_at:
            raise DeadlineExceeded(
                f"TLS {address} ({server_name}) still not serving serial {serial} after "
                f"{deadline_seconds:.0f}s; last seen: {seen}"
            )
        time.sleep(HANDSHAKE_POLL_SECONDS)
