"""`KubeEmulator`: the public face of the emulator."""

from __future__ import annotations

import builtins
import re
import threading
from collections.abc import Callable
from pathlib import Path

from sandbox.services import Service

from .cluster import Cluster
from .controllers import Controllers
from .pod_logs import LogSource
from .records import AccessRecord, HistoryEvent, WriteRecord
from .resources import JSON, ResourceType, find_type
from .rest import Fault, RestApi
from .server import EmulatorHTTPServer


class KubeEmulator(Service):
    """A Kubernetes API server emulator the official `kubernetes` client talks to unchanged.

    It serves core/v1, apps/v1, batch/v1, autoscaling/v2 and cert-manager.io/v1 resources
    over plain HTTP on loopback, with label/field selectors, watches, strategic merge,
    merge and JSON patches, `scale` and `status` subresources, and small controllers:
    Deployments get ReplicaSets with revision annotations and roll out (or fail, on
    demand), Jobs run a Pod and complete or fail, Certificates are (re)issued. Every write
    a client makes is recorded in `writes`; the controllers' transitions in `history`.

        with KubeEmulator() as emu:
            configuration = kubernetes.client.Configuration(host=emu.url)
            emu.seed({"apiVersion": "apps/v1", "kind": "Deployment", ...})

    Thread-safe: one lock guards the whole cluster; controllers run on one thread.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, event_log_size: int = 5000) -> None:
        self.host, self._port = host, port
        # Watches resume from the event log; older resourceVersions get 410 Expired.
        self._cluster = Cluster(event_log_size)
        self._controllers = Controllers(self._cluster)
        self._api = RestApi(self._cluster, self._controllers)
        self._server: EmulatorHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> KubeEmulator:
        if self._server is not None:
            return self
        self._api.stopped.clear()
        self._server = EmulatorHTTPServer((self.host, self._port), self._api)
        self._port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name=f"kube-emulator:{self._port}",
            daemon=True,
        )
        self._thread.start()
        self._controllers.scheduler.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._api.stopped.set()
        with self._cluster.changed:
            self._cluster.changed.notify_all()  # wake the watches so they end
        self._server.shutdown()
        self._server.close_connections()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._controllers.scheduler.stop()
        self._server, self._thread = None, None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self._port}"

    # --- state -----------------------------------------------------------------------------

    def seed(self, obj: JSON) -> JSON:
        """Create an object directly (not a client write); the controllers still react.
        Unlike a client, a seed may set `status`, `uid` and `creationTimestamp`."""
        rt = find_type(obj.get("apiVersion", ""), obj.get("kind", ""))
        if rt is None:
            raise ValueError(f"unknown type {obj.get('apiVersion')}/{obj.get('kind')}")
        with self._cluster.lock:
            created = self._cluster.create(rt, obj, seeded=True)
            # As it stands after the controllers' immediate reactions (revision, status).
            meta = created["metadata"]
            return self._cluster.get(rt, meta.get("namespace"), meta["name"]) or created

    def get(self, api_version: str, kind: str, namespace: str | None, name: str) -> JSON | None:
        """A deep copy of the object, or None. `kind` may also be the plural."""
        return self._cluster.get(self._type(api_version, kind), namespace, name)

    def list(self, api_version: str, kind: str, namespace: str | None = None) -> list[JSON]:
        return self._cluster.list(self._type(api_version, kind), namespace)

    def on_change(
        self, observer: Callable[[ResourceType, JSON | None, JSON | None, bool], None]
    ) -> None:
        """Call `observer(type, old, new, seeded)` after every stored change, under the
        cluster's lock (keep it quick): how the sandbox's stand-ins follow the cluster."""
        with self._cluster.lock:
            self._cluster.observers.append(observer)

    def set_pod_logs(self, namespace: str, name: str, logs: str) -> None:
        """What `read_namespaced_pod_log` answers for a (seeded) pod."""
        with self._cluster.lock:
            self._controllers.pod_logs[(namespace, name)] = logs

    def add_pod_log_source(self, source: LogSource) -> None:
        """Serve pods' logs from `source(namespace, pod, container)`: a list of
        `(unix time in ns, line)`, or None for a pod it does not know."""
        with self._cluster.lock:
            self._controllers.log_sources.append(source)

    @staticmethod
    def _type(api_version: str, kind: str) -> ResourceType:
        rt = find_type(api_version, kind)
        if rt is None:
            raise ValueError(f"unknown type {api_version}/{kind}")
        return rt

    # --- records ---------------------------------------------------------------------------

    @property
    def writes(self) -> builtins.list[WriteRecord]:
        with self._cluster.lock:
            return list(self._api.writes)

    def clear_writes(self) -> None:
        with self._cluster.lock:
            self._api.writes.clear()

    @property
    def accesses(self) -> dict[AccessRecord, int]:
        """Every request since the emulator started, as RBAC sees it, with its count."""
        with self._cluster.lock:
            return dict(self._api.accesses)

    @property
    def history(self) -> builtins.list[HistoryEvent]:
        with self._cluster.lock:
            return list(self._controllers.history)

    # --- behaviour -------------------------------------------------------------------------

    def fail_rollouts_for_image(self, image_substring: str) -> None:
        """Rollouts to a pod template with an image containing this text fail."""
        with self._cluster.lock:
            self._controllers.rollouts.failing_images.add(image_substring)

    def clear_rollout_failures(self) -> None:
        with self._cluster.lock:
            self._controllers.rollouts.failing_images.clear()

    def set_job_behaviour(self, name_prefix: str, succeed: bool = True, logs: str = "") -> None:
        """How Jobs whose name starts with `name_prefix` end (the longest prefix wins)."""
        with self._cluster.lock:
            self._controllers.jobs.behaviours[name_prefix] = (succeed, logs)

    def run_jobs_of_image(self, image_prefix: str, workdir: Path) -> None:
        """Jobs whose image starts with `image_prefix` really run their command, in
        `workdir` (standing for the image's working directory), with the Job's env; the
        exit code decides how the Job ends and the output is the Pod's log."""
        with self._cluster.lock:
            self._controllers.jobs.runnable[image_prefix] = workdir

    def inject_fault(
        self,
        method: str,
        path_regex: str,
        status: int = 503,
        times: int = 1,
        retry_after: int | None = None,
    ) -> None:
        """Answer the next `times` requests matching `method` ("*" for any) and
        `path_regex` (searched in the path, without the query) with `status` and a
        Status body, before they have any effect. They are not recorded as writes."""
        fault = Fault(method.upper(), re.compile(path_regex), status, times, retry_after)
        with self._cluster.lock:
            self._api.faults.append(fault)

    @property
    def rollout_delay(self) -> float:
        return self._controllers.rollouts.delay

    @rollout_delay.setter
    def rollout_delay(self, seconds: float) -> None:
        self._controllers.rollouts.delay = seconds

    @property
    def job_delay(self) -> float:
        return self._controllers.jobs.delay

    @job_delay.setter
    def job_delay(self, seconds: float) -> None:
        self._controllers.jobs.delay = seconds

    def fail_certificate_issuance(self, certificate: str, message: str) -> None:
        """Issuers fail every request of Certificates named `certificate` with `message`
        (the CertificateRequest's Ready=False, reason Failed) until cleared."""
        with self._cluster.lock:
            self._controllers.certificates.failures[certificate] = message

    def clear_certificate_failures(self) -> None:
        with self._cluster.lock:
            self._controllers.certificates.failures.clear()

    @property
    def ca_certificate_pem(self) -> str:
        """The sandbox CA that signs every issued certificate (the Secrets' `ca.crt`)."""
        return self._controllers.certificates.ca.certificate_pem

    @property
    def certificate_delay(self) -> float:
        return self._controllers.certificates.delay

    @certificate_delay.setter
    def certificate_delay(self, seconds: float) -> None:
        self._controllers.certificates.delay = seconds
