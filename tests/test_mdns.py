"""Bonjour: a real zeroconf browser on this machine finds the server while it
runs (right port, TXT records) and loses it when the server stops; a failure
to advertise is a warning, never a crash."""
import threading
import time

import pytest

import localai
from test_http import request

zeroconf = pytest.importorskip("zeroconf")
SERVICE = "_http._tcp.local."


@pytest.fixture
def start_server(start_server):
    """The shared factory, minus the first-start model import (these servers need no model)."""
    def start(*args, env=None):
        return start_server(*args, env=dict({"LOCALAI_NO_AUTO_IMPORT": "1"}, **(env or {})))
    return start


class Watcher:
    """A ServiceBrowser that records which service names are present."""

    def __init__(self):
        self.zc = zeroconf.Zeroconf()
        self.present = set()
        self.lock = threading.Lock()
        self.browser = zeroconf.ServiceBrowser(self.zc, SERVICE, handlers=[self.on_change])

    def on_change(self, zeroconf, service_type, name, state_change):
        with self.lock:
            if state_change is zeroconf_module().ServiceStateChange.Removed:
                self.present.discard(name)
            else:
                self.present.add(name)

    def find(self, port, timeout=15):
        """The ServiceInfo of a present service on `port`, or None."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                names = list(self.present)
            for name in names:
                info = self.zc.get_service_info(SERVICE, name, timeout=2000)
                if info is not None and info.port == port:
                    return info
            time.sleep(0.2)
        return None

    def gone(self, name, timeout=15):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if name not in self.present:
                    return True
            time.sleep(0.1)
        return False

    def close(self):
        self.browser.cancel()
        self.zc.close()


def zeroconf_module():
    return zeroconf


@pytest.fixture
def watcher():
    w = Watcher()
    yield w
    w.close()


def test_browser_finds_the_service_and_loses_it_after_stop(start_server, watcher):
    server = start_server("--mdns")
    info = watcher.find(server.port)
    assert info is not None, server.output()
    props = {k.decode(): v.decode() for k, v in info.properties.items()}
    assert props["version"] == localai.VERSION
    assert props["openai"] == "/v1" and props["ollama"] == "/api" and props["path"] == "/"
    assert info.name.startswith("localai on ")
    assert "127.0.0.1" in info.parsed_addresses()
    # the service name is printed at start
    deadline = time.monotonic() + 10
    while "Bonjour name:" not in server.output() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert info.name in server.output()
    # the advertised address really serves
    status, _, _ = request(server, "GET", "/status")
    assert status == 200
    assert server.stop() == 0
    assert watcher.gone(info.name), "service still listed after the server stopped"
    assert watcher.zc.get_service_info(SERVICE, info.name, timeout=1500) is None


def test_mdns_name_is_an_allowed_host(start_server, watcher):
    server = start_server("--mdns")
    info = watcher.find(server.port)
    assert info is not None
    c_host = info.server.rstrip(".")                    # e.g. myhost.local
    status, _, _ = request(server, "GET", "/status", headers={"Host": "%s:%d" % (c_host, server.port)})
    assert status == 200


def test_no_mdns_advertises_nothing(start_server, watcher):
    server = start_server()                             # the fixture passes --no-mdns
    assert watcher.find(server.port, timeout=4) is None
    assert "Bonjour name" not in server.output()


def test_failure_to_advertise_is_a_warning_not_a_crash(start_server, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "zeroconf.py").write_text("raise ImportError('zeroconf is broken here')\n")
    import os
    env = {"PYTHONPATH": os.pathsep.join([str(broken), os.environ.get("PYTHONPATH", "")])}
    server = start_server("--mdns", env=env)
    deadline = time.monotonic() + 10
    while "Bonjour announcement failed" not in server.output() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "WARNING" in server.output() and "Bonjour announcement failed" in server.output()
    status, _, _ = request(server, "GET", "/status")
    assert status == 200
    assert server.stop() == 0
