"""Shared test fixtures: a real localai server in a subprocess on port 0."""
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# MLX's BLAS is chosen before mlx is first imported (localai.py does this at start).
# Test modules import mlx_vlm (hence mlx) when they are collected, so without this the
# in-process engine tests ran on the wheel's reference BLAS: 10x slower, and not the
# configuration the server runs.
from engines import mlx_setup  # noqa: E402
mlx_setup.configure()


class Server:
    """A running `python localai.py` on 127.0.0.1 and a free port."""

    def __init__(self, args, env, cwd):
        self.args = args
        self.proc = subprocess.Popen(
            [sys.executable, "-u", str(ROOT / "localai.py"), "--host", "127.0.0.1", "--port", "0", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=cwd, text=True)
        self.lines = []
        self.port = None
        ready = threading.Event()

        def pump():
            for line in self.proc.stdout:
                self.lines.append(line)
                m = re.search(r"listening on \S+:(\d+)", line)
                if m and self.port is None:
                    self.port = int(m.group(1))
                    ready.set()
            ready.set()
        threading.Thread(target=pump, daemon=True).start()
        if not ready.wait(300) or self.port is None:
            self.stop()
            raise RuntimeError("server did not start:\n" + self.output())
        self.url = "http://127.0.0.1:%d" % self.port

    def output(self):
        return "".join(self.lines)

    def stop(self, sig=signal.SIGTERM, timeout=20):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="session")
def server_env(tmp_path_factory):
    """Environment for servers: isolated state dir, no Bonjour, offline hub."""
    env = dict(os.environ)
    env["LOCALAI_STATE_DIR"] = str(tmp_path_factory.mktemp("state"))
    env["LOCALAI_BACKLIGHT_ROOT"] = str(tmp_path_factory.mktemp("no-backlight"))
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    # Servers on an empty store would import SmolLM2 at start (1-2 s, 100 MB each);
    # the tests of that first start set LOCALAI_NO_AUTO_IMPORT=0 themselves.
    env["LOCALAI_NO_AUTO_IMPORT"] = "1"
    return env


@pytest.fixture
def start_server(server_env, tmp_path):
    """Factory: start_server(*args, env=None) -> Server; all stopped at test end."""
    started = []

    def start(*args, env=None):
        merged = dict(server_env)
        if "--models-dir" not in args and "LOCALAI_MODELS_DIR" not in (env or {}):
            merged["LOCALAI_MODELS_DIR"] = str(tmp_path / "empty-models")
        merged.update(env or {})
        args = list(args)
        if "--mdns" in args:
            args.remove("--mdns")
        else:
            args.append("--no-mdns")
        server = Server(args, merged, str(tmp_path))
        started.append(server)
        return server
    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def module_server(server_env, tmp_path_factory):
    """One plain server (empty model store) shared by a module's wire tests."""
    env = dict(server_env)
    env["LOCALAI_MODELS_DIR"] = str(tmp_path_factory.mktemp("empty-models"))
    server = Server(["--no-mdns"], env, str(tmp_path_factory.mktemp("cwd")))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory):
    """A model store holding SmolLM2-135M-Instruct imported from the embedded GGUF."""
    from models_fixture import imported_models_dir
    return imported_models_dir(tmp_path_factory.mktemp("models"))
