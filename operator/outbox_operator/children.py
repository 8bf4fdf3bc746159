"""Pure builders of the objects an OutboxPublisher owns. No I/O: dicts in, dicts out.

Every child has a deterministic name, the publisher's labels, a controller ownerReference (so the
garbage collector deletes it with the publisher) and an ``outbox.dev/applied-hash`` annotation: the
hash of what was rendered. The reconcile plan replaces a child only when that hash changes.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from outbox_common.settings import env_name

from . import constants as c
from .spec import NATS_CREDS_DIR, NATS_TLS_DIR, PublisherSpec, SecretKeyRef, render_worker_env

Obj = dict[str, Any]


@dataclass(frozen=True)
class Owner:
    """The OutboxPublisher the children belong to."""

    name: str
    namespace: str
    uid: str

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Owner:
        meta = body["metadata"]
        return cls(name=meta["name"], namespace=meta["namespace"], uid=meta["uid"])


@dataclass(frozen=True)
class OperatorConfig:
    """Settings of the operator itself (flags of ``outboxctl operator``)."""

    worker_image: str = c.DEFAULT_WORKER_IMAGE


DEFAULT_RESOURCES: Obj = {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}}
UID = 65532  # the image's non-root user


# --- names and labels -----------------------------------------------------------------------------


def worker_name(owner: Owner) -> str:
    """Deployment, ServiceAccount, Role and RoleBinding of the workers."""
    return f"{owner.name}-relay"


def metrics_service_name(owner: Owner) -> str:
    return f"{owner.name}-relay-metrics"


def selector_labels(owner: Owner) -> dict[str, str]:
    return {c.LABEL_PUBLISHER: owner.name, c.LABEL_COMPONENT: c.COMPONENT_WORKER}


def selector_string(owner: Owner) -> str:
    """``status.selector`` for the scale subresource (sorted, comma-separated)."""
    return ",".join(f"{k}={v}" for k, v in sorted(selector_labels(owner).items()))


def common_labels(owner: Owner) -> dict[str, str]:
    return {
        c.LABEL_NAME: c.APP_NAME,
        c.LABEL_INSTANCE: owner.name,
        c.LABEL_MANAGED_BY: c.MANAGER,
        **selector_labels(owner),
    }


def owner_reference(owner: Owner) -> Obj:
    return {
        "apiVersion": c.API_VERSION,
        "kind": c.KIND,
        "name": owner.name,
        "uid": owner.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def content_hash(obj: Any) -> str:
    """Stable short hash of a JSON-able value (key order does not matter)."""
    raw = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(raw).hexdigest()[:16]


def _meta(owner: Owner, name: str) -> Obj:
    return {
        "name": name,
        "namespace": owner.namespace,
        "labels": common_labels(owner),
        "ownerReferences": [owner_reference(owner)],
    }


def _stamp(obj: Obj) -> Obj:
    """Add the applied-hash annotation, computed over everything else."""
    body = copy.deepcopy(obj)
    body["metadata"].setdefault("annotations", {})[c.ANNOTATION_HASH] = content_hash(obj)
    return body


# --- builders -------------------------------------------------------------------------------------


def build_service_account(owner: Owner) -> Obj:
    return _stamp(
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": _meta(owner, worker_name(owner)),
            "automountServiceAccountToken": True,
        }
    )


def build_role(owner: Owner) -> Obj:
    """Workers may patch the status of their own publisher, and nothing else."""
    return _stamp(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": _meta(owner, worker_name(owner)),
            "rules": [
                {
                    "apiGroups": [c.GROUP],
                    "resources": [f"{c.PLURAL}/status"],
                    "resourceNames": [owner.name],
                    "verbs": ["get", "patch"],
                }
            ],
        }
    )


def build_role_binding(owner: Owner) -> Obj:
    return _stamp(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": _meta(owner, worker_name(owner)),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": worker_name(owner)},
            "subjects": [{"kind": "ServiceAccount", "name": worker_name(owner), "namespace": owner.namespace}],
        }
    )


def build_metrics_service(owner: Owner, spec: PublisherSpec) -> Obj:
    return _stamp(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": _meta(owner, metrics_service_name(owner)),
            "spec": {
                "type": "ClusterIP",
                "selector": selector_labels(owner),
                "ports": [
                    {"name": "metrics", "port": spec.worker.metrics_port, "targetPort": "metrics", "protocol": "TCP"}
                ],
            },
        }
    )


def build_pdb(owner: Owner) -> Obj:
    """Only when more than one worker runs: voluntary evictions take one worker at a time."""
    return _stamp(
        {
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": _meta(owner, worker_name(owner)),
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector_labels(owner)}},
        }
    )


def _env(owner: Owner, spec: PublisherSpec) -> list[Obj]:
    """The container's environment: the user's ``worker.env`` first, the operator's own variables last.

    Kubernetes lets the last entry of a name win, so whatever ``worker.env`` holds, the settings the
    operator renders (and the Secret references) are what the worker reads.
    """
    env: list[Obj] = [var.model_dump(by_alias=True, exclude_none=True) for var in spec.worker.env or []]
    env.extend({"name": k, "value": v} for k, v in render_worker_env(spec, owner.name).items())
    env.append({"name": env_name("worker_id"), "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}})
    env.append({"name": env_name("kube_namespace"), "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}})
    secrets: list[tuple[str, SecretKeyRef]] = [("database_url", spec.database.secret_ref)]
    if spec.nats.password_secret_ref is not None:
        secrets.append(("nats_password", spec.nats.password_secret_ref))
    if spec.nats.token_secret_ref is not None:
        secrets.append(("nats_token", spec.nats.token_secret_ref))
    for field, ref in secrets:
        env.append({"name": env_name(field), "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
    return env


def _volumes(spec: PublisherSpec) -> tuple[list[Obj], list[Obj]]:
    volumes: list[Obj] = [{"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}}]
    mounts: list[Obj] = [{"name": "tmp", "mountPath": "/tmp"}]  # noqa: S108 - read-only root fs
    creds = spec.nats.credentials_secret_ref
    if creds is not None:
        volumes.append(
            {
                "name": "nats-creds",
                "secret": {
                    "secretName": creds.name,
                    "items": [{"key": creds.key, "path": creds.key}],
                    "defaultMode": 0o440,
                },
            }
        )
        mounts.append({"name": "nats-creds", "mountPath": NATS_CREDS_DIR, "readOnly": True})
    tls = spec.nats.tls
    if tls is not None:
        keys = [k for k in (tls.ca_key, tls.cert_key, tls.key_key) if k]
        volumes.append(
            {
                "name": "nats-tls",
                "secret": {
                    "secretName": tls.secret_name,
                    "items": [{"key": k, "path": k} for k in keys],
                    "defaultMode": 0o440,
                },
            }
        )
        mounts.append({"name": "nats-tls", "mountPath": NATS_TLS_DIR, "readOnly": True})
    return volumes, mounts


def build_pod_template(owner: Owner, spec: PublisherSpec, config: OperatorConfig, secrets_hash: str = "") -> Obj:
    """The worker pod template, with restricted pod security. Raises InvalidSpec on a bad spec.

    ``secrets_hash`` (a digest of the referenced Secrets' resourceVersions) is an annotation of the
    template: when a credential is rotated it changes, and the Deployment rolls the workers.
    One literal pod spec on purpose (near tests/test_static.py's 60-line limit): the security
    settings a reviewer checks stay in one place."""
    volumes, mounts = _volumes(spec)
    resources = spec.worker.resources.model_dump(exclude_none=True) if spec.worker.resources else DEFAULT_RESOURCES
    probe_port = "metrics"
    container: Obj = {
        "name": "worker",
        "image": spec.worker.image or config.worker_image,
        "imagePullPolicy": spec.worker.image_pull_policy,
        "command": list(c.WORKER_COMMAND),
        "env": _env(owner, spec),
        "ports": [{"name": "metrics", "containerPort": spec.worker.metrics_port, "protocol": "TCP"}],
        "readinessProbe": {
            "httpGet": {"path": "/readyz", "port": probe_port},
            "periodSeconds": 5,
            "failureThreshold": 3,
        },
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": probe_port},
            "initialDelaySeconds": 10,
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
        "resources": resources,
        "securityContext": {
            "runAsNonRoot": True,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": mounts,
    }
    pod_spec: Obj = {
        "serviceAccountName": worker_name(owner),
        "automountServiceAccountToken": True,
        "terminationGracePeriodSeconds": math.ceil(spec.worker.shutdown_grace_seconds) + 10,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": UID,
            "runAsGroup": UID,
            "fsGroup": UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
    }
    if spec.worker.node_selector:
        pod_spec["nodeSelector"] = dict(spec.worker.node_selector)
    if spec.worker.tolerations:
        pod_spec["tolerations"] = [t.model_dump(by_alias=True, exclude_none=True) for t in spec.worker.tolerations]
    if spec.worker.affinity:
        pod_spec["affinity"] = copy.deepcopy(spec.worker.affinity)
    template: Obj = {"metadata": {"labels": common_labels(owner)}, "spec": pod_spec}
    if secrets_hash:
        template["metadata"]["annotations"] = {c.ANNOTATION_SECRETS_HASH: secrets_hash}
    template_hash = content_hash(template)
    template["metadata"].setdefault("annotations", {})[c.ANNOTATION_TEMPLATE_HASH] = template_hash
    return template


def build_deployment(
    owner: Owner, spec: PublisherSpec, replicas: int, config: OperatorConfig, secrets_hash: str = ""
) -> Obj:
    """The worker Deployment. ``replicas`` is decided by the plan (spec, autoscaler or 0 when paused)
    and is not part of the applied hash, so scaling never replaces the object."""
    template = build_pod_template(owner, spec, config, secrets_hash)
    meta = _meta(owner, worker_name(owner))
    meta["annotations"] = {c.ANNOTATION_TEMPLATE_HASH: template["metadata"]["annotations"][c.ANNOTATION_TEMPLATE_HASH]}
    body = _stamp(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": meta,
            "spec": {
                "selector": {"matchLabels": selector_labels(owner)},
                "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
                "revisionHistoryLimit": 3,
                "template": template,
            },
        }
    )
    body["spec"]["replicas"] = replicas
    return body
