"""The host's metrics endpoint as an HTTP server with bounds
(docs/security.md, "Limits"): prometheus_client's own server starts a
thread per connection, without a limit and without a timeout, so a flood of
connections (or a few that never send a request) would grow the router by a
thread each, for ever.

Here at most `limits.max_metrics_requests` requests are served at once; a
connection past it gets `503` naming the limit at once (counted in
raft_refusals_total), and a connection that sends nothing is dropped after
REQUEST_TIMEOUT seconds.
"""

from __future__ import annotations

import socket
import threading
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import ThreadingWSGIServer, _SilentHandler, make_wsgi_app
from wsgiref.simple_server import make_server

from ..limits import refuse

#: Seconds a connection may take to send its request (and to read the page).
REQUEST_TIMEOUT = 10.0


class _Handler(_SilentHandler):
    timeout = REQUEST_TIMEOUT


class _BoundedServer(ThreadingWSGIServer):
    limit = 8
    # The listen backlog (socketserver's default is 5): connections past the
    # limit are answered 503 at once, so they must reach accept() rather
    # than wait for a SYN retry.
    request_queue_size = 128
    slots: threading.BoundedSemaphore

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            message = str(refuse("max_metrics_requests", self.limit, "as many requests are being served")).encode()
            try:
                request.settimeout(1.0)
                request.sendall(b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
                                b"Content-Length: %d\r\n\r\n%s" % (len(message), message))
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


def serve_metrics(address: str, port: int, registry: CollectorRegistry,
                  limit: int) -> tuple[ThreadingWSGIServer, threading.Thread]:
    """Serve `registry` on address:port in a daemon thread, at most `limit` requests at once."""

    class Server(_BoundedServer):
        pass

    Server.address_family = socket.AF_INET6 if ":" in address else socket.AF_INET
    Server.limit = limit
    Server.slots = threading.BoundedSemaphore(limit)
    server = make_server(address, port, make_wsgi_app(registry), Server, handler_class=_Handler)
    thread = threading.Thread(target=server.serve_forever, name="metrics-server", daemon=True)
    thread.start()
    return server, thread
