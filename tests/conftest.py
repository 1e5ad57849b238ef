"""Shared fixtures: the Kubernetes API double and a cluster with one Canary's objects."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s

from kubedouble.apiserver import KubeApiServer

NS = "shop"

VIRTUAL_SERVICE: dict[str, Any] = {
    "apiVersion": "networking.istio.io/v1",
    "kind": "VirtualService",
    "metadata": {"name": "checkout", "namespace": NS},
    "spec": {
        "hosts": ["checkout"],
        "http": [
            {
                "name": "http-primary",
                "retries": {"attempts": 3, "perTryTimeout": "2s", "retryOn": "5xx"},
                "fault": {"delay": {"percentage": {"value": 0.1}, "fixedDelay": "5s"}},
                "route": [
                    {"destination": {"host": "checkout", "subset": "stable"}, "weight": 100},
                    {"destination": {"host": "checkout", "subset": "canary"}, "weight": 0},
                ],
            },
            {
                "name": "admin",
                "match": [{"uri": {"prefix": "/admin"}}],
                "route": [{"destination": {"host": "checkout-admin"}, "weight": 100}],
            },
        ],
    },
}

DESTINATION_RULE: dict[str, Any] = {
    "apiVersion": "networking.istio.io/v1",
    "kind": "DestinationRule",
    "metadata": {"name": "checkout", "namespace": NS},
    "spec": {
        "host": "checkout",
        "subsets": [
            {"name": "stable", "labels": {"track": "stable"}},
            {"name": "canary", "labels": {"track": "canary"}},
        ],
    },
}


def deployment(name: str, image: str, track: str, replicas: int = 2) -> Any:
    """A Deployment manifest (the client takes plain dicts as bodies)."""
    labels = {"app": "checkout", "track": track}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": "app", "image": image}]},
            },
        },
    }


def canary(name: str = "checkout", **analysis: Any) -> dict[str, Any]:
    settings = {
        "interval": "1s",
        "stepDuration": "3s",
        "minStepDuration": "1s",
        "minRequests": 100,
        "noData": {"holdFor": "30s"},
    } | analysis
    return {
        "apiVersion": "canaryd.io/v1alpha1",
        "kind": "Canary",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "service": "checkout",
            "stable": {"deployment": "checkout"},
            "canary": {"deployment": "checkout-canary"},
            "trafficRouting": {
                "istio": {
                    "virtualService": {"name": "checkout", "routes": ["http-primary"]},
                    "destinationRule": {
                        "name": "checkout",
                        "stableSubset": "stable",
                        "canarySubset": "canary",
                    },
                }
            },
            "steps": [10, 50, 100],
            "analysis": settings,
        },
    }


@pytest.fixture
def kubeapi() -> Iterator[KubeApiServer]:
    with KubeApiServer() as server:
        yield server


def populate(server: KubeApiServer, canary_body: dict[str, Any] | None = None) -> None:
    """A VirtualService, DestinationRule, two Deployments and a Canary in ``server``."""
    server.put_raw("networking.istio.io", "v1", "virtualservices", copy.deepcopy(VIRTUAL_SERVICE))
    server.put_raw("networking.istio.io", "v1", "destinationrules", copy.deepcopy(DESTINATION_RULE))
    api = server.api_client()
    try:
        apps = k8s.AppsV1Api(api)
        apps.create_namespaced_deployment(NS, deployment("checkout", "shop/checkout:1", "stable"))
        apps.create_namespaced_deployment(
            NS, deployment("checkout-canary", "shop/checkout:2", "canary", replicas=1)
        )
        k8s.CustomObjectsApi(api).create_namespaced_custom_object(
            "canaryd.io", "v1alpha1", NS, "canaries", canary_body or canary()
        )
    finally:
        api.close()


@pytest.fixture
def cluster(kubeapi: KubeApiServer) -> KubeApiServer:
    """The double with a VirtualService, DestinationRule, two Deployments and a Canary."""
    populate(kubeapi)
    return kubeapi


@pytest.fixture
def kubeconfig(kubeapi: KubeApiServer, tmp_path: Path) -> Path:
    return kubeapi.write_kubeconfig(tmp_path / "kubeconfig", namespace=NS)
