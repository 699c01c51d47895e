"""The catalogue under faults: every call bounded, and a local journal so that no row is ever lost.

A half-open database connection, a catalogue that refuses writes (a full disk), the database down at
exit, and kill -9 of the loader: each is injected at a real boundary (a TCP proxy that black-holes a
live PostgreSQL connection, a SQLite trigger that refuses inserts, a real process killed by SIGKILL).
"""
import dataclasses
import logging
import random
import os
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

import objectstoreaccess as osa
from conftest import BUCKET, NAMESPACE, T0, fasta, upload_series, wait_for, disk_full
from tcp_proxy import TCPProxy

SCRIPT = Path(__file__).resolve().parent.parent / "objectstoreaccess.py"
PG = os.environ.get("FN4_TEST_POSTGRES_URL")
needs_pg = pytest.mark.skipif(not PG, reason="FN4_TEST_POSTGRES_URL is not set")


@pytest.fixture
def pg_schema():
    """A fresh PostgreSQL schema, dropped after the test."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    engine = sa.create_engine(PG)
    with engine.begin() as conn:
        conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
    try:
        yield schema
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
        engine.dispose()


def attempt_rows(url, schema=None):
    _, _, attempts = osa.build_tables(schema)
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return [r._asdict() for r in conn.execute(sa.select(attempts).order_by(attempts.c.gp_int_id))]
    finally:
        engine.dispose()


def attempt(i, host="loader-1"):
    """An attempt row whose times carry microseconds, as the loader's clock gives them."""
    moment = T0 + timedelta(seconds=i, microseconds=123457 + i)
    return osa.AttemptRow(host_name=host, findneighbour_server_url="http://fn4:5025", oci_namespace=NAMESPACE,
                          bucket_name=BUCKET, file_name=f"run 1/s{i:02d}.fasta", object_etag=f"etag-{i}",
                          object_size=300 + i, object_time_created=moment, batch_start_time=T0,
                          batch_sample_number=i + 1, batch_size=9, fn4id=f"s{i:02d}", insert_start_time=moment,
                          insert_end_time=moment + timedelta(milliseconds=25), insert_status_code=200,
                          completed=1, outcome="inserted", failed_attempts=0, parse_status="ok")


def _server_databases():
    for name, var in (("postgresql", "FN4_TEST_POSTGRES_URL"), ("mariadb", "FN4_TEST_MARIADB_URL")):
        marks = [] if os.environ.get(var) else [pytest.mark.skip(reason=f"{var} is not set")]
        yield pytest.param(os.environ.get(var), id=name, marks=marks)


@pytest.fixture(params=list(_server_databases()))
def server_database(request):
    """(URL, schema) of a fresh schema (a database on MariaDB) on a database server, dropped after the test."""
    url, schema = request.param, f"t_{uuid.uuid4().hex[:12]}"
    kind = "SCHEMA" if url.startswith("postgresql") else "DATABASE"
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text(f"CREATE {kind} {schema}"))
    try:
        yield url, schema
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text(f"DROP {kind} {schema}" + (" CASCADE" if kind == "SCHEMA" else "")))
        engine.dispose()


def proxied(url, proxy):
    return sa.make_url(url).set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)


# ---- bounds on every catalogue call (finding 6) ----


def test_a_black_holed_catalogue_connection_is_dropped_and_loading_goes_on(store, fn4, emulator, server_database,
                                                                           caplog):
    server, schema = server_database
    url = sa.make_url(server)
    with TCPProxy(url.host or "127.0.0.1", url.port or 5432) as proxy:
        catalogue = osa.LoadLogger(osa.LoadLogger.connect(proxied(server, proxy)), schema, retry_cap=0.2,
                                   call_timeout=1.0)
        catalogue.create_tables()
        catalogue.start()
        client = osa.FN4Client(fn4.url)
        stop = threading.Event()
        loader = osa.LoadLoop(store, client, catalogue, osa.Settings(), stop=stop)
        try:
            upload_series(emulator, [(f"a{i:02d}.fasta", fasta(f"a{i:02d}")) for i in range(5)])
            loader.run_cycle()
            assert catalogue.flush(30)
            assert proxy.blackhole() >= 1  # the pooled connection: packets dropped, new connections work
            later = [(f"b{i:02d}.fasta", fasta(f"b{i:02d}")) for i in range(osa.MAX_UNWRITTEN_ROWS + 10)]
            upload_series(emulator, later, start=T0 + timedelta(hours=1))
            worker = threading.Thread(target=loader.run_cycle, daemon=True)
            with caplog.at_level(logging.WARNING, logger="fn4loader"):
                worker.start()
                worker.join(60)
                assert not worker.is_alive(), "loading stalled behind a half-open catalogue connection"
                assert catalogue.flush(30), f"{catalogue.unwritten} rows never written"
        finally:
            stop.set()
            catalogue.close(1.0)
            client.close()
    rows = attempt_rows(server, schema)
    names = [r["file_name"] for r in rows]
    assert len(names) == len(set(names)) == 5 + osa.MAX_UNWRITTEN_ROWS + 10
    assert {r["outcome"] for r in rows} == {"inserted"} and len(fn4.inserts) == len(rows)
    assert "dropping its connections and reconnecting" in caplog.text


def test_catalogue_connections_carry_time_bounds(database):
    url, _schema = database
    engine = osa.LoadLogger.connect(url)
    try:
        with engine.connect() as conn:
            raw = conn.connection.dbapi_connection
            if engine.dialect.name == "sqlite":
                assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == osa.DB_CONNECT_TIMEOUT * 1000
            elif engine.dialect.name == "postgresql":
                params = raw.get_dsn_parameters()
                assert params["keepalives"] == "1" and int(params["keepalives_idle"]) > 0
                assert int(params["tcp_user_timeout"]) == osa.DB_CALL_TIMEOUT * 1000
                assert conn.exec_driver_sql("SHOW statement_timeout").scalar() == f"{osa.DB_CALL_TIMEOUT // 60}min"
            else:  # MariaDB through PyMySQL: the server accepted a connection made with these
                assert (raw._read_timeout, raw._write_timeout) == (osa.DB_CALL_TIMEOUT, osa.DB_CALL_TIMEOUT)
                assert conn.exec_driver_sql("SELECT 1").scalar() == 1
    finally:
        engine.dispose()


def test_oracle_connect_arguments_are_known_to_the_driver():
    oracledb = pytest.importorskip("oracledb")
    args = osa._connect_args(sa.make_url("oracle+oracledb://fn4:secret@adb.example.com:1522/fn4_high"))
    params = oracledb.ConnectParams(**args)  # the driver refuses a name it does not know
    assert params.tcp_connect_timeout == osa.DB_CONNECT_TIMEOUT and params.expire_time >= 1


# ---- the journal (findings 7 and 8) ----


def test_replay_is_idempotent_after_a_crash_between_commit_and_trim(database, tmp_path, caplog):
    url, schema = database
    journal = tmp_path / "rows.journal"
    first = osa.LoadLogger(sa.create_engine(url), schema, journal=journal)
    first.create_tables()
    rows = [attempt(i) for i in range(9)]
    for row in rows:
        first.record_attempt(row)  # journaled at once; the writer has not started
    crashed = journal.read_bytes()
    assert crashed.count(b"\n") == 1 + len(rows)  # a first line naming the catalogue, then one line a row
    first.start()
    assert first.flush(30) and first.close() == []
    assert journal.read_bytes() == b""  # everything committed: the journal is compacted
    # The process died after the commit but before the trim, in the middle of writing one more line.
    journal.write_bytes(crashed + b'{"n": 99, "table": "fn4loadatt')
    second = osa.LoadLogger(sa.create_engine(url), schema, journal=journal)
    second.create_tables()
    with caplog.at_level(logging.WARNING, logger="fn4loader"):
        second.start()
        assert second.flush(30) and second.close() == []
    assert "torn" in caplog.text
    written = attempt_rows(url, schema)
    assert len(written) == len(rows)
    for row, back in zip(rows, written):
        assert {k: back[k] for k in ("file_name", "object_etag", "insert_start_time", "outcome")} == {
            "file_name": row.file_name, "object_etag": row.object_etag,
            "insert_start_time": osa._naive_utc(row.insert_start_time), "outcome": row.outcome}
    assert journal.read_bytes() == b""


@needs_pg
def test_rows_unwritten_when_the_database_is_down_at_exit_are_written_at_the_next_start(pg_schema, tmp_path):
    url = sa.make_url(PG)
    journal = tmp_path / "rows.journal"
    with TCPProxy(url.host or "127.0.0.1", url.port or 5432) as proxy:
        first = osa.LoadLogger(osa.LoadLogger.connect(proxied(PG, proxy)), pg_schema, retry_cap=0.2,
                               journal=journal, call_timeout=1.0)
        first.create_tables()
        first.start()
        proxy.cut(refuse=True)
        for i in range(5):
            first.record_attempt(attempt(i))
        left = first.close(timeout=1.0)
        assert len(left) == 5 and journal.read_bytes().count(b"\n") == 1 + 5  # the catalogue's line, the rows
        proxy.restore()
        second = osa.LoadLogger(osa.LoadLogger.connect(proxied(PG, proxy)), pg_schema, journal=journal)
        second.create_tables()
        second.start()
        assert second.flush(30) and second.close() == []
    assert [r["file_name"] for r in attempt_rows(PG, pg_schema)] == [attempt(i).file_name for i in range(5)]
    assert journal.read_bytes() == b""


def test_journal_in_use_by_another_loader_is_refused(tmp_path):
    journal = tmp_path / "rows.journal"
    url = f"sqlite:///{tmp_path / 'c.sqlite'}"
    first = osa.LoadLogger(sa.create_engine(url), journal=journal)
    try:
        with pytest.raises(osa.ConfigError, match="in use by another loader"):
            osa.LoadLogger(sa.create_engine(url), journal=journal)
    finally:
        first.close()


def run_args(fn4, emulator, oci_config, db):
    return [fn4.url, NAMESPACE, BUCKET, db, "--once", "--config-file", str(oci_config), "--endpoint",
            emulator.endpoint]


def test_once_exits_1_in_bounded_time_when_the_catalogue_refuses_writes_and_loses_no_row(
        fn4, emulator, oci_config, tmp_path):
    path = tmp_path / "c.sqlite"
    db = f"sqlite:///{path}"
    osa.LoadLogger(sa.create_engine(db)).create_tables()
    engine = sa.create_engine(db)
    disk_full(engine)  # SQLite's own answer when the disk is full, on every attempt row
    total = osa.MAX_UNWRITTEN_ROWS + 10
    upload_series(emulator, [(f"s{i:02d}.fasta", fasta(f"s{i:02d}")) for i in range(total)])
    # A real process, its patience with the catalogue cut from 30 s to 1 s so that the test is quick.
    scaled = "import objectstoreaccess as osa; osa.ONCE_CATALOGUE_PATIENCE = 1.0; osa.main()"
    started = time.monotonic()
    try:
        result = subprocess.run([sys.executable, "-c", scaled, *run_args(fn4, emulator, oci_config, db)],
                                cwd=SCRIPT.parent, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("--once hung on a catalogue that refuses writes")
    took = time.monotonic() - started
    assert result.returncode == 1 and "Error: the catalogue database refused" in result.stderr, result.stderr
    assert took < 30
    sent = [i.guid for i in fn4.inserts if i.status == 200]
    assert 0 < len(sent) < total and attempt_rows(db) == []
    journal = osa.journal_path(sa.make_url(db), None, BUCKET)
    assert journal.parent == path.parent and journal.read_bytes().count(b"\n") >= len(sent)
    assert f"kept in the journal {journal}" in result.stderr
    # Still full at the next start: the journal's rows are known without the database, so nothing is
    # sent again and no file is recorded in_server.
    result = subprocess.run([sys.executable, "-c", scaled, *run_args(fn4, emulator, oci_config, db)],
                            cwd=SCRIPT.parent, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "Error: the catalogue database refused" in result.stderr, result.stderr
    assert [i.guid for i in fn4.inserts if i.status == 200] == sent
    disk_full(engine, full=False)  # the disk has room again
    again = CliRunner().invoke(osa.main, run_args(fn4, emulator, oci_config, db))
    assert again.exit_code == 0, again.output
    rows = attempt_rows(db)
    assert sorted(r["fn4id"] for r in rows) == [f"s{i:02d}" for i in range(total)]
    assert {r["outcome"] for r in rows} == {"inserted"}
    assert Counter(i.guid for i in fn4.inserts if i.status == 200).most_common(1)[0][1] == 1
    assert journal.read_bytes() == b""
    engine.dispose()


def test_the_daemon_keeps_retrying_a_catalogue_that_refuses_writes_and_warns(tmp_path, caplog):
    db = f"sqlite:///{tmp_path / 'c.sqlite'}"
    engine = sa.create_engine(db)
    catalogue = osa.LoadLogger(engine, retry_cap=0.1, journal=tmp_path / "rows.journal", call_timeout=0.5)
    catalogue.create_tables()
    disk_full(engine)  # SQLite's own answer when the disk is full, on every attempt row
    catalogue.start()
    for i in range(3):
        catalogue.record_attempt(attempt(i))
    stop = threading.Event()
    waiter = threading.Thread(target=catalogue.wait_until_below, args=(0, stop), daemon=True)
    try:
        with caplog.at_level(logging.WARNING, logger="fn4loader"):
            waiter.start()
            wait_for(lambda: "catalogue rows have waited" in caplog.text)
            assert waiter.is_alive() and catalogue.unwritten == 3  # no patience set: inserting waits, never fails
            disk_full(engine, full=False)  # the disk has room again
            waiter.join(30)
            assert not waiter.is_alive()
    finally:
        stop.set()
    assert "database or disk is full" in caplog.text and "kept in the journal" in caplog.text
    assert catalogue.close() == [] and len(attempt_rows(db)) == 3
    engine.dispose()


def test_kill_9_mid_batch_loses_no_catalogue_row(fn4, emulator, oci_config, tmp_path):
    path = tmp_path / "c.sqlite"
    db = f"sqlite:///{path}"
    total = 30
    upload_series(emulator, [(f"s{i:02d}.fasta", fasta(f"s{i:02d}")) for i in range(total)])
    fn4.insert_delay = 0.1
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *run_args(fn4, emulator, oci_config, db)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # the 13th answer is in and the loader went on to the 14th: the 12th's row, written while the 13th
        # was on its way, is in the journal
        wait_for(lambda: fn4.inserts_begun >= 14, 60)
    finally:
        proc.kill()
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == -9, err
    answered = [i.guid for i in fn4.inserts[:12]]
    fn4.insert_delay = 0
    again = CliRunner().invoke(osa.main, run_args(fn4, emulator, oci_config, db))
    assert again.exit_code == 0, again.output
    rows = attempt_rows(db)
    for guid in answered:  # not in_server: the catalogue still shows that the killed run inserted them
        assert [r["outcome"] for r in rows if r["fn4id"] == guid] == ["inserted"], guid
    assert sorted(fn4.guids) == [f"s{i:02d}" for i in range(total)]
    assert Counter(i.guid for i in fn4.inserts if i.status == 200).most_common(1)[0][1] == 1


# ---- soak: run alone with `pytest -m soak` ----


def finished_and_counted(rows, names, fn4):
    """Check every object ended loaded, nothing was sent or written twice; return the guids whose rows were lost."""
    latest = {r["file_name"]: r for r in rows}
    assert all(latest[n]["completed"] == 1 and latest[n]["outcome"] in osa.LOADED for n in names)
    accepted = Counter(i.guid for i in fn4.inserts if i.status == 200)
    assert len(accepted) == len(names) and max(accepted.values()) == 1, "a guid was inserted twice"
    inserted = Counter(r["fn4id"] for r in rows if r["outcome"] == "inserted")
    assert max(inserted.values()) == 1, "a catalogue row was written twice"
    return set(accepted) - set(inserted)


@pytest.mark.soak
def test_soak_kill_9_again_and_again_loses_no_row(fn4, emulator, oci_config, tmp_path):
    rng = random.Random(20261130)
    names = [f"k{i:03d}.fasta" for i in range(60)]
    upload_series(emulator, [(name, fasta(name[:4], seed=i)) for i, name in enumerate(names)])
    db = f"sqlite:///{tmp_path / 'c.sqlite'}"
    fn4.insert_delay = 0.02
    kills = 0
    for _ in range(5):
        target = fn4.inserts_begun + rng.randint(2, 12)
        proc = subprocess.Popen([sys.executable, str(SCRIPT), *run_args(fn4, emulator, oci_config, db)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_for(lambda: fn4.inserts_begun >= target or proc.poll() is not None, 60)
        finally:
            proc.kill()
            _, err = proc.communicate(timeout=10)
        kills += proc.returncode == -9
        assert proc.returncode in (-9, 0), err
    fn4.insert_delay = 0
    for _ in range(2):
        again = CliRunner().invoke(osa.main, run_args(fn4, emulator, oci_config, db))
        assert again.exit_code == 0, again.output
    assert kills >= 3
    rows = attempt_rows(db)
    lost = finished_and_counted(rows, names, fn4)
    # Only an insert in flight when the process died, and the one answered before it if its row was not yet
    # written, have no inserted row (fn4 applied them unseen): in_server.
    assert len(lost) <= 2 * kills
    assert all([r["outcome"] for r in rows if r["fn4id"] == guid] == ["in_server"] for guid in lost)


@needs_pg
@pytest.mark.soak
def test_soak_catalogue_black_holed_again_and_again_loses_no_row(
        store, fn4, emulator, pg_schema, tmp_path, caplog):
    rng = random.Random(20261201)
    names = [f"h{i:03d}.fasta" for i in range(120)]
    upload_series(emulator, [(name, fasta(name[:4], seed=i)) for i, name in enumerate(names)])
    fn4.insert_delay = 0.01
    url = sa.make_url(PG)
    holes = []
    with TCPProxy(url.host or "127.0.0.1", url.port or 5432) as proxy:
        catalogue = osa.LoadLogger(osa.LoadLogger.connect(proxied(PG, proxy)), pg_schema, retry_cap=0.2,
                                   journal=tmp_path / "rows.journal", call_timeout=0.5)
        catalogue.create_tables()
        catalogue.start()
        client = osa.FN4Client(fn4.url)
        done = threading.Event()
        loader = osa.LoadLoop(store, client, catalogue, osa.Settings(), stop=threading.Event())

        def black_hole_now_and_then():
            while not done.wait(rng.uniform(0.05, 0.4)):
                holes.append(proxy.blackhole())

        holer = threading.Thread(target=black_hole_now_and_then, daemon=True)
        holer.start()
        try:
            with caplog.at_level(logging.WARNING, logger="fn4loader"):
                for _ in range(40):
                    if loader.run_cycle().tried == 0:
                        break
        finally:
            done.set()
            holer.join(10)
        assert catalogue.flush(60) and catalogue.close() == []
        client.close()
    assert sum(holes) >= 5, holes
    assert "dropping its connections and reconnecting" in caplog.text
    assert not finished_and_counted(attempt_rows(PG, pg_schema), names, fn4)


# ---- a row the database refuses for its content never blocks the queue ----


POISON_NAMES = {
    "surrogate": "run 1/a\udcff.fasta",            # a lone surrogate: no driver can encode it
    "four_byte": "run 1/\U0001f9ec-s1.fasta",      # 4-byte UTF-8: refused by a MariaDB utf8mb3 column
    "too_long": "run 1/" + "x" * 1100 + ".fasta",  # longer than the 1024-character column
    "nul": "run 1/a\x00b.fasta",                   # PostgreSQL refuses NUL in text
}


@pytest.mark.parametrize("poison", sorted(POISON_NAMES))
def test_a_row_the_database_refuses_for_its_content_is_written_sanitised_and_the_queue_drains(
        database, tmp_path, caplog, poison):
    url, schema = database
    engine = sa.create_engine(url)
    if engine.dialect.name in ("mysql", "mariadb") and poison == "four_byte":
        with engine.begin() as conn:  # a catalogue made by an older MariaDB, in utf8mb3
            conn.exec_driver_sql(f"ALTER DATABASE {schema} CHARACTER SET utf8mb3 COLLATE utf8mb3_general_ci")
    catalogue = osa.LoadLogger(engine, schema, retry_cap=0.2, journal=tmp_path / "rows.journal")
    catalogue.create_tables()
    good = [attempt(i) for i in range(5)]
    bad = dataclasses.replace(attempt(9), file_name=POISON_NAMES[poison])
    with caplog.at_level(logging.WARNING, logger="fn4loader"):
        catalogue.start()
        for row in good[:2] + [bad] + good[2:]:
            catalogue.record_attempt(row)
        try:
            drained = catalogue.flush(10)
        finally:
            left = catalogue.close(1.0)
    assert drained and left == [], f"{len(left)} rows never written: the queue is blocked"
    rows = attempt_rows(url, schema)
    assert [r["file_name"] for r in rows if r["object_etag"] != bad.object_etag] == [r.file_name for r in good]
    [written] = [r for r in rows if r["object_etag"] == bad.object_etag]
    assert written["outcome"] == bad.outcome and written["fn4id"] == bad.fn4id  # the file still has its state
    if written["file_name"] != bad.file_name:  # refused as it was: stored escaped or cut, and says so
        assert len(written["file_name"]) <= 1024 and written["file_name"].isprintable()
        assert written["error_text"].startswith("stored with file_name ")
        assert caplog.text.count("refused a row") == 1
    assert (tmp_path / "rows.journal").read_bytes() == b""
    engine.dispose()


def test_a_journal_of_another_catalogue_is_refused_not_replayed_into_this_one(fn4, emulator, oci_config, tmp_path):
    journal = tmp_path / "rows.journal"
    first, other = f"sqlite:///{tmp_path / 'first.sqlite'}", f"sqlite:///{tmp_path / 'other.sqlite'}"
    catalogue = osa.LoadLogger(sa.create_engine(first), journal=journal)
    catalogue.create_tables()
    for i in range(3):
        catalogue.record_attempt(attempt(i))  # journaled; the writer never started: the process "died"
    assert len(catalogue.close(0)) == 3
    result = CliRunner().invoke(osa.main, [*run_args(fn4, emulator, oci_config, other), "--journal", str(journal)])
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert result.exit_code == 2 and len(errors) == 1, result.output
    assert str(journal) in errors[0] and "first.sqlite" in errors[0]
    assert not fn4.inserts and (not Path(tmp_path / "other.sqlite").exists() or attempt_rows(other) == [])
    again = CliRunner().invoke(osa.main, [*run_args(fn4, emulator, oci_config, first), "--journal", str(journal)])
    assert again.exit_code == 0, again.output  # its own catalogue takes its rows
    assert [r["file_name"] for r in attempt_rows(first)] == [attempt(i).file_name for i in range(3)]
    assert journal.read_bytes() == b""


def test_objects_named_with_a_lone_surrogate_do_not_stall_the_loader(store, fn4, emulator, database, tmp_path):
    """Object Storage can list a name no driver encodes; the loop goes on and every file gets a state row."""
    url, schema = database
    names = ["a0.fasta", "run\udcff/s1.fasta", "bad\udcff.fasta", "a2.fasta"]
    upload_series(emulator, [(name, fasta(f"g{i}")) for i, name in enumerate(names)])
    catalogue = osa.LoadLogger(sa.create_engine(url), schema, retry_cap=0.2, journal=tmp_path / "rows.journal")
    catalogue.create_tables()
    client = osa.FN4Client(fn4.url)
    loader = osa.LoadLoop(store, client, catalogue.start(), osa.Settings(),
                          stop=threading.Event())
    try:
        loader.run_cycle()
        assert catalogue.flush(30), f"{catalogue.unwritten} catalogue rows never written: the queue is blocked"
    finally:
        left = catalogue.close(1.0)
        client.close()
    assert left == []
    rows = attempt_rows(url, schema)
    assert sorted(r["file_name"] for r in rows) == sorted(n.encode("unicode_escape").decode() for n in names)
    assert sorted(fn4.guids) == ["a0", "a2"]
