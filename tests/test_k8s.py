"""`tritonkit k8s`: manifests checked against the Kubernetes and prometheus-operator schemas offline,
every PromQL expression through promtool, and the expressions evaluated by a real Prometheus
scraping a real tritonserver."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import encode_image, random_image
from tritonkit import promql
from tritonkit.families import family_names
from tritonkit.k8s import K8sOptions, RepositoryFacts, manifests

ROOT = Path(__file__).resolve().parent.parent
KUBERNETES_VERSION = "1.30"
# What the checked-in k8s/ folder was generated with (README, docs/DEPLOY.md).
CHECKED_IN_ARGS: list[str] = []


@pytest.fixture(scope="session")
def demo_repository(clip_repository, whisper_repository, tmp_path_factory) -> Path:
    """The README demo's repository: the CLIP and Whisper builds side by side."""
    out = tmp_path_factory.mktemp("demo") / "model_repository"
    for source in (clip_repository, whisper_repository):
        for model in source.iterdir():
            if (model / "config.pbtxt").is_file():
                shutil.copytree(model, out / model.name, ignore=shutil.ignore_patterns("__pycache__"))
    return out


def documents(files) -> list[dict]:
    return [
        doc
        for f in files
        if f.path.endswith(".yaml") and f.path != "prometheus-adapter-rules.yaml"
        for doc in yaml.safe_load_all(f.text)
        if doc
    ]


def validate(resource: dict) -> None:
    """Built-in kinds against Kubernetes' OpenAPI schemas; prometheus-operator kinds against the
    models generated from its CRDs (unknown fields must not be dropped silently)."""
    if resource["apiVersion"].startswith("monitoring.coreos.com/"):
        from cloudcoil.models.prometheus_operator import v1

        model = getattr(v1, resource["kind"]).model_validate(resource)
        assert model.model_dump(by_alias=True, exclude_none=True, mode="json") == resource
    elif resource["apiVersion"].startswith("kustomize.config.k8s.io/"):
        assert set(resource) == {"apiVersion", "kind", "resources"} | ({"namespace"} & set(resource))
    else:
        import kubernetes_validate

        kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize(
    "options",
    [
        K8sOptions(),
        K8sOptions(
            name="speech",
            namespace="ml",
            replicas=3,
            gpus_per_replica=2,
            model_store="s3://bucket/models",
            host="infer.example.com",
            tls_secret="infer-tls",
            image="registry.local/tk:1",
        ),
        K8sOptions(openai_port=9000, openai_redis=True),
    ],
    ids=["defaults", "gpu-s3-tls", "openai-gateway-redis"],
)
def test_every_manifest_validates_against_the_schemas(demo_repository, options):
    files = manifests(demo_repository, options)
    resources = documents(files)
    kinds = sorted(r["kind"] for r in resources)
    expected = [
        "Deployment",
        "HorizontalPodAutoscaler",
        "Ingress",
        "Ingress",
        "Kustomization",
        "PodDisruptionBudget",
        "PrometheusRule",
        "Service",
        "ServiceMonitor",
    ]
    if options.model_store == "pvc":
        expected.append("PersistentVolumeClaim")
    if options.openai_redis:
        expected += ["Deployment", "Service"]  # the gateway's Redis
    assert kinds == sorted(expected)
    for resource in resources:
        validate(resource)
    kustomization = next(r for r in resources if r["kind"] == "Kustomization")
    assert sorted(kustomization["resources"]) == sorted(
        f.path
        for f in files
        if f.path.endswith(".yaml") and f.path not in ("kustomization.yaml", "prometheus-adapter-rules.yaml")
    )


@pytest.mark.parametrize("family", family_names())
def test_the_manifests_of_every_family_validate(family, family_repository):
    repository = family_repository(family)
    resources = documents(manifests(repository))
    for resource in resources:
        validate(resource)
    http = next(d for d in resources if d["kind"] == "Ingress")
    routed = {p["path"] for p in http["spec"]["rules"][0]["http"]["paths"]}
    assert {f"/v2/models/{e}" for e in RepositoryFacts.read(repository).ensembles} <= routed


def test_the_openai_gateway_runs_beside_tritonserver_with_its_route_and_cache(demo_repository):
    resources = documents(manifests(demo_repository, K8sOptions(name="tk", openai_port=9000, openai_redis=True)))
    deployment = next(d for d in resources if d["kind"] == "Deployment" and d["metadata"]["name"] == "tk")
    server, gateway = deployment["spec"]["template"]["spec"]["containers"]
    assert server["name"] == "tritonserver" and gateway["name"] == "openai-gateway"
    assert gateway["args"] == [
        "tritonkit",
        "openai",
        "--triton",
        "127.0.0.1:8001",
        "--host",
        "0.0.0.0",
        "--port",
        "9000",
        "--drain-seconds",
        "5",
        "--grace-seconds",
        "30",
        "--cache-url",
        "redis://tk-redis:6379/0",
    ]
    assert gateway["readinessProbe"]["httpGet"] == {"path": "/health", "port": "openai"}
    # the draining gateway is out of the Service before its drain ends (the replicas harness's
    # haproxy checks with the same period and failures)
    readiness = gateway["readinessProbe"]
    assert readiness["periodSeconds"] * readiness["failureThreshold"] < 5
    # a pod's termination (tritonkit.termination): the gateway drains 5 s, tritonserver's SIGTERM
    # comes 7 s in (its preStop), and the grace period covers both
    assert server["lifecycle"] == {"preStop": {"exec": {"command": ["sleep", "7"]}}}
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 45
    key = next(e for e in gateway["env"] if e["name"] == "TRITONKIT_API_KEY")
    assert key["valueFrom"]["secretKeyRef"] == {"name": "tk-openai", "key": "api-key", "optional": True}
    service = next(d for d in resources if d["kind"] == "Service" and d["metadata"]["name"] == "tk")
    assert {"name": "openai", "port": 9000, "targetPort": "openai", "protocol": "TCP"} in service["spec"]["ports"]
    http = next(d for d in resources if d["kind"] == "Ingress" and d["metadata"]["name"].endswith("-http"))
    assert "/v1" in [p["path"] for p in http["spec"]["rules"][0]["http"]["paths"]]
    redis = next(d for d in resources if d["kind"] == "Service" and d["metadata"]["name"] == "tk-redis")
    assert redis["spec"]["ports"][0]["port"] == 6379


def test_a_schema_violation_is_caught(demo_repository):
    import kubernetes_validate

    deployment = documents(manifests(demo_repository))[0]
    deployment["spec"]["template"]["spec"]["containers"][0]["resources"]["limit"] = {}  # typo of "limits"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)


def test_deployment_follows_the_repository_and_options(demo_repository):
    facts = RepositoryFacts.read(demo_repository)
    assert facts.ensembles == ("clip_image", "clip_text", "whisper", "whisper_stream")
    assert not facts.needs_gpu and facts.python_instances == 10  # Whisper: 6 models (two decoders) and its VAD

    def deployment(**options):
        return next(
            d for d in documents(manifests(demo_repository, K8sOptions(**options))) if d["kind"] == "Deployment"
        )

    pod = deployment()["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["args"][0] == "tritonserver" and "--model-repository=/models" in container["args"]
    assert "--model-control-mode=none" in container["args"]
    assert "--metrics-config=summary_latencies=true" in container["args"]
    assert f"--cache-config=local,size={256 * 1024 * 1024}" in container["args"]  # the CLIP ensembles use the cache
    assert "nvidia.com/gpu" not in container["resources"]["limits"]
    assert next(v for v in pod["volumes"] if v["name"] == "dshm")["emptyDir"] == {
        "medium": "Memory",
        "sizeLimit": f"{10 * 256}Mi",  # 256 MiB per Python-backend instance
    }
    assert container["securityContext"]["readOnlyRootFilesystem"] and pod["securityContext"]["runAsNonRoot"]
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert {p: container[p]["httpGet"]["path"] for p in ("startupProbe", "readinessProbe", "livenessProbe")} == {
        "startupProbe": "/v2/health/ready",
        "readinessProbe": "/v2/health/ready",
        "livenessProbe": "/v2/health/live",
    }
    assert pod["topologySpreadConstraints"][0]["topologyKey"] == "kubernetes.io/hostname"

    gpu = deployment(gpus_per_replica=2, model_store="gs://bucket/repo")["spec"]["template"]["spec"]
    assert gpu["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert "--model-repository=gs://bucket/repo" in gpu["containers"][0]["args"]
    assert not any("persistentVolumeClaim" in v for v in gpu["volumes"])
    assert gpu["containers"][0]["envFrom"] == [
        {"secretRef": {"name": "tritonkit-storage-credentials", "optional": True}}
    ]


def test_ingress_routes_each_ensemble_and_allows_large_slow_requests(demo_repository):
    http, grpc = [d for d in documents(manifests(demo_repository)) if d["kind"] == "Ingress"]
    paths = [p["path"] for p in http["spec"]["rules"][0]["http"]["paths"]]
    assert paths == [
        "/v2/models/clip_image",
        "/v2/models/clip_text",
        "/v2/models/whisper",
        "/v2/models/whisper_stream",
        "/v2/health",
    ]
    for ingress in (http, grpc):
        annotations = ingress["metadata"]["annotations"]
        assert annotations["nginx.ingress.kubernetes.io/proxy-body-size"] == "100m"
        assert annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"] == "300"
    assert grpc["metadata"]["annotations"]["nginx.ingress.kubernetes.io/backend-protocol"] == "GRPC"


def test_autoscaler_targets_the_metric_the_adapter_rule_defines(demo_repository):
    files = {f.path: f.text for f in manifests(demo_repository, K8sOptions(target_queue_ms=20))}
    hpa = yaml.safe_load(files["hpa.yaml"])
    adapter = yaml.safe_load(files["prometheus-adapter-rules.yaml"])
    (rule,) = adapter["rules"]["custom"]
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == rule["name"]["as"] == promql.QUEUE_METRIC
    assert hpa["spec"]["metrics"][0]["pods"]["target"]["averageValue"] == "20000"  # microseconds
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 8)


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is missing: scripts/setup.sh installs it (apt-get install prometheus)")
    return path


def test_every_promql_expression_parses_with_promtool(demo_repository, tmp_path):
    files = {f.path: f.text for f in manifests(demo_repository)}
    rule = yaml.safe_load(files["prometheusrule.yaml"])
    (tmp_path / "alerts.yaml").write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    facts = RepositoryFacts.read(demo_repository)
    recorded = [
        {"record": f"tritonkit:check_{i}", "expr": expr}
        for i, (_, expr) in enumerate(promql.expressions("tritonkit", facts.models, facts.steps))
    ]
    dashboard = json.loads(files["grafana-dashboard.json"])
    recorded += [{"record": f"tritonkit:panel_{p['id']}", "expr": p["targets"][0]["expr"]} for p in dashboard["panels"]]
    (tmp_path / "expressions.yaml").write_text(yaml.safe_dump({"groups": [{"name": "check", "rules": recorded}]}))
    result = subprocess.run(
        [promtool(), "check", "rules", str(tmp_path / "alerts.yaml"), str(tmp_path / "expressions.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rule['spec']['groups'][0]['rules'])} rules found" in result.stdout
    # and a broken expression is rejected, so the check has teeth
    (tmp_path / "broken.yaml").write_text(
        yaml.safe_dump(
            {
                "groups": [
                    {"name": "b", "rules": [{"record": "x", "expr": "sum by (model) (rate(nv_inference_count[5m])"}]}
                ]
            }
        )
    )
    broken = subprocess.run(
        [promtool(), "check", "rules", str(tmp_path / "broken.yaml")], capture_output=True, text=True
    )
    assert broken.returncode != 0


def test_memory_comes_from_the_plan_or_from_a_measurement_with_its_margin(demo_repository, tmp_path):
    """Without --memory: the plan's host memory (fitted to measurements) + 25%, or what a served
    copy measured (--memory-from a soak report), each rounded up to 256 MiB and named in an annotation."""
    from tritonkit.capacity import make_plan
    from tritonkit.k8s import MEMORY_ANNOTATION

    def deployment(**options):
        return next(
            d for d in documents(manifests(demo_repository, K8sOptions(**options))) if d["kind"] == "Deployment"
        )

    def memory_mib(resource) -> int:
        limits = resource["spec"]["template"]["spec"]["containers"][0]["resources"]
        assert limits["requests"]["memory"] == limits["limits"]["memory"]
        return int(limits["limits"]["memory"].removesuffix("Mi"))

    predicted = make_plan(demo_repository).host_bytes / 2**20
    planned = deployment()
    assert memory_mib(planned) == -(-predicted * 1.25 // 256) * 256
    assert planned["metadata"]["annotations"][MEMORY_ANNOTATION].startswith("predicted by tritonkit plan")
    report = tmp_path / "soak.json"
    report.write_text(
        json.dumps({"rss_mb_settled": {"tritonserver": 300.0, "clip_image_encoder": 700.0, "gateway": 50}})
    )
    measured = deployment(memory_from=str(report))
    assert memory_mib(measured) == 1280  # (300 + 700) x 1.25 = 1250, rounded up to 5 x 256 (the gateway not counted)
    assert measured["metadata"]["annotations"][MEMORY_ANNOTATION].startswith(f"measured ({report})")
    given = deployment(memory="6Gi")
    assert given["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"] == "6Gi"
    assert given["metadata"]["annotations"][MEMORY_ANNOTATION] == "given (--memory)"


def test_checked_in_k8s_folder_is_what_the_generator_writes_for_the_demo_repository(demo_repository, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "tritonkit.cli", "k8s", str(demo_repository), "--out", str(tmp_path), *CHECKED_IN_ARGS],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    generated = sorted(p.name for p in tmp_path.iterdir())
    if os.environ.get("TRITONKIT_REGENERATE_K8S"):  # after a change to what the demo builds
        for name in generated:
            shutil.copy(tmp_path / name, ROOT / "k8s" / name)
    for name in generated:
        assert (ROOT / "k8s" / name).read_text() == (tmp_path / name).read_text(), (
            f"k8s/{name} is stale: regenerate with `TRITONKIT_REGENERATE_K8S=1 pytest tests/test_k8s.py -k checked_in`"
        )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--name", "Bad_Name"], "--name 'Bad_Name': use lower-case letters"),
        (["--model-store", "ftp://x"], "--model-store 'ftp://x': use 'pvc' or a URL"),
        (["--replicas", "0"], "--replicas must be >= 1"),
    ],
)
def test_bad_options_fail_with_one_line(demo_repository, tmp_path, args, message):
    result = subprocess.run(
        [sys.executable, "-m", "tritonkit.cli", "k8s", str(demo_repository), "--out", str(tmp_path), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not list(tmp_path.iterdir())


# -- the expressions against real data ------------------------------------------------------------
def query(prometheus_url: str, expr: str) -> list:
    url = f"{prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    answer = json.loads(urllib.request.urlopen(url, timeout=10).read())
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def wait_for_last_scrape(prometheus_url: str, metrics_url: str, timeout: float = 60) -> None:
    """Poll until Prometheus holds the server's current request count (the traffic has stopped)."""
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    (expected,) = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith('nv_inference_request_success{model="clip_image"')
    ]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = query(prometheus_url, 'nv_inference_request_success{model="clip_image"}')
        if result and float(result[0]["value"][1]) == expected:
            return
        time.sleep(0.25)
    raise AssertionError(f"Prometheus did not scrape the last count ({expected:g}) within {timeout:g} s")


@pytest.mark.server
def test_a_real_prometheus_scraping_tritonserver_answers_the_dashboard_and_alerts(clip_repository, tmp_path):
    from tests.conftest import free_port, start_server
    from tritonkit.client import TritonkitClient, pack_byte_rows
    from tritonkit.errors import InferenceError

    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.fail("prometheus is missing: scripts/setup.sh installs it (apt-get install prometheus)")
    server = start_server(clip_repository, response_cache_bytes=16 * 2**20)
    port = free_port()
    (tmp_path / "prometheus.yml").write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "scrape_configs": [
                    {"job_name": "tritonkit", "static_configs": [{"targets": [f"127.0.0.1:{server.metrics_port}"]}]}
                ],
            }
        )
    )
    scraper = subprocess.Popen(
        [
            prometheus,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        image = encode_image(random_image(64, 64, seed=1), "JPEG")
        began = time.monotonic()
        with TritonkitClient(server.grpc_url) as client:
            while time.monotonic() - began < 12:  # traffic across several scrapes
                client.embed_images(
                    [image, encode_image(random_image(64, 64, seed=int(time.monotonic() * 1000)), "PNG")]
                )
                client.embed_texts(["a cat"])
                with pytest.raises(InferenceError):
                    client.infer("clip_image", {"IMAGE": pack_byte_rows([b"%PDF-1.4 not an image"])})
                time.sleep(0.2)
        wait_for_last_scrape(url, server.metrics_url)
        facts = RepositoryFacts.read(clip_repository)
        no_data = {
            "GPU utilisation",
            "GPU memory used",
            "Tokens generated per second (tritonkit)",
        }  # no GPU, no decoder
        for title, expr, _, _ in promql.dashboard_panels(facts.models, facts.steps):
            result = query(url, expr)
            assert (not result) if title in no_data else result, f"{title}: {expr} -> {result}"
            if title == "Response cache hit ratio":
                assert max(float(r["value"][1]) for r in result) > 0.5  # the same JPEG again and again
        rules = {
            (r["alert"], r["labels"].get("model")): r["expr"]
            for r in promql.alert_group(
                "tritonkit",
                (*facts.models, "not_served"),
                facts.steps,
                promql.AlertThresholds(p99_ms=0, error_ratio=0.01, queue_ms=60_000),
            )["rules"]
        }
        assert {r["metric"]["model"] for r in query(url, rules["TritonkitP99LatencyHigh", None])} == {
            "clip_image",
            "clip_text",
        }
        firing = {r["metric"]["model"] for r in query(url, rules["TritonkitErrorRatioHigh", None])}
        assert firing == {"clip_image"}  # the PDFs; clip_text has no failures
        assert not query(url, rules["TritonkitReplicaDown", None])
        assert not query(url, rules["TritonkitQueueTimeHigh", None])  # a minute per request: never here
        waits = {r["metric"]["model"]: float(r["value"][1]) for r in query(url, promql.queue_ms_per_request())}
        assert {"clip_image_encoder", "clip_text_encoder"} <= set(waits) and all(np.isfinite(list(waits.values())))
        assert not query(url, rules["TritonkitModelNotReady", "clip_image"])
        assert query(url, rules["TritonkitModelNotReady", "not_served"])
        adapter = promql.adapter_values()["rules"]["custom"][0]["metricsQuery"]
        per_pod = adapter.replace("<<.LabelMatchers>>", 'job="tritonkit"').replace("<<.GroupBy>>", "instance")
        assert np.isfinite(float(query(url, per_pod)[0]["value"][1]))
    finally:
        scraper.terminate()
        scraper.wait(timeout=30)
        server.stop()
