"""The PromQL of a deployment: alerts, the autoscaler's metric (a prometheus-adapter rule), the dashboard.

Written against the metrics tritonserver 2.51 exports (`nv_inference_*`, `nv_cache_*`, `nv_gpu_*`)
and tritonkit's own (`tritonkit.model_metrics`). Quantiles come from Triton's latency summaries
(`--metrics-config=summary_latencies=true`), which 2.51 keeps for the composing models but not for
ensembles: an ensemble's p50/p99 is estimated as the sum of its steps' p50/p99 (the mean
end-to-end latency, from the ensemble's own counters, is exact). `expressions()` lists every expression with
where it is used, so a test can parse each with a real PromQL parser.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tritonkit import model_metrics

QUEUE_METRIC = "tritonkit_queue_us_per_request"
RATE_WINDOW = "5m"


def _any(models) -> str:
    return "|".join(re.escape(m) for m in models)


def ensemble_quantile_ms(steps: dict[str, tuple[str, ...]], quantile: str) -> str:
    """Per ensemble (label `model`): the sum over its steps of their latency quantile, in ms."""
    parts = [
        f'label_replace(sum(max by (model) (nv_inference_request_summary_us{{model=~"{_any(models)}",'
        f'quantile="{quantile}"}})), "model", "{ensemble}", "", "")'
        for ensemble, models in sorted(steps.items())
    ]
    return f"({' or '.join(parts)}) / 1000"


def error_ratio(selector: str) -> str:
    failures = f"sum by (model) (rate(nv_inference_request_failure{{{selector}}}[{RATE_WINDOW}]))"
    successes = f"sum by (model) (rate(nv_inference_request_success{{{selector}}}[{RATE_WINDOW}]))"
    return f"{failures} / clamp_min({failures} + {successes}, 1e-9)"


@dataclass(frozen=True)
class AlertThresholds:
    p99_ms: float = 1000.0  # an ensemble's p99 latency (the sum of its steps')
    error_ratio: float = 0.05  # the share of an ensemble's requests that fail
    queue_ms: float = 200.0  # a model's mean queue time per request on one replica (4x the autoscaler's target)


def queue_ms_per_request(window: str = RATE_WINDOW) -> str:
    """Per replica (label `instance`) and model: the mean time a request waited in its queue, ms."""
    waited = f"sum by (instance, model) (rate(nv_inference_queue_duration_us[{window}]))"
    answered = f"sum by (instance, model) (rate(nv_inference_request_success[{window}]))"
    return f"{waited} / clamp_min({answered}, 1e-9) / 1000"


def alert_group(name: str, models, steps: dict[str, tuple[str, ...]], thresholds: AlertThresholds) -> dict:
    p99_ms, error_ratio_limit = thresholds.p99_ms, thresholds.error_ratio
    ensemble_selector = f'model=~"{_any(steps)}"'
    rules = [
        {
            "alert": "TritonkitP99LatencyHigh",
            "expr": f"{ensemble_quantile_ms(steps, '0.99')} > {p99_ms:g}",
            "for": "5m",
            "labels": {"severity": "warning"},
            "annotations": {
                "summary": 'p99 latency of {{ $labels.model }} is {{ $value | printf "%.0f" }} ms',
                "description": f"Above {p99_ms:g} ms for 5 minutes (sum of the steps' p99). Check queue time "
                "(scale out) and batch sizes.",
            },
        },
        {
            "alert": "TritonkitErrorRatioHigh",
            "expr": f"{error_ratio(ensemble_selector)} > {error_ratio_limit:g}",
            "for": "5m",
            "labels": {"severity": "critical"},
            "annotations": {
                "summary": "{{ $labels.model }}: {{ $value | humanizePercentage }} of requests fail",
                "description": "Bad inputs count as failures too: see tritonkit_rejected_inputs_total by reason.",
            },
        },
        {
            "alert": "TritonkitReplicaDown",
            # down now after having been up: a pod still loading its models (minutes, under its
            # startupProbe) is not down; one lost or crashed is
            "expr": f'up{{job="{name}"}} == 0 and on (instance) max_over_time(up{{job="{name}"}}[15m]) == 1',
            "for": "2m",
            "labels": {"severity": "warning"},
            "annotations": {"summary": "tritonserver {{ $labels.pod }} does not answer /metrics"},
        },
        {
            "alert": "TritonkitQueueTimeHigh",
            "expr": f"{queue_ms_per_request()} > {thresholds.queue_ms:g}",
            "for": "5m",
            "labels": {"severity": "warning"},
            "annotations": {
                "summary": '{{ $labels.model }} on {{ $labels.instance }}: requests wait {{ $value | printf "%.0f" }} ms '
                "in its queue",
                "description": f"Above {thresholds.queue_ms:g} ms per request for 5 minutes: more arrives than the "
                "replicas answer and the autoscaler has not caught up (at --max-replicas, or pods pending). "
                "Add replicas or model instances.",
            },
        },
    ]
    for model in models:  # a model's series exist only while some replica has it loaded
        rules.append(
            {
                "alert": "TritonkitModelNotReady",
                "expr": f'absent(nv_inference_request_success{{model="{model}"}})',
                "for": "5m",
                "labels": {"severity": "critical", "model": model},
                "annotations": {"summary": f"no replica has {model} loaded"},
            }
        )
    return {"name": f"{name}.rules", "rules": rules}


def adapter_values() -> dict:
    """prometheus-adapter Helm values: average queue time per request of a pod's models, the
    metric the HorizontalPodAutoscaler targets. (Ensembles do not queue themselves; their
    composing models do, so every model of the pod counts.)"""
    return {
        "rules": {
            "default": False,
            "custom": [
                {
                    "seriesQuery": 'nv_inference_queue_duration_us{namespace!="",pod!=""}',
                    "resources": {"overrides": {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}},
                    "name": {"matches": "^nv_inference_queue_duration_us$", "as": QUEUE_METRIC},
                    "metricsQuery": (
                        "sum(rate(nv_inference_queue_duration_us{<<.LabelMatchers>>}[2m])) by (<<.GroupBy>>)"
                        " / clamp_min(sum(rate(nv_inference_request_success{<<.LabelMatchers>>}[2m])) by (<<.GroupBy>>), 1e-3)"
                    ),
                }
            ],
        }
    }


def adapter_query_as_promql(query: str) -> str:
    """The adapter's template with its placeholders filled as the adapter fills them."""
    return query.replace("<<.LabelMatchers>>", 'namespace="default",pod="tritonkit-0"').replace("<<.GroupBy>>", "pod")


def dashboard_panels(models, steps: dict[str, tuple[str, ...]]) -> list[tuple[str, str, str, str]]:
    """(title, PromQL, legend, unit) for each panel."""
    window = "1m"
    all_models = f'model=~"{_any(models)}"'
    ensemble_models = f'model=~"{_any(steps)}"'
    return [
        (
            "Requests per second",
            f"sum by (model) (rate(nv_inference_request_success{{{ensemble_models}}}[{window}]))",
            "{{model}}",
            "reqps",
        ),
        (
            "Failed requests per second",
            f"sum by (model) (rate(nv_inference_request_failure{{{ensemble_models}}}[{window}]))",
            "{{model}}",
            "reqps",
        ),
        (
            "Mean latency",
            f"sum by (model) (rate(nv_inference_request_duration_us{{{ensemble_models}}}[{window}])) / 1000"
            f" / clamp_min(sum by (model) (rate(nv_inference_request_success{{{ensemble_models}}}[{window}])), 1e-9)",
            "{{model}}",
            "ms",
        ),
        ("p50 latency (sum of the steps' p50)", ensemble_quantile_ms(steps, "0.5"), "{{model}}", "ms"),
        ("p99 latency (sum of the steps' p99)", ensemble_quantile_ms(steps, "0.99"), "{{model}}", "ms"),
        (
            "Queue time per request",
            f"sum by (model) (rate(nv_inference_queue_duration_us{{{all_models}}}[{window}])) / 1000"
            f" / clamp_min(sum by (model) (rate(nv_inference_request_success{{{all_models}}}[{window}])), 1e-9)",
            "{{model}}",
            "ms",
        ),
        (
            "Average batch size",
            f"sum by (model) (rate(nv_inference_count{{{all_models}}}[{window}]))"
            f" / clamp_min(sum by (model) (rate(nv_inference_exec_count{{{all_models}}}[{window}])), 1e-9)",
            "{{model}}",
            "none",
        ),
        (
            "Response cache hit ratio",
            f"sum by (model) (rate(nv_cache_num_hits_per_model{{{ensemble_models}}}[{window}]))"
            f" / clamp_min(sum by (model) (rate(nv_cache_num_hits_per_model{{{ensemble_models}}}[{window}]))"
            f" + sum by (model) (rate(nv_cache_num_misses_per_model{{{ensemble_models}}}[{window}])), 1e-9)",
            "{{model}}",
            "percentunit",
        ),
        ("GPU utilisation", "avg by (pod, gpu_uuid) (nv_gpu_utilization)", "{{pod}} {{gpu_uuid}}", "percentunit"),
        ("GPU memory used", "sum by (pod, gpu_uuid) (nv_gpu_memory_used_bytes)", "{{pod}} {{gpu_uuid}}", "bytes"),
        (
            "Preprocessing p99 (tritonkit)",
            f"histogram_quantile(0.99, sum by (model, le) (rate({model_metrics.PREPROCESS_SECONDS}_bucket[{window}])))",
            "{{model}}",
            "s",
        ),
        (
            "Rejected inputs per second (tritonkit)",
            f"sum by (model, reason) (rate({model_metrics.REJECTED_INPUTS}[{window}]))",
            "{{model}} {{reason}}",
            "reqps",
        ),
        (
            "Tokens generated per second (tritonkit)",
            f"sum by (model) (rate({model_metrics.GENERATED_TOKENS}[{window}]))",
            "{{model}}",
            "none",
        ),
    ]


def dashboard(name: str, models, steps: dict[str, tuple[str, ...]]) -> dict:
    panels = []
    for index, (title, expr, legend, unit) in enumerate(dashboard_panels(models, steps)):
        panels.append(
            {
                "id": index + 1,
                "type": "timeseries",
                "title": title,
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "gridPos": {"h": 8, "w": 12, "x": 12 * (index % 2), "y": 8 * (index // 2)},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "targets": [{"refId": "A", "expr": expr, "legendFormat": legend}],
            }
        )
    return {
        "title": f"tritonkit: {name}",
        "uid": f"tritonkit-{name}"[:40],
        "schemaVersion": 39,
        "tags": ["tritonkit", "triton"],
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "templating": {"list": [{"name": "datasource", "type": "datasource", "query": "prometheus"}]},
        "panels": panels,
    }


def expressions(name: str, models, steps: dict[str, tuple[str, ...]]) -> list[tuple[str, str]]:
    """(where, PromQL) for every expression a deployment uses."""
    found = [
        (f"alert {r['alert']} {r.get('labels', {}).get('model', '')}".strip(), r["expr"])
        for r in alert_group(name, models, steps, AlertThresholds())["rules"]
    ]
    found += [(f"dashboard: {title}", expr) for title, expr, _, _ in dashboard_panels(models, steps)]
    found += [
        ("prometheus-adapter rule", adapter_query_as_promql(rule["metricsQuery"]))
        for rule in adapter_values()["rules"]["custom"]
    ]
    return found
