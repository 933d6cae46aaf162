"""The HTTP connection guards uvicorn lacks, as its h11 protocol with two additions.

- **A deadline for a request's headers.** uvicorn waits for ever for headers that arrive a byte
  at a time (a "slowloris"); each such connection holds a place. Here a request whose headers
  are not complete within ``header_timeout_s`` of the connection opening (or of the last
  answer on it) gets 408 and the connection is closed. The body's own deadline is the app's
  (``requests.read_body``).
- **A cap on open connections, answered as the app answers.** uvicorn's ``limit_concurrency``
  answers 503 without Retry-After; here a connection beyond ``max_connections`` gets 503 with
  Retry-After and is closed at once. uvicorn's limit stays set above it as a last resort.

``patchcore serve`` passes :func:`guarded_protocol` to uvicorn's ``Config(http=...)``, which
takes a protocol class.
"""

from __future__ import annotations

import asyncio
import json
import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

#: seconds a client has to send a request's headers
HEADER_TIMEOUT_S = 10.0
#: seconds a client is asked to wait before it opens another connection
RETRY_AFTER_S = 1
#: seconds a refused connection is read on (and the bytes dropped) after its answer, before it
#: is closed: closing a socket with unread bytes resets it, and the reset can overtake the answer
LINGER_S = 2.0


def guarded_protocol(max_connections: int, header_timeout_s: float = HEADER_TIMEOUT_S) -> type[H11Protocol]:
    """An h11 protocol class for uvicorn with these limits."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"max_connections": max_connections, "header_timeout_s": header_timeout_s})


class GuardedH11Protocol(H11Protocol):
    max_connections: int = 64
    header_timeout_s: float = HEADER_TIMEOUT_S

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._header_deadline: asyncio.TimerHandle | None = None
        self._refused = False
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            self._refuse(503, "Service Unavailable", f"the server has {self.max_connections} connections open, its limit; retry shortly", {"retry-after": str(RETRY_AFTER_S)})
            return
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._refused:  # answered already: what the client still sends is dropped
            return
        super().data_received(data)
        if self._header_deadline is not None and self.conn.their_state is not h11.IDLE:  # the headers are in
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:  # waiting for the next request
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._header_deadline = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._refuse(408, "Request Timeout", f"the request's headers did not arrive within {self.header_timeout_s:g} s")

    def _refuse(self, status: int, reason: str, message: str, headers: dict[str, str] | None = None) -> None:
        """A whole answer written straight to the socket (h11 answers only a request it parsed),
        then the connection closed: at once where TLS cannot half-close it, else after the
        client closes its side or :data:`LINGER_S`, whichever comes first."""
        self._refused = True
        self._disarm()
        body = json.dumps({"error": message}).encode()
        lines = [f"HTTP/1.1 {status} {reason}", "content-type: application/json", f"content-length: {len(body)}", "connection: close"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        self.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self.loop.call_later(LINGER_S, self.transport.close)
        else:
            self.transport.close()
