"""Kubernetes manifests, alerts and a Grafana dashboard for serving a model repository on a cluster.

Everything is derived from the repository's own configs: which models exist, which are the
ensembles clients call, how many Python-backend stubs run (the size of /dev/shm), whether any
instance needs a GPU, and which ensembles use Triton's response cache. The PromQL lives in
`tritonkit.promql` so the alerts, the dashboard and the autoscaler share one definition.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml
from tritonclient.grpc import model_config_pb2 as mc

from tritonkit import promql
from tritonkit.errors import InputError
from tritonkit.repository import read_repository
from tritonkit.termination import (
    DRAIN_S,
    EXIT_TIMEOUT_S,
    GATEWAY_GRACE_S,
    READINESS_FAILURES,
    READINESS_PERIOD_S,
    TERMINATION_GRACE_S,
    TRITON_PRESTOP_S,
)
from tritonkit.triton_config import instance_count

# NGC release 24.10 ships tritonserver 2.51, the version tritonkit is tested against.
DEFAULT_TRITON_RELEASE = "24.10"
PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
OBJECT_STORES = ("s3://", "gs://", "as://")
NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
MEMORY_ANNOTATION = "tritonkit.io/memory-basis"  # what the memory request and limit rest on
# The Triton image's unprivileged user (triton-server).
TRITON_UID = 1000


@dataclass(frozen=True)
class K8sOptions:
    name: str = "tritonkit"
    namespace: str | None = None
    image: str | None = None  # default: the image built from the generated Dockerfile
    triton_release: str = DEFAULT_TRITON_RELEASE
    replicas: int = 2
    max_replicas: int | None = None  # default: 4 x replicas
    gpus_per_replica: int | None = None  # default: 1 if any instance group is KIND_GPU, else 0
    model_store: str = "pvc"  # "pvc" or an s3:// gs:// as:// URL Triton reads itself
    storage_size: str = "20Gi"
    cpu: str = "4"
    memory: str | None = None  # default: tritonkit.capacity.replica_memory_limit (measured or predicted + 25%)
    memory_from: str | None = None  # a served copy's memory: Triton's metrics URL or a soak report
    shm_size: str | None = None  # default: from the number of Python-backend instances
    host: str | None = None  # Ingress host; None: any host
    tls_secret: str | None = None
    target_queue_ms: float = 50.0  # the autoscaler's target: average queue time per request
    p99_alert_ms: float = promql.AlertThresholds.p99_ms
    error_ratio_alert: float = promql.AlertThresholds.error_ratio
    queue_alert_ms: float = promql.AlertThresholds.queue_ms
    cache_mb: int = 256
    openai_port: int | None = None  # the OpenAI gateway as a second container of the pod
    openai_cache_url: str | None = None  # the gateway's Redis embedding cache (an existing Redis)
    openai_redis: bool = False  # or a Redis Deployment and Service written beside the manifests

    def check(self) -> K8sOptions:
        if not NAME.match(self.name) or len(self.name) > 40:
            raise InputError(f"--name {self.name!r}: use lower-case letters, digits and '-' (at most 40)")
        if self.replicas < 1:
            raise InputError(f"--replicas must be >= 1, got {self.replicas}")
        if self.max_replicas is not None and self.max_replicas < self.replicas:
            raise InputError(f"--max-replicas {self.max_replicas} is below --replicas {self.replicas}")
        if self.gpus_per_replica is not None and self.gpus_per_replica < 0:
            raise InputError(f"--gpus-per-replica must be >= 0, got {self.gpus_per_replica}")
        if self.model_store != "pvc" and not self.model_store.startswith(OBJECT_STORES):
            raise InputError(
                f"--model-store {self.model_store!r}: use 'pvc' or a URL starting with {', '.join(OBJECT_STORES)}"
            )
        for what, value in (
            ("--target-queue-ms", self.target_queue_ms),
            ("--p99-alert-ms", self.p99_alert_ms),
            ("--queue-alert-ms", self.queue_alert_ms),
        ):
            if value <= 0:
                raise InputError(f"{what} must be > 0, got {value}")
        if not 0 < self.error_ratio_alert < 1:
            raise InputError(f"--error-ratio-alert must be between 0 and 1, got {self.error_ratio_alert}")
        if self.openai_port is not None and (
            not 1024 <= self.openai_port <= 65535 or self.openai_port in PORTS.values()
        ):
            raise InputError(f"--openai-port {self.openai_port}: a free port from 1024 to 65535 (not Triton's)")
        if (self.openai_cache_url or self.openai_redis) and self.openai_port is None:
            raise InputError("--openai-cache-url and --openai-redis configure the gateway: add --openai-port")
        if self.openai_cache_url and self.openai_redis:
            raise InputError(
                "--openai-redis deploys a Redis for the cache; leave out --openai-cache-url (or the other)"
            )
        return self

    @property
    def alert_thresholds(self) -> promql.AlertThresholds:
        return promql.AlertThresholds(self.p99_alert_ms, self.error_ratio_alert, self.queue_alert_ms)

    @property
    def cache_url(self) -> str | None:
        return f"redis://{self.name}-redis:6379/0" if self.openai_redis else self.openai_cache_url


@dataclass(frozen=True)
class RepositoryFacts:
    """What the manifests need to know about a repository."""

    models: tuple[str, ...]
    steps: dict[str, tuple[str, ...]]  # ensemble -> the models it runs
    cached_ensembles: tuple[str, ...]
    python_instances: int
    needs_gpu: bool
    backends: tuple[str, ...] = field(default=())
    memory_basis: str = "given (--memory)"  # what the memory request and limit rest on

    @classmethod
    def read(cls, repository: Path) -> RepositoryFacts:
        configs = read_repository(repository)
        if not configs:
            raise InputError(f"{repository}: no models (no */config.pbtxt)", hint="build one with `tritonkit build`")
        ensembles = [name for name, c in configs.items() if c.platform == "ensemble"]
        python = 0
        gpu = False
        for config in configs.values():
            if config.platform == "ensemble":
                continue
            if config.backend == "python":
                python += instance_count(config)
            gpu |= any(g.kind == mc.ModelInstanceGroup.KIND_GPU for g in config.instance_group)
        return cls(
            models=tuple(sorted(configs)),
            steps={n: tuple(s.model_name for s in configs[n].ensemble_scheduling.step) for n in sorted(ensembles)},
            cached_ensembles=tuple(sorted(n for n in ensembles if configs[n].response_cache.enable)),
            python_instances=python,
            needs_gpu=gpu,
            backends=tuple(sorted({c.backend for c in configs.values() if c.backend})),
        )

    @property
    def ensembles(self) -> tuple[str, ...]:
        return tuple(self.steps)


def shm_size(facts: RepositoryFacts) -> str:
    """/dev/shm for the Python backend: every stub exchanges its tensors through a shared-memory
    region that grows with the batch (a batch of 16 Whisper windows moves ~40 MB of hidden states),
    plus headroom. 256 MiB per Python instance, at least 1 GiB."""
    return f"{max(1024, 256 * facts.python_instances)}Mi"


def _selector(options: K8sOptions) -> dict[str, str]:
    """The label that picks this deployment's pods."""
    return {"app.kubernetes.io/name": options.name}


def _labels(options: K8sOptions) -> dict[str, str]:
    return {**_selector(options), "app.kubernetes.io/part-of": "tritonkit"}


def _metadata(options: K8sOptions, suffix: str = "", **extra) -> dict:
    metadata = {"name": options.name + suffix, "labels": _labels(options), **extra}
    if options.namespace:
        metadata["namespace"] = options.namespace
    return metadata


def image(options: K8sOptions) -> str:
    return options.image or f"tritonkit-tritonserver:{options.triton_release}"


def server_args(options: K8sOptions, facts: RepositoryFacts) -> list[str]:
    repository = "/models" if options.model_store == "pvc" else options.model_store
    args = [
        "tritonserver",
        f"--model-repository={repository}",
        "--model-control-mode=none",
        "--strict-readiness=true",
        "--exit-on-error=true",
        f"--exit-timeout-secs={EXIT_TIMEOUT_S}",
        f"--http-port={PORTS['http']}",
        f"--grpc-port={PORTS['grpc']}",
        f"--metrics-port={PORTS['metrics']}",
        "--allow-metrics=true",
        # p50/p99 per model for the alerts and dashboard (Triton's latency summaries)
        "--metrics-config=summary_latencies=true",
    ]
    if facts.cached_ensembles and options.cache_mb > 0:
        args.append(f"--cache-config=local,size={options.cache_mb * 1024 * 1024}")
    if "dali" in facts.backends:
        args.append("--backend-config=dali,release_after_unload=true")
    return args


def deployment(options: K8sOptions, facts: RepositoryFacts) -> dict:
    gpus = facts.needs_gpu if options.gpus_per_replica is None else options.gpus_per_replica
    gpus = int(gpus)
    resources = {
        "requests": {"cpu": options.cpu, "memory": options.memory},
        "limits": {"cpu": options.cpu, "memory": options.memory},
    }
    if gpus:
        resources["requests"]["nvidia.com/gpu"] = str(gpus)
        resources["limits"]["nvidia.com/gpu"] = str(gpus)
    volumes = [
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": options.shm_size or shm_size(facts)}},
        {"name": "tmp", "emptyDir": {"sizeLimit": "2Gi"}},
    ]
    mounts: list[dict[str, Any]] = [{"name": "dshm", "mountPath": "/dev/shm"}, {"name": "tmp", "mountPath": "/tmp"}]
    env = [
        {"name": "HOME", "value": "/tmp"},
        {"name": "PYTHONDONTWRITEBYTECODE", "value": "1"},  # the model repository is read-only
    ]
    env_from = []
    if options.model_store == "pvc":
        volumes.append(
            {"name": "models", "persistentVolumeClaim": {"claimName": f"{options.name}-models", "readOnly": True}}
        )
        mounts.append({"name": "models", "mountPath": "/models", "readOnly": True})
    else:  # Triton reads the object store itself; credentials from a Secret the user creates
        env_from.append({"secretRef": {"name": f"{options.name}-storage-credentials", "optional": True}})

    def probe(path: str, period: int, failures: int) -> dict:
        return {
            "httpGet": {"path": path, "port": "http"},
            "periodSeconds": period,
            "timeoutSeconds": 5,
            "failureThreshold": failures,
        }

    container = {
        "name": "tritonserver",
        "image": image(options),
        "imagePullPolicy": "IfNotPresent",
        "args": server_args(options, facts),
        "ports": [{"name": name, "containerPort": port, "protocol": "TCP"} for name, port in PORTS.items()],
        "env": env,
        "resources": resources,
        "volumeMounts": mounts,
        # Loading every model can take minutes; liveness waits until startup succeeded.
        "startupProbe": probe("/v2/health/ready", 10, 60),
        "readinessProbe": probe("/v2/health/ready", 5, 3),
        "livenessProbe": probe("/v2/health/live", 10, 3),
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    if env_from:
        container["envFrom"] = env_from
    containers = [container]
    if options.openai_port is not None:
        # tritonserver outlives the gateway's drain, so the requests it still accepts are answered
        # (tritonkit.termination)
        container["lifecycle"] = {"preStop": {"exec": {"command": ["sleep", str(TRITON_PRESTOP_S)]}}}
        containers.append(gateway_container(options))
    selector = _selector(options)
    pod_spec = {
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": TRITON_UID,
            "runAsGroup": TRITON_UID,
            "fsGroup": TRITON_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "terminationGracePeriodSeconds": TERMINATION_GRACE_S,
        "topologySpreadConstraints": [
            {
                "maxSkew": 1,
                "topologyKey": "kubernetes.io/hostname",
                "whenUnsatisfiable": "ScheduleAnyway",
                "labelSelector": {"matchLabels": selector},
            },
        ],
        "containers": containers,
        "volumes": volumes,
    }
    if gpus:
        pod_spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(options, annotations={MEMORY_ANNOTATION: facts.memory_basis}),
        "spec": {
            "replicas": options.replicas,
            "selector": {"matchLabels": selector},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {"labels": _labels(options)},
                "spec": pod_spec,
            },
        },
    }


def gateway_container(options: K8sOptions) -> dict:
    """`tritonkit openai` beside tritonserver in the pod: it reaches Triton on localhost; its
    readiness follows Triton's (/health), its liveness only its own process (a TCP check)."""
    port = options.openai_port
    args = ["tritonkit", "openai", "--triton", f"127.0.0.1:{PORTS['grpc']}", "--host", "0.0.0.0", "--port", str(port)]
    args += ["--drain-seconds", str(DRAIN_S), "--grace-seconds", str(GATEWAY_GRACE_S)]
    if options.cache_url:
        args += ["--cache-url", options.cache_url]
    return {
        "name": "openai-gateway",
        "image": image(options),
        "imagePullPolicy": "IfNotPresent",
        "args": args,
        "ports": [{"name": "openai", "containerPort": port, "protocol": "TCP"}],
        "env": [
            {"name": "HOME", "value": "/tmp"},
            {
                "name": "TRITONKIT_API_KEY",
                "valueFrom": {"secretKeyRef": {"name": f"{options.name}-openai", "key": "api-key", "optional": True}},
            },
        ],
        "resources": {"requests": {"cpu": "500m", "memory": "512Mi"}, "limits": {"cpu": "1", "memory": "1Gi"}},
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
        "readinessProbe": {
            "httpGet": {"path": "/health", "port": "openai"},
            "periodSeconds": READINESS_PERIOD_S,
            "failureThreshold": READINESS_FAILURES,
        },
        "livenessProbe": {"tcpSocket": {"port": "openai"}, "periodSeconds": 10, "failureThreshold": 3},
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }


def redis_manifests(options: K8sOptions) -> list[dict]:
    """A single Redis for the gateway's embedding cache (a cache: no persistence, bounded memory)."""
    labels = {"app.kubernetes.io/name": f"{options.name}-redis", "app.kubernetes.io/part-of": "tritonkit"}
    metadata = {"name": f"{options.name}-redis", "labels": labels}
    return [
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": metadata,
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "securityContext": {
                            "runAsNonRoot": True,
                            "runAsUser": 999,
                            "seccompProfile": {"type": "RuntimeDefault"},
                        },
                        "containers": [
                            {
                                "name": "redis",
                                "image": "redis:7-alpine",
                                "args": [
                                    "--save",
                                    "",
                                    "--appendonly",
                                    "no",
                                    "--maxmemory",
                                    "512mb",
                                    "--maxmemory-policy",
                                    "allkeys-lru",
                                ],
                                "ports": [{"name": "redis", "containerPort": 6379, "protocol": "TCP"}],
                                "resources": {
                                    "requests": {"cpu": "100m", "memory": "600Mi"},
                                    "limits": {"cpu": "500m", "memory": "600Mi"},
                                },
                                "readinessProbe": {"tcpSocket": {"port": "redis"}, "periodSeconds": 5},
                                "securityContext": {
                                    "allowPrivilegeEscalation": False,
                                    "readOnlyRootFilesystem": True,
                                    "capabilities": {"drop": ["ALL"]},
                                },
                            }
                        ],
                    },
                },
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": metadata,
            "spec": {
                "type": "ClusterIP",
                "selector": labels,
                "ports": [{"name": "redis", "port": 6379, "targetPort": "redis", "protocol": "TCP"}],
            },
        },
    ]


def persistent_volume_claim(options: K8sOptions) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _metadata(options, "-models"),
        "spec": {"accessModes": ["ReadOnlyMany"], "resources": {"requests": {"storage": options.storage_size}}},
    }


def service(options: K8sOptions) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(options),
        "spec": {
            "type": "ClusterIP",
            "selector": _selector(options),
            "ports": [
                {"name": "http", "port": PORTS["http"], "targetPort": "http", "protocol": "TCP"},
                {"name": "grpc", "port": PORTS["grpc"], "targetPort": "grpc", "protocol": "TCP", "appProtocol": "grpc"},
                {"name": "metrics", "port": PORTS["metrics"], "targetPort": "metrics", "protocol": "TCP"},
                *(
                    [{"name": "openai", "port": options.openai_port, "targetPort": "openai", "protocol": "TCP"}]
                    if options.openai_port is not None
                    else []
                ),
            ],
        },
    }


def horizontal_pod_autoscaler(options: K8sOptions) -> dict:
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _metadata(options),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": options.name},
            "minReplicas": options.replicas,
            "maxReplicas": options.max_replicas or 4 * options.replicas,
            "metrics": [
                {
                    "type": "Pods",
                    "pods": {
                        "metric": {"name": promql.QUEUE_METRIC},
                        # microseconds of queueing per request, averaged over the pods
                        "target": {"type": "AverageValue", "averageValue": str(int(options.target_queue_ms * 1000))},
                    },
                }
            ],
            "behavior": {
                "scaleUp": {"stabilizationWindowSeconds": 60},
                "scaleDown": {"stabilizationWindowSeconds": 300},
            },
        },
    }


def pod_disruption_budget(options: K8sOptions) -> dict:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(options),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": _selector(options)}},
    }


def service_monitor(options: K8sOptions) -> dict:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": _metadata(options),
        "spec": {
            "selector": {"matchLabels": _selector(options)},
            "endpoints": [{"port": "metrics", "path": "/metrics", "interval": "15s"}],
        },
    }


def prometheus_rule(options: K8sOptions, facts: RepositoryFacts) -> dict:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": _metadata(options),
        "spec": {"groups": [promql.alert_group(options.name, facts.models, facts.steps, options.alert_thresholds)]},
    }


def ingresses(options: K8sOptions, facts: RepositoryFacts) -> list[dict]:
    """One Ingress for HTTP (a route per ensemble) and one for gRPC (one service path: gRPC names the
    model inside the message, so it cannot be routed per model by path). ingress-nginx annotations:
    100 MB bodies (audio, large images) and 300 s timeouts (long transcriptions)."""
    common = {
        "nginx.ingress.kubernetes.io/proxy-body-size": "100m",
        "nginx.ingress.kubernetes.io/proxy-read-timeout": "300",
        "nginx.ingress.kubernetes.io/proxy-send-timeout": "300",
    }

    def backend(port: str) -> dict:
        return {"service": {"name": options.name, "port": {"name": port}}}

    def rule(paths: list[tuple[str, str]]) -> dict:
        entry: dict[str, Any] = {
            "http": {"paths": [{"path": p, "pathType": "Prefix", "backend": backend(port)} for p, port in paths]}
        }
        if options.host:
            entry["host"] = options.host
        return entry

    # Clients call the ensembles; the models inside them stay internal.
    http_paths = [(f"/v2/models/{model}", "http") for model in facts.ensembles] + [("/v2/health", "http")]
    if options.openai_port is not None:
        http_paths.append(("/v1", "openai"))  # the OpenAI API
    http: dict[str, Any] = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": _metadata(options, "-http", annotations=dict(common)),
        "spec": {"ingressClassName": "nginx", "rules": [rule(http_paths)]},
    }
    grpc: dict[str, Any] = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": _metadata(
            options, "-grpc", annotations={**common, "nginx.ingress.kubernetes.io/backend-protocol": "GRPC"}
        ),
        "spec": {"ingressClassName": "nginx", "rules": [rule([("/inference.GRPCInferenceService", "grpc")])]},
    }
    if options.tls_secret:
        hosts = [options.host] if options.host else []
        for ingress in (http, grpc):
            ingress["spec"]["tls"] = [{"secretName": options.tls_secret, **({"hosts": hosts} if hosts else {})}]
    return [http, grpc]


def dockerfile(options: K8sOptions, facts: RepositoryFacts) -> str:
    """The official tritonserver image plus tritonkit, which the repository's Python-backend models import."""
    extra = "gpu" if facts.needs_gpu else "serve"
    return (
        f"# The official Triton image ({options.triton_release}) plus tritonkit and what its Python-backend\n"
        "# models import. Build it from the tritonkit source tree, push it, and pass it to --image:\n"
        "#   docker build -f k8s/Dockerfile -t REGISTRY/tritonkit-tritonserver:TAG .\n"
        f"FROM nvcr.io/nvidia/tritonserver:{options.triton_release}-py3\n"
        "COPY pyproject.toml README.md /opt/tritonkit/\n"
        "COPY tritonkit /opt/tritonkit/tritonkit\n"
        f'RUN pip install --no-cache-dir "/opt/tritonkit[{extra}]"\n'
        f"USER {TRITON_UID}\n"
    )


@dataclass(frozen=True)
class GeneratedFile:
    path: str
    text: str


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data) -> bool:  # shared dicts are written out, not as &anchors
        return True


def _yaml(*documents: dict) -> str:
    return "---\n".join(
        yaml.dump(d, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=1000) for d in documents
    )


def manifests(repository: Path, options: K8sOptions = K8sOptions()) -> list[GeneratedFile]:
    """Every file `tritonkit k8s` writes, in a stable order."""
    options = options.check()
    facts = RepositoryFacts.read(Path(repository))
    if options.memory is None:
        from tritonkit.capacity import replica_memory_limit

        limit, basis = replica_memory_limit(Path(repository), options.memory_from)
        options = replace(options, memory=f"{limit // 2**20}Mi")
        facts = replace(facts, memory_basis=basis)
    resources: list[tuple[str, list[dict]]] = [
        ("deployment.yaml", [deployment(options, facts)]),
        ("service.yaml", [service(options)]),
        ("hpa.yaml", [horizontal_pod_autoscaler(options)]),
        ("pdb.yaml", [pod_disruption_budget(options)]),
        ("servicemonitor.yaml", [service_monitor(options)]),
        ("prometheusrule.yaml", [prometheus_rule(options, facts)]),
        ("ingress.yaml", ingresses(options, facts)),
    ]
    if options.model_store == "pvc":
        resources.insert(1, ("pvc.yaml", [persistent_volume_claim(options)]))
    if options.openai_redis:
        resources.append(("redis.yaml", redis_manifests(options)))
    files = [GeneratedFile(name, _yaml(*docs)) for name, docs in resources]
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [name for name, _ in resources],
    }
    if options.namespace:
        kustomization["namespace"] = options.namespace
    files.append(GeneratedFile("kustomization.yaml", _yaml(kustomization)))
    files.append(GeneratedFile("prometheus-adapter-rules.yaml", _yaml(promql.adapter_values())))
    files.append(
        GeneratedFile(
            "grafana-dashboard.json",
            json.dumps(promql.dashboard(options.name, facts.models, facts.steps), indent=2) + "\n",
        )
    )
    files.append(GeneratedFile("Dockerfile", dockerfile(options, facts)))
    return files


def write_manifests(repository: Path, out: Path, options: K8sOptions = K8sOptions()) -> list[Path]:
    files = manifests(repository, options)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for generated in files:
        path = out / generated.path
        path.write_text(generated.text)
        written.append(path)
    return written
