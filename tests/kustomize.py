"""Render the Kustomize trees in manifests/ as ``kubectl apply -k`` would, for tests.

No kustomize binary can be installed here (neither Debian nor PyPI has one), so this
renders the subset of Kustomize the manifests use, and refuses anything else instead
of rendering it wrongly: ``resources`` (files and directories), ``components``
(directories whose kustomization is a ``Component``), and ``patches`` with a
``target`` and an inline JSON 6902 patch (``add``, ``replace``, ``remove``).  As
Kustomize does, it fails on a resource listed twice (same group, kind, namespace and
name) and on a patch whose target matches nothing.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

Obj = dict[str, Any]

_KUSTOMIZATION = ("kustomize.config.k8s.io/v1beta1", "Kustomization")
_COMPONENT = ("kustomize.config.k8s.io/v1alpha1", "Component")
_KNOWN_KEYS = {"apiVersion", "kind", "metadata", "resources", "components", "patches"}


class KustomizeError(AssertionError):
    """The tree uses something this renderer does not do, or is wrong."""


def kustomization(directory: Path) -> Obj:
    path = directory / "kustomization.yaml"
    if not path.is_file():
        raise KustomizeError(f"{directory}: no kustomization.yaml")
    doc = yaml.safe_load(path.read_text())
    if not isinstance(doc, dict):
        raise KustomizeError(f"{path}: not a mapping")
    unknown = set(doc) - _KNOWN_KEYS
    if unknown:
        raise KustomizeError(f"{path}: fields this renderer does not support: {sorted(unknown)}")
    return doc


def files_used(directory: Path) -> set[Path]:
    """Every file a rendering of ``directory`` reads (kustomization files included)."""
    used: set[Path] = set()
    _render(directory.resolve(), used, component=False)
    return used


def render(directory: Path) -> list[Obj]:
    """The objects ``kubectl apply -k directory`` would send."""
    return _render(directory.resolve(), set(), component=False)


def _render(directory: Path, used: set[Path], *, component: bool) -> list[Obj]:
    doc = kustomization(directory)
    used.add(directory / "kustomization.yaml")
    kind = (doc.get("apiVersion"), doc.get("kind"))
    if kind != (_COMPONENT if component else _KUSTOMIZATION):
        want = "a Component" if component else "a Kustomization"
        raise KustomizeError(f"{directory}/kustomization.yaml: {kind} is not {want}")
    out: list[Obj] = []
    for entry in doc.get("resources") or []:
        path = (directory / entry).resolve()
        if path.is_dir():
            out += _render(path, used, component=False)
        elif path.is_file():
            used.add(path)
            for obj in yaml.safe_load_all(path.read_text()):
                if obj is None:
                    continue
                if not isinstance(obj, dict) or "kind" not in obj:
                    raise KustomizeError(f"{path}: a document is not a Kubernetes object")
                out.append(obj)
        else:
            raise KustomizeError(f"{directory}: resource {entry} does not exist")
    for entry in doc.get("components") or []:
        path = (directory / entry).resolve()
        if not path.is_dir():
            raise KustomizeError(f"{directory}: component {entry} is not a directory")
        out += _render(path, used, component=True)
    _no_duplicates(out, directory)
    for patch in doc.get("patches") or []:
        _apply_patch(out, patch, directory)
    return out


def _identity(obj: Obj) -> tuple[str, str, str | None, str]:
    group = str(obj.get("apiVersion", "")).rpartition("/")[0]
    meta = obj.get("metadata") or {}
    return group, str(obj["kind"]), meta.get("namespace"), str(meta.get("name"))


def _no_duplicates(objects: list[Obj], directory: Path) -> None:
    seen: set[tuple[str, str, str | None, str]] = set()
    for obj in objects:
        key = _identity(obj)
        if key in seen:
            raise KustomizeError(f"{directory}: {key} is listed twice")
        seen.add(key)


def _apply_patch(objects: list[Obj], patch: Obj, directory: Path) -> None:
    if set(patch) != {"target", "patch"}:
        raise KustomizeError(f"{directory}: only inline JSON 6902 patches with a target")
    target = patch["target"]
    ops = yaml.safe_load(patch["patch"])
    if not isinstance(ops, list):
        raise KustomizeError(f"{directory}: the patch is not a JSON 6902 list of operations")
    matched = [o for o in objects if _matches(o, target)]
    if not matched:
        raise KustomizeError(f"{directory}: patch target {target} matches nothing")
    for obj in matched:
        for op in ops:
            _operate(obj, op, directory)


def _matches(obj: Obj, target: Obj) -> bool:
    group, _, version = str(obj.get("apiVersion", "")).rpartition("/")
    meta = obj.get("metadata") or {}
    checks = {
        "group": group,
        "version": version,
        "kind": obj.get("kind"),
        "name": meta.get("name"),
        "namespace": meta.get("namespace"),
    }
    unknown = set(target) - set(checks)
    if unknown:
        raise KustomizeError(f"patch target fields not supported: {sorted(unknown)}")
    return all(checks[k] == v for k, v in target.items())


def _operate(obj: Obj, op: Obj, directory: Path) -> None:
    kind, path = op.get("op"), op.get("path")
    if kind not in ("add", "replace", "remove") or not isinstance(path, str):
        raise KustomizeError(f"{directory}: unsupported patch operation {op}")
    parts = [p.replace("~1", "/").replace("~0", "~") for p in path.split("/")[1:]]
    parent: Any = obj
    for part in parts[:-1]:
        parent = parent[int(part)] if isinstance(parent, list) else parent[part]
    last = parts[-1]
    value = copy.deepcopy(op.get("value"))
    if isinstance(parent, list):
        if kind == "add":
            parent.insert(len(parent) if last == "-" else int(last), value)
        elif kind == "replace":
            parent[int(last)] = value
        else:
            del parent[int(last)]
    elif kind == "add":
        parent[last] = value
    else:
        if last not in parent:
            raise KustomizeError(f"{directory}: {kind} of missing {path}")
        if kind == "replace":
            parent[last] = value
        else:
            del parent[last]
