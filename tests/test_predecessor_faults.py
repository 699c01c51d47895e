"""Each fault of the predecessor loader, pinned so it cannot come back (see the style guide)."""
import ast
import subprocess
import sys
from pathlib import Path

import objectstoreaccess as osa
from conftest import BUCKET, NAMESPACE, fasta, upload_series
from fn4_standin import insert
from test_faults import Harness

SOURCE = Path(osa.__file__).read_text()
TREE = ast.parse(SOURCE)


def test_namespace_is_a_string_not_a_tuple(store, emulator, fn4, tmp_path):
    """A trailing comma once made the namespace a one-element tuple."""
    assert store.namespace == NAMESPACE and isinstance(store.namespace, str)
    upload_series(emulator, [("a.fasta", fasta("a"))])
    Harness(store, fn4, f"sqlite:///{tmp_path / 'c.db'}").cycle()
    assert {r.path.split("/")[2] for r in emulator.requests if r.path.startswith("/n/")} == {NAMESPACE}


def test_failed_files_are_not_retried_forever(store, emulator, fn4, tmp_path):
    """`.filter(completed == 1)` once compared a list with 1, so finished failures were retried each cycle."""
    upload_series(emulator, [("bad.fasta", b">x\nACGU\n"), ("ok.fasta", fasta("ok"))])
    h = Harness(store, fn4, f"sqlite:///{tmp_path / 'c.db'}")
    for _ in range(3):
        h.cycle()
    assert [r["outcome"] for r in h.rows()] == ["failed", "inserted"]
    h.close()


def test_timeouts_are_applied(store, fn4):
    """Timeouts were once accepted and ignored: both clients must carry real ones."""
    assert store._client.base_client.timeout == osa.OCI_TIMEOUT
    assert osa.FN4Client(fn4.url).timeout == osa.FN4_TIMEOUT
    slow = osa.FN4Client(fn4.url, timeout=(1.0, 0.2))
    fn4.insert_delay = 1.0
    result = insert(slow, "g", b"ACGT")
    assert result.status_code is None and result.outcome == osa.RETRY and "0.2 s" in result.message


def _calls(name):
    return [node for node in ast.walk(TREE) if isinstance(node, ast.Call)
            and (getattr(node.func, "id", None) == name or getattr(node.func, "attr", None) == name)]


def test_no_bare_except_and_no_print():
    """A bare `except:` with `print` once swallowed every error."""
    assert not [h for h in ast.walk(TREE) if isinstance(h, ast.ExceptHandler) and h.type is None]
    assert not _calls("print")


def test_no_sleep_in_production_code():
    """A 'for testing' sleep(5) once slowed every batch; the loop waits on its stop event instead."""
    assert not _calls("sleep")


def test_logging_is_configured_by_the_command_line(emulator, oci_config, fn4, tmp_path):
    """Logging was never configured, so nothing was logged: the CLI must log each sample and cycle."""
    upload_series(emulator, [("a.fasta", fasta("a"))])
    done = subprocess.run(
        [sys.executable, osa.__file__, fn4.url, NAMESPACE, BUCKET, f"sqlite:///{tmp_path / 'c.db'}", "--once",
         "--config-file", str(oci_config), "--endpoint", emulator.endpoint],
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert " INFO fn4loader inserted a: " in done.stderr and "cycle 1:" in done.stderr


def test_clients_are_built_once_not_every_batch(store, emulator, fn4, tmp_path):
    """Clients were rebuilt every batch: one fn4 connection must serve many cycles."""
    h = Harness(store, fn4, f"sqlite:///{tmp_path / 'c.db'}")
    for i in range(4):
        upload_series(emulator, [(f"s{i}.fasta", fasta(f"s{i}"))])
        h.cycle()
    assert len(fn4.guids) == 4
    assert fn4.connections_accepted == 2  # one for inserts, one for the small GET routes, for every cycle
    h.close()


def test_pandas_is_not_imported():
    """pandas was imported only to sort a list; it is slow to import and not a dependency."""
    code = f"import sys; sys.path.insert(0, {str(Path(osa.__file__).parent)!r}); import objectstoreaccess; " \
           "print('pandas' in sys.modules, 'Bio' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.split() == \
        ["False", "False"]
