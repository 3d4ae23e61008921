"""Resident memory of a served repository, per model: what `tritonkit plan --measure` and the soak read.

Two sources. On the server's machine, /proc: tritonserver and its Python-backend stubs (each stub's
command line names its model.py, so REPO/MODEL/1/model.py names the model), each charged its share
of the pages the server's processes hold, whatever else runs on the machine. Anywhere else (a pod,
a remote host), Triton's /metrics: every tritonkit model reports its own stub's resident bytes and
tritonserver's as gauges (`tritonkit_resident_bytes`, PSS, refreshed while it serves). In a pod,
where nothing else maps the server's pages, the two are the same figure; on a machine shared with
other Python processes PSS is lower (they share its libraries' pages).
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


PRESENT, EXCLUSIVE, PFN_MASK = 1 << 63, 1 << 56, (1 << 55) - 1  # /proc/PID/pagemap's bits


def _zero_page_frame() -> int | None:
    """The frame every read-only untouched anonymous page maps: memory nobody holds."""
    import ctypes
    import mmap

    page = mmap.PAGESIZE
    try:
        area = mmap.mmap(-1, page, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except OSError:
        return None
    try:
        view = ctypes.c_char.from_buffer(area)
        address = ctypes.addressof(view)
        view.value  # noqa: B018 - the read maps the zero page without allocating one
        del view
        with open("/proc/self/pagemap", "rb") as pagemap:
            pagemap.seek(address // page * 8)
            entry = int.from_bytes(pagemap.read(8), "little")
    except OSError:
        return None
    finally:
        area.close()
    frame = entry & PFN_MASK
    return frame if entry & PRESENT and frame else None


def _private_and_shared(pid: int, zero_frame: int | None):
    """(bytes of the pages only `pid` maps, frame numbers of the pages it maps with others), or
    None when the process is gone or its frame numbers are hidden (no CAP_SYS_ADMIN)."""
    import numpy as np

    page = os.sysconf("SC_PAGE_SIZE")
    proc = Path("/proc") / str(pid)
    private, shared_areas = 0, []
    try:
        start = end = shared = 0
        for line in (proc / "smaps").read_text().splitlines():
            head = line.split(maxsplit=1)[0]
            if not head.endswith(":"):  # an area's first line: START-END PERMS ...
                if shared:
                    shared_areas.append((start, end))
                low, high = head.split("-")
                start, end, shared = int(low, 16), int(high, 16), 0
            elif head in ("Private_Clean:", "Private_Dirty:"):
                private += int(line.split()[1]) * 1024
            elif head in ("Shared_Clean:", "Shared_Dirty:"):
                shared += int(line.split()[1])
        if shared:
            shared_areas.append((start, end))
        frames = [np.zeros(0, np.uint64)]
        with open(proc / "pagemap", "rb") as pagemap:
            for start, end in shared_areas:
                pagemap.seek(start // page * 8)
                entries = np.frombuffer(pagemap.read((end - start) // page * 8), dtype=np.uint64)
                mapped = entries[(entries & np.uint64(PRESENT | EXCLUSIVE)) == np.uint64(PRESENT)]
                frames.append(mapped & np.uint64(PFN_MASK))
    except (OSError, ValueError, IndexError):
        return None
    shared_frames = np.concatenate(frames)
    if len(shared_frames) and not shared_frames.any():
        return None
    if zero_frame is not None:
        shared_frames = shared_frames[shared_frames != np.uint64(zero_frame)]
    return private, shared_frames


def group_resident_bytes(pids: list[int]) -> dict[int, int] | None:
    """Each process's share of the memory the group of `pids` holds: its private pages, and every
    page it shares split among the group's processes that map it, ignoring processes outside.

    This is PSS as a pod's processes measure it, where nothing else maps their pages; on a shared
    machine PSS also splits library pages with unrelated processes (a test run, other servers), so a
    stub measures less the more Python processes run beside it. Needs the frame numbers in
    /proc/PID/pagemap (root); None without them."""
    import numpy as np

    page = os.sysconf("SC_PAGE_SIZE")
    zero_frame = _zero_page_frame()
    read = {pid: _private_and_shared(pid, zero_frame) for pid in pids}
    if any(got is None and (Path("/proc") / str(pid)).is_dir() for pid, got in read.items()):
        return None
    alive = {pid: got for pid, got in read.items() if got is not None}
    if not alive:
        return None
    unique, counts = np.unique(np.concatenate([frames for _, frames in alive.values()]), return_counts=True)
    sizes = {}
    for pid, (private, frames) in alive.items():
        sharers = counts[np.searchsorted(unique, frames)]
        sizes[pid] = private + round(float(np.sum(1.0 / sharers)) * page)
    return sizes


def process_model(pid: int) -> str:
    """'tritonserver', the model a Python-backend stub serves, or the program's name."""
    try:
        words = (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return str(pid)
    if len(words) > 1 and b"triton_python_backend_stub" in words[0]:
        return Path(words[1].decode(errors="replace")).parent.parent.name  # REPO/MODEL/VERSION/model.py
    return Path(words[0].decode(errors="replace")).name


def resident_by_model(root_pid: int, within_server: bool = True) -> dict[str, int]:
    """Resident bytes of tritonserver (`root_pid`) and its stubs, summed per model (all its
    instances): their shares of the pages the server's processes hold (`group_resident_bytes`),
    or PSS (`within_server=False`, or where frame numbers cannot be read)."""
    from tritonkit.server import process_tree

    pids = process_tree(root_pid)
    grouped = group_resident_bytes(pids) if within_server else None
    totals: dict[str, int] = {}
    for pid in pids:
        size = grouped.get(pid) if grouped is not None else resident_bytes(pid)
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
    sizes a load reached, which `tritonkit plan` sizes buffers and workspaces by. A model the load
    never ran (Whisper's streaming decoder under a whole-answer soak) reached 0: it grew no arena."""
    counts: dict[str, dict[str, float]] = {}
    for match in _COUNTER.finditer(text):
        model = dict(_LABEL.findall(match["labels"])).get("model", "?")
        entry = counts.setdefault(model, {})
        entry[match["name"]] = entry.get(match["name"], 0.0) + float(match["value"])
    return {
        model: entry["nv_inference_count"] / entry["nv_inference_exec_count"]
        if entry["nv_inference_exec_count"]
        else 0.0
        for model, entry in counts.items()
        if "nv_inference_exec_count" in entry
    }
