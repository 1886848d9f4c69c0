"""The Job controller: a Job runs one Pod. For an image the sandbox can run (`runnable`
images, e.g. the backend's) the Pod's command really runs as a local process, and its exit
code and output decide; any other Job succeeds or fails as configured per name prefix,
leaving the configured logs behind."""

from __future__ import annotations

import functools
import threading
import time
from pathlib import Path

from ..cluster import Cluster
from ..records import HistoryEvent
from ..resources import JOBS, JSON, PODS, rfc3339
from .base import Controller, ns_name, running_pod, set_condition
from .job_runner import ContainerConfigError, LocalProcess, Outcome, container_env
from .scheduler import Scheduler


class JobController(Controller):
    """Jobs: one Pod each; `behaviours` by name prefix decide how it ends."""

    def __init__(
        self,
        cluster: Cluster,
        scheduler: Scheduler,
        history: list[HistoryEvent],
        pod_logs: dict[tuple[str, str], str],
    ) -> None:
        super().__init__(cluster, scheduler, history)
        self.delay = 0.2
        self.behaviours: dict[str, tuple[bool, str]] = {}
        # Image prefix → the local directory that stands for the image's working directory.
        self.runnable: dict[str, Path] = {}
        self.pod_logs = pod_logs
        self._running: dict[str, LocalProcess] = {}  # by Job uid

    def behaviour(self, job_name: str) -> tuple[bool, str]:
        """The longest configured prefix wins; by default a Job succeeds, silently."""
        matches = [p for p in self.behaviours if job_name.startswith(p)]
        return self.behaviours[max(matches, key=len)] if matches else (True, "")

    def created(self, job: JSON, seeded: bool) -> None:
        status = job.get("status") or {}
        if seeded and (status.get("conditions") or status.get("succeeded") or status.get("failed")):
            return  # a seeded, finished Job
        if job["spec"].get("suspend"):
            return
        now = time.time()
        pod = self._create_job_pod(job, now)
        job = self._write_status(JOBS, job, {"active": 1, "ready": 0, "startTime": rfc3339(now)})
        self._record(job, "JobStarted", now)
        finish = functools.partial(
            self._finish_job, *ns_name(job), job["metadata"]["uid"], pod["metadata"]["name"]
        )
        workdir = self._workdir_for(pod)
        if workdir is None:
            self.scheduler.call_later(self.delay, finish)
        else:
            self._start_process(job, pod, workdir, finish)

    def deleted(self, job: JSON) -> None:
        """A deleted Job's process is killed, as its Pod would be."""
        process = self._running.pop(job["metadata"]["uid"], None)
        if process is not None:
            process.kill()

    def _workdir_for(self, pod: JSON) -> Path | None:
        image = pod["spec"]["containers"][0]["image"]
        matches = [prefix for prefix in self.runnable if image.startswith(prefix)]
        return self.runnable[max(matches, key=len)] if matches else None

    def _start_process(
        self, job: JSON, pod: JSON, workdir: Path, finish: functools.partial[None]
    ) -> None:
        """Run the Pod's first container for real, off the controller thread; the outcome
        is applied by the scheduler like any other step."""
        container = pod["spec"]["containers"][0]
        uid = job["metadata"]["uid"]
        try:
            env = container_env(self.cluster, pod["metadata"]["namespace"], container)
        except ContainerConfigError as exc:
            outcome = Outcome(False, f"Error: {exc}\n", "CreateContainerConfigError", str(exc))
            self.scheduler.call_later(self.delay, functools.partial(finish, outcome))
            return
        deadline = job["spec"].get("activeDeadlineSeconds")
        process = LocalProcess(container, workdir, env, float(deadline) if deadline else None)
        self._running[uid] = process

        def run() -> None:
            outcome = process.run()
            self._running.pop(uid, None)
            self.scheduler.call_later(0, functools.partial(finish, outcome))

        threading.Thread(target=run, name=f"job-{job['metadata']['name']}", daemon=True).start()

    def _create_job_pod(self, job: JSON, now: float) -> JSON:
        # A Job's pod has no Ready condition while it runs: it is not behind a Service.
        return self.cluster.create(PODS, running_pod(job, now, ready_condition=False))

    def _finish_job(
        self, ns: str, name: str, uid: str, pod_name: str, outcome: Outcome | None = None
    ) -> None:
        job = self._latest(JOBS, ns, name, uid)
        if job is None:
            return
        if outcome is None:
            succeed, logs = self.behaviour(name)
            outcome = Outcome(
                succeed, logs, "BackoffLimitExceeded", "Job has reached the specified backoff limit"
            )
        succeed, logs = outcome.succeeded, outcome.logs
        now = time.time()
        pod = self.cluster.get(PODS, ns, pod_name)
        if pod is not None:
            self.pod_logs[(ns, pod_name)] = logs
            pod["status"]["phase"] = "Succeeded" if succeed else "Failed"
            for container in pod["status"].get("containerStatuses", []):
                started = container["state"].get("running", {}).get("startedAt", rfc3339(now))
                container.update(ready=False, started=False)
                container["state"] = {
                    "terminated": {
                        "exitCode": 0 if succeed else 1,
                        "reason": "Completed" if succeed else "Error",
                        "startedAt": started,
                        "finishedAt": rfc3339(now),
                    }
                }
            self.cluster.update(PODS, pod)
        status = job.get("status") or {}
        status.pop("active", None)
        stamps = ("lastProbeTime", "lastTransitionTime")
        if succeed:
            status.update(succeeded=1, completionTime=rfc3339(now))
            set_condition(status, "Complete", "True", "", "", now, stamps)
        else:
            status.update(failed=1)
            set_condition(status, "Failed", "True", outcome.reason, outcome.message, now, stamps)
        job = self._write_status(JOBS, job, status)
        self._record(job, "JobComplete" if succeed else "JobFailed", now)
