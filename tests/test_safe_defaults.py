"""Safe defaults: loopback only, no model control, no remote code, no request data unpickled or evaluated."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def listening_addresses(port: int) -> set[str]:
    """Local IPv4/IPv6 addresses with a socket listening on `port` (from /proc/net/tcp*)."""
    import ipaddress

    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, _remote, state = line.split()[1:4]
            address, port_hex = local.split(":")
            if state != "0A" or int(port_hex, 16) != port:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(address)
            # /proc prints each 32-bit word in host (little-endian) order
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            ip = ipaddress.ip_address(raw)
            found.add(str(getattr(ip, "ipv4_mapped", None) or ip))  # gRPC listens on ::ffff:127.0.0.1
    return found


@pytest.mark.server
def test_server_listens_on_loopback_only_and_refuses_to_load_or_unload_models(clip_server):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    for port in (clip_server.grpc_port, clip_server.http_port, clip_server.metrics_port):
        assert listening_addresses(port) == {"127.0.0.1"}, port
    with grpcclient.InferenceServerClient(clip_server.grpc_url) as client:
        for action in (client.unload_model, client.load_model):
            with pytest.raises(InferenceServerException, match="explicit model load / unload is not allowed"):
                action("clip_image")
        assert client.is_model_ready("clip_image")


def test_a_models_own_code_runs_only_with_trust_remote_code(tiny_clip_dir, tmp_path):
    """A checkpoint that ships Python (auto_map) gets the built-in classes unless the user opts in."""
    model = tmp_path / "model"
    shutil.copytree(tiny_clip_dir, model)
    marker = tmp_path / "remote-code-ran"
    (model / "evil_processor.py").write_text(
        "from transformers import CLIPImageProcessor\n"
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "class EvilProcessor(CLIPImageProcessor):\n    pass\n"
    )
    config = json.loads((model / "preprocessor_config.json").read_text())
    config["auto_map"] = {"AutoImageProcessor": "evil_processor.EvilProcessor"}
    (model / "preprocessor_config.json").write_text(json.dumps(config))

    def build(*flags):
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "tritonkit.cli",
                "build",
                "clip",
                "--model",
                str(model),
                "--out",
                str(tmp_path / "repo"),
                *flags,
            ],
            capture_output=True,
            text=True,
            timeout=600,
        )

    result = build()
    assert result.returncode == 0, result.stderr
    assert not marker.exists(), "the model's own code ran without --trust-remote-code"
    result = build("--trust-remote-code")
    assert result.returncode == 0, result.stderr
    assert marker.exists()  # the check above can see the code run


# Modules that turn bytes into objects. Request data reaches only tritonkit's
# code, so neither they nor eval/exec/np.load(allow_pickle=True) may appear there at all.
UNSAFE_MODULES = {"pickle", "cPickle", "dill", "marshal", "shelve", "cloudpickle", "joblib"}


def served_sources() -> list[Path]:
    return sorted((ROOT / "tritonkit").rglob("*.py"))


@pytest.mark.parametrize("path", served_sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_request_data_is_unpickled_or_evaluated(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [alias.name for alias in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            problems += [f"line {node.lineno}: imports {n}" for n in names if n and n.split(".")[0] in UNSAFE_MODULES]
        if isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            owner = ast.unparse(node.func.value) if isinstance(node.func, ast.Attribute) else ""
            if name in {"eval", "exec", "__import__"} and not owner:
                problems.append(f"line {node.lineno}: {name}()")
            # torch.load only with weights_only=True: its unpickler refuses anything but tensors and plain data
            weights_only = any(
                k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                for k in node.keywords
            )
            unsafe_owner = owner.split(".")[-1] in UNSAFE_MODULES | {"torch"}
            if name in {"loads", "load"} and unsafe_owner and not (owner.split(".")[-1] == "torch" and weights_only):
                problems.append(f"line {node.lineno}: {owner}.{name}()")
            for keyword in node.keywords:
                if keyword.arg == "allow_pickle" and not (
                    isinstance(keyword.value, ast.Constant) and keyword.value.value is False
                ):
                    problems.append(f"line {node.lineno}: allow_pickle={ast.unparse(keyword.value)}")
    assert not problems, problems


def test_the_server_and_its_stubs_run_with_jemalloc_unless_openvino_is_served(clip_server):
    """glibc's malloc let tritonserver's memory creep up over a 30-minute soak (docs/RELIABILITY.md):
    `auto` preloads jemalloc where installed; OpenVINO aborts under it, so its repositories keep glibc's."""
    from tritonkit.errors import ServerError
    from tritonkit.server import allocator_library

    library = allocator_library("auto")
    if library is None:
        pytest.skip("no jemalloc or tcmalloc here (apt-get install libjemalloc2)")
    pids = [clip_server.started.pid, *clip_server.stub_pids()]
    assert len(pids) > 1 and all(library.name in (Path("/proc") / str(pid) / "maps").read_text() for pid in pids)
    assert allocator_library("auto", openvino=True) is None and allocator_library("glibc") is None
    with pytest.raises(ServerError, match="OpenVINO aborts under a preloaded jemalloc"):
        allocator_library("jemalloc", openvino=True)
    with pytest.raises(ServerError, match="--allocator 'mimalloc': use one of auto, jemalloc, tcmalloc, glibc"):
        allocator_library("mimalloc")
