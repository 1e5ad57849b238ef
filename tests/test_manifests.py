"""The deployment manifests and the Dockerfile.

They parse; the Deployment runs flags the real CLI parser accepts; the pod is locked
down; and the RBAC covers every API call the daemon really makes: a healthy rollout
and a rollback run against the Kubernetes API double, and each request the daemon
sends is checked against the rules granted to the Deployment's service account.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import tomllib
from dataclasses import dataclass
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
from tests.test_daemon import Harness, phase

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "manifests"
NAMESPACE = "canaryd"
POD_NAME = "canaryd-7d9f8b6c4-x2x9q"
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}
Obj = dict[str, Any]


def documents(name: str) -> list[Obj]:
    docs = [d for d in yaml.safe_load_all((MANIFESTS / name).read_text()) if d is not None]
    assert docs, f"{name} holds no document"
    for doc in docs:
        assert isinstance(doc, dict), f"{name}: a document is not a mapping"
    return docs


def kustomization() -> Obj:
    (doc,) = documents("kustomization.yaml")
    return doc


def objects() -> list[Obj]:
    """Every object the kustomization installs."""
    return [doc for name in kustomization()["resources"] for doc in documents(name)]


def the(kind: str, name: str) -> Obj:
    found = [o for o in objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"want exactly one {kind} {name}, found {len(found)}"
    return found[0]


def deployment() -> Obj:
    return the("Deployment", "canaryd")


def container() -> Obj:
    (only,) = deployment()["spec"]["template"]["spec"]["containers"]
    assert isinstance(only, dict)
    return only


def argv() -> list[str]:
    """The container's command and args, ``$(VAR)`` expanded as the kubelet does."""
    env: dict[str, str] = {}
    for var in container().get("env", []):
        field = ((var.get("valueFrom") or {}).get("fieldRef") or {}).get("fieldPath")
        env[var["name"]] = POD_NAME if field == "metadata.name" else str(var.get("value", ""))

    def expand(arg: str) -> str:
        def one(match: re.Match[str]) -> str:
            assert match.group(1) in env, f"{arg}: ${match.group(1)} is not in the env"
            return env[match.group(1)]

        return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", one, arg)

    c = container()
    return [expand(str(a)) for a in [*c.get("command", []), *c.get("args", [])]]


def run_args() -> argparse.Namespace:
    """The container's arguments as the real ``canaryd`` parser reads them."""
    command = argv()
    assert command[0] == "canaryd", command
    try:
        return build_parser().parse_args(command[1:])
    except SystemExit as exc:
        code = exc.code
    pytest.fail(f"canaryd rejects the Deployment's arguments {command[1:]} (exit {code})")


# -- the files ---------------------------------------------------------------------------


def test_every_manifest_parses_and_names_itself() -> None:
    files = sorted(MANIFESTS.glob("*.y*ml"))
    assert files
    for path in files:
        for doc in documents(path.name):
            assert isinstance(doc.get("apiVersion"), str) and doc["apiVersion"], path.name
            assert isinstance(doc.get("kind"), str) and doc["kind"], path.name
            name = (doc.get("metadata") or {}).get("name")
            assert isinstance(name, str) and name, f"{path.name}: {doc['kind']} has no name"


def test_the_kustomization_lists_exactly_the_manifests() -> None:
    doc = kustomization()
    assert doc["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert doc["kind"] == "Kustomization"
    resources = doc["resources"]
    assert len(resources) == len(set(resources))
    on_disk = {p.name for p in MANIFESTS.iterdir() if p.suffix in (".yaml", ".yml")}
    assert set(resources) == on_disk - {"kustomization.yaml"}


def test_namespaced_objects_live_in_the_canaryd_namespace() -> None:
    assert the("Namespace", NAMESPACE)
    for obj in objects():
        meta = obj["metadata"]
        if obj["kind"] in CLUSTER_SCOPED:
            assert "namespace" not in meta, f"{obj['kind']} {meta['name']} is cluster-scoped"
        else:
            assert meta.get("namespace") == NAMESPACE, f"{obj['kind']} {meta['name']}"


# -- the Deployment ----------------------------------------------------------------------


def test_the_deployment_runs_canaryd_run_with_flags_the_cli_accepts() -> None:
    args = run_args()
    dep = deployment()
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
    assert pod.get("automountServiceAccountToken", True) is True  # the daemon needs its token
    assert pod["terminationGracePeriodSeconds"] == 30
    labels = dep["spec"]["selector"]["matchLabels"]
    assert labels.items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    c = container()
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


def test_the_dockerfile_builds_the_locked_project_and_runs_it_unprivileged() -> None:
    steps = dockerfile()
    bases = [arg.split()[0] for op, arg in steps if op == "FROM"]
    assert len(bases) == 2 and set(bases) == {"python:3.11-slim"}  # build and runtime
    runs = " ".join(arg for op, arg in steps if op == "RUN")
    assert re.search(r"pip install -c requirements\.lock \.", runs)
    assert "/opt/venv" in runs
    assert any(op == "COPY" and "--from=build /opt/venv" in arg for op, arg in steps)
    assert dockerfile_uid() == 10001
    assert json.loads(next(arg for op, arg in steps if op == "ENTRYPOINT")) == ["canaryd"]
    assert json.loads(next(arg for op, arg in steps if op == "CMD")) == ["run"]
    assert container()["command"] == ["canaryd"]
    # everything the build needs is copied into it, and not ignored
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = [p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]]
    needed = {"pyproject.toml", "requirements.lock", project["project"]["readme"], *packages}
    copied = {
        word.rstrip("/")
        for op, arg in steps
        if op == "COPY" and not arg.startswith("--from")
        for word in arg.split()[:-1]
    }
    assert needed <= copied, needed - copied
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".venv", ".git", "tests", "bench/out"} <= ignored
    assert not needed & ignored


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


def granted_rules(service_account: tuple[str, str]) -> list[tuple[str | None, Obj]]:
    """(namespace the rule applies in, or None for everywhere; the rule) for every rule
    bound to the service account ``(namespace, name)``."""
    everything = objects()
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
def daemon_requests(cluster: KubeApiServer) -> list[RequestRecord]:
    """Every request the daemon sent while it promoted a healthy canary and then rolled
    an error-spike one back, with leader election on as the Deployment runs it."""
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

    async def rollout(scenario: str, revision: str, pod: str, want: str) -> list[RequestRecord]:
        h = Harness(cluster, get_scenario(scenario), lease=lease(pod))
        await h.command(CommandKind.PROMOTE, revision=revision)  # as `canaryd promote` does
        cluster.clear_log()  # from here on only the daemon talks to the API
        async with h:
            await h.until(lambda o: phase(o) == want, timeout_s=30.0)
        return cluster.requests

    log = asyncio.run(rollout("healthy", "v2", "canaryd-a", "Succeeded"))
    log += asyncio.run(rollout("error-spike", "v3", "canaryd-b", "RolledBack"))
    lease_obj = cluster.get(
        "coordination.k8s.io", "v1", "leases", args.lease_namespace, args.lease_name
    )
    assert lease_obj is not None and lease_obj["spec"]["leaseTransitions"] >= 1
    assert not cluster.internal_errors
    return log


def _with_analysis(cluster: KubeApiServer, analysis: Obj) -> Obj:
    obj = cluster.get("canaryd.io", "v1alpha1", "canaries", NS, "checkout")
    assert obj is not None
    obj["spec"]["analysis"] |= analysis
    return obj


def test_the_rbac_covers_every_call_the_daemon_makes(
    daemon_requests: list[RequestRecord],
) -> None:
    wanted = {a for request in daemon_requests for a in accesses(request)}
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
        ("apps", "deployments", "get"),
        ("apps", "deployments", "update"),
        ("", "events", "create"),
        ("coordination.k8s.io", "leases", "create"),
        ("coordination.k8s.io", "leases", "get"),
        ("coordination.k8s.io", "leases", "update"),
    } <= kinds, sorted(kinds)
    service_account = the("ServiceAccount", "canaryd")["metadata"]
    missing = denied(granted_rules((service_account["namespace"], service_account["name"])), wanted)
    assert not missing, "the RBAC does not allow:\n  " + "\n  ".join(map(str, missing))


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
