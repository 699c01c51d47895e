"""Signals and threads, with real processes and real signals: SIGHUP, a signal during the imports, an
unexpected error inside a batch, and a metrics port under a flood of idle or rude clients."""
import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
import sqlalchemy as sa

import objectstoreaccess as osa
from conftest import BUCKET, NAMESPACE, fasta, upload_series
from fn4_standin import Scripted
from test_shutdown import count, start, stop_and_time, wait_for

SCRIPT = Path(__file__).resolve().parent.parent / "objectstoreaccess.py"


def clean_env():
    return {k: v for k, v in os.environ.items() if not k.startswith(("FN4_", "OCI_", "FN_SENTRY"))}


# ---- signals ----------------------------------------------------------------------------------


def test_sighup_finishes_the_sample_and_writes_its_row(fn4, emulator, oci_config, tmp_path):
    """SIGHUP (a closed terminal, or a reload) is a warm stop like SIGTERM: exit 0, every insert has its row."""
    db = f"sqlite:///{tmp_path / 'c.db'}"
    upload_series(emulator, [(f"s{i}.fasta", fasta(f"s{i}")) for i in range(20)])
    fn4.insert_delay = 0.5
    proc = start(fn4, emulator, oci_config, db, "--poll-interval", "3600")
    wait_for(lambda: fn4.inserts_begun >= 1)
    code, took, err = stop_and_time(proc, signal.SIGHUP)
    assert code == 0, err
    assert took < 5
    assert "SIGHUP received: finishing the current sample" in err
    inserted = len(fn4.guids)
    assert 1 <= inserted < 20
    assert count(db, "fn4loadattempt") == inserted
    assert "catalogue row not written" not in err


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


def test_an_unexpected_error_inside_the_insert_step_leaves_no_thread_nor_setting_behind(emulator, store, fn4,
                                                                                         tmp_path):
    """An fn4 answer that raises where nothing expects it ends the batch; the prefetcher ends, the GIL
    switch interval is back, and the loader loads everything in the next cycle."""
    upload_series(emulator, [(f"s{i}.fasta", fasta(f"s{i}", seed=i)) for i in range(3)])
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'c.sqlite'}")
    catalogue = osa.LoadLogger(engine)
    catalogue.create_tables()
    catalogue.start()
    client = osa.FN4Client(fn4.url)
    loader = osa.Loader(store, client, catalogue, osa.Settings(fn4.url, NAMESPACE, BUCKET))
    before = sys.getswitchinterval()
    try:
        # JSON nested deeper than Python's recursion limit: json.loads raises RecursionError, not ValueError
        fn4.script(Scripted(status=200, body="[" * 100_000 + "]" * 100_000))
        with pytest.raises(RecursionError):
            loader.run(once=True)
        assert sys.getswitchinterval() == before
        wait_for(lambda: not [t for t in threading.enumerate() if t.name == "prefetch"], seconds=10)
        assert loader.run(once=True) == 1
        assert sorted(fn4.guids) == ["s0", "s1", "s2"]
        assert sys.getswitchinterval() == before
    finally:
        sys.setswitchinterval(before)  # do not let a failure here slow every later test
        catalogue.close()
        client.close()
