"""Load FASTA files from an OCI Object Storage bucket into a findNeighbour4 server.

The loader lists the bucket, works out which samples the findNeighbour4 (fn4) server lacks,
loads them oldest first and records every batch and every load attempt in a SQL catalogue
(tables ``fn4batchload`` and ``fn4loadattempt``) that dashboards read. When nothing is new it
waits ``--poll-interval`` seconds and looks again; it is meant to run for months unattended.

Usage::

    python3 objectstoreaccess.py "http://localhost:5025" "lxxxx" "FN4-queue" "unittest_oracle"
    python3 objectstoreaccess.py status unittest_oracle          # exit 0 OK, 1 warning, 2 critical, 3 unknown

Subcommands beside the loader (``run``, the default): ``status``, ``list``, ``upload``,
``download`` and ``retry-failed``. README.md is the manual: options, environment, databases,
failure handling, metrics, deployment and monitoring SQL.
"""
from __future__ import annotations

import bisect
import codecs
import signal
if __name__ == "__main__":
    # Run as a script, the imports below take half a second. Stop signals that arrive meanwhile are
    # held here and honoured by the command line once its own handlers are in (_install_signal_handlers).
    # Imported as a module, nothing is installed.
    _EARLY_SIGNALS: list[int] = []
    _EARLY_HANDLERS = {signum: signal.signal(signum, lambda signum, _frame: _EARLY_SIGNALS.append(signum))
                       for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
else:
    _EARLY_SIGNALS, _EARLY_HANDLERS = [], {}

import contextlib
import dataclasses
import email.utils
import fcntl
import hashlib
import html
import http.client
import http.server
import io
import itertools
import base64
import heapq
import json
import logging
import os
import queue
import random
import re
import socket
import ssl
import stat
import sys
import threading
import time
import weakref
import zlib
from array import array
from collections import defaultdict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property, partial
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any, BinaryIO, Callable, Iterable, Iterator
from urllib.parse import quote, quote_plus, urlsplit

import click
import requests
import sqlalchemy as sa
from sqlalchemy.dialects import mysql, oracle

# ---- Constants -------------------------------------------------------------------------------

#: Endings that make an object a FASTA file; each may be followed by ``.gz``.
FASTA_SUFFIXES = (".fasta", ".fa", ".fas", ".fna", ".mfasta")
#: What fn4 accepts after upper-casing: bases, N, gap, and the IUPAC two- and three-base codes.
FN4_ALPHABET = b"ACGTN-RYSWKMBDHV"
#: Guids are put into URL paths by fn4, so only these characters are allowed; fn4 refuses 60+.
GUID_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,59}")
#: The gzip magic bytes; compression is detected from content, never from the name.
GZIP_MAGIC = b"\x1f\x8b"

DEFAULT_POLL_INTERVAL = 180              # seconds to wait when a cycle found nothing new
DEFAULT_MAX_ATTEMPTS = 3                 # file-specific transient failures before giving a file up
DEFAULT_MAX_OBJECT_BYTES = 64 * 2**20    # cap on download and decompressed size: a 4.4 Mb genome x 14
DEFAULT_RECONCILE_INTERVAL = 86400       # seconds between full comparisons with fn4's guid list
EXISTS_CHECK_LIMIT = 200                 # above this many candidates, fetch the full guid list instead
SETTLE_WHILE_LISTING = 10000             # above this many unknown files in fn4, record them as pages arrive
PREFETCH_JOIN_TIMEOUT = 2.0              # seconds a batch waits for the prefetcher to end when it stops early
PREFETCH_DEPTH = 1                       # samples prepared ahead of the one being inserted
GIL_SWITCH_INTERVAL = 0.0002            # seconds a thread may hold the GIL while another waits, in a batch
WRITE_BATCH_ROWS = 16                    # catalogue rows gathered before a write (below MAX_UNWRITTEN_ROWS)
WRITE_BATCH_DELAY = 1.0                  # seconds the writer waits for more rows before writing what it has
MAX_UNWRITTEN_ROWS = 20                  # inserting pauses while more catalogue rows than this are unwritten
BACKOFF_BASE = 5.0                       # seconds: first wait after an outage or a failed retry
BACKOFF_CAP = float(DEFAULT_POLL_INTERVAL)  # seconds: the longest wait, about one poll interval
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)  # each asks for a warm stop: finish the sample
THREAD_JOIN_TIMEOUT = 2.0                # seconds an owner waits for a thread it told to stop; then it says so
#: How the last line of run's shutdown sequence begins (then the exit code and why): the loop has ended.
STOPPED_LOG = "shutdown complete"
FN4_TIMEOUT = (10.0, 600.0)              # (connect, read) seconds for fn4; a TB insert can take seconds
FN4_IDLE_REOPEN = 10.0                   # seconds idle after which the insert connection is reopened
FN4_PROBE_TIMEOUT = (5.0, 10.0)          # (connect, read) seconds for fn4's small GET routes
RETRY_AFTER_CAP = 900.0                  # seconds: the longest wait a Retry-After answer from fn4 can ask for
#: fn4's 500 text for a sequence whose length is not the reference's: the sample's fault, for good.
FN4_WRONG_LENGTH = "sequence must of the same length as reference"
#: fn4's 500 text when its own database is unreachable (asked before the insert lock): an outage.
FN4_DATABASE_DOWN = "Could not connect to database"
AUTO_RETRY_ROUNDS = 3                    # automatic re-queues of a given-up file before only an operator can
AUTO_RETRY_INTERVAL = 86400              # seconds after giving a file up before it is re-queued automatically
OCI_TIMEOUT = (10.0, 120.0)              # (connect, read) seconds for Object Storage calls
DB_CONNECT_TIMEOUT = 15                  # seconds to open a catalogue connection
DB_CALL_TIMEOUT = 60                     # seconds a catalogue call may take before its connections are dropped
IN_LIST_LIMIT = 1000                     # items in one SQL IN list: Oracle refuses more (ORA-01795)
DB_KEEPALIVE = 30                        # seconds idle before TCP keepalive probes on a catalogue connection
ONCE_CATALOGUE_PATIENCE = 30.0           # seconds --once waits for a catalogue that refuses writes, then exits 1
JOURNAL_COMPACT_BYTES = 1 << 20          # a journal larger than this is rewritten without its committed rows
DOWNLOAD_TRIES = 3                       # reads of one object within an attempt when cut off midway
DOWNLOAD_CHUNK = 1 << 20                 # bytes read from Object Storage at a time
OCI_IDLE_REOPEN = 10.0                   # seconds idle after which the download connection is reopened
_MAX_LINE = 65536                        # bytes in one line of an answer's head (KeptAlive): more is refused
_MAX_HEADERS = 100                       # header lines in one answer's head (KeptAlive)
SEND_JOINED_BYTES = 1 << 16              # a request body up to this size is sent in one write with its head
OCI_RETRY_ATTEMPTS = 5                   # SDK-level tries for 429 and 5xx answers of Object Storage
LIST_PAGE_SIZE = 1000                    # objects per ListObjects page, the service's largest
DEFAULT_LIST_WORKERS = 16                # key ranges listed at once, each by its own OCI client
RANGES_PER_WORKER = 4                    # key ranges per worker, so a worker with a short range takes another
#: Where a first listing splits the key space when it has learnt nothing yet (after its first page).
FIRST_LISTING_SPLITS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
OWN_RUNS_KEPT = 10_000                   # runs of its own attempt-row ids a catalogue remembers, newest kept
NAME_SAMPLE_SIZE = 4096                  # catalogue file names kept, evenly spaced, to split the first listing at
GUIDS_CHUNK = 1 << 20                    # bytes of fn4's guid list parsed at a time
DEFAULT_SQLITE_PATH = Path.home() / ".local" / "state" / "fn4loader" / "catalogue.sqlite"
DEFAULT_RETENTION_DAYS = 90              # catalogue rows older than this are removed, 0 keeps them all
RETENTION_INTERVAL = 86400               # seconds between removals of old rows: once a day, not every cycle
STALE_POLLS = 3                          # poll intervals without progress before status/healthz call it critical
STATUS_WINDOW = timedelta(hours=1)       # status judges recent attempts over this window: a recovery clears in it
LEVELS = ("ok", "warning", "critical", "unknown")  # status verdicts, by exit code
ABANDON_SERVICES = ("fn4", "object_storage", "loader")  # why a cycle is abandoned; loader: an unexpected error
METRICS_WORKERS = 4                      # threads answering /metrics and /healthz; more clients wait their turn
METRICS_TIMEOUT = 5.0                    # seconds a metrics client has to send its request (and to read the answer)
METRICS_BACKLOG = 128                    # connections the kernel holds for the metrics port: a scrape burst
DEFAULT_LEASE_TTL = 60                   # seconds an active loader's lease lasts unless it renews it
LEASE_CHECK_INTERVAL = 5.0               # seconds between a standby's looks at the lease (at most a third of the TTL)
LEASE_RETRY = 1.0                        # seconds before a failed renewal is tried again (at most a sixth of the TTL)
LEASE_POLL = 0.25                        # seconds between a standby loop's looks at its lease's state (in memory)
STALE_INSTANCE_AGE = 86400               # seconds after which rows of instances that vanished are removed
INSERT_SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)  # histogram

# Outcomes written to fn4loadattempt.outcome; every one but RETRY, SERVER_UNAVAILABLE, SERVER_BUSY
# and REQUEUED finishes the file (completed = 1), so it is not tried again.
INSERTED = "inserted"                    # fn4 answered 200
ALREADY_PRESENT = "already_present"      # fn4 answered 201
IN_SERVER = "in_server"                  # fn4 had the guid before we tried; nothing sent
FAILED = "failed"                        # permanent: bad file, bad guid, too large, 4xx
DUPLICATE = "duplicate"                  # another, older object has the same guid
VANISHED = "vanished"                    # deleted or replaced between listing and download
GAVE_UP = "gave_up"                      # failed --max-attempts times with transient-looking errors
RETRY = "retry"                          # transient failure of this file; tried again later
SERVER_UNAVAILABLE = "server_unavailable"  # fn4 or its database was down; not counted against the file
SERVER_BUSY = "server_busy"              # fn4 or a proxy asked us to wait (409 lock, 429, 408); not a failure
REQUEUED = "requeued"                    # an operator, or the daily automatic retry, asked for another try
UNFINISHED = frozenset({RETRY, SERVER_UNAVAILABLE, SERVER_BUSY, REQUEUED})
LOADED = frozenset({INSERTED, ALREADY_PRESENT, IN_SERVER})
REQUEUEABLE = frozenset({FAILED, GAVE_UP, DUPLICATE, VANISHED})
# The three states of a file that list, status, the metrics and README share, by its latest outcome:
# loaded (LOADED), failed (FAILED_FOR_GOOD: finished, not loaded) and pending (no row yet, or UNFINISHED).
FAILED_FOR_GOOD = frozenset({FAILED, GAVE_UP, DUPLICATE, VANISHED})
# Outcomes that are the fault of fn4, Object Storage or the loader, not the file's: a majority is critical.
LOADER_FAILURES = frozenset({RETRY, GAVE_UP, SERVER_UNAVAILABLE})
ARCHIVE_CHECK_LIMIT = 10000              # objects under the archive prefix looked at, at start, for unloaded ones

log = logging.getLogger("fn4loader")

# ---- Exceptions ------------------------------------------------------------------------------


class LoaderError(Exception):
    """Base of every error this module raises on purpose."""


class ConfigError(LoaderError):
    """Bad configuration found at start-up; the message says what to fix."""


class CatalogueMissing(ConfigError):
    """A read-only command was given a SQLite catalogue that does not exist; nothing was created."""


class SampleError(LoaderError):
    """A permanent problem with one file: it is recorded as failed and never retried."""

    def __init__(self, status: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class TransientError(LoaderError):
    """A problem that may pass: the file is retried in a later cycle."""


class ObjectChanged(LoaderError):
    """The object was deleted or replaced after it was listed."""


class Stopped(LoaderError):
    """The stop event was set during a step that ends early (a listing of many pages): the cycle ends here."""


class OutageError(LoaderError):
    """A service the whole cycle needs (fn4, Object Storage) is down; back off (as asked, if it did) and retry.

    ``service`` names it for the metrics and the catalogue: ``fn4`` or ``object_storage``.
    """

    def __init__(self, reason: str, service: str = "fn4", retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.service = service
        self.retry_after = retry_after  # seconds the service asked us to wait (Retry-After), capped


# ---- Records ---------------------------------------------------------------------------------


def utcnow() -> datetime:
    """Return the current time as an aware UTC datetime (the default injected clock)."""
    return datetime.now(timezone.utc)


def _naive_utc(moment: datetime | None) -> datetime | None:
    """Return a UTC datetime without tzinfo, as the catalogue stores it."""
    if moment is None or moment.tzinfo is None:
        return moment
    return moment.astimezone(timezone.utc).replace(tzinfo=None)


@dataclass(frozen=True)
class StoredObject:
    """One object as listed in the bucket."""

    name: str
    size: int
    etag: str
    md5: str | None
    time_created: datetime

    @cached_property
    def guid(self) -> str:
        return guid_from_name(self.name)

    @property
    def key(self) -> tuple[str, str]:
        return (self.name, self.etag)


@dataclass(frozen=True)
class Listing:
    """What a listing by key ranges kept, in name order, and what it saw."""

    objects: list[StoredObject]   # the FASTA objects the caller's filter kept
    listed: int                   # every FASTA object listed, kept or not
    pages: list[tuple[str, int]]  # every page's first name and entries: where to split the key space next time
    next_start: str | None = None  # where a listing cut short by max_pages would go on


@dataclass(frozen=True)
class Sample:
    """A downloaded, parsed and validated sample, its insert request body already built."""

    obj: StoredObject
    seqid: str
    length: int
    first_128_chars: str
    form: bytes  # the urlencoded POST body: built off the insert path, so inserts follow each other closely


@dataclass(frozen=True)
class Prepared:
    """What the prefetcher hands to the inserter: a sample, or why there is none."""

    obj: StoredObject
    sample: Sample | None
    error: LoaderError | None
    read_start: datetime
    read_end: datetime


@dataclass(frozen=True)
class InsertResult:
    """fn4's answer to one insert; ``status_code`` is None when no answer came."""

    status_code: int | None
    outcome: str
    message: str
    retry_after: float | None = None  # seconds a 429, 408, 409 or 503 answer asked us to wait, capped

    @property
    def parse_status(self) -> str:
        """Return ``wrong_length`` when fn4 refused the sequence's length, else ``ok``."""
        return "wrong_length" if self.status_code == 500 and FN4_WRONG_LENGTH in self.message else "ok"


@dataclass(frozen=True)
class InsertTry:
    """One file's turn in a batch, for its attempt row: its place, what was read, and when fn4 answered what."""

    item: Prepared
    number: int                           # the file's position in the batch, from 1
    size: int                             # files in the batch
    insert_start: datetime | None = None  # None: the sample was never sent
    insert_end: datetime | None = None
    result: InsertResult | None = None    # fn4's answer, as judged; None: never sent

    @property
    def status_code(self) -> int | None:
        """fn4's HTTP status; None when none came."""
        return self.result.status_code if self.result else None

    @property
    def pauses(self) -> bool:
        """True when fn4 was unavailable or busy: the batch pauses after this file."""
        return self.result is not None and self.result.outcome in (SERVER_UNAVAILABLE, SERVER_BUSY)


@dataclass(frozen=True)
class InsertSent:
    """An insert on its way to fn4 (FN4Client.send_insert): what reading its answer, or sending it again, needs."""

    body: bytes
    reused: bool                  # sent on a connection that had carried answers: the server may have closed it
    error: OSError | http.client.HTTPException | None = None  # why it could not be sent


@dataclass(frozen=True)
class CycleSummary:
    """What one cycle did: objects listed, files tried (loaded, failed or retried), and whether it paused."""

    listed: int
    tried: int
    loaded: int
    failed: int
    retried: int
    paused: bool

    @property
    def unproductive(self) -> bool:
        """True if the cycle paused, or tried files and loaded none: the loop backs off."""
        return self.paused or (self.tried > 0 and self.loaded == 0)


@dataclass(frozen=True, slots=True)
class FileState:
    """What the catalogue says of one file (object name and etag): its latest row's state."""

    completed: bool = False   # finished: loaded or failed for good
    outcome: str = ""         # the latest outcome, "" for a file never tried
    failed_attempts: int = 0  # file-specific transient failures so far

    @property
    def loaded(self) -> bool:
        return self.completed and self.outcome in LOADED

    @staticmethod
    def of(completed: Any, outcome: str | None, failed_attempts: int | None) -> FileState:
        """Return the state a catalogue row's columns give (None as 0 or ""); files loaded at once share one."""
        if completed and not failed_attempts and outcome in _LOADED_AT_ONCE:
            return _LOADED_AT_ONCE[outcome]
        return FileState(bool(completed), outcome or "", failed_attempts or 0)


#: The state of nearly every file, by outcome: loaded at the first attempt.
_LOADED_AT_ONCE = {outcome: FileState(True, outcome, 0) for outcome in (INSERTED, ALREADY_PRESENT, IN_SERVER)}


def fn4_server_url(url: str, check: bool = True) -> str:
    """Return an fn4 server URL as loaders record it in the catalogue: without a trailing slash.

    The one place the URL is normalised. Raises ConfigError if it is not an http:// or https:// URL,
    unless ``check`` is False (status's filter, which then matches no loader).
    """
    parts = urlsplit(url)
    if check and (parts.scheme not in ("http", "https") or not parts.netloc):
        raise ConfigError(f"fn4 server URL {url!r} is not an http:// or https:// URL")
    return url.rstrip("/")


@dataclass(frozen=True)
class Target:
    """What one loader loads: an Object Storage bucket into an fn4 server. Its rows and its lease name all three."""

    server_url: str   # normalised by fn4_server_url
    namespace: str
    bucket: str

    @classmethod
    def of(cls, fn4_url: str, namespace: str, bucket: str) -> Target:
        """Return the target of a loader given these arguments. Raises ConfigError if fn4_url is not http(s)."""
        return cls(fn4_server_url(fn4_url), namespace, bucket)


def knob(default: Any, env: str, help: str, **limits: Any) -> Any:
    """Declare a Settings field that is also a ``run`` option: its default, environment variable and help.

    ``limits`` may give ``kind`` (int or float) with ``min`` and ``max``: the values the option accepts.
    The command line builds the option from this declaration, and Settings from the options by name.
    """
    return field(default=default, metadata={"env": env, "help": help, **limits})


@dataclass(frozen=True)
class Settings:
    """The loader's knobs, built once by the command line; each knob field is also a ``run`` option."""

    prefix: str | None = knob(None, "FN4_PREFIX", "List only objects under this prefix (upload: put them under it).")
    poll_interval: float = knob(DEFAULT_POLL_INTERVAL, "FN4_POLL_INTERVAL",
                                "Seconds to wait after a cycle that found nothing.", kind=float, min=1)
    max_attempts: int = knob(DEFAULT_MAX_ATTEMPTS, "FN4_MAX_ATTEMPTS",
                             "File-specific transient failures before a file is given up.", kind=int, min=1)
    expected_length: int | None = knob(None, "FN4_EXPECTED_LENGTH", "Reference genome length; files of any other "
                                       "length fail. Default: no check.", kind=int, min=1)
    max_object_bytes: int = knob(DEFAULT_MAX_OBJECT_BYTES, "FN4_MAX_OBJECT_BYTES", "Largest object, compressed or "
                                 "decompressed, that is loaded (or uploaded).", kind=int, min=1)
    reconcile_interval: float = knob(DEFAULT_RECONCILE_INTERVAL, "FN4_RECONCILE_INTERVAL", "Seconds between full "
                                     "comparisons of the catalogue with fn4's guid list.", kind=float, min=60)
    on_success: str = knob("keep", "FN4_ON_SUCCESS", "What to do with a loaded object: keep it, delete it, or "
                           "rename:PREFIX/ (move it under PREFIX/, which is then never listed, by `list` either). "
                           "Keep when other loaders read the same bucket.")
    retention_days: int = knob(DEFAULT_RETENTION_DAYS, "FN4_RETENTION_DAYS", "Remove catalogue rows older than "
                               "this, once a day (each file's latest row is kept); 0 keeps everything.",
                               kind=int, min=0)
    list_workers: int = knob(DEFAULT_LIST_WORKERS, "FN4_LIST_WORKERS", "Key ranges of the bucket listed at once, "
                             "each over its own connection; 1 lists page by page.", kind=int, min=1, max=64)

    def __post_init__(self) -> None:
        if problem := on_success_problem(self.on_success):
            raise ConfigError(f"--on-success {problem}")
        if self.archive_prefix and (self.prefix or "").startswith(self.archive_prefix):
            raise ConfigError(f"--prefix {self.prefix!r} lies under the archive prefix {self.archive_prefix!r} "
                              "of --on-success: nothing would ever be loaded")

    @property
    def archive_prefix(self) -> str | None:
        return self.on_success.partition(":")[2] if self.on_success.startswith("rename:") else None


@dataclass(frozen=True)
class LoaderReport:
    """The health of one loader (host and fn4 server) as read from the catalogue by ``status``."""

    host_name: str
    server_url: str
    last_batch: datetime | None = None
    backlog: int | None = None                 # files pending: the last cycle's to load, less those finished since
    last_activity: datetime | None = None      # the last attempt row's latest time
    last_success: datetime | None = None       # the last insert fn4 answered 200 or 201
    outcomes: dict[str, int] = field(default_factory=dict)   # attempt rows by outcome, STATUS_WINDOW
    recent_files: dict[str, int] = field(default_factory=dict)  # files tried in STATUS_WINDOW, by latest outcome
    failed_files: tuple[dict[str, Any], ...] = ()            # latest rows of files failed for good
    abandoned: str | None = None               # why the latest cycle was abandoned, if it was
    abandoned_since: datetime | None = None    # when the cycles began to be abandoned
    abandoned_cycles: int = 0                  # cycles abandoned since the last one that ran
    paused: str | None = None                  # why the latest cycle paused (fn4 unavailable), if it did
    level: int = 0                             # 0 ok, 1 warning, 2 critical: the exit code of status
    problems: tuple[str, ...] = ()

    @property
    def heartbeat(self) -> datetime | None:
        """The loader's latest sign of life: its last batch row or attempt row."""
        return max((t for t in (self.last_batch, self.last_activity) if t), default=None)


def _column(sqltype: Any, comment: str) -> Any:
    """Declare a catalogue column on a row record: its SQL type and its comment."""
    return field(default=None, metadata={"type": sqltype, "comment": comment})


TIMESTAMP = (sa.DateTime()
             .with_variant(oracle.TIMESTAMP(), "oracle")
             .with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb"))


def _loader_columns(loads_into: str, source: str) -> Any:
    """Return the record of the columns that begin a batch and an attempt row: which loader, loading what where.

    The two tables word the comments their own way: the fn4 server ``loads_into``, the bucket ``source``.
    """
    @dataclass(frozen=True)
    class LoaderColumns:
        host_name: str = _column(sa.String(255), "Host the loader ran on")
        findneighbour_server_url: str = _column(sa.String(512), f"fn4 server {loads_into}")
        oci_namespace: str = _column(sa.String(128), f"Object Storage namespace {source}")
        bucket_name: str = _column(sa.String(256), f"Bucket {source}")
    return LoaderColumns


@dataclass(frozen=True)
class BatchRow(_loader_columns("the batch loads into", "listed")):
    """One fn4batchload row: written at the start of every cycle, the loader's heartbeat."""

    check_time: datetime = _column(TIMESTAMP, "UTC time the cycle began")
    objects_listed: int = _column(sa.Integer(), "FASTA objects in the bucket under the prefix")
    batch_size: int = _column(sa.Integer(), "Files this cycle will try to load")
    number_in_server: int = _column(
        sa.Integer(), "Guids in fn4: counted at full reconciliation, plus inserts since")
    reconciled: int = _column(sa.Integer(), "1 if fn4's full guid list was fetched this cycle")
    abandon_reason: str = _column(sa.String(2000), "Why the cycle was abandoned (a service unavailable); "
                                                   "empty for a cycle that ran")


@dataclass(frozen=True)
class AttemptRow(_loader_columns("loaded into", "of the file")):
    """One fn4loadattempt row: what happened to one file in one cycle."""

    file_name: str = _column(sa.String(1024), "Object name in the bucket")
    object_etag: str = _column(sa.String(128), "Object etag; a new etag is a new file")
    object_size: int = _column(sa.BigInteger(), "Object size in bytes, as listed")
    object_time_created: datetime = _column(TIMESTAMP, "UTC time the object was created")
    parse_status: str = _column(sa.String(64), "ok, or why the file could not be used")
    batch_start_time: datetime = _column(TIMESTAMP, "UTC start of the cycle that made this row")
    batch_sample_number: int = _column(sa.Integer(), "Position of the file in its batch, from 1")
    batch_size: int = _column(sa.Integer(), "Files in the batch")
    seqid: str = _column(sa.String(256), "First word of the FASTA header")
    len_seq: int = _column(sa.Integer(), "Sequence length in bases")
    first_128_chars: str = _column(sa.String(128), "First 128 characters of the sequence")
    bucket_read_start_time: datetime = _column(TIMESTAMP, "UTC time the download began")
    bucket_read_end_time: datetime = _column(TIMESTAMP, "UTC time download and parse ended")
    fn4id: str = _column(sa.String(256), "Guid: the object's base name without FASTA endings")
    insert_start_time: datetime = _column(TIMESTAMP, "UTC time the insert request was sent")
    insert_end_time: datetime = _column(TIMESTAMP, "UTC time fn4 answered or the request failed")
    insert_status_code: int = _column(sa.Integer(), "HTTP status fn4 answered; empty if none")
    completed: int = _column(sa.Integer(), "1 if the file is finished (loaded or failed for good)")
    outcome: str = _column(sa.String(32), "inserted, already_present, in_server, failed, duplicate, "
                                          "vanished, gave_up, retry, server_unavailable, server_busy or requeued")
    failed_attempts: int = _column(sa.Integer(), "File-specific transient failures so far")
    error_text: str = _column(sa.String(2000), "Why the attempt failed, for people")


def attempt_row(target: Target, host_name: str, obj: StoredObject, state: FileState, started: datetime | None,
                parse_status: str | None, error_text: str | None, tried: InsertTry | None = None) -> AttemptRow:
    """Return the attempt row of one file: its new ``state``, and what its turn in a batch learnt (``tried``)."""
    item = tried.item if tried else None
    sample = item.sample if item else None
    return AttemptRow(
        host_name=host_name, findneighbour_server_url=target.server_url, oci_namespace=target.namespace,
        bucket_name=target.bucket, file_name=obj.name, object_etag=obj.etag, object_size=obj.size,
        object_time_created=obj.time_created, parse_status=parse_status, batch_start_time=started,
        batch_sample_number=tried.number if tried else None, batch_size=tried.size if tried else None,
        seqid=sample.seqid[:256] if sample else None, len_seq=sample.length if sample else None,
        first_128_chars=sample.first_128_chars if sample else None,
        bucket_read_start_time=item.read_start if item else None, bucket_read_end_time=item.read_end if item else None,
        fn4id=obj.guid[:256], insert_start_time=tried.insert_start if tried else None,
        insert_end_time=tried.insert_end if tried else None, insert_status_code=tried.status_code if tried else None,
        completed=int(state.completed), outcome=state.outcome, failed_attempts=state.failed_attempts,
        error_text=error_text)


@dataclass(frozen=True)
class LeaseRow:
    """One fn4loaderlease row: a running loader instance. The one whose active_key is set holds the lease."""

    instance_token: str = _column(sa.String(32), "Random token of one loader process, new at every start")
    host_name: str = _column(sa.String(255), "Host the instance runs on")
    process_id: int = _column(sa.Integer(), "Process id of the instance on its host")
    findneighbour_server_url: str = _column(sa.String(512), "fn4 server the instance loads into")
    oci_namespace: str = _column(sa.String(128), "Object Storage namespace it loads from")
    bucket_name: str = _column(sa.String(256), "Bucket it loads from")
    lease_key: str = _column(sa.String(64), "SHA-256 of fn4 server URL, namespace and bucket: the lease sought")
    active_key: str = _column(sa.String(64), "lease_key while the instance holds the lease (is active), else "
                                             "empty; unique, so a lease has one holder")
    started: datetime = _column(TIMESTAMP, "Database UTC time the instance started")
    role_since: datetime = _column(TIMESTAMP, "Database UTC time the instance became active, or standby")
    renewed: datetime = _column(TIMESTAMP, "Database UTC time of its last renewal (active) or look (standby)")
    expires: datetime = _column(TIMESTAMP, "Database UTC time its lease lapses (if active) and it is presumed "
                                           "gone, unless renewed before")


# ---- Pure helpers ----------------------------------------------------------------------------


_FASTA_ENDING = re.compile("(?:" + "|".join(re.escape(s) for s in FASTA_SUFFIXES) + r")(?:\.gz)?\Z", re.I)


def fasta_suffix(name: str) -> str | None:
    """Return the FASTA ending of an object name (e.g. ``.mfasta.gz``), or None if it has none."""
    match = _FASTA_ENDING.search(name)
    return match.group() if match else None


def guid_from_name(name: str) -> str:
    """Return the guid of an object: its base name without the FASTA endings."""
    base = name.rsplit("/", 1)[-1]
    suffix = fasta_suffix(base)
    return base[: -len(suffix)] if suffix else base


def on_success_problem(value: str) -> str | None:
    """Return why an --on-success value is unusable, or None.

    An archive prefix must end with '/': rename:arch would hide a waiting arch_sample7.fasta.
    """
    if value in ("keep", "delete"):
        return None
    if not value.startswith("rename:") or len(value) == len("rename:"):
        return f"{value!r}: use keep, delete, or rename:PREFIX/ (e.g. rename:loaded/)"
    if not value.endswith("/"):
        return (f"{value!r}: the archive prefix must end with '/' (e.g. {value}/), or objects whose names "
                "merely start with it would never be loaded")
    return None


def prefix_end(prefix: str) -> str | None:
    """Return the first name after every name that starts with ``prefix`` (None: no such name)."""
    while prefix and prefix[-1] == chr(0x10FFFF):
        prefix = prefix[:-1]
    return prefix[:-1] + chr(ord(prefix[-1]) + 1) if prefix else None


def key_ranges(prefix: str | None, exclude: str | None,
               boundaries: Iterable[str] = ()) -> list[tuple[str | None, str | None]]:
    """Return the name ranges [start, end) that cover names under ``prefix`` but none under ``exclude``.

    Object Storage sorts names by their UTF-8 bytes, which is code point order, so the names under
    ``exclude`` are exactly those from ``exclude`` up to (not including) ``exclude`` with its last
    character raised by one: arch/ leaves out [arch/, arch0), and arch.fasta and arch_1.fasta stay.
    The ranges are split further at ``boundaries``, to be listed concurrently; None leaves a side
    open. Concatenated in order, the ranges' listings are the listing of the whole.
    """
    prefix = prefix or ""
    if exclude and prefix.startswith(exclude):
        return []
    cuts = sorted(set(boundaries))
    ranges = list(zip([None] + cuts, cuts + [None]))
    if not exclude or not exclude.startswith(prefix):
        return ranges
    hole_start, hole_end = exclude, prefix_end(exclude)
    kept: list[tuple[str | None, str | None]] = []
    for start, end in ranges:
        if start is None or start < hole_start:  # the part before the hole
            kept.append((start, hole_start if end is None or end > hole_start else end))
        if hole_end is not None and (end is None or end > hole_end):  # the part after it
            kept.append((hole_end if start is None or start < hole_end else start, end))
    return kept


def sorted_array(values: array) -> array:  # type: ignore[type-arg]
    """Return a sorted copy of an array of integers, sorting it a slice at a time then merging the slices.

    A plain sorted() would hold every value as a Python int at once: 80 MB for 2 million values,
    against 16 MB for the array itself.
    """
    step = 1 << 18
    slices = [array(values.typecode, sorted(values[i:i + step])) for i in range(0, len(values), step)]
    return array(values.typecode, heapq.merge(*slices))


def _repeated(values: Iterable[int]) -> set[int]:
    """Return the values that occur more than once."""
    ordered = sorted_array(array("q", values))
    return {a for a, b in zip(ordered, itertools.islice(ordered, 1, None)) if a == b}


def split_points(pages: Iterable[tuple[str, int]], ranges: int) -> list[str]:
    """Return page first names that split a listing's pages into about ``ranges`` ranges of at least a page."""
    pages = list(pages)
    size = max(LIST_PAGE_SIZE, sum(count for _, count in pages) // max(ranges, 1))
    points, filled = [], 0
    for name, count in pages:
        if filled >= size and _utf8(name):  # a name that cannot be sent back (a lone surrogate) splits nothing
            points.append(name)
            filled = 0
        filled += count
    return points


class NameSample:
    """Every ``step``-th of the names met, the step doubling whenever ``2 * size`` are kept: at most that many.

    The catalogue names every file listed before: its names split the bucket into ranges of about
    equal size at start, before any listing has been seen (see ``pages``).
    """

    def __init__(self, size: int = NAME_SAMPLE_SIZE) -> None:
        self.size, self.step, self.seen = size, 1, 0
        self.names: list[str] = []

    def add(self, name: str) -> None:
        if not self.seen % self.step:
            self.names.append(name)
            if len(self.names) >= 2 * self.size:
                del self.names[1::2]
                self.step *= 2
        self.seen += 1

    def pages(self) -> list[tuple[str, int]]:
        """Return the names kept, sorted, as the first names of pages of ``step`` names: for split_points."""
        return [(name, self.step) for name in sorted(self.names)]


def _utf8(text: str) -> bool:
    """Return True if ``text`` can be encoded as UTF-8 (it holds no lone surrogate)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def guid_problem(guid: str) -> str | None:
    """Return why fn4 cannot take this guid, or None if it can."""
    if len(guid) >= 60:
        return f"guid is {len(guid)} characters long; fn4 refuses 60 or more"
    if not GUID_PATTERN.fullmatch(guid):
        return ("guid holds characters unsafe in a URL path; allowed are letters, digits, "
                f"'.', '_' and '-': {guid!r}")
    return None


def inflate(chunks: Iterable[bytes], max_bytes: int) -> bytearray:
    """Join chunks into the file's content, gunzipping if it starts with the gzip magic.

    Raises SampleError for an empty object, corrupt gzip, or content above ``max_bytes``.
    """
    content = bytearray()  # grown in place: no list of parts and no second copy to join them
    gunzip: _Gunzip | None = None
    head = b""
    for chunk in chunks:
        if head is not None:  # decide on compression from the first two bytes
            head += chunk
            if len(head) < 2:
                continue
            chunk, head = head, None
            gunzip = _Gunzip() if chunk.startswith(GZIP_MAGIC) else None
        content += gunzip.feed(chunk, max_bytes - len(content)) if gunzip else chunk
        if len(content) > max_bytes:
            raise SampleError("too_large", f"content exceeds the limit of {max_bytes} bytes")
    if head:
        content += head
    if gunzip and not gunzip.complete:
        raise SampleError("corrupt_gzip", "gzip data is truncated: the stream does not end")
    if not content:
        raise SampleError("empty", "the file is empty (0 bytes once decompressed)")
    return content


class _Gunzip:
    """Bounded gzip decompression fed chunk by chunk, concatenated members included."""

    def __init__(self) -> None:
        self._inflater = zlib.decompressobj(31)

    @property
    def complete(self) -> bool:
        return self._inflater.eof

    def feed(self, chunk: bytes, room: int) -> bytes:
        """Return the bytes this chunk decompresses to; SampleError beyond ``room`` or if corrupt."""
        out = []
        while chunk:
            try:
                piece = self._inflater.decompress(chunk, max(room, 0) + 1)
            except zlib.error as exc:
                raise SampleError("corrupt_gzip", f"gzip data is corrupt: {exc}") from None
            if self._inflater.unconsumed_tail or len(piece) > room:
                raise SampleError("too_large", "decompressed content exceeds the size limit")
            out.append(piece)
            room -= len(piece)
            chunk = b""
            if self._inflater.eof and self._inflater.unused_data:  # another gzip member follows
                chunk = self._inflater.unused_data
                self._inflater = zlib.decompressobj(31)
        return b"".join(out)


#: Upper-cases fn4's alphabet and maps every other byte to NUL, so one pass both normalises and checks.
_TO_FN4 = bytes(u if (u := c - 32 if 97 <= c <= 122 else c) in FN4_ALPHABET else 0 for c in range(256))


def parse_fasta(data: bytes | bytearray) -> tuple[str, bytes]:
    """Return (seqid, upper-cased sequence) of a one-record FASTA file.

    Raises SampleError, with a short status and a reason for people, for anything fn4 would
    refuse or that is not exactly one record. A bytearray is consumed, to save a copy.
    """
    if not data or data.isspace():
        raise SampleError("empty", "the file holds only white space")
    if not data.startswith(b">"):
        raise SampleError("no_header", "the file does not start with a '>' header line")
    end = data.find(b"\n")
    if end < 0:
        header, body = data[1:], b""
    elif isinstance(data, bytearray):
        header = data[1:end]
        del data[:end + 1]  # CPython drops a bytearray's head in place, without copying the rest
        body = data
    else:
        header, body = data[1:end], data[end + 1:]
    if b">" in body:  # one byte to look for is much faster than two; a '>' mid-line is a bad character
        records = 1 + body.startswith(b">") + body.count(b"\n>")
        if records > 1:
            raise SampleError("multiple_records", f"the file holds {records} records; exactly one is expected")
    seq = body.translate(_TO_FN4, b"\r\n")  # one pass: drop line ends, upper-case, mark others NUL
    if not seq:
        raise SampleError("no_sequence", "the file has a header but no sequence")
    first = seq.find(0)
    if first >= 0:
        bad = body.translate(None, FN4_ALPHABET + FN4_ALPHABET.lower() + b"\r\n")
        shown = ", ".join(repr(chr(c)) for c in sorted(set(bad))[:5])
        raise SampleError("bad_characters", f"the sequence holds characters fn4 refuses: {shown} "
                                            f"(first at base {first + 1})")
    words = header.split(maxsplit=1)
    seqid = words[0].decode("utf-8", "replace") if words else ""
    return seqid, seq


def file_state(outcome: str | None) -> str:
    """Return a file's state for people from its latest outcome: loaded, failed (for good) or pending."""
    return "loaded" if outcome in LOADED else "failed" if outcome in FAILED_FOR_GOOD else "pending"


def backoff(failures: int, base: float = BACKOFF_BASE, cap: float = BACKOFF_CAP,
            rng: Callable[[], float] = random.random) -> float:
    """Return seconds to wait after ``failures`` consecutive failures: capped, with equal jitter."""
    ceiling = min(cap, base * 2 ** max(failures - 1, 0))
    return ceiling / 2 + rng() * ceiling / 2


#: Values never to show (passwords, pass phrases, the Sentry DSN) in every form they may be written in,
#: longest first, added as they are learnt; logs, Sentry events, catalogue rows and CLI errors are redacted with it.
_SECRETS: list[str] = []
#: The password of a URL as typed (percent-encoded or not), found as SQLAlchemy finds it.
_TYPED_PASSWORD = re.compile(r"[\w+]+://[^:/]*:([^@]*)@")


def secret_forms(secret: str, *typed: str) -> set[str]:
    """Return the ways a secret may be written: as typed, decoded, percent-encoded, escaped in JSON or repr."""
    texts = {secret, *typed, quote(secret, safe=""), quote_plus(secret),
             re.sub(r"[:@/]", lambda m: f"%{ord(m.group()):X}", secret)}  # as SQLAlchemy renders it
    texts |= {re.sub(r"%[0-9A-F]{2}", lambda m: m.group().lower(), text) for text in texts}
    forms = set(texts)
    for text in texts:
        forms |= {json.dumps(text)[1:-1], json.dumps(text, ensure_ascii=False)[1:-1], repr(text)[1:-1],
                  text.replace("\\", "\\\\").replace("'", "\\'"), text.encode("unicode_escape").decode()}
    return forms


def _remember_secret(value: str | None, *typed: str) -> None:
    """Redact ``value`` from now on, in every form it may be written in (``typed``: forms as the user gave it)."""
    if value:
        _SECRETS.extend(form for form in secret_forms(value, *typed) if form not in _SECRETS)
        _SECRETS.sort(key=len, reverse=True)  # in place: the log filter holds this list


def redact(text: str, secrets: Iterable[str]) -> str:
    """Return text with every secret replaced by ***."""
    for secret in secrets:
        if secret and len(secret) >= 3:
            text = text.replace(secret, "***")
    return text


def redact_all(value: Any, secrets: Iterable[str]) -> Any:
    """Return a structure (a Sentry event) with every string in it, keys included, redacted."""
    if isinstance(value, str):
        return redact(value, secrets)
    if isinstance(value, dict):
        return {redact_all(k, secrets): redact_all(v, secrets) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_all(v, secrets) for v in value]
    return value


def safe_file_name(name: str) -> str:
    """Return an object name as a local file name that cannot leave its folder or hide: a/b c -> a_b_c."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[-200:].lstrip("._-") or "object"


def _json_value(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else str(value)


# ---- Kept-alive HTTP -------------------------------------------------------------------------


class KeptAlive:
    """One kept-alive HTTP/1.1 connection for the per-sample requests: signed GETs and fn4 inserts.

    http.client spends about 0.15 ms of CPU on each request and answer (header checks, and the email
    package parsing the answer's head), a tenth of a SARS-CoV-2 sample's budget, twice a sample.
    Here the caller builds the request's head as bytes, sent with the body in one write, and an
    answer's head is read line by line. Raises OSError (TimeoutError; a ConnectionError, such as
    http.client.RemoteDisconnected, when the server closed the connection) or http.client's
    HTTPException for an answer that is not HTTP/1.x.
    """

    def __init__(self, host: str, port: int | None, tls: ssl.SSLContext | None, timeout: tuple[float, float]) -> None:
        sock = socket.create_connection((host, port or (443 if tls else 80)), timeout[0])
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if tls is not None:
                sock = tls.wrap_socket(sock, server_hostname=host)
            sock.settimeout(timeout[1])
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._in = sock.makefile("rb")
        self._left: int | None = 0  # body bytes still to read; None: chunked; -1: until the server closes
        self.will_close = False     # the server closes the connection after this answer
        self.answers = 0            # answers read to their end on this connection
        self.awaiting = False       # a request was sent and its answer's head is not yet read
        self.used = time.monotonic()

    @property
    def idle(self) -> bool:
        """True when the last answer was read to its end and the connection can carry another request."""
        return self._left == 0 and not self.awaiting and not self.will_close and self._sock.fileno() >= 0

    def request(self, head: bytes, body: bytes = b"") -> tuple[int, dict[str, str]]:
        """Send a request (``head`` ends with an empty line); return the answer's status and headers.

        Header names are lower-cased. Read the body next, with ``chunks`` or ``read``.
        """
        self.send(head, body)
        return self.answer(bodiless=head.startswith(b"HEAD "))

    def send(self, head: bytes, body: bytes = b"") -> None:
        """Send a request without reading its answer (see ``answer``)."""
        self.awaiting = True
        if len(body) > SEND_JOINED_BYTES:  # a genome's body: sent after its head, not copied to join them
            self._sock.sendall(head)
            self._sock.sendall(body)
        else:  # one write: a small request is not split into two packets
            self._sock.sendall(head + body)

    def answer(self, bodiless: bool = False) -> tuple[int, dict[str, str]]:
        """Return the status and headers of the answer to the request sent; ``bodiless``: it was a HEAD."""
        while True:  # an interim 1xx answer is followed by the real one
            status, headers = self._head()
            if status >= 200:
                break
        self.awaiting = False
        framing = headers.get("transfer-encoding", "").lower()
        self.will_close = "close" in headers.get("connection", "").lower()
        if status in (204, 304) or bodiless:
            self._left = 0
        elif "chunked" in framing:
            self._left = None
        elif headers.get("content-length", "").isdigit() and not framing:
            self._left = int(headers["content-length"])
        else:
            self._left, self.will_close = -1, True
        self.used = time.monotonic()
        return status, headers

    def _head(self) -> tuple[int, dict[str, str]]:
        line = self._in.readline(_MAX_LINE)
        if not line:
            raise http.client.RemoteDisconnected("the server closed the connection without answering")
        version, _, rest = line.partition(b" ")
        if not version.startswith(b"HTTP/1.") or not rest[:3].isdigit():
            raise http.client.BadStatusLine(repr(line[:100]))
        headers: dict[str, str] = {}
        for _ in range(_MAX_HEADERS):
            line = self._in.readline(_MAX_LINE)
            if line in (b"\r\n", b"\n", b""):
                if version == b"HTTP/1.0" and "keep-alive" not in headers.get("connection", "").lower():
                    headers["connection"] = "close"
                return int(rest[:3]), headers
            name, colon, value = line.decode("latin-1").partition(":")
            if colon:
                name, value = name.strip().lower(), value.strip()
                headers[name] = f"{headers[name]}, {value}" if name in headers else value
        raise http.client.LineTooLong(f"more than {_MAX_HEADERS} header lines")

    def chunks(self, size: int) -> Iterator[bytes]:
        """Yield the answer's body in pieces of at most ``size`` bytes; stops early if the server closes."""
        while self._left != 0:
            if self._left is None:
                length = int(self._in.readline(_MAX_LINE).split(b";")[0], 16)
                if length == 0:
                    while self._in.readline(_MAX_LINE) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    self._left = 0
                    break
                piece = self._read_exactly(length)
                self._in.readline(_MAX_LINE)
                yield piece
                continue
            piece = self._in.read1(size if self._left < 0 else min(size, self._left))
            if not piece:  # closed by the server
                self._left, self.will_close = (0 if self._left < 0 else self._left), True
                return
            if self._left > 0:
                self._left -= len(piece)
            yield piece
        self.answers += 1
        if self.will_close:
            self.close()

    def _read_exactly(self, length: int) -> bytes:
        piece = self._in.read(length)
        if len(piece) < length:
            self.will_close = True
            raise http.client.IncompleteRead(piece, length - len(piece))
        return piece

    def read(self) -> bytes:
        """Return the whole body. Raises http.client.IncompleteRead if the server closed before its end."""
        body = b"".join(self.chunks(DOWNLOAD_CHUNK))
        if self._left:
            raise http.client.IncompleteRead(body, self._left)
        return body

    def close(self) -> None:
        self._in.close()
        self._sock.close()


# ---- Object store ----------------------------------------------------------------------------


def _import_oci() -> Any:
    """Import the OCI SDK's object storage client only, which keeps start-up fast."""
    os.environ.setdefault("OCI_PYTHON_SDK_NO_SERVICE_IMPORTS", "1")
    import oci
    import oci.object_storage  # noqa: F401  (the one service we need)
    return oci


def oci_retry_strategy(oci: Any) -> Any:
    """Return the SDK retry strategy: 429 throttling and 5xx answers, capped, with jitter."""
    return oci.retry.RetryStrategyBuilder(
        max_attempts_check=True, max_attempts=OCI_RETRY_ATTEMPTS,
        total_elapsed_time_check=True, total_elapsed_time_seconds=300,
        service_error_check=True, service_error_retry_on_any_5xx=True,
        service_error_retry_config={429: [], 409: ["ConcurrentObjectUpdate"]},
        retry_base_sleep_time_seconds=1, retry_max_wait_between_calls_seconds=30,
        backoff_type=oci.retry.BACKOFF_FULL_JITTER_EQUAL_ON_THROTTLE_VALUE,
    ).get_retry_strategy()


class ObjectStoreClient:
    """List and read FASTA objects in one bucket through the OCI SDK.

    One thread downloads through a client (its kept-alive download connection is not shared); a
    second loader in the same process needs a client of its own.
    """

    def __init__(self, client: Any, namespace: str, bucket: str, new_client: Callable[[], Any] | None = None) -> None:
        self._oci = _import_oci()
        self._client = client
        self.namespace = namespace
        self.bucket = bucket
        # Listing workers each use a client of their own (the SDK's clients are not documented as
        # thread-safe), built once by new_client and kept; without new_client, listing is sequential.
        self._new_client = new_client
        self._list_clients: list[Any] = []
        # Downloads go straight over one kept-alive connection when requests would add nothing from
        # the environment (see _lean): no proxy to go through.
        self._direct = new_client is not None and not client.base_client.session.trust_env
        self._conn: KeptAlive | None = None

    @classmethod
    def from_config(cls, namespace: str, bucket: str, auth: str = "api_key",
                    config_file: str | None = None, profile: str | None = None,
                    endpoint: str | None = None, retry_strategy: Any = None) -> ObjectStoreClient:
        """Build a client with one of the OCI CLI's auth methods. Raises ConfigError."""
        oci = _import_oci()
        kwargs: dict[str, Any] = {"timeout": OCI_TIMEOUT,
                                  "retry_strategy": retry_strategy or oci_retry_strategy(oci),
                                  # the SDK's process-wide breaker would fail every call for 30 s after
                                  # ten errors; the loop's own backoff handles outages instead
                                  "circuit_breaker_strategy": oci.circuit_breaker.NoCircuitBreakerStrategy(),
                                  # listings come back as plain JSON: building SDK models for 100,000
                                  # objects would cost most of an idle cycle
                                  "skip_deserialization": True}
        if endpoint:
            kwargs["service_endpoint"] = endpoint
        try:
            config, signer = _oci_auth(oci, auth, config_file, profile)
            kwargs.update({"signer": signer} if signer else {})
            client = oci.object_storage.ObjectStorageClient(config, **kwargs)
        except (oci.exceptions.ClientError, KeyError, OSError, ValueError) as exc:
            reason = f"the profile lacks {exc.args[0]!r}" if isinstance(exc, KeyError) else _short(exc)
            raise ConfigError(f"OCI {auth} authentication is not usable: {reason}; "
                              "check --config-file, --profile and --auth") from None
        return cls(_lean(client), namespace, bucket,
                   lambda: _lean(oci.object_storage.ObjectStorageClient(config, **kwargs)))

    @property
    def endpoint(self) -> str:
        return str(self._client.base_client.endpoint)

    def check_access(self) -> None:
        """Read one listing entry, once, without the SDK's retries (a start-up check answers at once).

        Raises ConfigError for a missing bucket or refused credentials, OutageError if Object Storage
        does not answer or answers with an error.
        """
        try:
            self._client.list_objects(self.namespace, self.bucket, limit=1,
                                      retry_strategy=self._oci.retry.NoneRetryStrategy())
        except self._oci.exceptions.ServiceError as exc:
            if exc.status in (401, 403, 404):
                raise ConfigError(
                    f"Object Storage answered {exc.status} {exc.code} for bucket {self.bucket!r} in "
                    f"namespace {self.namespace!r}: check the names and the credentials' policies") from None
            raise OutageError(f"Object Storage at {self.endpoint} answered {exc.status} {exc.code}") from None
        except Exception as exc:  # connection faults at start are outages, not configuration
            if not _is_network_error(exc):
                raise
            raise OutageError(f"Object Storage at {self.endpoint} is not answering: {_network_cause(exc)}") from None

    def list_objects(self, prefix: str | None = None, exclude: str | None = None) -> Iterator[StoredObject]:
        """Yield every FASTA object under ``prefix`` in name order, all pages. Raises OutageError.

        Names under ``exclude`` (the archive prefix) are left out by key range (see key_ranges), so
        Object Storage never sends them.
        """
        for start, end in key_ranges(prefix, exclude):
            yield from self.list_range(prefix, start, end)

    def list_range(self, prefix: str | None = None, start: str | None = None,
                   end: str | None = None) -> Iterator[StoredObject]:
        """Yield the FASTA objects under ``prefix`` whose names lie in [start, end), all pages.

        ``start`` is inclusive and ``end`` exclusive, as in ListObjects; None leaves that side open.
        Raises OutageError.
        """
        cursor = start
        while True:
            page = self._page(self._client, prefix, cursor, end)
            for item in page.get("objects", ()):
                if fasta_suffix(item["name"]):
                    yield _stored_object(item)
            cursor = page.get("nextStartWith")
            if not cursor:
                return

    def list_ranges(self, ranges: list[tuple[str | None, str | None]], prefix: str | None = None,
                    workers: int = 1, keep: Callable[[dict[str, Any]], bool] | None = None,
                    max_pages: int | None = None, stop: threading.Event | None = None) -> Listing:
        """List key ranges [start, end), ``workers`` at a time, and merge them in name order.

        ``keep(entry)`` decides, page by page as they arrive, which FASTA objects are kept (the entry is
        the listing's JSON: name, size, etag, md5, timeCreated); it is
        called from the listing threads. ``max_pages`` stops each range after that many pages (a
        probe: see ``next_start``). Raises OutageError when any range fails, and Stopped when ``stop``
        is set: each range ends after its page in flight.
        """
        workers = max(1, min(workers, len(ranges))) if self._new_client else 1
        clients = self._clients(workers)
        failed = threading.Event()

        def list_one(start: str | None, end: str | None
                     ) -> tuple[list[StoredObject], int, list[tuple[str, int]], str | None]:
            client = clients.get()
            try:
                return self._list_range(client, prefix, start, end, keep, failed, max_pages, stop)
            except BaseException:
                failed.set()  # the other ranges stop after their current page
                raise
            finally:
                clients.put(client)

        if workers == 1:
            parts = [list_one(start, end) for start, end in ranges]
        else:
            with ThreadPoolExecutor(workers, thread_name_prefix="list") as pool:
                futures = [pool.submit(list_one, start, end) for start, end in ranges]
                try:
                    parts = [future.result() for future in futures]
                finally:
                    failed.set()
                    for future in futures:
                        future.cancel()
        return Listing([obj for part in parts for obj in part[0]], sum(part[1] for part in parts),
                       [page for part in parts for page in part[2]], next((p[3] for p in parts if p[3]), None))

    def _clients(self, workers: int) -> queue.SimpleQueue[Any]:
        """Return ``workers`` SDK clients to take turns with (made once, kept): one per listing thread."""
        while len(self._list_clients) < workers - 1:
            self._list_clients.append(self._new_client())  # type: ignore[misc]
        clients: queue.SimpleQueue[Any] = queue.SimpleQueue()
        for client in [self._client] + self._list_clients[:workers - 1]:
            clients.put(client)
        return clients

    def _list_range(self, client: Any, prefix: str | None, start: str | None, end: str | None,
                    keep: Callable[[dict[str, Any]], bool] | None, failed: threading.Event,
                    max_pages: int | None, stop: threading.Event | None = None
                    ) -> tuple[list[StoredObject], int, list[tuple[str, int]], str | None]:
        objects: list[StoredObject] = []
        listed = 0
        starts: list[tuple[str, int]] = []
        cursor, pages = start, 0
        while not failed.is_set() and (max_pages is None or pages < max_pages):
            if stop is not None and stop.is_set():
                raise Stopped("stopped while listing the bucket")
            items = (page := self._page(client, prefix, cursor, end)).get("objects") or ()
            pages += 1
            if items:
                starts.append((items[0]["name"], len(items)))
            for item in items:
                if fasta_suffix(item["name"]):
                    listed += 1
                    if keep is None or keep(item):
                        objects.append(_stored_object(item))
            cursor = page.get("nextStartWith")
            if not cursor:
                return objects, listed, starts, None
        return objects, listed, starts, cursor

    def _page(self, client: Any, prefix: str | None, start: str | None, end: str | None) -> dict[str, Any]:
        """Return one ListObjects page as plain JSON. Raises OutageError."""
        try:
            page = client.list_objects(self.namespace, self.bucket, prefix=prefix, start=start, end=end,
                                       limit=LIST_PAGE_SIZE, fields="name,size,etag,md5,timeCreated").data
        except Exception as exc:
            if self._is_fault(exc):
                raise OutageError(f"listing bucket {self.bucket!r} failed: {_oci_reason(exc)}",
                                  "object_storage") from None
            raise
        if not isinstance(page, dict) or not isinstance(page.get("objects", []), list):
            raise OutageError(f"listing bucket {self.bucket!r} answered something that is not a listing",
                              "object_storage")
        return page

    def read_object(self, obj: StoredObject, max_bytes: int) -> bytearray:
        """Download an object whole and return its decompressed content.

        Raises SampleError (too large, corrupt, empty), ObjectChanged (deleted or replaced since
        listing) or TransientError (cut off or failed ``DOWNLOAD_TRIES`` times).
        """
        if obj.size > max_bytes:
            raise SampleError("too_large", f"object is {obj.size} bytes; the limit is {max_bytes}")
        reason = ""
        for _ in range(DOWNLOAD_TRIES):
            try:
                return self._read_once(obj, max_bytes)
            except TransientError as exc:
                reason = str(exc)
                log.info("download of %s failed (%s); reading it again", obj.name, reason)
        raise TransientError(f"download failed {DOWNLOAD_TRIES} times: {reason}")

    def _open(self, obj: StoredObject) -> SimpleNamespace:
        """Start reading an object (see _get_object). Raises ObjectChanged or TransientError."""
        try:
            return self._get_object(obj.name, obj.etag)
        except self._oci.exceptions.ServiceError as exc:
            if exc.status in (404, 412):
                raise self._confirm_change(obj, exc.status) from None
            raise TransientError(f"Object Storage answered {exc.status} {exc.code}") from None
        except Exception as exc:
            if _is_network_error(exc):
                raise TransientError(f"Object Storage unreachable: {_short(exc)}") from None
            raise

    def _read_once(self, obj: StoredObject, max_bytes: int) -> bytearray:
        response = self._open(obj)
        expected = int(response.headers.get("content-length", -1))
        digest = hashlib.md5(usedforsecurity=False)
        received = 0
        ended = False  # the body ended: a verdict on its content may then be due to a cut-off download

        def counted() -> Iterator[bytes]:
            nonlocal received, ended
            for chunk in response.chunks:
                received += len(chunk)
                if received > max_bytes:
                    raise SampleError("too_large", f"object exceeds the limit of {max_bytes} bytes")
                digest.update(chunk)
                yield chunk
            ended = True

        try:
            data = inflate(counted(), max_bytes)
        except SampleError:
            # A verdict reached mid-body (a bomb, corrupt data) stands; one reached at a short end does not.
            if ended and 0 <= expected != received:
                raise TransientError(f"download cut off after {received} of {expected} bytes") from None
            raise
        except Exception as exc:
            if _is_network_error(exc):
                raise TransientError(f"download cut off after {received} bytes: {_short(exc)}") from None
            raise
        finally:
            response.close()
        _check_body(response.headers, received, digest, obj.md5)
        return data

    def _get_object(self, name: str, etag: str | None) -> SimpleNamespace:
        """GET an object if it still has ``etag`` (None: as it is); return its headers, its body's chunks and close.

        The SDK's get_object spends about 1 ms of CPU a call above the request itself (model layers,
        per-request objects, the environment read again). So, without a proxy, the GET goes over one
        kept-alive connection instead, signed by the SDK's own signer and retried by its own retry
        strategy, exactly as get_object would. Raises the SDK's ServiceError for error answers.
        """
        if not self._direct:
            response = self._client.get_object(self.namespace, self.bucket, name, if_match=etag)
            return SimpleNamespace(headers=response.headers, close=response.data.close,
                                   chunks=response.data.raw.stream(DOWNLOAD_CHUNK, decode_content=False))
        strategy = self._client.retry_strategy or self._oci.retry.NoneRetryStrategy()
        conn, headers = strategy.make_retrying_call(self._get_direct, name, etag)

        def close() -> None:
            if not conn.idle:  # the body was not read to its end: the connection is spent
                self._drop_connection()

        return SimpleNamespace(headers=headers, close=close, chunks=conn.chunks(DOWNLOAD_CHUNK))

    def _get_direct(self, name: str, etag: str | None) -> tuple[KeptAlive, dict[str, str]]:
        """One signed GET (if it still has ``etag``; None: as it is); errors are raised as the SDK's own,
        so its retry strategy judges them alike.

        Returns the connection, its answer's body still to read, and the answer's headers.
        """
        sdk_requests, target = self._sdk_requests, self._target
        if etag is not None and ("\r" in etag or "\n" in etag):
            raise ValueError(f"invalid etag {etag!r}")
        path = target.object_path + quote(name, safe="")
        if target.signer is not None:
            headers = target.signer.headers(path, etag)
        else:
            headers = _sdk_signed_get(self._client.base_client.signer, sdk_requests, target.origin + path, etag)
        head = "".join([f"GET {path} HTTP/1.1\r\n", *(f"{k}: {v}\r\n" for k, v in headers.items()),
                        "Accept-Encoding: identity\r\n\r\n"]).encode("latin-1")
        try:
            conn = self._connection()
            status, headers = conn.request(head)
            if status != 200:
                body = conn.read()
        except Exception as exc:
            self._drop_connection()
            if isinstance(exc, TimeoutError):
                raise sdk_requests.exceptions.ReadTimeout(f"Object Storage did not answer: {exc}") from None
            if isinstance(exc, http.client.HTTPException) and not isinstance(exc, ConnectionError):
                raise sdk_requests.exceptions.ConnectionError(f"Object Storage answered badly: {exc!r}") from None
            raise
        if status == 200:
            return conn, headers
        if not conn.idle:
            self._drop_connection()
        try:
            answer = json.loads(body)
            code, message = answer.get("code", ""), answer.get("message", "")
        except (ValueError, AttributeError):
            code, message = "", _answer_text(body)
        raise self._oci.exceptions.ServiceError(status, code, headers, message)

    @cached_property
    def _sdk_requests(self) -> Any:
        from oci._vendor import requests as sdk_requests
        return sdk_requests

    @cached_property
    def _target(self) -> SimpleNamespace:
        """Where direct downloads go: the endpoint's origin, objects' path prefix, TLS context (once)."""
        endpoint = urlsplit(self._client.base_client.endpoint)
        verify = self._client.base_client.session.verify
        tls = None
        if endpoint.scheme == "https":
            cafile = self._sdk_requests.utils.DEFAULT_CA_BUNDLE_PATH if verify is True else verify
            tls = ssl.create_default_context(cafile=cafile if isinstance(cafile, str) else None)
            if verify is False:
                tls.check_hostname, tls.verify_mode = False, ssl.CERT_NONE
        return SimpleNamespace(
            origin=f"{endpoint.scheme}://{endpoint.netloc}", host=endpoint.hostname or "", port=endpoint.port,
            tls=tls, signer=GetSigner.matching(self._client.base_client.signer, endpoint.netloc, self._oci),
            object_path=f"{endpoint.path.rstrip('/')}/n/{quote(self.namespace, safe='')}"
                        f"/b/{quote(self.bucket, safe='')}/o/")

    def _connection(self) -> KeptAlive:
        conn = self._conn
        if conn is not None and (not conn.idle or time.monotonic() - conn.used > OCI_IDLE_REOPEN):
            self._drop_connection()
        if self._conn is None:
            target = self._target
            self._conn = KeptAlive(target.host, target.port, target.tls, OCI_TIMEOUT)
        return self._conn

    def _drop_connection(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _confirm_change(self, obj: StoredObject, status: int) -> LoaderError:
        """Return ObjectChanged if a fresh listing confirms a 404/412 on a read, else TransientError.

        A listing, not a HEAD, confirms: HEAD needs the same permission as GET, and Object Storage
        answers 404 when access is refused, so only the listing that queued the file can tell.
        """
        try:
            page = self._client.list_objects(self.namespace, self.bucket, prefix=obj.name, start=obj.name,
                                             limit=1, fields="name,etag").data
        except Exception as exc:
            if not self._is_fault(exc):
                raise
            return TransientError(f"Object Storage answered {status} and the listing to confirm it failed: "
                                  f"{_oci_reason(exc)}")
        listed = next((item for item in page.get("objects", ()) if item.get("name") == obj.name), None)
        if listed is None:
            return ObjectChanged(f"object was deleted after listing (read answered {status}; no longer listed)")
        if listed.get("etag") != obj.etag:
            return ObjectChanged(f"object was replaced after listing (read answered {status}; its etag changed)")
        return TransientError(f"Object Storage answered {status}, but the object is still listed unchanged")

    def archive(self, obj: StoredObject, on_success: str) -> str | None:
        """Delete a loaded object, or rename it to PREFIX + name, only if it is unchanged since listing.

        A rename never replaces an object already at the new name. Returns why it failed, or None.
        """
        try:
            if on_success == "delete":
                self._client.delete_object(self.namespace, self.bucket, obj.name, if_match=obj.etag)
            else:
                details = self._oci.object_storage.models.RenameObjectDetails(
                    source_name=obj.name, new_name=on_success.partition(":")[2] + obj.name,
                    src_obj_if_match_e_tag=obj.etag, new_obj_if_none_match_e_tag="*")
                self._client.rename_object(self.namespace, self.bucket, details)
        except Exception as exc:
            if not self._is_fault(exc):
                raise
            return _oci_reason(exc)
        return None

    def upload(self, name: str, data: bytes) -> bool:
        """Create an object from ``data``; return False, writing nothing, if the name is taken."""
        try:
            md5 = base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()
            self._client.put_object(self.namespace, self.bucket, name, data, if_none_match="*", content_md5=md5)
        except self._oci.exceptions.ServiceError as exc:
            if exc.status == 412:
                return False
            raise
        return True

    def download(self, name: str, out: BinaryIO) -> int:
        """Write an object's bytes, as stored, to ``out``; return how many. Raises TransientError if damaged.

        Reads as the loader does (see _get_object); a missing object raises the SDK's ServiceError (404).
        """
        response = self._get_object(name, None)
        digest, received = hashlib.md5(usedforsecurity=False), 0
        try:
            for chunk in response.chunks:
                out.write(chunk)
                digest.update(chunk)
                received += len(chunk)
        finally:
            response.close()
        _check_body(response.headers, received, digest, None)
        return received

    def _is_fault(self, exc: BaseException) -> bool:
        """Return True for an Object Storage error answer or a network fault."""
        return isinstance(exc, self._oci.exceptions.ServiceError) or _is_network_error(exc)


class GetSigner:
    """Sign GETs exactly as the SDK's API-key Signer does, without its per-request objects.

    For each request the SDK's signer builds a request object and two case-insensitive header
    dicts, and parses the URL twice: about 0.1 ms of CPU beside the RSA signature itself (0.45 ms).
    Here the signed string is formatted directly and the Date header is formatted once a second.
    """

    SIGNED = "date (request-target) host"  # what the SDK signs for a GET, in this order

    def __init__(self, private_key: Any, key_id: str, host: str) -> None:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding
        self._sign = partial(private_key.sign, padding=padding.PKCS1v15(), algorithm=hashes.SHA256())
        self._authorization = (f'Signature algorithm="rsa-sha256",headers="{self.SIGNED}",keyId="{key_id}",'
                               'signature="%s",version="1"')
        self._host = host
        self._second, self._date = -1, ""

    @classmethod
    def matching(cls, signer: Any, host: str, oci: Any) -> GetSigner | None:
        """Return a GetSigner for the SDK's API-key ``signer`` if it signs a trial GET exactly as the
        SDK does (PKCS#1 v1.5 signatures are deterministic); None for any other signer (instance or
        resource principals, session tokens), which keep the SDK's own path."""
        if type(signer) is not oci.signer.Signer:
            return None
        from oci._vendor import requests as sdk_requests
        fast = cls(signer.private_key, signer.api_key, host)
        path = "/n/trial/b/trial/o/trial.fasta"
        theirs = _sdk_signed_get(signer, sdk_requests, f"http://{host}{path}", '"trial"', fast.date())
        ours = fast.headers(path, '"trial"')
        return fast if {k.lower(): v for k, v in theirs.items()} == ours else None

    def date(self) -> str:
        """Return the Date header for now: an HTTP date, formatted again only when the second changes."""
        now = int(time.time())
        if now != self._second:
            self._second, self._date = now, email.utils.formatdate(now, usegmt=True)
        return self._date

    def headers(self, path: str, etag: str | None) -> dict[str, str]:
        """Return a signed GET's headers (those the SDK's signer sends), for ``path`` if it has ``etag``."""
        date = self.date()
        signature = self._sign(f"date: {date}\n(request-target): get {path}\nhost: {self._host}".encode())
        return {"accept": "*/*", **({"if-match": etag} if etag is not None else {}), "date": date, "host": self._host,
                "content-type": "application/json",
                "authorization": self._authorization % base64.b64encode(signature).decode()}


def _sdk_signed_get(signer: Any, sdk_requests: Any, url: str, etag: str | None, date: str | None = None) -> Any:
    """Return the headers the SDK's ``signer`` gives a GET of ``url`` if it has ``etag`` (at ``date``)."""
    request = sdk_requests.PreparedRequest()
    request.method, request.url, request.body = "GET", url, None
    request.headers = sdk_requests.structures.CaseInsensitiveDict(
        {"accept": "*/*", **({"if-match": etag} if etag is not None else {})})
    if date:
        request.headers["date"] = date
    signer(request)
    return request.headers


def _oci_auth(oci: Any, auth: str, config_file: str | None, profile: str | None) -> tuple[dict[str, Any], Any]:
    """Return the SDK config and signer (None: the config's API key) of one of the OCI CLI's auth methods."""
    if auth in ("api_key", "security_token"):
        config = oci.config.from_file(os.path.expanduser(config_file or oci.config.DEFAULT_LOCATION),
                                      profile or "DEFAULT")
        _remember_secret(config.get("pass_phrase"))
        if auth == "api_key":
            oci.config.validate_config(config)
            return config, None
        token = Path(os.path.expanduser(config["security_token_file"])).read_text().strip()
        key = oci.signer.load_private_key_from_file(config["key_file"], config.get("pass_phrase"))
        return config, oci.auth.signers.SecurityTokenSigner(token, key)
    if auth == "instance_principal":
        signer = oci.auth.signers.InstancePrincipalsSecurityTokenSigner()
    elif auth == "resource_principal":
        signer = oci.auth.signers.get_resource_principals_signer()
    else:
        raise ConfigError(f"unknown --auth {auth!r}: use api_key, instance_principal, "
                          "resource_principal or security_token")
    return {"region": signer.region}, signer


def _listing_entry(obj: StoredObject) -> dict[str, Any]:
    """Return a StoredObject as the listing entry it came from (see _stored_object)."""
    return {"name": obj.name, "size": obj.size, "etag": obj.etag, "md5": obj.md5,
            "timeCreated": obj.time_created.isoformat()}


def _lean(client: Any) -> Any:
    """Return an SDK client whose session reads the environment once, not at every request (about
    0.3 ms of CPU each): unless a proxy is set, the CA bundle requests would find there is fixed now."""
    if any(name.lower().endswith("_proxy") and name.lower() != "no_proxy" for name in os.environ):
        return client
    session = client.base_client.session
    session.trust_env = False  # signed requests never take .netrc credentials, the other thing it reads
    if session.verify is True:
        session.verify = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True
    return client


def _stored_object(item: dict[str, Any]) -> StoredObject:
    """Return a listing entry as a StoredObject."""
    return StoredObject(item["name"], int(item.get("size") or 0), item.get("etag") or "", item.get("md5"),
                        _parse_time(item.get("timeCreated")))


def _check_body(headers: Any, received: int, digest: Any, listed_md5: str | None) -> None:
    """Raise TransientError if a downloaded body is shorter than announced or fails its md5."""
    expected = int(headers.get("content-length", -1))
    if 0 <= expected != received:
        raise TransientError(f"download cut off after {received} of {expected} bytes")
    md5 = headers.get("content-md5") or listed_md5
    if md5 and "-" not in md5 and base64.b64encode(digest.digest()).decode() != md5:
        raise TransientError("downloaded bytes do not match the object's md5")


def _oci_reason(exc: BaseException) -> str:
    """Return an Object Storage failure as one short line."""
    status = getattr(exc, "status", None)
    if isinstance(status, int):
        return f"Object Storage answered {status} {getattr(exc, 'code', '')}: {_short(getattr(exc, 'message', ''))}"
    return f"Object Storage is not answering: {_network_cause(exc)}" if _is_network_error(exc) else _short(exc)


def _parse_time(text: str | None) -> datetime:
    """Parse an RFC 3339 time from Object Storage; a missing one sorts first."""
    if not text:
        return datetime.fromtimestamp(0, timezone.utc)
    try:
        moment = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)
    except ValueError:  # Python 3.10 reads only isoformat()'s own shapes
        from dateutil.parser import isoparse
        moment = isoparse(text)
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _is_network_error(exc: BaseException) -> bool:
    """Return True for connection, timeout and protocol errors from any HTTP stack we use."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    return isinstance(exc, (OSError, requests.RequestException)) or bool(names & {
        "RequestException", "ConnectionError", "ConnectTimeout", "ReadTimeout", "Timeout",
        "ProtocolError", "HTTPError", "ChunkedEncodingError", "IncompleteRead", "ReadTimeoutError"})


def _network_cause(exc: BaseException) -> str:
    """Return the root cause of a network fault in a few words, e.g. 'connection refused'.

    Looks through the chain of wrapped errors (requests, urllib3 and the OCI SDK each wrap the
    socket's error in their own) for the first one that says what happened.
    """
    stack, seen = [exc], set()
    while stack:
        error = stack.pop(0)
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        name = type(error).__name__
        if isinstance(error, ConnectionRefusedError):
            return "connection refused"
        if isinstance(error, socket.gaierror):
            return f"host name not found ({error.strerror or error})"
        if isinstance(error, ssl.SSLCertVerificationError):
            return f"its TLS certificate is not trusted ({error.reason}: {error.verify_message or error})"
        if isinstance(error, ConnectionResetError):
            return "connection reset"
        if isinstance(error, TimeoutError) or name in ("ConnectTimeoutError", "ConnectTimeout"):
            return "timed out"
        if name in ("ReadTimeoutError", "ReadTimeout"):
            return "no answer in time"
        reason = getattr(error, "reason", None)
        stack += [error.__cause__, error.__context__, reason if isinstance(reason, BaseException) else None]
        stack += [arg for arg in error.args if isinstance(arg, BaseException)]
    return _short(exc)


def _short(exc: BaseException) -> str:
    """Return an exception as one short line."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]


# ---- fn4 client ------------------------------------------------------------------------------


class GuidSet:
    """fn4's guids held compactly: a sorted array of their 64-bit hashes, 8 bytes a guid.

    Only ``in`` and ``len`` are offered. Two different guids share a hash with a chance of about
    one in 10**13 at 2 million guids; the daily reconciliation would then find the sample missing.
    """

    def __init__(self, guids: Iterable[str] = ()) -> None:
        self._hashes = array("q", (key for key, _ in itertools.groupby(sorted_array(array("q", map(hash, guids))))))

    def __contains__(self, guid: object) -> bool:
        key = hash(guid)
        index = bisect.bisect_left(self._hashes, key)
        return index < len(self._hashes) and self._hashes[index] == key

    def __len__(self) -> int:
        return len(self._hashes)


def json_strings(chunks: Iterable[bytes], what: str) -> Iterator[str]:
    """Yield the items of a JSON array of strings read chunk by chunk, holding one chunk at a time.

    Raises OutageError naming ``what`` if the text is anything but a JSON array of strings.
    """
    return _JsonStrings(chunks, what).items()


class _JsonStrings:
    """The reader behind ``json_strings``: the text not yet parsed, and a position in it."""

    def __init__(self, chunks: Iterable[bytes], what: str) -> None:
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.pieces = iter(chunks)
        self.what = what
        self.text, self.position, self.ended = "", 0, False

    def items(self) -> Iterator[str]:
        if self.token() != "[":
            raise self.bad(f"it starts with {self.ahead()!r}")
        self.position += 1
        if self.token() == "]":
            self.position += 1
        else:
            while True:
                yield self.string()
                separator = self.token()
                self.position += 1
                if separator == "]":
                    break
                if separator != ",":
                    raise self.bad(f"{separator!r} follows an item" if separator else "it ends early")
        if self.token():
            raise self.bad(f"{self.ahead()!r} follows the list")

    def string(self) -> str:
        """Read the string that starts at the position, reading on while a chunk's end cuts it."""
        if self.token() != '"':
            raise self.bad(f"an item starts with {self.ahead()!r}")
        scan = json.decoder.scanstring  # type: ignore[attr-defined]
        while True:
            try:
                value, self.position = scan(self.text, self.position + 1)
                return value
            except ValueError:  # cut by the chunk's end, or bad: read on to tell which
                if not self.fill():
                    raise self.bad(f"a string is not closed or not valid: {self.ahead()!r}") from None

    def token(self) -> str:
        """Move to the next character that is not white space and return it; "" at the end."""
        while True:
            text = self.text
            while self.position < len(text) and text[self.position] in " \t\r\n":
                self.position += 1
            if self.position < len(text):
                return text[self.position]
            if not self.fill():
                return ""

    def fill(self) -> bool:
        """Append the next chunk to what is left of the text; False when there is no more."""
        if self.ended:
            return False
        chunk = next(self.pieces, None)
        try:
            added = self.decoder.decode(chunk or b"", final=chunk is None)
        except UnicodeDecodeError:
            raise self.bad("it is not UTF-8") from None
        self.ended = chunk is None
        self.text, self.position = self.text[self.position:] + added, 0
        return bool(added) or not self.ended

    def ahead(self) -> str:
        return self.text[self.position:self.position + 20]

    def bad(self, reason: str) -> OutageError:
        return OutageError(f"{self.what} answered something that is not a JSON list of strings: {reason}")


class FN4Client:
    """Talk to one findNeighbour4 server over one keep-alive session."""

    def __init__(self, base_url: str, session: requests.Session | None = None, verify: bool | str = True,
                 timeout: tuple[float, float] = FN4_TIMEOUT) -> None:
        self.base_url = fn4_server_url(base_url)
        self._session = session or requests.Session()
        self.verify = verify
        self.timeout = timeout
        self._insert_conn: KeptAlive | None = None
        parts = urlsplit(self.base_url)
        try:
            port = parts.port
        except ValueError:
            raise ConfigError(f"fn4 server URL {base_url!r} has an invalid port") from None
        host = parts.hostname or ""
        host = f"[{host}]" if ":" in host else host
        default = 443 if parts.scheme == "https" else 80
        # An insert's head but its length, built once: what http.client would send
        self._insert_head = (f"POST {parts.path.rstrip('/')}/api/v2/insert HTTP/1.1\r\n"
                             f"Host: {host}{f':{port}' if port not in (None, default) else ''}\r\n"
                             "Accept-Encoding: identity\r\n"
                             "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: ").encode("latin-1")

    def guids(self) -> set[str]:
        """Return every guid fn4 holds. Raises OutageError, also for an answer that is not a list of strings."""
        value = self._get_json("/api/v2/guids", self.timeout)
        if not isinstance(value, list) or not all(isinstance(guid, str) for guid in value):
            raise OutageError(f"fn4 GET /api/v2/guids answered {_excerpt(value)}, not a JSON list of guids")
        return set(value)

    def guid_set(self) -> GuidSet:
        """Return every guid fn4 holds, compactly, parsing the list as it arrives. Raises OutageError.

        At 2 million guids the answer is about 80 MB: neither its text nor a list of its strings is
        ever held whole.
        """
        path = "/api/v2/guids"
        with self._get(path, self.timeout, stream=True) as response:
            if response.status_code != 200:
                raise OutageError(f"fn4 GET {path} answered {response.status_code}: {_answer_text(response.content)}",
                                  retry_after=_retry_after(response.headers))
            try:
                return GuidSet(json_strings(response.iter_content(GUIDS_CHUNK), f"fn4 GET {path}"))
            except requests.RequestException as exc:
                raise OutageError(f"fn4 GET {path} was cut off: {_short(exc)}") from None

    def exists(self, guid: str) -> bool:
        """Return True if fn4 holds the guid. Raises OutageError, also for an answer that is not true or false."""
        path = f"/api/v2/{quote(guid, safe='')}/exists"
        value = self._get_json(path, FN4_PROBE_TIMEOUT)
        if not isinstance(value, bool):
            raise OutageError(f"fn4 GET {path} answered {_excerpt(value)}, not true or false")
        return value

    def check(self) -> None:
        """Ask fn4 for its time, as a start-up check. Raises OutageError if it does not answer properly."""
        self._get_json("/api/v2/server_time", FN4_PROBE_TIMEOUT)

    def is_up(self) -> bool:
        """Return True if fn4 answers its server_time route with a JSON object."""
        try:
            return isinstance(self._get_json("/api/v2/server_time", FN4_PROBE_TIMEOUT), dict)
        except OutageError:
            return False

    def database_answers(self, guid: str) -> bool:
        """Return True if fn4 answers a route that reads its database (whether it holds ``guid``)."""
        try:
            self.exists(guid)
            return True
        except OutageError:
            return False

    @staticmethod
    def insert_form(guid: str, seq: bytes | bytearray) -> bytes:
        """Return the urlencoded insert body; the fn4 alphabet needs no escaping."""
        return b"guid=" + quote(guid, safe="").encode() + b"&seq=" + seq

    def post_insert(self, body: bytes) -> InsertResult:
        """POST a body built by ``insert_form``: insert one sample (see send_insert and insert_answer)."""
        return self.insert_answer(self.send_insert(body))

    def send_insert(self, body: bytes) -> InsertSent:
        """Send an insert of a body built by ``insert_form``; read fn4's answer with ``insert_answer``. Never raises.

        Inserts go over one kept-alive connection (KeptAlive): it spends about 1.2 ms less CPU per
        request than requests, and 0.15 ms less than http.client, which matter beside a 25 ms insert.
        A connection left idle for FN4_IDLE_REOPEN seconds is reopened first, as the server may have
        closed it meanwhile.
        """
        reused = False
        try:
            conn = self._insert_connection()
            reused = conn.answers > 0
            conn.send(self._insert_head + b"%d\r\n\r\n" % len(body), body)
        except (OSError, http.client.HTTPException) as exc:
            return InsertSent(body, reused, exc)
        return InsertSent(body, reused)

    def insert_answer(self, sent: InsertSent) -> InsertResult:
        """Return fn4's answer to an insert sent by ``send_insert``. Never raises for HTTP answers or network faults.

        Servers and proxies close idle connections sooner than FN4_IDLE_REOPEN (gunicorn's async workers
        after 2 s), so an insert that fails on a reused connection before any byte of the answer arrives
        is sent once more, at once, on a new connection; a repeat of an insert fn4 did apply answers 201
        (loaded).
        """
        for last_try in (False, True):
            answered = False
            try:
                if sent.error is not None:
                    raise sent.error
                if (conn := self._insert_conn) is None or not conn.awaiting:  # not sent, or dropped since
                    raise http.client.ResponseNotReady("the insert is not on a connection")
                status, headers = conn.answer()
                answered = True
                answer = conn.read()
            except TimeoutError:
                self._drop_insert_connection()
                return InsertResult(None, RETRY, f"fn4 did not answer within {self.timeout[1]:g} s")
            except (OSError, http.client.HTTPException) as exc:
                self._drop_insert_connection()
                if sent.reused and not answered and not last_try and isinstance(exc, _CLOSED_WHILE_IDLE):
                    log.debug("fn4 closed the kept-alive insert connection (%s); sending again on a new one",
                              _short(exc))
                    sent = self.send_insert(sent.body)
                    continue
                return InsertResult(None, SERVER_UNAVAILABLE,
                                    f"fn4 unreachable: {_short(exc) or type(exc).__name__}")
            break
        if not conn.idle:
            self._drop_insert_connection()
        text = _answer_text(answer)
        return InsertResult(status, _insert_outcome(status, text), text, _retry_after(headers))

    def _insert_connection(self) -> KeptAlive:
        """Return the insert connection, ready to send on: reopened if it was spent or idle too long."""
        conn = self._insert_conn
        if conn is not None and (not conn.idle or time.monotonic() - conn.used > FN4_IDLE_REOPEN):
            self._drop_insert_connection()
        if self._insert_conn is None:
            parts = urlsplit(self.base_url)
            tls = None
            if parts.scheme == "https":
                tls = ssl.create_default_context(cafile=self.verify if isinstance(self.verify, str) else None)
            self._insert_conn = KeptAlive(parts.hostname or "", parts.port, tls, self.timeout)
        return self._insert_conn

    def _drop_insert_connection(self) -> None:
        if self._insert_conn is not None:
            self._insert_conn.close()
            self._insert_conn = None

    def close(self) -> None:
        self._drop_insert_connection()
        self._session.close()

    def _get(self, path: str, timeout: tuple[float, float], stream: bool = False) -> requests.Response:
        """GET a route. Raises OutageError.

        A GET cut off without an answer (as when the server closes an idle kept-alive connection under
        it) is asked once more at once; a timeout is not.
        """
        for last_try in (False, True):
            try:
                # verify is passed on each call: a session's own setting loses to REQUESTS_CA_BUNDLE
                return self._session.get(self.base_url + path, timeout=timeout, verify=self.verify, stream=stream)
            except requests.RequestException as exc:
                if last_try or not isinstance(exc, requests.ConnectionError) or isinstance(exc, requests.Timeout):
                    raise OutageError(f"fn4 at {self.base_url} is not answering: {_network_cause(exc)}") from None
                log.debug("fn4 GET %s was cut off (%s); asking again", path, _short(exc))
        raise AssertionError("unreachable")

    def _get_json(self, path: str, timeout: tuple[float, float]) -> Any:
        """GET a route and return its JSON. Raises OutageError (see _get)."""
        response = self._get(path, timeout)
        if response.status_code != 200:
            raise OutageError(f"fn4 GET {path} answered {response.status_code}: {_answer_text(response.content)}",
                              retry_after=_retry_after(response.headers))
        try:
            return response.json()
        except ValueError:
            raise OutageError(f"fn4 GET {path} answered something that is not JSON: "
                              f"{_answer_text(response.content)}") from None


#: Errors of a kept-alive connection the server closed while it was idle (nothing of an answer came).
_CLOSED_WHILE_IDLE = (ConnectionError, ssl.SSLEOFError, ssl.SSLZeroReturnError)


def _insert_outcome(status: int, text: str = "") -> str:
    """Classify fn4's answer to an insert and its text (see README, Failure handling).

    A 500 is the sample's fault for good when fn4 says the length is wrong, an outage when fn4 says
    its database is unreachable, and otherwise RETRY: the caller then asks whether fn4's database
    answers before counting it against the file. A 404 means the insert route is not there (a wrong
    URL, a proxy): an outage, not a bad sample.
    """
    if status == 500 and FN4_WRONG_LENGTH in text:
        return FAILED
    if status == 500 and FN4_DATABASE_DOWN in text:
        return SERVER_UNAVAILABLE
    known = {200: INSERTED, 201: ALREADY_PRESENT, 404: SERVER_UNAVAILABLE, 408: SERVER_BUSY, 409: SERVER_BUSY,
             429: SERVER_BUSY, 503: SERVER_UNAVAILABLE}
    return known.get(status, RETRY if status >= 500 else FAILED)


def _retry_after(headers: Any) -> float | None:
    """Return the seconds an answer's Retry-After asks for (seconds or an HTTP date), capped; None if absent.

    A date is read against the answer's own Date header when there is one, so clock skew does not count.
    """
    value = (headers.get("retry-after") or "").strip()
    if not value:
        return None
    if value.isdigit():
        return min(float(value), RETRY_AFTER_CAP)
    try:
        moments = [email.utils.parsedate_to_datetime(v) if v else utcnow() for v in (value, headers.get("date"))]
    except (TypeError, ValueError, IndexError):
        return None
    until, now = (m if m.tzinfo else m.replace(tzinfo=timezone.utc) for m in moments)
    return min(max((until - now).total_seconds(), 0.0), RETRY_AFTER_CAP)


def _excerpt(value: Any) -> str:
    """Return a JSON value as a short excerpt for an error line."""
    text = json.dumps(value[:3] + ["..."] if isinstance(value, list) and len(value) > 3 else value)
    return text if len(text) <= 80 else text[:77] + "..."


def _answer_text(body: bytes) -> str:
    """Return fn4's answer as a short line: the JSON string, or HTML stripped of its tags."""
    try:
        value = json.loads(body)
        text = value if isinstance(value, str) else json.dumps(value)
    except ValueError:
        page = body.decode("utf-8", "replace")
        if re.search(r"<h1\b", page, re.I):  # the heading repeats the title (Flask, Werkzeug and nginx pages)
            page = re.sub(r"<title\b.*?</title\s*>", " ", page, flags=re.I | re.S)
        text = html.unescape(re.sub(r"<[^>]*>", " ", page))
    return " ".join(text.split())[:300]


# ---- Database --------------------------------------------------------------------------------


def build_tables(schema: str | None = None) -> tuple[sa.MetaData, sa.Table, sa.Table]:
    """Return the catalogue's metadata and its two tables, columns taken from the row records."""
    metadata = sa.MetaData(schema=schema)

    def table(name: str, key: str, record: type, comment: str) -> sa.Table:
        columns = [sa.Column(f.name, f.metadata["type"], comment=f.metadata["comment"])
                   for f in dataclasses.fields(record)]
        return sa.Table(name, metadata,
                        sa.Column(key, sa.Integer(), sa.Identity(), primary_key=True,
                                  comment="Row identity"),
                        *columns, comment=comment)

    batches = table("fn4batchload", "bl_int_id", BatchRow, "One row per loader cycle: the heartbeat")
    attempts = table("fn4loadattempt", "gp_int_id", AttemptRow, "One row per file per load attempt")
    sa.Index("ix_fn4loadattempt_bucket", attempts.c.oci_namespace, attempts.c.bucket_name)
    return metadata, batches, attempts


def upgrade_tables(operations: Callable[[], Any], dialect: str, metadata: sa.MetaData,
                   existing: dict[str, tuple[list[dict[str, Any]], set[str]]]) -> list[str]:
    """Bring tables made by an older loader up to this one, keeping every row; return what changed.

    ``existing`` maps each table already there to its columns, as SQLAlchemy's inspector lists
    them, and its index names. Shorter strings are widened and NOT NULL is dropped, since this
    loader writes longer names and leaves unused columns empty; on SQLite (no string lengths),
    dropping NOT NULL makes Alembic copy the table. ``operations`` returns Alembic's Operations;
    it is called, and Alembic imported, only if something needs changing: later starts skip the import.
    """
    changes: list[str] = []
    ops = None
    for table in metadata.tables.values():
        if table.name not in existing:
            continue
        columns, indexes = existing[table.name]
        have = {c["name"].lower(): c for c in columns}
        adds = [column for column in table.columns if column.name not in have]
        alters = _column_alters(table, have, dialect)
        new_indexes = [index for index in table.indexes if index.name not in indexes]
        if not (adds or alters or new_indexes):
            continue
        ops = ops or operations()
        with ops.batch_alter_table(table.name, schema=table.schema) as batch:
            for column in adds:
                batch.add_column(column._copy())
            for column, old, widen in alters:
                batch.alter_column(column.name, type_=column.type if widen else None, nullable=True,
                                   existing_type=old["type"], existing_nullable=old["nullable"],
                                   existing_comment=old.get("comment"))
        for index in new_indexes:
            ops.create_index(index.name, table.name, [c.name for c in index.columns], schema=table.schema)
        changes += [f"added {table.name}.{c.name}" for c in adds]
        changes += [f"{table.name}.{c.name}: {'widened, ' if widen else ''}nullable" for c, _, widen in alters]
        changes += [f"added index {index.name}" for index in new_indexes]
    return changes


def _column_alters(table: sa.Table, have: dict[str, dict[str, Any]], dialect: str
                   ) -> list[tuple[sa.Column[Any], dict[str, Any], bool]]:
    """Return (column, as it is, widen?) for each existing column to widen or make nullable."""
    alters = []
    for column in table.columns:
        old = have.get(column.name)
        if old is None or column.primary_key:
            continue
        length = getattr(old["type"], "length", None)
        widen = (dialect != "sqlite" and isinstance(column.type, sa.String) and length is not None
                 and length < column.type.length) or (  # MariaDB's plain DATETIME, Oracle's DATE: whole seconds
            isinstance(column.type, sa.DateTime) and (isinstance(old["type"], oracle.DATE) or (
                isinstance(old["type"], mysql.DATETIME) and not old["type"].fsp)))
        if widen or not old["nullable"]:
            alters.append((column, old, widen))
    return alters


def resolve_database(database: str | None, environ: dict[str, str] | None = None,
                     read_only: bool = False) -> sa.URL:
    """Turn the database argument into a SQLAlchemy URL. Raises ConfigError.

    Accepts a key into the JSON file named by DB_CONNECTION_CONFIG_FILE, a SQLAlchemy URL,
    or nothing (a SQLite file that persists). For Oracle keys, TNS_ADMIN is set from the entry.
    ``read_only`` (status, list) makes no folder, and raises CatalogueMissing for a missing SQLite file.
    """
    environ = os.environ if environ is None else environ
    if not database:
        if not read_only:
            DEFAULT_SQLITE_PATH.parent.mkdir(parents=True, exist_ok=True)
        return _existing(sa.make_url(f"sqlite:///{DEFAULT_SQLITE_PATH}"), read_only)
    if "://" in database:
        text = database
    else:
        text = _database_from_config_file(database, environ)
    try:
        url = sa.make_url(text)
    except sa.exc.ArgumentError:
        raise ConfigError(f"database {_hide_password(text)!r} is not a valid SQLAlchemy URL, "
                          "e.g. postgresql+psycopg2://user@host/db") from None
    _remember_secret(url.password and str(url.password), *_TYPED_PASSWORD.findall(text)[:1])
    if url.drivername in ("oracle", "oracle+cx_oracle"):
        url = url.set(drivername="oracle+oracledb")  # python-oracledb succeeds cx_Oracle
    if url.drivername in ("sqlite", "sqlite+pysqlite") and url.database in (None, "", ":memory:"):
        raise ConfigError("an in-memory SQLite catalogue would be lost at restart: give a file, "
                          "e.g. sqlite:///fn4loader.sqlite")
    return _existing(url, read_only)


def _existing(url: sa.URL, read_only: bool) -> sa.URL:
    """Return the URL; for a read-only command, raise CatalogueMissing if its SQLite file is missing."""
    if read_only and url.get_backend_name() == "sqlite" and url.database and not Path(url.database).exists():
        raise CatalogueMissing(f"the SQLite catalogue {url.database!r} does not exist: has the loader run with it? "
                               "Give the loader's DATABASE")
    return url


def _database_from_config_file(key: str, environ: dict[str, str]) -> str:
    path = environ.get("DB_CONNECTION_CONFIG_FILE")
    if not path:
        raise ConfigError(f"database {key!r} is neither a URL nor usable as a key: set "
                          "DB_CONNECTION_CONFIG_FILE to the JSON file that holds it")
    try:
        entries = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read DB_CONNECTION_CONFIG_FILE {path!r}: {exc.strerror}") from None
    except ValueError as exc:
        raise ConfigError(f"DB_CONNECTION_CONFIG_FILE {path!r} is not valid JSON: {exc}") from None
    if not isinstance(entries, dict) or key not in entries:
        known = ", ".join(sorted(entries)) if isinstance(entries, dict) else "none"
        raise ConfigError(f"database key {key!r} is not in {path!r} (keys there: {known})")
    entry = entries[key]
    if not isinstance(entry, dict) or not entry.get("ENGINE_NAME"):
        raise ConfigError(f"entry {key!r} in {path!r} has no ENGINE_NAME")
    if str(entry.get("DBTYPE", "")).lower() == "oracle" or entry.get("TNS_ADMIN"):
        if not entry.get("TNS_ADMIN"):
            raise ConfigError(f"Oracle entry {key!r} in {path!r} has no TNS_ADMIN (the wallet folder)")
        os.environ["TNS_ADMIN"] = environ["TNS_ADMIN"] = str(entry["TNS_ADMIN"])
    return str(entry["ENGINE_NAME"])


def _alembic_operations(conn: sa.Connection) -> Any:
    """Return Alembic's Operations on a connection (imported here: only an upgrade needs it)."""
    from alembic.migration import MigrationContext
    from alembic.operations import Operations
    return Operations(MigrationContext.configure(conn))


def _aware(moment: datetime | None) -> datetime | None:
    """Return a catalogue time (naive UTC) as an aware datetime."""
    return moment.replace(tzinfo=timezone.utc) if moment is not None and moment.tzinfo is None else moment


def _db_error(exc: BaseException) -> str:
    """Return a database error as one short line: the driver's own message, without SQLAlchemy's wrapping."""
    return _short(getattr(exc, "orig", None) or exc)


def _hide_password(text: str) -> str:
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", text)


def _connect_args(url: sa.URL) -> dict[str, Any]:
    """Return driver options that bound connecting and every call, so a half-open connection fails.

    Oracle's call timeout is set on each connection instead (_bound_oracle_calls).
    """
    backend = url.get_backend_name()
    if backend == "sqlite":
        return {"timeout": DB_CONNECT_TIMEOUT}
    if backend == "postgresql":
        return {"connect_timeout": DB_CONNECT_TIMEOUT, "keepalives": 1, "keepalives_idle": DB_KEEPALIVE,
                "keepalives_interval": DB_KEEPALIVE // 3, "keepalives_count": 3,
                "tcp_user_timeout": DB_CALL_TIMEOUT * 1000, "options": f"-c statement_timeout={DB_CALL_TIMEOUT * 1000}"}
    if backend in ("mysql", "mariadb"):
        return {"connect_timeout": DB_CONNECT_TIMEOUT, "read_timeout": DB_CALL_TIMEOUT,
                "write_timeout": DB_CALL_TIMEOUT}
    if backend == "oracle":
        tns_admin = os.environ.get("TNS_ADMIN")
        args: dict[str, Any] = {"tcp_connect_timeout": DB_CONNECT_TIMEOUT, "expire_time": 1}  # probes, minutes
        if tns_admin:
            args.update(config_dir=tns_admin, wallet_location=tns_admin)
            if os.environ.get("WALLET_PASSWORD"):
                args["wallet_password"] = os.environ["WALLET_PASSWORD"]
        return args
    return {}


def build_lease_table(schema: str | None = None) -> sa.Table:
    """Return the fn4loaderlease table, in a metadata of its own: the upgrade of the other two leaves it be."""
    columns = [sa.Column(f.name, f.metadata["type"], primary_key=f.name == "instance_token",
                         comment=f.metadata["comment"]) for f in dataclasses.fields(LeaseRow)]
    table = sa.Table("fn4loaderlease", sa.MetaData(schema=schema), *columns,
                     sa.UniqueConstraint("active_key", name="uq_fn4loaderlease_active"),
                     comment="One row per running loader instance: the one with active_key set loads, "
                             "the others stand by")
    sa.Index("ix_fn4loaderlease_key", table.c.lease_key)
    return table


def database_utc(dialect: str, seconds: float = 0.0) -> Any:
    """Return the database's own UTC time plus ``seconds``, as its SQL: leases expire by the database's clock.

    Every host compares lease times with the same clock, however far its own is off. SQLite's text
    is written as SQLAlchemy stores its DATETIME (microseconds), so that text comparisons hold.
    """
    sql = {"postgresql": f"(TIMEZONE('utc', CURRENT_TIMESTAMP) + INTERVAL '{seconds:.3f} seconds')",
           "mysql": f"(UTC_TIMESTAMP(6) + INTERVAL {round(seconds * 1e6)} MICROSECOND)",
           "oracle": f"(SYS_EXTRACT_UTC(SYSTIMESTAMP) + NUMTODSINTERVAL({seconds:.3f}, 'SECOND'))",
           "sqlite": f"strftime('%Y-%m-%d %H:%M:%f000', 'now', '{seconds:+.3f} seconds')"}
    return sa.literal_column(sql["mysql" if dialect == "mariadb" else dialect], TIMESTAMP)


def process_exists(pid: int | None) -> bool:
    """Return True if a process of this id runs on this host (or may: another user's)."""
    if not pid or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lease:
    """This instance's claim to be the one loader of an fn4 server, namespace and bucket; the others stand by.

    The active instance's row holds the lease key in active_key, a unique column: a lease never has
    two holders. ``active`` turns False, on the local monotonic clock, a quarter of ``ttl`` before
    the lease could lapse, so an instance that cannot renew stops inserting before another can take
    over. Calls go straight to the catalogue engine, never through the row writer.
    """

    def __init__(self, engine: sa.Engine, table: sa.Table, target: Target, ttl: float = DEFAULT_LEASE_TTL,
                 host_name: str | None = None) -> None:
        self.engine = engine
        self.table = table
        self.ttl = ttl
        self.clock = time.monotonic  # the clock of active and last_contact
        self.key = hashlib.sha256("\n".join(dataclasses.astuple(target)).encode()).hexdigest()
        self.token = os.urandom(16).hex()
        self.identity = {"instance_token": self.token, "host_name": host_name or socket.gethostname(),
                         "process_id": os.getpid(), "findneighbour_server_url": target.server_url,
                         "oci_namespace": target.namespace, "bucket_name": target.bucket, "lease_key": self.key}
        self.terms = 0  # the times this instance became active
        self.last_contact: float | None = None   # monotonic time of the last database call that worked
        self._valid_until: float | None = None   # set while held: when to stop inserting
        self._holder: str | None = None          # the other holder last logged
        self._failures = 0
        self._done = threading.Event()

    @property
    def active(self) -> bool:
        """True while this instance holds the lease with time to spare (no database call)."""
        return self._valid_until is not None and self.clock() < self._valid_until

    def _now(self, seconds: float = 0.0) -> Any:
        return database_utc(self.engine.dialect.name, seconds)

    def join(self) -> None:
        """Write this instance's row, as standby, and remove rows of instances gone long ago. Raises SQLAlchemyError."""
        t = self.table
        with self.engine.begin() as conn:
            conn.execute(t.insert().values(**self.identity, started=self._now(), role_since=self._now(),
                                           renewed=self._now(), expires=self._now(self.ttl)))
        with contextlib.suppress(sa.exc.SQLAlchemyError), self.engine.begin() as conn:  # tidying, else next time
            conn.execute(t.delete().where(t.c.lease_key == self.key, t.c.active_key.is_(None),
                                          t.c.expires < self._now(-STALE_INSTANCE_AGE)))

    def tend(self) -> float:
        """Renew the lease if held, else look at it and take it if it is free; return seconds until the next call."""
        try:
            self._renew() if self._valid_until is not None else self._look()
        except sa.exc.SQLAlchemyError as exc:
            self._failures += 1
            if self._failures == 1:
                log.warning("lease: the catalogue database failed (%s); %s", _db_error(exc),
                            "inserting stops if it cannot be renewed in time" if self._valid_until else "still standby")
            return min(LEASE_RETRY, self.ttl / 6)
        if self._failures:
            log.warning("lease: the catalogue database answers again after %d failed calls", self._failures)
            self._failures = 0
        self.last_contact = self.clock()
        return self.ttl / 3 if self._valid_until is not None else min(LEASE_CHECK_INTERVAL, self.ttl / 3)

    def _renew(self) -> None:
        t, sent = self.table, self.clock()
        with self.engine.begin() as conn:
            renewed = conn.execute(t.update().where(t.c.instance_token == self.token, t.c.active_key == self.key)
                                   .values(renewed=self._now(), expires=self._now(self.ttl))).rowcount
        if renewed == 1:
            self._valid_until = sent + self.ttl * 3 / 4
        else:
            self._valid_until = None
            log.warning("standby: this instance lost the lease: another took it after it lapsed")

    def _look(self) -> None:
        t, sent = self.table, self.clock()
        try:
            with self.engine.begin() as conn:
                holder = conn.execute(sa.select(t.c.instance_token, t.c.host_name, t.c.process_id, t.c.role_since,
                                                t.c.expires, self._now().label("now"))
                                      .where(t.c.active_key == self.key)).first()
                reason, free = self._reason_to_take(holder)
                if reason is None:  # stand by; the row says this instance still lives
                    self._write_row(conn, renewed=self._now(), expires=self._now(self.ttl))
                else:
                    if holder is not None:
                        conn.execute(t.update().where(t.c.instance_token == holder.instance_token,
                                                      t.c.active_key == self.key, free).values(active_key=None))
                    self._write_row(conn, active_key=self.key, role_since=self._now(), renewed=self._now(),
                                    expires=self._now(self.ttl))
        except sa.exc.IntegrityError:
            return  # another instance took the lease first: the unique active_key refused this one
        if reason is None:
            if holder is not None and holder.instance_token != self._holder:
                self._holder = holder.instance_token
                log.info("standby: %s (pid %s) holds the lease since %s UTC (database time)", holder.host_name,
                         holder.process_id, f"{holder.role_since:%Y-%m-%d %H:%M:%S}")
            return
        self._valid_until = sent + self.ttl * 3 / 4
        self._holder = None
        self.terms += 1
        log.warning("active: this instance took the lease: %s", reason)

    def _write_row(self, conn: sa.Connection, **values: Any) -> None:
        """Update this instance's row, writing it anew if it is gone (released, or removed by hand)."""
        t = self.table
        if not conn.execute(t.update().where(t.c.instance_token == self.token).values(**values)).rowcount:
            conn.execute(t.insert().values(**{"started": self._now(), "role_since": self._now(), **self.identity,
                                              **values}))

    def _reason_to_take(self, holder: Any) -> tuple[str | None, Any]:
        """Return why this instance may take the lease (None if it may not), and the condition to free it."""
        t = self.table
        if holder is None:
            return "no instance held it", None
        if holder.instance_token == self.token:
            return "it held it already", t.c.instance_token == self.token
        if holder.expires is not None and holder.expires < holder.now:
            return (f"the lease of {holder.host_name} (pid {holder.process_id}) lapsed at "
                    f"{holder.expires:%Y-%m-%d %H:%M:%S} UTC (database time)"), t.c.expires < self._now()
        if holder.host_name == self.identity["host_name"] and not process_exists(holder.process_id):
            return (f"its holder, pid {holder.process_id} on this host, no longer runs",
                    t.c.process_id == holder.process_id)
        return None, None

    def release(self) -> None:
        """Remove this instance's row, handing the lease over at once; log, never raise, if that fails."""
        self._valid_until = None
        try:
            with self.engine.begin() as conn:
                conn.execute(self.table.delete().where(self.table.c.instance_token == self.token))
        except sa.exc.SQLAlchemyError as exc:
            log.warning("lease: could not remove this instance's row (%s); a standby takes over when it lapses",
                        _db_error(exc))
            return
        log.info("lease released: a standby can take over at once")

    @contextlib.contextmanager
    def kept(self) -> Iterator[Lease]:
        """Tend the lease from a thread while the block runs (after a first look); the thread then releases it.

        The block's end joins the thread for THREAD_JOIN_TIMEOUT: a catalogue that does not answer
        leaves it behind (a daemon, logged), and the lease lapses by itself.
        """
        self._done.clear()
        wait = self.tend()

        def keep(wait: float) -> None:
            while not self._done.wait(wait):
                wait = self.tend()
            self.release()

        keeper = threading.Thread(target=keep, args=(wait,), name="lease-keeper", daemon=True)
        keeper.start()
        try:
            yield self
        finally:
            self._done.set()
            keeper.join(THREAD_JOIN_TIMEOUT)
            if keeper.is_alive():
                log.warning("lease: the catalogue did not answer within %g s of the stop; the lease is left "
                            "to lapse", THREAD_JOIN_TIMEOUT)


def _bound_oracle_calls(dbapi_connection: Any, _record: Any) -> None:
    """Give each new Oracle connection a call timeout (python-oracledb sets it per connection, in ms)."""
    dbapi_connection.call_timeout = DB_CALL_TIMEOUT * 1000


def _shut_socket(dbapi_connection: Any) -> None:
    """Shut down a driver connection's socket, so a call blocked on it returns with an error at once."""
    fileno = getattr(dbapi_connection, "fileno", None)  # libpq drivers
    sock = getattr(dbapi_connection, "_sock", None)     # PyMySQL
    try:
        if callable(fileno):
            with socket.socket(fileno=os.dup(fileno())) as duplicate:
                duplicate.shutdown(socket.SHUT_RDWR)
        elif isinstance(sock, socket.socket):
            sock.shutdown(socket.SHUT_RDWR)
    except Exception:  # noqa: BLE001  a connection already closed: nothing left to shut
        pass


#: The columns that identify a row, so a row that may already be written is written only if missing.
_ROW_KEYS = {
    "fn4batchload": ("host_name", "findneighbour_server_url", "oci_namespace", "bucket_name", "check_time"),
    "fn4loadattempt": ("host_name", "findneighbour_server_url", "oci_namespace", "bucket_name", "file_name",
                       "object_etag", "batch_start_time", "outcome"),
}
_TIME_COLUMNS = frozenset(f.name for record in (BatchRow, AttemptRow) for f in dataclasses.fields(record)
                          if f.metadata["type"] is TIMESTAMP)


def _connection_failure(exc: BaseException) -> bool:
    """Return True if a catalogue write failed for its connection (no connection, or one lost), not a row."""
    return isinstance(exc, sa.exc.DBAPIError) and (exc.connection_invalidated or exc.statement is None)


def sanitised_row(table: sa.Table, values: dict[str, Any], refusal: str) -> tuple[dict[str, Any], list[str]]:
    """Return a row a database refused, made storable, and what was changed (e.g. ``file_name escaped``).

    Text that is not printable ASCII is stored escaped (``\\udcff``, ``\\x00``) and text longer than its
    column is cut; error_text then says so, and why the row was refused, so the file keeps a state row.
    """
    clean, changed = dict(values), []
    for column in table.columns:
        value = values.get(column.name)
        if not isinstance(value, str) or column.name == "error_text":
            continue
        text = _escaped(value)
        how = ["escaped"] if text != value else []
        if column.type.length and len(text) > column.type.length:
            text, how = text[:column.type.length], [*how, f"cut to {column.type.length} characters"]
        if how:
            clean[column.name] = text
            changed.append(f"{column.name} {' and '.join(how)}")
    if "error_text" in table.columns:  # the note always makes it differ from the error_text refused
        note = f"stored with {', '.join(changed) or 'error_text escaped'}: the catalogue database refused " \
               f"the row as it was ({refusal})"
        earlier = values.get("error_text")
        clean["error_text"] = _escaped(f"{note}; {earlier}" if earlier else note)[:table.c.error_text.type.length]
        changed = changed or ["error_text escaped"]
    return clean, changed


def _escaped(text: str) -> str:
    """Return text as printable ASCII: itself if it is, else with Python's escapes (``\\x00``, ``\\udcff``)."""
    return text if text.isascii() and text.isprintable() else text.encode("unicode_escape").decode("ascii")


def _key_value(value: Any) -> Any:
    """Return a key column's value as comparable across databases (Oracle stores '' as NULL)."""
    return None if value == "" else value


def catalogue_name(url: sa.URL, schema: str | None) -> str:
    """Return what names a catalogue whatever the driver, user or password: the journal's owner."""
    if url.get_backend_name() == "sqlite":
        name = f"sqlite:///{Path(url.database).resolve()}" if url.database else "sqlite://"
    else:
        name = sa.URL.create(url.get_backend_name(), host=url.host, port=url.port,
                             database=url.database).render_as_string()
    return f"{name} (schema {schema})" if schema else name


def journal_path(url: sa.URL, schema: str | None, bucket: str) -> Path:
    """Return where ``run`` journals catalogue rows by default: beside a SQLite file, else in the state folder."""
    if url.get_backend_name() == "sqlite" and url.database:
        database = Path(url.database)
        return database.with_name(f"{database.name}.{safe_file_name(bucket)}.journal")
    name = "-".join(str(part) for part in (url.get_backend_name(), url.host, url.port, url.database, schema) if part)
    return DEFAULT_SQLITE_PATH.parent / f"{safe_file_name(name)}.{safe_file_name(bucket)}.journal"


class RowJournal:
    """A local append-only file of the catalogue rows not yet committed, so a dead process loses none.

    Each row is one JSON line, written with one write() before it is queued for the database (no
    fsync: it must outlive the process, not the machine); a line ``{"done": N}`` says rows up to N
    are committed, and the file is emptied once every row in it is. ``open`` returns the rows to
    replay; a torn last line is skipped. A ``.lock`` file beside it keeps a second loader out.
    While it holds rows its first line names the catalogue they belong to (``{"journal": owner}``):
    rows of another catalogue are refused, never replayed into this one.
    """

    def __init__(self, path: Path, owner: str) -> None:
        self.path = Path(path)
        self.owner = owner
        self._header = json.dumps({"journal": owner}).encode() + b"\n"  # the first line while rows are held
        self._found_owner: str | None = None
        self.next_id = 1
        self._fd: int | None = None
        self._lock_fd: int | None = None
        self._size = 0
        self._failed = False

    def open(self) -> list[tuple[int, str, dict[str, Any]]]:
        """Lock the journal and return its uncommitted rows as (id, table name, values). Raises ConfigError."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise ConfigError(f"cannot open the journal {self.path}: {exc.strerror}; "
                              "choose another --journal") from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.close()
            raise ConfigError(f"the journal {self.path} is in use by another loader: give each loader "
                              "its own --journal") from None
        try:
            entries = self._read()
            if entries and self._found_owner and self._found_owner != self.owner:
                self.close()
                raise ConfigError(f"the journal {self.path} holds {len(entries)} rows of the catalogue "
                                  f"{self._found_owner}, not of {self.owner}: run with that catalogue to write them, "
                                  "or give this one its own --journal")
            self._rewrite(entries)  # drops committed rows and a torn line, so appends start on a new line
        except OSError as exc:
            self.close()
            raise ConfigError(f"cannot use the journal {self.path}: {exc.strerror}; choose another --journal") from None
        return entries

    def _read(self) -> list[tuple[int, str, dict[str, Any]]]:
        try:
            lines = self.path.read_bytes().split(b"\n")
        except FileNotFoundError:
            return []
        rows: dict[int, tuple[int, str, dict[str, Any]]] = {}
        done = 0
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                if "journal" in entry:
                    self._found_owner = str(entry["journal"])
                elif "done" in entry:
                    done = max(done, int(entry["done"]))
                else:
                    values = {k: datetime.fromisoformat(v) if k in _TIME_COLUMNS and v else v
                              for k, v in entry["row"].items()}
                    rows[int(entry["n"])] = (int(entry["n"]), str(entry["table"]), values)
            except (ValueError, TypeError, KeyError, AttributeError):
                if number == len(lines):
                    log.warning("skipped the torn last line of the journal %s (the process died writing it)",
                                self.path)
                else:
                    log.warning("skipped unreadable line %d of the journal %s", number, self.path)
        self.next_id = max([done, *rows]) + 1
        return [rows[n] for n in sorted(rows) if n > done]

    def _rewrite(self, entries: Iterable[tuple[int, str, dict[str, Any]]]) -> None:
        """Replace the file with these rows only: written beside it, then renamed over it in one step."""
        lines = b"".join(self._line(n, table, values) for n, table, values in entries)
        lines = self._header + lines if lines else lines
        temporary = self.path.with_name(self.path.name + ".tmp")
        temporary.write_bytes(lines)
        os.replace(temporary, self.path)
        if self._fd is not None:
            os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self._size = len(lines)

    @staticmethod
    def _line(n: int, table: str, values: dict[str, Any]) -> bytes:
        return json.dumps({"n": n, "table": table, "row": values}, default=_json_value).encode() + b"\n"

    def append(self, n: int, table: str, values: dict[str, Any]) -> bool:
        """Add one row in one write(); return False, once warned, if it could not be written."""
        return self._write(self._line(n, table, values))

    def committed(self, through: int, pending: deque[tuple[int, sa.Table, dict[str, Any], float]]) -> None:
        """Note that rows up to ``through`` are in the database; ``pending`` is the writer's queue after them."""
        if self._fd is None:
            return
        try:
            if not pending:
                os.ftruncate(self._fd, 0)
                self._size = 0
            elif self._size > JOURNAL_COMPACT_BYTES:
                self._rewrite((n, table.name, values) for n, table, values, _ in pending)
            else:
                self._write(json.dumps({"done": through}).encode() + b"\n")
        except OSError as exc:
            self._warn(exc)

    def _write(self, line: bytes) -> bool:
        if self._fd is None:
            return False
        if self._size == 0:  # the first line after an empty file: name the catalogue first
            line = self._header + line
        try:
            written = os.write(self._fd, line)
            if written != len(line):
                os.ftruncate(self._fd, self._size)  # never leave half a line for the next one to join
                raise OSError(28, "short write (is the disk full?)")
        except OSError as exc:
            self._warn(exc)
            return False
        self._size += written
        if self._failed:
            log.warning("the journal %s can be written again", self.path)
            self._failed = False
        return True

    def _warn(self, exc: OSError) -> None:
        if not self._failed:
            log.warning("cannot write the journal %s (%s): rows not yet in the catalogue would be lost if the "
                        "process died now", self.path, exc.strerror or exc)
            self._failed = True

    def close(self) -> None:
        for fd in (self._fd, self._lock_fd):
            if fd is not None:
                os.close(fd)  # closing the lock file's descriptor releases the lock
        self._fd = self._lock_fd = None


class LoadLogger:
    """The catalogue: write batch and attempt rows, and read back which files are finished.

    Rows are queued and written by a background thread, in order, so an insert never waits for
    the database. When the database is down, rows stay queued and are retried with a capped
    backoff; ``unwritten`` tells the loader how many wait. With a ``journal`` each row is also
    kept in a local file until committed, and rows left there by an earlier process are replayed.
    A call that takes longer than ``call_timeout`` seconds (a half-open connection) has the
    engine's connections shut under it, and is retried on a new one.
    """

    def __init__(self, engine: sa.Engine, schema: str | None = None, retry_cap: float = 30.0,
                 journal: Path | None = None, call_timeout: float = DB_CALL_TIMEOUT) -> None:
        self.engine = engine
        self.retry_cap = retry_cap
        self.call_timeout = call_timeout
        self.patience: float | None = None  # set for --once: seconds of refused writes before giving up
        self.metadata, self.batches, self.attempts = build_tables(schema)
        self.leases = build_lease_table(schema)
        # (id, table, values, monotonic time queued), in the order written
        self._pending: deque[tuple[int, sa.Table, dict[str, Any], float]] = deque()
        self._changed = threading.Condition()
        self._closing = False
        self._urgent = 0  # callers waiting for rows to be written: write at once
        self._outage_since: float | None = None  # when writes began to fail; None while they succeed
        self._last_error = ""
        self._waited_warning = False
        self._next_id = 1
        self._uncertain_through = 0  # rows up to this id may be in the database already: write the missing
        self.unjournaled: list[dict[str, Any]] = []  # rows the journal could not keep, left at close
        self._unjournaled_ids: set[int] = set()
        # [first, last] id runs of attempt rows this process wrote whose state its loader holds (see rows_held_after)
        self._own_runs: deque[list[int]] = deque(maxlen=OWN_RUNS_KEPT)
        self._connections: weakref.WeakSet[Any] = weakref.WeakSet()  # driver connections that have a socket
        self._connections_lock = threading.Lock()
        sa.event.listen(engine, "connect", self._track)
        self._writer = threading.Thread(target=self._write_forever, name="catalogue-writer", daemon=True)
        self.journal = RowJournal(journal, catalogue_name(engine.url, schema)) if journal else None
        if self.journal:
            tables = {t.name: t for t in (self.batches, self.attempts)}
            replay = [(n, tables[name], values) for n, name, values in self.journal.open() if name in tables]
            self._next_id = self.journal.next_id
            self._pending.extend((n, table, values, time.monotonic()) for n, table, values in replay)
            if replay:
                self._uncertain_through = replay[-1][0]
                log.warning("replaying %d catalogue rows left in the journal %s by an earlier run", len(replay),
                            self.journal.path)

    def _track(self, dbapi_connection: Any, _record: Any) -> None:
        if callable(getattr(dbapi_connection, "fileno", None)) or hasattr(dbapi_connection, "_sock"):
            with self._connections_lock:
                self._connections.add(dbapi_connection)

    @staticmethod
    def connect(database: str | None, read_only: bool = False) -> sa.Engine:
        """Return an engine for the database argument (see resolve_database). Raises ConfigError."""
        url = resolve_database(database, read_only=read_only)
        try:
            engine = sa.create_engine(url, pool_pre_ping=True, pool_recycle=3600, connect_args=_connect_args(url))
        except (sa.exc.NoSuchModuleError, ImportError) as exc:
            raise ConfigError(f"no database driver for {url.render_as_string(hide_password=True)}: {_short(exc)}; "
                              "check the URL's dialect+driver and that the driver is installed") from None
        if url.get_backend_name() == "oracle":
            sa.event.listen(engine, "connect", _bound_oracle_calls)
        return engine

    @classmethod
    def from_database_arg(cls, database: str | None, schema: str | None = None, read_only: bool = False,
                          journal: Path | None = None, bucket: str | None = None) -> LoadLogger:
        """Connect, create or upgrade the tables and start the writer. Raises ConfigError if unreachable.

        ``read_only``: a missing SQLite file is an error (CatalogueMissing) instead of being made.
        With ``bucket`` (the loader), rows are journaled: in ``journal``, or by default where
        journal_path puts it; rows an earlier run left there are written before this returns.
        """
        engine = cls.connect(database, read_only)
        path = (journal or journal_path(engine.url, schema, bucket)) if bucket else None
        catalogue = cls(engine, schema, journal=path)
        try:
            catalogue.at_start(catalogue.create_tables)
        except ConfigError:
            catalogue.close(0)
            raise
        log.info("catalogue: %s", catalogue.engine.url.render_as_string(hide_password=True))
        catalogue.start()
        if catalogue.unwritten and not catalogue.flush(DB_CONNECT_TIMEOUT, until_failure=True):
            log.warning("%d rows from the journal are not yet written; they are retried", catalogue.unwritten)
        return catalogue

    def at_start(self, action: Callable[[], Any]) -> Any:
        """Return what ``action`` returns; raise ConfigError if it fails (see unusable).

        When another instance starting at the same moment made a table or index first, or the two
        deadlocked, the action is tried again, up to twice, after a short random pause.
        """
        for tries_left in (2, 1, 0):
            try:
                return action()
            except sa.exc.SQLAlchemyError as exc:
                if not tries_left or not re.search(r"already|duplicate|deadlock", str(exc), re.I):
                    raise self.unusable(exc) from None
                threading.Event().wait(random.uniform(0.2, 1.0))  # a bounded start-up pause, not in the loop

    def unusable(self, exc: sa.exc.SQLAlchemyError) -> ConfigError:
        """Close the engine and return the error that says the catalogue cannot be used, and why."""
        self.engine.dispose()
        url = self.engine.url.render_as_string(hide_password=True)
        return ConfigError(f"cannot use the catalogue database {url}: {_db_error(exc)}")

    def start(self) -> LoadLogger:
        self._writer.start()
        return self

    def create_tables(self) -> None:
        """Create the two tables where they do not exist, and upgrade older ones (see upgrade_tables)."""
        with self.engine.begin() as conn:
            inspector = sa.inspect(conn)
            existing = {t.name: (inspector.get_columns(t.name, schema=t.schema),
                                 {i["name"] for i in inspector.get_indexes(t.name, schema=t.schema)})
                        for t in self.metadata.tables.values() if inspector.has_table(t.name, schema=t.schema)}
            if changes := upgrade_tables(lambda: _alembic_operations(conn), conn.dialect.name, self.metadata,
                                         existing):
                log.warning("catalogue tables upgraded, every row kept: %s", "; ".join(changes))
            self.metadata.create_all(conn, checkfirst=True)
            self.leases.metadata.create_all(conn, checkfirst=True)  # older catalogues gain it here

    @property
    def unwritten(self) -> int:
        """Rows queued but not yet in the database."""
        return len(self._pending)

    def record_batch(self, row: BatchRow) -> None:
        self._enqueue(self.batches, row)

    def record_attempt(self, row: AttemptRow) -> None:
        self._enqueue(self.attempts, row)

    @property
    def failing(self) -> bool:
        """True while the catalogue refuses writes (the last write failed)."""
        return self._outage_since is not None

    def _enqueue(self, table: sa.Table, row: Any) -> None:
        values = {f.name: _naive_utc(v) if isinstance(v := getattr(row, f.name), datetime) else v
                  for f in dataclasses.fields(row)}
        with self._changed:
            n, self._next_id = self._next_id, self._next_id + 1
            if self.journal and not self.journal.append(n, table.name, values):  # first the journal, then the queue
                self._unjournaled_ids.add(n)
            self._pending.append((n, table, values, time.monotonic()))
            # Wake the writer only when it acts: at its first row (it then gathers more for a moment) and
            # once a batch is full. A wake-up at every row takes the GIL from the inserter while fn4 waits.
            if len(self._pending) == 1 or len(self._pending) >= WRITE_BATCH_ROWS:
                self._changed.notify_all()

    def pending_attempts(self) -> list[dict[str, Any]]:
        """Return the values of the attempt rows not yet written, oldest first (rows replayed at start)."""
        with self._changed:
            return [values for _, table, values, _ in self._pending if table is self.attempts]

    def wait_until_below(self, limit: int, stop: threading.Event) -> None:
        """Block while more than ``limit`` rows are unwritten, unless stop is set.

        Raises OutageError if ``patience`` is set and writes have failed for longer than that.
        """
        with self._changed:
            if len(self._pending) <= limit:
                return  # the common case: do not hurry the writer, which gathers rows
            self._urgent += 1
            self._changed.notify_all()
            try:
                while len(self._pending) > limit and not stop.is_set():
                    if (self.patience is not None and self._outage_since is not None
                            and time.monotonic() - self._outage_since > self.patience):
                        raise OutageError(f"the catalogue database refused writes for {self.patience:g} s "
                                          f"({self._last_error}); {len(self._pending)} rows wait")
                    self._changed.wait(0.5)
            finally:
                self._urgent -= 1

    def flush(self, timeout: float, until_failure: bool = False) -> bool:
        """Wait up to ``timeout`` seconds for every queued row to be written; True if all were.

        With ``until_failure``, stop waiting as soon as a write fails.
        """
        deadline = time.monotonic() + timeout
        with self._changed:
            self._urgent += 1
            self._changed.notify_all()
            while self._pending and time.monotonic() < deadline and not (until_failure and self._outage_since):
                self._changed.wait(min(0.2, max(deadline - time.monotonic(), 0)))
            self._urgent -= 1
            return not self._pending

    def close(self, timeout: float = 3.0) -> list[dict[str, Any]]:
        """Flush for up to ``timeout`` seconds, stop the writer and join it; return the rows not written.

        A write still in flight then has half THREAD_JOIN_TIMEOUT, then its connections are shut.
        The rows returned are in the journal, but for those in ``unjournaled``.
        """
        self.flush(timeout)
        with self._changed:
            self._closing = True
            self._changed.notify_all()
        self._join_writer()
        with self._changed:
            left = [values for _, _, values, _ in self._pending]
            self.unjournaled = [values for n, _, values, _ in self._pending
                                if self.journal is None or n in self._unjournaled_ids]
            if self.journal:
                self.journal.close()
        self.engine.dispose()
        return left

    def _join_writer(self) -> None:
        """Join the writer (told to stop); if a write holds it, shut that write's connections and join again."""
        if self._writer.ident is None:
            return
        self._writer.join(THREAD_JOIN_TIMEOUT / 2)
        if self._writer.is_alive():
            self._shut_connections()
            self._writer.join(THREAD_JOIN_TIMEOUT)
        if self._writer.is_alive():  # connecting, say: a daemon, left to its call's own deadline
            log.warning("the catalogue writer is still in a database call %g s after close; rows not yet "
                        "written are left to the journal", 1.5 * THREAD_JOIN_TIMEOUT)

    @contextlib.contextmanager
    def _deadline(self, what: str) -> Iterator[None]:
        """Bound a catalogue call: every ``call_timeout`` seconds it has not ended, shut its connections.

        Again and again, not once: the driver may reconnect by itself (pool pre-ping) and the new
        connection can go half-open too.
        """
        ended = threading.Event()

        def watch() -> None:
            while not ended.wait(self.call_timeout):
                log.warning("a catalogue %s took more than %g s (a half-open connection?); %d rows wait; "
                            "dropping its connections and reconnecting", what, self.call_timeout, len(self._pending))
                self._shut_connections()

        watcher = threading.Thread(target=watch, name="catalogue-deadline", daemon=True)
        watcher.start()
        try:
            yield
        finally:
            ended.set()
            watcher.join(self.call_timeout)

    def _shut_connections(self) -> None:
        """Shut the sockets of the engine's connections, so that a call blocked on one returns at once."""
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            _shut_socket(connection)

    def _warn_if_waiting(self) -> None:
        """Warn once when the oldest unwritten row has waited longer than ``call_timeout``."""
        with self._changed:
            waited = time.monotonic() - self._pending[0][3] if self._pending else 0.0
        if waited > self.call_timeout and not self._waited_warning:
            self._waited_warning = True
            log.warning("%d catalogue rows have waited %.0f s to be written (%s); the writer keeps trying%s",
                        len(self._pending), waited, self._last_error or "no answer",
                        f"; they are kept in the journal {self.journal.path}" if self.journal else "")

    def _missing(self, conn: sa.Connection, table: sa.Table, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Return the rows not yet in the table, found by their key columns (_ROW_KEYS), IN_LIST_LIMIT rows a query."""
        keys = _ROW_KEYS[table.name]
        moment = "check_time" if table is self.batches else "batch_start_time"
        found: set[tuple[Any, ...]] = set()
        for part in (rows[at:at + IN_LIST_LIMIT] for at in range(0, len(rows), IN_LIST_LIMIT)):
            query = sa.select(*(table.c[k] for k in keys)).where(table.c[moment].in_(list({r[moment] for r in part})))
            if table is self.attempts:
                query = query.where(table.c.file_name.in_(list({r["file_name"] for r in part})))
            found.update(tuple(map(_key_value, row)) for row in conn.execute(query))
        return [r for r in rows if tuple(_key_value(r[k]) for k in keys) not in found]

    def _write_forever(self) -> None:
        failures = 0
        while (batch := self._next_batch()) is not None:
            table, rows, ids, uncertain = batch
            written, exc = self._write_rows(table, rows, uncertain)
            if written:
                with self._changed:
                    self._committed(ids[:written])
            if exc is not None:
                failures += 1
                self._write_failed(exc, ids[-1], failures)
                continue
            if failures and written:
                log.warning("catalogue database is back after %d failed writes", failures)
                failures = 0

    def _next_batch(self) -> tuple[sa.Table, list[dict[str, Any]], list[int], bool] | None:
        """Wait for rows, then return the first queued ones of one table (up to 200); None once closing.

        The rows are uncertain if a write that failed may have been committed all the same (the
        answer was lost), or if they were replayed from the journal: they are written only if missing.
        """
        with self._changed:
            while not self._pending and not self._closing:
                self._changed.wait()
            # Gather rows for a moment: one write per batch of rows costs the inserter far less
            # GIL time than one per row.
            self._changed.wait_for(lambda: self._closing or self._urgent or len(self._pending) >= WRITE_BATCH_ROWS,
                                   timeout=WRITE_BATCH_DELAY)
            if self._closing:
                return None
            table = self._pending[0][1]
            rows, ids = [], []
            for n, queued_table, values, _ in self._pending:
                if queued_table is not table or len(rows) >= 200:
                    break
                rows.append(values)
                ids.append(n)
            return table, rows, ids, self._pending[0][0] <= self._uncertain_through

    def _write_failed(self, exc: Exception, last_id: int, failures: int) -> None:
        """Note a failed write (its rows may have been committed: uncertain), warn, and back off."""
        with self._changed:
            self._uncertain_through = max(self._uncertain_through, last_id)
            self._outage_since = self._outage_since or time.monotonic()
            self._last_error = _db_error(exc)
            self._changed.notify_all()
        if failures == 1:
            log.warning("catalogue database write failed; %d rows wait and will be retried: %s",
                        len(self._pending), self._last_error)
        self._warn_if_waiting()
        with self._changed:
            self._changed.wait_for(lambda: self._closing, timeout=backoff(failures, 1.0, self.retry_cap))

    def _committed(self, ids: list[int]) -> None:
        """Take the rows ``ids``, the first ones queued and now written, off the queue (caller holds _changed)."""
        for _ in ids:
            self._pending.popleft()
        self._outage_since = None
        self._waited_warning = False
        self._unjournaled_ids.difference_update(ids)
        if self.journal:
            self.journal.committed(ids[-1], self._pending)
        self._changed.notify_all()

    def _insert(self, table: sa.Table, rows: list[dict[str, Any]], uncertain: bool) -> None:
        """Insert rows in one transaction; the uncertain ones (see _write_forever) only where missing.

        Attempt rows made in this process (certain ones) are inserted returning their ids, where the
        database can, so that the loader need not read them back (see rows_held_after).
        """
        written: list[Any] = []
        with self._deadline("write"), self.engine.begin() as conn:
            rows = self._missing(conn, table, rows) if uncertain else rows
            if rows and table is self.attempts and not uncertain and conn.dialect.insert_executemany_returning:
                # in any order: asking for the rows' order costs a statement a row on some databases
                written = list(conn.execute(table.insert().returning(table.c.gp_int_id, table.c.outcome), rows))
            elif rows:
                conn.execute(table.insert(), rows)
        self._note_own(sorted(row_id for row_id, outcome in written if outcome not in (GAVE_UP, REQUEUED)))

    def _note_own(self, ids: Iterable[int]) -> None:
        """Add written attempt-row ids to the runs of our own rows, extending the last run where they follow it."""
        with self._changed:
            for row_id in ids:
                if self._own_runs and self._own_runs[-1][1] == row_id - 1:
                    self._own_runs[-1][1] = row_id
                else:
                    self._own_runs.append([row_id, row_id])

    def rows_held_after(self, after_id: int) -> int:
        """Return the last id of the unbroken run of our own attempt rows right after ``after_id`` (or ``after_id``).

        Those rows were made by this process's loader, which set each file's state as it queued them,
        in the same order: reading them back would change nothing. A gave_up row (the loader counts
        those when read), a requeued row (``requeue`` writes through this catalogue too, and the loop
        learns of it by reading it) and a row another process wrote break the run.
        """
        with self._changed:
            while self._own_runs and self._own_runs[0][1] <= after_id:
                self._own_runs.popleft()
            if self._own_runs and self._own_runs[0][0] <= after_id + 1:
                return self._own_runs.popleft()[1]
            return after_id

    def _write_rows(self, table: sa.Table, rows: list[dict[str, Any]], uncertain: bool
                    ) -> tuple[int, Exception | None]:
        """Write rows, in order; return how many were written and the failure that stopped the rest, if any.

        One bad row must not block the queue: when the database refuses the batch for a reason other
        than the connection, the rows are written one by one, and a row refused for its content (text a
        driver cannot encode, too long for its column) is written sanitised (see sanitised_row).
        """
        try:  # a driver raises ValueError, not a database error, for text it cannot encode: catch all
            self._insert(table, rows, uncertain)
            return len(rows), None
        except Exception as exc:  # noqa: BLE001
            if _connection_failure(exc):
                return 0, exc
        for done, values in enumerate(rows):
            if self._closing:  # close() waits: the rest stay queued (and journaled)
                return done, None
            try:
                self._insert_alone(table, values, uncertain)
            except Exception as exc:  # noqa: BLE001
                return done, exc
        return len(rows), None

    def _insert_alone(self, table: sa.Table, values: dict[str, Any], uncertain: bool) -> None:
        """Insert one row; if the database refuses it but not for its connection, insert it sanitised.

        Raises the failure if the sanitised row is refused too (then it was not the row: a full disk, say).
        """
        try:
            self._insert(table, [values], uncertain)
            return
        except Exception as exc:  # noqa: BLE001
            if _connection_failure(exc):
                raise
            refusal, error = _db_error(exc), exc
        clean, changed = sanitised_row(table, values, refusal)
        if not changed:
            raise error
        self._insert(table, [clean], uncertain)
        log.warning("the catalogue database refused a row of %s for its content (%s): written with %s, "
                    "file %s", table.name, refusal, " and ".join(changed), clean.get("file_name"))

    @staticmethod
    def _of(columns: Any, target: Target) -> Any:
        """Return the condition that a batch or attempt row (``columns``) is of ``target``."""
        return sa.and_(columns.findneighbour_server_url == target.server_url,
                       columns.oci_namespace == target.namespace, columns.bucket_name == target.bucket)

    def prune(self, target: Target, before: datetime) -> tuple[int, int]:
        """Delete this loader's rows from before ``before``; return (batch rows, attempt rows) removed.

        Each file's latest attempt row is its state, so it is kept whatever its age: removing it
        would make the loader ask fn4 about the file again, or retry a file that failed for good.
        Rows of the predecessor, which name no bucket, are left alone: an upgrade keeps every row.
        """
        b, a = self.batches.c, self.attempts.c
        before = _naive_utc(before)
        mine = self._of(a, target)
        latest = (sa.select(sa.func.max(a.gp_int_id).label("id")).where(mine)
                  .group_by(a.file_name, a.object_etag).subquery())
        with self._deadline("removal of old rows"), self.engine.begin() as conn:
            batches = conn.execute(self.batches.delete().where(self._of(b, target), b.check_time < before))
            # MariaDB refuses a subquery on the table it deletes from unless it is wrapped like this
            attempts = conn.execute(self.attempts.delete().where(
                mine, a.batch_start_time < before, a.gp_int_id.not_in(sa.select(latest.c.id))))
        return batches.rowcount, attempts.rowcount

    def status_queries(self, since: datetime, server: str | None = None) -> dict[str, sa.Select[Any]]:
        """Return the queries behind ``status``, portable to every supported database.

        A file is an object name in a bucket: its state is its latest row's outcome, so a file
        tried five times counts once, and one re-queued and loaded is no longer failed. ``server``
        (as fn4_server_url gives it) keeps only the loaders of that fn4 server.
        """
        batch_queries = self._batch_queries()
        queries = {**batch_queries, **self._attempt_queries(since)}
        # The predecessor's rows name no bucket: its loaders are retired, so they are not reported.
        for name, query in queries.items():
            table = self.batches.c if name in batch_queries else self.attempts.c
            query = query.where(table.bucket_name.is_not(None))
            if server:
                query = query.where(table.findneighbour_server_url == server)
            queries[name] = query
        return queries

    def _batch_queries(self) -> dict[str, sa.Select[Any]]:
        """Each loader's latest cycle, its backlog, and the cycles abandoned since its latest that ran."""
        b, a = self.batches.c, self.attempts.c
        loader = (b.host_name, b.findneighbour_server_url)
        ran = (sa.select(*loader, sa.func.max(b.bl_int_id).label("id"))  # each loader's latest cycle that ran
               .where(b.abandon_reason.is_(None)).group_by(*loader).subquery("ran"))
        abandoned = (sa.select(*loader, sa.func.min(b.check_time), sa.func.count())
                     .join(ran, sa.and_(ran.c.host_name == b.host_name,
                                        ran.c.findneighbour_server_url == b.findneighbour_server_url), isouter=True)
                     .where(b.abandon_reason.is_not(None), b.bl_int_id > sa.func.coalesce(ran.c.id, 0))
                     .group_by(*loader))
        finished = (sa.select(sa.func.count()).where(  # files of that cycle loaded or failed for good since
            a.host_name == b.host_name, a.findneighbour_server_url == b.findneighbour_server_url,
            a.oci_namespace == b.oci_namespace, a.bucket_name == b.bucket_name, a.batch_start_time == b.check_time,
            a.batch_sample_number.is_not(None), a.completed == 1).scalar_subquery())
        return {
            "batches": sa.select(*loader, b.check_time, b.abandon_reason)
                         .where(b.bl_int_id.in_(sa.select(sa.func.max(b.bl_int_id)).group_by(*loader))),
            "backlog": sa.select(*loader, b.batch_size - finished).where(b.bl_int_id.in_(sa.select(ran.c.id))),
            "abandoned": abandoned,
        }

    def _attempt_queries(self, since: datetime) -> dict[str, sa.Select[Any]]:
        """Each loader's latest attempt and times, and its files' outcomes since ``since``."""
        a = self.attempts.c
        pair = (a.host_name, a.findneighbour_server_url)
        bucket = (a.findneighbour_server_url, a.oci_namespace, a.bucket_name)
        latest_of_loader = sa.select(sa.func.max(a.gp_int_id)).group_by(*pair)
        latest_of_file = sa.select(sa.func.max(a.gp_int_id)).group_by(*bucket, a.file_name)
        recent_of_file = (sa.select(sa.func.max(a.gp_int_id)).where(a.batch_start_time >= _naive_utc(since))
                          .group_by(*bucket, a.file_name))
        return {
            "times": sa.select(*pair, sa.func.max(sa.func.coalesce(
                         a.insert_end_time, a.bucket_read_end_time, a.batch_start_time)),
                         sa.func.max(sa.case((a.outcome.in_([INSERTED, ALREADY_PRESENT]), a.insert_end_time))))
                       .group_by(*pair),
            "latest": sa.select(*pair, a.outcome, a.batch_start_time, a.error_text)
                        .where(a.gp_int_id.in_(latest_of_loader)),
            "outcomes": sa.select(*pair, a.outcome, sa.func.count()).where(a.batch_start_time >= _naive_utc(since))
                          .group_by(*pair, a.outcome),
            "recent": sa.select(*pair, a.outcome, sa.func.count()).where(a.gp_int_id.in_(recent_of_file))
                        .group_by(*pair, a.outcome),
            "failed": sa.select(*pair, a.file_name, a.outcome, a.parse_status, a.error_text, a.batch_start_time)
                        .where(a.gp_int_id.in_(latest_of_file), a.outcome.in_(sorted(FAILED_FOR_GOOD)))
                        .order_by(a.gp_int_id.desc()),
        }

    def has_tables(self) -> bool:
        """Return True if both catalogue tables exist. Raises SQLAlchemyError if the database cannot be read."""
        with self.engine.connect() as conn:
            inspector = sa.inspect(conn)
            return all(inspector.has_table(t.name, schema=t.schema) for t in (self.batches, self.attempts))

    def reports(self, now: datetime, server: str | None = None) -> list[LoaderReport]:
        """Read each loader's latest cycle, pending files, last insert, recent outcomes and failed files."""
        found: defaultdict[tuple[str, str], dict[str, Any]] = defaultdict(dict)
        with self.engine.connect() as conn:
            rows = {name: conn.execute(query).all()
                    for name, query in self.status_queries(now - STATUS_WINDOW, server).items()}
        for host, url, check_time, reason in rows["batches"]:
            found[host, url].update(last_batch=_aware(check_time), abandoned=reason)
        for host, url, backlog in rows["backlog"]:
            found[host, url]["backlog"] = None if backlog is None else max(backlog, 0)
        for host, url, since, count in rows["abandoned"]:
            found[host, url].update(abandoned_since=_aware(since), abandoned_cycles=count)
        for host, url, active, success in rows["times"]:
            found[host, url].update(last_activity=_aware(active), last_success=_aware(success))
        for host, url, outcome, started, error in rows["latest"]:
            facts = found[host, url]
            ran = facts.get("last_batch") if not facts.get("abandoned") else None
            if outcome == SERVER_UNAVAILABLE and ran and started and _aware(started) >= ran:
                facts["paused"] = error or outcome  # the latest cycle that ran paused on it
        for name, key in (("outcomes", "outcomes"), ("recent", "recent_files")):
            for host, url, outcome, count in rows[name]:
                found[host, url].setdefault(key, {})[outcome or "none"] = count
        for host, url, name, outcome, parse_status, error, when in rows["failed"]:
            found[host, url].setdefault("failed_files", []).append(
                {"file_name": name, "outcome": outcome, "parse_status": parse_status, "error_text": error,
                 "batch_start_time": _aware(when)})
        return [LoaderReport(host or "", url or "", **{k: tuple(v) if k == "failed_files" else v
                                                       for k, v in facts.items()})
                for (host, url), facts in sorted(found.items(), key=lambda item: tuple(map(str, item[0])))]

    def lease(self, target: Target, ttl: float = DEFAULT_LEASE_TTL) -> Lease:
        """Return this instance's lease on the catalogue, its row written as standby. Raises ConfigError."""
        lease = Lease(self.engine, self.leases, target, ttl)
        self.at_start(lease.join)
        return lease

    def instances(self, server: str | None = None) -> list[dict[str, Any]]:
        """Return the loader instances of the lease table that hold a lease or still live, with the database's time.

        ``server`` (as fn4_server_url gives it) keeps only the instances loading into that fn4 server.
        """
        t = self.leases
        with self.engine.connect() as conn:
            if not sa.inspect(conn).has_table(t.name, schema=t.schema):
                return []  # made by an older loader: run adds it
            now = database_utc(conn.dialect.name)
            query = (sa.select(t.c.host_name, t.c.process_id, t.c.findneighbour_server_url, t.c.oci_namespace,
                               t.c.bucket_name, t.c.lease_key, t.c.active_key, t.c.role_since, t.c.expires,
                               now.label("now"))
                     .where(sa.or_(t.c.active_key.is_not(None), t.c.expires > now))
                     .order_by(t.c.findneighbour_server_url, t.c.bucket_name,
                               sa.case((t.c.active_key.is_(None), 1), else_=0), t.c.host_name))
            if server:
                query = query.where(t.c.findneighbour_server_url == server)
            return [{"role": "active" if r.active_key else "standby", "host_name": r.host_name,
                     "process_id": r.process_id, "server_url": r.findneighbour_server_url,
                     "namespace": r.oci_namespace, "bucket": r.bucket_name, "lease_key": r.lease_key,
                     "since": _aware(r.role_since), "expires": _aware(r.expires), "lapsed": r.expires < r.now}
                    for r in conn.execute(query)]

    def last_success(self, target: Target) -> datetime | None:
        """Return the time of this loader's last insert fn4 answered 200 or 201, or None."""
        a = self.attempts.c
        query = sa.select(sa.func.max(a.insert_end_time)).where(
            self._of(a, target), a.outcome.in_([INSERTED, ALREADY_PRESENT]))
        with self.engine.connect() as conn:
            return _aware(conn.execute(query).scalar())

    def file_states(self, target: Target, after_id: int = 0) -> Iterator[tuple[int, str, str, int, str, int, datetime]]:
        """Yield (id, file_name, etag, completed, outcome, failed_attempts, batch_start_time) rows in id order."""
        a = self.attempts.c
        query = (sa.select(a.gp_int_id, a.file_name, a.object_etag, a.completed, a.outcome, a.failed_attempts,
                           a.batch_start_time)
                 .where(self._of(a, target), a.gp_int_id > after_id)
                 .order_by(a.gp_int_id))
        with self._deadline("read"), self.engine.connect() as conn:
            yield from conn.execution_options(yield_per=5000).execute(query)

    def latest_states(self, target: Target) -> Iterator[tuple[str, str, FileState]]:
        """Yield each file's (name, etag, state) as its latest row gives it. Raises SQLAlchemyError."""
        a = self.attempts.c
        latest = sa.select(sa.func.max(a.gp_int_id)).where(self._of(a, target)).group_by(a.file_name, a.object_etag)
        query = sa.select(a.file_name, a.object_etag, a.completed, a.outcome, a.failed_attempts).where(
            a.gp_int_id.in_(latest))
        with self._deadline("read"), self.engine.connect() as conn:
            for name, etag, completed, outcome, attempts in conn.execution_options(yield_per=5000).execute(query):
                yield name, etag, FileState.of(completed, outcome, attempts)

    def requeue(self, target: Target, names: Iterable[str] = (), now: datetime | None = None,
                host_name: str | None = None) -> list[str]:
        """Mark failed files of ``target`` as pending again (all, or those named); return the names re-queued.

        Failed: the file's latest row finished it without loading it (REQUEUEABLE). Rows still queued
        are written first, and the re-queue rows before this returns (each within call_timeout). If
        the catalogue cannot be read, nothing is re-queued (a warning).
        """
        wanted = set(names)
        self.flush(self.call_timeout, until_failure=True)  # our own latest rows may still be queued
        try:
            failed = sorted((name, etag, state.outcome) for name, etag, state in self.latest_states(target)
                            if state.completed and state.outcome in REQUEUEABLE and (not wanted or name in wanted))
        except sa.exc.SQLAlchemyError as exc:
            log.warning("could not read the catalogue (%s); nothing re-queued", _short(exc))
            return []
        host_name, now = host_name or socket.gethostname(), now or utcnow()
        for name, etag, outcome in failed:
            guid, text = guid_from_name(name), f"requeued by an operator after {outcome}"
            self.record_attempt(AttemptRow(
                host_name=host_name, findneighbour_server_url=target.server_url, oci_namespace=target.namespace,
                bucket_name=target.bucket, file_name=name, object_etag=etag, batch_start_time=now, fn4id=guid[:256],
                completed=0, outcome=REQUEUED, failed_attempts=0, error_text=text))
            log.info("%s %s: %s (%s)", REQUEUED, guid, name, text, extra={"fields": {
                "event": "sample", "guid": guid, "file_name": name, "outcome": REQUEUED, "error": text}})
        self.flush(self.call_timeout, until_failure=True)
        return [name for name, _, _ in failed]


# ---- The loop --------------------------------------------------------------------------------


# The threads, who owns each and how each ends. The loop itself runs in the caller's thread (the
# main thread under the command line) and is the only one that inserts into fn4.
# - prefetch (LoadLoop._load): downloads and parses the next sample while the loop inserts this one.
#   It hands samples over through a one-slot queue and starts on the next only once the loop has
#   sent the last one to fn4 (task_done), so memory holds at most PREFETCH_DEPTH samples ahead and
#   an insert is on its way before the prefetcher competes for the GIL; the loop then records the
#   sample before (_insert_each). Ends at the end of the batch's list, or when _end_prefetch sets
#   ``abandon``; joined for PREFETCH_JOIN_TIMEOUT (a daemon: a download in flight ends it a little later).
# - list_N (ObjectStoreClient.list_ranges): a pool listing key ranges at once, each with its own
#   client; a failed range sets ``failed`` so the others stop after their page; the ``with
#   ThreadPoolExecutor`` block of one listing joins them.
# - catalogue-writer (LoadLogger.start): writes queued batch and attempt rows, under the condition
#   ``_changed`` that callers wait on (flush, wait_until_below). LoadLogger.close flushes, then sets
#   ``_closing`` and joins it: the writer returns at its next wake-up or between rows; a write in
#   flight after half THREAD_JOIN_TIMEOUT has its connections shut, and is joined THREAD_JOIN_TIMEOUT more.
# - catalogue-deadline (LoadLogger._deadline): one per bounded catalogue call; shuts the call's
#   connections every call_timeout seconds it has not ended; set and joined when the call returns.
# - lease-keeper (Lease.kept): renews the lease (or a standby's look at it) while the block runs;
#   the block's end sets ``_done``; the keeper then releases the lease and ends, joined for
#   THREAD_JOIN_TIMEOUT (a daemon: stuck on a dead connection, it is logged and the lease lapses).
# Operator shell (below the core), each started and stopped by the run command's one shutdown
# sequence: signals (_install_signal_handlers) reads a pipe the signal handler writes to and sets
# the stop event (a second signal exits at once), and ends when restore() writes a 0 byte; metrics
# and metrics-N (Metrics.serve) accept and answer /metrics and /healthz until server.close().
# Every one is a daemon joined with a deadline: none keeps the process alive once run returns.


class LoaderObserver:
    """What the loop reports as it goes; every method does nothing here. The shell's Metrics implements it."""

    def record(self, outcome: str, insert_start: datetime | None, insert_end: datetime | None) -> None:
        """An attempt row was recorded."""

    def cycle_done(self) -> None:
        """A cycle ended normally."""

    def cycle_abandoned(self, service: str) -> None:
        """A cycle was abandoned because ``service`` (see ABANDON_SERVICES) was unavailable."""

    def set_backlog(self, files: int) -> None:
        """This many files are pending."""

    def set_active(self, active: bool) -> None:
        """This instance started (True) or stopped (False) loading under the lease."""

    def progressed(self, moment: datetime) -> None:
        """The loader was healthy at ``moment`` without loading (a standby in touch with the catalogue)."""

    def seed_last_success(self, moment: datetime) -> None:
        """The catalogue's last accepted insert, read at start."""


_END = object()  # marks the end of the prefetch queue
_EPOCH = datetime.fromtimestamp(0, timezone.utc)  # the time of a row that has none


class FileStates:
    """(file name, etag) -> FileState: what the catalogue says of each file.

    Files loaded at the first attempt (nearly all of them, at 2 million files) are kept as 8 bytes
    each: the key's 64-bit hash with the outcome in its two low bits, in a sorted array (and 8 more
    for its name's hash, see ``loaded_by_name``). Every other file is kept whole, and ``items()``
    yields exactly those: the files that may need work. The states handed out are FileState records.
    """

    _LOADED_CODES = (INSERTED, ALREADY_PRESENT, IN_SERVER)
    _LOADED_STATES = tuple(_LOADED_AT_ONCE[outcome] for outcome in _LOADED_CODES)

    def __init__(self) -> None:
        self._whole: dict[tuple[str, str], FileState] = {}
        self._recent: dict[int, int] = {}     # key hash -> outcome code, not yet merged into _packed
        self._packed = array("q")             # sorted key hashes, outcome code in the two low bits
        self._recent_names: set[int] = set()  # name hashes of files compacted since the last merge
        self._names = array("q")              # sorted name hashes of files ever compacted

    @staticmethod
    def _hash(key: tuple[str, str]) -> int:
        return hash(key) & ~3

    def get(self, key: tuple[str, str], default: Any = None) -> Any:
        """Return the file's state, or ``default`` (FileState() for a file never tried) if there is none."""
        if (state := self._whole.get(key)) is not None:
            return state
        hashed = self._hash(key)
        code = self._recent.get(hashed)
        if code is None:
            packed = self._packed  # once: a listing thread may merge meanwhile
            index = bisect.bisect_left(packed, hashed)
            if index == len(packed) or packed[index] & ~3 != hashed:
                return default
            code = packed[index] & 3
        return self._LOADED_STATES[code]

    def __setitem__(self, key: tuple[str, str], state: FileState) -> None:
        hashed = self._hash(key)
        if state.loaded and not state.failed_attempts:
            self._whole.pop(key, None)
            self._recent[hashed] = self._LOADED_CODES.index(state.outcome)
            self._recent_names.add(hash(key[0]))
            if len(self._recent) > max(1 << 16, len(self._packed) // 16):
                self._merge()
        else:
            self._whole[key] = state
            self._recent.pop(hashed, None)

    def __bool__(self) -> bool:
        return bool(self._whole or self._recent or self._packed)

    def items(self) -> Iterator[tuple[tuple[str, str], FileState]]:
        """Yield the files kept whole: every file not loaded at its first attempt."""
        return iter(list(self._whole.items()))

    def loaded_by_name(self, name: str) -> bool:
        """Return True if a file of this name was loaded at its first attempt (the etag aside)."""
        hashed = hash(name)
        names = self._names
        index = bisect.bisect_left(names, hashed)
        return hashed in self._recent_names or (index < len(names) and names[index] == hashed)

    def _merge(self) -> None:
        recent = self._recent
        older = (packed for packed in self._packed if packed & ~3 not in recent)
        self._packed = array("q", heapq.merge(older, sorted(hashed | code for hashed, code in recent.items())))
        self._recent = {}
        self._names = array("q", heapq.merge(self._names, sorted(self._recent_names)))
        self._recent_names = set()


def sort_out(objects: list[StoredObject], states: FileStates, server_guids: GuidSet | set[str] | None
             ) -> tuple[list[StoredObject], list[tuple[StoredObject, str, str]]]:
    """Split listed objects, oldest first, into candidates for loading and files settled without it.

    Settled ones are returned with their outcome (duplicate, failed) and reason. Files finished
    earlier are left out, unless loaded and missing from ``server_guids`` (fn4's guids, if known).
    """
    owners: dict[str, StoredObject] = {}
    candidates, settled = [], []
    skipped: dict[str, int] = {}  # files finished in earlier cycles, by outcome
    for obj in objects:  # oldest first, so the oldest object owns its guid
        state = states.get(obj.key, FileState())
        completed, outcome = state.completed, state.outcome
        owner = owners.get(obj.guid)
        if outcome not in (FAILED, GAVE_UP, VANISHED, DUPLICATE):
            owners.setdefault(obj.guid, obj)
        if completed:
            if server_guids is not None and outcome in LOADED and obj.guid not in server_guids:
                log.warning("%s was loaded but fn4 no longer holds %s; loading it again", obj.name, obj.guid)
                candidates.append(obj)
            else:
                skipped[outcome] = skipped.get(outcome, 0) + 1
                if outcome not in LOADED:
                    log.debug("skipping %s: finished earlier as %s", obj.name, outcome)
            continue
        if owner is not None and owner.name != obj.name:
            settled.append((obj, DUPLICATE, f"guid {obj.guid} belongs to older object {owner.name}"))
        elif (problem := guid_problem(obj.guid)) is not None:
            settled.append((obj, FAILED, problem))
        else:
            candidates.append(obj)
    if skipped:
        loaded = sum(n for outcome, n in skipped.items() if outcome in LOADED)
        log.debug("skipped %d files finished in earlier cycles: %d loaded earlier%s", sum(skipped.values()), loaded,
                  "".join(f", {n} {outcome}" for outcome, n in sorted(skipped.items()) if outcome not in LOADED))
    return candidates, settled


class LoadLoop:
    """Move new FASTA files from the bucket into fn4, oldest first, recording every attempt.

    Everything it talks to is passed in; ``clock`` gives aware UTC datetimes and ``stop`` ends
    ``run`` at once. Every pause of ``run`` goes through ``wait(seconds)`` (default ``stop.wait``),
    which returns True once stop is set; so tests need neither sleeps nor patching.
    """

    def __init__(self, store: ObjectStoreClient, fn4: FN4Client, catalogue: LoadLogger,
                 settings: Settings, clock: Callable[[], datetime] = utcnow,
                 stop: threading.Event | None = None, host_name: str | None = None,
                 metrics: LoaderObserver | None = None, lease: Lease | None = None,
                 wait: Callable[[float], bool] | None = None) -> None:
        self.store = store
        self.fn4 = fn4
        self.catalogue = catalogue
        self.settings = settings
        self.clock = clock
        self.stop = stop or threading.Event()
        self.wait = wait or self.stop.wait
        self.host_name = host_name or socket.gethostname()
        self.target = Target(fn4.base_url, store.namespace, store.bucket)  # what its rows name
        # (file name, etag) -> FileState, folded from the catalogue.
        self._files = FileStates()
        self._boundaries: list[str] = []  # where the last listing's pages started: the next one splits there
        self._last_row_id = 0
        self._next_reconcile: datetime | None = None
        self._server_count = 0
        self._next_prune: datetime | None = None
        self._archive_failed: set[tuple[str, str]] = set()  # keys whose archiving failed: warned once
        # (file name, etag) -> (gave_up rows, time of the latest), folded from the catalogue: the automatic retry.
        self._given_up: dict[tuple[str, str], tuple[int, datetime]] = {}
        self._retry_after: float | None = None  # seconds fn4 asked us to wait when it paused the last cycle
        self.pause_reason: str | None = None  # why the last cycle paused: the pausing row's error text
        self.last_summary: CycleSummary | None = None
        self.cycles = 0
        self.metrics = metrics or LoaderObserver()
        self.lease = lease
        self._term: int | None = None  # the lease term loading now; None while standby

    # -- the loop --

    def run(self, once: bool = False) -> int:
        """Run cycles until stop is set (or one cycle if ``once``); return the number completed.

        After a cycle that found files, the next starts at once; after an idle cycle it waits the
        poll interval; after an outage or a cycle of only failures it backs off, capped.
        """
        failures = 0
        self._seed_last_success()
        self.warn_of_waiting_archive()
        while not self.stop.is_set():
            if not self._active():
                if once:
                    log.warning("another instance holds the lease: nothing loaded")
                    break
                self.wait(LEASE_POLL)
                continue
            try:
                summary = self.run_cycle()
            except Stopped as exc:
                log.info("%s: the cycle ends here, nothing recorded", exc)
                break
            except Exception as exc:  # an outage, or a fault of ours: back off, never die
                failures += 1
                wait = max(backoff(failures), getattr(exc, "retry_after", None) or 0.0)
                self._record_abandoned(exc, wait)
                if once:
                    raise
                self.wait(wait)
                continue
            self.cycles += 1
            self.last_summary = summary
            self.metrics.cycle_done()
            self._prune_if_due()
            if once:
                break
            failures = failures + 1 if summary.unproductive else 0
            self.wait(self._pause_after(summary, failures))
        return self.cycles

    def _pause_after(self, summary: CycleSummary, failures: int) -> float:
        """Return the seconds to wait after a cycle: none after one that loaded, the poll interval after
        an idle one, and a capped backoff (or fn4's Retry-After, capped when read) after an unproductive one."""
        if summary.unproductive:
            return max(backoff(failures), self._retry_after or 0.0)
        return 0.0 if summary.tried else self.settings.poll_interval

    def run_cycle(self) -> CycleSummary:
        """List, diff, record the batch row, then load what is new. Raises OutageError."""
        started = self.clock()
        self._retry_after = self.pause_reason = None
        caught_up = self._refresh_from_catalogue()
        reconcile = self._next_reconcile is None or started >= self._next_reconcile
        server_guids = self.fn4.guid_set() if reconcile else None
        if server_guids is not None:
            self._server_count = len(server_guids)
            self._next_reconcile = started + timedelta(seconds=self.settings.reconcile_interval)
        objects, listed = self._list_bucket(server_guids, started)
        if caught_up and self._given_up:
            self._requeue_given_up(objects, started)
        todo, settled = self._plan(objects, server_guids)
        unarchived = self._unarchived(objects, todo)
        self.catalogue.record_batch(BatchRow(
            host_name=self.host_name, findneighbour_server_url=self.target.server_url,
            oci_namespace=self.target.namespace, bucket_name=self.target.bucket, check_time=started,
            objects_listed=listed, batch_size=len(todo), number_in_server=self._server_count,
            reconciled=int(reconcile)))
        for number, (obj, outcome, reason) in enumerate(settled):
            if number % 1000 == 999:  # a first look at a big bucket settles many: keep the queue bounded
                self.catalogue.wait_until_below(1000, self.stop)
            if outcome in LOADED:
                reason = self._archive(obj)
            self._record(obj, outcome, started, "ok" if outcome == IN_SERVER else outcome, reason)
        loaded, failed, retried, paused = self._load(todo, started)
        self._archive_again(unarchived)
        summary = CycleSummary(listed, len(todo), loaded, failed, retried, paused)
        # rows are written a moment after they are made: only rows the database does not take now are news
        unwritten = 0 if self.catalogue.flush(WRITE_BATCH_DELAY) else self.catalogue.unwritten
        log.info("cycle %d: %d FASTA objects, %d settled without loading, %d to load: %d loaded, "
                 "%d failed, %d to retry%s%s", self.cycles + 1, listed,
                 len(settled), len(todo), loaded, failed, retried, f", paused: {self.pause_reason}" if paused else "",
                 f"; {unwritten} catalogue rows waiting to be written" if unwritten else "", extra={"fields": {
                     "event": "cycle", "cycle": self.cycles + 1, "seconds": (self.clock() - started).total_seconds(),
                     "settled": len(settled), "unwritten": unwritten, **dataclasses.asdict(summary)}})
        return summary

    def _active(self) -> bool:
        """Return True if this instance may load: it holds the lease, or runs without one.

        A new term begins with a full comparison with fn4, which holds what the previous active
        instance loaded. Called before every insert: the monotonic check costs no database call.
        """
        if self.lease is None:
            return True
        if self.lease.active:
            if self._term != self.lease.terms:
                if self._term is None:
                    log.info("loading: this instance holds the lease; comparing the catalogue with fn4 first")
                self._term, self._next_reconcile = self.lease.terms, None
                self.metrics.set_active(True)
            return True
        if self._term is not None:
            log.warning("standby: stopped inserting, as the lease could not be renewed in time or was lost")
            self._term = None
            self.metrics.set_active(False)
        if self.lease.last_contact is not None and self.lease.clock() - self.lease.last_contact < self.lease.ttl:
            self.metrics.progressed(self.clock())  # a standby in touch with the catalogue is healthy
        return False

    def _record_abandoned(self, exc: Exception, wait: float) -> None:
        """Log why the cycle was abandoned (from inside its except block), write a batch row that says it,
        and count it; the next try comes in ``wait`` seconds."""
        if isinstance(exc, OutageError):
            log.warning("cycle abandoned: %s; next try in %.0f s", exc, wait)
        else:
            log.exception("cycle failed unexpectedly; next try in %.0f s", wait)
        service = exc.service if isinstance(exc, OutageError) else "loader"
        reason = str(exc) if isinstance(exc, OutageError) else f"unexpected error: {_short(exc)}"
        self.catalogue.record_batch(BatchRow(
            host_name=self.host_name, findneighbour_server_url=self.target.server_url,
            oci_namespace=self.target.namespace, bucket_name=self.target.bucket, check_time=self.clock(),
            abandon_reason=reason[:2000] or type(exc).__name__))
        self.metrics.cycle_abandoned(service)

    def _seed_last_success(self) -> None:
        """Start the last-success metric from the catalogue, so a restart does not reset it to 0."""
        try:
            last = self.catalogue.last_success(self.target)
        except sa.exc.SQLAlchemyError as exc:
            log.warning("could not read the last success from the catalogue (%s)", _short(exc))
            return
        if last is not None:
            self.metrics.seed_last_success(last)

    def warn_of_waiting_archive(self) -> list[str]:
        """Log a WARNING naming FASTA objects under the archive prefix that this loader did not put there.

        They are never listed, so never loaded. Looks at up to ARCHIVE_CHECK_LIMIT of them; returns their names.
        """
        archive = self.settings.archive_prefix
        if not archive:
            return []
        self._refresh_from_catalogue()
        loaded = {name for (name, _), state in self._files.items() if state.outcome in LOADED}
        waiting, seen = [], 0
        try:
            for obj in self.store.list_objects(archive):
                seen += 1
                if (name := obj.name[len(archive):]) not in loaded and not self._files.loaded_by_name(name):
                    waiting.append(obj.name)
                if seen >= ARCHIVE_CHECK_LIMIT:
                    break
        except OutageError as exc:
            log.warning("could not look under the archive prefix %r: %s", archive, exc)
            return []
        if waiting:
            log.warning("%d FASTA objects%s wait under the archive prefix %r of --on-success and will never be "
                        "loaded; move them out of it, e.g. %s", len(waiting),
                        f" (of the first {seen} there)" if seen >= ARCHIVE_CHECK_LIMIT else "", archive,
                        ", ".join(waiting[:5]))
        return waiting

    def _prune_if_due(self) -> None:
        """Remove rows older than --retention-days, at most once a day (RETENTION_INTERVAL)."""
        now = self.clock()
        if not self.settings.retention_days or (self._next_prune and now < self._next_prune):
            return
        try:
            removed = self.catalogue.prune(self.target, now - timedelta(days=self.settings.retention_days))
        except sa.exc.SQLAlchemyError as exc:
            log.warning("could not remove old catalogue rows (%s); trying again in an hour", _short(exc))
            self._next_prune = now + timedelta(hours=1)
            return
        self._next_prune = now + timedelta(seconds=RETENTION_INTERVAL)
        log.info("removed %d batch rows and %d attempt rows older than %d days", *removed,
                 self.settings.retention_days)

    # -- working out what to load --

    def _list_bucket(self, server_guids: GuidSet | None, started: datetime) -> tuple[list[StoredObject], int]:
        """List the bucket; return the objects that may need work, oldest first, and the FASTA count.

        Files loaded in an earlier cycle are counted as their pages arrive and not kept, unless
        --on-success must still move them or fn4's guid list lacks them. When one of them holds the
        guid of a kept object, the bucket is listed again keeping everything, so _plan sees both
        (which is older decides which is the duplicate): rare, as duplicates are. When more than
        SETTLE_WHILE_LISTING unknown files are in fn4 (a first cycle against a full fn4), see
        _settle_while_listing.
        """
        listing = self._list(None) if self.settings.on_success != "keep" else self._list_new(server_guids, started)
        self._boundaries = split_points(listing.pages, self.settings.list_workers * RANGES_PER_WORKER)
        return sorted(listing.objects, key=lambda o: (o.time_created, o.name)), listing.listed

    def _list_new(self, server_guids: GuidSet | None, started: datetime) -> Listing:
        """List the bucket keeping only what may need work (see _list_bucket); the rest is counted."""
        skipped, in_server = array("q"), array("q")  # guid hashes: loaded earlier; unknown, in fn4, not kept
        unknown_in_server = 0

        def keep(entry: dict[str, Any]) -> bool:
            nonlocal unknown_in_server
            state = self._files.get((entry["name"], entry.get("etag") or ""))
            if state is not None and not state.loaded:
                return True
            guid = guid_from_name(entry["name"])
            if server_guids is not None and guid not in server_guids:
                return True
            if state is not None:
                skipped.append(hash(guid))
                return False
            if server_guids is None or guid_problem(guid):
                return True
            unknown_in_server += 1
            if unknown_in_server <= SETTLE_WHILE_LISTING:
                return True
            in_server.append(hash(guid))
            return False
        listing = self._list(keep)
        if in_server:
            shared = _repeated(itertools.chain(skipped, in_server, (hash(o.guid) for o in listing.objects)))
            listing = self._settle_while_listing(server_guids, shared, started)
        elif skipped and (held := {hash(obj.guid) for obj in listing.objects}) and any(
                guid in held for guid in skipped):
            log.info("a file loaded earlier shares its guid with a new file: listing again in full")
            listing = self._list(None)
        return listing

    def _settle_while_listing(self, server_guids: GuidSet, shared: set[int], started: datetime) -> Listing:
        """List again, recording each unknown file fn4 already holds as in_server as its page arrives.

        Memory stays bounded however many there are (a first cycle against an fn4 holding millions):
        only files whose guid another listed file shares (``shared``: _plan decides between them),
        and files that may need loading, are kept.
        """
        lock = threading.Lock()
        settled = 0

        def keep(entry: dict[str, Any]) -> bool:
            nonlocal settled
            guid = guid_from_name(entry["name"])
            state = self._files.get((entry["name"], entry.get("etag") or ""))
            if hash(guid) in shared or guid not in server_guids or (state is not None and not state.loaded):
                return True
            if state is None:
                if guid_problem(guid):
                    return True
                with lock:  # one listing thread records at a time
                    self._record(_stored_object(entry), IN_SERVER, started, "ok")
                    settled += 1
                    if settled % 1000 == 0:
                        self.catalogue.wait_until_below(1000, self.stop)
            return False
        listing = self._list(keep)
        log.info("%d files fn4 already holds recorded in_server as they were listed", settled)
        return listing

    def _list(self, keep: Callable[[dict[str, Any]], bool] | None) -> Listing:
        """List every key range but the archive prefix's, concurrently, split where the last listing's pages began.

        After a restart, the split is where the catalogue's file names put it (see _refresh_from_catalogue).
        With nothing learnt (an empty catalogue), one page of each range is listed first: a bucket
        bigger than that is then split at FIRST_LISTING_SPLITS.
        """
        prefix, archive, workers = self.settings.prefix, self.settings.archive_prefix, self.settings.list_workers
        boundaries = self._boundaries
        if not boundaries and workers > 1:
            probe = self.store.list_ranges(key_ranges(prefix, archive), prefix, workers, None, max_pages=1,
                                           stop=self.stop)
            if probe.next_start is None:  # that was the whole bucket: filter it as if listed so
                kept = [obj for obj in probe.objects if keep is None or keep(_listing_entry(obj))]
                return dataclasses.replace(probe, objects=kept)
            boundaries = [(prefix or "") + split for split in FIRST_LISTING_SPLITS]
        return self.store.list_ranges(key_ranges(prefix, archive, boundaries), prefix, workers, keep, stop=self.stop)

    def _refresh_from_catalogue(self) -> bool:
        """Fold rows written since the last look (by us or by a requeue) into the file states.

        Returns True if the catalogue was read up to our own latest row.
        """
        if self.catalogue.unwritten:
            if not self._files:  # at start: rows replayed from the journal are the newest known
                for row in self.catalogue.pending_attempts():
                    if Target(row["findneighbour_server_url"], row["oci_namespace"], row["bucket_name"]) == self.target:
                        self._files[(row["file_name"], row["object_etag"])] = FileState.of(
                            row["completed"], row["outcome"], row["failed_attempts"])
            return False  # our own rows are not all in yet; the in-memory state is newer
        # our own rows written since the last look (a migration cycle writes millions): held already, not read back
        self._last_row_id = self.catalogue.rows_held_after(self._last_row_id)
        prefix, ranges = self.settings.prefix or "", self.settings.list_workers * RANGES_PER_WORKER
        names = NameSample() if not self._boundaries and ranges > RANGES_PER_WORKER else None
        try:
            for row_id, name, etag, completed, outcome, attempts, when in self.catalogue.file_states(
                    self.target, self._last_row_id):
                self._files[(name, etag)] = FileState.of(completed, outcome, attempts)
                if outcome == GAVE_UP:
                    rounds = self._given_up.get((name, etag), (0, None))[0]
                    self._given_up[(name, etag)] = (rounds + 1, _aware(when) or _EPOCH)
                if names is not None and name.startswith(prefix):
                    names.add(name)
                self._last_row_id = row_id
        except sa.exc.SQLAlchemyError as exc:
            log.warning("could not read the catalogue (%s); using what is known", _short(exc))
            return False
        if names is not None:  # nothing listed yet (a restart): split the first listing where the catalogue's names do
            self._boundaries = split_points(names.pages(), ranges)
        return True

    def _requeue_given_up(self, objects: list[StoredObject], started: datetime) -> None:
        """Re-queue listed files given up AUTO_RETRY_INTERVAL ago or more, at most AUTO_RETRY_ROUNDS times each.

        A file given up during an incident of fn4 or Object Storage then loads without an operator.
        Files that failed for good (failed, duplicate, vanished) are never re-queued automatically.
        Called only when the catalogue is read up to our own rows, so the counts and times are current.
        """
        due = {key: rounds for key, (rounds, when) in self._given_up.items()
               if rounds <= AUTO_RETRY_ROUNDS and (started - when).total_seconds() >= AUTO_RETRY_INTERVAL
               and (state := self._files.get(key, FileState())).completed and state.outcome == GAVE_UP}
        for obj in objects if due else ():
            if (rounds := due.get(obj.key)) is not None:
                self._record(obj, REQUEUED, started, None, f"requeued automatically {AUTO_RETRY_INTERVAL // 3600} h "
                             f"after gave_up: automatic retry {rounds} of {AUTO_RETRY_ROUNDS}", failed_attempts=0)

    def _plan(self, objects: list[StoredObject], server_guids: GuidSet | None
              ) -> tuple[list[StoredObject], list[tuple[StoredObject, str, str]]]:
        """Split listed objects into those to load and those settled without loading.

        Settled ones are returned with their outcome (in_server, duplicate, failed) and reason.
        """
        candidates, settled = sort_out(objects, self._files, server_guids)
        if server_guids is None and len(candidates) > EXISTS_CHECK_LIMIT:
            server_guids = self.fn4.guid_set()
            self._server_count = len(server_guids)
        todo = []
        for obj in candidates:
            present = obj.guid in server_guids if server_guids is not None else self.fn4.exists(obj.guid)
            if present:
                settled.append((obj, IN_SERVER, None))
            else:
                todo.append(obj)
        return todo, settled

    def _unarchived(self, objects: list[StoredObject], todo: list[StoredObject]) -> list[StoredObject]:
        """Return listed objects loaded in an earlier cycle that --on-success has not yet moved away."""
        if self.settings.on_success == "keep":
            return []
        again = {obj.key for obj in todo}
        return [obj for obj in objects if obj.key not in again
                and (state := self._files.get(obj.key)) and state.loaded]

    def _archive(self, obj: StoredObject) -> str | None:
        """Move or delete a file just loaded, as --on-success says; return why that failed, for its row, or None.

        A step of its own, before the file's row is recorded so that the row can say why; objects it
        leaves behind are archived again in later cycles (see _unarchived).
        """
        if self.settings.on_success == "keep" or not (problem := self.store.archive(obj, self.settings.on_success)):
            return None
        return f"loaded; --on-success {self.settings.on_success} failed: {problem}"

    def _archive_again(self, objects: list[StoredObject]) -> None:
        """Archive objects whose archiving failed before, or that were loaded before --on-success was set."""
        for obj in objects:
            if self.stop.is_set():
                return
            if problem := self.store.archive(obj, self.settings.on_success):
                level = logging.DEBUG if obj.key in self._archive_failed else logging.WARNING
                self._archive_failed.add(obj.key)
                log.log(level, "%s is loaded but --on-success %s failed again: %s", obj.name,
                        self.settings.on_success, problem)
            else:
                log.info("%s, loaded earlier, is now archived (--on-success %s)", obj.name, self.settings.on_success)

    # -- loading --

    def _load(self, todo: list[StoredObject], started: datetime) -> tuple[int, int, int, bool]:
        """Insert each prepared sample while the next ones download; return counts and paused."""
        self.metrics.set_backlog(len(todo))
        if not todo:
            return 0, 0, 0, False
        prepared: queue.Queue[Any] = queue.Queue(maxsize=PREFETCH_DEPTH)
        abandon = threading.Event()
        # While the prefetcher runs Python code, fn4's answer waits for the GIL up to the switch
        # interval (5 ms by default): a fifth of a SARS-CoV-2 insert. Shorten it during the batch.
        switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(GIL_SWITCH_INTERVAL)
        producer = threading.Thread(target=self._prefetch, args=(todo, prepared, abandon),
                                    name="prefetch", daemon=True)
        try:  # whatever happens in the batch, the prefetcher ends and the switch interval is put back
            producer.start()
            return self._insert_each(todo, started, prepared)
        finally:
            self._end_prefetch(producer, prepared, abandon)
            sys.setswitchinterval(switch_interval)

    def _insert_each(self, todo: list[StoredObject], started: datetime, prepared: queue.Queue[Any]
                     ) -> tuple[int, int, int, bool]:
        """Insert samples as the prefetcher hands them over, until the end, a stop or an outage.

        A sample's row is recorded (and the file archived) once the next sample's insert is on its way,
        so that fn4 never waits for that bookkeeping; the last one's when the batch ends, however it ends.
        """
        counts = {"loaded": 0, "failed": 0, "retried": 0}
        number = 0
        paused = False
        answered: InsertTry | None = None

        def finish() -> None:  # record the last sample answered, once
            nonlocal answered
            if answered is not None:
                last, answered = answered, None
                self._tally(self._finish(last, started), counts, len(todo))

        try:
            while (item := prepared.get()) is not _END:
                number += 1
                if self.catalogue.unwritten >= MAX_UNWRITTEN_ROWS:
                    finish()  # its row journaled before inserting waits for the catalogue
                self.catalogue.wait_until_below(MAX_UNWRITTEN_ROWS, self.stop)
                if self.stop.is_set() or not self._active():
                    break  # the sample was never sent: nothing to record, it stays pending
                sending = self._send(item)
                prepared.task_done()  # the prefetcher may start on the next sample: fn4 has this one
                finish()
                answered = self._answer(item, sending, number, len(todo))
                if paused := answered.pauses:
                    break
        finally:
            finish()
        return counts["loaded"], counts["failed"], counts["retried"], paused

    def _tally(self, outcome: str, counts: dict[str, int], size: int) -> None:
        """Count a recorded outcome: loaded, failed or retried (a pause counts as none)."""
        if outcome in LOADED:
            counts["loaded"] += 1
        elif outcome == RETRY:
            counts["retried"] += 1
        elif outcome not in (SERVER_UNAVAILABLE, SERVER_BUSY):
            counts["failed"] += 1
        self.metrics.set_backlog(size - counts["loaded"] - counts["failed"])  # files to retry stay pending

    def _end_prefetch(self, producer: threading.Thread, prepared: queue.Queue[Any], abandon: threading.Event) -> None:
        """Tell the prefetcher to stop and join it, bounded; a download in flight ends it a little later."""
        with prepared.all_tasks_done:
            abandon.set()
            prepared.all_tasks_done.notify_all()
        if producer.ident is not None:
            producer.join(PREFETCH_JOIN_TIMEOUT)
        if producer.is_alive():
            log.debug("the prefetcher is still reading a sample; it ends when the read does")

    def _prefetch(self, todo: list[StoredObject], prepared: queue.Queue[Any],
                  abandon: threading.Event) -> None:
        """Download and parse samples ahead of the inserter, at most PREFETCH_DEPTH of them.

        The next sample is prepared only once the inserter has taken the last one, so memory holds
        at most the sample being inserted and PREFETCH_DEPTH more; with D <= L it is ready in time.
        """
        try:
            for obj in todo:
                if abandon.is_set() or self.stop.is_set():
                    break
                prepared.put(self._prepare(obj))  # the queue is empty here: this never blocks
                with prepared.all_tasks_done:  # wait until the inserter takes it, or abandons the batch
                    while prepared.unfinished_tasks and not abandon.is_set():
                        prepared.all_tasks_done.wait()
        finally:
            if not abandon.is_set():  # an abandoning inserter reads no more, and a full queue would block
                prepared.put(_END)

    def _prepare(self, obj: StoredObject) -> Prepared:
        """Download, parse and validate one object; failures become part of the result."""
        read_start = self.clock()
        sample: Sample | None = None
        error: LoaderError | None = None
        try:
            began = time.monotonic()
            content = self.store.read_object(obj, self.settings.max_object_bytes)
            downloaded = time.monotonic()
            seqid, seq = parse_fasta(content)
            del content  # the downloaded text is freed as soon as it is parsed (peak memory)
            if log.isEnabledFor(logging.DEBUG):  # its arguments cost more than the check, once a sample
                log.debug("read %s: %d bytes downloaded in %.0f ms, parsed in %.0f ms: %d bases", obj.name,
                          obj.size, (downloaded - began) * 1000, (time.monotonic() - downloaded) * 1000, len(seq))
            expected = self.settings.expected_length
            if expected and len(seq) != expected:
                raise SampleError("wrong_length", f"sequence is {len(seq)} bases; the reference "
                                                  f"(--expected-length) is {expected}")
            sample = Sample(obj, seqid, len(seq), seq[:128].decode("ascii"), FN4Client.insert_form(obj.guid, seq))
        except LoaderError as exc:
            error = exc
        except Exception as exc:  # one file's unforeseen fault must not stop the queue
            log.exception("unexpected error reading %s", obj.name)
            error = TransientError(f"unexpected error: {_short(exc)}")
        return Prepared(obj, sample, error, read_start, self.clock())

    def _send(self, item: Prepared) -> tuple[datetime, InsertSent] | None:
        """Send a prepared sample's insert; return when, and what to read the answer by (None: nothing to send)."""
        if item.sample is None:
            return None
        return self.clock(), self.fn4.send_insert(item.sample.form)

    def _answer(self, item: Prepared, sending: tuple[datetime, InsertSent] | None, number: int, size: int
                ) -> InsertTry:
        """Read fn4's answer to a sample's insert and judge it: the file's turn, to be recorded by _finish."""
        if sending is None:
            return InsertTry(item, number, size)
        insert_start, sent = sending
        result = self.fn4.insert_answer(sent)
        insert_end = self.clock()
        if log.isEnabledFor(logging.DEBUG):
            log.debug("insert %s (%s): %d bytes sent, fn4 answered %s in %s ms", item.obj.guid, item.obj.name,
                      len(sent.body), result.status_code or "nothing", _ms(insert_start, insert_end))
        if result.outcome == INSERTED:
            self._server_count += 1
        # A 500 counts against the file only if fn4's database answers; anything else only if fn4 is up.
        if result.outcome == RETRY and not (self.fn4.database_answers(item.obj.guid) if result.status_code == 500
                                            else self.fn4.is_up()):
            result = dataclasses.replace(result, outcome=SERVER_UNAVAILABLE)
        # The turn waits for its row while the next sample is prepared: it keeps no copy of the body sent.
        sample = dataclasses.replace(item.sample, form=b"") if item.sample else None
        return InsertTry(dataclasses.replace(item, sample=sample), number, size, insert_start, insert_end, result)

    def _finish(self, tried: InsertTry, started: datetime) -> str:
        """Record a file's turn (see _answer), archiving it if loaded; return the outcome."""
        obj, error, result = tried.item.obj, tried.item.error, tried.result
        if result is None:
            if isinstance(error, SampleError):
                return self._record(obj, FAILED, started, error.status, error.reason, tried=tried)
            if isinstance(error, ObjectChanged):
                return self._record(obj, VANISHED, started, "vanished", str(error), tried=tried)
            return self._record_retry(obj, str(error), started, "download_failed", tried)
        if result.outcome == RETRY:
            return self._record_retry(obj, f"fn4 answered: {result.message}", started, "ok", tried)
        text = None if result.outcome in LOADED else f"fn4 answered {result.status_code}: {result.message}"
        if result.outcome in (SERVER_UNAVAILABLE, SERVER_BUSY):
            text = (f"fn4 {'busy' if result.outcome == SERVER_BUSY else 'unavailable'} "
                    f"({result.status_code or 'no answer'}): {result.message}; the batch pauses"
                    f"{f' {result.retry_after:.0f} s, as fn4 asked,' if result.retry_after else ''} "
                    "and the file is retried")
            self.pause_reason, self._retry_after = text, result.retry_after
        if result.outcome in LOADED:
            text = self._archive(obj)
        return self._record(obj, result.outcome, started, result.parse_status, text, tried=tried)

    def _record_retry(self, obj: StoredObject, reason: str, started: datetime, parse_status: str,
                      tried: InsertTry) -> str:
        """Record a file-specific transient failure, giving the file up after --max-attempts."""
        attempts = self._files.get(obj.key, FileState()).failed_attempts + 1
        if gave_up := attempts >= self.settings.max_attempts:
            text = f"gave up after {attempts} failed attempts; last: {reason}"
        else:
            text = f"attempt {attempts} of {self.settings.max_attempts} failed: {reason}"
        return self._record(obj, GAVE_UP if gave_up else RETRY, started, parse_status, text,
                            failed_attempts=attempts, tried=tried)

    def _record(self, obj: StoredObject, outcome: str, started: datetime | None, parse_status: str | None,
                error_text: str | None = None, failed_attempts: int | None = None,
                tried: InsertTry | None = None) -> str:
        """Queue the attempt row for one file, update its known state, log it; return the outcome.

        ``failed_attempts`` is kept from the file's last state unless given.
        """
        if failed_attempts is None:
            failed_attempts = self._files.get(obj.key, FileState()).failed_attempts
        state = FileState.of(outcome not in UNFINISHED, outcome, failed_attempts)
        if error_text:  # fn4's answers and errors may quote a secret
            error_text = redact(error_text, _SECRETS)[:2000]
        row = attempt_row(self.target, self.host_name, obj, state, started, parse_status, error_text, tried)
        self.catalogue.record_attempt(row)
        self._files[obj.key] = state
        self.metrics.record(outcome, row.insert_start_time, row.insert_end_time)
        level = logging.INFO if outcome in LOADED | {SERVER_UNAVAILABLE, SERVER_BUSY, REQUEUED} else logging.WARNING
        fields = {"event": "sample", "guid": obj.guid, "file_name": obj.name, "outcome": outcome, "bytes": obj.size,
                  "read_ms": _ms(row.bucket_read_start_time, row.bucket_read_end_time),
                  "insert_ms": _ms(row.insert_start_time, row.insert_end_time),
                  "status": row.insert_status_code, "error": row.error_text}
        log.log(level, "%s %s: %s, %s bytes, read %s ms, insert %s ms, status %s%s", outcome, obj.guid, obj.name,
                obj.size,
                *("-" if fields[k] is None else fields[k] for k in ("read_ms", "insert_ms", "status")),
                f" ({row.error_text})" if row.error_text else "", extra={"fields": fields})
        return outcome


def _ms(start: datetime | None, end: datetime | None) -> int | None:
    return None if start is None or end is None else round((end - start).total_seconds() * 1000)


# ==== Operator shell ===================================================================
# The status report, the metrics and health server, logging set-up, signals and the command line.
# They build on the core above; the core never refers to them.


# ---- Status report ---------------------------------------------------------------------------


def assess(status: LoaderReport, now: datetime, poll_interval: float, critical_share: float,
           server_heartbeat: datetime | None = None) -> LoaderReport:
    """Return the status with its level and problems, for what is wrong now (the rules: the status command's help).

    ``server_heartbeat``: the latest write of any loader of the same fn4 server, whose host may have taken over.
    """
    problems = _staleness(status.heartbeat, now, poll_interval, server_heartbeat)
    window = f"the last {STATUS_WINDOW.total_seconds() / 60:g} minutes"
    if status.abandoned:
        since = status.abandoned_since or status.last_batch
        problems.append((2, f"{status.abandoned} (since {_when(since)} UTC: "
                            f"{status.abandoned_cycles or 1} cycle(s) abandoned)"))
    elif status.paused:
        problems.append((2, f"the latest cycle paused: {status.paused}"))
    recent = status.recent_files
    failures = sum(recent.get(o, 0) for o in LOADER_FAILURES)
    loaded = sum(recent.get(o, 0) for o in LOADED)
    if failures:
        share = failures / (failures + loaded)
        problems.append((2 if share > critical_share else 1,
                         f"{failures} of {failures + loaded} files tried in {window} failed for reasons of fn4, "
                         "Object Storage or the loader (latest outcome retry, gave_up or server_unavailable)"))
    if retries := status.outcomes.get(RETRY, 0):
        problems.append((1, f"{retries} attempts to retry in {window} (fn4 errors, timeouts, failed downloads)"))
    if status.failed_files:
        problems.append((1, f"{len(status.failed_files)} files failed for good (latest outcome "
                            f"{', '.join(sorted(FAILED_FOR_GOOD))}); retry-failed re-queues them"))
    if busy := status.outcomes.get(SERVER_BUSY, 0):
        problems.append((0, f"fn4 asked the loader to wait {busy} time(s) in {window} (insert lock held, 429, "
                            "408): contention, which the loader waits out"))
    return dataclasses.replace(status, level=max((level for level, _ in problems), default=0),
                               problems=tuple(f"{LEVELS[level]}: {text}" for level, text in problems))


def _staleness(heartbeat: datetime | None, now: datetime, poll_interval: float,
               server_heartbeat: datetime | None) -> list[tuple[int, str]]:
    """Return the problem of a loader that has written nothing for STALE_POLLS poll intervals, if it has."""
    if heartbeat is not None and (now - heartbeat).total_seconds() <= STALE_POLLS * poll_interval:
        return []
    ago = f"since {heartbeat:%Y-%m-%d %H:%M:%S} UTC" if heartbeat else "ever"
    if server_heartbeat and (now - server_heartbeat).total_seconds() <= STALE_POLLS * poll_interval:
        return [(0, f"no batch and no attempt {ago}, but another host loads this fn4 server now")]
    return [(2, f"no batch and no attempt {ago}: more than {STALE_POLLS} poll intervals")]


def assess_instances(instances: list[dict[str, Any]]) -> list[tuple[int, str]]:
    """Return (level, problem) for each lease no instance holds: critical; see LoadLogger.instances."""
    problems = []
    for key in dict.fromkeys(i["lease_key"] for i in instances):
        mine = [i for i in instances if i["lease_key"] == key]
        where = f"{mine[0]['server_url']} <- {mine[0]['namespace']}/{mine[0]['bucket']}"
        holder = next((i for i in mine if i["role"] == "active"), None)
        if holder is None:
            problems.append((2, f"no instance holds the lease of {where}: {len(mine)} standing by"))
        elif holder["lapsed"]:
            problems.append((2, f"no instance holds the lease of {where}: {holder['host_name']} (pid "
                                f"{holder['process_id']}) stopped renewing it, lapsed at "
                                f"{holder['expires']:%Y-%m-%d %H:%M:%S} UTC, and no standby took over"))
    return problems


# ---- Metrics and health ----------------------------------------------------------------------


class Metrics(LoaderObserver):
    """The loader's Prometheus metrics and its health, served by ``serve`` on /metrics and /healthz.

    Healthy means the loop made progress (finished a cycle or a file) within ``max_age`` seconds.
    """

    def __init__(self, clock: Callable[[], datetime] = utcnow, max_age: float = STALE_POLLS * DEFAULT_POLL_INTERVAL
                 ) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        self.registry = CollectorRegistry()
        self.attempts = Counter("fn4loader_attempts", "Attempt rows recorded, by outcome; a cycle abandoned "
                                "because fn4 or Object Storage was unavailable counts as server_unavailable",
                                ["outcome"], registry=self.registry)
        self.insert_seconds = Histogram("fn4loader_insert_seconds", "Seconds fn4 took to answer an insert",
                                        buckets=INSERT_SECONDS_BUCKETS, registry=self.registry)
        self.backlog = Gauge("fn4loader_backlog", "Files pending: listed, neither loaded nor failed for good",
                             registry=self.registry)
        self.last_success = Gauge("fn4loader_last_success_timestamp_seconds",
                                  "Unix time of the last insert fn4 accepted", registry=self.registry)
        self.cycles = Counter("fn4loader_cycles", "Cycles completed", registry=self.registry)
        self.active = Gauge("fn4loader_active", "1 while this instance holds the lease and loads, 0 while it "
                            "stands by", registry=self.registry)
        self.abandoned = Counter("fn4loader_cycles_abandoned", "Cycles abandoned, by the service that was "
                                 "unavailable (loader: an unexpected error)", ["service"], registry=self.registry)
        for outcome in sorted(LOADED | UNFINISHED | REQUEUEABLE | {VANISHED}):  # every series exists from the start
            self.attempts.labels(outcome)
        for service in ABANDON_SERVICES:
            self.abandoned.labels(service)
        self.clock = clock
        self.max_age = max_age
        self.last_progress = clock()
        self.completed_cycles = 0

    def record(self, outcome: str, insert_start: datetime | None, insert_end: datetime | None) -> None:
        self.attempts.labels(outcome).inc()
        if insert_start and insert_end:
            self.insert_seconds.observe((insert_end - insert_start).total_seconds())
            if outcome in (INSERTED, ALREADY_PRESENT):
                self.last_success.set(insert_end.timestamp())
        self.last_progress = self.clock()

    def cycle_abandoned(self, service: str) -> None:
        self.abandoned.labels(service).inc()
        if service != "loader":
            self.attempts.labels(SERVER_UNAVAILABLE).inc()

    def cycle_done(self) -> None:
        self.cycles.inc()
        self.completed_cycles += 1
        self.last_progress = self.clock()

    def set_backlog(self, files: int) -> None:
        self.backlog.set(files)

    def set_active(self, active: bool) -> None:
        self.active.set(1 if active else 0)

    def progressed(self, moment: datetime) -> None:
        self.last_progress = moment

    def seed_last_success(self, moment: datetime) -> None:
        self.last_success.set(moment.timestamp())

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Return (healthy, details) for /healthz."""
        idle = (self.clock() - self.last_progress).total_seconds()
        return idle <= self.max_age, {"healthy": idle <= self.max_age, "seconds_since_progress": round(idle, 1),
                                      "max_age": self.max_age, "cycles": self.completed_cycles}

    def serve(self, host: str, port: int) -> MetricsServer:
        """Serve /metrics and /healthz from daemon threads; return the server, stopped by close. Raises ConfigError."""
        try:
            server = MetricsServer((host, port), self)
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on {host or '*'}:{port}: {exc.strerror}; "
                              "choose another --metrics-port") from None
        server.serving.start()
        return server


class _MetricsHandler(http.server.BaseHTTPRequestHandler):
    """Answer one request for /metrics or /healthz from the server's Metrics."""

    timeout = METRICS_TIMEOUT
    server: MetricsServer

    def setup(self) -> None:
        super().setup()
        self.rfile = io.BufferedReader(_ReadBefore(self.connection, time.monotonic() + METRICS_TIMEOUT))

    def do_GET(self) -> None:  # noqa: N802 (the http.server name)
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        self.connection.settimeout(METRICS_TIMEOUT)  # the client has as long again to read the answer
        metrics = self.server.metrics
        path = self.path.split("?")[0]
        if path == "/metrics":
            code, kind, body = 200, CONTENT_TYPE_LATEST, generate_latest(metrics.registry)
        elif path == "/healthz":
            healthy, details = metrics.health()
            code, kind, body = 200 if healthy else 503, "application/json", json.dumps(details).encode()
        else:
            code, kind, body = 404, "text/plain", b"try /metrics or /healthz\n"
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: Any) -> None:
        pass


class _ReadBefore(io.RawIOBase):
    """A socket's reads, all of them before one deadline: a client that sends its request a byte at a
    time cannot hold a metrics worker longer than one sending nothing (TimeoutError at the deadline)."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        super().__init__()
        self._sock, self._deadline = sock, deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the client did not send its request in time")
        self._sock.settimeout(left)
        return self._sock.recv_into(buffer)


class MetricsServer(http.server.HTTPServer):
    """The metrics port: METRICS_WORKERS threads answer, one request per connection.

    A client has METRICS_TIMEOUT seconds to send its request. Clients beyond the workers wait in the
    listen backlog, in the kernel: a flood of idle connections costs the loader no descriptors and
    no threads. A client that goes away early is logged at DEBUG only.
    """

    request_queue_size = METRICS_BACKLOG

    def __init__(self, address: tuple[str, int], metrics: Metrics) -> None:
        super().__init__(address, _MetricsHandler)
        self.metrics = metrics
        self.accepted: queue.Queue[Any] = queue.Queue(maxsize=METRICS_WORKERS)
        self.closing = threading.Event()
        self.workers = [threading.Thread(target=self.work, name=f"metrics-{n}", daemon=True)
                        for n in range(METRICS_WORKERS)]
        for worker in self.workers:
            worker.start()
        self.serving = threading.Thread(target=self.serve_forever, name="metrics", daemon=True)

    def process_request(self, request: Any, client_address: Any) -> None:
        # Waits while every worker is busy, so that further clients wait in the backlog.
        while not self.closing.is_set():
            try:
                self.accepted.put((request, client_address), timeout=0.5)
                return
            except queue.Full:
                continue
        self.shutdown_request(request)

    def work(self) -> None:
        while not self.closing.is_set() and (item := self.accepted.get()) is not None:
            try:
                self.finish_request(*item)
            except Exception:
                self.handle_error(*item)
            finally:
                self.shutdown_request(item[0])

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("metrics client %s: %s", client_address[0], _short(sys.exc_info()[1] or Exception()))

    def shutdown(self) -> None:
        self.closing.set()
        super().shutdown()
        for _ in self.workers:
            with contextlib.suppress(queue.Full):
                self.accepted.put_nowait(None)

    def close(self) -> None:
        """Stop answering, join the server's threads (THREAD_JOIN_TIMEOUT in all), close the port."""
        self.shutdown()
        deadline = time.monotonic() + THREAD_JOIN_TIMEOUT
        for thread in (self.serving, *self.workers):
            thread.join(max(deadline - time.monotonic(), 0))
            if thread.is_alive():
                log.warning("metrics: thread %s still answers a client; left behind", thread.name)
        self.server_close()


# ---- Command line ----------------------------------------------------------------------------


class _RedactingFilter(logging.Filter):
    """Replace secrets in every log record's final message and structured fields."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self.secrets = secrets

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message, self.secrets)
        if cleaned != message or record.exc_info:
            if record.exc_info:
                cleaned += "\n" + redact(logging.Formatter().formatException(record.exc_info), self.secrets)
                record.exc_info = None
            record.msg, record.args = cleaned, None
        if isinstance(fields := getattr(record, "fields", None), dict):  # JSON logs show these too
            record.fields = {k: redact(v, self.secrets) if isinstance(v, str) else v for k, v in fields.items()}
        return True


class _JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and a record's ``fields`` (for log shippers)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
                 "level": record.levelname, "logger": record.name, "message": record.getMessage(),
                 **getattr(record, "fields", {})}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


_LOG_HANDLER = "fn4loader"  # the name of the one handler _configure_logging installs (and replaces)


def _configure_logging(level: str, secrets: list[str], log_format: str = "text") -> None:
    """Log to stderr through one handler of ours that redacts secrets; other handlers stay."""
    handler = logging.StreamHandler()  # sys.stderr
    handler.set_name(_LOG_HANDLER)
    handler.setFormatter(_JsonFormatter() if log_format == "json"
                         else logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    handler.addFilter(_RedactingFilter(secrets))
    root = logging.getLogger()
    root.handlers[:] = [h for h in root.handlers if h.get_name() != _LOG_HANDLER] + [handler]
    root.setLevel(level.upper())
    for noisy in ("oci", "urllib3", "sqlalchemy", "alembic"):
        logging.getLogger(noisy).setLevel(max(root.level, logging.WARNING))
    if log_format == "json":  # so that every line on stderr is JSON: warnings and tracebacks go through logging
        logging.captureWarnings(True)
        sys.excepthook = lambda kind, error, trace: log.critical("unexpected error: %s", _short(error),
                                                                 exc_info=(kind, error, trace))
        threading.excepthook = lambda args: log.error(
            "unexpected error in thread %s: %s", args.thread.name if args.thread else "?",
            _short(args.exc_value or Exception()), exc_info=(args.exc_type, args.exc_value, args.exc_traceback))


def _install_signal_handlers(stop: threading.Event) -> Callable[[], None]:
    """First SIGTERM/SIGINT/SIGHUP: set ``stop`` (run's shutdown sequence does the rest); second: exit at once.

    The handler interrupts the main thread wherever it is, perhaps inside a lock that logging or
    Sentry holds, so it takes no lock and logs nothing: it writes the signal's number to a pipe. A
    small thread reads it, sets ``stop`` and logs. A second signal ends the process with os._exit(128
    + signal): rows not yet in the catalogue are in the journal, and fn4 is asked about the sample in
    flight at the next start. A signal held while the script imported its libraries counts as a first
    signal. Returns a function that puts the previous handlers back and joins the thread.
    """
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)

    def handle(signum: int, _frame: Any) -> None:
        if stop.is_set():  # reads a flag: no lock
            os._exit(128 + signum)
        with contextlib.suppress(OSError):
            os.write(write_end, bytes([signum]))

    watcher = threading.Thread(target=_watch_signals, args=(read_end, stop), name="signals", daemon=True)
    watcher.start()
    previous = {signum: _EARLY_HANDLERS.pop(signum, signal.signal(signum, handle)) for signum in STOP_SIGNALS}
    if _EARLY_SIGNALS:  # held during the imports: acted on now, before anything is loaded
        handle(_EARLY_SIGNALS[0], None)
        _EARLY_SIGNALS.clear()
        stop.wait(1.0)

    def restore() -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        with contextlib.suppress(OSError):
            os.write(write_end, b"\0")
        watcher.join(THREAD_JOIN_TIMEOUT)
        os.close(write_end)

    return restore


def _watch_signals(read_end: int, stop: threading.Event) -> None:
    """Read the signal numbers the handler writes: set stop at the first, exit at once at a second; a 0 byte ends it."""
    received = 0
    with open(read_end, "rb", buffering=0) as pipe:
        while (data := pipe.read(1)) and data[0]:
            received += 1
            if received > 1:  # a second signal came before the first was acted on
                os._exit(128 + data[0])
            stop.set()
            log.info("%s received: finishing the current sample, then exiting", signal.Signals(data[0]).name)


def _release_early_signals() -> None:
    """Put back the handlers the script found at start and deliver a stop signal held since (commands but run)."""
    for signum in list(_EARLY_HANDLERS):
        signal.signal(signum, _EARLY_HANDLERS.pop(signum))
    if _EARLY_SIGNALS:
        signal.raise_signal(_EARLY_SIGNALS.pop(0))


class DefaultGroup(click.Group):
    """A group that runs ``run`` when the first word is not a subcommand, and shows its help.

    With no words at all it runs ``run`` if FN4_URL, OCI_NAMESPACE or OCI_BUCKET is set (in the
    environment or .env), and shows help otherwise. Errors are one line (see ``main``).
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args.insert(0, "run")
        elif not args and any(os.environ.get(name) for name in ("FN4_URL", "OCI_NAMESPACE", "OCI_BUCKET")):
            args.insert(0, "run")
        return super().parse_args(ctx, args)

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        """Run the command line; a usage error or a ClickException is one line on stderr, 'Error: ...'
        (JSON under --log-format json), with exit code 2 for usage errors and 1 for the others."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        words = sys.argv[1:] if args is None else list(args)
        try:
            code = super().main(words, prog_name, complete_var, False, **extra)
        except getattr(click.exceptions, "NoArgsIsHelpError", ()) as exc:  # no words, nothing set: help (click 8.2+)
            click.echo(exc.ctx.get_help())
            sys.exit(0)
        except click.ClickException as exc:
            if not _logs_are_json() and _json_wanted(words):
                _configure_logging("INFO", _SECRETS, "json")
            _print_error(_error_message(exc))
            sys.exit(exc.exit_code)
        except click.exceptions.Abort:
            _print_error("interrupted")
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        run = self.commands["run"]
        with click.Context(run, info_name=ctx.info_name, parent=None,
                           help_option_names=ctx.help_option_names) as run_ctx:
            run.format_help(run_ctx, formatter)
        self.format_commands(ctx, formatter)


def _json_wanted(words: list[str]) -> bool:
    """Return True if the command line or FN4_LOG_FORMAT asks for JSON logs (read before options are parsed)."""
    pairs = zip(words, words[1:] + [""])
    return os.environ.get("FN4_LOG_FORMAT") == "json" or any(
        word == "--log-format=json" or (word, following) == ("--log-format", "json") for word, following in pairs)


def _error_message(exc: click.ClickException) -> str:
    """Return a click error as one line that names an environment variable only if the value came from it."""
    ctx = getattr(exc, "ctx", None)
    if isinstance(exc, click.BadParameter) and exc.param is not None and ctx is not None and not exc.param_hint:
        param = exc.param
        hint = (click.Parameter.get_error_hint(param, ctx) if isinstance(param, click.Option)
                else param.get_error_hint(ctx))
        envvar = param.envvar if isinstance(param.envvar, str) else None
        if envvar and ctx.get_parameter_source(param.name or "") is click.core.ParameterSource.ENVIRONMENT:
            hint += f" (from {envvar})"
        elif envvar and isinstance(exc, click.MissingParameter):
            hint += f" (give it, or set {envvar})"
        exc.param_hint = hint
    message = exc.format_message()
    if isinstance(exc, click.UsageError) and ctx is not None:
        message += f" (see '{ctx.command_path} --help')"
    return message


def _store(where: BucketArguments, oci: OciOptions, fail_fast: bool = True) -> ObjectStoreClient:
    """Build the Object Storage client and check the bucket can be read (see _check_service)."""
    store = ObjectStoreClient.from_config(where.namespace, where.bucket, oci.auth, oci.config_file, oci.profile,
                                          oci.endpoint)
    _check_service(store.check_access, fail_fast)
    return store


def _connect(target: Target, where: CatalogueOptions, connections: Connections, fail_fast: bool = True,
             read_only: bool = False, journaled: bool = False, journal: Path | None = None
             ) -> tuple[ObjectStoreClient, FN4Client, LoadLogger]:
    """Build the three clients once and check that fn4 and Object Storage answer (see _check_service)."""
    fn4 = FN4Client(target.server_url, verify=connections.ca_bundle or True)
    _check_service(fn4.check, fail_fast)
    store = _store(BucketArguments(namespace=target.namespace, bucket=target.bucket), connections.oci, fail_fast)
    catalogue = LoadLogger.from_database_arg(where.database, where.db_schema, read_only, journal,
                                             target.bucket if journaled else None)
    return store, fn4, catalogue


def _check_service(check: Callable[[], None], fail_fast: bool) -> None:
    """Run a start-up check. ConfigError (a thing to fix) passes through; a service that does not answer
    raises OutageError if ``fail_fast`` (--once, list, upload, download), else it is a warning: the
    daemon starts anyway, and its loop retries with backoff until the service answers."""
    try:
        check()
    except OutageError as exc:
        if fail_fast:
            raise
        log.warning("%s; loading starts once it answers", exc, extra={"fields": {"event": "unavailable"}})


def _apply(decorators: list[Callable[..., Any]]) -> Callable[..., Any]:
    """Return a decorator that applies ``decorators`` in the order listed (top to bottom)."""
    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        for decorator in reversed(decorators):
            func = decorator(func)
        return func
    return decorate


def _on_success(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    if problem := on_success_problem(value):
        raise click.BadParameter(problem)
    return value


def _host_port(_ctx: click.Context, _param: click.Parameter, value: str | None) -> tuple[str, int] | None:
    if value is None:
        return None
    host, _, port = value.rpartition(":")
    if not port.isdigit() or int(port) > 65535:
        raise click.BadParameter(f"{value!r}: give PORT or HOST:PORT, e.g. 9108 or 127.0.0.1:9108")
    return host.strip("[]"), int(port)


_OPTION_CALLBACKS = {"on_success": _on_success}  # checks a knob needs beyond its range, by Settings field


def option(default: Any, env: str | None, help: str, name: str | None = None, **attrs: Any) -> Any:
    """Declare a field of a command's record that is also its option, as knob does for Settings.

    The option is --field-name unless ``name`` says otherwise; ``attrs`` go to click.option as they
    are (``type``, ``callback``, ``is_flag``...).
    """
    return field(default=default, metadata={"env": env, "help": help, "name": name, "click": attrs})


def argument(env: str | None, **attrs: Any) -> Any:
    """Declare a field of a command's record that is also its argument, read from ``env`` when not given."""
    return field(metadata={"env": env, "argument": attrs})


def group(record: type, *only: str) -> Any:
    """Declare a field holding a record whose arguments and options (``only`` these, if named) the command
    takes at this place."""
    return field(metadata={"group": record, "only": only})


def json_flag() -> Any:
    """Declare the --json flag of a command that prints a table."""
    return option(False, None, "Print JSON for scripts instead of a table.", name="--json", is_flag=True)


def _declared(record: type, only: tuple[str, ...] = ()) -> list[dataclasses.Field[Any]]:
    """Return the fields of ``record`` that are arguments, options or groups (``only`` these, if named)."""
    return [f for f in dataclasses.fields(record) if ("env" in f.metadata or "group" in f.metadata)
            and (not only or f.name in only)]


def _option(declared: dataclasses.Field[Any]) -> Callable[..., Any]:
    """Return the click option of a record field declared by knob or option: --name, default, variable, help."""
    meta = declared.metadata
    attrs: dict[str, Any] = {"envvar": meta["env"], "show_envvar": bool(meta["env"]), "help": meta["help"],
                             "callback": _OPTION_CALLBACKS.get(declared.name), **meta.get("click", {})}
    if declared.default is not None and not attrs.get("is_flag"):
        attrs.update(default=declared.default, show_default=True)
    if "kind" in meta:
        kind = click.IntRange if meta["kind"] is int else click.FloatRange
        attrs["type"] = kind(meta.get("min"), meta.get("max"))
    return click.option(meta.get("name") or "--" + declared.name.replace("_", "-"), declared.name, **attrs)


def _parameters(record: type, only: tuple[str, ...] = ()) -> list[Callable[..., Any]]:
    """Return the click arguments and options a record declares, in the order of its fields (see group)."""
    made: list[Callable[..., Any]] = []
    for declared in _declared(record, only):
        meta = declared.metadata
        if "group" in meta:
            made += _parameters(meta["group"], meta["only"])
        elif "argument" in meta:
            made.append(click.argument(declared.name, envvar=meta["env"], **meta["argument"]))
        else:
            made.append(_option(declared))
    return made


def _from_parsed(record: type, values: dict[str, Any], only: tuple[str, ...] = ()) -> Any:
    """Build ``record`` by name from a command's parsed values, each group its own record."""
    return record(**{f.name: _from_parsed(f.metadata["group"], values, f.metadata["only"]) if "group" in f.metadata
                     else values[f.name] for f in _declared(record, only)})


def takes(record: type) -> Callable[..., Any]:
    """Give a command the arguments and options ``record`` declares, and call it with the record built from them.

    A value the record refuses (Settings raises ConfigError) is one line and exit 2, as at start-up.
    """
    def decorate(func: Callable[[Any], Any]) -> Callable[..., Any]:
        def command(**values: Any) -> Any:
            try:
                given = _from_parsed(record, values)
            except ConfigError as exc:
                error = click.ClickException(str(exc))
                error.exit_code = 2
                raise error from None
            return func(given)
        command.__name__, command.__doc__ = func.__name__, func.__doc__
        return _apply(_parameters(record))(command)
    return decorate


@dataclass(frozen=True, kw_only=True)
class LogOptions:
    """How much to log, and how: options of every command."""

    log_level: str = option("INFO", "FN4_LOG_LEVEL", "Logging threshold.",
                            type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
    log_format: str = option("text", "FN4_LOG_FORMAT", "Log lines as text, or as one JSON object each.",
                             type=click.Choice(["text", "json"]))


@dataclass(frozen=True, kw_only=True)
class BucketArguments:
    """The Object Storage bucket: arguments of every command that reads or writes it."""

    namespace: str = argument("OCI_NAMESPACE")
    bucket: str = argument("OCI_BUCKET")


@dataclass(frozen=True, kw_only=True)
class CatalogueOptions:
    """Where the catalogue is: its argument and option, for every command that reads or writes it."""

    database: str | None = argument("FN4_DATABASE", required=False)
    db_schema: str | None = option(None, "FN4_DB_SCHEMA", "Database schema (Oracle user) holding the tables, "
                                   "e.g. FN4LOADER. Default: none.")


@dataclass(frozen=True, kw_only=True)
class OciOptions:
    """How to reach Object Storage."""

    auth: str = option("api_key", "OCI_CLI_AUTH", "How to authenticate to OCI, as the OCI CLI names it.",
                       type=click.Choice(["api_key", "instance_principal", "resource_principal", "security_token"]))
    config_file: str | None = option(None, "OCI_CLI_CONFIG_FILE",
                                     "OCI config file for api_key and security_token. Default: ~/.oci/config.")
    profile: str | None = option(None, "OCI_CLI_PROFILE", "Profile in the OCI config file. Default: DEFAULT.")
    endpoint: str | None = option(None, "OCI_OBJECT_STORAGE_ENDPOINT",
                                  "Object Storage endpoint URL instead of the region's, e.g. a private endpoint.")


@dataclass(frozen=True, kw_only=True)
class Connections:
    """How to reach Object Storage and fn4: options of the commands that read the bucket and talk to fn4."""

    oci: OciOptions = group(OciOptions)
    ca_bundle: str | None = option(None, "FN4_CA_BUNDLE", "CA bundle to verify an https fn4 server. "
                                   "Default: the system's.", type=click.Path(exists=True))


@dataclass(frozen=True, kw_only=True)
class Common:
    """The arguments and options of commands tied to one fn4 server and bucket: where to load, the catalogue, logs."""

    fn4_url: str = argument("FN4_URL")
    oci_bucket: BucketArguments = group(BucketArguments)
    catalogue: CatalogueOptions = group(CatalogueOptions)
    logs: LogOptions = group(LogOptions)

    def target(self) -> Target:
        """Return what these arguments name. Raises ConfigError if FN4_URL is not http(s)."""
        return Target.of(self.fn4_url, self.oci_bucket.namespace, self.oci_bucket.bucket)


@click.group(cls=DefaultGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.pass_context
def main(ctx: click.Context) -> None:
    """Load FASTA files from an OCI Object Storage bucket into findNeighbour4, oldest first."""
    if ctx.invoked_subcommand != "run":  # run installs its own handlers; the others stop as usual
        _release_early_signals()


@dataclass(frozen=True, kw_only=True)
class RunOptions(Common):
    """What ``run`` is given: each field an argument, an option, or a group of them, in --help's order."""

    connections: Connections = group(Connections)
    once: bool = option(False, "FN4_ONCE", "Run one cycle, then exit (0 if the cycle completed, 1 if a service "
                        "was down or busy).", is_flag=True)
    settings: Settings = group(Settings)
    metrics_port: tuple[str, int] | None = option(
        None, "FN4_METRICS_PORT", "Serve Prometheus /metrics and /healthz on [HOST:]PORT, e.g. 9108 (every "
        "interface) or 127.0.0.1:9108. Default: off.", callback=_host_port)
    lease_ttl: float = option(DEFAULT_LEASE_TTL, "FN4_LEASE_TTL", "Seconds the active instance's lease lasts "
                              "unless renewed (every third of it). A standby instance of the same fn4 server and "
                              "bucket takes over within this plus 5 s of the active one dying; give every instance "
                              "the same value.", type=click.FloatRange(min=3))
    journal: Path | None = option(None, "FN4_JOURNAL", "Local file that keeps catalogue rows until the database "
                                  "has them; rows left there are written at the next start. Default: beside a "
                                  "SQLite catalogue, else in ~/.local/state/fn4loader/.",
                                  type=click.Path(dir_okay=False, path_type=Path))


@main.command()
@takes(RunOptions)
def run(given: RunOptions) -> None:
    """Load FASTA files from an OCI Object Storage bucket into findNeighbour4, oldest first.

    FN4_URL is the fn4 server, NAMESPACE and BUCKET the Object Storage bucket, and DATABASE the
    catalogue: a key in the DB_CONNECTION_CONFIG_FILE JSON file, a SQLAlchemy URL, or omitted
    for a SQLite file. Every option can also be set in the environment or in a .env file.
    """
    stop = threading.Event()
    metrics = Metrics(max_age=STALE_POLLS * given.settings.poll_interval)
    # The one shutdown sequence: a signal sets ``stop``; the loop finishes the sample in flight and
    # returns (the prefetcher and the lease keeper joined, the lease released); then what was started
    # here is stopped in reverse order: the metrics server, the catalogue (rows written or left in the
    # journal, its writer joined), fn4's connections, and last the signal handlers, so that a second
    # signal exits at once until the end.
    with contextlib.ExitStack() as started:
        with _startup(given.logs):
            started.callback(_install_signal_handlers(stop))  # first: a signal during start-up is a clean stop too
            target = given.target()
            store, fn4, catalogue = _connect(target, given.catalogue, given.connections, fail_fast=given.once,
                                             journaled=True, journal=given.journal)
            started.callback(fn4.close)
            started.callback(_close_catalogue, catalogue, stop)
            server = metrics.serve(*given.metrics_port) if given.metrics_port else None
            if server:
                started.callback(server.close)
            lease = catalogue.lease(target, given.lease_ttl)
        catalogue.patience = ONCE_CATALOGUE_PATIENCE if given.once else None
        loader = LoadLoop(store, fn4, catalogue, given.settings, stop=stop, metrics=metrics, lease=lease)
        log.info("loading %s/%s into %s%s%s", target.namespace, target.bucket, target.server_url,
                 " once" if given.once else "", f"; metrics on port {server.server_address[1]}" if server else "")
        failure = _load_until_stopped(loader, lease, given.once)
    sys.exit(_exit_code(failure, catalogue))


def _load_until_stopped(loader: LoadLoop, lease: Lease, once: bool) -> str | None:
    """Run the loop under the lease until stop is set (or one cycle); return why --once failed, if it did."""
    try:
        with lease.kept():
            loader.run(once=once)
    except OutageError as exc:
        _print_error(str(exc))
        return "a service was unavailable"
    if once and loader.last_summary and loader.last_summary.paused:  # files remain: say so in the exit code
        _print_error(f"the cycle paused with files left to load: {loader.pause_reason or ''}")
        return "the cycle paused with files left"
    return None


def _exit_code(failure: str | None, catalogue: LoadLogger) -> int:
    """Log the last line of run, which says why, and return its exit code: 1 if --once failed or rows were left."""
    reasons = [failure] if failure else []
    if lost := len(catalogue.unjournaled):
        reasons.append(f"{lost} catalogue rows neither written nor journaled")
    if kept := catalogue.unwritten - lost:  # after close: the rows it could not write
        reasons.append(f"{kept} catalogue rows kept in the journal")
    log.info("%s: exit %d (%s)", STOPPED_LOG, 1 if reasons else 0, "; ".join(reasons) or "every row written")
    return 1 if reasons else 0


def _close_catalogue(catalogue: LoadLogger, stop: threading.Event) -> None:
    """Write the catalogue's rows (briefly after a signal or while it fails), join its writer, log what is left."""
    left = catalogue.close(timeout=3.0 if stop.is_set() or catalogue.failing else 30.0)
    if kept := len(left) - len(catalogue.unjournaled):
        log.error("%d catalogue rows not written: kept in the journal %s, they are written at the next start",
                  kept, catalogue.journal.path if catalogue.journal else None)
    for row in catalogue.unjournaled:
        log.error("catalogue row not written: %s", json.dumps(row, default=str))


@dataclass(frozen=True, kw_only=True)
class RetryOptions(Common):
    """What ``retry-failed`` is given."""

    names: tuple[str, ...] = option(None, None, "Object name to re-queue; repeat for several. Default: every "
                                    "failed file.", name="--name", multiple=True)


@main.command("retry-failed")
@takes(RetryOptions)
def retry_failed(given: RetryOptions) -> None:
    """Re-queue failed, given-up, duplicate and vanished files so the loader tries them again."""
    with _startup(given.logs):
        target = given.target()
        catalogue = LoadLogger.from_database_arg(given.catalogue.database, given.catalogue.db_schema)
    requeued = catalogue.requeue(target, given.names)
    left = catalogue.close(timeout=30.0)
    click.echo(f"re-queued {len(requeued)} file(s)" + "".join(f"\n  {n}" for n in requeued))
    if left:
        raise click.ClickException(f"{len(left)} re-queue rows could not be written; try again")


@dataclass(frozen=True, kw_only=True)
class StatusOptions:
    """What ``status`` is given."""

    catalogue: CatalogueOptions = group(CatalogueOptions)
    logs: LogOptions = group(LogOptions)
    server: str | None = option(None, "FN4_URL", "Report only loaders of this fn4 server URL. Default: every "
                                "loader in the catalogue.")
    settings: Settings = group(Settings, "poll_interval")
    critical_failure_share: float = option(0.5, "FN4_CRITICAL_FAILURE_SHARE", "Critical when more than this "
                                           "share of the files tried in the last hour failed for reasons of fn4, "
                                           "Object Storage or the loader.", type=click.FloatRange(0, 1))
    as_json: bool = json_flag()


@main.command()
@takes(StatusOptions)
def status(given: StatusOptions) -> None:
    """Report each loader's health from the catalogue; exit 0 OK, 1 warning, 2 critical, 3 unknown.

    Critical: no cycle and no attempt for 3 poll intervals (unless another host now loads the same
    fn4 server); the latest cycles were abandoned or paused because fn4 or Object Storage was
    unavailable; or more than the critical share of the files tried in the last hour failed for
    reasons of fn4, Object Storage or the loader. Warning: such a failure, a retry in the last
    hour, or a file whose latest state is failed. Unknown: the catalogue cannot be read. Running
    instances are listed, active or standby; critical too when none holds their lease.
    """
    now = utcnow()
    reason = None
    with _startup(given.logs):
        try:
            reports, instances = _read_status(given.catalogue.database, given.catalogue.db_schema, given.server,
                                              now, given.settings.poll_interval, given.critical_failure_share)
        except ConfigError as exc:
            reason, reports, instances = redact(str(exc), _SECRETS), [], []
    lease_problems = assess_instances(instances)
    level = 3 if reason else max([r.level for r in reports] + [lvl for lvl, _ in lease_problems], default=2)
    # Rows written before redaction existed (or by an older loader) may quote a secret: redact on output.
    if given.as_json:
        click.echo(json.dumps({"checked_at": now, "status": LEVELS[level], "exit_code": level,
                               **({"reason": reason} if reason else {}),
                               "loaders": [redact_all({**dataclasses.asdict(r), "status": LEVELS[r.level]}, _SECRETS)
                                           for r in reports],
                               "instances": instances,
                               "lease_problems": [f"{LEVELS[lvl]}: {text}" for lvl, text in lease_problems]},
                              default=_json_value, indent=2))
    elif reason:
        _print_error(reason)
    else:
        click.echo(redact(_status_text(reports, now, level, given.server), _SECRETS))
        if instances:
            click.echo(_instances_text(instances, lease_problems))
    sys.exit(level)


def _instances_text(instances: list[dict[str, Any]], problems: list[tuple[int, str]]) -> str:
    """Return the lines on running instances (active or standby) and on leases nobody holds."""
    rows = [[i["role"] + (" (lapsed)" if i["lapsed"] and i["role"] == "active" else ""), i["host_name"],
             i["process_id"], i["server_url"], f"{i['namespace']}/{i['bucket']}", _when(i["since"])]
            for i in instances]
    return "\n".join(["", "instances:", _table(["role", "host", "pid", "fn4 server", "bucket", "since (UTC)"], rows)]
                     + [f"  {LEVELS[lvl]}: {text}" for lvl, text in problems])


def _read_status(database: str | None, db_schema: str | None, server: str | None, now: datetime,
                 poll_interval: float, critical_share: float) -> tuple[list[LoaderReport], list[dict[str, Any]]]:
    """Read and assess every loader's status, and list the running instances (LoadLogger.instances).

    Raises ConfigError when the catalogue cannot be read.
    """
    catalogue = LoadLogger(LoadLogger.connect(database, read_only=True), db_schema)  # CatalogueMissing
    url = catalogue.engine.url
    server = fn4_server_url(server, check=False) if server else None  # as the loaders record it
    try:
        if not catalogue.has_tables():
            raise ConfigError(f"the catalogue {url.render_as_string(hide_password=True)} has no loader tables"
                              f"{' in schema ' + db_schema if db_schema else ''}: has the loader run with it?")
        found = catalogue.reports(now, server)
        instances = catalogue.instances(server)
    except sa.exc.SQLAlchemyError as exc:
        error = catalogue.unusable(exc)
        if "column" in str(exc).lower():
            error = ConfigError(f"{error}; tables made by an older loader are upgraded when `run` next starts")
        raise error from None
    finally:
        catalogue.engine.dispose()
    newest = {r.server_url: max((o.heartbeat for o in found if o.server_url == r.server_url and o.heartbeat),
                                default=None) for r in found}
    return [assess(r, now, poll_interval, critical_share, newest[r.server_url]) for r in found], instances


def _status_text(reports: list[LoaderReport], now: datetime, level: int, server: str | None) -> str:
    """Return the human-readable status report: a summary table, then each loader's details."""
    lines = [f"{LEVELS[level].upper()} at {now:%Y-%m-%d %H:%M:%S} UTC: {len(reports)} loader(s)"]
    if not reports:
        lines.append(f"no batch in the catalogue{' for ' + server if server else ''}: has the loader run?")
        return "\n".join(lines)
    lines += ["", _table(["state", "host", "fn4 server", "last batch (UTC)", "backlog", "last insert (UTC)"],
                         [[LEVELS[r.level].upper(), r.host_name, r.server_url, _when(r.last_batch), r.backlog,
                           _when(r.last_success)] for r in reports])]
    window = f"last {STATUS_WINDOW.total_seconds() / 60:g} minutes"
    for r in reports:
        lines += ["", f"{r.host_name} -> {r.server_url}",
                  f"  files tried in the {window}, by latest outcome: "
                  + (", ".join(f"{k} {v}" for k, v in sorted(r.recent_files.items())) or "none"),
                  f"  attempts in the {window}: "
                  + (", ".join(f"{k} {v}" for k, v in sorted(r.outcomes.items())) or "none")]
        lines += [f"  {problem}" for problem in r.problems]
        if r.failed_files:
            lines.append(f"  failed files ({len(r.failed_files)}, latest first):")
            lines += [f"    {f['file_name']}  {f['outcome']}  {f['error_text'] or f['parse_status']}"
                      for f in r.failed_files[:10]]
            if len(r.failed_files) > 10:
                lines.append(f"    ... and {len(r.failed_files) - 10} more (--json lists all)")
    return "\n".join(lines)


def inventory(store: ObjectStoreClient, fn4: FN4Client, catalogue: LoadLogger, settings: Settings,
              target: Target) -> list[dict[str, Any]]:
    """Return the bucket's FASTA objects, oldest first, each loaded, pending or failed. Raises OutageError.

    The state is the one the catalogue records (see file_state), or, for a file without a
    row, the one the next cycle will record: a guid fn4 holds is loaded, a duplicate failed.
    """
    states = FileStates()
    try:
        for name, etag, state in catalogue.latest_states(target):
            states[(name, etag)] = state
    except sa.exc.SQLAlchemyError as exc:
        log.warning("could not read the catalogue (%s); using what is known", _short(exc))
    objects = sorted(store.list_objects(settings.prefix, settings.archive_prefix),
                     key=lambda o: (o.time_created, o.name))
    guids = fn4.guids()
    candidates, settled = sort_out(objects, states, guids)
    planned = {obj.key: outcome for obj, outcome, _ in settled} | {
        obj.key: IN_SERVER if obj.guid in guids else "" for obj in candidates}
    files = []
    for obj in objects:
        state = states.get(obj.key, FileState())
        files.append({"state": file_state(planned.get(obj.key, state.outcome)), "name": obj.name,
                      "guid": obj.guid, "size": obj.size, "time_created": obj.time_created,
                      "outcome": state.outcome or None, "failed_attempts": state.failed_attempts})
    return files


@dataclass(frozen=True, kw_only=True)
class ListOptions(Common):
    """What ``list`` is given."""

    connections: Connections = group(Connections)
    settings: Settings = group(Settings, "prefix", "on_success")
    as_json: bool = json_flag()


@main.command("list")
@takes(ListOptions)
def list_files(given: ListOptions) -> None:
    """List the bucket's FASTA files, oldest first, each loaded, pending or failed.

    The state is the file's latest outcome in the catalogue, as status counts it: loaded
    (inserted, already_present, in_server), failed (failed, duplicate, vanished, gave_up) or
    pending; a file not yet tried shows the state the next cycle will record. Give the loader's
    --on-success, so that archived objects are left out.
    """
    with _startup(given.logs):
        target = given.target()
        store, fn4, catalogue = _connect(target, given.catalogue, given.connections, read_only=True)
    try:
        files = inventory(store, fn4, catalogue, given.settings, target)
    except OutageError as exc:
        raise click.ClickException(redact(str(exc), _SECRETS)) from None
    finally:
        catalogue.close()
        fn4.close()
    if given.as_json:
        click.echo(json.dumps(files, default=_json_value, indent=2))
        return
    click.echo(_table(["state", "name", "bytes", "created (UTC)", "outcome"],
                      [[f["state"], f["name"], f["size"], _when(f["time_created"]), f["outcome"]] for f in files]))
    counts = {state: sum(f["state"] == state for f in files) for state in ("loaded", "pending", "failed")}
    click.echo(f"{len(files)} FASTA files: " + ", ".join(f"{n} {state}" for state, n in counts.items()))


@dataclass(frozen=True, kw_only=True)
class UploadOptions:
    """What ``upload`` is given."""

    oci_bucket: BucketArguments = group(BucketArguments)
    files: tuple[str, ...] = argument(None, nargs=-1, metavar="FILES...", type=click.Path())
    oci: OciOptions = group(OciOptions)
    settings: Settings = group(Settings, "prefix", "max_object_bytes")
    logs: LogOptions = group(LogOptions)


@main.command()
@takes(UploadOptions)
def upload(given: UploadOptions) -> None:
    """Upload FASTA files to the bucket, never replacing an object of the same name.

    Each file is stored under its own name (after --prefix), as it is, if the loader would load it:
    a regular file (links followed) within --max-object-bytes holding one FASTA record, gzip or not.
    Other files are refused with the reason. Put -- before names that start with '-'. Exit 1 if any
    was not uploaded. NAMESPACE and BUCKET may be left out when OCI_NAMESPACE and OCI_BUCKET are set.
    """
    where, files = _bucket_words(given.oci_bucket, given.files, "FILES...")
    prefix, max_object_bytes = given.settings.prefix, given.settings.max_object_bytes
    with _startup(given.logs):
        store = _store(where, given.oci)
    results = []
    with _progress(files, "uploading", item_show_func=lambda p: p and Path(p).name) as bar:
        for path in bar:
            name = (prefix or "") + Path(path).name
            problem = None if fasta_suffix(name) else "not a FASTA name: " + ", ".join(FASTA_SUFFIXES) + " (.gz)"
            problem = problem or guid_problem(guid_from_name(name))
            try:
                if problem is None and not store.upload(name, read_upload(path, max_object_bytes)):
                    problem = "an object of that name exists; it was not replaced"
            except SampleError as exc:
                problem = exc.reason
            except Exception as exc:
                if not store._is_fault(exc):
                    raise
                problem = _oci_reason(exc)
            results.append((name, problem))
    _report("uploaded", results)


@dataclass(frozen=True, kw_only=True)
class DownloadOptions:
    """What ``download`` is given."""

    oci_bucket: BucketArguments = group(BucketArguments)
    names: tuple[str, ...] = argument(None, nargs=-1, metavar="NAMES...")
    folder: Path = option(None, None, "Folder to write the files into (made if missing); existing files are never "
                          "replaced.", name="--to", required=True, type=click.Path(file_okay=False, path_type=Path))
    oci: OciOptions = group(OciOptions)
    logs: LogOptions = group(LogOptions)


@main.command()
@takes(DownloadOptions)
def download(given: DownloadOptions) -> None:
    """Download objects, as stored, into a folder under safe local names.

    An object name becomes a file name of letters, digits, '.', '_' and '-' only ('/' and the rest
    become '_'), so no name can leave the folder. Exit 1 if any was not downloaded.
    NAMESPACE and BUCKET may be left out when OCI_NAMESPACE and OCI_BUCKET are set.
    """
    where, names = _bucket_words(given.oci_bucket, given.names, "NAMES...")
    folder = given.folder
    with _startup(given.logs):
        store = _store(where, given.oci)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot make the folder {str(folder)!r}: {exc.strerror}") from None
    results = []
    with _progress(names, "downloading") as bar:
        for name in bar:
            target = folder / safe_file_name(name)
            try:
                with target.open("xb") as out:
                    store.download(name, out)
                results.append((f"{name} -> {target}", None))
            except FileExistsError:
                results.append((name, f"{target} exists; it was not replaced"))
            except Exception as exc:
                target.unlink(missing_ok=True)
                if not (store._is_fault(exc) or isinstance(exc, TransientError)):
                    raise
                results.append((name, _oci_reason(exc)))
    _report("downloaded", results)


def _bucket_words(where: BucketArguments, items: tuple[str, ...], metavar: str
                  ) -> tuple[BucketArguments, tuple[str, ...]]:
    """Return (bucket, items), NAMESPACE and BUCKET left out when OCI_NAMESPACE and OCI_BUCKET are set.

    click gives the first words to NAMESPACE and BUCKET; when both variables are set and those words
    are not their values, the words are items (files or object names), as in ``upload a.fasta b.fasta``.
    """
    ctx = click.get_current_context()
    given = [value for name, value in (("namespace", where.namespace), ("bucket", where.bucket))
             if ctx.get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE]
    named = (os.environ.get("OCI_NAMESPACE"), os.environ.get("OCI_BUCKET"))
    if named[0] and named[1] and given and tuple(given) != named:
        where, items = BucketArguments(namespace=named[0], bucket=named[1]), (*given, *items)
    if not items:
        raise click.UsageError(f"Missing argument '{metavar}'.", ctx)
    return where, items


def read_upload(path: str, max_bytes: int) -> bytes:
    """Return a local file's bytes if the loader would load them. Raises SampleError saying why not.

    Links are followed. Anything but a regular file (a FIFO, a device, a folder) is refused before
    it is read, and so is a file above ``max_bytes``; the content must be one FASTA record, a gzip
    file being inflated within the same bound.
    """
    data = b""
    try:
        info = os.stat(path)
        if stat.S_ISREG(info.st_mode):  # a non-blocking open, checked again: a file swapped for a FIFO cannot block
            with os.fdopen(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb") as file:
                info = os.fstat(file.fileno())
                if stat.S_ISREG(info.st_mode) and info.st_size <= max_bytes:
                    data = file.read(max_bytes + 1)
    except OSError as exc:
        raise SampleError("unreadable", f"cannot read it: {exc.strerror}") from None
    kind = info.st_mode
    if not stat.S_ISREG(kind):
        what = "a folder" if stat.S_ISDIR(kind) else "a FIFO" if stat.S_ISFIFO(kind) else (
            "a device" if stat.S_ISCHR(kind) or stat.S_ISBLK(kind) else "a socket or other special file")
        raise SampleError("not_a_file", f"not a regular file but {what} (after following links)")
    if (size := max(info.st_size, len(data))) > max_bytes:
        raise SampleError("too_large", f"it is {size} bytes; the limit (--max-object-bytes) is {max_bytes}")
    parse_fasta(inflate([data], max_bytes))
    return data


def _report(verb: str, results: list[tuple[str, str | None]]) -> None:
    """Print what was done to each item; exit 1 if anything failed."""
    for name, problem in results:
        click.echo(f"{verb} {name}" if problem is None else f"not {verb}: {name}: {problem}")
    failures = sum(problem is not None for _, problem in results)
    click.echo(f"{len(results) - failures} {verb}, {failures} not")
    if failures:
        sys.exit(1)


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    """Return rows as columns aligned under their headers; None shows as '-'."""
    cells = [headers] + [["-" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def _when(moment: datetime | None) -> str | None:
    return None if moment is None else f"{moment.astimezone(timezone.utc):%Y-%m-%d %H:%M:%S}"


@contextlib.contextmanager
def _startup(logs: LogOptions) -> Iterator[list[str]]:
    """Set up logging and Sentry, and turn a ConfigError into one clear line and exit code 2.

    Yields the secrets to redact: the same list grows as passwords are learnt (resolve_database).
    """
    for name in ("FN_SENTRY_URL", "WALLET_PASSWORD"):
        _remember_secret(os.environ.get(name))
    _remember_secret(urlsplit(os.environ.get("FN_SENTRY_URL", "")).username)  # the DSN's key
    _configure_logging(logs.log_level, _SECRETS, logs.log_format)
    if os.environ.get("FN_SENTRY_URL"):
        import sentry_sdk  # default PII stays off: sentry-sdk sends none unless told to
        sentry_sdk.init(dsn=os.environ["FN_SENTRY_URL"], max_breadcrumbs=20,  # argv, locals, breadcrumbs: all
                        before_send=lambda event, _hint: redact_all(event, _SECRETS),
                        before_breadcrumb=lambda crumb, _hint: redact_all(crumb, _SECRETS))
    _warn_of_password_in_argv()
    try:
        yield _SECRETS
    except ConfigError as exc:
        _print_error(str(exc))
        sys.exit(2)
    except OutageError as exc:  # a service did not answer a start-up check (see _check_service)
        _print_error(str(exc))
        sys.exit(1)


def _print_error(message: str) -> None:
    """Print a fatal error as one line on stderr: 'Error: ...', or a JSON entry when logs are JSON."""
    line = "Error: " + redact(" ".join(message.split()), _SECRETS)
    if _logs_are_json():
        log.critical("%s", line, extra={"fields": {"event": "fatal"}})
    else:
        click.echo(line, err=True)


def _logs_are_json() -> bool:
    return any(h.get_name() == _LOG_HANDLER and isinstance(h.formatter, _JsonFormatter)
               for h in logging.getLogger().handlers)


def _progress(items: Iterable[Any], label: str, **options: Any) -> Any:
    """Return a progress bar over items on stderr; under JSON logs, just the items (stderr stays JSON)."""
    if _logs_are_json():
        return contextlib.nullcontext(items)
    return click.progressbar(items, label=label, file=sys.stderr, **options)


def _warn_of_password_in_argv() -> None:
    """Warn when the DATABASE argument, given on the command line, holds a password: `ps` shows it to all."""
    ctx = click.get_current_context(silent=True)
    if (ctx is not None and ctx.get_parameter_source("database") is click.core.ParameterSource.COMMANDLINE
            and _TYPED_PASSWORD.match(ctx.params.get("database") or "")):
        log.warning("the DATABASE URL on the command line holds a password, which any user of this machine can "
                    "read with ps: give it in FN4_DATABASE, a .env file or DB_CONNECTION_CONFIG_FILE instead")


def cli() -> None:
    """Entry point: load .env (without overriding the environment), then run the command line."""
    from dotenv import find_dotenv, load_dotenv
    load_dotenv(find_dotenv(usecwd=True), override=False)
    main()


if __name__ == "__main__":
    cli()
