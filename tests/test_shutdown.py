"""Signals, with a real subprocess: a first SIGTERM/SIGINT exits 0 within 5 s, a second at once."""
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from conftest import BUCKET, NAMESPACE, fasta, upload_series

SCRIPT = Path(__file__).resolve().parent.parent / "objectstoreaccess.py"


def start(fn4, emulator, oci_config, db, *extra):
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), fn4.url, NAMESPACE, BUCKET, db, "--config-file", str(oci_config),
         "--endpoint", emulator.endpoint, *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, seconds=30):
    """Wait, bounded, until condition() holds."""
    tick = threading.Event()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        tick.wait(0.02)
    raise AssertionError("condition not reached in time")


def count(db, table):
    engine = sa.create_engine(db)
    try:
        with engine.connect() as conn:
            return conn.execute(sa.text(f"SELECT COUNT(*) FROM {table}")).scalar()
    except sa.exc.OperationalError:
        return 0  # not created yet
    finally:
        engine.dispose()


def stop_and_time(proc, signum):
    sent = time.monotonic()
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=10)
    return proc.returncode, time.monotonic() - sent, err


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_idle_wait_exits_0_at_once(fn4, emulator, oci_config, tmp_path, signum):
    db = f"sqlite:///{tmp_path / 'c.db'}"
    proc = start(fn4, emulator, oci_config, db, "--poll-interval", "3600")
    wait_for(lambda: count(db, "fn4batchload") == 1)
    code, took, err = stop_and_time(proc, signum)
    assert code == 0, err
    assert took < 5
    assert "finishing the current sample" in err


def test_signal_during_a_batch_finishes_the_sample_and_writes_its_row(fn4, emulator, oci_config, tmp_path):
    db = f"sqlite:///{tmp_path / 'c.db'}"
    upload_series(emulator, [(f"s{i}.fasta", fasta(f"s{i}")) for i in range(20)])
    fn4.insert_delay = 0.5
    proc = start(fn4, emulator, oci_config, db, "--poll-interval", "3600")
    wait_for(lambda: fn4.inserts_begun >= 1)
    code, took, err = stop_and_time(proc, signal.SIGTERM)
    assert code == 0, err
    assert took < 5
    inserted = len(fn4.guids)
    assert 1 <= inserted < 20
    assert count(db, "fn4loadattempt") == inserted  # every insert that happened has its row
    assert "catalogue row not written" not in err


def test_second_signal_exits_at_once(fn4, emulator, oci_config, tmp_path):
    db = f"sqlite:///{tmp_path / 'c.db'}"
    upload_series(emulator, [("slow.fasta", fasta("slow"))])
    fn4.insert_delay = 30
    proc = start(fn4, emulator, oci_config, db, "--poll-interval", "3600")
    wait_for(lambda: fn4.inserts_begun >= 1)
    proc.send_signal(signal.SIGTERM)
    for line in proc.stderr:  # two signals sent at once would merge into one: wait for the first to land
        if "finishing the current sample" in line:
            break
    code, took, err = stop_and_time(proc, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, err
    assert took < 2
    fn4.insert_delay = 0
