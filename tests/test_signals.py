"""Signals and threads, with real processes and real signals: SIGHUP, a signal during the imports, an
unexpected error inside a batch, and a metrics port under a flood of idle or rude clients."""
import json
import os
import resource
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
import sqlalchemy as sa

import objectstoreaccess as osa
from conftest import BUCKET, NAMESPACE, fasta, upload_series, free_port
from fn4_standin import Scripted
from oci_emulator import Fault
from test_shutdown import STOPPED, PROMPT, LoaderProcess, count, stop_and_time, wait_for

SCRIPT = Path(__file__).resolve().parent.parent / "objectstoreaccess.py"


def clean_env():
    return {k: v for k, v in os.environ.items() if not k.startswith(("FN4_", "OCI_", "FN_SENTRY"))}


# ---- signals ----------------------------------------------------------------------------------


def test_sighup_finishes_the_sample_and_writes_its_row(fn4, emulator, oci_config, tmp_path):
    """SIGHUP (a closed terminal, or a reload) is a warm stop like SIGTERM: exit 0, every insert has its row."""
    db = f"sqlite:///{tmp_path / 'c.db'}"
    upload_series(emulator, [(f"s{i}.fasta", fasta(f"s{i}")) for i in range(20)])
    fn4.insert_delay = 0.5
    loader = LoaderProcess([sys.executable, str(SCRIPT), fn4.url, NAMESPACE, BUCKET, db, "--config-file",
                            str(oci_config), "--endpoint", emulator.endpoint, "--poll-interval", "3600"])
    try:
        wait_for(lambda: fn4.inserts_begun >= 1)
        code, took, err = stop_and_time(loader, signal.SIGHUP)
    finally:
        loader.kill()
    assert code == 0, err
    assert STOPPED in err and took < PROMPT  # the 0.5 s sample was finished, not cut off
    assert "SIGHUP received: finishing the current sample" in err
    inserted = len(fn4.guids)
    assert 1 <= inserted < 20
    assert count(db, "fn4loadattempt") == inserted
    assert "catalogue row not written" not in err


def test_a_signal_during_a_long_listing_stops_after_the_page_in_flight(fn4, emulator, oci_config, tmp_path):
    """A bucket listed page by page for minutes (2 million objects, a first cycle) must not hold a stop:
    the listing ends after the page in flight, the cycle is not recorded as abandoned, and the exit is 0."""
    db = f"sqlite:///{tmp_path / 'c.db'}"
    emulator.put_many(BUCKET, ((f"s{i:05d}.fasta", b">x\nACGT\n", None) for i in range(4500)))  # 5 pages
    emulator.add_fault(Fault(method="GET", path_contains="/o", kind="delay", delay=6.0, times=-1))

    def pages():
        return [r for r in emulator.requests if r.method == "GET" and r.path.endswith("/o")]

    loader = LoaderProcess([sys.executable, str(SCRIPT), fn4.url, NAMESPACE, BUCKET, db, "--config-file",
                            str(oci_config), "--endpoint", emulator.endpoint, "--list-workers", "1"])
    try:
        wait_for(lambda: len(pages()) >= 2, 60)  # the start-up check and the cycle's first page: the second is asked
        code, took, err = stop_and_time(loader, signal.SIGTERM, 6.0 + PROMPT)
    finally:
        loader.kill()
        emulator.clear_faults()
    assert code == 0, err
    assert len(pages()) <= 3, "the listing went on after the signal"  # at most the page in flight when it came
    assert STOPPED in err and "stopped while listing" in err
    with sa.create_engine(db).connect() as conn:
        abandoned = conn.execute(sa.text("SELECT count(*) FROM fn4batchload WHERE abandon_reason IS NOT NULL"))
        assert abandoned.scalar() == 0


def _third_party_code_loaded(pid):
    """True once the process has mapped a compiled module from site-packages: it is importing its libraries."""
    try:
        return "site-packages/" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc to see the imports happen")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_during_the_imports_is_a_clean_stop(fn4, emulator, oci_config, tmp_path, signum):
    """A stop signal while the script still imports its libraries ends it with exit 0, nothing loaded."""
    db = f"sqlite:///{tmp_path / 'c.db'}"
    upload_series(emulator, [("a.fasta", fasta("a"))])
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), fn4.url, NAMESPACE, BUCKET, db, "--config-file", str(oci_config),
         "--endpoint", emulator.endpoint, "--poll-interval", "3600"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env())
    tick, deadline = threading.Event(), time.monotonic() + 10
    while not _third_party_code_loaded(proc.pid) and proc.poll() is None and time.monotonic() < deadline:
        tick.wait(0.001)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, (proc.returncode, err)
    assert "Traceback" not in err
    assert fn4.guids == {}


HOLD_THE_LOCK = """
import os, signal, sys, threading
sys.path.insert(0, sys.argv[1])
import objectstoreaccess as osa
stop = threading.Event()
restore = osa._install_signal_handlers(stop)
with stop._cond:  # the Event's own lock, which the main thread holds for a moment inside stop.wait()
    os.kill(os.getpid(), signal.SIGTERM)  # the handler runs here, in this thread, before the lock is let go
print("handler returned", flush=True)
print("stopped" if stop.wait(5) else "not stopped", flush=True)
restore()
"""


def test_a_signal_that_lands_while_the_main_thread_holds_a_lock_does_not_hang_it():
    """A handler that took a lock (the stop Event's, logging's, Sentry's) could wait for ever on its own thread:
    a SIGTERM during the idle wait of a loader polling every second hung it. The handler takes none."""
    done = subprocess.run([sys.executable, "-c", HOLD_THE_LOCK, str(SCRIPT.parent)], capture_output=True, text=True,
                          timeout=20, env=clean_env())
    assert done.returncode == 0 and done.stdout.split("\n")[:2] == ["handler returned", "stopped"], done


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc to see the imports happen")
def test_a_signal_held_during_the_imports_still_stops_other_commands(tmp_path):
    """Only run turns a held signal into a warm stop; status, say, is ended by it as usual, not made deaf."""
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "status", f"sqlite:///{tmp_path / 'none.sqlite'}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env())
    tick, deadline = threading.Event(), time.monotonic() + 10
    while not _third_party_code_loaded(proc.pid) and proc.poll() is None and time.monotonic() < deadline:
        tick.wait(0.001)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=15)
    assert proc.returncode == -signal.SIGTERM, (proc.returncode, err)


#: An fn4 answer nested deeper than Python's recursion limit: json.loads raises RecursionError, not ValueError.
TOO_DEEP = "[" * 100_000 + "]" * 100_000


@pytest.fixture
def three_samples(emulator, store, fn4, tmp_path):
    """Three samples in the bucket; yields a LoadLoop on a fresh SQLite catalogue, closed after the test."""
    upload_series(emulator, [(f"s{i}.fasta", fasta(f"s{i}", seed=i)) for i in range(3)])
    catalogue = osa.LoadLogger(sa.create_engine(f"sqlite:///{tmp_path / 'c.sqlite'}"))
    catalogue.create_tables()
    catalogue.start()
    client = osa.FN4Client(fn4.url)
    yield osa.LoadLoop(store, client, catalogue, osa.Settings())
    catalogue.close()
    client.close()


def test_an_unexpected_error_in_the_insert_step_leaves_no_thread_behind(three_samples, fn4):
    """An fn4 answer that raises where nothing expects it ends the batch; the prefetcher ends, the GIL
    switch interval is back, and the loader loads everything in the next cycle."""
    loader = three_samples
    before = sys.getswitchinterval()
    try:
        fn4.script(Scripted(status=200, body=TOO_DEEP))
        with pytest.raises(RecursionError):
            loader.run(once=True)
        assert sys.getswitchinterval() == before
        wait_for(lambda: not [t for t in threading.enumerate() if t.name == "prefetch"], seconds=10)
        assert loader.run(once=True) == 1
        assert sorted(fn4.guids) == ["s0", "s1", "s2"]
        assert sys.getswitchinterval() == before
    finally:
        sys.setswitchinterval(before)  # do not let a failure here slow every later test


def test_an_unexpected_error_in_the_insert_step_records_the_sample_before_it_once(three_samples, fn4):
    """The sample answered before the failing one is recorded once, though its row was written while the
    failing insert was on its way."""
    loader = three_samples
    fn4.script(Scripted(status=200, guid="s1", body=TOO_DEEP))
    with pytest.raises(RecursionError):
        loader.run(once=True)
    assert loader.catalogue.flush(30)
    a = loader.catalogue.attempts.c
    with loader.catalogue.engine.connect() as conn:
        rows = conn.execute(sa.select(a.file_name, a.outcome).order_by(a.gp_int_id)).all()
    assert [tuple(r) for r in rows] == [("s0.fasta", osa.INSERTED)]


# ---- the metrics port --------------------------------------------------------------------------


def start_with_metrics(fn4, emulator, oci_config, tmp_path, port, *extra, max_files=None):
    """Start the loader with --metrics-port, optionally limited to ``max_files`` open descriptors."""
    def limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (max_files, max_files))
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), fn4.url, NAMESPACE, BUCKET, f"sqlite:///{tmp_path / 'c.sqlite'}",
         "--config-file", str(oci_config), "--endpoint", emulator.endpoint, "--poll-interval", "1",
         "--metrics-port", f"127.0.0.1:{port}", *extra],
        cwd=tmp_path, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=limit if max_files else None)


def get(url, proc, condition=lambda r: r.status_code == 200, seconds=30):
    """GET url until condition(answer) holds; fail at the deadline or if the process has ended."""
    deadline, tick = time.monotonic() + seconds, threading.Event()
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            answer = requests.get(url, timeout=3)
            if condition(answer):
                return answer
        except requests.RequestException:
            pass
        tick.wait(0.05)
    raise AssertionError(f"{url} never answered as expected (loader exit code {proc.poll()})")


def open_descriptors(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="needs /proc to count descriptors")
def test_idle_connections_to_the_metrics_port_do_not_starve_the_loader(fn4, emulator, oci_config, tmp_path):
    """300 idle clients on --metrics-port, with the loader limited to 128 descriptors: it keeps few of them
    open, keeps inserting, and answers /metrics again once they are gone."""
    port = free_port()
    proc = start_with_metrics(fn4, emulator, oci_config, tmp_path, port, max_files=128)
    idle = []
    try:
        base = f"http://127.0.0.1:{port}"
        get(base + "/healthz", proc, lambda r: r.status_code == 200 and r.json()["cycles"] >= 1)
        for _ in range(300):  # until the server neither accepts nor has room in its backlog
            sock = socket.socket()
            sock.settimeout(3)  # a first SYN dropped by a full backlog is sent again after 1 s
            try:
                sock.connect(("127.0.0.1", port))
            except OSError:
                sock.close()
                break
            idle.append(sock)
        assert len(idle) > 100
        upload_series(emulator, [(f"s{i}.fasta", fasta(f"s{i}", seed=i)) for i in range(5)])
        wait_for(lambda: len(fn4.guids) == 5 or proc.poll() is not None, seconds=30)
        assert len(fn4.guids) == 5, proc.poll()
        assert open_descriptors(proc.pid) < 64
        for sock in idle:
            sock.close()
        idle = []
        text = get(base + "/metrics", proc).text
        assert 'fn4loader_attempts_total{outcome="inserted"} 5.0' in text
    finally:
        for sock in idle:
            sock.close()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    assert "Too many open files" not in err and "Traceback" not in err


def test_clients_that_go_away_early_leave_the_json_log_clean(fn4, emulator, oci_config, tmp_path):
    """Clients that reset the connection mid-request, or before reading the answer, log nothing:
    every line on stderr stays JSON, and no traceback."""
    port = free_port()
    proc = start_with_metrics(fn4, emulator, oci_config, tmp_path, port, "--log-format", "json")
    try:
        base = f"http://127.0.0.1:{port}"
        get(base + "/healthz", proc, lambda r: r.status_code == 200 and r.json()["cycles"] >= 1)
        for request in (b"GET /metrics HTTP/1.1\r\n", b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n") * 5:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(request)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            # closed with a zero linger time: the server sees a reset, not an orderly end
        assert "fn4loader_cycles_total" in get(base + "/metrics", proc).text
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "Exception" not in err, err
    for line in err.splitlines():
        json.loads(line)
