"""A stand-in for a Sentry server: a real HTTP server on port 0 that keeps every envelope sent to it.

Point a real sentry-sdk at it with the DSN ``catcher.dsn(key)``; ``envelopes`` holds each body,
decompressed, and ``events()`` the error events among them, parsed.
"""
from __future__ import annotations

import gzip
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class SentryCatcher:
    def __init__(self) -> None:
        self.envelopes: list[bytes] = []
        self.errors: list[str] = []
        self._lock = threading.Lock()
        catcher = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (the http.server name)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                encoding = self.headers.get("Content-Encoding", "")
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding:
                    catcher.errors.append(f"cannot read Content-Encoding {encoding!r}")
                with catcher._lock:
                    catcher.envelopes.append(body)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *_args) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="sentry-catcher", daemon=True)

    def dsn(self, key: str) -> str:
        return f"http://{key}@127.0.0.1:{self._server.server_address[1]}/1"

    def events(self) -> list[dict]:
        """Return the error events received: the envelope items of type 'event', parsed."""
        found = []
        with self._lock:
            bodies = list(self.envelopes)
        for body in bodies:
            lines = body.split(b"\n")
            for header, payload in zip(lines[1::2], lines[2::2]):
                if json.loads(header).get("type") == "event":
                    found.append(json.loads(payload))
        return found

    def __enter__(self) -> "SentryCatcher":
        self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
