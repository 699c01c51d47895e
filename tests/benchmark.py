"""Benchmark of the loader: the project's pipelined loader against a plain sequential loop.

Run it with ``pipenv run python tests/benchmark.py [--quick] [--profile]`` (about 2.5 minutes;
``--quick`` about 1). It prints a markdown-friendly table of:

1. fn4 server utilisation while a backlog loads, for tuberculosis-, gonorrhoea- and
   SARS-CoV-2-like genome sizes, insert times (L) and download+parse times (D);
2. the loader process's CPU per sample;
3. its peak RSS above idle while loading;
4. an idle cycle at scale (100,000 objects, all loaded): time, RSS growth, bytes fn4 sent;
5. list+diff time at 10,000 and 100,000 objects.

With ``--scale`` it prints instead the national-scale figures, each beside its target and the
sequential reference: idle cycles at 2,000,000 objects and guids with a list page latency
(``--page-latency``, 100 ms by default), listing by key ranges and page by page; an idle cycle
with ``--on-success rename:loaded/`` and 2,000,000 archived objects; peak RSS; the migration
cycle against an fn4 that holds everything; CPU per SARS-CoV-2 sample; utilisation at the three
speed profiles. It takes about 15 minutes; ``--objects`` makes it smaller (the targets are for
2,000,000). The emulator answers each list page (1,000 objects) after ``--page-latency``: an
assumption about the real service, which sets the floor of the idle cycle's time.
``--scale --only backlog`` runs only the backlog runs behind the last two (a few minutes),
``--runs N`` repeats them and gives median and range. CPU per sample is in steady state: the loader
process's CPU time between inserts (all its threads), the first tenth of the batch left out.

The Object Storage emulator and the fn4 stand-in each run in a process of their own, and every
measured loader runs in a freshly spawned process, so the CPU time and RSS measured are the
loader's alone. Genomes are synthetic (random ACGT with N runs, gaps and a few IUPAC codes),
shaped like the real ones in ``../shared/data/ac587`` when that folder is there: 60-column
lines, one ``>guid`` header line, gzip level 6. Everything listens on 127.0.0.1 only and every
wait is bounded. On a shared machine other jobs take CPU meanwhile, so CPU figures are noisy: say
where they were measured when quoting them.
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import gzip
import hashlib
import io
import logging
import multiprocessing
import os
import platform
import pstats
import random
import re
import secrets
import socket
import statistics
import sys
import tempfile
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from multiprocessing.connection import Client, Listener
from pathlib import Path
from typing import Any, Callable

import sqlalchemy as sa

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import objectstoreaccess as osa  # noqa: E402
from fn4_standin import FN4StandIn, insert  # noqa: E402
from oci_emulator import Fault, ObjectStoreEmulator, _Reply, write_oci_config  # noqa: E402

AC587 = Path(__file__).resolve().parents[2] / "shared" / "data" / "ac587"
NAMESPACE = "benchns"
WARM_BUCKET = "warm"
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
MB = 1e6
SERVER_LIFETIME = 1800          # seconds: a server process ends itself after this, whatever happens
CALL_TIMEOUT = 300              # seconds: longest wait for one answer from a server process

log = logging.getLogger("benchmark")


# ---- Plans -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Profile:
    """One backlog scenario: genome size, how many, fn4's insert time L and the target D."""

    key: str
    label: str
    length: int
    gc: float
    samples: int
    insert_delay: float       # L, seconds: the stand-in's insert_delay
    download_parse: float     # D, seconds: download + parse time the emulator's delay aims at
    target: float             # utilisation the loader should reach


PROFILES = (
    Profile("tb", "tuberculosis-like", 4_411_532, 0.654, 20, 0.400, 0.150, 0.98),
    Profile("gono", "gonorrhoea-like", 2_200_000, 0.525, 40, 0.175, 0.060, 0.97),
    Profile("sars", "SARS-CoV-2-like", 29_903, 0.380, 200, 0.025, 0.015, 0.96),
)
QUICK_SAMPLES = {"tb": 6, "gono": 12, "sars": 60}
SCALE_SIZES = (10_000, 100_000)
QUICK_SCALE_SIZES = (2_000, 10_000)
CPU_TARGET_MS = 60.0
PEAK_TARGET_GENOMES = 5.0
IDLE_TARGET_S = 3.0
IDLE_TARGET_MB = 150.0
# --scale: the targets of the national-scale figures
NATIONAL_OBJECTS = 2_000_000
NATIONAL_WAITING = 100
NATIONAL_IDLE_TARGET_S = 60.0
NATIONAL_RENAME_TARGET_S = 2.0
NATIONAL_RSS_TARGET_MB = 400.0
NATIONAL_MIGRATION_TARGET_S = 900.0
NATIONAL_PARTS = ("cycles", "rename", "backlog")  # --only: migration, restart, idle; rename:loaded/; CPU, fn4 busy
SARS_CPU_TARGET_MS = 1.5


# ---- Synthetic genomes -----------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """What a genome file looks like; the defaults are those of the ac587 tuberculosis files."""

    length: int = 4_411_532
    width: int = 60
    gc: float = 0.654
    n_fraction: float = 0.075
    gap_fraction: float = 0.005
    iupac_fraction: float = 0.0003
    real_gz_bytes: int = 0    # size of a real compressed file, when one was found
    source: str = "defaults"


def shape_of_ac587(folder: Path = AC587) -> Shape:
    """Measure the first real genome in ``folder``; the defaults if there is none."""
    files = sorted(folder.glob("*.mfasta.gz")) if folder.is_dir() else []
    if not files:
        return Shape()
    raw = files[0].read_bytes()
    text = gzip.decompress(raw)
    lines = text.split(b"\n")
    width = max(len(line) for line in lines[1:50])
    _, seq = osa.parse_fasta(text)
    counts = {c: seq.count(c) for c in b"ACGTN-"}
    acgt = sum(counts[c] for c in b"ACGT") or 1
    iupac = len(seq) - sum(counts.values())
    return Shape(len(seq), width, (counts[ord("C")] + counts[ord("G")]) / acgt, counts[ord("N")] / len(seq),
                 counts[ord("-")] / len(seq), iupac / len(seq), len(raw), f"{folder.name}/{files[0].name}")


def uuid_guids(count: int, seed: int) -> list[str]:
    """Return ``count`` reproducible UUID-shaped guids, like the ac587 sample names."""
    rng = random.Random(seed)
    return [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(count)]


def _base_table(gc_fraction: float) -> bytes:
    """A translate table turning random bytes into A, C, G and T with the given GC share."""
    at = round(256 * (1 - gc_fraction) / 2)
    cg = (256 - 2 * at) // 2
    return b"A" * at + b"T" * at + b"C" * cg + b"G" * (256 - 2 * at - cg)


def _runs(seq: bytearray, rng: random.Random, char: bytes, total: int, run_length: Callable[[], int]) -> None:
    placed = 0
    while placed < total:
        run = max(1, min(run_length(), total - placed, len(seq)))
        start = rng.randrange(len(seq) - run + 1)
        seq[start:start + run] = char * run
        placed += run


def genome_fasta(guid: str, length: int, shape: Shape, seed: int, gc_fraction: float | None = None) -> bytes:
    """Return an uncompressed one-record FASTA file: ``>guid`` then ``shape.width``-column lines."""
    rng = random.Random(seed)
    seq = bytearray(rng.randbytes(length).translate(_base_table(gc_fraction or shape.gc)))
    _runs(seq, rng, b"N", int(length * shape.n_fraction),
          lambda: 1 if rng.random() < 0.55 else 2 + int(rng.expovariate(0.01)))
    _runs(seq, rng, b"-", int(length * shape.gap_fraction), lambda: 1 + int(rng.expovariate(1 / 250)))
    for _ in range(max(1, int(length * shape.iupac_fraction))):
        seq[rng.randrange(length)] = rng.choice(b"RYSWKMrysk")
    width = shape.width
    body = b"\n".join(seq[i:i + width] for i in range(0, length, width))
    return b">" + guid.encode() + b"\n" + body + b"\n"


def _generate(task: tuple[str, int, str, int, Shape, int, float]) -> tuple[str, int, str, bytes]:
    """Pool task: one gzip-compressed genome object (bucket, position, name, bytes)."""
    bucket, index, guid, length, shape, seed, gc_fraction = task
    data = gzip.compress(genome_fasta(guid, length, shape, seed, gc_fraction), compresslevel=6, mtime=0)
    return bucket, index, f"{guid}.mfasta.gz", data


# ---- The emulator, with listing fast enough not to hide the loader ---------------------------


class FastListingEmulator(ObjectStoreEmulator):
    """The test emulator, which finds each list page by bisection in its sorted index, timed.

    ``list_seconds`` adds up the time spent building list pages (the ``list_latency`` wait left
    out), so the tables can show what the emulator itself cost inside the loader's wall time.
    """

    def __init__(self, namespace: str) -> None:
        super().__init__(namespace=namespace)
        self.list_calls = 0
        self.list_seconds = 0.0

    def _list_objects(self, namespace: str, bucket: str, query: dict[str, str]) -> _Reply:
        started = time.perf_counter()
        try:
            return super()._list_objects(namespace, bucket, query)
        finally:
            with self._lock:
                self.list_calls += 1
                self.list_seconds += time.perf_counter() - started - self.list_latency


# ---- Server processes ------------------------------------------------------------------------


def _oci_put_tiny(emu: FastListingEmulator, bucket: str, count: int, seed: int) -> int:
    emu.create_bucket(bucket)
    for i, guid in enumerate(uuid_guids(count, seed)):
        emu.put(bucket, f"{guid}.mfasta.gz", b">" + guid.encode() + b"\nACGTN\n", T0 + timedelta(seconds=i))
    return count


def _oci_put(emu: FastListingEmulator, bucket: str, name: str, data: bytes, created: datetime) -> str:
    emu.create_bucket(bucket)
    return emu.put(bucket, name, data, created)


def _oci_seed(emu: FastListingEmulator, bucket: str, count: int, seed: int, prefix: str) -> int:
    """Put ``count`` tiny FASTA objects named PREFIX + uuid + .mfasta.gz, one second apart."""
    emu.create_bucket(bucket)
    items = ((f"{prefix}{guid}.mfasta.gz", b">" + guid.encode() + b"\nACGTN\n", T0 + timedelta(seconds=i))
             for i, guid in enumerate(uuid_guids(count, seed)))
    return emu.put_many(bucket, items)


def _fn4_reset(st: FN4StandIn) -> None:
    with st._lock:
        st.guids.clear()
        st.inserts.clear()
        st.requests.clear()
        st.clear_script()
        st.insert_delay = 0.0


def _fn4_add_guids(st: FN4StandIn, count: int, seed: int) -> int:
    with st._lock:
        st.guids.update(dict.fromkeys(uuid_guids(count, seed)))
        return len(st.guids)


def _fn4_inserts(st: FN4StandIn, since: int) -> list[tuple[str | None, int, float, float]]:
    with st._lock:
        return [(r.guid, r.status, r.started, r.ended) for r in st.inserts[since:]]


def _set_attr(name: str) -> Callable[[Any, Any], None]:
    return lambda target, value: setattr(target, name, value)


OCI_COMMANDS: dict[str, Callable[..., Any]] = {
    "create_bucket": lambda emu, bucket: emu.create_bucket(bucket),
    "put": _oci_put,
    "put_tiny": _oci_put_tiny,
    "add_fault": lambda emu, kwargs: emu.add_fault(Fault(**kwargs)),
    "clear_faults": lambda emu: emu.clear_faults(),
    "clear_requests": lambda emu: emu.clear_requests(),
    "list_stats": lambda emu: (emu.list_calls, emu.list_seconds),
    "errors": lambda emu: list(emu.errors),
    "seed": lambda emu, bucket, count, seed, prefix="": _oci_seed(emu, bucket, count, seed, prefix),
    "set_latency": _set_attr("list_latency"),
}
FN4_COMMANDS: dict[str, Callable[..., Any]] = {
    "reset": _fn4_reset,
    "add_guids": _fn4_add_guids,
    "set_delay": _set_attr("insert_delay"),
    "insert_count": lambda st: len(st.inserts),
    "inserts": _fn4_inserts,
    "bytes_sent": lambda st, prefix="": st.bytes_sent(prefix),
    "guid_count": lambda st: len(st.guids),
}


def _serve(role: str, authkey: bytes, parent: Any) -> None:
    """Body of a server process: run the emulator or the stand-in and obey commands."""
    logging.basicConfig(level=logging.WARNING)
    lifetime = threading.Timer(SERVER_LIFETIME, os._exit, args=(3,))
    lifetime.daemon = True
    lifetime.start()
    if role == "oci":
        target: Any = FastListingEmulator(NAMESPACE).start()
        commands, url = OCI_COMMANDS, target.endpoint
    else:
        target = FN4StandIn().start()
        commands, url = FN4_COMMANDS, target.url
    commands = {**commands, "cpu": lambda _target: time.process_time()}
    listener = Listener(("127.0.0.1", 0), authkey=authkey)
    finished = threading.Event()

    def handle(conn: Any) -> None:
        with conn:
            while not finished.is_set():
                try:
                    command, args = conn.recv()
                except (EOFError, OSError):
                    return
                if command == "quit":
                    finished.set()
                    conn.send(("ok", None))
                    return
                try:
                    conn.send(("ok", commands[command](target, *args)))
                except Exception:
                    conn.send(("error", traceback.format_exc()))

    def accept() -> None:
        while not finished.is_set():
            try:
                conn = listener.accept()
            except OSError:
                return
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    def watch_parent() -> None:  # the benchmark died: do not outlive it
        try:
            parent.recv()
        except (EOFError, OSError):
            pass
        finished.set()

    threading.Thread(target=accept, daemon=True).start()
    threading.Thread(target=watch_parent, daemon=True).start()
    parent.send((listener.address, url))
    finished.wait(SERVER_LIFETIME)
    target.stop()
    listener.close()
    os._exit(0)


class Remote:
    """Send commands to a server process; one connection per Remote, one call at a time."""

    def __init__(self, address: Any, authkey: bytes) -> None:
        self._conn = Client(address, authkey=authkey)
        self._lock = threading.Lock()

    def __call__(self, command: str, *args: Any, timeout: float = CALL_TIMEOUT) -> Any:
        with self._lock:
            self._conn.send((command, args))
            if not self._conn.poll(timeout):
                raise TimeoutError(f"server did not answer {command} within {timeout} s")
            status, value = self._conn.recv()
        if status != "ok":
            raise RuntimeError(f"server failed {command}:\n{value}")
        return value

    def close(self) -> None:
        self._conn.close()


class Servers:
    """The emulator and the stand-in, each in a spawned process of its own."""

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        self.authkey = secrets.token_bytes(16)
        self.procs: list[Any] = []
        self.pipes: list[Any] = []
        self.info: dict[str, tuple[Any, str]] = {}

    def __enter__(self) -> Servers:
        for role in ("oci", "fn4"):
            mine, theirs = self.ctx.Pipe()
            proc = self.ctx.Process(target=_serve, args=(role, self.authkey, theirs), name=f"bench-{role}",
                                    daemon=True)
            proc.start()
            theirs.close()
            self.procs.append(proc)
            self.pipes.append(mine)
            if not mine.poll(60):
                raise RuntimeError(f"the {role} server process did not start")
            self.info[role] = mine.recv()
        self.oci = Remote(self.info["oci"][0], self.authkey)
        self.fn4 = Remote(self.info["fn4"][0], self.authkey)
        return self

    @property
    def endpoint(self) -> str:
        return self.info["oci"][1]

    @property
    def fn4_url(self) -> str:
        return self.info["fn4"][1]

    def __exit__(self, *exc: Any) -> None:
        for remote in (getattr(self, "oci", None), getattr(self, "fn4", None)):
            if remote is not None:
                try:
                    remote("quit", timeout=10)
                except Exception:
                    pass
                remote.close()
        for pipe in self.pipes:
            pipe.close()
        for proc in self.procs:
            proc.join(10)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)


# ---- Measuring in the loader process ---------------------------------------------------------


def _vm(field: str) -> int:
    """Return a /proc/self/status figure in bytes (VmRSS, VmHWM)."""
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else 0


def _reset_peak() -> bool:
    """Make VmHWM start again from the current RSS (Linux 4.0+)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class Probe:
    """Wall time, process CPU, peak RSS above the start, and what the servers did, around a block."""

    def __init__(self, fn4: Remote, oci: Remote, baseline: int | None = None) -> None:
        self.fn4, self.oci, self.baseline = fn4, oci, baseline

    def __enter__(self) -> Probe:
        gc.collect()
        self.bytes0 = self.fn4("bytes_sent")
        self.list0 = self.oci("list_stats")
        self.rss0 = _vm("VmRSS")
        self.peak_reset = _reset_peak()
        self.cpu0, self.t0 = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.wall = time.perf_counter() - self.t0
        self.cpu = time.process_time() - self.cpu0
        self.hwm = _vm("VmHWM") if self.peak_reset else 0
        self.peak = self.hwm - self.rss0
        self.retained = _vm("VmRSS") - self.rss0
        self.fn4_bytes = self.fn4("bytes_sent") - self.bytes0
        calls, seconds = self.oci("list_stats")
        self.list_pages, self.list_seconds = calls - self.list0[0], seconds - self.list0[1]

    def figures(self) -> dict[str, float]:
        baseline = self.rss0 if self.baseline is None else self.baseline
        return {"wall": self.wall, "cpu": self.cpu, "peak": self.peak, "retained": self.retained,
                "footprint": self.hwm - baseline, "hwm": self.hwm,
                "fn4_bytes": self.fn4_bytes, "list_pages": self.list_pages, "list_seconds": self.list_seconds}


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _naive(moment: datetime) -> datetime:
    return moment.astimezone(timezone.utc).replace(tzinfo=None)


def _by_time(obj: osa.StoredObject) -> tuple[datetime, str]:
    return (obj.time_created, obj.name)


# ---- The reference: a plain sequential loop --------------------------------------------------


class ReferenceLoop:
    """What a plain loader does: each cycle lists the bucket, fetches fn4's full guid list and the
    catalogue's finished files, then for each new file oldest first downloads, parses, inserts and
    writes its catalogue row, one after the other."""

    def __init__(self, store: osa.ObjectStoreClient, fn4: osa.FN4Client, engine: sa.Engine,
                 settings: osa.Settings) -> None:
        self.store, self.fn4, self.engine, self.settings = store, fn4, engine, settings
        self.metadata, self.batches, self.attempts = osa.build_tables()
        self.metadata.create_all(engine, checkfirst=True)
        self.host = socket.gethostname()
        self.timings: list[tuple[float, float, float, float]] = []   # read start/end, insert start/end
        self.steps: dict[str, float] = {}

    def _common(self) -> dict[str, Any]:
        return {"host_name": self.host, "findneighbour_server_url": self.fn4.base_url,
                "oci_namespace": self.store.namespace, "bucket_name": self.store.bucket}

    def _write(self, table: sa.Table, values: dict[str, Any]) -> None:
        with self.engine.begin() as conn:
            conn.execute(table.insert(), [values])

    def finished_files(self) -> set[tuple[str, str]]:
        a = self.attempts.c
        query = sa.select(a.file_name, a.object_etag).where(
            a.findneighbour_server_url == self.fn4.base_url, a.oci_namespace == self.store.namespace,
            a.bucket_name == self.store.bucket, a.completed == 1)
        with self.engine.connect() as conn:
            return {(name, etag) for name, etag in conn.execute(query)}

    def plan(self) -> tuple[list[osa.StoredObject], list[osa.StoredObject], int]:
        """List, fetch the guid list and the finished files, diff; time each step in ``steps``."""
        t0 = time.perf_counter()
        objects = sorted(self.store.list_objects(self.settings.prefix), key=_by_time)
        t1 = time.perf_counter()
        server = self.fn4.guids()
        t2 = time.perf_counter()
        done = self.finished_files()
        t3 = time.perf_counter()
        todo = [o for o in objects if o.key not in done and o.guid not in server]
        t4 = time.perf_counter()
        self.steps = {"list": t1 - t0, "guids": t2 - t1, "catalogue": t3 - t2, "diff": t4 - t3}
        return objects, todo, len(server)

    def run_cycle(self) -> tuple[int, int]:
        started = osa.utcnow()
        objects, todo, in_server = self.plan()
        self._write(self.batches, {**self._common(), "check_time": _naive(started), "objects_listed": len(objects),
                                   "batch_size": len(todo), "number_in_server": in_server, "reconciled": 1})
        for number, obj in enumerate(todo, 1):
            self._load_one(obj, number, len(todo), started)
        return len(objects), len(todo)

    def _load_one(self, obj: osa.StoredObject, number: int, size: int, started: datetime) -> None:
        values = {**self._common(), "file_name": obj.name, "object_etag": obj.etag, "object_size": obj.size,
                  "object_time_created": _naive(obj.time_created), "batch_start_time": _naive(started),
                  "batch_sample_number": number, "batch_size": size, "fn4id": obj.guid, "failed_attempts": 0}
        read_start, p0 = osa.utcnow(), time.perf_counter()
        try:
            seqid, seq = osa.parse_fasta(self.store.read_object(obj, self.settings.max_object_bytes))
        except osa.LoaderError as exc:
            values.update(parse_status=getattr(exc, "status", "download_failed"), outcome=osa.FAILED,
                          completed=1, error_text=str(exc)[:2000], bucket_read_start_time=_naive(read_start),
                          bucket_read_end_time=_naive(osa.utcnow()))
            self._write(self.attempts, values)
            return
        p1, read_end = time.perf_counter(), osa.utcnow()
        insert_start, p2 = osa.utcnow(), time.perf_counter()
        result = insert(self.fn4, obj.guid, seq)
        p3, insert_end = time.perf_counter(), osa.utcnow()
        values.update(parse_status="ok", seqid=seqid[:256], len_seq=len(seq), first_128_chars=seq[:128].decode(),
                      bucket_read_start_time=_naive(read_start), bucket_read_end_time=_naive(read_end),
                      insert_start_time=_naive(insert_start), insert_end_time=_naive(insert_end),
                      insert_status_code=result.status_code, outcome=result.outcome,
                      completed=int(result.outcome not in osa.UNFINISHED),
                      error_text=None if result.outcome in osa.LOADED else result.message[:2000])
        self._write(self.attempts, values)
        self.timings.append((p0, p1, p2, p3))


# ---- Loader workers (each a fresh spawned process) ---------------------------------------------


class MarkingFN4Client(osa.FN4Client):
    """The fn4 client, noting the process's CPU time as each insert starts: the steady-state CPU per
    sample is the CPU between two inserts, start-up (the first cycle's listing, reads) left out."""

    def __init__(self, base_url: str) -> None:
        super().__init__(base_url)
        self.marks: list[float] = []
        self.snapshot_at: tuple[int, ...] = ()          # marks at which each thread's CPU time is noted too
        self.threads_at: dict[int, dict[str, float]] = {}

    def send_insert(self, body: bytes) -> osa.InsertSent:
        self.marks.append(time.process_time())
        if len(self.marks) - 1 in self.snapshot_at:
            self.threads_at[len(self.marks) - 1] = thread_cpu()
        return super().send_insert(body)

    def per_thread(self) -> dict[str, float]:
        """CPU seconds per sample of each thread between the two snapshots (threads alive at both)."""
        if len(self.threads_at) != 2:
            return {}
        (first, before), (last, after) = sorted(self.threads_at.items())
        return {name: (after[name] - before[name]) / (last - first) for name in after if name in before}


def thread_cpu() -> dict[str, float]:
    """Return the CPU seconds each live thread of this process has run, by name (Linux; else nothing)."""
    spent = {}
    for thread in threading.enumerate():
        try:
            spent[thread.name] = int(Path(f"/proc/self/task/{thread.native_id}/schedstat").read_text().split()[0]) / 1e9
        except (OSError, ValueError, IndexError):
            continue
    return spent


def steady_cpu(marks: list[float]) -> float:
    """CPU seconds per sample between inserts, the first tenth of them (start-up) left out."""
    first = max(1, len(marks) // 10)
    return (marks[-1] - marks[first]) / (len(marks) - 1 - first) if len(marks) - 1 > first else float("nan")


class Setup:
    """What a worker builds from its parameters: remotes, clients and a catalogue."""

    def __init__(self, params: dict[str, Any]) -> None:
        self.params = params
        self.oci = Remote(params["oci"], params["authkey"])
        self.fn4 = Remote(params["fn4"], params["authkey"])
        self.fn4_client = MarkingFN4Client(params["fn4_url"])
        self.database = f"sqlite:///{Path(params['tmp']) / (params['tag'] + '.sqlite')}"

    def store(self, bucket: str) -> osa.ObjectStoreClient:
        return osa.ObjectStoreClient.from_config(NAMESPACE, bucket, config_file=self.params["oci_config"],
                                                 endpoint=self.params["endpoint"])

    def settings(self, bucket: str) -> osa.Settings:
        return osa.Settings()

    def catalogue(self, journaled_bucket: str | None = None) -> osa.LoadLogger:
        """The catalogue; with a bucket, rows are journaled as run's are."""
        return osa.LoadLogger.from_database_arg(self.database, bucket=journaled_bucket)

    def log_as_run(self) -> None:
        """Log as the run command does (one INFO line a sample, secrets redacted), into a file here."""
        file = open(Path(self.params["tmp"]) / f"{self.params['tag']}.log", "a")  # open while the worker lives
        logging.getLogger().handlers.clear()  # the worker's own handler would write every line a second time
        with contextlib.redirect_stderr(file):
            osa._configure_logging("INFO", [], "text")

    def loader(self, bucket: str, catalogue: osa.LoadLogger) -> osa.LoadLoop:
        return osa.LoadLoop(self.store(bucket), self.fn4_client, catalogue, self.settings(bucket),
                            clock=osa.utcnow, stop=threading.Event())

    def reference(self, bucket: str) -> ReferenceLoop:
        engine = sa.create_engine(self.database)
        return ReferenceLoop(self.store(bucket), self.fn4_client, engine, self.settings(bucket))


def _profile_text(profiler: cProfile.Profile, title: str, limit: int = 18) -> str:
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.strip_dirs().sort_stats("tottime").print_stats(limit)
    text = out.getvalue()
    start = text.find("   ncalls")
    total = re.search(r"in ([\d.]+) seconds", text)
    return f"### {title} (cProfile, by own time; total {total.group(1) if total else '?'} s)\n" + text[start:]


def _utilisation(inserts: list[tuple[str | None, int, float, float]]) -> dict[str, float]:
    """Busy share of fn4 from its insert records: sum of insert times / first start to last end."""
    if not inserts:
        return {}
    busy = sum(ended - started for _, _, started, ended in inserts)
    span = inserts[-1][3] - inserts[0][2]
    return {"utilisation": busy / span if span > 0 else float("nan"),
            "server_gap": (span - busy) / max(len(inserts) - 1, 1),
            "insert_median": _median([ended - started for _, _, started, ended in inserts]),
            "inserts": len(inserts)}


def _read_parse(store: osa.ObjectStoreClient, obj: osa.StoredObject) -> tuple[str, bytes]:
    return osa.parse_fasta(store.read_object(obj, osa.DEFAULT_MAX_OBJECT_BYTES))


def _backlog_worker(params: dict[str, Any]) -> dict[str, Any]:
    """Load one profile's backlog with the loader or the reference; measure everything."""
    setup = Setup(params)
    oci, fn4 = setup.oci, setup.fn4
    bucket, mode = params["bucket"], params["mode"]
    fn4("reset")
    oci("clear_faults")
    catalogue = setup.catalogue(bucket if mode == "loader" else None)
    if mode == "loader":  # as run loads: journaled rows, INFO logs; every code path warmed on one sample first
        setup.log_as_run()
        setup.loader(WARM_BUCKET, catalogue).run_cycle()
        catalogue.flush(30)
        runner: Any = setup.loader(bucket, catalogue)
    else:
        setup.reference(WARM_BUCKET).run_cycle()
        runner = setup.reference(bucket)
    store = setup.store(bucket)
    objects = sorted(store.list_objects(), key=_by_time)
    base = []
    for obj in objects[:5]:  # download + parse without any server delay; the least is the intrinsic cost
        t0 = time.perf_counter()
        _read_parse(store, obj)
        base.append(time.perf_counter() - t0)
    delay = max(0.0, params["D"] - min(base))
    oci("add_fault", {"kind": "delay", "delay": delay, "times": -1, "method": "GET",
                      "path_contains": f"/b/{bucket}/o/"})
    fn4("set_delay", params["L"])
    first = fn4("insert_count")
    setup.fn4_client.marks.clear()
    if len(objects) >= 20:  # per thread from the steady state's start to a mark the prefetcher is alive at
        setup.fn4_client.snapshot_at = (max(1, len(objects) // 10), len(objects) - 3)
    with Probe(fn4, oci) as probe:
        runner.run_cycle()
        steady = steady_cpu(setup.fn4_client.marks)
        if mode == "loader":
            catalogue.flush(120)
    oci("clear_faults")
    fn4("set_delay", 0.0)
    inserts = fn4("inserts", first)
    result: dict[str, Any] = {**probe.figures(), **_utilisation(inserts), "mode": mode, "samples": len(objects),
                              "inserted": sum(1 for r in inserts if r[1] == 200), "delay": delay, "base_d": min(base),
                              "steady_cpu": steady, "threads": setup.fn4_client.per_thread()}
    if mode == "loader":
        a = catalogue.attempts.c
        query = (sa.select(a.bucket_read_start_time, a.bucket_read_end_time, a.insert_start_time, a.insert_end_time)
                 .where(a.bucket_name == bucket, a.outcome == osa.INSERTED).order_by(a.batch_sample_number))
        with catalogue.engine.connect() as conn:
            rows = list(conn.execute(query))
        result["d_measured"] = _median([(r[1] - r[0]).total_seconds() for r in rows])
        result["client_gap"] = _median([(b[2] - a_[3]).total_seconds() for a_, b in zip(rows, rows[1:])])
    else:
        timings = runner.timings
        result["d_measured"] = _median([t[1] - t[0] for t in timings])
        result["client_gap"] = _median([b[2] - a_[3] for a_, b in zip(timings, timings[1:])])
    result["unwritten"] = len(catalogue.close(10))
    if mode == "loader":
        result["breakdown"] = _per_genome_breakdown(store, setup.fn4_client, objects[:5])
        oci("add_fault", {"kind": "delay", "delay": delay, "times": -1, "method": "GET",
                          "path_contains": f"/b/{bucket}/o/"})
        fn4("set_delay", params["L"])  # the same steps, each after a network wait, as in the loader
        result["breakdown_waiting"] = _per_genome_breakdown(store, setup.fn4_client, objects[:20])
        oci("clear_faults")
        fn4("set_delay", 0.0)
        count = min(len(objects), max(10, int(3.0 / (params["L"] + 0.01))))
        result["ceiling"] = _ceiling(fn4, setup.fn4_client, store, objects[:count], params["L"])
        if params.get("profile_run"):
            profiler = cProfile.Profile()
            profiler.enable()
            for obj in objects[:5]:
                seqid, seq = _read_parse(store, obj)
                insert(setup.fn4_client, obj.guid, seq)
            profiler.disable()
            result["profile_text"] = _profile_text(
                profiler, f"per-genome path, {min(5, len(objects))} {params['profile']} genomes in one thread: "
                          "read_object + parse_fasta + FN4Client.post_insert (fn4 answers 201)")
    return result


def _ceiling(fn4: Remote, client: osa.FN4Client, store: osa.ObjectStoreClient, objects: list[osa.StoredObject],
             delay: float) -> dict[str, float]:
    """Utilisation of back-to-back FN4Client.post_insert calls of sequences parsed beforehand: the most a
    client sending one insert at a time can reach against this stand-in on this machine."""
    samples = [(obj.guid + "-c", _read_parse(store, obj)[1]) for obj in objects]
    fn4("set_delay", delay)
    first = fn4("insert_count")
    for guid, seq in samples:
        insert(client, guid, seq)
    fn4("set_delay", 0.0)
    return _utilisation(fn4("inserts", first))


def _per_genome_breakdown(store: osa.ObjectStoreClient, fn4: osa.FN4Client,
                          objects: list[osa.StoredObject]) -> dict[str, float]:
    """CPU seconds of each step for one genome, median over a few, measured in one thread."""
    steps: dict[str, list[float]] = {"read_object (signed GET, md5, gunzip)": [], "parse_fasta": [],
                                     "FN4Client.insert_form + post_insert (client side)": [],
                                     "AttemptRow + LoadLogger.record_attempt": []}
    engine = sa.create_engine("sqlite://")
    unstarted = osa.LoadLogger(engine)  # its writer never starts: rows are only queued, as on the insert path
    for obj in objects:
        t0 = time.thread_time()
        data = store.read_object(obj, osa.DEFAULT_MAX_OBJECT_BYTES)
        t1 = time.thread_time()
        seqid, seq = osa.parse_fasta(data)
        t2 = time.thread_time()
        insert(fn4, obj.guid, seq)
        t3 = time.thread_time()
        unstarted.record_attempt(osa.AttemptRow(
            host_name="benchmark", findneighbour_server_url=fn4.base_url, oci_namespace=store.namespace,
            bucket_name=store.bucket, file_name=obj.name, object_etag=obj.etag, object_size=obj.size,
            object_time_created=obj.time_created, batch_start_time=osa.utcnow(), seqid=seqid, len_seq=len(seq),
            first_128_chars=seq[:128].decode("ascii"), insert_start_time=osa.utcnow(),
            insert_end_time=osa.utcnow(), outcome=osa.INSERTED, completed=1))
        t4 = time.thread_time()
        for name, spent in zip(steps, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            steps[name].append(spent)
        del data, seq
    engine.dispose()
    return {name: _median(values) for name, values in steps.items()}


def _scale_setup(params: dict[str, Any]) -> tuple[Setup, osa.LoadLogger, int]:
    setup = Setup(params)
    catalogue = setup.catalogue()
    gc.collect()
    return setup, catalogue, _vm("VmRSS")


def _loader_cycle(loader: osa.LoadLoop, catalogue: osa.LoadLogger, probe: Probe) -> dict[str, Any]:
    with probe:
        t0 = time.perf_counter()
        summary = loader.run_cycle()
        cycle = time.perf_counter() - t0
        written = catalogue.flush(1800)
    return {**probe.figures(), "cycle": cycle, "written": written, "tried": summary.tried, "listed": summary.listed,
            "loaded": summary.loaded}


def _scale_first_worker(params: dict[str, Any]) -> dict[str, Any]:
    """Fresh process: fn4 holds every guid; the first cycle records every object as in_server,
    then two idle cycles follow in the same process."""
    setup, catalogue, baseline = _scale_setup(params)
    setup.fn4("reset")
    setup.fn4("add_guids", params["size"], params["seed"])
    loader = setup.loader(params["bucket"], catalogue)
    out = {}
    for name in ("first", "idle2", "idle3"):
        out[name] = _loader_cycle(loader, catalogue, Probe(setup.fn4, setup.oci, baseline))
    out["unwritten"] = len(catalogue.close(10))
    return out


def _scale_restart_worker(params: dict[str, Any]) -> dict[str, Any]:
    """Fresh process on the filled catalogue: the first cycle after a restart, then an idle cycle,
    then list and plan timed on their own."""
    setup, catalogue, baseline = _scale_setup(params)
    loader = setup.loader(params["bucket"], catalogue)
    out: dict[str, Any] = {}
    for name in ("restart", "idle"):
        out[name] = _loader_cycle(loader, catalogue, Probe(setup.fn4, setup.oci, baseline))
    t0 = time.perf_counter()
    objects = sorted(loader.store.list_objects(loader.settings.prefix), key=_by_time)
    t1 = time.perf_counter()
    loader._refresh_from_catalogue()
    todo, settled = loader._plan(objects, None)
    t2 = time.perf_counter()
    out["listdiff"] = {"list": t1 - t0, "diff": t2 - t1, "to_load": len(todo)}
    if params.get("profile_run"):
        profiler = cProfile.Profile()
        profiler.enable()
        loader.run_cycle()
        catalogue.flush(60)
        profiler.disable()
        out["profile_text"] = _profile_text(profiler, f"idle LoadLoop.run_cycle(), {params['size']:,} objects loaded")
        profiler = cProfile.Profile()
        profiler.enable()
        setup.loader(params["bucket"], catalogue).run_cycle()
        catalogue.flush(60)
        profiler.disable()
        out["profile_restart"] = _profile_text(
            profiler, f"first LoadLoop.run_cycle() after a restart, {params['size']:,} objects loaded")
    out["unwritten"] = len(catalogue.close(10))
    return out


def _scale_reference_worker(params: dict[str, Any]) -> dict[str, Any]:
    """Fresh process: two idle cycles of the reference, then its list+diff steps."""
    setup, catalogue, baseline = _scale_setup(params)
    catalogue.close(10)
    reference = setup.reference(params["bucket"])
    out: dict[str, Any] = {}
    for name in ("ref1", "ref2"):
        with Probe(setup.fn4, setup.oci, baseline) as probe:
            t0 = time.perf_counter()
            reference.run_cycle()
            cycle = time.perf_counter() - t0
        out[name] = {**probe.figures(), "cycle": cycle, "steps": dict(reference.steps)}
    reference.plan()
    out["listdiff"] = dict(reference.steps)
    reference.engine.dispose()
    return out


# ---- National scale (--scale): 2 million objects --------------------------------------------


def _national_loader(setup: Setup, catalogue: osa.LoadLogger, bucket: str, **settings: Any) -> osa.LoadLoop:
    return osa.LoadLoop(setup.store(bucket), setup.fn4_client, catalogue,
                        replace(setup.settings(bucket), **settings), clock=osa.utcnow, stop=threading.Event())


def _attempt_rows(catalogue: osa.LoadLogger) -> int:
    with catalogue.engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(catalogue.attempts)).scalar() or 0


def _national_first_worker(params: dict[str, Any]) -> dict[str, Any]:
    """Fresh process, empty catalogue, fn4 holding every guid: the migration cycle, then idle cycles."""
    setup, catalogue, baseline = _scale_setup(params)
    loader = _national_loader(setup, catalogue, params["bucket"], list_workers=params["workers"])
    out: dict[str, Any] = {"baseline": baseline}
    for name in ("migration", "idle", "idle2"):
        out[name] = _loader_cycle(loader, catalogue, Probe(setup.fn4, setup.oci, baseline))
    out["rows"] = _attempt_rows(catalogue)
    out["unwritten"] = len(catalogue.close(30))
    return out


def _national_restart_worker(params: dict[str, Any]) -> dict[str, Any]:
    """Fresh process on the filled catalogue: the first cycle (reads the catalogue, reconciles), an idle
    cycle listing by key ranges, then an idle cycle listing page by page (the sequential reference);
    then fn4's guid list fetched alone, streamed and whole."""
    setup, catalogue, baseline = _scale_setup(params)
    loader = _national_loader(setup, catalogue, params["bucket"], list_workers=params["workers"])
    out: dict[str, Any] = {"baseline": baseline}
    out["restart"] = _loader_cycle(loader, catalogue, Probe(setup.fn4, setup.oci, baseline))
    out["idle"] = _loader_cycle(loader, catalogue, Probe(setup.fn4, setup.oci, baseline))
    loader.settings = replace(loader.settings, list_workers=1)
    out["sequential"] = _loader_cycle(loader, catalogue, Probe(setup.fn4, setup.oci, baseline))
    catalogue.close(30)
    for name, fetch in (("guid_set", setup.fn4_client.guid_set), ("guids", setup.fn4_client.guids)):
        gc.collect()
        with Probe(setup.fn4, setup.oci) as probe:
            held = fetch()
        out[name] = {**probe.figures(), "count": len(held)}
        del held
    return out


def _national_rename_worker(params: dict[str, Any]) -> dict[str, Any]:
    """Fresh process, --on-success rename:loaded/, a bucket of N archived objects: the first cycle
    (reconciles, loads the waiting), then a cycle with new objects waiting, then one with none."""
    setup, catalogue, baseline = _scale_setup(params)
    bucket, waiting = params["bucket"], params["waiting"]
    loader = _national_loader(setup, catalogue, bucket, list_workers=params["workers"], on_success="rename:loaded/")
    out: dict[str, Any] = {"baseline": baseline}
    out["first"] = _loader_cycle(loader, catalogue, Probe(setup.fn4, setup.oci, baseline))
    setup.oci("seed", bucket, waiting, params["seed"] + 1)
    out["waiting"] = _loader_cycle(loader, catalogue, Probe(setup.fn4, setup.oci, baseline))
    out["empty"] = _loader_cycle(loader, catalogue, Probe(setup.fn4, setup.oci, baseline))
    out["unwritten"] = len(catalogue.close(30))
    return out


WORKERS = {"backlog": _backlog_worker, "scale_first": _scale_first_worker, "scale_restart": _scale_restart_worker,
           "scale_reference": _scale_reference_worker, "national_first": _national_first_worker,
           "national_restart": _national_restart_worker, "national_rename": _national_rename_worker}


def _worker_main(kind: str, params: dict[str, Any], conn: Any) -> None:
    logging.basicConfig(level=logging.WARNING)
    try:
        conn.send(("ok", WORKERS[kind](params)))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def run_worker(ctx: Any, kind: str, params: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run a worker in a fresh spawned process; return its result, or {'error': ...}."""
    mine, theirs = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_worker_main, args=(kind, params, theirs), name=f"bench-{kind}", daemon=True)
    proc.start()
    theirs.close()
    try:
        if not mine.poll(timeout):
            return {"error": f"timed out after {timeout:.0f} s"}
        status, value = mine.recv()
        return value if status == "ok" else {"error": value}
    except EOFError:
        return {"error": f"worker died (exit code {proc.exitcode})"}
    finally:
        mine.close()
        proc.join(10)
        if proc.is_alive():
            proc.terminate()
            proc.join(5)


# ---- Report ----------------------------------------------------------------------------------


def machine() -> str:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{os.cpu_count()} CPUs ({usable} usable), {model}; Python {platform.python_version()} "
            f"({platform.python_implementation()}), {platform.system()} {platform.release()}")


def code_fingerprint() -> str:
    """Short digests of the files measured, so a table can be tied to the code it measured."""
    parts = []
    for path in (HERE.parent / "objectstoreaccess.py", HERE / "fn4_standin.py", HERE / "oci_emulator.py"):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12] if path.exists() else "missing"
        parts.append(f"{path.name} sha256:{digest}")
    return ", ".join(parts)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None or seconds != seconds else f"{seconds * 1000:.1f}"


def _verdict(ok: bool) -> str:
    return "pass" if ok else "**FAIL**"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _error_line(result: dict[str, Any]) -> str:
    return "error: " + (result["error"].strip().splitlines() or ["?"])[-1][:100]


def _report_backlog(backlog: list[tuple[Profile, dict[str, Any]]]) -> list[str]:
    out = ["## 1. fn4 utilisation while a backlog loads", "",
           "Utilisation = sum of (ended - started) over the stand-in's insert records / (last ended - first "
           "started); what counts as busy is the stand-in's own InsertRecord definition. D = download + "
           "gunzip + parse, made realistic by a server-side delay on the emulator's GET object. 'gap server' = "
           "mean idle time between two insert records; 'gap client' = median time from one insert's answer to "
           "the next insert's start on the loader's own clock. The 'ceiling' rows send sequences parsed "
           "beforehand back to back with FN4Client.post_insert: the most a client sending one insert at a time "
           "reaches against this stand-in on this machine.", ""]
    rows = []
    for p, r in backlog:
        name = "loader (pipelined)" if r.get("mode") == "loader" else "reference (sequential)"
        if "error" in r:
            rows.append([p.label, name, _error_line(r)] + [""] * 9)
            continue
        util = r.get("utilisation", float("nan"))
        is_loader = r["mode"] == "loader"
        rows.append([p.label, name, f"{r['inserted']}/{r['samples']}", f"{p.insert_delay * 1000:.0f}",
                     _ms(r.get("insert_median")), f"{p.download_parse * 1000:.0f}", _ms(r.get("d_measured")),
                     _ms(r.get("server_gap")), _ms(r.get("client_gap")), f"{util:.3f}",
                     f"≥{p.target:.2f}" if is_loader else "-", _verdict(util >= p.target) if is_loader else "-"])
        ceiling = r.get("ceiling")
        if ceiling:
            rows.append([p.label, "ceiling (back-to-back inserts)", f"{ceiling['inserts']:.0f}",
                         f"{p.insert_delay * 1000:.0f}", _ms(ceiling["insert_median"]), "-", "-",
                         _ms(ceiling["server_gap"]), "-", f"{ceiling['utilisation']:.3f}", "-", "-"])
    return out + _table(["profile", "loader", "inserts", "L set ms", "insert median ms", "D target ms",
                         "D measured ms", "gap server ms", "gap client ms", "utilisation", "target", "result"], rows)


def _report_cpu_rss(backlog: list[tuple[Profile, dict[str, Any]]]) -> list[str]:
    out = ["## 2.-3. Loader process CPU per sample and peak RSS above idle", "",
           "CPU = process_time of the loader process (every thread, catalogue writer included) over the whole "
           "cycle, / samples; the emulator and the stand-in run in other processes. Peak RSS = VmHWM (reset "
           "through /proc/self/clear_refs) - VmRSS just before the cycle; 'genomes' worth' divides it by one "
           "sequence's size. Targets apply to the tuberculosis-like loader.", ""]
    rows = []
    for p, r in backlog:
        if "error" in r:
            continue
        name = "loader (pipelined)" if r["mode"] == "loader" else "reference (sequential)"
        per = r["cpu"] / max(r["samples"], 1) * 1000
        genomes = r["peak"] / p.length
        checked = p.key == "tb" and r["mode"] == "loader"
        rows.append([p.label, name, f"{per:.1f}", f"{r['peak'] / MB:.1f}", f"{genomes:.1f}",
                     f"{r['retained'] / MB:.1f}",
                     f"≤{CPU_TARGET_MS:.0f} ms / ≤{PEAK_TARGET_GENOMES:.0f} genomes" if checked else "-",
                     f"{_verdict(per <= CPU_TARGET_MS)} / {_verdict(genomes <= PEAK_TARGET_GENOMES)}"
                     if checked else "-"])
    out += _table(["profile", "loader", "CPU ms/sample", "peak RSS above idle MB", "genomes' worth",
                   "RSS kept after MB", "target CPU / RSS", "result CPU / RSS"], rows)
    loaders = [(p, r) for p, r in backlog if r.get("breakdown")]
    if loaders:
        out += ["", "Where one sample's CPU goes, in ms: each step alone in one thread (thread_time), "
                    "median of 5 samples:", ""]
        steps = list(loaders[0][1]["breakdown"])
        rows = [[step] + [_ms(r["breakdown"].get(step)) for _, r in loaders] for step in steps]
        rows.append(["sum"] + [_ms(sum(r["breakdown"].values())) for _, r in loaders])
        out += _table(["step"] + [p.label for p, _ in loaders], rows)
    return out


def _report_scale(scale: dict[int, dict[str, Any]]) -> list[str]:
    sizes = sorted(scale)
    biggest = sizes[-1] if sizes else 0
    out = [f"## 4. Cycles at scale: {' and '.join(f'{s:,}' for s in sizes)} objects, all loaded and in fn4", "",
           "wall = the cycle plus the catalogue flush after it; 'list s (emulator)' is the emulator's own time "
           "building list pages, inside the wall time. RSS growth = VmHWM - VmRSS before the cycle; footprint = "
           "VmHWM - VmRSS of the fresh process before its first cycle. Targets apply to idle cycles at "
           f"{biggest:,} objects.", ""]
    labels = (("scale_first", "first", "loader: first cycle (records every object in_server)"),
              ("scale_first", "idle2", "loader: 2nd cycle, same process (folds the first cycle's rows)"),
              ("scale_first", "idle3", "loader: 3rd cycle, same process (idle)"),
              ("scale_restart", "restart", "loader: first cycle after a restart (fresh process)"),
              ("scale_restart", "idle", "loader: next cycle in that process (idle)"),
              ("scale_reference", "ref1", "reference: idle cycle (fresh process)"),
              ("scale_reference", "ref2", "reference: next idle cycle"))
    idle = {"idle2", "idle3", "idle", "ref1", "ref2"}
    rows = []
    for size in sizes:
        for kind, key, label in labels:
            result = scale[size].get(kind, {})
            if "error" in result:
                rows.append([f"{size:,}", label, _error_line(result)] + [""] * 8)
                continue
            if key not in result:
                continue
            m = result[key]
            checked = size == biggest and key in idle
            ok = m["wall"] <= IDLE_TARGET_S and m["peak"] / MB <= IDLE_TARGET_MB
            rows.append([f"{size:,}", label, f"{m['wall']:.2f}", f"{m['cpu']:.2f}",
                         f"{m['list_seconds']:.2f}", str(m["list_pages"]), f"{m['peak'] / MB:.1f}",
                         f"{m['footprint'] / MB:.1f}", f"{m['fn4_bytes']:,}",
                         f"≤{IDLE_TARGET_S:.0f} s, ≤{IDLE_TARGET_MB:.0f} MB" if checked else "-",
                         _verdict(ok) if checked else "-"])
    out += _table(["objects", "cycle", "wall s", "CPU s", "list s (emulator)", "list pages", "RSS growth MB",
                   "footprint MB", "bytes fn4 sent", "target", "result"], rows)
    out += ["", "## 5. List+diff time", "",
            "loader: list through the OCI SDK against the emulator and sort; then fold new catalogue rows and "
            "plan (LoadLoop._plan). Reference: list and sort, fetch fn4's full guid list, read the finished files "
            "from the catalogue, diff.", ""]
    rows = []
    for size in sizes:
        loader = scale[size].get("scale_restart", {}).get("listdiff")
        reference = scale[size].get("scale_reference", {}).get("listdiff")
        if loader:
            rows.append([f"{size:,}", "loader", f"{loader['list']:.2f}", "-", "-", f"{loader['diff']:.3f}",
                         f"{loader['list'] + loader['diff']:.2f}"])
        if reference:
            rows.append([f"{size:,}", "reference", f"{reference['list']:.2f}", f"{reference['guids']:.3f}",
                         f"{reference['catalogue']:.3f}", f"{reference['diff']:.3f}",
                         f"{sum(reference.values()):.2f}"])
    return out + _table(["objects", "loader", "list s", "fn4 guids s", "catalogue read s", "diff/plan s",
                         "total s"], rows)


def put_genomes(ctx: Any, servers: Servers, profiles: list[Profile], shape: Shape) -> dict[str, list[int]]:
    """Generate every profile's genomes in a pool and put them, and the warm-up sample; return gzip sizes."""
    tasks = []
    for p_index, p in enumerate(profiles):
        for i, guid in enumerate(uuid_guids(p.samples, 1000 + p_index)):
            tasks.append((p.key, i, guid, p.length, shape, 7919 * p_index + i, p.gc))
    tasks.sort(key=lambda t: -t[3])  # biggest first, so the pool finishes together
    gz_sizes: dict[str, list[int]] = {}
    with ctx.Pool(max(1, min(4, os.cpu_count() or 1))) as pool:
        made = pool.imap_unordered(_generate, tasks, chunksize=1)
        for _ in tasks:
            bucket, index, name, data = made.next(timeout=300)
            servers.oci("put", bucket, name, data, T0 + timedelta(minutes=index))
            gz_sizes.setdefault(bucket, []).append(len(data))
    warm = gzip.compress(genome_fasta("warm-sample", 29_903, shape, 1), 6)
    servers.oci("put", WARM_BUCKET, "warm-sample.fasta.gz", warm, T0)
    return gz_sizes


def _run_backlog(ctx: Any, base: dict[str, Any], p: Profile, mode: str, run: int = 0) -> dict[str, Any]:
    params = {**base, "tag": f"{p.key}-{mode}-{run}", "bucket": p.key, "mode": mode, "profile": p.label,
              "L": p.insert_delay, "D": p.download_parse}
    budget = 90 + p.samples * (p.insert_delay + p.download_parse) * 5
    return run_worker(ctx, "backlog", params, budget)


def national(args: argparse.Namespace, progress: Callable[[str], None]) -> list[str]:
    """Run the --scale figures; return the report's lines."""
    ctx = multiprocessing.get_context("spawn")
    shape = shape_of_ac587()
    profiles = [replace(p, samples=QUICK_SAMPLES[p.key]) if args.quick else p for p in PROFILES]
    profiles = [replace(p, length=shape.length) if p.key == "tb" else p for p in profiles]
    count, workers, latency = args.objects, args.list_workers, args.page_latency
    runs: dict[str, dict[str, Any]] = {}
    backlog: list[tuple[Profile, dict[str, Any]]] = []
    with tempfile.TemporaryDirectory(prefix="fn4bench-") as tmp, Servers(ctx) as servers:
        base = {"oci": servers.info["oci"][0], "fn4": servers.info["fn4"][0], "authkey": servers.authkey,
                "fn4_url": servers.fn4_url, "endpoint": servers.endpoint, "tmp": tmp, "profile_run": args.profile,
                "oci_config": str(write_oci_config(Path(tmp) / "oci")), "workers": workers}
        only = set(args.only or NATIONAL_PARTS)
        progress(f"putting {count:,} objects kept in place, {count:,} archived under loaded/ and "
                 f"{args.waiting} waiting; {count:,} guids into fn4 (for: {', '.join(sorted(only))})")
        if "cycles" in only:
            servers.oci("seed", "national", count, 9000, timeout=1800)
        if "rename" in only:
            servers.oci("seed", "archived", count, 9100, "loaded/", timeout=1800)
            servers.oci("seed", "archived", args.waiting, 9200, timeout=60)
        servers.fn4("reset")
        servers.fn4("add_guids", count, 9000, timeout=600)
        servers.oci("set_latency", latency)
        budget = 600 + count * latency / 1000 * 3 + count / 1000
        for kind, bucket in (("national_first", "national"), ("national_restart", "national"),
                             ("national_rename", "archived")):
            if ("rename" if bucket == "archived" else "cycles") not in only:
                continue
            progress(f"{kind}: {bucket}, {workers} list workers, {latency * 1000:.0f} ms a page")
            params = {**base, "tag": bucket, "bucket": bucket, "seed": 9200, "waiting": args.waiting}
            runs[kind] = run_worker(ctx, kind, params, budget)
        servers.oci("set_latency", 0.0)
        if "backlog" in only:
            progress("generating genomes for the utilisation and CPU figures")
            put_genomes(ctx, servers, profiles, shape)
        for run in range(args.runs if "backlog" in only else 0):
            for p in profiles:
                progress(f"{p.label}: loader, {p.samples} samples (run {run + 1} of {args.runs})")
                backlog.append((p, _run_backlog(ctx, base, p, "loader", run)))
        errors = servers.oci("errors")
    lines = _report_national(runs, backlog, count, workers, latency, args.waiting)
    if errors:
        lines += ["", f"emulator errors: {len(errors)}; first:", errors[0]]
    if args.profile:
        lines += [""] + [r["profile_text"] for _, r in backlog if r.get("profile_text")]
    return lines


def _every_cycle(runs: dict[str, dict[str, Any]], waiting: int) -> list[str]:
    out = ["", "Every cycle measured:", ""]
    rows = []
    labels = (("national_first", "migration", "first cycle, empty catalogue, fn4 holds all (migration)"),
              ("national_first", "idle", "next cycle, same process (idle)"),
              ("national_first", "idle2", "next cycle, same process (idle)"),
              ("national_restart", "restart", "first cycle after a restart: reads the catalogue, reconciles"),
              ("national_restart", "idle", "next cycle (idle), listing by key ranges"),
              ("national_restart", "sequential", "next cycle (idle), listing page by page (--list-workers 1)"),
              ("national_rename", "first", "rename:loaded/: first cycle (reconciles, loads the waiting)"),
              ("national_rename", "waiting", f"rename:loaded/: {waiting} new objects waiting"),
              ("national_rename", "empty", "rename:loaded/: nothing waiting"))
    for kind, key, label in labels:
        result = runs.get(kind, {})
        if "error" in result:
            rows.append([label, _error_line(result)] + [""] * 7)
            continue
        if key not in result:
            continue
        m = result[key]
        rows.append([label, f"{m['wall']:.2f}", f"{m['cpu']:.2f}", str(m["list_pages"]), f"{m['list_seconds']:.2f}",
                     f"{m['listed']:,}", f"{m['tried']:,}", _mb(m["hwm"] - m["peak"]), _mb(m["hwm"]),
                     f"{m['fn4_bytes'] / MB:.0f}"])
    out += _table(["cycle", "wall s", "CPU s", "list pages", "list s (emulator)", "FASTA listed", "to load",
                   "RSS at start MB", "VmHWM MB", "MB from fn4"], rows)
    return out


def _spread(values: list[float], unit: str = "") -> str:
    """Median of the runs, then their range when there are several: '1.23 ms (1.10-1.40, 5 runs)'."""
    digits = 2 if unit else 3
    text = f"{_median(values):.{digits}f}{' ' + unit if unit else ''}"
    if len(values) > 1:
        text += f" ({min(values):.{digits}f}-{max(values):.{digits}f}, {len(values)} runs)"
    return text


def _mb(value: float) -> str:
    return f"{value / MB:.0f}"


def _report_national(runs: dict[str, dict[str, Any]], backlog: list[tuple[Profile, dict[str, Any]]], count: int,
                     workers: int, latency: float, waiting: int) -> list[str]:
    first, restart, rename = (runs.get(k, {}) for k in ("national_first", "national_restart", "national_rename"))
    pages = count / osa.LIST_PAGE_SIZE
    out = [f"## National scale: {count:,} objects, {latency * 1000:.0f} ms a list page, "
           f"{osa.LIST_PAGE_SIZE:,} objects a page, {workers} list workers", "",
           "The emulator (its own process) answers each ListObjects page after a fixed latency, in a thread per "
           "request, so concurrent pages overlap as on the service; it finds each page by bisection in a sorted "
           "index and caches each object's JSON entry, so its own cost per page stays small ('list s' = its time "
           "building pages, latency left out). Every loader runs in a fresh process; wall = the cycle plus the "
           "catalogue flush after it; RSS = the loader process's VmHWM during the cycle (reset before it). "
           "fn4 is the stand-in holding the guids. SQLite catalogue on local disk.", ""]
    rows = []

    def cell(result: dict[str, Any], key: str) -> dict[str, Any] | None:
        return None if "error" in result else result.get(key)

    idle = cell(restart, "idle") or cell(first, "idle")
    sequential = cell(restart, "sequential")
    if idle:
        ok = idle["wall"] <= NATIONAL_IDLE_TARGET_S
        ref = (f"{sequential['wall']:.1f} s listing page by page" if sequential else "-") + \
            f"; page latency alone {pages * latency:.0f} s"
        rows.append([f"idle cycle, {count:,} objects kept in place, {count:,} guids in fn4",
                     f"{idle['wall']:.1f} s", f"≤ {NATIONAL_IDLE_TARGET_S:.0f} s", ref, _verdict(ok)])
    waiting_cycle, empty = cell(rename, "waiting"), cell(rename, "empty")
    if waiting_cycle:
        rows.append([f"idle cycle with --on-success rename:loaded/, {count:,} archived + {waiting} waiting "
                     f"(loads them: {waiting_cycle['loaded']})", f"{waiting_cycle['wall']:.2f} s",
                     f"≤ {NATIONAL_RENAME_TARGET_S:.0f} s",
                     f"next cycle, nothing waiting: {empty['wall']:.2f} s" if empty else "-",
                     _verdict(waiting_cycle["wall"] <= NATIONAL_RENAME_TARGET_S)])
    idle_peaks = [c["hwm"] for c in (cell(first, "idle"), cell(first, "idle2"), cell(restart, "idle"),
                                     sequential, waiting_cycle, empty) if c]
    if idle_peaks:
        rows.append(["peak RSS during those idle cycles", f"{_mb(max(idle_peaks))} MB",
                     f"≤ {NATIONAL_RSS_TARGET_MB:.0f} MB", f"sequential idle: {_mb(sequential['hwm'])} MB"
                     if sequential else "-", _verdict(max(idle_peaks) / MB <= NATIONAL_RSS_TARGET_MB)])
    migration = cell(first, "migration")
    if migration:
        rows.append([f"first cycle against an fn4 holding all {count:,} (migration)",
                     f"{migration['wall']:.0f} s, peak RSS {_mb(migration['hwm'])} MB, "
                     f"{first.get('rows', 0):,} rows written ({first.get('rows', 0) / migration['wall']:.0f}/s)",
                     f"≤ {NATIONAL_MIGRATION_TARGET_S / 60:.0f} min, bounded memory", "-",
                     _verdict(migration["wall"] <= NATIONAL_MIGRATION_TARGET_S) + " (time)"])
    sars_runs = [r for p, r in backlog if p.key == "sars" and "error" not in r]
    sars = sars_runs[0] if sars_runs else None
    if sars_runs:
        steady = [r["steady_cpu"] * 1000 for r in sars_runs]
        whole = [r["cpu"] / max(r["samples"], 1) * 1000 for r in sars_runs]
        rows.append(["loader CPU per SARS-CoV-2-sized sample (29,903 bases), steady state (between inserts, "
                     "the first tenth left out)", _spread(steady, "ms"), f"≤ {SARS_CPU_TARGET_MS} ms",
                     f"whole cycle, start-up included: {_spread(whole, 'ms')}",
                     _verdict(_median(steady) <= SARS_CPU_TARGET_MS)])
    for p in dict.fromkeys(p for p, _ in backlog):
        results = [r for q, r in backlog if q == p]
        failed = [r for r in results if "error" in r]
        if failed:
            rows.append([f"utilisation, {p.label}", _error_line(failed[0]), f"≥ {p.target:.2f}", "-", "-"])
            continue
        util = [r.get("utilisation", float("nan")) for r in results]
        ceiling = [r.get("ceiling", {}).get("utilisation", float("nan")) for r in results]
        gap = [r.get("client_gap", float("nan")) * 1000 for r in results]
        rows.append([f"utilisation, {p.label} (L {p.insert_delay * 1000:.0f} ms, D {p.download_parse * 1000:.0f} ms)",
                     _spread(util), f"≥ {p.target:.2f}", f"back-to-back ceiling {_spread(ceiling)}; loader's "
                     f"median time from an answer to the next insert {_spread(gap, 'ms')}",
                     _verdict(_median(util) >= p.target)])
    out += _table(["figure", "measured", "target", "sequential reference / context", "result"], rows)
    if runs:
        out += _every_cycle(runs, waiting)
    if sars and sars.get("breakdown"):
        out += _where_cpu_goes(sars)
    if "guid_set" in restart:
        out += ["", "fn4's guid list fetched alone (after the cycles above):", ""]
        rows = [[name, f"{restart[key]['count']:,}", f"{restart[key]['wall']:.2f}", f"{restart[key]['cpu']:.2f}",
                 _mb(restart[key]["peak"])]
                for key, name in (("guid_set", "FN4Client.guid_set(): parsed as it streams, 8-byte hashes"),
                                  ("guids", "FN4Client.guids(): whole text, then a set of strings"))]
        out += _table(["how", "guids", "wall s", "CPU s", "peak RSS growth MB"], rows)
    return out


def _where_cpu_goes(sars: dict[str, Any]) -> list[str]:
    """The profile of a SARS-CoV-2-sized sample's CPU: by step in one thread, and by thread in the loader."""
    out = ["", "Where one SARS-CoV-2-sized sample's CPU goes, each step in one thread (thread_time): back to "
               "back (median of 5), and each after the network wait it follows in the loader (the emulator's D, "
               "the stand-in's L; median of 20), when caches are cold:", ""]
    waiting = sars.get("breakdown_waiting", {})

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value * 1000:.2f}"

    rows = [[step, ms(value), ms(waiting.get(step))] for step, value in sars["breakdown"].items()]
    rows.append(["sum", ms(sum(sars["breakdown"].values())), ms(sum(waiting.values()) if waiting else None)])
    out += _table(["step", "back to back ms", "after a wait ms"], rows)
    if threads := sars.get("threads"):
        out += ["", "In the loader (the last run), steady state, CPU per sample by thread: "
                + ", ".join(f"{name} {value * 1000:.2f} ms" for name, value in sorted(
                    threads.items(), key=lambda item: -item[1]) if value >= 0.00001) + "."]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer samples and objects: about a minute")
    parser.add_argument("--profile", action="store_true",
                        help="also print cProfile tables of the per-genome path and of the idle cycle")
    parser.add_argument("--scale", action="store_true",
                        help="national scale instead: idle cycles, migration and RSS at --objects objects, "
                             "CPU per SARS-CoV-2 sample and utilisation (about 15 minutes)")
    parser.add_argument("--objects", type=int, default=NATIONAL_OBJECTS, help="--scale: objects in the bucket")
    parser.add_argument("--page-latency", type=float, default=0.1, help="--scale: seconds per list page")
    parser.add_argument("--list-workers", type=int, default=osa.DEFAULT_LIST_WORKERS, help="--scale: list workers")
    parser.add_argument("--waiting", type=int, default=NATIONAL_WAITING,
                        help="--scale: objects waiting beside the archived ones")
    parser.add_argument("--only", action="append", choices=NATIONAL_PARTS,
                        help="--scale: run only this part (repeatable): cycles = migration, restart, idle and RSS; "
                             "rename = the rename:loaded/ cycles; backlog = CPU per sample and fn4 busy")
    parser.add_argument("--runs", type=int, default=1,
                        help="--scale: backlog runs of each profile; figures are given as median (range)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    fingerprint = code_fingerprint()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    os.environ["NO_PROXY"] = ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1", "localhost"]))

    def progress(text: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {text}", file=sys.stderr, flush=True)

    if args.scale:
        lines = [f"# findNeighbour4 loader benchmark, national scale{' (--quick)' if args.quick else ''}", "",
                 f"- machine: {machine()}", f"- code measured: {fingerprint}", ""]
        lines += national(args, progress)
        if code_fingerprint() != fingerprint:
            lines += ["", f"- **warning: the code changed while the benchmark ran (now {code_fingerprint()})**"]
        print("\n".join(lines + ["", f"total wall time: {time.perf_counter() - started:.1f} s"]))
        return 0
    ctx = multiprocessing.get_context("spawn")
    shape = shape_of_ac587()
    profiles = [replace(p, samples=QUICK_SAMPLES[p.key]) if args.quick else p for p in PROFILES]
    profiles = [replace(p, length=shape.length) if p.key == "tb" else p for p in profiles]
    sizes = QUICK_SCALE_SIZES if args.quick else SCALE_SIZES

    backlog: list[tuple[Profile, dict[str, Any]]] = []
    scale: dict[int, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="fn4bench-") as tmp, Servers(ctx) as servers:
        oci_config = str(write_oci_config(Path(tmp) / "oci"))
        progress("generating genomes")
        gz_sizes = put_genomes(ctx, servers, profiles, shape)
        progress(f"putting {sum(sizes):,} tiny objects for the scale runs")
        scale_plan = [(size, 5000 + i) for i, size in enumerate(sizes)]
        for size, seed in scale_plan:
            servers.oci("put_tiny", f"scale{size}", size, seed)
        base = {"oci": servers.info["oci"][0], "fn4": servers.info["fn4"][0], "authkey": servers.authkey,
                "fn4_url": servers.fn4_url, "endpoint": servers.endpoint, "oci_config": oci_config, "tmp": tmp,
                "profile_run": args.profile}
        for p in profiles:
            for mode in ("loader", "reference"):
                progress(f"{p.label}: {mode}, {p.samples} samples")
                backlog.append((p, _run_backlog(ctx, base, p, mode)))
        for size, seed in scale_plan:
            for kind in ("scale_first", "scale_restart", "scale_reference"):
                progress(f"{size:,} objects: {kind}")
                params = {**base, "tag": f"scale{size}", "bucket": f"scale{size}", "size": size, "seed": seed}
                scale.setdefault(size, {})[kind] = run_worker(ctx, kind, params, 60 + size / 200)
        errors = servers.oci("errors")
    tb_gz = statistics.mean(gz_sizes.get("tb", [0])) / MB
    real = f"a real one is {shape.real_gz_bytes / MB:.2f} MB" if shape.real_gz_bytes else "no real file found"
    lines = ["# findNeighbour4 loader benchmark" + (" (--quick)" if args.quick else ""), "",
             f"- machine: {machine()}",
             f"- code measured: {fingerprint}",
             f"- genomes: synthetic, shaped like {shape.source}: {shape.width}-column lines, GC {shape.gc:.3f}, "
             f"N {shape.n_fraction:.3f}, gaps {shape.gap_fraction:.4f}, IUPAC {shape.iupac_fraction:.5f}, gzip 6; "
             f"a {profiles[0].length:,}-base genome gzips to {tb_gz:.2f} MB ({real})",
             "- samples: " + ", ".join(f"{p.label} {p.samples} x {p.length:,} bases" for p in profiles),
             f"- scale: {', '.join(f'{s:,}' for s in sizes)} objects; SQLite catalogue in a temporary folder; "
             "emulator and stand-in on 127.0.0.1, each in its own process; every loader in a fresh process", ""]
    if code_fingerprint() != fingerprint:
        lines += ["- **warning: the code changed while the benchmark ran; figures may mix versions "
                  f"(now {code_fingerprint()})**", ""]
    lines += _report_backlog(backlog) + [""] + _report_cpu_rss(backlog) + [""] + _report_scale(scale)
    if errors:
        lines += ["", f"emulator errors: {len(errors)}; first:", errors[0]]
    if args.profile:
        lines += [""]
        lines += [r["profile_text"] for _, r in backlog if r.get("profile_text")]
        for size in sorted(scale):
            restart = scale[size].get("scale_restart", {})
            lines += [restart[key] for key in ("profile_text", "profile_restart") if restart.get(key)]
    lines += ["", f"total wall time: {time.perf_counter() - started:.1f} s"]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
