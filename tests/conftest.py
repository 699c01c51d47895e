"""Shared fixtures: the Object Storage emulator, the fn4 stand-in, real catalogue databases."""
import contextlib
import logging
import os
import socket
import sys
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import objectstoreaccess as osa  # noqa: E402
from fn4_standin import FN4StandIn  # noqa: E402
from oci_emulator import ObjectStoreEmulator, write_oci_config  # noqa: E402

AC587 = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "ac587"
NAMESPACE, BUCKET = "lxxxx", "FN4-queue"
T0 = datetime(2026, 11, 1, 9, 0, tzinfo=timezone.utc)


@pytest.fixture(autouse=True)
def command_line_log_handler_removed():
    """Remove the stderr handler a command installs (see _configure_logging) when the test ends.

    It writes to the sys.stderr of its command: under CliRunner, a buffer nobody reads once the
    command returns. The next command installs its own, on its own stderr.
    """
    yield
    root = logging.getLogger()
    root.handlers[:] = [h for h in root.handlers if h.get_name() != osa._LOG_HANDLER]


@pytest.fixture(scope="session")
def ac587_files():
    files = sorted(AC587.glob("*.mfasta.gz"))
    if not files:
        pytest.skip(f"the real genomes are not at {AC587} (a folder 'shared' beside the project)")
    return files


@pytest.fixture
def emulator():
    with ObjectStoreEmulator(namespace=NAMESPACE) as emu:
        emu.create_bucket(BUCKET)
        yield emu


@pytest.fixture
def fn4():
    with FN4StandIn() as server:
        yield server


@pytest.fixture
def oci_config(tmp_path_factory):
    return write_oci_config(tmp_path_factory.mktemp("oci"))


@pytest.fixture
def store(emulator, oci_config):
    """The real OCI SDK client pointed at the emulator, with SDK retries that wait little."""
    oci = osa._import_oci()
    strategy = oci.retry.RetryStrategyBuilder(
        max_attempts=4, total_elapsed_time_seconds=30, retry_base_sleep_time_seconds=0,
        retry_max_wait_between_calls_seconds=0, service_error_retry_config={429: []},
        backoff_type=oci.retry.BACKOFF_FULL_JITTER_VALUE).get_retry_strategy()
    return osa.ObjectStoreClient.from_config(NAMESPACE, BUCKET, config_file=str(oci_config),
                                             endpoint=emulator.endpoint, retry_strategy=strategy)


def _server_urls():
    yield pytest.param("sqlite", id="sqlite")
    for name, var in (("postgresql", "FN4_TEST_POSTGRES_URL"), ("mariadb", "FN4_TEST_MARIADB_URL")):
        marks = [] if os.environ.get(var) else [pytest.mark.skip(reason=f"{var} is not set: no {name} to test on")]
        yield pytest.param(name, id=name, marks=marks)


@contextlib.contextmanager
def scratch_schema(kind, url):
    """Create a schema (PostgreSQL) or database (MariaDB) of a random name at ``url``; drop it after.

    Tests work only in what they made: nothing else in the database at ``url`` is read or written.
    """
    schema = f"t_{uuid.uuid4().hex[:12]}"
    engine = sa.create_engine(url)
    create = f"CREATE SCHEMA {schema}" if kind == "postgresql" else f"CREATE DATABASE {schema}"
    drop = f"DROP SCHEMA {schema} CASCADE" if kind == "postgresql" else f"DROP DATABASE {schema}"
    with engine.begin() as conn:
        conn.execute(sa.text(create))
    try:
        yield schema
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text(drop))
        engine.dispose()


@pytest.fixture(params=list(_server_urls()))
def database(request, tmp_path):
    """A catalogue database URL and schema, fresh for each test: SQLite, PostgreSQL, MariaDB."""
    kind = request.param
    if kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'catalogue.sqlite'}", None
        return
    url = os.environ["FN4_TEST_POSTGRES_URL" if kind == "postgresql" else "FN4_TEST_MARIADB_URL"]
    with scratch_schema(kind, url) as schema:
        yield url, schema


@pytest.fixture
def postgres_schema():
    """The FN4_TEST_POSTGRES_URL and a schema made for the test (dropped after); skips if the URL is not set."""
    url = os.environ.get("FN4_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("FN4_TEST_POSTGRES_URL is not set")
    with scratch_schema("postgresql", url) as schema:
        yield url, schema


def upload_series(emulator, items, start=T0, step=timedelta(minutes=1)):
    """Put (name, bytes) items with creation times ``step`` apart, in the order given."""
    for i, (name, data) in enumerate(items):
        emulator.put(BUCKET, name, data, time_created=start + i * step)


def fasta(guid, length=300, seed=0):
    """Return a small valid FASTA file for ``guid``."""
    bases = b"ACGT"
    seq = bytes(bases[(i * 7 + seed) % 4] for i in range(length))
    lines = [seq[i:i + 60] for i in range(0, len(seq), 60)]
    return b">" + guid.encode() + b"\n" + b"\n".join(lines) + b"\n"


def wait_for(condition, seconds=30.0, tick=0.05):
    """Wait, bounded, until condition() holds; return the seconds it took."""
    started = time.monotonic()
    pause = threading.Event()
    while time.monotonic() - started < seconds:
        if condition():
            return time.monotonic() - started
        pause.wait(tick)
    raise AssertionError(f"condition not reached in {seconds} s")


def disk_full(engine, full=True):
    """Make the SQLite catalogue refuse every attempt row as a full disk does (full=False: room again)."""
    with engine.begin() as conn:
        if full:
            conn.exec_driver_sql("CREATE TRIGGER disk_full BEFORE INSERT ON fn4loadattempt "
                                 "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END")
        else:
            conn.exec_driver_sql("DROP TRIGGER disk_full")


def free_port():
    """Return a loopback port nothing listens on now: connecting to it is refused, and a test may serve on it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
