"""Resident memory of a served repository, per model: what `tritonkit plan --measure` and the soak read.

Two sources give the same figures. On the server's machine, /proc: tritonserver and its Python-backend
stubs (each stub's command line names its model.py, so REPO/MODEL/1/model.py names the model).
Anywhere else (a pod, a remote host), Triton's /metrics: every tritonkit model reports its own stub's
resident bytes and tritonserver's as gauges (`tritonkit_resident_bytes`), refreshed while it serves.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

SERVER = "tritonserver"  # the label of tritonserver's own process (the models it runs in-process, its buffers)


def resident_bytes(pid: int) -> int | None:
    """A process's proportional resident set (PSS) from /proc, None once it is gone.

    PSS splits a shared page between the processes that map it: tritonserver and its stubs share
    the Python backend's shared-memory pool, which RSS would count once per process, while a
    container's memory limit charges it once."""
    proc = Path("/proc") / str(pid)
    try:
        for line in (proc / "smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    try:  # no smaps_rollup (older kernels, no permission): the plain resident set
        return int((proc / "statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return None


def process_model(pid: int) -> str:
    """'tritonserver', the model a Python-backend stub serves, or the program's name."""
    try:
        words = (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return str(pid)
    if len(words) > 1 and b"triton_python_backend_stub" in words[0]:
        return Path(words[1].decode(errors="replace")).parent.parent.name  # REPO/MODEL/VERSION/model.py
    return Path(words[0].decode(errors="replace")).name


def resident_by_model(root_pid: int) -> dict[str, int]:
    """Resident bytes (PSS) of tritonserver (`root_pid`) and its stubs, summed per model (all its instances)."""
    from tritonkit.server import process_tree

    totals: dict[str, int] = {}
    for pid in process_tree(root_pid):
        size = resident_bytes(pid)
        if size is not None:
            label = SERVER if pid == root_pid else process_model(pid)
            totals[label] = totals.get(label, 0) + size
    return totals


_GAUGE = re.compile(r"^tritonkit_resident_bytes\{(?P<labels>[^}]*)\}\s+(?P<value>\S+)", re.M)
_LABEL = re.compile(r'(\w+)="([^"]*)"')


def resident_from_metrics(text: str) -> dict[str, int]:
    """The same per-model figures from a /metrics page: stubs summed per model, tritonserver once."""
    stubs: dict[tuple[str, str], float] = {}
    server = 0.0
    for match in _GAUGE.finditer(text):
        labels = dict(_LABEL.findall(match["labels"]))
        value = float(match["value"])
        if labels.get("process") == SERVER:
            server = max(server, value)  # every model reports it: the newest is the largest while it grows
        else:
            stubs[(labels.get("model", "?"), labels.get("instance", ""))] = value
    totals: dict[str, int] = {}
    for (model, _), value in stubs.items():
        totals[model] = totals.get(model, 0) + int(value)
    if server:
        totals[SERVER] = int(server)
    return totals


_COUNTER = re.compile(
    r"^(?P<name>nv_inference_count|nv_inference_exec_count)\{(?P<labels>[^}]*)\}\s+(?P<value>\S+)", re.M
)


def average_batches(text: str) -> dict[str, float]:
    """Rows per execution of each model from a /metrics page (inferences / executions): the batch
    sizes a load reached, which `tritonkit plan` sizes buffers and workspaces by."""
    counts: dict[str, dict[str, float]] = {}
    for match in _COUNTER.finditer(text):
        model = dict(_LABEL.findall(match["labels"])).get("model", "?")
        entry = counts.setdefault(model, {})
        entry[match["name"]] = entry.get(match["name"], 0.0) + float(match["value"])
    return {
        model: entry["nv_inference_count"] / entry["nv_inference_exec_count"]
        for model, entry in counts.items()
        if entry.get("nv_inference_exec_count")
    }
