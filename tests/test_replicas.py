"""Two replicas behind a real haproxy with a real Redis (tritonkit.replicas): a rolling restart, a
replica killed with SIGKILL and a Redis outage, under a steady mixed load of raw HTTP requests
(embeddings, chat, streamed chat) that are never retried by the client; a real Prometheus with the
generated alert rules sees the killed replica and a replica's growing queue."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from tritonkit.promql import AlertThresholds
from tritonkit.replicas import ReplicaSet, metric_sum, summary
from tritonkit.server import free_port

pytestmark = pytest.mark.server


def embed(base_url: str, text: str | list[str]) -> int:
    import json

    body = json.dumps({"model": "clip", "input": text}).encode()
    request = urllib.request.Request(
        f"{base_url}/v1/embeddings", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as answer:
        return answer.status


# The test command runs the replicas with the tiny CLIP (embeddings: each replica loads in seconds);
# with the tiny LLaVA beside it (chat and streamed chat, whose decoders take minutes to load and
# unload on 2 cores) it runs in scripts/heavy_tests.sh.
MIXES = {
    "embeddings": {"embeddings"},
    "embeddings and chat": {"embeddings", "chat", "chat stream"},
}


@pytest.fixture
def mixed_repository(request, tmp_path):
    kinds = MIXES[request.param]
    merged = tmp_path / "model_repository"
    built = [request.getfixturevalue("clip_repository")]
    if "chat" in kinds:
        built.append(request.getfixturevalue("llava_repository"))
    for repository in built:
        for model in repository.iterdir():
            shutil.copytree(model, merged / model.name)
    return merged, kinds


@pytest.mark.parametrize(
    "mixed_repository",
    ["embeddings", pytest.param("embeddings and chat", marks=pytest.mark.heavy)],
    indirect=True,
)
def test_replicas_lose_no_request_through_a_rolling_restart_a_killed_replica_and_a_redis_outage(
    mixed_repository, tmp_path
):
    from tritonkit.replicas import MixedLoad

    repository, kinds = mixed_repository
    # the generated rules, their `for` shortened to 2 s; the queue alert at 4 ms per request (the
    # tiny CLIP's text requests wait ~1 ms on average under 3 concurrent ones)
    alerts = AlertThresholds(queue_ms=4)
    with ReplicaSet(repository, 2, tmp_path / "replicas", alerts=alerts, alert_for_s=2) as replicas:
        began = time.monotonic()
        # the cache is shared: what replica A computed is a hit through replica B
        first, second = (replicas.running[i].slot.gateway_url for i in sorted(replicas.running))
        hits = "tritonkit_gateway_embedding_cache_hits_total"
        before = metric_sum(f"{second}/metrics", hits)
        assert embed(first, "computed by the first replica") == 200
        assert embed(second, "computed by the first replica") == 200
        assert metric_sum(f"{second}/metrics", hits) == before + 1

        # a burst at replica A alone (24 clients of 8 texts each: ~190 requests at its models at
        # once): its queue grows, and the queue alert names it
        with ThreadPoolExecutor(24) as pool:
            texts = ([f"burst {k} {j}" for j in range(8)] for k in range(240))
            assert set(pool.map(lambda batch: embed(first, batch), texts)) == {200}
        prometheus = replicas.prometheus
        prometheus.wait_firing("TritonkitQueueTimeHigh", 30, instance=replicas.running[min(replicas.running)].pod)

        load = MixedLoad(replicas.url, clients=3).start()
        assert set(load.kinds) == kinds
        time.sleep(5)
        rolling = time.monotonic()
        replicas.rolling_restart()  # every replica replaced, the new one ready before the old one goes
        killed = time.monotonic()
        victim = min(replicas.running)
        lost_pod = replicas.running[victim].pod
        replicas.kill(victim)  # a lost node: nothing drained
        prometheus.wait_firing("TritonkitReplicaDown", 30, pod=lost_pod)
        outage = time.monotonic()
        errors = "tritonkit_gateway_embedding_cache_errors_total"
        errors_before = replicas.gateway_total(errors)
        replicas.stop_cache()
        time.sleep(4)
        replicas.start_cache()
        time.sleep(4)
        errors_after = replicas.gateway_total(errors)
        hits_before = replicas.gateway_total(hits)
        time.sleep(3)
        hits_after = replicas.gateway_total(hits)
        outcomes = load.stop()
        # replicas that were terminated left the targets: only the lost one was ever down
        down = {a["pod"] for a in prometheus.fired(began) if a["alertname"] == "TritonkitReplicaDown"}
        assert down == {lost_pod}

    steady, restarted = summary(outcomes, 0, rolling), summary(outcomes, rolling, killed)
    assert steady["failed"] == 0 and restarted["failed"] == 0, (steady, restarted)
    assert restarted["sent"] > 10 and {o.kind for o in outcomes if rolling <= o.began < killed} == set(load.kinds)
    # the killed replica: only requests it held when it died may fail, each with the balancer's 502
    # (retryable: the openai SDK retries it by itself); none that began after it died
    after_kill = summary(outcomes, killed + 0.5, outage)
    lost = [o for o in outcomes if killed <= o.ended and o.began < killed + 0.5 and not o.ok]
    assert after_kill["failed"] == 0, after_kill
    assert all(o.status in (502, 0) or "stream" in o.error for o in lost), lost
    assert len(lost) <= 3  # the clients' requests in flight at most
    # Redis stopped and started again: embeddings kept being answered (uncached, counted), and the
    # cache resumed
    during = summary(outcomes, outage)
    assert during["failed"] == 0 and errors_after > errors_before and hits_after > hits_before, (
        during,
        errors_before,
        errors_after,
    )


def test_a_draining_gateway_answers_not_ready_serves_what_arrives_and_exits_when_done(clip_repository):
    """SIGTERM to `tritonkit serve --openai-port`: the gateway's /health answers 503 at once while
    requests are still answered for its drain, then it stops accepting; serve exits 0 after
    tritonserver, which it stops only after the gateway's drain."""
    from tests.conftest import wait_until_healthy

    port = free_port()
    serve = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tritonkit.cli",
            "serve",
            str(clip_repository),
            "--grpc-port",
            str(free_port()),
            "--http-port",
            str(free_port()),
            "--metrics-port",
            str(free_port()),
            "--openai-port",
            str(port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(base, timeout=300)
        assert embed(base, "before") == 200
        began = time.monotonic()
        serve.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(urllib.error.HTTPError) as health:
            urllib.request.urlopen(f"{base}/health", timeout=5)
        assert health.value.code == 503 and b"draining" in health.value.read()
        answered = 0
        while time.monotonic() - began < 4:  # within the drain (5 s): still answered
            answered += embed(base, f"during the drain {answered}") == 200
        assert answered > 3
        assert serve.wait(timeout=60) == 0
        assert time.monotonic() - began >= 5  # tritonserver was stopped after the drain, not before
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()
