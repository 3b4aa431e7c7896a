"""Shared pieces of the offline cluster-config tests.

* ``offline`` (autouse): every test here runs with outbound sockets and DNS refused, so a
  validation step that tried to reach a cloud API (boto3, googleapiclient, kubectl) fails the
  test instead of silently touching the network.
* ``crd_validator(kind, strict)``: a ``jsonschema`` validator for a KubeRay CRD's
  ``openAPIV3Schema`` (the KubeRay v1.7.0 CRDs in ``../shared/kuberay/``), with the Kubernetes
  extensions rewritten as that folder's README describes (int-or-string, nullable,
  preserve-unknown-fields; ``strict`` rejects unknown/misspelled fields like
  ``kubectl --validate=strict``).
* ``load`` / ``cluster_yaml``: parsed YAML of the files under ``clusters/``.
"""

from __future__ import annotations

import copy
import functools
import json
import socket
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import SHARED  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CLUSTERS = REPO / "clusters"
LAUNCHER_YAMLS = ["aws.yaml", "gcp.yaml"]
KUBERAY_YAMLS = {"RayCluster": "kuberay/raycluster.yaml", "RayJob": "kuberay/rayjob.yaml",
                 "RayService": "kuberay/rayservice.yaml"}
# The project pins Python 3.11 (constraints.txt); every image must carry the same tag.
PY_TAG = "py311"


def _kuberay_dir() -> Path:
    for cand in (SHARED / "kuberay", REPO / "shared" / "kuberay", REPO.parent / "shared" / "kuberay"):
        if (cand / "raycluster.v1.schema.json").exists():
            return cand
    pytest.fail("KubeRay CRD schemas not found: expected shared/kuberay/ next to the repo "
                "(see ../shared/kuberay/README.md)")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Refuse every outbound connection and name lookup for the duration of a test."""

    def refuse(*args: Any, **kwargs: Any):
        raise AssertionError(f"network access attempted during an offline test: {args[:2]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def k8s_fix(s: Any, strict: bool = False) -> Any:
    """Make a CRD openAPIV3Schema node understandable to plain JSON Schema (in place)."""
    if not isinstance(s, dict):
        return s
    if s.get("x-kubernetes-int-or-string"):            # IntOrString / Quantity
        s.pop("type", None)
        s.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if s.pop("nullable", False) and isinstance(s.get("type"), str):
        s["type"] = [s["type"], "null"]
    if s.get("x-kubernetes-preserve-unknown-fields"):  # free-form object
        s["additionalProperties"] = True
    elif strict and "properties" in s:                 # reject unknown / misspelled fields
        s.setdefault("additionalProperties", False)
    for p in s.get("properties", {}).values():
        k8s_fix(p, strict)
    for k in ("items", "additionalProperties", "not"):
        k8s_fix(s.get(k), strict)
    for k in ("anyOf", "allOf", "oneOf"):
        for x in s.get(k, []):
            k8s_fix(x, strict)
    return s


@functools.lru_cache(maxsize=None)
def _raw_crd_schema(kind: str) -> str:
    return (_kuberay_dir() / f"{kind.lower()}.v1.schema.json").read_text()


@functools.lru_cache(maxsize=None)
def crd_validator(kind: str, strict: bool = True):
    import jsonschema

    schema = k8s_fix(json.loads(_raw_crd_schema(kind)), strict)
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def crd_errors(doc: dict, strict: bool = True) -> list[str]:
    """Every schema violation of a KubeRay CR as 'dotted.path: message' (empty = valid)."""
    v = crd_validator(doc["kind"], strict)
    return sorted(".".join(map(str, e.absolute_path)) + ": " + e.message
                  for e in v.iter_errors(doc))


@functools.lru_cache(maxsize=None)
def _load_text(rel: str) -> str:
    return (CLUSTERS / rel).read_text()


def load(rel: str) -> dict:
    """A fresh (mutable) parse of clusters/<rel>."""
    return yaml.safe_load(_load_text(rel))


def fresh(doc: dict) -> dict:
    return copy.deepcopy(doc)
