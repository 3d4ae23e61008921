#!/usr/bin/env python
"""Replicas behind haproxy under a steady mixed load, through the faults a pod's life brings.

    python scripts/replicas.py --repository demo/model_repository --replicas 3 --duration 600 \
        --json replicas.json --markdown docs/RELIABILITY.md

Runs tritonkit.replicas.ReplicaSet (each replica: `tritonkit serve` + `tritonkit openai` with the
pod's termination timings; haproxy with health checks in front; one Redis as the shared cache) and
sends embeddings, transcriptions, chat and streamed chat through the balancer with raw HTTP (no
retries, so every failure counts), while it: waits (steady), restarts every replica one at a time
(rolling, maxSurge 1), kills one with SIGKILL (a lost node) and starts it again, stops Redis and
starts it again, each phase then given the rest of `--duration` evenly. A real Prometheus scrapes
every replica with the alert rules `tritonkit k8s` generates, their `for` shortened to
`--alert-for` seconds. Writes, per phase, the requests sent / succeeded / failed with their errors
(a request counts in the phase it ended in: one in flight when a replica is killed is the kill's),
the p99 latency and the alerts that fired, and the embedding cache's hit rate across replicas.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tritonkit.replicas import MixedLoad, ReplicaSet, summary
from tritonkit.reporting import machine, markdown_table, replace_section


def cache_counts(replicas: ReplicaSet) -> dict[str, float]:
    """The embedding cache's hits, misses and errors summed over the running gateways."""
    return {
        name: replicas.gateway_total(f"tritonkit_gateway_embedding_cache_{name}_total")
        for name in ("hits", "misses", "errors")
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, default=Path("demo/model_repository"))
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--duration", type=float, default=600, help="seconds of load across the phases")
    parser.add_argument("--alert-for", type=float, default=10, help="the alert rules' `for`, seconds")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path, help="write the table into this file's replicas section")
    args = parser.parse_args()

    phases: list[tuple[str, float, float, str]] = []
    t0 = time.monotonic()

    def log(message: str) -> None:
        print(f"{time.monotonic() - t0:7.1f} s  {message}", flush=True)

    with ReplicaSet(args.repository, replicas=args.replicas, alert_for_s=args.alert_for, log=log) as replicas:
        print(f"logs: {replicas.workdir}", flush=True)
        prometheus = replicas.prometheus
        assert prometheus is not None  # the default thresholds start one
        load = MixedLoad(replicas.url, clients=args.clients).start()
        rest = args.duration / 5

        def phase(name: str, action) -> None:
            began = time.monotonic()
            action()
            time.sleep(rest)
            fired = sorted({f"{a['alertname']}({a.get('pod') or a.get('model', '')})" for a in prometheus.fired(began)})
            phases.append((name, began, time.monotonic(), ", ".join(fired) or "-"))
            print(f"{name}: {json.dumps(summary(load.outcomes, began))}", flush=True)

        def kill_and_restart() -> None:
            victim = min(replicas.running)
            replicas.kill(victim)
            time.sleep(rest / 2)
            replicas.start(victim)

        def redis_outage() -> None:
            replicas.stop_cache()
            time.sleep(rest / 2)
            replicas.start_cache()

        phase("steady", lambda: None)
        phase("rolling restart of every replica", replicas.rolling_restart)
        phase("kill -9 of one replica, then started again", kill_and_restart)
        phase("Redis stopped, then started again", redis_outage)
        cache = cache_counts(replicas)
        outcomes = load.stop()

    rows = []
    for k, (name, began, ended, fired) in enumerate(phases):
        last = k == len(phases) - 1  # its requests still running when the load stopped count too
        figures = summary(outcomes, began, float("inf") if last else ended, by="ended")
        rows.append(
            [
                name,
                figures["sent"],
                figures["succeeded"],
                figures["failed"],
                "; ".join(figures["errors"]) or "-",
                figures["p99_s"],
                fired,
            ]
        )
    lookups = cache["hits"] + cache["misses"]
    hit_rate = cache["hits"] / lookups if lookups else 0.0
    failures = [
        {
            "kind": o.kind,
            "began_s": round(o.began - t0, 1),
            "ended_s": round(o.ended - t0, 1),
            "status": o.status,
            "error": o.error,
        }
        for o in outcomes
        if not o.ok
    ]
    result = {
        "machine": machine(),
        "phases": rows,
        "failures": failures,
        "cache": cache,
        "cache_hit_rate": round(hit_rate, 3),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if args.markdown:
        cpu = machine()
        lines = [
            f"`python scripts/replicas.py --replicas {args.replicas} --duration {args.duration:.0f}` on "
            f"{cpu['processor']} ({cpu['cpus']} cores), {args.clients} clients of raw HTTP (no retries) through haproxy; "
            f"the generated alert rules with `for` {args.alert_for:g} s:",
            "",
            *markdown_table(
                ["phase", "sent", "succeeded", "failed", "errors", "p99 s", "alerts fired"], rows, align_right_from=1
            ),
            "",
            f"Embedding cache across the replicas (the running gateways' counters at the end): {hit_rate:.0%} hits "
            f"({cache['hits']:.0f} hits, {cache['misses']:.0f} misses, {cache['errors']:.0f} Redis errors answered uncached).",
        ]
        replace_section(args.markdown, "replicas", "Replicas behind a load balancer", lines)


if __name__ == "__main__":
    main()
