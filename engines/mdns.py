"""Bonjour (mDNS/DNS-SD) announcement with zeroconf.

Advertises `_http._tcp` (so any Bonjour browser sees a web service) with TXT
records naming the version and the API paths. Failing to advertise (no multicast,
zeroconf missing) is a warning: the server keeps serving.
"""
import logging
import socket
import threading

log = logging.getLogger("localai.mdns")
SERVICE_TYPE = "_http._tcp.local."
TXT = {"path": "/", "openai": "/v1", "ollama": "/api"}


class Advertiser:
    def __init__(self, port, version, host="0.0.0.0", name=None):
        self.port, self.version, self.host = port, version, host
        short = socket.gethostname().split(".")[0] or "localai"
        self.name = name or "localai on %s" % short
        self.hostname = "%s.local." % short
        self.zc = self.info = None
        self.lock = threading.Lock()      # start() runs in a thread; stop() may come meanwhile
        self.stopped = False

    @property
    def service_name(self):
        return "%s.%s" % (self.name, SERVICE_TYPE)

    def _addresses(self):
        if self.host not in ("0.0.0.0", "::", ""):
            return [self.host]
        import ifaddr
        found = []
        for adapter in ifaddr.get_adapters():
            for ip in adapter.ips:
                if ip.is_IPv4 and not ip.ip.startswith("127."):
                    found.append(ip.ip)
        return found or ["127.0.0.1"]

    def start(self):
        """Register (blocking: probing takes about a second). Returns the name or None."""
        with self.lock:
            if self.stopped:              # the server stopped before we got going
                return None
            return self._register()

    def _register(self):
        try:
            from zeroconf import ServiceInfo, Zeroconf
            addresses = self._addresses()
            self.info = ServiceInfo(
                SERVICE_TYPE, self.service_name, port=self.port,
                parsed_addresses=addresses, server=self.hostname,
                properties=dict(TXT, version=self.version))
            self.zc = Zeroconf()
            self.zc.register_service(self.info, allow_name_change=True)
            log.info("Bonjour: announced %r at %s port %d", self.info.name, ", ".join(addresses), self.port)
            print("  Bonjour name:     %s (%s)" % (self.info.name, self.hostname), flush=True)
            return self.info.name
        except Exception as exc:        # never fatal: the server works without Bonjour
            log.warning("Bonjour announcement failed: %s", exc)
            self.close()
            return None

    def stop(self):
        """Unregister (goodbye packets, so browsers drop us at once) and close."""
        with self.lock:
            self.stopped = True
            if self.zc is not None and self.info is not None:
                try:
                    self.zc.unregister_service(self.info)
                except Exception as exc:
                    log.warning("Bonjour: unregister failed: %s", exc)
            self.close()

    def close(self):
        if self.zc is not None:
            try:
                self.zc.close()
            except Exception:
                pass
            self.zc = None
