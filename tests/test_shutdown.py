"""Shutdown, with real processes and real signals: a first SIGTERM/SIGINT finishes the sample in flight,
writes its row and exits 0; a second exits at once; and every thread the loader starts is joined.

The time limits leave room for a loaded 2-core machine; what tells the paths apart is not the
time but the exit code and the log: only the end of the one shutdown sequence logs osa.STOPPED_LOG,
and only a second signal exits with 128 + signal.
"""
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

import objectstoreaccess as osa
from conftest import BUCKET, NAMESPACE, fasta, upload_series, wait_for, disk_full, free_port
from fn4_standin import Scripted
from test_journal import attempt

SCRIPT = Path(__file__).resolve().parent.parent / "objectstoreaccess.py"
PROMPT = 15            # seconds: "at once" on a loaded machine, still far below the 30 s insert it must not wait for
STOPPED = osa.STOPPED_LOG  # the last line of the shutdown sequence: the loop ended, its threads joined


class LoaderProcess:
    """The loader as a subprocess; its stderr is read as it comes, so a wait for a line has a deadline."""

    def __init__(self, args):
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stderr:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()

    def wait_for_line(self, text, seconds=30):
        with self._changed:
            if not self._changed.wait_for(lambda: any(text in line for line in self.lines), timeout=seconds):
                raise AssertionError(f"{text!r} not logged within {seconds} s:\n{''.join(self.lines)}")

    def send_signal(self, signum):
        self.proc.send_signal(signum)

    def wait(self, seconds):
        code = self.proc.wait(timeout=seconds)
        self._reader.join(5)
        return code, "".join(self.lines)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture
def start(fn4, emulator, oci_config):
    started = []

    def launch(db, *extra):
        started.append(LoaderProcess([sys.executable, str(SCRIPT), fn4.url, NAMESPACE, BUCKET, db, "--config-file",
                                      str(oci_config), "--endpoint", emulator.endpoint, *extra]))
        return started[-1]

    yield launch
    for loader in started:
        loader.kill()


def count(db, table):
    engine = sa.create_engine(db)
    try:
        with engine.connect() as conn:
            return conn.execute(sa.text(f"SELECT COUNT(*) FROM {table}")).scalar()
    except sa.exc.OperationalError:
        return 0  # not created yet
    finally:
        engine.dispose()


def stop_and_time(loader, signum, longest=PROMPT):
    sent = time.monotonic()
    loader.send_signal(signum)
    code, err = loader.wait(longest)
    return code, time.monotonic() - sent, err


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_idle_wait_exits_0_at_once(start, tmp_path, signum):
    db = f"sqlite:///{tmp_path / 'c.db'}"
    loader = start(db, "--poll-interval", "3600")
    wait_for(lambda: count(db, "fn4batchload") == 1)
    code, took, err = stop_and_time(loader, signum)
    assert code == 0, err
    assert "finishing the current sample" in err
    assert STOPPED in err and took < PROMPT  # the sequence ended the wait at once


def test_signal_during_a_batch_finishes_the_sample_and_writes_its_row(start, fn4, emulator, tmp_path):
    db = f"sqlite:///{tmp_path / 'c.db'}"
    upload_series(emulator, [(f"s{i}.fasta", fasta(f"s{i}")) for i in range(20)])
    fn4.insert_delay = 0.5
    loader = start(db, "--poll-interval", "3600")
    wait_for(lambda: fn4.inserts_begun >= 1)
    code, took, err = stop_and_time(loader, signal.SIGTERM)
    assert code == 0, err
    assert STOPPED in err and took < PROMPT  # the 0.5 s sample was finished, not cut off
    inserted = len(fn4.guids)
    assert 1 <= inserted < 20
    assert count(db, "fn4loadattempt") == inserted  # every insert that happened has its row
    assert "catalogue row not written" not in err


def test_second_signal_exits_at_once(start, fn4, emulator, tmp_path):
    db = f"sqlite:///{tmp_path / 'c.db'}"
    upload_series(emulator, [("slow.fasta", fasta("slow"))])
    fn4.insert_delay = 30
    loader = start(db, "--poll-interval", "3600")
    wait_for(lambda: fn4.inserts_begun >= 1)
    loader.send_signal(signal.SIGTERM)
    loader.wait_for_line("finishing the current sample")  # two signals sent at once would merge into one
    code, took, err = stop_and_time(loader, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, err  # a first signal alone would have waited for the insert, then 0
    assert took < PROMPT
    fn4.insert_delay = 0


def test_a_second_signal_leaves_unwritten_rows_in_the_journal(start, fn4, emulator, oci_config, tmp_path):
    """os._exit on the second signal loses no row: the catalogue refuses them, the journal has them, the
    next run writes them (the first file stays inserted, not in_server)."""
    path = tmp_path / "c.db"
    db = f"sqlite:///{path}"
    osa.LoadLogger(sa.create_engine(db)).create_tables()
    refuse = sa.create_engine(db)
    disk_full(refuse)  # SQLite's own answer when the disk is full, on every attempt row
    upload_series(emulator, [("fast.fasta", fasta("fast")), ("slow.fasta", fasta("slow"))])
    fn4.script(Scripted(status=200, guid="fast", store=True))  # answered at once; then "slow" takes 8 s
    fn4.insert_delay = 8  # what the second signal does not wait for (the next run waits for the stand-in's lock)
    loader = start(db, "--poll-interval", "3600")
    wait_for(lambda: fn4.inserts_begun >= 1)
    loader.send_signal(signal.SIGTERM)
    loader.wait_for_line("finishing the current sample")
    code, took, err = stop_and_time(loader, signal.SIGTERM)
    fn4.insert_delay = 0
    assert code == 128 + signal.SIGTERM and took < PROMPT, err
    assert b'"fast.fasta"' in osa.journal_path(sa.make_url(db), None, BUCKET).read_bytes()
    disk_full(refuse, full=False)  # the disk has room again
    refuse.dispose()
    again = CliRunner().invoke(osa.main, [fn4.url, NAMESPACE, BUCKET, db, "--once", "--config-file",
                                          str(oci_config), "--endpoint", emulator.endpoint])
    assert again.exit_code == 0, again.output
    engine = sa.create_engine(db)
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT fn4id, outcome FROM fn4loadattempt ORDER BY gp_int_id")).all()
    engine.dispose()
    assert rows[0] == ("fast", "inserted") and [guid for guid, _ in rows] == ["fast", "slow"]


def test_a_signal_with_rows_the_catalogue_refuses_exits_1_and_says_so(start, fn4, emulator, tmp_path):
    """The exit code and the last line say that rows were left, and where."""
    db = f"sqlite:///{tmp_path / 'c.db'}"
    osa.LoadLogger(sa.create_engine(db)).create_tables()
    refuse = sa.create_engine(db)
    disk_full(refuse)  # SQLite's own answer when the disk is full, on every attempt row
    refuse.dispose()
    upload_series(emulator, [("a.fasta", fasta("a"))])
    loader = start(db, "--poll-interval", "3600")
    loader.wait_for_line("inserted a: a.fasta")
    code, took, err = stop_and_time(loader, signal.SIGTERM)
    assert code == 1 and took < PROMPT, err
    assert f"{STOPPED}: exit 1 (1 catalogue rows kept in the journal)" in err
    assert b'"a.fasta"' in osa.journal_path(sa.make_url(db), None, BUCKET).read_bytes()


def test_a_first_signal_during_a_long_insert_waits_for_it_and_writes_its_row(start, fn4, emulator, tmp_path):
    """No deadline cuts the sample in flight short: its insert ends, its row is written, then exit 0.

    (A timer used to end the process 4.5 s after the signal, with exit 0 and no row for this insert.)"""
    db = f"sqlite:///{tmp_path / 'c.db'}"
    upload_series(emulator, [("slow.fasta", fasta("slow")), ("next.fasta", fasta("next"))])
    fn4.insert_delay = 7
    loader = start(db, "--poll-interval", "3600")
    wait_for(lambda: fn4.inserts_begun >= 1)
    code, took, err = stop_and_time(loader, signal.SIGTERM, fn4.insert_delay + PROMPT)
    fn4.insert_delay = 0
    assert code == 0, err
    assert list(fn4.guids) == ["slow"] and fn4.inserts_begun == 1  # the next sample was not begun
    assert count(db, "fn4loadattempt") == 1, err  # the insert in flight was recorded
    assert STOPPED in err and "catalogue row not written" not in err


# ---- threads: each owner stops and joins what it started ---------------------------------------


def threads_since(before):
    """Names of the threads started since ``before`` that still run, but the stand-ins' request threads."""
    return sorted(t.name for t in threading.enumerate()
                  if t not in before and t.is_alive() and "process_request_thread" not in t.name)


def test_close_returns_once_the_writer_has_ended_even_with_a_write_in_flight(tmp_path):
    """LoadLogger.close() joins its writer thread: here the write waits on a lock another connection holds."""
    path = tmp_path / "c.sqlite"
    made = sa.create_engine(f"sqlite:///{path}")
    osa.LoadLogger(made).create_tables()
    made.dispose()
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # the database is locked: the writer's write waits up to 0.5 s, then fails
    before = set(threading.enumerate())
    catalogue = osa.LoadLogger(sa.create_engine(f"sqlite:///{path}", connect_args={"timeout": 0.5}))
    try:
        catalogue.start()
        catalogue.record_attempt(attempt(1))
        left = catalogue.close(timeout=0.1)
        assert threads_since(before) == []
        assert [row["file_name"] for row in left] == ["run 1/s01.fasta"]
    finally:
        holder.rollback()
        holder.close()


def test_run_leaves_no_thread_behind(fn4, emulator, oci_config, tmp_path):
    """After run returns, the writer, the lease keeper, the metrics server and the signal watcher have ended."""
    upload_series(emulator, [(f"s{i}.fasta", fasta(f"s{i}")) for i in range(3)])
    port = free_port()
    before = set(threading.enumerate())
    result = CliRunner().invoke(osa.main, [fn4.url, NAMESPACE, BUCKET, f"sqlite:///{tmp_path / 'c.db'}", "--once",
                                           "--config-file", str(oci_config), "--endpoint", emulator.endpoint,
                                           "--metrics-port", f"127.0.0.1:{port}"])
    assert result.exit_code == 0, result.output
    assert sorted(fn4.guids) == ["s0", "s1", "s2"]
    assert threads_since(before) == []
