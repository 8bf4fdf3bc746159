"""Names of the OutboxPublisher API and of everything the operator stamps on its children.

Change a name here and nowhere else (the CRD in crds/ must agree; tests check it).
"""

from __future__ import annotations

GROUP = "outbox.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "OutboxPublisher"
PLURAL = "outboxpublishers"
SHORT_NAME = "obp"

# --- labels and annotations on children -----------------------------------------------------------
LABEL_PUBLISHER = f"{GROUP}/publisher"  # = the OutboxPublisher's metadata.name
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
APP_NAME = "outbox-relay"
COMPONENT_WORKER = "worker"
MANAGER = "outbox-operator"

# Hash of what the operator rendered for a child; the child is replaced only when it changes.
ANNOTATION_HASH = f"{GROUP}/applied-hash"
# Hash of the worker pod template, on the Deployment and on its pod template (visible on pods).
ANNOTATION_TEMPLATE_HASH = f"{GROUP}/pod-template-hash"
# Digest of the resourceVersions of every Secret the workers use, on the pod template: a rotated
# credential changes it, and so rolls the workers.
ANNOTATION_SECRETS_HASH = f"{GROUP}/secrets-hash"

# --- condition types ------------------------------------------------------------------------------
READY = "Ready"
DEGRADED = "Degraded"
DATABASE_READY = "DatabaseReady"
STREAM_READY = "StreamReady"
LAGGING = "Lagging"
CONDITION_TYPES = (READY, DEGRADED, DATABASE_READY, STREAM_READY, LAGGING)

# --- defaults of the operator itself -------------------------------------------------------------
DEFAULT_WORKER_IMAGE = "ghcr.io/outbox-relay/outbox-relay:0.1.0"
WORKER_COMMAND = ("outboxctl", "worker")
# A report older than this many report intervals is stale: its pod is not counted as reporting.
STALE_AFTER_INTERVALS = 3.0
