"""What the API server does with a custom resource before storing it, for tests without one.

* defaulting: structural defaults, applied recursively (a defaulted ``{}`` gets its own defaults),
* pruning: fields the schema does not know are dropped (except under preserve-unknown-fields),
* validation: the OpenAPI v3 schema (types, enums, bounds, patterns, required) with ``jsonschema``,
  then every ``x-kubernetes-validations`` CEL rule with ``celpy``; transition rules (those using
  ``oldSelf``) only on updates, as the API server does.

Error strings look like the API server's: ``<path>: <message>``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import yaml

ROOT = Path(__file__).resolve().parents[2]
CRD_PATH = ROOT / "crds" / "outboxpublisher.yaml"

Schema = dict[str, Any]


def load_crd(path: Path = CRD_PATH) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def schema_of(crd: dict[str, Any]) -> Schema:
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


# --- defaulting and pruning ----------------------------------------------------------------------


def apply_defaults(schema: Schema, value: Any) -> Any:
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        for key, sub in props.items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
        for key, item in value.items():
            if key in props:
                value[key] = apply_defaults(props[key], item)
            elif isinstance(schema.get("additionalProperties"), dict):
                value[key] = apply_defaults(schema["additionalProperties"], item)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [apply_defaults(schema["items"], item) for item in value]
    return value


def prune(schema: Schema, value: Any, top: bool = True) -> Any:
    if isinstance(value, dict):
        if schema.get("x-kubernetes-preserve-unknown-fields"):
            return value
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        out = {}
        for key, item in value.items():
            if top and key in ("apiVersion", "kind", "metadata"):
                out[key] = item
            elif props is not None and key in props:
                out[key] = prune(props[key], item, False)
            elif isinstance(extra, dict):
                out[key] = prune(extra, item, False)
            elif props is None and extra is None and schema.get("type") != "object":
                out[key] = item
        return out
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [prune(schema["items"], item, False) for item in value]
    return value


# --- validation ------------------------------------------------------------------------------------


def _to_jsonschema(schema: Any) -> Any:
    """OpenAPI v3 (as Kubernetes uses it) to draft-4 JSON schema: drop x-kubernetes-* keys."""
    if isinstance(schema, dict):
        out = {k: _to_jsonschema(v) for k, v in schema.items() if not k.startswith("x-kubernetes-")}
        out.pop("format", None)
        if schema.get("x-kubernetes-int-or-string"):
            out.pop("anyOf", None)
            out["type"] = ["integer", "string"]
        if schema.get("nullable"):
            out.pop("nullable", None)
        return out
    if isinstance(schema, list):
        return [_to_jsonschema(v) for v in schema]
    return schema


def _typed(schema: Schema, value: Any) -> Any:
    """JSON numbers in ``type: number`` fields are doubles in Kubernetes CEL, even when integral."""
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        return {
            k: _typed(props[k] if k in props else (extra if isinstance(extra, dict) else {}), v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_typed(schema.get("items") or {}, v) for v in value]
    if schema.get("type") == "number" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


_ENV = celpy.Environment()
_PROGRAMS: dict[str, Any] = {}


def _program(rule: str) -> Any:
    if rule not in _PROGRAMS:
        _PROGRAMS[rule] = _ENV.program(_ENV.compile(rule))
    return _PROGRAMS[rule]


def _cel(schema: Schema, value: Any, old: Any, path: str, errors: list[str]) -> None:
    for rule in schema.get("x-kubernetes-validations") or []:
        transition = "oldSelf" in rule["rule"]
        if transition and old is None:
            continue
        activation = {"self": celpy.json_to_cel(value)}
        if transition:
            activation["oldSelf"] = celpy.json_to_cel(old)
        try:
            result = _program(rule["rule"]).evaluate(activation)
        except Exception as exc:  # an evaluation error rejects, as in the API server
            result = exc
        if result is not True and not (isinstance(result, celpy.celtypes.BoolType) and bool(result)):
            where = path + rule.get("fieldPath", "")
            errors.append(f"{where or '<root>'}: Invalid value: {rule.get('message', rule['rule'])}")
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            sub = props.get(key) or (extra if isinstance(extra, dict) else None)
            if sub:
                old_item = old.get(key) if isinstance(old, dict) else None
                _cel(sub, item, old_item, f"{path}.{key}", errors)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            # list items are correlated with old items only for map lists; no transition rules here
            _cel(schema["items"], item, None, f"{path}[{i}]", errors)


def validate(schema: Schema, obj: dict[str, Any], old: dict[str, Any] | None = None) -> list[str]:
    """Errors of an already defaulted object (empty list: valid)."""
    checker = jsonschema.Draft4Validator(_to_jsonschema(schema))
    errors = []
    for err in sorted(checker.iter_errors(obj), key=lambda e: list(e.absolute_path)):
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err.absolute_path)
        message = err.message
        if err.validator == "required":  # the API server names the missing field itself
            missing = next(name for name in err.validator_value if name not in (err.instance or {}))
            where, message = f"{where}.{missing}", "Required value"
        errors.append(f"{where.lstrip('.') or '<root>'}: {message}")
    if errors:
        return errors
    _cel(schema, _typed(schema, obj), _typed(schema, old) if old is not None else None, "", errors)
    return [e.lstrip(".") for e in errors]


def admit(schema: Schema, obj: dict[str, Any], old: dict[str, Any] | None = None) -> tuple[dict[str, Any], list[str]]:
    """Default, prune and validate like the API server: (stored object, errors)."""
    stored = prune(schema, apply_defaults(schema, copy.deepcopy(obj)))
    return stored, validate(schema, stored, old)
