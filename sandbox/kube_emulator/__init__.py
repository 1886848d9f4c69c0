"""An HTTP Kubernetes API emulator for tests and the local sandbox.

The official `kubernetes` client talks to it unchanged
(`kubernetes.client.Configuration(host=emulator.url)`). Layers, bottom up:

- `resources`: the resource registry, `Status` errors, timestamps, selectors;
- `patches`: strategic merge, JSON merge and JSON patch;
- `cluster`: the object store, resourceVersions, the watch event log, garbage collection;
- `controllers`: one module per controller (Deployment/ReplicaSet rollouts, StatefulSets,
  Jobs, HPAs, Certificates);
- `rest`: routing, verbs, subresources, watches, fault injection, the write log;
- `server`: the HTTP/1.1 socket server; `emulator`: `KubeEmulator`, the public API.

Pods: a ReplicaSet's are created and deleted with its `spec.replicas` (Running and
ready at once), a Job's run; `pods/log` is in `pod_logs`. Not emulated: Pods for
StatefulSets, finalizers and graceful deletion,
server-side apply, paused Deployments, autoscaling, list paging (`limit` is ignored and
everything is returned), namespace existence checks, authentication.
"""

from .emulator import KubeEmulator
from .records import HistoryEvent, WriteRecord

__all__ = ["HistoryEvent", "KubeEmulator", "WriteRecord"]
