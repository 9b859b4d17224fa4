"""Offline validation helpers for the deployment artifacts under deploy/.

Nothing here needs a network, a Kubernetes cluster, Docker or the database:

* built-in Kubernetes kinds are checked against the OpenAPI-derived JSON
  schemas bundled with ``kubernetes-validate`` (strict: unknown fields fail),
  for Kubernetes 1.30 and for the newest version the package has schemas of;
* CRD kinds (KEDA, Prometheus Operator) are checked with the pydantic models
  of ``cloudcoil-models-keda`` / ``cloudcoil-models-prometheus-operator``.
  Those models silently *ignore* unknown keys, so a strict validation is
  followed by a round-trip: every key and value of the input must survive
  ``model_dump``; a dropped key means the model does not know the field;
* the Helm chart is rendered and linted (``helm lint --strict``, which
  enforces values.schema.json) with ``helm-python-sdk``, which embeds Helm's
  Go SDK as a shared library (no ``helm`` binary, no download);
* the Grafana dashboard is decoded with ``grafana-foundation-sdk``'s
  ``Dashboard.from_json`` and re-encoded; keys it does not know are dropped
  by the decoder, which the round-trip comparison reveals.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import helm_python
import kubernetes_validate
import yaml
from cloudcoil.models.keda.v1alpha1 import ScaledObject, TriggerAuthentication
from cloudcoil.models.prometheus_operator.v1 import PrometheusRule, ServiceMonitor
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.cog.plugins import register_default_plugins
from grafana_foundation_sdk.models.dashboard import Dashboard
from kubernetes_validate.utils import ValidationError as K8sSchemaError
from pydantic import ValidationError as PydanticValidationError

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S_DIR = DEPLOY / "k8s"
CHART_DIR = DEPLOY / "helm" / "pgflow"
RULES_FILE = DEPLOY / "prometheus" / "rules.yml"
RULES_TEST_FILE = DEPLOY / "prometheus" / "rules_test.yml"
DASHBOARD_FILE = DEPLOY / "grafana" / "pgflow.json"
DOCKERFILE = REPO / "Dockerfile"
MULTI_QUEUE_VALUES = REPO / "tests" / "data" / "values-multi-queue.yaml"
ALL_FEATURES_VALUES = REPO / "tests" / "data" / "values-all-features.yaml"
QUEUE_MIGRATION = REPO / "src" / "pgflow" / "sql" / "schema" / "04_queues.sql"

# Kubernetes versions every manifest must be valid for: 1.30, and the newest
# one whose schemas the installed kubernetes-validate ships (read from the
# package, so a newer release of it moves the check forward by itself).
OLDEST_K8S_VERSION = "1.30.0"
NEWEST_K8S_VERSION = kubernetes_validate.latest_version()
K8S_VERSIONS = tuple(dict.fromkeys((OLDEST_K8S_VERSION, NEWEST_K8S_VERSION)))

HOOK = "helm.sh/hook"
HOOK_WEIGHT = "helm.sh/hook-weight"
HOOK_DELETE_POLICY = "helm.sh/hook-delete-policy"

CRD_MODELS: dict[tuple[str, str], Any] = {
    ("keda.sh/v1alpha1", "ScaledObject"): ScaledObject,
    ("keda.sh/v1alpha1", "TriggerAuthentication"): TriggerAuthentication,
    ("monitoring.coreos.com/v1", "ServiceMonitor"): ServiceMonitor,
    ("monitoring.coreos.com/v1", "PrometheusRule"): PrometheusRule,
}

# Metric names the engine exposes (see src/pgflow). Histograms also expose
# the _bucket/_sum/_count series.
COUNTERS = {
    "pgflow_steps_started_total",
    "pgflow_steps_completed_total",
    "pgflow_steps_failed_total",
    "pgflow_steps_retried_total",
    "pgflow_queue_messages_total",
    "pgflow_instances_finished_total",
    "pgflow_dead_letters_total",
    "pgflow_worker_restarts_total",
}
HISTOGRAMS = {"pgflow_step_duration_seconds", "pgflow_instance_duration_seconds", "pgflow_task_queue_wait_seconds",
              "pgflow_coordinator_round_seconds"}
GAUGES = {
    "pgflow_steps_in_flight",
    "pgflow_worker_processes_alive",
    "pgflow_instances",
    "pgflow_queue_depth",
    "pgflow_queue_oldest_message_age_seconds",
    "pgflow_dead_letters_stored",
    "pgflow_wakeups_due",
    "pgflow_wakeup_lag_seconds",
    "pgflow_build_info",
}
KNOWN_SERIES = COUNTERS | GAUGES | {f"{h}{suffix}" for h in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")}

DEPTH_QUERY_RE = re.compile(r"^SELECT pgflow\.queue_backlog\('([a-z][a-z0-9_]*)'\)$")


class ManifestInvalid(AssertionError):
    """A manifest failed validation."""


# --------------------------------------------------------------------------- YAML


def load_documents(text: str) -> list[dict[str, Any]]:
    """All non-empty YAML documents of ``text``."""
    return [doc for doc in yaml.safe_load_all(text) if doc]


def k8s_manifest_files() -> list[Path]:
    """The plain manifests (everything in deploy/k8s but the kustomization)."""
    return sorted(p for p in K8S_DIR.glob("*.yaml") if p.name != "kustomization.yaml")


def load_k8s_objects(files: Iterable[Path] | None = None) -> list[dict[str, Any]]:
    objects: list[dict[str, Any]] = []
    for path in files if files is not None else k8s_manifest_files():
        objects.extend(load_documents(path.read_text()))
    return objects


def obj_id(obj: dict[str, Any]) -> str:
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


def find(objects: Iterable[dict[str, Any]], kind: str, labels: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Objects of ``kind`` whose metadata labels include ``labels``."""
    found = []
    for obj in objects:
        if obj.get("kind") != kind:
            continue
        have = obj.get("metadata", {}).get("labels", {}) or {}
        if all(have.get(k) == v for k, v in (labels or {}).items()):
            found.append(obj)
    return found


def by_name(objects: Iterable[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [o for o in objects if o.get("kind") == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected exactly one {kind}/{name}, found {len(matches)}"
    return matches[0]


# --------------------------------------------------------------------------- validation


def subset_diff(expected: Any, actual: Any, path: str = "$") -> list[str]:
    """Where ``expected`` is not contained in ``actual``.

    Dicts: every key of ``expected`` must be in ``actual`` (extra keys in
    ``actual`` are allowed: decoders add defaults) with a matching value.
    Lists must have the same length and match item by item. Scalars must be
    equal (int/float interchangeable, bool kept distinct).
    """
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return [f"{path}: expected an object, got {type(actual).__name__}"]
        problems: list[str] = []
        for key, value in expected.items():
            if key not in actual:
                problems.append(f"{path}.{key}: dropped (unknown to the model)")
            else:
                problems.extend(subset_diff(value, actual[key], f"{path}.{key}"))
        return problems
    if isinstance(expected, list):
        if not isinstance(actual, list) or len(actual) != len(expected):
            return [f"{path}: list changed: {expected!r} -> {actual!r}"]
        problems = []
        for index, (exp, act) in enumerate(zip(expected, actual, strict=True)):
            problems.extend(subset_diff(exp, act, f"{path}[{index}]"))
        return problems
    numeric = (int, float)
    same_type = type(expected) is type(actual) or (
        isinstance(expected, numeric)
        and isinstance(actual, numeric)
        and not isinstance(expected, bool)
        and not isinstance(actual, bool)
    )
    if not same_type or expected != actual:
        return [f"{path}: {expected!r} -> {actual!r}"]
    return []


def validate_crd(obj: dict[str, Any]) -> None:
    """Validate a CRD object with its cloudcoil pydantic model, strictly."""
    model = CRD_MODELS[(obj["apiVersion"], obj["kind"])]
    try:
        # JSON mode + strict: no type coercion ("5" is not an int), enum and
        # literal fields take their wire (string) form.
        parsed = model.model_validate_json(json.dumps(obj), strict=True)
    except PydanticValidationError as exc:
        raise ManifestInvalid(f"{obj_id(obj)}: {exc}") from exc
    dumped = parsed.model_dump(by_alias=True, exclude_unset=True, mode="json")
    problems = subset_diff(obj, dumped)
    if problems:
        raise ManifestInvalid(f"{obj_id(obj)}: " + "; ".join(problems))


def validate_builtin_at(obj: dict[str, Any], version: str) -> str:
    """Validate a built-in kind against kubernetes-validate's strict schema of
    Kubernetes ``version``; return the version whose schema was used."""
    try:
        return kubernetes_validate.validate(obj, version, strict=True)
    except K8sSchemaError as exc:
        where = "/".join(str(p) for p in exc.path)
        raise ManifestInvalid(f"{obj_id(obj)} (Kubernetes {version}): {where}: {exc.message}") from exc


def validate_builtin(obj: dict[str, Any]) -> None:
    """Validate a built-in kind for every version of K8S_VERSIONS."""
    for version in K8S_VERSIONS:
        validate_builtin_at(obj, version)


def validate_object(obj: dict[str, Any]) -> None:
    """Validate one Kubernetes object (built-in or CRD kind); raise ManifestInvalid."""
    if not isinstance(obj, dict) or "apiVersion" not in obj or "kind" not in obj:
        raise ManifestInvalid(f"not a Kubernetes object: {obj!r:.200}")
    if (obj["apiVersion"], obj["kind"]) in CRD_MODELS:
        validate_crd(obj)
    else:
        validate_builtin(obj)


# --------------------------------------------------------------------------- Helm


def load_values_file(path: Path) -> dict[str, Any]:
    return helm_python.values_from_yaml(path.read_text())


def render_chart_raw(
    values: dict[str, Any] | None = None, *, release: str = "pgflow", namespace: str = "pgflow"
) -> dict[str, str]:
    """Template path -> rendered text (``helm template``, offline)."""
    with helm_python.Chart.load(CHART_DIR) as chart:
        return chart.render(values, name=release, namespace=namespace, is_install=True)


def render_chart(
    values: dict[str, Any] | None = None, *, release: str = "pgflow", namespace: str = "pgflow"
) -> list[dict[str, Any]]:
    """Every object the chart renders with ``values``."""
    rendered = render_chart_raw(values, release=release, namespace=namespace)
    objects: list[dict[str, Any]] = []
    for template, text in sorted(rendered.items()):
        if template.endswith(".txt"):  # NOTES.txt
            continue
        objects.extend(load_documents(text))
    return objects


def lint_chart(values: dict[str, Any] | None, kube_version: str) -> dict[str, Any]:
    """``helm lint --strict --kube-version`` of the chart: a report whose
    ``errors`` include every value values.schema.json rejects."""
    return helm_python.lint(CHART_DIR, values, strict=True, kube_version=f"v{kube_version}")


def hook_events(obj: dict[str, Any]) -> set[str]:
    """The Helm hook events of ``obj`` (empty for an ordinary release object)."""
    value = obj["metadata"].get("annotations", {}).get(HOOK, "")
    return {event.strip() for event in value.split(",") if event.strip()}


def hook_weight(obj: dict[str, Any]) -> int:
    return int(obj["metadata"].get("annotations", {}).get(HOOK_WEIGHT, "0"))


def pod_references(obj: dict[str, Any]) -> set[tuple[str, str]]:
    """(kind, name) of the ServiceAccount, Secrets and ConfigMaps a pod template
    needs before its containers can start."""
    spec = pod_spec(obj)
    refs = {("ServiceAccount", spec.get("serviceAccountName", "default"))}
    for volume in spec.get("volumes", []):
        if "secret" in volume:
            refs.add(("Secret", volume["secret"]["secretName"]))
        if "configMap" in volume:
            refs.add(("ConfigMap", volume["configMap"]["name"]))
    for container in spec.get("initContainers", []) + spec["containers"]:
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                refs.add(("ConfigMap", source["configMapRef"]["name"]))
            if "secretRef" in source:
                refs.add(("Secret", source["secretRef"]["name"]))
        for env in container.get("env", []):
            value_from = env.get("valueFrom", {})
            if "secretKeyRef" in value_from:
                refs.add(("Secret", value_from["secretKeyRef"]["name"]))
            if "configMapKeyRef" in value_from:
                refs.add(("ConfigMap", value_from["configMapKeyRef"]["name"]))
    return refs


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def chart_schema() -> dict[str, Any]:
    return json.loads((CHART_DIR / "values.schema.json").read_text())


def schema_node(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    """``node`` with a local ``$ref`` (``#/definitions/x``) resolved."""
    while "$ref" in node:
        target: Any = schema
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


# --------------------------------------------------------------------------- pods


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    """The pod spec of a Pod, or the pod template's of a workload (Deployment, Job)."""
    return obj["spec"] if obj["kind"] == "Pod" else obj["spec"]["template"]["spec"]


def only_container(obj: dict[str, Any]) -> dict[str, Any]:
    containers = pod_spec(obj)["containers"]
    assert len(containers) == 1, f"{obj_id(obj)}: expected one container"
    return containers[0]


def arg_value(args: list[str], flag: str) -> str:
    assert flag in args, f"{flag} missing from {args}"
    return args[args.index(flag) + 1]


def probe_port(container: dict[str, Any], probe: str) -> tuple[str, int]:
    """(path, resolved container port number) of an httpGet probe."""
    http = container[probe]["httpGet"]
    port = http["port"]
    if isinstance(port, str):
        numbers = [p["containerPort"] for p in container.get("ports", []) if p.get("name") == port]
        assert numbers, f"probe port name {port!r} not declared by the container"
        port = numbers[0]
    return http["path"], port


# --------------------------------------------------------------------------- metrics


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bpgflow_[a-z0-9_]+", expr))


def unknown_metrics(exprs: Iterable[str]) -> set[str]:
    names: set[str] = set()
    for expr in exprs:
        names |= metric_names(expr)
    return names - KNOWN_SERIES


# --------------------------------------------------------------------------- Grafana


def dashboard_roundtrip(data: dict[str, Any]) -> dict[str, Any]:
    """Decode with the SDK's Dashboard model and encode back to plain JSON."""
    register_default_plugins()  # typed decoders for prometheus targets, panel options
    model = Dashboard.from_json(json.loads(json.dumps(data)))
    return json.loads(json.dumps(model, cls=JSONEncoder))


def iter_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels", []))


# --------------------------------------------------------------------------- tools


def find_tool(name: str) -> str | None:
    """A console script of this venv (even when it is not on PATH), or PATH."""
    beside_python = Path(sys.executable).parent / name
    if beside_python.exists():
        return str(beside_python)
    return shutil.which(name)
