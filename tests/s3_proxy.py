"""An HTTP proxy on 127.0.0.1 in front of the local S3 endpoint, for the faults a real store
or network shows: it can stop answering, lose the response of a PUT it forwarded, answer one
PUT with 409 ConditionalRequestConflict, or drop the conditional headers (a store that ignores
If-None-Match / If-Match). Every request goes to the real endpoint behind it."""
from __future__ import annotations

import http.client
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

CONFLICT = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>ConditionalRequestConflict'
            b'</Code><Message>A conflicting conditional operation is in progress</Message>'
            b'</Error>')


class Proxy:
    """mode: "pass"; "hang" (requests get no answer until the mode changes); "strip" (the
    If-None-Match / If-Match headers are dropped); "lose-put" (the next conditional PUT is
    forwarded, its response dropped); "conflict-put" (the next conditional PUT gets 409)."""

    def __init__(self, upstream: str):
        self.upstream = urlparse(upstream)
        self.mode = "pass"
        self.seen: list[str] = []  # "METHOD path" of every request, for the tests to read
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _any(self):
                proxy.handle(self)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.handle_error = lambda *a: None  # a client that gave up: expected here
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        body = h.rfile.read(int(h.headers.get("Content-Length") or 0))
        self.seen.append(f"{h.command} {h.path}")
        conditional = h.command == "PUT" and any(k in h.headers for k in
                                                 ("If-None-Match", "If-Match"))
        deadline = time.time() + 60
        while self.mode == "hang" and time.time() < deadline:
            time.sleep(0.05)
        if conditional and self.mode == "conflict-put":
            self.mode = "pass"
            return self._reply(h, 409, {"Content-Type": "application/xml"}, CONFLICT)
        headers = {k: v for k, v in h.headers.items()
                   if k.lower() not in ("host", "connection")}
        if self.mode == "strip":
            headers = {k: v for k, v in headers.items()
                       if k.lower() not in ("if-none-match", "if-match")}
        conn = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=30)
        conn.request(h.command, h.path, body=body, headers=headers)
        r = conn.getresponse()
        data = r.read()
        conn.close()
        if conditional and self.mode == "lose-put":
            self.mode = "pass"
            h.close_connection = True  # the PUT happened; its answer never arrives
            return
        drop = ("transfer-encoding", "connection") + (() if h.command == "HEAD"
                                                       else ("content-length",))
        self._reply(h, r.status, {k: v for k, v in r.getheaders() if k.lower() not in drop},
                    data)

    @staticmethod
    def _reply(h, status: int, headers: dict, data: bytes) -> None:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        if h.command != "HEAD":
            h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(data)

    def stop(self) -> None:
        self.mode = "pass"
        self.server.shutdown()
        self.server.server_close()
