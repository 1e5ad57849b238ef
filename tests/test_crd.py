"""The CRD: generated from the spec model, structural, and in sync with manifests/."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import yaml

from canaryd.cli import main
from canaryd.crd import crd, crd_yaml, spec_schema

ROOT = Path(__file__).resolve().parent.parent


def test_manifest_is_the_output_of_canaryd_crd() -> None:
    out = io.StringIO()
    assert main(["crd"], out, io.StringIO()) == 0
    assert out.getvalue() == crd_yaml()
    assert (ROOT / "manifests" / "base" / "crd.yaml").read_text() == out.getvalue(), (
        "manifests/base/crd.yaml is stale: run `canaryd crd > manifests/base/crd.yaml`"
    )


def walk(node: Any, path: str = "spec") -> list[str]:
    """Structural-schema violations (apiextensions v1 rules the API server enforces)."""
    problems: list[str] = []
    if not isinstance(node, dict):
        return problems
    if "$ref" in node:
        problems.append(f"{path}: $ref is not allowed")
    if "type" not in node and not (
        node.get("x-kubernetes-int-or-string") or node.get("x-kubernetes-preserve-unknown-fields")
    ):
        problems.append(f"{path}: every node needs a type")
    if "anyOf" in node and not node.get("x-kubernetes-int-or-string"):
        problems.append(f"{path}: anyOf only for int-or-string")
    for key in ("title", "default", "$defs"):
        if key in node:
            problems.append(f"{path}: {key} should not be generated")
    if isinstance(node.get("exclusiveMinimum"), float | int) and not isinstance(
        node.get("exclusiveMinimum"), bool
    ):
        problems.append(f"{path}: exclusiveMinimum must be a boolean in OpenAPI v3")
    for name, sub in node.get("properties", {}).items():
        problems += walk(sub, f"{path}.{name}")
    if "items" in node:
        problems += walk(node["items"], f"{path}[]")
    return problems


def test_spec_schema_is_structural() -> None:
    assert walk(spec_schema()) == []


def test_schema_follows_the_model() -> None:
    schema = spec_schema()
    analysis = schema["properties"]["analysis"]["properties"]
    assert analysis["interval"]["x-kubernetes-int-or-string"] is True
    assert analysis["earlyPassRatio"] == {
        "description": analysis["earlyPassRatio"]["description"],
        "type": "number",
        "minimum": 1,
        "exclusiveMinimum": True,
        "maximum": 100,
        "nullable": True,
    }
    assert analysis["noData"]["properties"]["then"]["enum"] == ["rollback", "pause"]
    assert schema["properties"]["stable"]["properties"]["deployment"]["type"] == "string"
    # a weight or a {weight, mirror} mapping: no structural type says "int or object"
    assert schema["properties"]["steps"]["items"] == {
        "x-kubernetes-preserve-unknown-fields": True,
        "description": "a canary weight (10), or {weight: 0, mirror: {percent: 50}}",
    }


def test_crd_has_status_subresource_and_printer_columns() -> None:
    version = crd()["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]] == [
        "Phase", "Weight", "Step", "Revision", "Age",
    ]  # fmt: skip
    assert yaml.safe_load(crd_yaml())["metadata"]["name"] == "canaries.canaryd.io"
