"""A real HTTP server standing in for a findNeighbour4 (fn4) REST server in tests.

It mimics the parts of the fn4 API that the loader uses (see the fn4 API notes shared with the
project): answers are JSON bodies sent as ``text/html; charset=utf-8``, error pages made by
``abort()`` are Flask/Werkzeug HTML pages, and the 404 handler answers JSON.

Usage::

    with FN4StandIn(reference_length=29903) as fn4:
        requests.post(fn4.url + "/api/v2/insert", data={"guid": "g1", "seq": "ACGT..."})
        fn4.script(Scripted(status=503, times=2))   # the next two inserts answer 503
        fn4.insert_delay = 0.025                    # each real insert now takes 25 ms server-side
        fn4.script(Scripted(status=429, headers={"Retry-After": "30"}))   # back-pressure, as a proxy would
        fn4.database_down = True    # inserts, guids and exists answer 500 "Could not connect to database"
        fn4.idle_timeout = 0.3      # close kept-alive connections idle this long, as gunicorn's async workers do
        fn4.lock_conflicts = True   # an insert arriving while another runs answers 409, as the real lock does
"""

from __future__ import annotations

import dataclasses
import datetime
import email.parser
import email.policy
import html
import json
import re
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote

__all__ = ["FN4StandIn", "Scripted", "InsertRecord", "RequestRecord",
           "ALPHABET", "MAX_GUID_LENGTH", "is_unsafe_guid", "error_page", "DATABASE_UNREACHABLE", "insert"]

JSON_AS_HTML = "text/html; charset=utf-8"
ALPHABET = frozenset("ACGTN-RYSWKMBDHV")   # after upper-casing
MAX_GUID_LENGTH = 59                       # 60 characters or more answer 403
ROUTES = ("insert", "guids", "exists", "server_time", "server_name")
SCRIPT_ROUTES = ("insert", "guids", "exists", "server_time", "*")
#: The real server's 500 text when its own database cannot be reached (it asks before taking the insert lock).
DATABASE_UNREACHABLE = "Could not connect to database. Tried 3 times"
#: The real server's 404 answer for a route it does not have (its custom JSON handler).
NOT_FOUND_BODY = json.dumps({"error": "Not found (custom error handler for mis-routing)"})
_EXISTS = re.compile(r"^/api/v2/([^/]+)/exists$")
_REASONS = {200: "OK", 201: "Created", 400: "Bad Request", 403: "Forbidden", 404: "Not Found",
            405: "Method Not Allowed", 408: "Request Timeout", 409: "Conflict", 429: "Too Many Requests",
            500: "Internal Server Error", 501: "Not Implemented", 502: "Bad Gateway",
            503: "Service Unavailable", 504: "Gateway Timeout"}


def is_unsafe_guid(guid: str) -> bool:
    """True for a guid the real server half-stores and answers 503: empty, whitespace or control
    characters (space and tab were probed), ``/``, ``?``, ``#`` or anything non-ASCII."""
    return guid == "" or any(c in "/?#" or c.isspace() or not " " < c <= "~" for c in guid)


def error_page(status: int, description: str) -> str:
    """The HTML page Werkzeug sends for ``abort(status, description)``."""
    reason = _REASONS.get(status, "Error")
    return ("<!doctype html>\n<html lang=en>\n<title>{0} {1}</title>\n<h1>{1}</h1>\n<p>{2}</p>\n"
            .format(status, reason, html.escape(description)))


def insert(client, guid: str, seq: bytes):
    """Insert one sample with the loader's FN4Client as the loader does: a body built by insert_form, sent by
    post_insert. Returns its InsertResult."""
    return client.post_insert(client.insert_form(guid, seq))


@dataclass
class Scripted:
    """A canned answer, consumed in order by the requests it matches."""
    status: int = 503
    route: str = "insert"     # "insert", "guids", "exists", "server_time", or "*" (any request)
    guid: str | None = None   # only requests about this guid (insert form field or exists path)
    body: str | None = None   # raw body; default: a JSON string message, an HTML page for 500, fn4's JSON for 404
    text: str | None = None   # instead of body: an HTML abort() page with this description (any status)
    headers: dict | None = None   # extra response headers, e.g. {"Retry-After": "30"}
    content_type: str = JSON_AS_HTML
    delay: float = 0.0        # server-side delay before answering (or dropping)
    drop: bool = False        # close the connection without answering
    times: int = 1            # -1 = until clear_script()
    store: bool = False       # for status 200 (or drop) on insert: the insert still takes effect

    def __post_init__(self):
        if self.route not in SCRIPT_ROUTES:
            raise ValueError("route must be one of {0}, not {1!r}".format(SCRIPT_ROUTES, self.route))
        if self.times == 0 or self.times < -1:
            raise ValueError("times must be positive or -1")


@dataclass
class InsertRecord:
    """One POST /api/v2/insert. ``status`` 0 means the connection was closed without an answer.
    ``started``/``ended`` are time.perf_counter() values around the server's own work: from the
    request's arrival (or the previous insert's end, if later) to the end of the insert, receiving
    and parsing the form and insert_delay included; for scripted answers, around the delay."""
    guid: str | None
    seq_len: int | None
    status: int
    started: float
    ended: float
    scripted: bool = False


@dataclass
class RequestRecord:
    """One request. ``path`` is the raw request target; ``status`` 0 = closed without answer."""
    method: str
    path: str
    status: int
    response_bytes: int


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, handler, standin):
        self.standin = standin
        self.open_sockets: set = set()
        self.accepted = 0                # connections accepted since start
        self.sockets_lock = threading.Lock()
        super().__init__(address, handler)

    def get_request(self):
        sock, addr = super().get_request()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.sockets_lock:
            self.open_sockets.add(sock)
            self.accepted += 1
        return sock, addr

    def verify_request(self, request, client_address):
        st = self.standin
        return not (st.down and st.down_mode == "refuse")

    def shutdown_request(self, request):
        with self.sockets_lock:
            self.open_sockets.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request, client_address):
        pass   # clients that time out or go away are normal in these tests


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fn4-standin"
    sys_version = ""

    def setup(self):
        super().setup()
        self.standin: FN4StandIn = self.server.standin

    def handle_one_request(self):
        # Waiting for the next request on a kept-alive connection: close it after idle_timeout seconds,
        # as gunicorn's async workers and proxies do. (BaseHTTPRequestHandler closes on the timeout.)
        self.connection.settimeout(self.standin.idle_timeout)
        super().handle_one_request()

    def parse_request(self):
        # The request line has just been read: the server is busy with this request from here on.
        self._arrived = time.perf_counter()
        self.connection.settimeout(None)
        return super().parse_request()

    def log_message(self, format, *args):
        pass

    # ---- plumbing ----
    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _send(self, status: int, body: str, content_type: str = JSON_AS_HTML, headers: dict | None = None) -> None:
        data = body.encode("utf-8")
        self.standin._record(self.command, self.path, status, len(data))   # before the client can see it
        self.send_response(status, _REASONS.get(status))
        self.send_header("Content-Type", content_type)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_json(self, status: int, obj) -> None:
        self._send(status, json.dumps(obj))

    def _send_abort(self, status: int, description: str) -> None:
        self._send(status, error_page(status, description))

    def _drop(self) -> None:
        self.standin._record(self.command, self.path, 0, 0)
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _form(self, body: bytes) -> dict:
        """Form fields as Flask's request.form sees them: url-encoded or multipart text fields only."""
        ctype = self.headers.get("Content-Type", "")
        kind = ctype.split(";")[0].strip().lower()
        if kind == "application/x-www-form-urlencoded":
            fields = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
            return {k: v[0] for k, v in fields.items()}
        if kind == "multipart/form-data":
            head = "Content-Type: {0}\r\nMIME-Version: 1.0\r\n\r\n".format(ctype).encode("latin-1")
            msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
            form: dict = {}
            for part in msg.iter_parts():
                name = part.get_param("name", header="content-disposition")
                if name is None or part.get_filename() is not None:
                    continue   # uploaded files are not form fields
                payload = part.get_payload(decode=True) or b""
                form.setdefault(name, payload.decode(part.get_content_charset() or "utf-8", "replace"))
            return form
        return {}

    # ---- dispatch ----
    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        st = self.standin
        body = self._read_body()
        if st.down:
            if st.down_mode == "refuse":
                return self._drop()
            return self._send_abort(503, "The server is down.")
        path = unquote(self.path.split("?", 1)[0])
        guid = None
        m = _EXISTS.match(path)
        if m:
            route, guid = "exists", m.group(1)
        else:
            route = {"/api/v2/guids": "guids", "/api/v2/server_time": "server_time",
                     "/api/v2/server_name": "server_name", "/api/v2/insert": "insert"}.get(path)
        if route is None:
            return self._send(404, NOT_FOUND_BODY, "application/json")
        if (method == "POST") != (route == "insert"):
            return self._send_abort(405, "The method is not allowed for the requested URL.")
        form = self._form(body) if route == "insert" else {}
        if route == "insert":
            guid = form.get("guid")
        scripted = st._take_script(route, guid)
        if scripted is not None:
            return self._answer_scripted(scripted, route, form)
        if st.database_down and route in ("insert", "guids", "exists"):
            # the real server asks its database before anything else on these routes (server_time does not)
            if route == "insert":
                st._record_insert(InsertRecord(guid, len(form.get("seq") or ""), 500,
                                               time.perf_counter(), time.perf_counter()))
            return self._send_abort(500, DATABASE_UNREACHABLE)
        if route == "insert":
            return self._insert(form)
        if route == "guids":
            with st._lock:
                guids = list(st.guids)
            return self._send_json(200, guids)
        if route == "exists":
            with st._lock:
                present = guid in st.guids
            return self._send_json(200, present)
        if route == "server_time":
            return self._send_json(200, {"server_name": st.server_name,
                                         "server_time": datetime.datetime.now().isoformat()})
        return self._send_json(200, {"server_name": st.server_name,
                                     "server_description": "findNeighbour4 stand-in for tests"})

    def _answer_scripted(self, sc: Scripted, route: str, form: dict) -> None:
        st = self.standin
        guid, seq = form.get("guid"), form.get("seq")
        started = time.perf_counter()
        if sc.delay > 0:
            st._stopping.wait(sc.delay)
        if sc.drop:
            status = 0
        else:
            status = sc.status
        if route == "insert" and sc.store and status in (0, 200) and guid is not None:
            with st._lock:
                st.guids[guid] = None if seq is None else seq.upper()
        if route == "insert":
            st._record_insert(InsertRecord(guid, None if seq is None else len(seq), status,
                                           started, time.perf_counter(), scripted=True))
        if sc.drop:
            return self._drop()
        body = sc.body
        if sc.text is not None:
            body = error_page(status, sc.text)
        elif body is None:
            if status == 404:
                body = NOT_FOUND_BODY
            elif status == 500:
                body = error_page(500, "Scripted internal server error.")
            elif route == "insert" and status == 200:
                body = json.dumps("Guid {0} inserted.".format(guid))
            elif route == "insert" and status == 201:
                body = json.dumps("Guid {0} is already present".format(guid))
            else:
                body = json.dumps("Scripted answer {0}".format(status))
        self._send(status, body, sc.content_type, sc.headers)

    def _insert(self, form: dict) -> None:
        st = self.standin
        guid, seq = form.get("guid"), form.get("seq")
        if guid is None or seq is None:
            st._record_insert(InsertRecord(guid, None if seq is None else len(seq), 501,
                                           time.perf_counter(), time.perf_counter()))
            return self._send_abort(501, "seq and guid are not present in the POSTed data {0}".format(
                set(form)))
        # The real server's insert lock is a database row taken without waiting: with lock_conflicts an
        # insert arriving while another runs answers 409 at once; otherwise inserts queue here.
        if not st._insert_lock.acquire(blocking=not st.lock_conflicts):
            st._record_insert(InsertRecord(guid, len(seq), 409, time.perf_counter(), time.perf_counter()))
            return self._send_abort(409, "Could not acquire the insert lock; another process is inserting.")
        try:
            # Busy from the request's arrival (receiving and parsing the form is server work, as on a
            # real fn4), but never before the previous insert ended, so intervals do not overlap.
            started = max(self._arrived, st._last_insert_end)
            st.inserts_begun += 1
            delay = st.insert_delay
            if delay > 0:
                st._stopping.wait(delay)
            status, answer = st._do_insert(guid, seq)
            ended = time.perf_counter()
            st._last_insert_end = ended
            st._record_insert(InsertRecord(guid, len(seq), status, started, ended))
        finally:
            st._insert_lock.release()
        if status in (200, 201):
            return self._send_json(status, answer)
        return self._send_abort(status, answer)


class FN4StandIn:
    """A threaded HTTP/1.1 keep-alive server mimicking findNeighbour4. All public state is guarded
    by an internal lock; reading ``inserts``/``requests``/``guids`` from tests is safe."""

    def __init__(self, port: int = 0, reference_length: int | None = None, insert_delay: float = 0.0,
                 tls: "ssl.SSLContext | None" = None):
        self.port = port
        self.tls = tls                   # a server-side SSLContext makes the stand-in speak https
        self.reference_length = reference_length
        self.insert_delay = insert_delay
        self.inserts_begun = 0           # real inserts that have started, finished or not
        self._last_insert_end = 0.0
        self.server_name = "standin"
        self.guids: dict[str, str | None] = {}
        self.inserts: list[InsertRecord] = []
        self.requests: list[RequestRecord] = []
        self.down = False
        self.down_mode = "503"           # or "refuse": connections are closed without an answer
        self.database_down = False       # insert, guids and exists answer 500 DATABASE_UNREACHABLE
        self.idle_timeout: float | None = None   # seconds before an idle kept-alive connection is closed
        self.lock_conflicts = False      # an insert arriving while another runs answers 409 at once
        self._script: list[Scripted] = []
        self._lock = threading.RLock()
        self._insert_lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    # ---- life cycle ----
    def start(self) -> "FN4StandIn":
        if self._server is not None:
            return self
        self._stopping.clear()
        self._server = _Server(("127.0.0.1", self.port), _Handler, self)
        if self.tls is not None:
            self._server.socket = self.tls.wrap_socket(self._server.socket, server_side=True)
        self.port = self._server.server_address[1]
        self.url = "{0}://127.0.0.1:{1}".format("https" if self.tls else "http", self.port)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fn4-standin-{0}".format(self.port), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()          # wakes server-side delays
        server.shutdown()
        server.server_close()
        with server.sockets_lock:
            live = list(server.open_sockets)
        for sock in live:             # end keep-alive connections so handler threads finish
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> "FN4StandIn":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- scripting and records ----
    def script(self, *responses: Scripted) -> None:
        with self._lock:
            self._script.extend(dataclasses.replace(sc) for sc in responses)   # copies: times is consumed

    def clear_script(self) -> None:
        with self._lock:
            self._script.clear()

    @property
    def connections_accepted(self) -> int:
        """TCP connections accepted so far: one per client that keeps its connection alive."""
        return self._server.accepted

    def bytes_sent(self, path_prefix: str = "") -> int:
        with self._lock:
            return sum(r.response_bytes for r in self.requests if r.path.startswith(path_prefix))

    def _take_script(self, route: str, guid: str | None) -> Scripted | None:
        with self._lock:
            for i, sc in enumerate(self._script):
                if sc.route not in ("*", route) or (sc.guid is not None and sc.guid != guid):
                    continue
                if sc.times > 0:
                    sc.times -= 1
                    if sc.times == 0:
                        del self._script[i]
                return sc
        return None

    def _record(self, method: str, path: str, status: int, nbytes: int) -> None:
        with self._lock:
            self.requests.append(RequestRecord(method, path, status, nbytes))

    def _record_insert(self, rec: InsertRecord) -> None:
        with self._lock:
            self.inserts.append(rec)

    def _do_insert(self, guid: str, seq: str) -> tuple[int, str]:
        """The real server's insert decision, minus the 501 check. Called holding the insert lock."""
        if len(guid) > MAX_GUID_LENGTH:
            return 403, "guid is too long: {0} characters; the maximum is {1}".format(
                len(guid), MAX_GUID_LENGTH)
        with self._lock:
            if guid in self.guids:
                return 201, "Guid {0} is already present".format(guid)
        seq = seq.upper()
        if seq == "":
            return 500, "sequence is empty"
        bad = sorted(set(seq) - ALPHABET)
        if bad:
            return 500, "sequence contains invalid characters {0}".format(bad)
        if self.reference_length is not None and len(seq) != self.reference_length:
            return 500, "sequence must of the same length as reference; seq is {0} and ref is {1}".format(
                len(seq), self.reference_length)
        if is_unsafe_guid(guid):
            with self._lock:
                self.guids[guid] = None   # half-stored: a repeat answers 201
            return 503, "could not persist guid {0!r}".format(guid)
        with self._lock:
            self.guids[guid] = seq
        return 200, "Guid {0} inserted.".format(guid)
