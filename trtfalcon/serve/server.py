"""Run a real Triton Inference Server (`tritonserver`) on a repository written by `trtfalcon serve triton`.

Where the binary comes from (find_tritonserver, in this order):
- an explicit path (`--tritonserver`, or $TRTFALCON_TRITONSERVER): the binary, or a directory holding it;
- the `nvidia-pytriton` wheel, installed (`pip install --no-deps nvidia-pytriton==0.7.0`) or unpacked by
  fetch_pytriton_server: pytriton/tritonserver/{bin/tritonserver, backends/python, python_backend_stubs/3.X/}
  with its libraries in nvidia_pytriton.libs/. Release 0.7.0 carries Triton 2.51 (container 24.10);
- `tritonserver` on PATH or /opt/tritonserver/bin: NVIDIA's container (nvcr.io/nvidia/tritonserver:<yy.mm>-py3),
  whose Python backend runs the container's own Python; nothing here changes it.

How the Python backend's stub finds trtfalcon (what the wheel needs; worked out from Triton 2.51's stub):
- `triton_python_backend_stub` embeds CPython through libpython3.X.so (one stub per minor version in the wheel,
  linked against the system's libpython) and initializes it *isolated*: PYTHONPATH and PYTHONHOME are ignored.
- The embedded interpreter locates its prefix the way `python3` does when started by name: it searches PATH for
  `python3` and reads the pyvenv.cfg beside it. So the environment the stub sees is the one whose bin/ comes first
  on the server's PATH (what PyTriton relies on as well), and EXECUTION_ENV_PATH (which unpacks a conda-pack
  archive per model) is not needed; nor does the model repository name this machine's paths.
- Here that bin/ is a small stub environment made per server (a venv without pip whose site-packages points at
  the active environment's through a .pth file): the stub imports trtfalcon and its dependencies from the
  environment that started the server.
- numpy: Python backend stubs before Triton 24.11 read numpy arrays through pybind11 < 2.12, which misreads
  numpy 2's dtype layout: every output tensor arrives EMPTY (python_backend PR #384). The wheel's stubs are 24.10,
  so when the active numpy is 2.x the stub environment puts numpy 1.26.4 ahead of it (one cached
  `pip install --target`); everything else still comes from the active environment.

The server listens on 127.0.0.1 unless told otherwise, runs in its own process group with its own
shared-memory prefix, and `stop()` always ends the whole group and removes what it left in /dev/shm.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
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
import urllib.error
import urllib.request
import uuid
import venv
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from trtfalcon.errors import MissingDependencyError, TrtFalconError

PYTRITON_WHEEL = "nvidia-pytriton==0.7.0"  # the release tested here: Triton 2.51.0 (24.10)
PYTRITON_DIR = "nvidia-pytriton-0.7.0"  # its unpacked server inside the cache
# The newest numpy whose C layout a pre-24.11 stub reads correctly, and a release with wheels for Python 3.9-3.12.
OLD_STUB_NUMPY = "numpy==1.26.4"
CONTAINER_BINARY = Path("/opt/tritonserver/bin/tritonserver")
SHM_DIR = Path("/dev/shm")


class TritonServerError(TrtFalconError, RuntimeError):
    """tritonserver did not start, did not become ready, or a request to its HTTP API failed."""


def cache_dir() -> Path:
    """Where fetched servers and stub numpy overlays are kept: $TRTFALCON_TRITON_CACHE or ~/.cache/trtfalcon/triton."""
    return Path(os.environ.get("TRTFALCON_TRITON_CACHE", Path.home() / ".cache" / "trtfalcon" / "triton"))


# ---------------------------------------------------------------------------------------------- finding one
@dataclass(frozen=True)
class TritonInstall:
    """A tritonserver binary and, for the pytriton wheel, what must be assembled around it.

    stubs: pytriton/tritonserver/python_backend_stubs (one stub per Python minor version), None for a container;
    python_backend: the directory with libtriton_python.so and triton_python_backend_utils.py (wheel only);
    libs: directories the binary's backends need on LD_LIBRARY_PATH (the wheel's bundled libraries).
    """

    binary: Path
    origin: str
    stubs: Path | None = None
    python_backend: Path | None = None
    libs: tuple[Path, ...] = ()

    @property
    def is_pytriton_wheel(self) -> bool:
        return self.stubs is not None

    def stub_for(self, version: tuple[int, int]) -> Path:
        """The Python backend stub built for `version` (wheel only)."""
        assert self.stubs is not None
        stub = self.stubs / f"{version[0]}.{version[1]}" / "triton_python_backend_stub"
        if not stub.is_file():
            have = sorted(p.name for p in self.stubs.iterdir() if (p / "triton_python_backend_stub").is_file())
            raise MissingDependencyError(
                f"{self.stubs}: expected a Python backend stub for Python {version[0]}.{version[1]} (the Python "
                f"running trtfalcon), found stubs for {', '.join(have) or 'none'}")
        return stub


def _from_wheel_root(root: Path, origin: str) -> TritonInstall | None:
    """root = the directory holding pytriton/ (site-packages, or an unpacked wheel)."""
    server = root / "pytriton" / "tritonserver"
    binary = server / "bin" / "tritonserver"
    if not binary.is_file():
        return None
    return TritonInstall(binary=binary, origin=origin, stubs=server / "python_backend_stubs",
                         python_backend=server / "backends" / "python", libs=(root / "nvidia_pytriton.libs",))


def _from_path(path: Path, origin: str) -> TritonInstall:
    """A binary, a Triton install directory (bin/tritonserver), or an unpacked wheel given by its root, its
    pytriton/ or its pytriton/tritonserver/ directory."""
    path = path.expanduser().resolve()
    binary = path if path.is_file() else path / "bin" / "tritonserver"
    # .../pytriton/tritonserver/bin/tritonserver: keep the wheel's stubs and libraries beside it
    parts = binary.parts
    if parts[-4:-2] == ("pytriton", "tritonserver") and binary.is_file():
        found = _from_wheel_root(binary.parents[3], origin)
        if found is not None:
            return found
    found = _from_wheel_root(path.parent if path.name == "pytriton" else path, origin)
    if found is not None:
        return found
    if binary.is_file():
        return TritonInstall(binary, origin)
    raise MissingDependencyError(
        f"{path} ({origin}): expected the tritonserver binary, a Triton install directory (bin/tritonserver) or "
        "an unpacked nvidia-pytriton wheel (pytriton/tritonserver/bin/tritonserver), found none of them")


def find_tritonserver(explicit: str | Path | None = None) -> TritonInstall:
    """The first tritonserver found: `explicit`, $TRTFALCON_TRITONSERVER, an installed nvidia-pytriton, PATH,
    /opt/tritonserver, a server fetch_pytriton_server unpacked earlier. Raises MissingDependencyError saying where
    it looked and how to get one."""
    if explicit is not None:
        return _from_path(Path(explicit), "--tritonserver")
    env = os.environ.get("TRTFALCON_TRITONSERVER")
    if env:
        return _from_path(Path(env), "$TRTFALCON_TRITONSERVER")
    spec = importlib.util.find_spec("pytriton")  # locates the package without importing it (it needs numpy < 2)
    if spec is not None and spec.submodule_search_locations:
        found = _from_wheel_root(Path(list(spec.submodule_search_locations)[0]).parent, "installed nvidia-pytriton")
        if found is not None:
            return found
    on_path = shutil.which("tritonserver")
    if on_path:
        return TritonInstall(Path(on_path), "PATH")
    if CONTAINER_BINARY.is_file():
        return TritonInstall(CONTAINER_BINARY, str(CONTAINER_BINARY.parent.parent))
    fetched = _from_wheel_root(cache_dir() / PYTRITON_DIR, f"fetched {PYTRITON_WHEEL}")
    if fetched is not None:
        return fetched
    raise MissingDependencyError(
        "tritonserver: not found (looked at $TRTFALCON_TRITONSERVER, an installed nvidia-pytriton, PATH, "
        f"{CONTAINER_BINARY}, {cache_dir() / PYTRITON_DIR}). Run inside nvcr.io/nvidia/tritonserver:<yy.mm>-py3, "
        f"or `pip install --no-deps {PYTRITON_WHEEL}` (--no-deps: it pins numpy < 2, which the server binary does "
        "not need), or pass --tritonserver PATH")


def _pip(*args: str, timeout_s: float) -> None:
    cmd = [sys.executable, "-m", "pip", *args, "-q", "--disable-pip-version-check"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if r.returncode != 0:
        raise MissingDependencyError(f"`{' '.join(cmd[2:])}` failed (exit {r.returncode}): "
                                     f"{(r.stderr or r.stdout).strip()[-600:]}")


def _cached_dir(dest: Path, fill) -> Path:  # noqa: ANN001 - fill(tmp_dir) writes the content
    """dest, made once by fill() in a temp dir beside it and renamed into place (a concurrent maker loses
    the rename race harmlessly)."""
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        fill(tmp)
        try:
            tmp.rename(dest)
        except OSError:
            if not dest.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def fetch_pytriton_server(cache: Path | None = None, timeout_s: float = 600.0) -> TritonInstall:
    """Download the pinned nvidia-pytriton wheel (pip, --no-deps) and unpack only its server: the binary,
    backends, stubs and bundled libraries (about 150 MB), once, into the cache."""
    dest = (cache or cache_dir()) / PYTRITON_DIR

    def fill(tmp: Path) -> None:
        _pip("download", "--no-deps", "--only-binary=:all:", PYTRITON_WHEEL, "-d", str(tmp / "wheel"),
             timeout_s=timeout_s)
        [wheel] = list((tmp / "wheel").glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            for info in zf.infolist():
                if info.filename.startswith(("pytriton/tritonserver/", "nvidia_pytriton.libs/")):
                    target = zf.extract(info, tmp)
                    mode = (info.external_attr >> 16) & 0o777
                    if mode:
                        os.chmod(target, mode)  # zipfile drops the executable bits
        wheel.unlink()

    _cached_dir(dest, fill)
    found = _from_wheel_root(dest, f"fetched {PYTRITON_WHEEL}")
    if found is None:
        raise MissingDependencyError(f"{dest}: expected pytriton/tritonserver/bin/tritonserver after unpacking "
                                     f"{PYTRITON_WHEEL}, found none (remove the directory and retry)")
    return found


# ---------------------------------------------------------------------------------------------- the stub's Python
def stub_needs_old_numpy(install: TritonInstall) -> bool:
    """True when the stub would send empty outputs: a pre-24.11 stub (the wheel's) with numpy 2 active."""
    import numpy

    return install.is_pytriton_wheel and int(numpy.__version__.split(".")[0]) >= 2


def old_stub_numpy(cache: Path | None = None, timeout_s: float = 600.0) -> Path:
    """A directory holding numpy 1.26.4 for this Python (pip install --target, once, into the cache)."""
    tag = f"cp{sys.version_info[0]}{sys.version_info[1]}"
    dest = (cache or cache_dir()) / f"{OLD_STUB_NUMPY.replace('==', '-')}-{tag}"
    return _cached_dir(dest, lambda tmp: _pip("install", "--no-deps", "--only-binary=:all:", "--target",
                                              str(tmp), OLD_STUB_NUMPY, timeout_s=timeout_s))


def make_stub_env(dest: Path, numpy_overlay: Path | None = None) -> Path:
    """A pip-less venv at dest whose site-packages reach the active environment's (and numpy_overlay's first).

    Its bin/ goes first on the server's PATH: the stub's embedded interpreter finds bin/python3 there, takes
    dest as its prefix and processes the .pth files below, in name order.
    """
    venv.EnvBuilder(with_pip=False, symlinks=True, clear=True).create(dest)
    site_dir = Path(sysconfig.get_path("purelib", vars={"base": str(dest), "platbase": str(dest)}))
    lines = []
    if numpy_overlay is not None:
        lines.append(f"{numpy_overlay}\n")
    import site

    for d in [*site.getsitepackages(), *([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])]:
        if Path(d).is_dir():
            lines.append(f"import site; site.addsitedir({str(d)!r})\n")  # addsitedir: its .pth files run too
    (site_dir / "trtfalcon-active-env.pth").write_text("".join(lines))
    return dest / "bin"


def _libpython_dirs() -> list[Path]:
    """Where the stub finds this Python's libpython3.X.so.1.0 (it is linked against it by name)."""
    name = sysconfig.get_config_var("INSTSONAME") or f"libpython{sys.version_info[0]}.{sys.version_info[1]}.so.1.0"
    libdir = Path(sysconfig.get_config_var("LIBDIR") or sys.base_prefix)
    if (libdir / name).exists():
        return [libdir]  # this interpreter's own (e.g. pyenv), ahead of a system one of another patch release
    try:
        ctypes.CDLL(name)
    except OSError:
        raise MissingDependencyError(
            f"{name}: the Python backend stub needs this Python's shared library, found it neither in {libdir} "
            "nor on the loader's path (a Python built without --enable-shared: install libpython3.X or use "
            "another Python)") from None
    return []


@dataclass
class ServerPorts:
    http: int
    grpc: int
    metrics: int


def free_ports(host: str, n: int = 3) -> list[int]:
    """n distinct free TCP ports on host (bound together, then released: the server takes them right after)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# ---------------------------------------------------------------------------------------------- the server
@dataclass
class TritonServer:
    """`tritonserver` on a model repository, as a context manager: start() waits until it is ready, stop() (also
    on any error) shuts it down, then kills its process group and removes its shared memory.

    model_control: "none" (load everything at start, Triton's default) or "explicit" (load `load_models` at
    start; load_model/unload_model at run time). Ports 0 = free ports chosen on `host`.
    """

    repository: Path
    install: TritonInstall | None = None
    host: str = "127.0.0.1"
    http_port: int = 0
    grpc_port: int = 0
    metrics_port: int = 0
    model_control: str = "none"
    load_models: Sequence[str] = ("*",)
    startup_timeout_s: float = 300.0
    stop_timeout_s: float = 30.0
    log_path: Path | None = None
    extra_args: Sequence[str] = ()
    announce: Any = None  # a print-like callable for progress lines (the CLI), or None
    ports: ServerPorts | None = field(default=None, init=False)
    process: subprocess.Popen | None = field(default=None, init=False)
    _work: Path | None = field(default=None, init=False)
    _log: Any = field(default=None, init=False)
    _shm_prefix: str = field(default="", init=False)
    _picked: set[int] = field(default_factory=set, init=False)  # ports chosen here (0 given)

    # ---- addresses
    @property
    def http_url(self) -> str:
        return f"{self._client_host}:{self._ports.http}"

    @property
    def grpc_url(self) -> str:
        return f"{self._client_host}:{self._ports.grpc}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._client_host}:{self._ports.metrics}/metrics"

    @property
    def _client_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host

    @property
    def _ports(self) -> ServerPorts:
        if self.ports is None:
            raise TritonServerError("tritonserver: not started")
        return self.ports

    # ---- lifecycle
    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> TritonServer:
        if self.model_control not in ("none", "explicit"):
            raise TritonServerError(f"model_control: expected 'none' or 'explicit', found {self.model_control!r}")
        install = self.install or find_tritonserver()
        self.install = install
        self._work = Path(tempfile.mkdtemp(prefix="trtfalcon-tritonserver-"))
        try:
            env, backend_dir = self._prepare(install)
            for attempt in range(3):  # a free port we chose can be taken by someone else before the server binds it
                self._launch(install, env, backend_dir)
                if self._wait_ready(retry_on_taken_port=attempt < 2):
                    return self
                self._end_process()
            raise AssertionError("unreachable: the last attempt raises")
        except BaseException:
            self.stop()
            raise

    def _prepare(self, install: TritonInstall) -> tuple[dict[str, str], Path | None]:
        assert self._work is not None
        env = dict(os.environ)
        env.pop("PYTHONHOME", None)
        if not install.is_pytriton_wheel:
            return env, None  # a container's server: its own backends and Python
        backend_dir = self._work / "backends"
        python_dir = backend_dir / "python"
        python_dir.mkdir(parents=True)
        assert install.python_backend is not None
        for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
            shutil.copy2(install.python_backend / name, python_dir / name)
        shutil.copy2(install.stub_for(sys.version_info[:2]), python_dir / "triton_python_backend_stub")
        overlay = None
        if stub_needs_old_numpy(install):
            if self.announce:
                self.announce(f"numpy {OLD_STUB_NUMPY.split('==')[1]} for the Python backend stub (Triton 24.10's "
                              "stub sends empty outputs with numpy 2) ...")
            overlay = old_stub_numpy()
        stub_bin = make_stub_env(self._work / "stub-env", overlay)
        env["PATH"] = os.pathsep.join([str(stub_bin), env.get("PATH", "")])
        libs = [*map(str, _libpython_dirs()), *map(str, install.libs)]
        env["LD_LIBRARY_PATH"] = os.pathsep.join([*libs, *filter(None, [env.get("LD_LIBRARY_PATH")])])
        return env, backend_dir

    def _launch(self, install: TritonInstall, env: dict[str, str], backend_dir: Path | None) -> None:
        assert self._work is not None
        chosen = iter(free_ports(self.host))
        self.ports = ServerPorts(*(p or next(chosen) for p in (self.http_port, self.grpc_port, self.metrics_port)))
        self._picked = {picked for given, picked in zip((self.http_port, self.grpc_port, self.metrics_port),
                                                        (self.ports.http, self.ports.grpc, self.ports.metrics))
                        if not given}
        self._shm_prefix = f"trtfalcon-{uuid.uuid4().hex[:12]}-"
        cmd = [str(install.binary), f"--model-repository={Path(self.repository).resolve()}",
               f"--http-address={self.host}", f"--http-port={self.ports.http}",
               f"--grpc-address={self.host}", f"--grpc-port={self.ports.grpc}",
               f"--metrics-address={self.host}", f"--metrics-port={self.ports.metrics}",
               f"--model-control-mode={self.model_control}",
               f"--backend-config=python,shm-region-prefix-name={self._shm_prefix}",
               f"--exit-timeout-secs={max(1, int(self.stop_timeout_s) - 5)}"]
        if self.model_control == "explicit":
            cmd += [f"--load-model={m}" for m in self.load_models]
        if backend_dir is not None:
            cmd.append(f"--backend-directory={backend_dir}")
            cmd.append("--allow-gpu-metrics=false")  # the wheel's server on a machine without GPUs
        cmd += list(self.extra_args)
        log_path = self.log_path or (self._work / "tritonserver.log")
        if self._log is not None:
            self._log.close()
        self._log = open(log_path, "ab")
        self.process = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                        stdin=subprocess.DEVNULL, start_new_session=True)

    def _wait_ready(self, retry_on_taken_port: bool) -> bool:
        """True once ready; False if it exited because a port we picked was taken meanwhile (start again)."""
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            assert self.process is not None
            code = self.process.poll()
            if code is not None:
                tail = self.log_tail()
                # e.g. failed to start HTTP service: Unavailable - Socket '127.0.0.1:8000' already in use
                taken = re.search(r"Socket '[^']*:(\d+)' already in use", tail)
                if taken and int(taken.group(1)) in self._picked:
                    if retry_on_taken_port:
                        return False
                elif taken:
                    raise TritonServerError(f"tritonserver: port {taken.group(1)} on {self.host} is already in use "
                                            "(another server?); choose another port or stop that process")
                raise TritonServerError(f"tritonserver exited with {code} before it was ready:\n{tail}")
            if self.is_ready():
                return True
            if time.monotonic() > deadline:
                raise TritonServerError(f"tritonserver: not ready within {self.startup_timeout_s:.0f} s:\n"
                                        f"{self.log_tail()}")
            time.sleep(0.25)

    def wait(self) -> int:
        """Block until the server exits (the CLI's foreground mode); its exit code."""
        assert self.process is not None
        return self.process.wait()

    def stop(self) -> int | None:
        """SIGTERM (Triton unloads its models, so each instance's finalize runs), then SIGKILL for whatever of
        its process group is left after stop_timeout_s; remove its shared memory and work directory."""
        code = self._end_process()
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._work is not None:
            if self.log_path is None and code not in (0, None) and self.announce:
                self.announce(self.log_tail())
            shutil.rmtree(self._work, ignore_errors=True)
            self._work = None
        return code

    def _end_process(self) -> int | None:
        proc, self.process = self.process, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the group we created: the server and its stub processes
        except (ProcessLookupError, PermissionError):
            pass
        code = proc.wait()
        if self._shm_prefix and SHM_DIR.is_dir():
            for leftover in SHM_DIR.glob(f"{self._shm_prefix}*"):
                leftover.unlink(missing_ok=True)
        return code

    def log_tail(self, chars: int = 6000) -> str:
        path = self.log_path or (self._work / "tritonserver.log" if self._work else None)
        if path is None or not Path(path).is_file():
            return "(no log)"
        if self._log is not None:
            self._log.flush()
        return Path(path).read_bytes()[-chars:].decode("utf-8", errors="replace")

    # ---- Triton's HTTP API (health, repository), through the standard library
    def _http(self, method: str, path: str, body: dict | None = None, timeout_s: float = 5.0) -> tuple[int, bytes]:
        data = json.dumps(body).encode() if body is not None else (b"" if method == "POST" else None)
        req = urllib.request.Request(f"http://{self.http_url}{path}", data=data, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def is_ready(self) -> bool:
        try:
            return self._http("GET", "/v2/health/ready", timeout_s=2.0)[0] == 200
        except OSError:
            return False  # not listening yet

    def model_ready(self, name: str) -> bool:
        return self._http("GET", f"/v2/models/{name}/ready")[0] == 200

    def load_model(self, name: str, timeout_s: float = 300.0) -> None:
        status, body = self._http("POST", f"/v2/repository/models/{name}/load", timeout_s=timeout_s)
        if status != 200:
            raise TritonServerError(f"model {name!r}: load failed (HTTP {status}): {body.decode(errors='replace')}")

    def unload_model(self, name: str, timeout_s: float = 60.0) -> None:
        """Unload and wait until it is gone (Triton answers the unload request before the instances finish)."""
        status, body = self._http("POST", f"/v2/repository/models/{name}/unload", timeout_s=timeout_s)
        if status != 200:
            raise TritonServerError(f"model {name!r}: unload failed (HTTP {status}): {body.decode(errors='replace')}")
        deadline = time.monotonic() + timeout_s
        while self._model_state(name) not in ("UNAVAILABLE", None):
            if time.monotonic() > deadline:
                raise TritonServerError(f"model {name!r}: still loaded {timeout_s:.0f} s after unload")
            time.sleep(0.1)

    def _model_state(self, name: str) -> str | None:
        status, body = self._http("POST", "/v2/repository/index", {})
        if status != 200:
            raise TritonServerError(f"repository index: HTTP {status}: {body.decode(errors='replace')}")
        for m in json.loads(body):
            if m.get("name") == name:
                return m.get("state")
        return None

    def metrics(self) -> str:
        """The Prometheus text of the metrics endpoint (Triton's and the model's own trtfalcon_* series)."""
        with urllib.request.urlopen(self.metrics_url, timeout=5.0) as r:
            return r.read().decode()


def serve_forever(server: TritonServer, announce: Any = print) -> int:
    """Start `server`, say where it listens, and serve until it exits, Ctrl-C or SIGTERM; always stop it.
    Returns the exit status for the command (0 after Ctrl-C or SIGTERM)."""

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        server.start()
        assert server.install is not None and server.ports is not None
        announce(f"tritonserver ({server.install.origin}: {server.install.binary}) serving {server.repository}")
        announce(f"  gRPC {server.host}:{server.ports.grpc}   HTTP {server.host}:{server.ports.http}   "
                 f"metrics http://{server.host}:{server.ports.metrics}/metrics   (Ctrl-C stops it)")
        code = server.wait()
        announce(f"tritonserver exited with {code}:\n{server.log_tail()}")
        return code or 1
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.stop()
