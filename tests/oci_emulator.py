"""In-process emulator of the OCI Object Storage REST API subset used by the FASTA loader.

A real HTTP/1.1 server on 127.0.0.1 (ephemeral port) that the ``oci`` SDK talks to through
``oci.object_storage.ObjectStorageClient(config, service_endpoint=emulator.endpoint)``:

* ``GET /n`` (namespace), ``GET /n/{ns}/b/{bucket}/o`` (ListObjects with prefix, start, end,
  startAfter, limit, fields, delimiter and nextStartWith paging),
* ``GET | HEAD | PUT | DELETE /n/{ns}/b/{bucket}/o/{name}`` (if-match, if-none-match, Range),
* ``POST /n/{ns}/b/{bucket}/actions/renameObject``.

Signatures are not verified, but an ``Authorization`` header must be present.  Errors are OCI
JSON bodies (``{"code", "message"}``); failed preconditions are 412 ``IfMatchFailed`` /
``IfNoneMatchFailed`` as on OCI.  Tests seed state directly (``create_bucket``, ``put``), read
the request log (``requests``) and script failures with ``add_fault(Fault(...))``.

Listing scales to millions of objects: each bucket keeps its names in a sorted index (updated by
bisection on every write), so a page costs a bisection plus its own entries, never a sort of the
bucket; page entries are cached as JSON text per object until the object changes. ``list_latency``
(seconds, default 0) makes every ListObjects answer wait that long before it is sent, outside the
lock, so concurrent pages overlap as on the real service: benchmarks use it to stand for the
service's per-page latency; ``list_pages`` counts the pages served. Bulk seeding: ``put_many``.
"""
from __future__ import annotations

import base64
import bisect
import email.utils
import hashlib
import json
import os
import re
import socket
import sys
import threading
import traceback
import uuid
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterable, Iterator
from urllib.parse import parse_qsl, unquote, urlsplit

MAX_LIST_LIMIT = 1000
LIST_FIELDS = {f.lower(): f for f in (
    "name", "size", "etag", "md5", "timeCreated", "timeModified", "storageTier", "archivalState")}
FAULT_KINDS = ("status", "delay", "drop", "truncate", "corrupt", "delete", "replace")
_STATUS_CODES = {400: "InvalidParameter", 401: "NotAuthenticated", 403: "NotAuthorized",
                 404: "NotFound", 409: "Conflict", 412: "PreconditionFailed",
                 429: "TooManyRequests", 503: "ServiceUnavailable"}

_NAMESPACE_RE = re.compile(r"^/n/?$")
_LIST_RE = re.compile(r"^/n/([^/]+)/b/([^/]+)/o/?$")
_OBJECT_RE = re.compile(r"^/n/([^/]+)/b/([^/]+)/o/(.+)$")
_RENAME_RE = re.compile(r"^/n/([^/]+)/b/([^/]+)/actions/renameObject$")
_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")


# ---- Data model ----

@dataclass
class Fault:
    """A scripted failure; faults are consumed in the order they were added."""
    method: str = "*"            # GET, HEAD, PUT, DELETE, POST or "*"
    path_contains: str = ""      # substring of the decoded request path; "" matches everything
    kind: str = "status"         # one of FAULT_KINDS
    status: int = 500            # kind="status": HTTP status answered with an OCI error body
    delay: float = 0.0           # kind="delay": seconds to wait server-side before serving normally
    fraction: float = 0.5        # kind="truncate": share of the body sent before closing
    times: int = 1               # matching requests it applies to; -1 = until clear_faults()
    # kind="delete" / "replace": the object the request names is deleted, or replaced by new bytes
    # (a new etag), just before the request is served normally: a change between listing and reading.

    def matches(self, method: str, path: str) -> bool:
        return self.method in ("*", method) and self.path_contains in path


@dataclass
class RequestRecord:
    method: str
    path: str                    # decoded (unquoted) path
    query: dict[str, str]
    status: int                  # 0 when the connection was dropped without a response
    fault: str = ""              # kind of the fault applied to this request, "" if none
    headers: dict[str, str] = field(default_factory=dict)   # lower-cased names
    target: str = ""             # the request target as sent (path and query, not decoded)
    client_port: int = 0         # the client's port: requests on one kept-alive connection share it


@dataclass
class StoredObject:
    data: bytes
    etag: str
    md5: str                     # base64 of the MD5 digest, as in Content-MD5
    time_created: datetime
    time_modified: datetime


@dataclass
class _Reply:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


class OciError(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _md5_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode("ascii")


def _rfc3339(moment: datetime) -> str:
    moment = moment.astimezone(timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _new_object(data: bytes, time_created: datetime | None = None) -> StoredObject:
    if time_created is not None and time_created.tzinfo is None:
        raise ValueError("time_created must be timezone-aware")
    created = time_created or _now()
    return StoredObject(bytes(data), str(uuid.uuid4()), _md5_b64(data), created, created)


def _error_reply(status: int, code: str, message: str) -> _Reply:
    body = json.dumps({"code": code, "message": message}).encode()
    return _Reply(status, {"Content-Type": "application/json"}, body)


def _fault_code(status: int) -> str:
    return _STATUS_CODES.get(status, "InternalServerError" if status >= 500 else "InjectedFault")


def _flip_bytes(body: bytes) -> bytes:
    corrupted = bytearray(body)
    for index in {0, len(body) // 2, len(body) - 1} if body else ():
        corrupted[index] ^= 0xFF
    return bytes(corrupted)


# ---- Conditional requests ----

def _etag_equal(header: str, etag: str) -> bool:
    return header.strip().strip('"') == etag


def _check_write_conditions(existing: StoredObject | None, if_match: str | None,
                            if_none_match: str | None) -> None:
    """PUT / DELETE / rename preconditions; OCI answers 412 for both kinds of failure."""
    if if_match and (existing is None or (if_match != "*" and not _etag_equal(if_match, existing.etag))):
        raise OciError(412, "IfMatchFailed", "The If-Match header does not match the current ETag")
    if if_none_match:
        if if_none_match.strip() != "*":
            raise OciError(400, "InvalidParameter", "The only valid If-None-Match value is '*'")
        if existing is not None:
            raise OciError(412, "IfNoneMatchFailed", "The object already exists (If-None-Match: *)")


def _object_headers(obj: StoredObject) -> dict[str, str]:
    return {"etag": obj.etag, "content-md5": obj.md5, "Content-Type": "application/octet-stream",
            "last-modified": email.utils.format_datetime(obj.time_modified, usegmt=True),
            "storage-tier": "Standard", "accept-ranges": "bytes"}


def _parse_range(header: str, size: int) -> tuple:
    match = _RANGE_RE.match(header.strip())
    if not match or match.groups() == ("", ""):
        raise OciError(416, "InvalidRange", f"Unsupported Range header {header!r}")
    first, last = match.groups()
    if first == "":
        start, end = max(size - int(last), 0), size - 1
    else:
        start, end = int(first), min(int(last), size - 1) if last else size - 1
    if start >= size or start > end:
        raise OciError(416, "InvalidRange", f"Range {header!r} not satisfiable for {size} bytes")
    return start, end


# ---- Emulator ----

class ObjectStoreEmulator:
    """Thread-safe in-memory object store served over HTTP; see the module docstring."""

    def __init__(self, namespace: str = "lxxxx", require_auth: bool = True, list_latency: float = 0.0):
        self.namespace = namespace
        self.require_auth = require_auth
        self.list_latency = list_latency     # seconds each ListObjects answer waits, outside the lock
        self.list_pages = 0                  # ListObjects answers served
        self.endpoint = ""
        self.errors: list[str] = []          # tracebacks of emulator bugs (answered as 500)
        self._lock = threading.RLock()
        self._buckets: dict[str, dict[str, StoredObject]] = {}
        self._index: dict[str, list[str]] = {}                  # bucket -> its names, sorted
        self._entries: dict[tuple, dict[str, str]] = {}         # (bucket, fields) -> name -> JSON entry
        self._faults: list[Fault] = []
        self._requests: list[RequestRecord] = []
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle --
    def start(self) -> "ObjectStoreEmulator":
        self._stopping.clear()
        self._server = _Server(("127.0.0.1", 0), self)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.01},
                                        name="oci-emulator", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._stopping.set()                 # wakes up any "delay" fault
        self._server.shutdown()
        self._server.close_connections()
        self._server.server_close()
        self._thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> "ObjectStoreEmulator":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # -- direct state access (no HTTP) --
    def create_bucket(self, name: str) -> None:
        with self._lock:
            self._buckets.setdefault(name, {})
            self._index.setdefault(name, [])

    def put(self, bucket: str, name: str, data: bytes, time_created: datetime | None = None) -> str:
        obj = _new_object(data, time_created)
        with self._lock:
            self._objects(bucket)
            self._store(bucket, name, obj)
        return obj.etag

    def put_many(self, bucket: str, items: Iterable[tuple[str, bytes, datetime | None]]) -> int:
        """Seed many objects at once (name, data, time created); the index is sorted once at the end."""
        with self._lock:
            objects = self._objects(bucket)
            added, count = [], 0
            for name, data, time_created in items:
                if name not in objects:
                    added.append(name)
                objects[name] = _new_object(data, time_created)
                self._forget_entry(bucket, name)
                count += 1
            index = self._index[bucket]
            if len(added) * 100 < len(index):
                for name in added:
                    bisect.insort(index, name)
            else:
                self._index[bucket] = sorted(objects)
        return count

    def delete(self, bucket: str, name: str) -> None:
        with self._lock:
            if name not in self._objects(bucket):
                raise KeyError(name)
            self._remove(bucket, name)

    def get(self, bucket: str, name: str) -> bytes:
        with self._lock:
            return self._objects(bucket)[name].data

    def names(self, bucket: str) -> list[str]:
        with self._lock:
            self._objects(bucket)
            return list(self._index[bucket])

    def _store(self, bucket: str, name: str, obj: StoredObject) -> None:
        """Add or replace an object, keeping the bucket's sorted index and entry cache true (lock held)."""
        objects = self._buckets[bucket]
        if name not in objects:
            bisect.insort(self._index[bucket], name)
        objects[name] = obj
        self._forget_entry(bucket, name)

    def _remove(self, bucket: str, name: str) -> None:
        del self._buckets[bucket][name]
        index = self._index[bucket]
        del index[bisect.bisect_left(index, name)]
        self._forget_entry(bucket, name)

    def _forget_entry(self, bucket: str, name: str) -> None:
        for key, entries in self._entries.items():
            if key[0] == bucket:
                entries.pop(name, None)

    def _objects(self, bucket: str) -> dict[str, StoredObject]:
        if bucket not in self._buckets:
            raise KeyError(f"no bucket {bucket!r}; call create_bucket() first")
        return self._buckets[bucket]

    # -- request log and fault injection --
    @property
    def requests(self) -> list[RequestRecord]:
        with self._lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    def add_fault(self, fault: Fault) -> None:
        if fault.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {fault.kind!r}")
        if fault.times == 0 or fault.times < -1:
            raise ValueError("times must be positive or -1 (forever)")
        with self._lock:
            self._faults.append(replace(fault))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.matches(method, path):
                    if fault.times > 0:
                        fault.times -= 1
                        if fault.times == 0:
                            self._faults.remove(fault)
                    return fault
        return None

    def _change(self, raw_path: str, kind: str) -> None:
        match = _OBJECT_RE.match(raw_path)
        if match is None:
            return
        _ns, bucket, name = map(unquote, match.groups())
        with self._lock:
            objects = self._buckets.get(bucket, {})
            if name in objects and kind == "delete":
                self._remove(bucket, name)
            elif name in objects:
                old = objects[name]
                new = replace(_new_object(old.data + b"\n", old.time_created), time_modified=_now())
                self._store(bucket, name, new)

    def _record(self, record: RequestRecord) -> None:
        with self._lock:
            self._requests.append(record)

    # ---- Routes ----

    def route(self, method: str, raw_path: str, query: dict[str, str], headers: dict[str, str],
              body: bytes) -> _Reply:
        if _NAMESPACE_RE.match(raw_path) and method == "GET":
            return _Reply(200, {"Content-Type": "application/json"}, json.dumps(self.namespace).encode())
        match = _LIST_RE.match(raw_path)
        if match and method == "GET":
            return self._list_objects(*map(unquote, match.groups()), query)
        match = _RENAME_RE.match(raw_path)
        if match and method == "POST":
            return self._rename_object(*map(unquote, match.groups()), body)
        match = _OBJECT_RE.match(raw_path)
        if match and method in ("GET", "HEAD", "PUT", "DELETE"):
            ns, bucket, name = map(unquote, match.groups())
            if method == "PUT":
                return self._put_object(ns, bucket, name, headers, body)
            if method == "DELETE":
                return self._delete_object(ns, bucket, name, headers)
            return self._get_object(ns, bucket, name, headers)
        raise OciError(404, "NotFound", f"No route for {method} {unquote(raw_path)}")

    def _bucket(self, namespace: str, bucket: str) -> dict[str, StoredObject]:
        if namespace != self.namespace:
            raise OciError(404, "NamespaceNotFound", f"Namespace {namespace} not found")
        if bucket not in self._buckets:
            raise OciError(404, "BucketNotFound", f"Either the bucket named '{bucket}' does not exist "
                                                  f"in the namespace '{namespace}' or you are not authorized")
        return self._buckets[bucket]

    def _lookup(self, namespace: str, bucket: str, name: str) -> StoredObject:
        obj = self._bucket(namespace, bucket).get(name)
        if obj is None:
            raise OciError(404, "ObjectNotFound", f"The object '{name}' was not found in bucket '{bucket}'")
        return obj

    def _list_objects(self, namespace: str, bucket: str, query: dict[str, str]) -> _Reply:
        limit = _parse_limit(query.get("limit"))
        fields = _parse_fields(query.get("fields"))
        prefix, delimiter = query.get("prefix", ""), query.get("delimiter")
        if delimiter not in (None, "/"):
            raise OciError(400, "InvalidParameter", "Only '/' is supported as a delimiter")
        entries, prefixes, next_start = [], [], None
        with self._lock:
            objects = self._bucket(namespace, bucket)
            cache = self._entries.setdefault((bucket, tuple(sorted(fields))), {})
            for name in self._listed_names(bucket, prefix, query):
                rest = name[len(prefix):]
                folded = prefix + rest[:rest.index("/") + 1] if delimiter and "/" in rest else None
                if folded is not None and prefixes and prefixes[-1] == folded:
                    continue
                if len(entries) + len(prefixes) == limit:
                    next_start = name
                    break
                if folded is not None:
                    prefixes.append(folded)
                    continue
                entry = cache.get(name)
                if entry is None:
                    entry = cache[name] = json.dumps(_summary(name, objects[name], fields))
                entries.append(entry)
            self.list_pages += 1
        more = f', "nextStartWith": {json.dumps(next_start)}' if next_start is not None else ""
        text = '{"objects": [' + ", ".join(entries) + '], "prefixes": ' + json.dumps(prefixes) + more + "}"
        if self.list_latency > 0:
            self._stopping.wait(self.list_latency)
        return _Reply(200, {"Content-Type": "application/json"}, text.encode())

    def _listed_names(self, bucket: str, prefix: str, query: dict[str, str]) -> Iterator[str]:
        """Yield the bucket's names that a listing with these parameters covers, in order (lock held)."""
        index = self._index[bucket]
        first = bisect.bisect_left(index, max(prefix, query.get("start", "")))
        if "startAfter" in query:
            first = max(first, bisect.bisect_right(index, query["startAfter"]))
        end = query.get("end")
        for position in range(first, len(index)):
            name = index[position]
            if not name.startswith(prefix) or (end is not None and name >= end):
                return
            yield name

    def _get_object(self, namespace: str, bucket: str, name: str, headers: dict[str, str]) -> _Reply:
        with self._lock:
            obj = self._lookup(namespace, bucket, name)
        if_match = headers.get("if-match")
        if if_match and if_match != "*" and not _etag_equal(if_match, obj.etag):
            raise OciError(412, "IfMatchFailed", "The If-Match header does not match the current ETag")
        none_match = headers.get("if-none-match")
        if none_match and (none_match == "*" or _etag_equal(none_match, obj.etag)):
            return _Reply(304, {"etag": obj.etag})
        reply = _Reply(200, _object_headers(obj), obj.data)
        if headers.get("range"):
            start, end = _parse_range(headers["range"], len(obj.data))
            reply.status, reply.body = 206, obj.data[start:end + 1]
            reply.headers["content-range"] = f"bytes {start}-{end}/{len(obj.data)}"
        return reply

    def _put_object(self, namespace: str, bucket: str, name: str, headers: dict[str, str],
                    body: bytes) -> _Reply:
        if headers.get("content-md5") and headers["content-md5"] != _md5_b64(body):
            raise OciError(400, "UnmatchedContentMD5", "The computed MD5 of the request body does not match")
        with self._lock:
            objects = self._bucket(namespace, bucket)
            _check_write_conditions(objects.get(name), headers.get("if-match"), headers.get("if-none-match"))
            obj = _new_object(body)
            self._store(bucket, name, obj)
        return _Reply(200, {"etag": obj.etag, "opc-content-md5": obj.md5, "content-md5": obj.md5,
                            "last-modified": email.utils.format_datetime(obj.time_modified, usegmt=True)})

    def _delete_object(self, namespace: str, bucket: str, name: str, headers: dict[str, str]) -> _Reply:
        with self._lock:
            obj = self._lookup(namespace, bucket, name)
            _check_write_conditions(obj, headers.get("if-match"), None)
            self._remove(bucket, name)
        return _Reply(204)

    def _rename_object(self, namespace: str, bucket: str, body: bytes) -> _Reply:
        try:
            details = json.loads(body or b"{}")
            source, new = details["sourceName"], details["newName"]
        except (ValueError, KeyError, TypeError) as exc:
            raise OciError(400, "InvalidParameter", f"Bad RenameObjectDetails: {exc}") from None
        with self._lock:
            obj = self._lookup(namespace, bucket, source)
            objects = self._buckets[bucket]
            _check_write_conditions(obj, details.get("srcObjIfMatchETag"), None)
            _check_write_conditions(objects.get(new), details.get("newObjIfMatchETag"),
                                    details.get("newObjIfNoneMatchETag"))
            self._remove(bucket, source)
            self._store(bucket, new, replace(obj, time_modified=_now()))
        return _Reply(200)


def _parse_limit(value: str | None) -> int:
    if value is None:
        return MAX_LIST_LIMIT
    if not value.isdigit() or int(value) < 1:
        raise OciError(400, "InvalidParameter", f"limit must be a positive integer, got {value!r}")
    return min(int(value), MAX_LIST_LIMIT)


def _parse_fields(value: str | None) -> set:
    requested = {part.strip().lower() for part in (value or "name").split(",") if part.strip()}
    unknown = requested - set(LIST_FIELDS)
    if unknown:
        raise OciError(400, "InvalidParameter", f"Unknown fields: {sorted(unknown)}")
    return {LIST_FIELDS[f] for f in requested} | {"name"}


def _summary(name: str, obj: StoredObject, fields: set) -> dict:
    values = {"name": name, "size": len(obj.data), "etag": obj.etag, "md5": obj.md5,
              "timeCreated": _rfc3339(obj.time_created), "timeModified": _rfc3339(obj.time_modified),
              "storageTier": "Standard"}            # archivalState only exists for Archive-tier objects
    return {key: values[key] for key in sorted(fields) if key in values}


# ---- HTTP plumbing ----

class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple, emulator: ObjectStoreEmulator):
        self.emulator = emulator
        self._connections: set = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def get_request(self):
        sock, address = super().get_request()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)   # avoid Nagle + delayed-ACK stalls
        return sock, address

    def track(self, connection: socket.socket, active: bool) -> None:
        with self._connections_lock:
            (self._connections.add if active else self._connections.discard)(connection)

    def close_connections(self) -> None:
        with self._connections_lock:
            for connection in list(self._connections):
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], OSError):     # client went away (reset, broken pipe, ...)
            self.emulator.errors.append(traceback.format_exc())


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "OciObjectStoreEmulator/1.0"
    server: _Server

    def log_message(self, format: str, *args) -> None:   # silence per-request logging
        pass

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.track(self.connection, False)

    def do_GET(self) -> None:
        emulator = self.server.emulator
        url = urlsplit(self.path)
        headers = {key.lower(): value for key, value in self.headers.items()}
        query = dict(parse_qsl(url.query, keep_blank_values=True))    # "+" is a space, as requests sends it
        record = RequestRecord(self.command, unquote(url.path), query, 0, headers=headers, target=self.path,
                               client_port=self.client_address[1])
        fault = emulator._take_fault(self.command, record.path)
        record.fault = fault.kind if fault else ""
        try:
            body = self._read_body(headers)
            reply = self._reply_for(emulator, fault, url.path, record.query, headers, body)
        except OciError as exc:
            reply = _error_reply(exc.status, exc.code, exc.message)
        except Exception:
            emulator.errors.append(traceback.format_exc())
            reply = _error_reply(500, "InternalServerError", "emulator bug, see ObjectStoreEmulator.errors")
        self._send(emulator, record, reply, fault)

    do_HEAD = do_PUT = do_DELETE = do_POST = do_GET

    def _read_body(self, headers: dict[str, str]) -> bytes:
        if "chunked" in headers.get("transfer-encoding", "").lower():
            self.close_connection = True
            raise OciError(411, "LengthRequired", "Content-Length is required")
        return self.rfile.read(int(headers.get("content-length") or 0))

    def _reply_for(self, emulator: ObjectStoreEmulator, fault: Fault | None, raw_path: str,
                   query: dict[str, str], headers: dict[str, str], body: bytes) -> _Reply | None:
        if fault is not None and fault.kind == "drop":
            return None
        if fault is not None and fault.kind == "status":
            return _error_reply(fault.status, _fault_code(fault.status), "Injected fault")
        if fault is not None and fault.kind == "delay":
            emulator._stopping.wait(fault.delay)
        if fault is not None and fault.kind in ("delete", "replace"):
            emulator._change(raw_path, fault.kind)
        if emulator.require_auth and "authorization" not in headers:
            raise OciError(401, "NotAuthenticated", "The required information to complete authentication "
                                                    "was not provided")
        return emulator.route(self.command, raw_path, query, headers, body)

    def _send(self, emulator: ObjectStoreEmulator, record: RequestRecord, reply: _Reply | None,
              fault: Fault | None) -> None:
        record.status = reply.status if reply is not None else 0
        emulator._record(record)             # before any byte goes out, so the client never races it
        if reply is None:
            self.close_connection = True     # "drop": no response at all
            return
        payload = reply.body
        if fault is not None and fault.kind == "corrupt":
            payload = _flip_bytes(payload)
        if fault is not None and fault.kind == "truncate":
            payload = payload[:int(len(payload) * fault.fraction)]
            self.close_connection = True
        self.send_response(reply.status)
        for key, value in reply.headers.items():
            self.send_header(key, value)
        self.send_header("opc-request-id", uuid.uuid4().hex.upper())
        if "opc-client-request-id" in record.headers:
            self.send_header("opc-client-request-id", record.headers["opc-client-request-id"])
        self.send_header("Content-Length", str(len(reply.body)))
        self.end_headers()
        if self.command != "HEAD" and reply.status not in (204, 304) and payload:
            self.wfile.write(payload)


# ---- SDK config helper ----

_KEY_CACHE: tuple | None = None
_KEY_LOCK = threading.Lock()


def _test_key() -> tuple:
    """(PEM bytes, OCI fingerprint) of a 2048-bit RSA key, generated once per process."""
    global _KEY_CACHE
    with _KEY_LOCK:
        if _KEY_CACHE is None:
            from cryptography.hazmat.primitives import serialization
            from cryptography.hazmat.primitives.asymmetric import rsa

            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
            der = key.public_key().public_bytes(serialization.Encoding.DER,
                                                serialization.PublicFormat.SubjectPublicKeyInfo)
            digest = hashlib.md5(der, usedforsecurity=False).hexdigest()
            _KEY_CACHE = (pem, ":".join(digest[i:i + 2] for i in range(0, len(digest), 2)))
        return _KEY_CACHE


def write_oci_config(directory: Path, profile: str = "DEFAULT", pass_phrase: str | None = None) -> Path:
    """Write a throwaway API key and OCI config file into ``directory``; return the config path.

    With ``pass_phrase`` the key is encrypted with it, and the config names it, as OCI allows.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pem, fingerprint = _test_key()
    if pass_phrase is not None:
        from cryptography.hazmat.primitives import serialization
        key = serialization.load_pem_private_key(pem, None)
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.BestAvailableEncryption(pass_phrase.encode()))
    key_path = directory / "oci_api_key.pem"
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    os.chmod(key_path, 0o600)
    config_path = directory / "oci_config"
    config_path.write_text(
        f"[{profile}]\n"
        "user=ocid1.user.oc1..test\n"
        f"fingerprint={fingerprint}\n"
        f"key_file={key_path.resolve()}\n"
        "tenancy=ocid1.tenancy.oc1..test\n"
        "region=uk-london-1\n"
        + (f"pass_phrase={pass_phrase}\n" if pass_phrase is not None else ""))
    return config_path
