"""The cert-manager Certificate controller: issuance on creation, on a spec change, on a
deleted Secret and on `cmctl renew` (the Issuing condition); Ready with a new revision."""

from __future__ import annotations

import base64
import functools
import itertools
import time

from ..cluster import Cluster
from ..records import HistoryEvent
from ..resources import CERTIFICATES, JSON, SECRETS, parse_go_duration, rfc3339
from .base import Controller, get_condition, ns_name, set_condition
from .scheduler import Scheduler

TEMPORARY_CERTIFICATE = "cert-manager.io/issue-temporary-certificate"
DEFAULT_CERT_DURATION = "2160h"  # 90 days


def _certificate_condition(
    status: JSON, kind: str, value: str, reason: str, message: str, now: float, generation: int
) -> None:
    stamps = ("lastTransitionTime",)  # cert-manager conditions have no lastUpdateTime
    set_condition(status, kind, value, reason, message, now, stamps, observedGeneration=generation)


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


class CertificateController(Controller):
    """cert-manager Certificates and the TLS Secrets they write."""

    def __init__(self, cluster: Cluster, scheduler: Scheduler, history: list[HistoryEvent]) -> None:
        super().__init__(cluster, scheduler, history)
        self.delay = 0.2
        self._issuing: dict[tuple[str, str], int] = {}  # certificate -> pending issuance
        self._issuance_numbers = itertools.count(1)

    def forget(self, cert: JSON) -> None:
        """A deleted Certificate's pending issuance ends with it."""
        self._issuing.pop(ns_name(cert), None)

    def changed(self, old: JSON | None, new: JSON) -> None:
        if old is None:
            if get_condition(new.get("status"), "Ready") is None:
                self._start_issuance(
                    new, "DoesNotExist", "Issuing certificate as Secret does not exist"
                )
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
            )

    def secret_deleted(self, secret: JSON) -> None:
        ns, name = ns_name(secret)
        for cert in self.cluster.list(CERTIFICATES, ns):
            if (cert.get("spec") or {}).get("secretName") == name:
                self._start_issuance(
                    cert, "DoesNotExist", "Issuing certificate as Secret does not exist"
                )

    def _start_issuance(self, cert: JSON, reason: str, message: str) -> None:
        key = ns_name(cert)
        if key in self._issuing:
            return  # already on its way
        number = next(self._issuance_numbers)
        self._issuing[key] = number  # before writing: our own write comes back through observe
        now = time.time()
        cert = self.cluster.require(CERTIFICATES, *key)
        status = cert.get("status") or {}
        generation = cert["metadata"]["generation"]
        _certificate_condition(status, "Ready", "False", "InProgress", message, now, generation)
        _certificate_condition(status, "Issuing", "True", reason, message, now, generation)
        cert = self._write_status(CERTIFICATES, cert, status)
        self._record(cert, "CertificateIssuing", now)
        annotations = cert["metadata"].get("annotations") or {}
        secret_name = (cert.get("spec") or {}).get("secretName")
        if (
            annotations.get(TEMPORARY_CERTIFICATE) == "true"
            and secret_name
            and self.cluster.get(SECRETS, key[0], secret_name) is None
        ):
            self._write_tls_secret(cert, now, temporary=True)
            self._record(cert, "TemporaryCertificateIssued", now)
        step = functools.partial(self._finish_issuance, *key, number)
        self.scheduler.call_later(self.delay, step)

    def _finish_issuance(self, ns: str, name: str, number: int) -> None:
        if self._issuing.get((ns, name)) != number:
            return
        del self._issuing[(ns, name)]
        cert = self.cluster.get(CERTIFICATES, ns, name)
        if cert is None:
            return
        spec, now = cert.get("spec") or {}, time.time()
        duration = parse_go_duration(spec.get("duration") or DEFAULT_CERT_DURATION)
        # cert-manager renews a third of the way from the end unless told otherwise:
        # 30 days (720h) for the default 90-day certificate.
        renew_before = parse_go_duration(spec["renewBefore"]) if "renewBefore" in spec else None
        not_after = now + duration
        status = cert.get("status") or {}
        conditions = status.get("conditions", [])
        status["conditions"] = [c for c in conditions if c.get("type") != "Issuing"]
        message = "Certificate is up to date and has not expired"
        generation = cert["metadata"]["generation"]
        _certificate_condition(status, "Ready", "True", "Ready", message, now, generation)
        status.update(
            notBefore=rfc3339(now),
            notAfter=rfc3339(not_after),
            renewalTime=rfc3339(not_after - (renew_before or duration / 3)),
            revision=int(status.get("revision") or 0) + 1,
        )
        status.pop("failedIssuanceAttempts", None)
        status.pop("lastFailureTime", None)
        cert = self._write_status(CERTIFICATES, cert, status)
        if spec.get("secretName"):
            self._write_tls_secret(cert, not_after, temporary=False)
        self._record(cert, "CertificateReady", now)

    def _write_tls_secret(self, cert: JSON, not_after: float, *, temporary: bool) -> None:
        """The Secret cert-manager writes: dummy PEM blocks, annotated like the real thing."""
        ns, cert_name = ns_name(cert)
        spec = cert.get("spec") or {}
        issuer = spec.get("issuerRef") or {}
        names = ",".join(spec.get("dnsNames") or [])
        subject = (
            "temporary certificate" if temporary else f"certificate until {rfc3339(not_after)}"
        )
        body = _b64(f"emulated {subject} for {names or cert_name}")
        data = {
            "tls.crt": _b64(f"-----BEGIN CERTIFICATE-----\n{body}\n-----END CERTIFICATE-----\n"),
            "tls.key": _b64(f"-----BEGIN PRIVATE KEY-----\n{body}\n-----END PRIVATE KEY-----\n"),
            "ca.crt": _b64(
                f"-----BEGIN CERTIFICATE-----\n{_b64('emulated CA')}\n-----END CERTIFICATE-----\n"
            ),
        }
        annotations = {
            "cert-manager.io/certificate-name": cert_name,
            "cert-manager.io/common-name": spec.get("commonName", ""),
            "cert-manager.io/alt-names": names,
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
