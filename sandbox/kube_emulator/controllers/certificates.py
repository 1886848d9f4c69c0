"""The cert-manager Certificate controller: issuance on creation, on a spec change, on a
deleted Secret and on `cmctl renew` (the Issuing condition); Ready with a new revision.

Issuance is real: each one creates a CertificateRequest (`<certificate>-<revision>`,
annotated with `cert-manager.io/certificate-revision`, holding a real CSR) and, after
`delay` seconds, either signs a real X.509 certificate with the emulator's sandbox CA
(the Certificate's commonName, dnsNames and duration) and writes it to the TLS Secret
(`tls.crt`, `tls.key`, `ca.crt`), or — when a failure is configured for that Certificate
(`failures`) — fails the request as an issuer would: the CertificateRequest's Ready is
False with reason `Failed`, the Certificate gets `failedIssuanceAttempts` + 1,
`lastFailureTime`, and `Issuing=False` with the request's reason, as cert-manager's
issuing controller does; its Ready and its Secret stay as they were.

A seeded Certificate that is already Ready with a `notAfter` gets a real certificate of
that validity in its Secret (and the CertificateRequest it came from) at once, so a
seeded cluster serves real TLS from the start.
"""

from __future__ import annotations

import base64
import functools
import itertools
import time
from dataclasses import dataclass

from ..cluster import Cluster
from ..records import HistoryEvent
from ..resources import (
    CERTIFICATE_REQUESTS,
    CERTIFICATES,
    JSON,
    SECRETS,
    parse_go_duration,
    parse_rfc3339,
    rfc3339,
)
from ..x509 import Issued, PrivateKey, SandboxCA, csr_pem, new_private_key
from .base import Controller, get_condition, ns_name, owner_reference, set_condition
from .scheduler import Scheduler

TEMPORARY_CERTIFICATE = "cert-manager.io/issue-temporary-certificate"
REVISION_ANNOTATION = "cert-manager.io/certificate-revision"
DEFAULT_CERT_DURATION = "2160h"  # 90 days
TEMPORARY_CERT_SECONDS = 3600.0


def _certificate_condition(
    status: JSON, kind: str, value: str, reason: str, message: str, now: float, generation: int
) -> None:
    stamps = ("lastTransitionTime",)  # cert-manager conditions have no lastUpdateTime
    set_condition(status, kind, value, reason, message, now, stamps, observedGeneration=generation)


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def renewal_time(not_before: float, not_after: float, spec: JSON) -> float:
    """cert-manager renews `renewBefore` ahead of expiry, else at 2/3 of the lifetime
    (30 days before the end of the default 90-day certificate)."""
    lifetime = not_after - not_before
    renew_before = parse_go_duration(spec["renewBefore"]) if spec.get("renewBefore") else None
    if renew_before is None or renew_before >= lifetime:
        renew_before = lifetime / 3
    return not_after - renew_before


@dataclass(frozen=True)
class _Issuance:
    number: int  # stale scheduled steps compare this
    request: str  # the CertificateRequest's name
    revision: int  # the revision it will become
    key: PrivateKey


class CertificateController(Controller):
    """cert-manager Certificates, their CertificateRequests and the TLS Secrets they write."""

    def __init__(self, cluster: Cluster, scheduler: Scheduler, history: list[HistoryEvent]) -> None:
        super().__init__(cluster, scheduler, history)
        self.delay = 0.2
        self.ca = SandboxCA()
        # Certificate name -> the message its issuer fails requests with (until removed).
        self.failures: dict[str, str] = {}
        self._issuing: dict[tuple[str, str], _Issuance] = {}  # certificate -> pending issuance
        self._issuance_numbers = itertools.count(1)

    def forget(self, cert: JSON) -> None:
        """A deleted Certificate's pending issuance ends with it."""
        self._issuing.pop(ns_name(cert), None)

    def changed(self, old: JSON | None, new: JSON, seeded: bool = False) -> None:
        if old is None:
            ready = get_condition(new.get("status"), "Ready")
            if ready is None:
                self._start_issuance(
                    new, "DoesNotExist", "Issuing certificate as Secret does not exist"
                )
            elif seeded and ready.get("status") == "True" and new["status"].get("notAfter"):
                self._write_seeded_secret(new)
        else:
            self._start_issuance(
                new, "SecretMismatch", "Issuing certificate as the Certificate spec changed"
            )

    def status_changed(self, old: JSON, new: JSON) -> None:
        """`cmctl renew` sets the Issuing condition through the status subresource."""
        issuing = get_condition(new.get("status"), "Issuing") or {}
        was_issuing = (get_condition(old.get("status"), "Issuing") or {}).get("status") == "True"
        if issuing.get("status") == "True" and not was_issuing:
            self._start_issuance(
                new,
                issuing.get("reason") or "ManuallyTriggered",
                issuing.get("message") or "Certificate re-issuance manually triggered",
                secret_valid=True,
            )

    def secret_deleted(self, secret: JSON) -> None:
        ns, name = ns_name(secret)
        for cert in self.cluster.list(CERTIFICATES, ns):
            if (cert.get("spec") or {}).get("secretName") == name:
                self._start_issuance(
                    cert, "DoesNotExist", "Issuing certificate as Secret does not exist"
                )

    # --- issuance ---------------------------------------------------------------------

    def _start_issuance(
        self, cert: JSON, reason: str, message: str, *, secret_valid: bool = False
    ) -> None:
        key = ns_name(cert)
        if key in self._issuing:
            return  # already on its way
        number = next(self._issuance_numbers)
        cert = self.cluster.require(CERTIFICATES, *key)
        status = cert.get("status") or {}
        revision = int(status.get("revision") or 0) + 1
        spec = cert.get("spec") or {}
        issuance = _Issuance(
            number, f"{key[1]}-{revision}", revision, new_private_key(spec.get("privateKey"))
        )
        self._issuing[key] = issuance  # before writing: our own write comes back through observe
        now = time.time()
        generation = cert["metadata"]["generation"]
        if not secret_valid:
            # The readiness controller: no Secret (or one not matching the spec) is not Ready.
            # A manual renewal keeps Ready as it is: the current certificate is still served.
            _certificate_condition(status, "Ready", "False", reason, message, now, generation)
        _certificate_condition(status, "Issuing", "True", reason, message, now, generation)
        cert = self._write_status(CERTIFICATES, cert, status)
        self._record(cert, "CertificateIssuing", now)
        self._create_request(cert, issuance, now)
        annotations = cert["metadata"].get("annotations") or {}
        secret_name = spec.get("secretName")
        if (
            annotations.get(TEMPORARY_CERTIFICATE) == "true"
            and secret_name
            and self.cluster.get(SECRETS, key[0], secret_name) is None
        ):
            temporary = self.ca.issue(
                common_name=spec.get("commonName"),
                dns_names=list(spec.get("dnsNames") or []),
                not_before=now,
                not_after=now + TEMPORARY_CERT_SECONDS,
                key=issuance.key,
                self_signed=True,
            )
            self._write_tls_secret(cert, temporary, ca_pem=temporary.certificate_pem)
            self._record(cert, "TemporaryCertificateIssued", now)
        step = functools.partial(self._finish_issuance, *key, number)
        self.scheduler.call_later(self.delay, step)

    def _create_request(self, cert: JSON, issuance: _Issuance, now: float) -> None:
        """The CertificateRequest of this issuance; an earlier one of the same revision (a
        failed attempt) is replaced, as cert-manager's request manager does."""
        ns, cert_name = ns_name(cert)
        spec = cert.get("spec") or {}
        if self.cluster.get(CERTIFICATE_REQUESTS, ns, issuance.request) is not None:
            self.cluster.delete(CERTIFICATE_REQUESTS, ns, issuance.request)
        csr = csr_pem(issuance.key, spec.get("commonName"), list(spec.get("dnsNames") or []))
        request: JSON = {
            "metadata": {
                "name": issuance.request,
                "namespace": ns,
                "annotations": {
                    "cert-manager.io/certificate-name": cert_name,
                    REVISION_ANNOTATION: str(issuance.revision),
                    "cert-manager.io/private-key-secret-name": f"{cert_name}-next-key",
                },
                "ownerReferences": [owner_reference(cert)],
            },
            "spec": {
                "request": _b64(csr),
                "issuerRef": spec.get("issuerRef") or {},
                "duration": spec.get("duration") or DEFAULT_CERT_DURATION,
                "usages": ["digital signature", "key encipherment"],
            },
            "status": {},
        }
        status = request["status"]
        set_condition(
            status,
            "Approved",
            "True",
            "cert-manager.io",
            "Certificate request has been approved by cert-manager.io",
            now,
            ("lastTransitionTime",),
        )
        set_condition(
            status,
            "Ready",
            "False",
            "Pending",
            "Waiting on certificate issuance from the issuer",
            now,
            ("lastTransitionTime",),
        )
        self.cluster.create(CERTIFICATE_REQUESTS, request)

    def _finish_issuance(self, ns: str, name: str, number: int) -> None:
        issuance = self._issuing.get((ns, name))
        if issuance is None or issuance.number != number:
            return
        del self._issuing[(ns, name)]
        cert = self.cluster.get(CERTIFICATES, ns, name)
        if cert is None:
            return
        now = time.time()
        failure = self.failures.get(name)
        if failure is not None:
            self._fail_issuance(cert, issuance, failure, now)
            return
        spec = cert.get("spec") or {}
        duration = parse_go_duration(spec.get("duration") or DEFAULT_CERT_DURATION)
        issued = self.ca.issue(
            common_name=spec.get("commonName"),
            dns_names=list(spec.get("dnsNames") or []),
            not_before=now,
            not_after=now + duration,
            key=issuance.key,
        )
        self._update_request(
            ns,
            issuance.request,
            "True",
            "Issued",
            "Certificate fetched from issuer successfully",
            now,
            certificate=_b64(issued.certificate_pem),
            ca=_b64(self.ca.certificate_pem),
        )
        status = cert.get("status") or {}
        conditions = status.get("conditions", [])
        status["conditions"] = [c for c in conditions if c.get("type") != "Issuing"]
        message = "Certificate is up to date and has not expired"
        generation = cert["metadata"]["generation"]
        _certificate_condition(status, "Ready", "True", "Ready", message, now, generation)
        # Status as cert-manager reads it from the certificate it wrote.
        status.update(
            notBefore=rfc3339(issued.not_before),
            notAfter=rfc3339(issued.not_after),
            renewalTime=rfc3339(renewal_time(issued.not_before, issued.not_after, spec)),
            revision=issuance.revision,
        )
        status.pop("failedIssuanceAttempts", None)
        status.pop("lastFailureTime", None)
        cert = self._write_status(CERTIFICATES, cert, status)
        if spec.get("secretName"):
            self._write_tls_secret(cert, issued, ca_pem=self.ca.certificate_pem)
        self._record(cert, "CertificateReady", now)

    def _fail_issuance(self, cert: JSON, issuance: _Issuance, failure: str, now: float) -> None:
        ns = cert["metadata"]["namespace"]
        self._update_request(
            ns, issuance.request, "False", "Failed", failure, now, failureTime=rfc3339(now)
        )
        status = cert.get("status") or {}
        status["failedIssuanceAttempts"] = int(status.get("failedIssuanceAttempts") or 0) + 1
        status["lastFailureTime"] = rfc3339(now)
        message = f"The certificate request has failed to complete and will be retried: {failure}"
        generation = cert["metadata"]["generation"]
        _certificate_condition(status, "Issuing", "False", "Failed", message, now, generation)
        cert = self._write_status(CERTIFICATES, cert, status)
        self._record(cert, "CertificateIssuanceFailed", now)

    def _update_request(
        self,
        ns: str,
        name: str,
        ready: str,
        reason: str,
        message: str,
        now: float,
        **fields: str,
    ) -> None:
        request = self.cluster.get(CERTIFICATE_REQUESTS, ns, name)
        if request is None:
            return  # deleted meanwhile
        status = request.get("status") or {}
        set_condition(status, "Ready", ready, reason, message, now, ("lastTransitionTime",))
        status.update(fields)
        self._write_status(CERTIFICATE_REQUESTS, request, status)

    # --- the TLS Secret ---------------------------------------------------------------

    def _write_seeded_secret(self, cert: JSON) -> None:
        """A seeded Ready Certificate's Secret holds a real certificate of its validity."""
        spec, status = cert.get("spec") or {}, cert["status"]
        if not spec.get("secretName"):
            return
        not_after = parse_rfc3339(status["notAfter"])
        duration = parse_go_duration(spec.get("duration") or DEFAULT_CERT_DURATION)
        not_before = (
            parse_rfc3339(status["notBefore"]) if status.get("notBefore") else not_after - duration
        )
        revision = int(status.get("revision") or 1)
        issuance = _Issuance(
            0,
            f"{cert['metadata']['name']}-{revision}",
            revision,
            new_private_key(spec.get("privateKey")),
        )
        issued = self.ca.issue(
            common_name=spec.get("commonName"),
            dns_names=list(spec.get("dnsNames") or []),
            not_before=not_before,
            not_after=not_after,
            key=issuance.key,
        )
        # The request it came from, as cert-manager keeps the latest one.
        self._create_request(cert, issuance, not_before)
        self._update_request(
            cert["metadata"]["namespace"],
            issuance.request,
            "True",
            "Issued",
            "Certificate fetched from issuer successfully",
            not_before,
            certificate=_b64(issued.certificate_pem),
            ca=_b64(self.ca.certificate_pem),
        )
        self._write_tls_secret(cert, issued, ca_pem=self.ca.certificate_pem)

    def _write_tls_secret(self, cert: JSON, issued: Issued, *, ca_pem: str) -> None:
        """The Secret cert-manager writes: the certificate, its key and the CA, annotated."""
        ns, cert_name = ns_name(cert)
        spec = cert.get("spec") or {}
        issuer = spec.get("issuerRef") or {}
        data = {
            "tls.crt": _b64(issued.certificate_pem),
            "tls.key": _b64(issued.private_key_pem),
            "ca.crt": _b64(ca_pem),
        }
        annotations = {
            "cert-manager.io/certificate-name": cert_name,
            "cert-manager.io/common-name": spec.get("commonName", ""),
            "cert-manager.io/alt-names": ",".join(spec.get("dnsNames") or []),
            "cert-manager.io/issuer-name": issuer.get("name", ""),
            "cert-manager.io/issuer-kind": issuer.get("kind", "Issuer"),
            "cert-manager.io/issuer-group": issuer.get("group", "cert-manager.io"),
        }
        existing = self.cluster.get(SECRETS, ns, spec["secretName"])
        if existing is None:
            self.cluster.create(
                SECRETS,
                {
                    "metadata": {
                        "name": spec["secretName"],
                        "namespace": ns,
                        "annotations": annotations,
                        "labels": {"controller.cert-manager.io/fao": "true"},
                    },
                    "type": "kubernetes.io/tls",
                    "data": data,
                },
            )
        else:
            existing["data"] = {**(existing.get("data") or {}), **data}
            existing["metadata"]["annotations"] = {
                **(existing["metadata"].get("annotations") or {}),
                **annotations,
            }
            self.cluster.update(SECRETS, existing)
