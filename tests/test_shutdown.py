"""Signals, with a real subprocess: a first SIGTERM/SIGINT exits 0 within 5 s, a second at once.

The time limits leave room for a loaded 2-core machine; what tells the paths apart is not the
time but the exit code and the log: a first signal that had to wait for the SHUTDOWN_GRACE
deadline says so (osa.GRACE_EXPIRED_LOG), and only a second signal exits with 128 + signal.
"""
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

import objectstoreaccess as osa
from conftest import BUCKET, NAMESPACE, fasta, upload_series, wait_for

SCRIPT = Path(__file__).resolve().parent.parent / "objectstoreaccess.py"
PROMPT = 15            # seconds: "at once" on a loaded machine, still far below the 30 s insert it must not wait for
GRACE_EXPIRED = osa.GRACE_EXPIRED_LOG % osa.SHUTDOWN_GRACE  # the line of an exit forced by the SHUTDOWN_GRACE deadline


class Loader:
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
        started.append(Loader([sys.executable, str(SCRIPT), fn4.url, NAMESPACE, BUCKET, db, "--config-file",
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


def stop_and_time(loader, signum):
    sent = time.monotonic()
    loader.send_signal(signum)
    code, err = loader.wait(osa.SHUTDOWN_GRACE + PROMPT)
    return code, time.monotonic() - sent, err


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_idle_wait_exits_0_at_once(start, tmp_path, signum):
    db = f"sqlite:///{tmp_path / 'c.db'}"
    loader = start(db, "--poll-interval", "3600")
    wait_for(lambda: count(db, "fn4batchload") == 1)
    code, took, err = stop_and_time(loader, signum)
    assert code == 0, err
    assert "finishing the current sample" in err
    assert GRACE_EXPIRED not in err and took < PROMPT  # it ended the wait, not the SHUTDOWN_GRACE deadline


def test_signal_during_a_batch_finishes_the_sample_and_writes_its_row(start, fn4, emulator, tmp_path):
    db = f"sqlite:///{tmp_path / 'c.db'}"
    upload_series(emulator, [(f"s{i}.fasta", fasta(f"s{i}")) for i in range(20)])
    fn4.insert_delay = 0.5
    loader = start(db, "--poll-interval", "3600")
    wait_for(lambda: fn4.inserts_begun >= 1)
    code, took, err = stop_and_time(loader, signal.SIGTERM)
    assert code == 0, err
    assert GRACE_EXPIRED not in err and took < PROMPT  # the 0.5 s sample was finished, not cut off
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
    assert code == 128 + signal.SIGTERM, err  # the SHUTDOWN_GRACE deadline would have exited 0
    assert took < PROMPT
    fn4.insert_delay = 0


def test_a_first_signal_not_honoured_in_time_exits_0_by_the_deadline_and_says_so(start, fn4, emulator, tmp_path):
    """The line the other tests look for is the one the deadline path logs (a changed text fails here)."""
    db = f"sqlite:///{tmp_path / 'c.db'}"
    upload_series(emulator, [("slow.fasta", fasta("slow"))])
    fn4.insert_delay = 30
    loader = start(db, "--poll-interval", "3600")
    wait_for(lambda: fn4.inserts_begun >= 1)
    code, took, err = stop_and_time(loader, signal.SIGTERM)
    fn4.insert_delay = 0
    assert code == 0, err
    assert GRACE_EXPIRED in err and osa.SHUTDOWN_GRACE <= took < osa.SHUTDOWN_GRACE + PROMPT
