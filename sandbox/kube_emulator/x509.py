"""Real X.509 for the emulated cert-manager: a sandbox CA that signs certificates.

What cert-manager's CA issuer would produce: a private key of the Certificate's
`spec.privateKey` algorithm (RSA 2048 by default), a CSR for it, and a leaf certificate
with the Certificate's commonName/dnsNames and validity, signed by one self-signed CA per
emulator. Anything that trusts `SandboxCA.certificate_pem` (the Secret's `ca.crt`) can
verify a TLS handshake against the served certificate.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class Issued:
    """A signed certificate with its key and CSR, as PEM text."""

    certificate_pem: str
    private_key_pem: str
    serial: int
    not_before: float
    not_after: float


def new_private_key(spec: dict[str, object] | None) -> PrivateKey:
    """A key as `spec.privateKey` asks: RSA (size, default 2048) or ECDSA (256/384)."""
    spec = spec or {}
    algorithm = str(spec.get("algorithm") or "RSA")
    size = spec.get("size")
    if algorithm == "ECDSA":
        curve: ec.EllipticCurve = ec.SECP384R1() if size == 384 else ec.SECP256R1()
        return ec.generate_private_key(curve)
    return rsa.generate_private_key(public_exponent=65537, key_size=int(size or 2048))  # type: ignore[call-overload]


def private_key_pem(key: PrivateKey) -> str:
    # cert-manager's default encoding is PKCS#1 for RSA keys, SEC 1 for EC keys.
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    ).decode()


def _utc(seconds: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(int(seconds), dt.UTC)


class SandboxCA:
    """A self-signed CA (EC P-256, ten years) that signs leaf certificates."""

    def __init__(self, name: str = "ComplianceAgent sandbox CA") -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = dt.datetime.now(dt.UTC).replace(microsecond=0)
        self._certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=3650))
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False
            )
            .sign(self._key, hashes.SHA256())
        )
        self.certificate_pem = self._certificate.public_bytes(serialization.Encoding.PEM).decode()

    def issue(
        self,
        *,
        common_name: str | None,
        dns_names: list[str],
        not_before: float,
        not_after: float,
        key: PrivateKey,
        self_signed: bool = False,
    ) -> Issued:
        """Sign a leaf for `key` (or let it sign itself: cert-manager's temporary cert)."""
        subject = _subject(common_name)
        serial = x509.random_serial_number()
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject if self_signed else self._certificate.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(_utc(not_before))
            .not_valid_after(_utc(not_after))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        )
        if dns_names:
            # Without a subject CN the SAN must be critical (RFC 5280 4.2.1.6).
            builder = builder.add_extension(_san(dns_names), critical=not common_name)
        if not self_signed:
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
        certificate = builder.sign(key if self_signed else self._key, hashes.SHA256())
        return Issued(
            certificate_pem=certificate.public_bytes(serialization.Encoding.PEM).decode(),
            private_key_pem=private_key_pem(key),
            serial=serial,
            not_before=float(int(not_before)),
            not_after=float(int(not_after)),
        )


def _subject(common_name: str | None) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)] if common_name else [])


def _san(dns_names: list[str]) -> x509.SubjectAlternativeName:
    return x509.SubjectAlternativeName([x509.DNSName(n) for n in dns_names])


def csr_pem(key: PrivateKey, common_name: str | None, dns_names: list[str]) -> str:
    """The certificate signing request cert-manager puts in a CertificateRequest."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(_subject(common_name))
    if dns_names:
        builder = builder.add_extension(_san(dns_names), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()
