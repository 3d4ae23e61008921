"""Several replicas of a repository behind a real load balancer, as Kubernetes would run them, on
one machine: each replica is the pod's two containers as processes (`tritonkit serve` for
tritonserver, `tritonkit openai` for the gateway beside it, with the pod's commands, readiness and
termination timings: tritonkit.termination), haproxy in front routing to the gateways that pass
its health checks (a Service with readiness gating), and one Redis as their shared embedding cache.

The faults a pod's life brings are methods: `rolling_restart` (maxSurge 1, maxUnavailable 0: the
new replica first, ready, then the old one terminated), `kill` (a lost node: SIGKILL, no drain),
`start`/`terminate` one replica, `stop_cache`/`start_cache`. A real Prometheus scrapes every
replica's tritonserver with the alert rules `tritonkit k8s` generates for the repository
(`Prometheus`), so a test sees them fire on the real series. `scripts/replicas.py` drives the faults
under load and writes the figures; tests/test_replicas.py checks that no request is lost.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tritonkit import promql
from tritonkit.errors import TritonkitError
from tritonkit.server import free_port
from tritonkit.termination import (
    DRAIN_S,
    GATEWAY_GRACE_S,
    READINESS_FAILURES,
    READINESS_PERIOD_S,
    TERMINATION_GRACE_S,
    TRITON_PRESTOP_S,
)

DEFAULT_ALERTS = promql.AlertThresholds()
READY_TIMEOUT_S = 600  # a replica loading every model on a busy 2-core machine


@dataclass
class Slot:
    """The ports of one replica's place behind the balancer (fixed, so the balancer's config is)."""

    index: int
    grpc: int = field(default_factory=free_port)
    http: int = field(default_factory=free_port)
    metrics: int = field(default_factory=free_port)
    openai: int = field(default_factory=free_port)

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.openai}"


@dataclass
class Replica:
    """One running pod: tritonserver (under `tritonkit serve`) and its gateway."""

    slot: Slot
    server: subprocess.Popen
    gateway: subprocess.Popen
    pod: str  # its name, as a pod's: Prometheus' `pod` and `instance` labels
    started: float = field(default_factory=time.monotonic)

    def alive(self) -> bool:
        return self.server.poll() is None and self.gateway.poll() is None

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.slot.gateway_url}/health", timeout=2) as answer:
                return answer.status == 200
        except Exception:
            return False

    def terminate(self) -> float:
        """A pod's deletion: SIGTERM to the gateway (it drains), to tritonserver after its preStop
        hook; returns the seconds until both exited (SIGKILL at the grace period, as the kubelet)."""
        began = time.monotonic()
        os.killpg(self.gateway.pid, signal.SIGTERM)
        deadline = began + TERMINATION_GRACE_S
        while time.monotonic() < began + TRITON_PRESTOP_S and self.gateway.poll() is None:
            time.sleep(0.1)
        os.killpg(self.server.pid, signal.SIGTERM)
        try:
            for process in (self.gateway, self.server):
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.kill()  # the grace period is over: what is left is killed, as the kubelet does
        return time.monotonic() - began

    def kill(self) -> None:
        """A lost node: every process of the pod (tritonserver and its stubs included) SIGKILLed,
        nothing drained."""
        from tritonkit.server import process_tree

        pids = [pid for process in (self.gateway, self.server) for pid in process_tree(process.pid)]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for process in (self.gateway, self.server):
            process.wait()


class ReplicaSet:
    """`replicas` replicas of `repository` behind haproxy with a shared Redis; a context manager
    that stops everything on exit. One slot more than the replicas is the rolling update's surge."""

    def __init__(
        self,
        repository: Path,
        replicas: int = 2,
        workdir: Path | None = None,
        log=print,
        alerts: promql.AlertThresholds | None = DEFAULT_ALERTS,
        alert_for_s: float | None = None,
    ):
        """`alerts`: the thresholds of the generated alert rules a Prometheus evaluates on the
        replicas (None: no Prometheus); `alert_for_s`: their `for` shortened to this (None: as
        generated, minutes), so that a short run sees them fire."""
        self.repository = Path(repository)
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="tritonkit-replicas-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.slots = [Slot(i) for i in range(replicas + 1)]
        self.running: dict[int, Replica] = {}
        self.lost: dict[int, Replica] = {}  # killed, not replaced: a pod on a lost node stays a scrape target
        self.started = 0  # replicas started so far: each one's pod name
        self.prometheus = (
            None if alerts is None else Prometheus(self.workdir / "prometheus", self.repository, alerts, alert_for_s)
        )
        self.redis_port, self.balancer_port = free_port(), free_port()
        self.redis: subprocess.Popen | None = None
        self.balancer: subprocess.Popen | None = None
        self.log = log

    @property
    def url(self) -> str:
        """The balancer: what clients call (the Service)."""
        return f"http://127.0.0.1:{self.balancer_port}"

    @property
    def cache_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    # -- lifecycle --------------------------------------------------------------------------
    def __enter__(self) -> ReplicaSet:
        try:
            self.start_cache()
            self._start_balancer()
            if self.prometheus is not None:
                self.prometheus.start()
            for slot in self.slots[:-1]:
                self.start(slot.index, wait=False)
            self.wait_ready(list(self.running))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for replica in list(self.running.values()):
            replica.kill()
        self.running.clear()
        for process in (self.balancer, self.redis):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
        if self.prometheus is not None:
            self.prometheus.close()

    def _scraped(self) -> None:
        if self.prometheus is not None:
            pods = {**self.running, **self.lost}
            self.prometheus.scrape({pods[i].pod: self.slots[i] for i in pods})

    # -- replicas ---------------------------------------------------------------------------
    def start(self, index: int, wait: bool = True) -> Replica:
        """Start a replica in slot `index` (its gateway answers 503 until tritonserver is ready)."""
        if index in self.running:
            raise TritonkitError(f"slot {index} already runs a replica")
        slot = self.slots[index]
        logs = self.workdir / f"slot{index}"
        logs.mkdir(exist_ok=True)
        command = [sys.executable, "-m", "tritonkit.cli"]
        server = subprocess.Popen(
            [
                *command,
                "serve",
                str(self.repository),
                "--grpc-port",
                str(slot.grpc),
                "--http-port",
                str(slot.http),
                "--metrics-port",
                str(slot.metrics),
                "--log-file",
                str(logs / "tritonserver.log"),
                "--ready-timeout",
                str(READY_TIMEOUT_S),
            ],
            stdout=(logs / "serve.out").open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        gateway = subprocess.Popen(
            [
                *command,
                "openai",
                "--triton",
                f"127.0.0.1:{slot.grpc}",
                "--port",
                str(slot.openai),
                "--cache-url",
                self.cache_url,
                "--drain-seconds",
                str(DRAIN_S),
                "--grace-seconds",
                str(GATEWAY_GRACE_S),
            ],
            stdout=(logs / "gateway.out").open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.started += 1
        replica = Replica(slot, server, gateway, pod=f"replica{index}-{self.started}")
        self.running[index] = replica
        self.lost.pop(index, None)
        self._scraped()
        self.log(f"replica {index}: starting (gateway :{slot.openai}, grpc :{slot.grpc})")
        if wait:
            self.wait_ready([index])
        return replica

    def wait_ready(self, indexes: list[int], timeout: float = READY_TIMEOUT_S) -> None:
        """Until every replica's gateway passes the balancer's checks (two in a row)."""
        deadline = time.monotonic() + timeout
        waiting = set(indexes)
        while waiting:
            for index in sorted(waiting):
                replica = self.running[index]
                if not replica.alive():
                    raise TritonkitError(f"replica {index} exited while starting (logs: {self.workdir}/slot{index})")
                if replica.ready():
                    waiting.discard(index)
                    self.log(f"replica {index}: ready after {time.monotonic() - replica.started:.0f} s")
            if time.monotonic() > deadline:
                raise TritonkitError(f"replicas {sorted(waiting)} not ready within {timeout:.0f} s")
            time.sleep(0.5)
        time.sleep(READINESS_PERIOD_S + 0.5)  # the balancer's next check

    def terminate(self, index: int) -> float:
        replica = self.running.pop(index)
        self._scraped()  # a deleted pod leaves the Service's endpoints, and so Prometheus' targets
        seconds = replica.terminate()
        self.log(f"replica {index}: terminated in {seconds:.1f} s")
        return seconds

    def kill(self, index: int) -> None:
        replica = self.running.pop(index)
        replica.kill()
        self.lost[index] = replica
        self.log(f"replica {index}: killed")

    def rolling_restart(self) -> None:
        """Every replica replaced, one at a time, as a Deployment's rolling update with maxSurge 1
        and maxUnavailable 0 does it: the new one ready first, then the old one terminated."""
        for index in sorted(self.running):
            free = next(s.index for s in self.slots if s.index not in self.running)
            self.start(free)
            self.terminate(index)

    def gateway_total(self, name: str) -> float:
        """A gateway metric's samples (`name` as exported, e.g. `..._total`) summed over the running
        replicas."""
        return sum(metric_sum(f"{r.slot.gateway_url}/metrics", name) for r in self.running.values())

    # -- the shared cache -------------------------------------------------------------------
    def start_cache(self) -> None:
        self.redis = subprocess.Popen(
            ["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_for_port(self.redis_port, 30, "redis-server")

    def stop_cache(self) -> None:
        if self.redis is not None:
            self.redis.kill()
            self.redis.wait()
            self.redis = None

    # -- the balancer -----------------------------------------------------------------------
    def _start_balancer(self) -> None:
        config = self.workdir / "haproxy.cfg"
        config.write_text(haproxy_config(self.balancer_port, [s.openai for s in self.slots]))
        self.balancer = subprocess.Popen(
            ["haproxy", "-db", "-f", str(config)],
            stdout=(self.workdir / "haproxy.out").open("ab"),
            stderr=subprocess.STDOUT,
        )
        _wait_for_port(self.balancer_port, 30, "haproxy")


class Prometheus:
    """A real Prometheus scraping the replicas' tritonserver metrics every second, job `tritonkit`
    (the manifests' ServiceMonitor's), one target per pod labelled `pod`, with the alert rules
    `tritonkit k8s` writes for the repository loaded and evaluated every second."""

    JOB = "tritonkit"

    def __init__(
        self, workdir: Path, repository: Path, thresholds: promql.AlertThresholds, alert_for_s: float | None = None
    ):
        import shutil

        binary = shutil.which("prometheus")
        if binary is None:
            raise TritonkitError("prometheus is not installed: apt-get install prometheus (or pass alerts=None)")
        self.binary = binary
        self.workdir = Path(workdir)
        self.repository = repository
        self.thresholds = thresholds
        self.alert_for_s = alert_for_s
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def rules(self) -> dict:
        from tritonkit.k8s import RepositoryFacts

        facts = RepositoryFacts.read(self.repository)
        group = promql.alert_group(self.JOB, facts.models, facts.steps, self.thresholds)
        if self.alert_for_s is not None:
            for rule in group["rules"]:
                rule["for"] = f"{self.alert_for_s:g}s"
        return {"groups": [group]}

    def start(self) -> None:
        import yaml

        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "rules.yaml").write_text(yaml.safe_dump(self.rules(), sort_keys=False))
        self.scrape({})
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(self.workdir / "rules.yaml")],
            "scrape_configs": [
                {
                    "job_name": self.JOB,
                    "file_sd_configs": [{"files": [str(self.workdir / "targets.json")], "refresh_interval": "1s"}],
                }
            ],
        }
        (self.workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.process = subprocess.Popen(
            [
                self.binary,
                f"--config.file={self.workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=(self.workdir / "prometheus.out").open("ab"),
            stderr=subprocess.STDOUT,
        )
        _wait_for_port(self.port, 60, "prometheus")

    def scrape(self, slots: dict[str, Slot]) -> None:
        """Scrape exactly these pods' tritonservers (written atomically; Prometheus watches the file).
        Each is its own `instance`, as a new pod has a new address: a replica started again on a
        slot's ports is not the one that was there."""
        import json

        targets = [
            {"targets": [f"127.0.0.1:{slot.metrics}"], "labels": {"pod": pod, "instance": pod}}
            for pod, slot in sorted(slots.items())
        ]
        staged = self.workdir / "targets.json.tmp"
        staged.write_text(json.dumps(targets))
        staged.replace(self.workdir / "targets.json")

    def query(self, expr: str) -> list[dict]:
        import json
        import urllib.parse

        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=10) as answer:
            return json.loads(answer.read())["data"]["result"]

    def firing(self) -> list[dict]:
        """The labels of the alerts firing now (the alerts API)."""
        import json

        with urllib.request.urlopen(f"{self.url}/api/v1/alerts", timeout=10) as answer:
            alerts = json.loads(answer.read())["data"]["alerts"]
        return [a["labels"] for a in alerts if a["state"] == "firing"]

    def fired(self, since: float) -> list[dict]:
        """The labels of every alert that fired since `since` (time.monotonic()), from the ALERTS series."""
        seconds = max(1, int(time.monotonic() - since) + 1)
        found = self.query(f'max_over_time(ALERTS{{alertstate="firing"}}[{seconds}s])')
        return [{k: v for k, v in r["metric"].items() if k not in ("__name__", "alertstate")} for r in found]

    def wait_firing(self, alertname: str, timeout: float, **labels: str) -> dict:
        """The first firing alert `alertname` whose labels include `labels`, within `timeout` s."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for alert in self.firing():
                if alert.get("alertname") == alertname and all(alert.get(k) == v for k, v in labels.items()):
                    return alert
            time.sleep(0.5)
        raise TritonkitError(f"{alertname} {labels} did not fire within {timeout:g} s (firing: {self.firing()})")

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def metric_sum(url: str, name: str) -> float:
    """The sum of the samples named `name` at a Prometheus /metrics URL (0 if it has none)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=10) as answer:
        text = answer.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    )


def haproxy_config(port: int, gateway_ports: list[int]) -> str:
    """haproxy in front of the gateways as a Service with readiness gating routes: only to those
    whose /health passes; a connection refused or closed before an answer is tried on another
    replica (the request never reached a model)."""
    check = f"check inter {READINESS_PERIOD_S * 1000} fall {READINESS_FAILURES} rise 1"
    servers = "\n".join(f"    server replica{i} 127.0.0.1:{p} {check}" for i, p in enumerate(gateway_ports))
    return f"""global
    maxconn 1024
    # a request is retried on another replica only if it fits the buffer (uploads included)
    tune.bufsize 1048576
    log stdout format raw local0 info

defaults
    mode http
    log global
    option httplog
    timeout connect 2s
    timeout client 300s
    timeout server 300s
    retries 3
    option redispatch 1
    retry-on conn-failure empty-response
    option http-buffer-request

frontend api
    bind 127.0.0.1:{port}
    default_backend gateways

backend gateways
    balance leastconn
    option httpchk GET /health
    http-check expect status 200
{servers}
"""


def _wait_for_port(port: int, timeout: float, what: str) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TritonkitError(f"{what} did not listen on port {port} within {timeout:.0f} s")


@dataclass
class Outcome:
    kind: str
    began: float
    ended: float
    status: int  # the HTTP status; 0: no answer (the connection failed)
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200 and not self.error


class MixedLoad:
    """Requests of every kind the balancer's models serve, from `clients` threads, each one request
    at a time, until stopped: embeddings (a text, an image), a transcription, a chat answer and a
    streamed one (each stream read to its end). Raw HTTP without retries: every failure counts."""

    def __init__(self, base_url: str, clients: int = 4):
        self.base_url = base_url
        self.clients = clients
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.kinds = self._requests()

    def _requests(self) -> dict[str, dict]:
        import base64
        import io
        import json

        import numpy as np

        with urllib.request.urlopen(f"{self.base_url}/v1/models", timeout=30) as answer:
            served = {m["kind"]: m["id"] for m in json.loads(answer.read())["data"]}
        from tritonkit.calibration import synthetic_photo

        image = "data:image/jpeg;base64," + base64.b64encode(synthetic_photo(1, 96, 128)).decode()
        kinds: dict[str, dict] = {}
        if "embeddings" in served:
            kinds["embeddings"] = {
                "path": "/v1/embeddings",
                "json": {"model": served["embeddings"], "input": [image, "a cat"]},
            }
        if "transcription" in served:
            import soundfile

            buffer = io.BytesIO()
            tone = 0.1 * np.sin(np.linspace(0, 2000, 16000 * 2)).astype(np.float32)
            soundfile.write(buffer, tone, 16000, format="WAV")
            kinds["transcription"] = {
                "path": "/v1/audio/transcriptions",
                "files": {"file": ("tone.wav", buffer.getvalue(), "audio/wav")},
                "data": {"model": served["transcription"]},
            }
        if "chat" in served:
            messages = [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is it?"},
                        {"type": "image_url", "image_url": {"url": image}},
                    ],
                }
            ]
            body = {"model": served["chat"], "messages": messages, "max_tokens": 16}
            kinds["chat"] = {"path": "/v1/chat/completions", "json": body}
            kinds["chat stream"] = {"path": "/v1/chat/completions", "json": {**body, "stream": True}, "stream": True}
        return kinds

    def start(self) -> MixedLoad:
        for k in range(self.clients):
            thread = threading.Thread(target=self._client, args=(k,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> list[Outcome]:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=TERMINATION_GRACE_S + 60)
        return self.outcomes

    def _client(self, k: int) -> None:
        import httpx

        names = sorted(self.kinds)
        with httpx.Client(base_url=self.base_url, timeout=120) as client:
            turn = k
            while not self._stop.is_set():
                kind = names[turn % len(names)]
                turn += 1
                self.outcomes.append(self._one(client, kind))

    def _one(self, client, kind: str) -> Outcome:
        import httpx

        request = self.kinds[kind]
        began = time.monotonic()
        try:
            if request.get("stream"):
                with client.stream("POST", request["path"], json=request["json"]) as answer:
                    text = "".join(answer.iter_text())
                    error = "" if answer.status_code != 200 or "data: [DONE]" in text else "the stream ended early"
                    if '"error"' in text:
                        error = "an error event in the stream"
                    return Outcome(kind, began, time.monotonic(), answer.status_code, error)
            answer = client.post(
                request["path"], json=request.get("json"), files=request.get("files"), data=request.get("data")
            )
            error = "" if answer.status_code == 200 else answer.text[:200]
            return Outcome(kind, began, time.monotonic(), answer.status_code, error)
        except httpx.HTTPError as exc:
            return Outcome(kind, began, time.monotonic(), 0, f"{type(exc).__name__}: {exc}"[:200])


def summary(outcomes: list[Outcome], since: float = 0.0, until: float = float("inf"), by: str = "began") -> dict:
    """Requests sent, succeeded and failed (with their errors) between two moments, and the p99.
    `by` "ended" counts a request in the span it ended in: one in flight when a fault begins at
    the span's start (a replica killed) is that fault's, not the span's before."""
    import numpy as np

    chosen = [o for o in outcomes if since <= getattr(o, by) < until]
    latencies = [o.ended - o.began for o in chosen if o.ok]
    failed = [o for o in chosen if not o.ok]
    return {
        "sent": len(chosen),
        "succeeded": len(chosen) - len(failed),
        "failed": len(failed),
        "errors": sorted({f"{o.kind}: {o.status} {o.error}"[:160] for o in failed}),
        "p99_s": round(float(np.percentile(latencies, 99)), 3) if latencies else None,
    }
