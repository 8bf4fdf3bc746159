"""The reconcile plan: observed state in, the writes that make it right out. Pure, no I/O.

One level-based function serves create, update, resume and the periodic resync. Everything it wants
to write is compared with what was observed first, so a second pass over an unchanged object plans
no write at all. The k8s adapter (``kube.py``) only observes and carries out plans.

Order of decisions:

1. An invalid spec: ``Ready=False/InvalidSpec`` naming the field and the fix; no child is touched.
2. A missing Secret (or key): ``Ready=False/SecretNotFound``; no child is touched; retried later.
   The workers that run on are still reported (totals, the other conditions, pruning).
3. Otherwise the children are created or replaced where their applied hash differs, the Deployment
   is scaled to the decided count (paused: 0; autoscaling: the autoscaler; else spec.replicas),
   the PDB exists only for more than one worker, gone pods' report entries are pruned, and totals,
   autoscaler state and conditions are written where they changed. The pod template carries a
   digest of the referenced Secrets' resourceVersions, so a rotated credential rolls the workers.
4. A child write the API server refuses (the adapter reports it): :func:`plan_child_rejected` plans
   only ``Ready=False/ChildRejected`` and ``Degraded=True/ChildRejected`` with the server's message,
   secrets removed, and an Event.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from outbox_common.settings import REDACTED, redact_urls
from outbox_common.timing import backoff_delay

from . import constants as c
from .autoscaler import decide
from .children import (
    OperatorConfig,
    Owner,
    build_deployment,
    build_metrics_service,
    build_pdb,
    build_role,
    build_role_binding,
    build_service_account,
    content_hash,
    metrics_service_name,
    selector_string,
    worker_name,
)
from .conditions import Condition, flips, merge_conditions, rfc3339
from .health import (
    PRESSURE_GAUGES,
    HealthTargets,
    Rollout,
    current_reports,
    gone_workers,
    health_conditions,
    pressure_unknown,
    totals,
)
from .spec import InvalidSpec, PublisherSpec, is_reserved_env_name, parse_spec, secret_refs, validate_name

Obj = dict[str, Any]
ChildKey = tuple[str, str]  # (kind, name)

# Status keys the operator owns; status.workers belongs to the workers (the operator only prunes).
OWNED_STATUS_KEYS = (
    "observedGeneration",
    "replicas",
    "readyReplicas",
    "desiredReplicas",
    "readyText",
    "lastPublishTime",
    "selector",
    "totals",
    "autoscaler",
    "conditions",
)
RECONCILE_RETRY_INITIAL_SECONDS = 5.0  # first wait before a failed reconcile is retried
RECONCILE_RETRY_MAX_SECONDS = 300.0


def child_keys(owner: Owner) -> list[ChildKey]:
    """Every child the operator may own for this publisher (to observe before planning)."""
    worker = worker_name(owner)
    return [
        ("ServiceAccount", worker),
        ("Role", worker),
        ("RoleBinding", worker),
        ("Service", metrics_service_name(owner)),
        ("Deployment", worker),
        ("PodDisruptionBudget", worker),
    ]


def secret_names(body: Mapping[str, Any]) -> list[str]:
    """Secrets to observe: those a valid spec refers to (none for an invalid spec)."""
    try:
        spec = parse_spec(body.get("spec"))
    except InvalidSpec:
        return []
    return sorted({name for _, name, _ in secret_refs(spec)})


@dataclass(frozen=True)
class Observed:
    body: Mapping[str, Any]  # the OutboxPublisher
    children: Mapping[ChildKey, Mapping[str, Any] | None]  # existing child, None when absent
    secrets: Mapping[str, Collection[str] | None]  # Secret name -> its data keys, None when absent
    pods: Collection[str] | None  # names of the worker pods; None when unknown (no pruning)
    now: datetime
    # Secret name -> its resourceVersion: a rotated credential changes it
    secret_versions: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Action:
    verb: Literal["create", "replace", "patch", "delete"]
    kind: str
    name: str
    body: Obj | None = None  # the object (create, replace) or a merge patch (patch)


@dataclass(frozen=True)
class Event:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass
class Plan:
    actions: list[Action] = field(default_factory=list)
    status_patch: Obj = field(default_factory=dict)  # a JSON merge patch of .status
    events: list[Event] = field(default_factory=list)
    invalid: InvalidSpec | None = None  # the spec is invalid: a permanent error until it changes
    retry_reason: str | None = None  # something is not there yet: retry with backoff

    @property
    def writes(self) -> bool:
        return bool(self.actions or self.status_patch or self.events)


def backoff_seconds(retry: int) -> float:
    """Delay before the next attempt after ``retry`` failed ones: the shared backoff, 5 s doubling,
    capped at 5 min, jittered into [half, whole] so many objects do not retry in step."""
    return backoff_delay(retry + 1, RECONCILE_RETRY_INITIAL_SECONDS, RECONCILE_RETRY_MAX_SECONDS)


def merge_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> Obj:
    """RFC 7386 merge patch that turns ``old`` into ``new`` (empty when equal)."""
    patch: Obj = {key: None for key in old if key not in new}
    for key, value in new.items():
        prior = old.get(key)
        if isinstance(value, Mapping) and isinstance(prior, Mapping):
            sub = merge_patch(prior, value)
            if sub:
                patch[key] = sub
        elif key not in old or prior != value:
            patch[key] = value
    return patch


def is_controlled_by(obj: Mapping[str, Any], owner: Owner) -> bool:
    refs = obj.get("metadata", {}).get("ownerReferences") or []
    return any(ref.get("uid") == owner.uid and ref.get("controller") for ref in refs)


def _owned_status(status: Mapping[str, Any]) -> Obj:
    return {key: status[key] for key in OWNED_STATUS_KEYS if key in status}


# Condition reasons of a freshly created publisher: not worth an Event.
_EXPECTED_AT_START = frozenset({"WorkersNotReady", "WaitingForReports", "AsExpected", "NoReports"})


# Ready=False reasons that are expected steps, not faults: a Normal Event.
_NORMAL_NOT_READY = frozenset({"Paused", "ScaledToZero", "RollingOut", "PreviousChildren"})
# Ready=False steps of every start, rollout or scale-up, in the order they pass: a flip to a later
# one is progress (pods became ready, reports come next), a Normal Event; a flip back stays a Warning.
_START_STEPS = ("PreviousChildren", "RollingOut", "WorkersNotReady", "WaitingForReports")


def _is_progress(prior: Mapping[str, Any] | None, cond: Mapping[str, Any]) -> bool:
    before, after = (prior or {}).get("reason"), cond["reason"]
    return before in _START_STEPS and after in _START_STEPS and _START_STEPS.index(after) > _START_STEPS.index(before)


def _events_for(old: Iterable[Mapping[str, Any]] | None, new: list[Obj]) -> list[Event]:
    events: list[Event] = []
    for prior, cond in flips(old, new):
        if prior is None and cond["reason"] in _EXPECTED_AT_START:
            continue
        if cond["type"] == c.READY:
            if cond["status"] == "True":
                events.append(Event("Normal", "Ready", cond["message"]))
            elif cond["status"] == "False":
                events.append(
                    Event(
                        "Normal" if cond["reason"] in _NORMAL_NOT_READY or _is_progress(prior, cond) else "Warning",
                        cond["reason"],
                        cond["message"],
                    )
                )
        elif cond["type"] == c.DEGRADED and cond["status"] == "True":
            events.append(Event("Warning", cond["reason"], cond["message"]))
        elif cond["type"] == c.DEGRADED and prior is not None and prior.get("status") == "True":
            events.append(Event("Normal", "Recovered", cond["message"]))
    return events


def _replace_body(desired: Obj, existing: Mapping[str, Any]) -> Obj:
    body = dict(desired)
    body["metadata"] = {**desired["metadata"], "resourceVersion": existing["metadata"].get("resourceVersion")}
    if desired["kind"] == "Service":  # allocated addresses are immutable: keep them
        kept = {k: existing.get("spec", {})[k] for k in ("clusterIP", "clusterIPs") if k in existing.get("spec", {})}
        body["spec"] = {**desired["spec"], **kept}
    return body


def _status_only(observed: Observed, generation: int, wanted: list[Condition]) -> tuple[Obj, list[Event]]:
    status = observed.body.get("status") or {}
    old = _owned_status(status)
    new = dict(old)
    new["observedGeneration"] = generation
    new["conditions"] = merge_conditions(status.get("conditions"), wanted, generation, observed.now)
    return merge_patch(old, new), _events_for(status.get("conditions"), new["conditions"])


def plan(observed: Observed, config: OperatorConfig) -> Plan:
    """The writes that make one publisher right, in the order of decisions the module names."""
    owner = Owner.from_body(observed.body)
    try:
        validate_name(owner.name)
        spec = parse_spec(observed.body.get("spec"))
        build_deployment(owner, spec, 0, config)  # renders the env with the worker's own validation
    except InvalidSpec as exc:
        return _plan_invalid_spec(observed, exc)
    missing = _missing_secrets(observed, owner, spec)
    if missing:
        return _plan_secrets_missing(observed, owner, spec, missing)
    return _plan_valid(observed, config, owner, spec)


def _generation(observed: Observed) -> int:
    return int(observed.body["metadata"].get("generation") or 0)


def _plan_invalid_spec(observed: Observed, exc: InvalidSpec) -> Plan:
    """1. Ready=False/InvalidSpec naming the field and the fix; no child is touched.

    Workers may run on with the last valid spec, but without a valid one their reports cannot be
    judged (fresh or stale, every partition owned): the queue pressure is unknown, its gauges are
    removed from the totals and Lagging is Unknown, rather than the values of the last valid pass
    shown as current. Gone pods' entries are pruned as in any pass."""
    message = f"{exc.field}: {exc.message}"
    wanted = [
        Condition(c.READY, "False", "InvalidSpec", message),
        Condition(c.DEGRADED, "True", "InvalidSpec", f"no worker changes until the spec is fixed: {message}"),
        Condition(
            c.LAGGING,
            "Unknown",
            "InvalidSpec",
            "the spec is invalid: the workers' reports are not evaluated until it is fixed",
        ),
    ]
    patch, events = _status_only(observed, _generation(observed), wanted)
    status: Mapping[str, Any] = observed.body.get("status") or {}
    stale_gauges = {gauge: None for gauge in PRESSURE_GAUGES if gauge in (status.get("totals") or {})}
    if stale_gauges:
        patch["totals"] = stale_gauges
    gone = gone_workers(status.get("workers") or {}, observed.pods)
    if gone:
        patch["workers"] = {name: None for name in gone}
    return Plan(status_patch=patch, events=events, invalid=exc)


def _missing_secrets(observed: Observed, owner: Owner, spec: PublisherSpec) -> list[tuple[str, str]]:
    """(spec path, message) for each referenced Secret or key that does not exist."""
    missing = []
    for path, name, key in secret_refs(spec):
        keys = observed.secrets.get(name)
        if keys is None:
            missing.append(
                (
                    path,
                    f"Secret {name!r} ({path}) not found in namespace {owner.namespace!r}: "
                    f"create it with the key {key!r}",
                )
            )
        elif key not in keys:
            missing.append((path, f"Secret {name!r} ({path}) has no key {key!r}: add it or set the key"))
    return missing


def _plan_secrets_missing(
    observed: Observed, owner: Owner, spec: PublisherSpec, missing: list[tuple[str, str]]
) -> Plan:
    """2. Ready=False/SecretNotFound (and the database or stream condition it belongs to); retried.

    No child is touched, but workers may run on (a pod resolved its env when it started): their
    reports still reach the totals, the other conditions and the pruning, as in a valid pass, so a
    backlog or dead letters growing meanwhile show, and nothing stays frozen at its last value. The
    worker count and the autoscaler's state stay as the Deployment and the status have them."""
    message = "; ".join(m for _, m in missing)
    overrides = {c.READY: Condition(c.READY, "False", "SecretNotFound", message)}
    db = [m for p, m in missing if p.startswith("spec.database")]
    nats = [m for p, m in missing if p.startswith("spec.nats")]
    if db:
        overrides[c.DATABASE_READY] = Condition(c.DATABASE_READY, "False", "SecretNotFound", "; ".join(db))
    if nats:
        overrides[c.STREAM_READY] = Condition(c.STREAM_READY, "False", "SecretNotFound", "; ".join(nats))
    status: Mapping[str, Any] = observed.body.get("status") or {}
    deployment = observed.children.get(("Deployment", worker_name(owner)))
    asked = int(((deployment or {}).get("spec") or {}).get("replicas") or 0)
    reports, pressure = _reports_and_totals(observed, spec, status)
    workers = WorkerState(reports, pressure, asked, status.get("autoscaler"), None)
    dep_status = (deployment or {}).get("status") or {}
    rollout = Rollout(asked, int(dep_status.get("replicas") or 0), int(dep_status.get("readyReplicas") or 0))
    health = _wanted_conditions(spec, rollout, workers, Conflicts(), observed.now)
    new = _new_status(observed, owner, rollout, workers, [overrides.pop(x.type, x) for x in health])
    patch, events = _status_changes(observed, new)
    return Plan(status_patch=patch, events=events, retry_reason=message)


def last_publish_time(status: Mapping[str, Any], published: int, now: datetime) -> str | None:
    """``now`` when the published total grew since the last pass, else the time kept in status.

    Worker counters start at 0 with each pod, so a total that shrank (a pod replaced) says
    nothing; the time then stays until the total grows again."""
    before = int((status.get("totals") or {}).get("published") or 0)
    if published > before:
        return rfc3339(now)
    kept = status.get("lastPublishTime")
    return str(kept) if kept else None


def secrets_hash(spec: PublisherSpec, versions: Mapping[str, str]) -> str:
    """One digest over the resourceVersions of every Secret the workers use (empty when none is
    known). Any write to such a Secret changes it, and with it the pod template: the workers roll."""
    names = sorted({name for _, name, _ in secret_refs(spec)})
    if not any(name in versions for name in names):
        return ""
    return content_hash({name: versions.get(name, "") for name in names})


def _desired_replicas(
    spec: PublisherSpec, status: Mapping[str, Any], pressure: Mapping[str, Any], now: datetime
) -> tuple[int, Obj | None, Event | None]:
    """Worker count, the new status.autoscaler (None: autoscaling off) and an Event if it scaled."""
    if not spec.autoscaling.enabled:
        return (0 if spec.paused else spec.replicas), None, None
    decision = decide(
        spec.autoscaling,
        spec.partitions,
        status.get("autoscaler"),
        fallback=max(spec.replicas, spec.autoscaling.min_replicas),
        pressure=None if spec.paused or "backlog" not in pressure else pressure,  # unknown: hold
        now=now,
    )
    event = (
        Event("Normal", "Scaled", f"autoscaler set {decision.replicas} workers: {decision.reason}")
        if decision.scaled and not spec.paused
        else None
    )
    return (0 if spec.paused else decision.replicas), decision.state, event


@dataclass(frozen=True)
class WorkerState:
    """What the workers' reports say, read once per pass: the current reports, the totals (with the
    gauges only when known) and the worker count the plan decided on."""

    reports: Mapping[str, Any]
    totals: Obj
    replicas: int
    autoscaler: Obj | None  # the new status.autoscaler; None when autoscaling is off
    scaled: Event | None  # the autoscaler's Event when it changed the count


def _reports_and_totals(observed: Observed, spec: PublisherSpec, status: Mapping[str, Any]) -> tuple[Obj, Obj]:
    """The current workers' reports and ``status.totals`` (the gauges only when known)."""
    interval, now = spec.report_interval_seconds, observed.now
    reports = current_reports(status.get("workers") or {}, observed.pods)
    unknown = pressure_unknown(reports, interval, now, partitions=spec.partitions, paused=spec.paused)
    return dict(reports), totals(reports, interval, now, known=unknown is None)


def _worker_state(observed: Observed, spec: PublisherSpec, status: Mapping[str, Any]) -> WorkerState:
    reports, pressure = _reports_and_totals(observed, spec, status)
    replicas, autoscaler, scaled = _desired_replicas(spec, status, pressure, observed.now)
    return WorkerState(reports, pressure, replicas, autoscaler, scaled)


def _desired_children(
    observed: Observed, config: OperatorConfig, owner: Owner, spec: PublisherSpec, replicas: int
) -> list[Obj]:
    """Every child this publisher should have now (the PDB only for more than one worker)."""
    desired = [
        build_service_account(owner),
        build_role(owner),
        build_role_binding(owner),
        build_metrics_service(owner, spec),
        build_deployment(owner, spec, replicas, config, secrets_hash(spec, observed.secret_versions)),
    ]
    if replicas > 1:
        desired.append(build_pdb(owner))
    return desired


def _child_action(desired: Obj, existing: Mapping[str, Any] | None, replicas: int) -> Action | None:
    """The one write that makes an owned child right: create, replace (its rendered hash differs) or
    a replica patch of the Deployment; None when it already is."""
    key = (desired["kind"], desired["metadata"]["name"])
    if existing is None:
        return Action("create", *key, desired)
    old_hash = (existing["metadata"].get("annotations") or {}).get(c.ANNOTATION_HASH)
    if old_hash != desired["metadata"]["annotations"][c.ANNOTATION_HASH]:
        return Action("replace", *key, _replace_body(desired, existing))
    if key[0] == "Deployment" and existing.get("spec", {}).get("replicas") != replicas:
        return Action("patch", *key, {"spec": {"replicas": replicas}})
    return None


def is_left_by_previous(obj: Mapping[str, Any], owner: Owner) -> bool:
    """Whether ``obj`` is controlled by an earlier OutboxPublisher of the same name (deleted and
    created again): the garbage collector removes it, it needs nobody's action."""
    refs = obj.get("metadata", {}).get("ownerReferences") or []
    return any(
        ref.get("controller")
        and ref.get("kind") == c.KIND
        and ref.get("name") == owner.name
        and ref.get("uid") != owner.uid
        for ref in refs
    )


@dataclass
class Conflicts:
    """Children with our names that are not ours: another's (``foreign``), or left by an earlier
    publisher of the same name until the garbage collector removes them (``previous``)."""

    foreign: list[str] = field(default_factory=list)
    previous: list[str] = field(default_factory=list)


def _child_actions(
    observed: Observed, owner: Owner, desired: list[Obj], replicas: int
) -> tuple[list[Action], Conflicts]:
    """Writes for every child, and the children that exist but are not this publisher's."""
    actions: list[Action] = []
    conflicts = Conflicts()
    for obj in desired:
        key = (obj["kind"], obj["metadata"]["name"])
        existing = observed.children.get(key)
        if existing is not None and not is_controlled_by(existing, owner):
            named = f"{key[0]} {key[1]}"
            (conflicts.previous if is_left_by_previous(existing, owner) else conflicts.foreign).append(named)
            continue
        action = _child_action(obj, existing, replicas)
        if action is not None:
            actions.append(action)
    wanted_keys = {(obj["kind"], obj["metadata"]["name"]) for obj in desired}
    for key, existing in observed.children.items():
        if existing is not None and key not in wanted_keys and is_controlled_by(existing, owner):
            actions.append(Action("delete", *key))
    return actions, conflicts


def _rollout(observed: Observed, owner: Owner, replicas: int, desired: list[Obj]) -> Rollout:
    """The worker pods as the Deployment's status counts them. ``updated`` (pods of the current
    template) is known only when the observed Deployment carries the pod template this pass renders
    (no replace pending) and its controller has observed that generation: until then its counts
    describe an older spec. The API server leaves counts of 0 out of the status."""
    deployment = observed.children.get(("Deployment", worker_name(owner)))
    dep_status = (deployment or {}).get("status") or {}
    wanted = next(obj for obj in desired if obj["kind"] == "Deployment")
    meta = (deployment or {}).get("metadata") or {}
    template_hash = wanted["metadata"]["annotations"][c.ANNOTATION_HASH]
    current = (
        deployment is not None
        and (meta.get("annotations") or {}).get(c.ANNOTATION_HASH) == template_hash
        and int(dep_status.get("observedGeneration") or 0) >= int(meta.get("generation") or 0)
    )
    return Rollout(
        desired=replicas,
        replicas=int(dep_status.get("replicas") or 0),
        ready=int(dep_status.get("readyReplicas") or 0),
        updated=int(dep_status.get("updatedReplicas") or 0) if current else None,
    )


def _wanted_conditions(
    spec: PublisherSpec, rollout: Rollout, workers: WorkerState, conflicts: Conflicts, now: datetime
) -> list[Condition]:
    """The health conditions, with Ready overridden by a name conflict."""
    targets = HealthTargets(
        paused=spec.paused,
        interval=spec.report_interval_seconds,
        partitions=spec.partitions,
        target_lag_seconds=spec.autoscaling.target_lag_seconds,
        stream_name=spec.stream.name,
        duplicate_window_seconds=spec.stream.duplicate_window_seconds,
        duplicate_horizon_seconds=spec.duplicate_horizon_seconds,
    )
    wanted = health_conditions(targets, rollout, workers.reports, now)
    if conflicts.foreign:
        wanted[0] = Condition(
            c.READY,
            "False",
            "NameConflict",
            f"{', '.join(conflicts.foreign)} exist(s) but belong(s) to something else: delete or rename it",
        )
    elif conflicts.previous:
        wanted[0] = Condition(
            c.READY,
            "False",
            "PreviousChildren",
            f"{', '.join(conflicts.previous)} of the deleted OutboxPublisher of the same name still exist(s): the "
            "garbage collector removes them, then this publisher's are created (nothing to do)",
        )
    return wanted


def _new_status(
    observed: Observed, owner: Owner, rollout: Rollout, workers: WorkerState, wanted: list[Condition]
) -> Obj:
    """The owned status keys as they should be now."""
    status: Mapping[str, Any] = observed.body.get("status") or {}
    generation = _generation(observed)
    new: Obj = {
        "observedGeneration": generation,
        "replicas": rollout.replicas,
        "readyReplicas": rollout.ready,
        "desiredReplicas": workers.replicas,
        "readyText": f"{rollout.ready}/{workers.replicas}",
        "selector": selector_string(owner),
        "totals": workers.totals,
        "conditions": merge_conditions(status.get("conditions"), wanted, generation, observed.now),
    }
    if workers.autoscaler is not None:
        new["autoscaler"] = workers.autoscaler
    last_publish = last_publish_time(status, int(workers.totals["published"]), observed.now)
    if last_publish is not None:
        new["lastPublishTime"] = last_publish
    return new


def _plan_valid(observed: Observed, config: OperatorConfig, owner: Owner, spec: PublisherSpec) -> Plan:
    """Children, status and Events for a valid spec whose Secrets exist."""
    status: Mapping[str, Any] = observed.body.get("status") or {}
    workers = _worker_state(observed, spec, status)
    desired = _desired_children(observed, config, owner, spec, workers.replicas)
    actions, conflicts = _child_actions(observed, owner, desired, workers.replicas)
    rollout = _rollout(observed, owner, workers.replicas, desired)
    wanted = _wanted_conditions(spec, rollout, workers, conflicts, observed.now)
    new = _new_status(observed, owner, rollout, workers, wanted)
    status_patch, events = _status_changes(observed, new)
    if workers.scaled is not None:
        events.append(workers.scaled)
    return Plan(actions=actions, status_patch=status_patch, events=events)


def _status_changes(observed: Observed, new: Obj) -> tuple[Obj, list[Event]]:
    """The status patch from the observed status to ``new`` (the owned keys), with the report
    entries of gone pods removed, and the Events of the conditions that flipped."""
    status: Mapping[str, Any] = observed.body.get("status") or {}
    status_patch = merge_patch(_owned_status(status), new)
    gone = gone_workers(status.get("workers") or {}, observed.pods)
    if gone:
        status_patch["workers"] = {name: None for name in gone}
    return status_patch, _events_for(status.get("conditions"), new["conditions"])


def literal_env_values(obj: Mapping[str, Any] | None) -> list[str]:
    """Literal ``value``s of the user's env entries in a child (a Deployment): any may be a secret.

    The operator's own ``OUTBOX_*`` entries are left out: they are rendered from the spec, which holds
    secrets only by reference, and they carry the publisher's name, its table and stream. Redacting
    those made a refusal unreadable (``Deployment <redacted>-relay``); a user entry cannot take such a
    name (:func:`~outbox_operator.spec.is_reserved_env_name`)."""
    template = ((obj or {}).get("spec") or {}).get("template") or {}
    containers = (template.get("spec") or {}).get("containers") or []
    return [
        str(entry["value"])
        for container in containers
        for entry in container.get("env") or []
        if entry.get("value") and not is_reserved_env_name(str(entry.get("name", "")))
    ]


def redact(message: str, sensitive: Iterable[str]) -> str:
    """``message`` without credentials in URLs and without any of the ``sensitive`` strings."""
    for value in sorted(set(sensitive), key=len, reverse=True):
        if len(value) >= 3:
            message = message.replace(value, REDACTED)
    return redact_urls(message)


def plan_child_rejected(observed: Observed, action: Action, api_message: str) -> Plan:
    """The API server refused a child write: say so in Ready (reason ``ChildRejected``) with its
    message, secrets removed, and a Warning Event; plan no other write. Retried with backoff (the
    refusal may be an admission policy or a quota that changes)."""
    generation = int(observed.body["metadata"].get("generation") or 0)
    message = redact(
        f"the API server refused to {action.verb} {action.kind} {action.name}: {api_message}",
        literal_env_values(action.body),
    )
    patch, events = _status_only(
        observed,
        generation,
        [
            Condition(c.READY, "False", "ChildRejected", message),
            Condition(c.DEGRADED, "True", "ChildRejected", f"worker changes are not applied: {message}"),
        ],
    )
    return Plan(status_patch=patch, events=events, retry_reason=message)
