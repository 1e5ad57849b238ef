"""The ``Canary`` CustomResourceDefinition, generated from the pydantic spec model.

One source of truth (design §3): the CRD's OpenAPI v3 schema is derived from
:class:`canaryd.spec.CanarySpec`, turned into a *structural* schema as the API server
requires: ``$ref`` inlined, ``Optional[X]`` as ``X`` with ``nullable: true``,
JSON-Schema-only keywords (``title``, ``default``, ``exclusiveMinimum`` as a number)
rewritten or dropped.  Defaults stay in the model (pydantic applies them), so the API
server stores what users wrote.  ``manifests/base/crd.yaml`` is the output of
``canaryd crd`` and a test fails when the two differ.
"""

from __future__ import annotations

from typing import Any

import yaml

from canaryd.spec import API_GROUP, KIND, CanarySpec

PLURAL = "canaries"
SINGULAR = "canary"
VERSION = "v1alpha1"

_DROP = {"title", "default"}


def _structural(node: Any, defs: dict[str, Any]) -> Any:
    """One JSON-Schema node as a Kubernetes structural-schema node."""
    if isinstance(node, list):
        return [_structural(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return _structural(merged, defs)
    any_of = node.get("anyOf")
    if any_of is not None and not node.get("x-kubernetes-int-or-string"):
        branches = [b for b in any_of if b.get("type") != "null"]
        nullable = len(branches) < len(any_of)
        if len(branches) == 1:
            rest = {k: v for k, v in node.items() if k != "anyOf"}
            single: dict[str, Any] = _structural({**branches[0], **rest}, defs)
            if nullable:
                single["nullable"] = True
            return single
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP:
            continue
        if key in ("exclusiveMinimum", "exclusiveMaximum") and not isinstance(value, bool):
            out[key.replace("exclusiveM", "m")] = value
            out[key] = True
            continue
        if key == "anyOf" and node.get("x-kubernetes-int-or-string"):
            out[key] = [{"type": b["type"]} for b in value]
            continue
        if key == "properties":
            out[key] = {name: _structural(sub, defs) for name, sub in value.items()}
            continue
        out[key] = _structural(value, defs)
    if out.get("type") == "object" and "properties" in out and "additionalProperties" in out:
        del out["additionalProperties"]  # extra="forbid" is enforced by canaryd, not here
    return out


def spec_schema() -> dict[str, Any]:
    """The structural OpenAPI v3 schema of ``spec``."""
    schema = CanarySpec.model_json_schema(by_alias=True)
    defs = schema.pop("$defs", {})
    out: dict[str, Any] = _structural(schema, defs)
    out["description"] = "Canary rollout settings; see `canaryd validate` for checks."
    return out


def crd() -> dict[str, Any]:
    """The whole CustomResourceDefinition as a mapping."""
    columns = [
        ("Phase", "string", ".status.phase", "where the rollout stands"),
        ("Weight", "integer", ".status.canaryWeight", "canary traffic, percent"),
        ("Step", "integer", ".status.stepIndex", "current step (0-based)"),
        ("Revision", "string", ".status.revision", "revision being rolled out"),
    ]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{API_GROUP}"},
        "spec": {
            "group": API_GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "plural": PLURAL,
                "singular": SINGULAR,
                "listKind": f"{KIND}List",
                "shortNames": ["can"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        {"name": n, "type": t, "jsonPath": p, "description": d}
                        for n, t, p, d in columns
                    ]
                    + [{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}],
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec_schema(),
                                "status": {
                                    "type": "object",
                                    "description": "written by canaryd only",
                                    "x-kubernetes-preserve-unknown-fields": True,
                                },
                            },
                            "required": ["spec"],
                        }
                    },
                }
            ],
        },
    }


def crd_yaml() -> str:
    """``canaryd crd``'s output: the CRD as YAML, keys in a stable order."""
    header = "# Generated by `canaryd crd` from canaryd/spec.py: do not edit by hand.\n"
    return header + yaml.safe_dump(crd(), sort_keys=False, allow_unicode=True, width=100)
