"""Host and Origin checks, as ASGI middleware in front of every route.

- **Host**: a request whose ``Host`` header names none of the allowed hosts gets 400. This stops
  DNS rebinding: a web page whose name an attacker points at this machine's address can make a
  browser send requests here, but they carry the attacker's name as Host.
- **Origin**: a state-changing request (POST, PUT, PATCH, DELETE) that a browser sends from a
  page of another origin gets 403 (its ``Origin`` header, or ``Sec-Fetch-Site: cross-site``),
  so that a page an operator opens cannot score images or reload the model through them.
  Requests without those headers (curl, line controllers) are not browsers' and pass.
"""

from __future__ import annotations

import json
import socket
from typing import Any, Iterable
from urllib.parse import urlsplit

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
#: names every server answers to: the loopback names
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
_DEFAULT_PORTS = {"http": 80, "https": 443}


def default_allowed_hosts(bound: str) -> list[str]:
    """The hosts a server bound to ``bound`` answers to unless ``--allowed-hosts`` says otherwise:
    the loopback names and the bound address; for every interface (0.0.0.0, ::), the machine's
    own names and the addresses of its interfaces."""
    hosts = list(LOOPBACK_HOSTS)
    if bound in ("0.0.0.0", "::", ""):
        hosts += [socket.gethostname(), socket.getfqdn()]
        hosts += _interface_addresses()
    else:
        hosts.append(bound)
    return list(dict.fromkeys(_normal_name(host) for host in hosts if host))


def _interface_addresses() -> list[str]:
    try:
        import psutil
    except ImportError:  # psutil comes with the serve extra; without it, what the name resolves to
        try:
            return [info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None)]
        except OSError:
            return []
    return [address.address.split("%")[0] for addresses in psutil.net_if_addrs().values() for address in addresses if address.family in (socket.AF_INET, socket.AF_INET6)]


def _normal_name(host: str) -> str:
    return host.strip().lower().rstrip(".").strip("[]")


def split_host(value: str) -> tuple[str, int | None]:
    """A Host header's name and port: "[::1]:8000" -> ("::1", 8000), "Example.com" -> ("example.com", None)."""
    value = value.strip()
    if value.startswith("["):
        name, _, rest = value[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif value.count(":") == 1:
        name, _, port = value.partition(":")
    else:
        name, port = value, ""  # a bare IPv6 address is not a valid Host, but has no port either
    return _normal_name(name), int(port) if port.isdigit() else None


class HostAndOriginGuard:
    """ASGI middleware: refuses foreign Host headers (400) and cross-origin state-changing requests (403)."""

    def __init__(self, app: Any, allowed_hosts: Iterable[str]) -> None:
        self.app = app
        hosts = [_normal_name(host) for host in allowed_hosts]
        self.any_host = "*" in hosts
        self.exact = {host for host in hosts if not host.startswith("*.")}
        self.suffixes = tuple(host[1:] for host in hosts if host.startswith("*."))  # "*.example.com" -> ".example.com"

    def host_allowed(self, name: str) -> bool:
        return self.any_host or name in self.exact or (bool(self.suffixes) and name.endswith(self.suffixes))

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {key.decode("latin-1"): value.decode("latin-1") for key, value in scope["headers"]}
        host_header = headers.get("host", "")
        name, port = split_host(host_header)
        if not self.host_allowed(name):
            await _refuse(send, 400, f"host '{host_header}' is not served here; the server's --allowed-hosts lists the names it answers to")
            return
        if scope["method"] not in SAFE_METHODS and _cross_origin(headers, name, port, scope.get("scheme", "http")):
            await _refuse(send, 403, "cross-origin request refused: this server takes state-changing requests only from its own page or from clients that are not browsers")
            return
        await self.app(scope, receive, send)


def _cross_origin(headers: dict[str, str], host: str, port: int | None, scheme: str) -> bool:
    if headers.get("sec-fetch-site", "") == "cross-site":
        return True
    origin = headers.get("origin")
    if origin is None:
        return False
    parts = urlsplit(origin)
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:  # "null" (a sandboxed page, a file), or junk
        return True
    origin_port = parts.port or _DEFAULT_PORTS[parts.scheme]
    # Behind a proxy that ends TLS the request's own scheme is http: the origin's default port stands in.
    host_port = port or _DEFAULT_PORTS.get(parts.scheme, _DEFAULT_PORTS.get(scheme, 80))
    return (_normal_name(parts.hostname), origin_port) != (host, host_port)


async def _refuse(send: Any, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
