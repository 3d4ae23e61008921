"""Start and stop a real tritonserver for a model repository.

Uses `tritonserver` from PATH when there is one (an NGC container); otherwise the binary bundled
in the nvidia-pytriton wheel, with its libraries, its Python backend, and the backend stub that
matches the running Python (the stub then runs this environment's interpreter and packages).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tritonkit.errors import ServerError
from tritonkit.termination import EXIT_TIMEOUT_S

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORTS = {"grpc": 8001, "http": 8000, "metrics": 8002}
# After a stub died the server is broken anyway: in-flight requests get this long, then it is killed.
RESTART_GRACE_S = 5
SUPERVISE_POLL_S = 1.0
STUB_LOSS_GRACE_S = 1.0  # a lost stub waits this long for the server's own exit to be seen
# Restarts back off (none before the first, then 1, 2, 4 ... s); more than MAX_RESTARTS crashes
# within RESTART_WINDOW_S is a crash loop, and serve gives up with the server's last log lines.
MAX_RESTARTS = 5
RESTART_WINDOW_S = 300.0
MAX_BACKOFF_S = 30.0
# The server's environment carries its restart count; tritonkit's models export it as a gauge.
RESTARTS_ENV = "TRITONKIT_SERVER_RESTARTS"
_ERROR_LINE = re.compile(r"^E\d{4} |failed to load|error:|UNAVAILABLE", re.IGNORECASE)
# What a CPU-only machine always logs; not the reason anything failed.
_BENIGN = re.compile(r"CudaDriverHelper|unable to create stream|CUDA driver|NVML|DCGM", re.IGNORECASE)


@dataclass(frozen=True)
class Installation:
    binary: Path
    backend_source: Path | None  # the wheel's backends/ (to complete with the stub), or None
    libraries: Path | None
    caches: Path | None


def find_tritonserver() -> Installation:
    on_path = shutil.which("tritonserver")
    if on_path:
        return Installation(Path(on_path), None, None, None)
    try:
        import pytriton
    except ImportError:
        raise ServerError(
            "no tritonserver found",
            hint="install tritonkit[cpu] (which bundles one in nvidia-pytriton) or run inside an NGC tritonserver container",
        ) from None
    root = Path(pytriton.__file__).parent / "tritonserver"
    libs = Path(pytriton.__file__).parent.parent / "nvidia_pytriton.libs"
    binary = root / "bin" / "tritonserver"
    if not binary.is_file():
        raise ServerError(f"nvidia-pytriton is installed but has no server binary at {binary}")
    return Installation(binary, root / "backends", libs if libs.is_dir() else None, root / "caches")


def _python_backend_dir(installation: Installation, workdir: Path) -> Path:
    """The wheel's backends plus the stub built for this Python version."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = installation.binary.parent.parent / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServerError(f"the bundled tritonserver has no Python-backend stub for Python {version}")
    backends = workdir / "backends"
    if installation.backend_source is None:
        raise ServerError(f"{installation.binary} has no backends folder to complete with the Python-backend stub")
    shutil.copytree(installation.backend_source, backends, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(stub, backends / "python" / "triton_python_backend_stub")
    return backends


# The allocator tritonserver and its stubs run with. glibc's malloc keeps freed memory in its
# per-thread arenas, so a long-running server's resident memory creeps up (NGC's tritonserver
# containers preload tcmalloc for the same reason); jemalloc or tcmalloc return it.
ALLOCATORS = ("auto", "jemalloc", "tcmalloc", "glibc")
_ALLOCATOR_LIBRARIES = {
    "jemalloc": ("libjemalloc.so.2",),
    "tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4"),
}
# jemalloc: a background thread returns freed pages even while the server is idle
JEMALLOC_CONF = "background_thread:true"


def allocator_library(allocator: str, openvino: bool = False) -> Path | None:
    """The shared library to preload for `allocator` (auto: jemalloc, else tcmalloc, else none).

    OpenVINO's CPU plugin aborts under a preloaded jemalloc ("free(): invalid pointer": memory
    allocated by one allocator freed by glibc's), so a repository with OpenVINO stages (`openvino`)
    gets glibc's under auto and a ServerError when jemalloc is asked for."""
    if allocator not in ALLOCATORS:
        raise ServerError(f"--allocator {allocator!r}: use one of {', '.join(ALLOCATORS)}")
    if allocator == "jemalloc" and openvino:
        raise ServerError(
            "--allocator jemalloc: OpenVINO aborts under a preloaded jemalloc (free(): invalid pointer)",
            hint="use --allocator glibc (or auto) for repositories built with --engine openvino",
        )
    if allocator == "glibc" or (allocator == "auto" and openvino):
        return None
    folders = [Path(f"/usr/lib/{os.uname().machine}-linux-gnu"), Path("/usr/lib64"), Path("/usr/lib")]
    for name in ("jemalloc", "tcmalloc") if allocator == "auto" else (allocator,):
        for library in _ALLOCATOR_LIBRARIES[name]:
            for folder in folders:
                if (folder / library).is_file():
                    return folder / library
    if allocator == "auto":
        return None
    package = "libjemalloc2" if allocator == "jemalloc" else "libgoogle-perftools4"
    raise ServerError(f"--allocator {allocator}: no {allocator} library found", hint=f"apt-get install {package}")


def server_environment(installation: Installation, allocator: str = "auto", openvino: bool = False) -> dict[str, str]:
    env = os.environ.copy()
    library = allocator_library(allocator, openvino)
    if library is not None and str(library) not in env.get("LD_PRELOAD", ""):
        env["LD_PRELOAD"] = ":".join(p for p in (str(library), env.get("LD_PRELOAD", "")) if p)
        if "jemalloc" in library.name:
            env.setdefault("MALLOC_CONF", JEMALLOC_CONF)
    # The stub embeds libpython: this interpreter's own library must win over the system's
    # (a different patch release fails on symbols such as _PyModule_Add).
    library_dirs = [sysconfig.get_config_var("LIBDIR") or ""]
    if installation.libraries:
        library_dirs.append(str(installation.libraries))
    library_dirs.append(env.get("LD_LIBRARY_PATH", ""))
    env["LD_LIBRARY_PATH"] = ":".join(d for d in library_dirs if d)
    # The stub runs the first python3 on PATH: make it this environment's.
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return env


def repository_backends(repository: Path) -> set[str]:
    """The backends a repository's models ask for ("" for ensembles)."""
    from tritonkit.repository import read_repository

    try:
        return {config.backend for config in read_repository(Path(repository)).values()}
    except Exception:  # an unreadable repository is reported by the server itself
        return set()


def uses_openvino(repository: Path) -> bool:
    """Whether any model runs OpenVINO: Triton's openvino backend or a Python stage with engine openvino."""
    from tritonkit.repository import read_repository

    try:
        configs = read_repository(Path(repository)).values()
    except Exception:  # an unreadable repository is reported by the server itself
        return False
    return any(
        c.backend == "openvino" or ("engine" in c.parameters and c.parameters["engine"].string_value == "openvino")
        for c in configs
    )


def process_tree(pid: int) -> list[int]:
    """A process and all its descendants (tritonserver and its backend stubs) alive now, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree, stack = [], [pid]
    while stack:
        current = stack.pop()
        if (Path("/proc") / str(current)).is_dir():
            tree.append(current)
            stack += children.get(current, [])
    return tree


def process_tree_rss(pid: int) -> dict[int, int]:
    """Resident bytes of a process and all its descendants, from /proc."""
    rss = {}
    page = os.sysconf("SC_PAGE_SIZE")
    for current in process_tree(pid):
        try:
            rss[current] = int((Path("/proc") / str(current) / "statm").read_text().split()[1]) * page
        except OSError:
            continue
    return rss


def exit_description(code: int) -> str:
    """'code 1', or 'signal 6 (SIGABRT)' for a process a signal ended."""
    if code >= 0:
        return f"code {code}"
    try:
        return f"signal {-code} ({signal.Signals(-code).name})"
    except ValueError:
        return f"signal {-code}"


def port_is_free(host: str, port: int) -> bool:
    """Whether a server could listen on it: nothing listens there (connections a stopped server left
    in TIME_WAIT, such as a scraper's, do not count: servers bind with SO_REUSEADDR)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = DEFAULT_HOST) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@dataclass
class TritonServer:
    """A tritonserver process serving `repository`; a context manager that stops it on exit."""

    repository: Path
    host: str = DEFAULT_HOST
    grpc_port: int = DEFAULT_PORTS["grpc"]
    http_port: int = DEFAULT_PORTS["http"]
    metrics_port: int = DEFAULT_PORTS["metrics"]
    log_file: Path | None = None
    response_cache_bytes: int = 0  # 0: no response cache
    log_verbose: int = 0
    extra_args: list[str] = field(default_factory=list)
    allocator: str = "auto"  # ALLOCATORS: what tritonserver and its stubs allocate with
    process: subprocess.Popen | None = field(default=None, init=False)
    restarts: int = field(default=0, init=False)  # by serve_forever, since start

    @property
    def started(self) -> subprocess.Popen:
        """The tritonserver process (ServerError before `start`)."""
        if self.process is None:
            raise ServerError("tritonserver was not started")
        return self.process

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    def command(self, installation: Installation, workdir: Path) -> list[str]:
        args = [
            str(installation.binary),
            f"--model-repository={Path(self.repository).resolve()}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            "--model-control-mode=none",
            "--exit-on-error=true",
            "--strict-readiness=true",
            f"--exit-timeout-secs={EXIT_TIMEOUT_S}",
            f"--log-verbose={self.log_verbose}",
            "--metrics-config=summary_latencies=true",  # p50/p99 per model, as the manifests' pods export
        ]
        if installation.backend_source is not None:
            args.append(f"--backend-directory={_python_backend_dir(installation, workdir)}")
        if installation.caches is not None:
            args.append(f"--cache-directory={installation.caches}")
        if self.response_cache_bytes:
            args.append(f"--cache-config=local,size={self.response_cache_bytes}")
        if "dali" in repository_backends(self.repository):
            args.append("--backend-config=dali,release_after_unload=true")  # frees DALI's GPU memory on unload
        return args + list(self.extra_args)

    def stub_pids(self) -> set[int]:
        """The Python-backend stub processes of this server (one per model instance)."""
        if self.process is None:
            return set()
        stubs = set()
        for pid in process_tree_rss(self.process.pid):
            try:
                if b"triton_python_backend_stub" in (Path("/proc") / str(pid) / "cmdline").read_bytes():
                    stubs.add(pid)
            except OSError:
                continue
        return stubs

    def start(self, check_ports: bool = True) -> TritonServer:
        repository = Path(self.repository)
        if not repository.is_dir():
            raise ServerError(f"{repository}: no such model repository directory")
        from tritonkit.repository import check_format

        check_format(repository)  # a model of another format would fail to load, one log line among many
        ports = (("grpc", self.grpc_port), ("http", self.http_port), ("metrics", self.metrics_port))
        busy = [(name, port) for name, port in ports if check_ports and not port_is_free(self.host, port)]
        if busy:  # all of them at once, not one per attempt
            raise ServerError(
                f"{'port' if len(busy) == 1 else 'ports'} {', '.join(f'{p} ({n})' for n, p in busy)} on {self.host} "
                f"{'is' if len(busy) == 1 else 'are'} already in use",
                hint="pass " + " and ".join(f"--{n}-port" for n, _ in busy) + " with free ports",
            )
        installation = find_tritonserver()
        if installation.backend_source is not None:  # the wheel's server: it has the Python backend only
            missing = sorted(repository_backends(repository) - {"python", ""})
            if missing:
                raise ServerError(
                    f"{repository} needs the {', '.join(missing)} backend(s), which the tritonserver bundled in "
                    "nvidia-pytriton does not have",
                    hint="serve it with an NGC tritonserver container (it was built with --target gpu or "
                    "--native-backends), or rebuild with --target cpu and without --native-backends",
                )
        self._workdir = Path(tempfile.mkdtemp(prefix="tritonkit-server-"))
        if self.log_file is None:
            self.log_file = self._workdir / "tritonserver.log"
        # open for the server's life; a restart appends to the earlier log
        self._log = open(self.log_file, "wb" if check_ports else "ab")  # noqa: SIM115
        environment = server_environment(installation, self.allocator, uses_openvino(repository))
        environment[RESTARTS_ENV] = str(self.restarts)
        self.process = subprocess.Popen(
            self.command(installation, self._workdir),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=environment,
            start_new_session=True,  # Ctrl-C reaches us; we forward a clean SIGTERM
        )
        return self

    def logs(self) -> str:
        if self.log_file is None or not Path(self.log_file).exists():
            return ""
        return Path(self.log_file).read_text(errors="replace")

    def error_lines(self) -> list[str]:
        return [line for line in self.logs().splitlines() if _ERROR_LINE.search(line) and not _BENIGN.search(line)]

    def is_ready(self) -> bool:
        import tritonclient.grpc as grpcclient

        try:
            with grpcclient.InferenceServerClient(self.grpc_url) as client:
                return client.is_server_ready(client_timeout=2)
        except Exception:
            return False

    def wait_until_ready(self, timeout: float = 300) -> TritonServer:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.started.poll() is not None:
                errors = "\n".join(self.error_lines()[-20:]) or self.logs()[-3000:]
                raise ServerError(
                    f"tritonserver exited with code {self.started.returncode} before it was ready:\n{errors}",
                    log_path=str(self.log_file),
                )
            if self.is_ready():
                return self
            time.sleep(0.5)
        self.stop()
        raise ServerError(f"tritonserver was not ready after {timeout:.0f} s", log_path=str(self.log_file))

    def terminate(self) -> None:
        """Ask tritonserver to exit (safe in a signal handler: it does not wait)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = EXIT_TIMEOUT_S + 10) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self._kill_leftovers()
        self._log.close()
        shutil.rmtree(self._workdir / "backends", ignore_errors=True)
        return self.process.returncode

    def _kill_leftovers(self) -> None:
        """SIGKILL whatever is left of the server's session (it, or stubs a killed server orphaned)."""
        try:
            os.killpg(self.started.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.started.wait()

    def serve_forever(
        self,
        supervise: bool = True,
        stopping: Callable[[], bool] = lambda: False,
        report: Callable[[str], None] = lambda message: None,
        ready_timeout: float = 600,
        max_restarts: int = MAX_RESTARTS,
        restart_window_s: float = RESTART_WINDOW_S,
    ) -> int:
        """Wait for the server to exit; with `supervise`, restart it when it dies or a stub does.

        Triton 2.51 does not restart a killed Python-backend stub: its model would fail every
        request from then on while the readiness endpoint still answers 200. So the stubs are
        watched too, and a lost one restarts the whole server. Restarts keep the ports (model
        control mode stays none); a crash loop ends in a ServerError with the last log lines."""
        stubs = self.stub_pids()
        crashes: list[float] = []
        while True:
            try:
                code: int | None = self.started.wait(timeout=SUPERVISE_POLL_S)
            except subprocess.TimeoutExpired:
                code = None
            if stopping() or not supervise:
                if code is not None:
                    return code
                continue
            reason = ""
            if code is None:
                lost = stubs - self.stub_pids() if stubs else set()
                if not lost:
                    continue
                try:  # stubs also go when the server itself died: name the server then
                    code = self.started.wait(timeout=STUB_LOSS_GRACE_S)
                except subprocess.TimeoutExpired:
                    reason = f"a Python-backend process died (pid {', '.join(map(str, sorted(lost)))})"
            if code is not None:
                reason = f"tritonserver exited with {exit_description(code)}"
            died_at = time.monotonic()
            crashes = [t for t in crashes if died_at - t < restart_window_s] + [died_at]
            self.stop(timeout=RESTART_GRACE_S)  # in-flight requests get this long; the rest is killed
            if len(crashes) > max_restarts:
                tail = "\n".join(self.logs().splitlines()[-20:])
                raise ServerError(
                    f"{reason}: {len(crashes)} crashes within {restart_window_s:.0f} s, not restarting again; "
                    f"its last log lines:\n{tail}",
                    log_path=str(self.log_file),
                )
            delay = min(2.0 ** (len(crashes) - 2), MAX_BACKOFF_S) if len(crashes) > 1 else 0.0
            report(f"{reason}; restarting tritonserver" + (f" in {delay:g} s" if delay else ""))
            while time.monotonic() < died_at + delay and not stopping():
                time.sleep(0.1)
            if stopping():
                return self.started.returncode
            self.restarts += 1
            self.start(check_ports=False)
            try:
                self.wait_until_ready(ready_timeout)
            except ServerError as exc:
                if stopping():  # SIGTERM during the restart
                    return self.started.returncode
                report(f"tritonserver did not come back: {str(exc).splitlines()[0]}")
                continue  # counted as another crash
            report(
                f"tritonserver restarted (restart {self.restarts}): serving again "
                f"{time.monotonic() - died_at:.1f} s after the process died"
            )
            stubs = self.stub_pids()

    def __enter__(self) -> TritonServer:
        return self.start().wait_until_ready()

    def __exit__(self, *exc) -> None:
        self.stop()
