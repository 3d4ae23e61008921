"""Memory accounting: per-model figures from /metrics, the decoder's cache handling, soak plots, plan inputs."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from tritonkit.families import family_names, get_family
from tritonkit.memory import SERVER, average_batches, resident_by_model, resident_bytes, resident_from_metrics
from tritonkit.whisper_decoding import compacted, taken

ROOT = Path(__file__).resolve().parent.parent

METRICS = """# HELP tritonkit_resident_bytes Resident memory
# TYPE tritonkit_resident_bytes gauge
tritonkit_resident_bytes{instance="enc_0_0",model="enc",process="stub"} 100000000
tritonkit_resident_bytes{instance="enc_0_1",model="enc",process="stub"} 50000000
tritonkit_resident_bytes{instance="enc_0_0",model="enc",process="tritonserver"} 30000000
tritonkit_resident_bytes{instance="dec_0_0",model="dec",process="stub"} 70000000
tritonkit_resident_bytes{instance="dec_0_0",model="dec",process="tritonserver"} 31000000
nv_inference_count{model="enc",version="1"} 120
nv_inference_exec_count{model="enc",version="1"} 30
nv_inference_count{model="dec",version="1"} 10
nv_inference_exec_count{model="dec",version="1"} 0
"""


def test_metrics_give_each_model_its_instances_and_tritonserver_once():
    assert resident_from_metrics(METRICS) == {"enc": 150_000_000, "dec": 70_000_000, SERVER: 31_000_000}
    assert average_batches(METRICS) == {"enc": 4.0, "dec": 0.0}  # a model that never executed reached 0 rows
    assert resident_from_metrics("nv_inference_count 3\n") == {}


def test_this_process_is_measured_by_its_proportional_set():
    import os

    mine = resident_bytes(os.getpid())
    assert mine is not None and 10 * 2**20 < mine < 8 * 2**30
    assert resident_bytes(2**22 + 12345) is None  # no such process
    assert set(resident_by_model(os.getpid())) >= {SERVER}  # the root process is labelled tritonserver


def test_a_server_group_is_measured_alike_whatever_else_maps_its_libraries():
    """PSS drops as unrelated processes map the same libraries; the group's share does not."""
    import os
    import subprocess
    import sys

    from tritonkit.memory import group_resident_bytes

    if group_resident_bytes([os.getpid()]) is None:
        pytest.skip("page frame numbers are hidden here (needs root): the measure falls back to PSS")
    holding = "import numpy, sys; a = numpy.ones(2**22); print(flush=True); sys.stdin.read()"

    def start(count):
        started = [
            subprocess.Popen([sys.executable, "-c", holding], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            for _ in range(count)
        ]
        for process in started:
            process.stdout.readline()  # numpy imported, 32 MiB written
        return started

    group = start(2)
    try:
        pids = [p.pid for p in group]
        alone = group_resident_bytes(pids)
        pss_alone = [resident_bytes(pid) for pid in pids]
        rss = [int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") for pid in pids]
        assert all(32 * 2**20 < alone[pid] <= size for pid, size in zip(pids, rss))
        assert sum(alone.values()) < sum(rss)  # the pages the two share are counted once
        others = start(4)
        try:
            beside = group_resident_bytes(pids)
            pss_beside = [resident_bytes(pid) for pid in pids]
        finally:
            for process in others:
                process.kill()
    finally:
        for process in group:
            process.kill()
    assert all(b < a for a, b in zip(pss_alone, pss_beside))  # PSS shares with the newcomers
    for pid in pids:
        assert abs(beside[pid] - alone[pid]) <= 0.02 * alone[pid], (alone, beside)


def test_taken_rows_share_memory_only_when_every_row_is_taken_in_order():
    cache = {"K": np.arange(12.0).reshape(4, 3), "V": np.arange(4.0)}
    assert taken(cache, [0, 1, 2, 3]) is cache
    picked = taken(cache, [2, 0])
    assert picked["K"].tolist() == [[6, 7, 8], [0, 1, 2]] and picked["V"].tolist() == [2, 0]
    assert not np.shares_memory(picked["K"], cache["K"])
    assert taken(cache, np.array([True, False, True, True]))["V"].tolist() == [0, 2, 3]


def test_compacted_moves_the_kept_rows_to_the_front_in_place():
    cache = {"K": np.arange(10.0).reshape(5, 2).copy(), "V": np.arange(5.0)}
    buffer = cache["K"]
    kept = compacted(cache, np.array([False, True, False, True, True]))
    assert kept["K"].tolist() == [[2, 3], [6, 7], [8, 9]] and kept["V"].tolist() == [1, 3, 4]
    assert np.shares_memory(kept["K"], buffer)  # no copy of the rest: a view of the same array


def test_soak_plot_draws_every_model(tmp_path):
    spec = importlib.util.spec_from_file_location("soak", ROOT / "scripts" / "soak.py")
    soak = importlib.util.module_from_spec(spec)
    sys.modules["soak"] = soak
    spec.loader.exec_module(soak)
    timeline = [
        {"t": t, "total_mb": 300 + t, "mb": {"tritonserver": 100.0, "enc": 200.0 + t}} for t in range(0, 60, 10)
    ]
    report = {
        "family": "clip",
        "path": "gRPC",
        "concurrency": 16,
        "rss_mb_timeline": timeline,
        "rss_growth_mb_last_third": 20.0,
        "rss_mb_settled": {m: soak.settled_mb(timeline, m) for m in ("enc", "tritonserver")},
    }
    soak.plot_memory(report, tmp_path / "soak.png")
    assert (tmp_path / "soak.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["rss_mb_settled"] == {"enc": 245.0, "tritonserver": 100.0}  # the median of the last third


@pytest.mark.parametrize("family", family_names())
def test_every_measured_stage_memory_reaches_the_plan(family, family_repository):
    """What a family measured of its stages (FamilySpec.memory) is what `tritonkit plan` adds."""
    from tritonkit.capacity import make_plan
    from tritonkit.families.base import SERVER_MEMORY_ROLE

    spec = get_family(family)
    plan = make_plan(family_repository(family))
    by_role = {m.name.removeprefix(f"{family}_"): m for m in plan.models}
    from tritonkit.families.base import BuildOptions

    measured = spec.memory_for(BuildOptions())  # the repositories are default builds
    for role, memory in measured.items():
        if role == SERVER_MEMORY_ROLE:
            continue
        assert by_role[role].overhead_bytes == int(memory.fixed_mb * 2**20), role
    if SERVER_MEMORY_ROLE in measured:
        assert plan.server_bytes >= measured[SERVER_MEMORY_ROLE].fixed_mb * 2**20
    assert plan.host_bytes == plan.server_bytes + sum(m.total_bytes for m in plan.models)  # a CPU build
    assert json.loads(json.dumps(plan.to_json()))["host_bytes"] == plan.host_bytes
