"""Shared fixtures: offline models and real `vllm serve` processes on 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vllm_restkv.cpu import fast_cpu_dtype
from vllm_restkv.models import set_offline_env

set_offline_env()
# The serving dtype of the tests' servers: the checkpoints' bfloat16 where this CPU runs it natively, else float32
# (emulated bf16 made the server tests several times slower on AVX2-only CPUs; see vllm_restkv/cpu.py).
SERVE_DTYPE = fast_cpu_dtype()
REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
VLLM = str(BIN / "vllm")


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    from vllm_restkv.models import prepare_tiny

    return prepare_tiny()


@pytest.fixture(scope="session")
def smollm2_model() -> Path:
    from vllm_restkv.models import prepare_smollm2

    return prepare_smollm2()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "PYTHONUNBUFFERED": "1",
    })
    env.update(extra)
    return env


class Server:
    """A real `vllm serve` process; its combined output goes to `log_path`."""

    def __init__(self, model: Path, args: list[str], log_path: Path, env: dict[str, str] | None = None,
                 eager: bool = True):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        cmd = [VLLM, "serve", str(model), "--host", "127.0.0.1", "--port", str(self.port),
               *(["--enforce-eager"] if eager else []), "--served-model-name", "m", *args]
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env or server_env(),
                                     start_new_session=True)

    def wait_ready(self, timeout: float = 240) -> None:
        import httpx

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode}:\n{self.output()[-4000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            time.sleep(1)
        raise TimeoutError(f"vllm serve not ready after {timeout} s:\n{self.output()[-4000:]}")

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log.close()
        return self.proc.returncode


@contextlib.contextmanager
def running_server(model: Path, args: list[str], log_path: Path, env: dict[str, str] | None = None,
                   eager: bool = True):
    """`eager` False: vLLM's default compilation (torch.compile on the CPU: 30-90 s more at start-up)."""
    server = Server(model, args, log_path, env, eager)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def run_vllm(args: list[str], timeout: float = 180, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the `vllm` CLI to completion (for start-up failures and --help)."""
    return subprocess.run([VLLM, *args], capture_output=True, text=True, timeout=timeout, env=env or server_env())


@contextlib.contextmanager
def running_prometheus(targets: list[str], workdir: Path, scrape_interval: str = "1s"):
    """A real Prometheus server (Debian's package) on 127.0.0.1 scraping `targets` (host:port); yields its URL."""
    import shutil

    import httpx

    exe = shutil.which("prometheus")
    assert exe, "prometheus is missing: run ./deploy/install_test_tools.sh (Debian's prometheus package)"
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = workdir / "prometheus.yml"
    config.write_text(
        f"global:\n  scrape_interval: {scrape_interval}\n  scrape_timeout: {scrape_interval}\n"
        "scrape_configs:\n  - job_name: vllm-restkv\n    static_configs:\n"
        f"      - targets: [{', '.join(repr(t) for t in targets)}]\n")
    log_path = workdir / "prometheus.log"
    log = open(log_path, "w")
    proc = subprocess.Popen([exe, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/-/ready", timeout=2).status_code == 200:
                    break
            assert time.time() < deadline, "Prometheus did not become ready in 60 s"
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
