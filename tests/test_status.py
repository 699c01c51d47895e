"""Signals an operator can trust: `list`, `status` and the metrics agree, and alerts clear when the problem does.

Rows are made by a real LoadLoop (emulator, fn4 stand-in, real catalogue) with an injected clock, so
an hour passes without a sleep; `status` runs as the real command line or as the functions it calls.
"""
import json
from datetime import timedelta
from urllib.parse import quote

import pytest
import requests
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

import objectstoreaccess as osa
from conftest import BUCKET, NAMESPACE, fasta, upload_series
from fn4_standin import Scripted
from oci_emulator import Fault
from test_service import cli, load_once, status, status_json


class Clock:
    """An injected clock that moves only when told."""

    def __init__(self, start):
        self.now = start

    def __call__(self):
        return self.now

    def advance(self, **kwargs):
        self.now += timedelta(**kwargs)


@pytest.fixture
def loader(store, fn4):
    """Build one LoadLoop on the emulator, the fn4 stand-in and a real catalogue, with an injected clock."""
    made = []

    def make(database, clock, **settings):
        url, schema = database
        catalogue = osa.LoadLogger(sa.create_engine(url), schema)
        catalogue.create_tables()
        client = osa.FN4Client(fn4.url, timeout=(5.0, 30.0))
        metrics = osa.Metrics(clock=clock, max_age=3600)
        made.append(osa.LoadLoop(store, client, catalogue.start(), osa.Settings(**settings),
                                 clock=clock, metrics=metrics, host_name="vm-1"))
        return made[-1]

    yield make
    for each in made:
        each.stop.set()
        each.catalogue.close()
        each.fn4.close()


def cycle(loader):
    """Run one cycle as run() does, abandoned or not, and wait for its rows to be written."""
    try:
        loader.run(once=True)
    except osa.OutageError:
        pass  # the abandoned cycle is recorded either way
    assert loader.catalogue.flush(30)


def assessed(loader, now, share=0.5, poll_interval=180):
    """The status of the one loader as `status` would report it at ``now``."""
    [found] = loader.catalogue.reports(now)
    return osa.assess(found, now, poll_interval, share)


def levels(report):
    return [problem.split(":")[0] for problem in report.problems]


def scrape(metrics):
    server = metrics.serve("127.0.0.1", 0)
    try:
        text = requests.get(f"http://127.0.0.1:{server.server_address[1]}/metrics", timeout=5).text
    finally:
        server.shutdown()
        server.server_close()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


# ---- One vocabulary, one set of counts ----


def list_json(fn4, emulator, oci_config, database):
    url, schema = database
    result = cli("list", fn4.url, NAMESPACE, BUCKET, url, "--config-file", oci_config, "--endpoint",
                 emulator.endpoint, "--json", *(["--db-schema", schema] if schema else []))
    assert result.exit_code == 0, result.output
    return {f["name"]: f for f in json.loads(result.stdout)}


def test_list_and_status_give_a_duplicate_the_same_state(fn4, emulator, oci_config, database):
    """A duplicate is failed in `list` and in `status` alike, and both count the same failed files."""
    upload_series(emulator, [("old/x.fasta", fasta("x")), ("new/x.fasta", fasta("x", seed=1)),
                             ("bad.fasta", b"not fasta"), ("a.fasta", fasta("a"))])
    assert load_once(fn4, emulator, oci_config, database).exit_code == 0
    files = list_json(fn4, emulator, oci_config, database)
    assert {name: (f["state"], f["outcome"]) for name, f in files.items()} == {
        "old/x.fasta": ("loaded", "inserted"), "new/x.fasta": ("failed", "duplicate"),
        "bad.fasta": ("failed", "failed"), "a.fasta": ("loaded", "inserted")}
    code, report = status_json(database)
    [one] = report["loaders"]
    assert code == 1 and sorted(f["file_name"] for f in one["failed_files"]) == sorted(
        name for name, f in files.items() if f["state"] == "failed")
    assert one["backlog"] == sum(f["state"] == "pending" for f in files.values()) == 0


def test_list_shows_the_state_the_next_cycle_will_record(fn4, emulator, oci_config, tmp_path):
    """Before any cycle, a file whose guid fn4 holds is loaded, its younger namesake failed, the rest pending."""
    database = (f"sqlite:///{tmp_path / 'c.sqlite'}", None)
    osa.LoadLogger.from_database_arg(database[0]).close()  # a catalogue without rows: list makes none
    upload_series(emulator, [("old/x.fasta", fasta("x")), ("new/x.fasta", fasta("x", seed=1)),
                             ("y.fasta", fasta("y"))])
    fn4.guids["x"] = None
    files = list_json(fn4, emulator, oci_config, database)
    assert {name: f["state"] for name, f in files.items()} == {
        "old/x.fasta": "loaded", "new/x.fasta": "failed", "y.fasta": "pending"}


def test_status_counts_files_not_attempt_rows(fn4, emulator, oci_config, database):
    """Three bad files failed, re-queued and failed again are 3 failed files, not 6."""
    upload_series(emulator, [(f"bad{i}.fasta", b"not fasta") for i in range(3)] + [("a.fasta", fasta("a"))])
    url, schema = database
    db_args = [url, *(["--db-schema", schema] if schema else [])]
    assert load_once(fn4, emulator, oci_config, database).exit_code == 0
    assert cli("retry-failed", fn4.url, NAMESPACE, BUCKET, *db_args).exit_code == 0
    code, report = status_json(database)
    assert code == 0 and report["loaders"][0]["failed_files"] == []  # re-queued: not failed any more
    assert load_once(fn4, emulator, oci_config, database).exit_code == 0
    code, report = status_json(database)
    [one] = report["loaders"]
    assert code == 1 and len(one["failed_files"]) == 3
    assert [p for p in one["problems"] if "failed for good" in p] == [
        "warning: 3 files failed for good (latest outcome duplicate, failed, gave_up, vanished); "
        "retry-failed re-queues them"]
    text = status(database).stdout
    assert "3 files failed for good" in text and "failed files (3, latest first)" in text


def test_backlog_is_the_files_pending(loader, emulator, fn4, tmp_path):
    """backlog counts files listed and neither loaded nor failed: retries and files after a pause stay pending."""
    upload_series(emulator, [(f"s{i}.fasta", fasta(f"s{i}", seed=i)) for i in range(6)])
    clock = Clock(osa.utcnow() - timedelta(minutes=30))
    one = loader((f"sqlite:///{tmp_path / 'c.sqlite'}", None), clock)
    fn4.script(Scripted(status=500, guid="s1"), Scripted(status=503, guid="s4"))
    cycle(one)  # s0 loaded, s1 to retry, s2 s3 loaded, s4 pauses the batch, s5 untried
    assert assessed(one, clock()).backlog == 3
    assert scrape(one.metrics)[("fn4loader_backlog", ())] == 3
    clock.advance(seconds=20)
    cycle(one)
    assert assessed(one, clock()).backlog == 0 and scrape(one.metrics)[("fn4loader_backlog", ())] == 0
    assert sorted(fn4.guids) == [f"s{i}" for i in range(6)]


# ---- Alerts that clear when the problem clears ----


def test_a_busy_fn4_is_not_a_failure(loader, emulator, fn4, tmp_path):
    """409 (insert lock held by another loader), 429 and 408 pause the batch but never make status critical."""
    upload_series(emulator, [(f"s{i}.fasta", fasta(f"s{i}", seed=i)) for i in range(4)])
    clock = Clock(osa.utcnow())
    one = loader((f"sqlite:///{tmp_path / 'c.sqlite'}", None), clock)
    for status_code in (409, 429, 408):
        fn4.script(Scripted(status=status_code))
        cycle(one)
        clock.advance(seconds=40)
        report = assessed(one, clock())
        assert report.level == 0, report.problems
    assert report.outcomes == {"server_busy": 3} and report.recent_files == {"server_busy": 1}
    assert report.problems[-1].startswith("ok: fn4 asked the loader to wait 3 time(s)")
    cycle(one)
    assert sorted(fn4.guids) == [f"s{i}" for i in range(4)] and assessed(one, clock()).level == 0


def test_bad_files_are_a_warning_not_critical(loader, emulator, fn4, tmp_path):
    """Two wrong-length files against four inserts: a warning for the failed files, not critical."""
    upload_series(emulator, [(f"s{i}.fasta", fasta(f"s{i}", seed=i)) for i in range(4)]
                  + [("short1.fasta", fasta("short1", length=200)), ("short2.fasta", fasta("short2", length=100))])
    clock = Clock(osa.utcnow())
    one = loader((f"sqlite:///{tmp_path / 'c.sqlite'}", None), clock, expected_length=300)
    cycle(one)
    report = assessed(one, clock())
    assert report.level == 1 and levels(report) == ["warning"] and len(report.failed_files) == 2


def test_an_outage_that_abandons_cycles_is_recorded_counted_named_and_clears(loader, emulator, fn4, database):
    """An fn4 outage: batch rows with the reason, counters that move, status critical naming it; then OK at once."""
    upload_series(emulator, [("a.fasta", fasta("a"))])
    clock = Clock(osa.utcnow() - timedelta(minutes=5))
    one = loader(database, clock)
    fn4.down, fn4.down_mode = True, "refuse"
    cycle(one)
    first = clock()
    clock.advance(minutes=1)
    cycle(one)
    report = assessed(one, clock())
    assert report.level == 2 and report.abandoned_cycles == 2 and report.abandoned_since == first
    [problem] = [p for p in report.problems if "abandoned" in p]
    assert problem == (f"critical: {report.abandoned} (since {first:%Y-%m-%d %H:%M:%S} UTC: 2 cycle(s) abandoned)")
    assert "fn4" in report.abandoned
    metrics = scrape(one.metrics)
    assert metrics[("fn4loader_cycles_abandoned_total", (("service", "fn4"),))] == 2
    assert metrics[("fn4loader_cycles_abandoned_total", (("service", "object_storage"),))] == 0
    assert metrics[("fn4loader_attempts_total", (("outcome", "server_unavailable"),))] == 2
    code, out = status_json(database)
    assert code == 2 and out["loaders"][0]["abandoned"] == report.abandoned
    assert "abandoned" in status(database).stdout

    emulator.add_fault(Fault(method="GET", path_contains=f"/b/{BUCKET}/o", times=-1, status=503))
    fn4.down = False
    clock.advance(minutes=1)
    cycle(one)
    report = assessed(one, clock())
    assert report.level == 2 and report.abandoned_cycles == 3 and "listing bucket" in report.abandoned
    metrics = scrape(one.metrics)
    assert metrics[("fn4loader_cycles_abandoned_total", (("service", "object_storage"),))] == 1

    emulator.clear_faults()
    clock.advance(minutes=1)
    cycle(one)
    report = assessed(one, clock())
    assert report.level == 0 and report.problems == () and "a" in fn4.guids
    assert status_json(database)[0] == 0


def test_a_paused_cycle_is_critical_until_the_next_cycle_loads(loader, emulator, fn4, tmp_path):
    """fn4 unavailable mid-batch (503): critical at once; the next cycle that loads clears it at once."""
    upload_series(emulator, [(f"s{i}.fasta", fasta(f"s{i}", seed=i)) for i in range(3)])
    clock = Clock(osa.utcnow())
    one = loader((f"sqlite:///{tmp_path / 'c.sqlite'}", None), clock)
    fn4.script(Scripted(status=503, times=-1))
    cycle(one)
    report = assessed(one, clock())
    assert report.level == 2 and report.paused and "fn4 unavailable (503)" in report.paused
    fn4.clear_script()
    clock.advance(seconds=30)
    cycle(one)
    report = assessed(one, clock())
    assert report.level == 0 and report.problems == () and len(fn4.guids) == 3


def test_failing_inserts_are_critical_then_a_warning_then_clear_within_the_hour(loader, emulator, fn4, tmp_path):
    """fn4 answering 500 to every insert is critical; once the files load it is a warning, OK an hour later."""
    upload_series(emulator, [(f"s{i}.fasta", fasta(f"s{i}", seed=i)) for i in range(3)])
    clock = Clock(osa.utcnow() - timedelta(minutes=90))
    one = loader((f"sqlite:///{tmp_path / 'c.sqlite'}", None), clock, max_attempts=5)
    fn4.script(Scripted(status=500, times=-1))
    cycle(one)
    clock.advance(minutes=3)
    cycle(one)
    report = assessed(one, clock())
    assert report.level == 2 and report.recent_files == {"retry": 3} and report.outcomes == {"retry": 6}
    assert any(p.startswith("critical: 3 of 3 files tried") for p in report.problems)
    fn4.clear_script()
    clock.advance(minutes=3)
    cycle(one)
    report = assessed(one, clock())
    assert report.level == 1 and report.recent_files == {"inserted": 3}
    assert levels(report) == ["warning"] and "6 attempts to retry" in report.problems[0]
    clock.advance(minutes=61)
    assert assessed(one, clock(), poll_interval=3600).level == 0
    code, out = status_json((f"sqlite:///{tmp_path / 'c.sqlite'}", None), "--poll-interval", 3600)  # 84 min later
    assert code == 0 and out["loaders"][0]["problems"] == []


def test_a_failed_file_warns_until_it_is_requeued(loader, emulator, fn4, tmp_path):
    """A file refused for good is a warning; re-queued it clears at once, and stays clear once loaded."""
    upload_series(emulator, [("a.fasta", fasta("a")), ("b.fasta", fasta("b", seed=1))])
    clock = Clock(osa.utcnow())
    one = loader((f"sqlite:///{tmp_path / 'c.sqlite'}", None), clock)
    fn4.script(Scripted(status=403, guid="b"))
    cycle(one)
    report = assessed(one, clock())
    assert report.level == 1 and [f["file_name"] for f in report.failed_files] == ["b.fasta"]
    clock.advance(hours=30)  # still failed a day later: it needs an operator
    assert assessed(one, clock(), poll_interval=86400).level == 1
    assert one.catalogue.requeue(one.target, ["b.fasta"], clock(), one.host_name) == ["b.fasta"]
    assert one.catalogue.flush(30)
    report = assessed(one, clock(), poll_interval=86400)
    assert report.level == 0 and report.failed_files == ()
    cycle(one)
    report = assessed(one, clock())
    assert report.level == 0 and report.failed_files == () and "b" in fn4.guids


def test_last_success_metric_starts_from_the_catalogue(loader, emulator, fn4, tmp_path):
    """After a restart, /metrics reports the catalogue's last accepted insert, not 0."""
    upload_series(emulator, [("a.fasta", fasta("a"))])
    database = (f"sqlite:///{tmp_path / 'c.sqlite'}", None)
    clock = Clock(osa.utcnow() - timedelta(hours=2))
    first = loader(database, clock)
    cycle(first)
    loaded_at = clock()
    first.catalogue.close()
    clock.advance(hours=2)
    restarted = loader(database, clock)
    assert scrape(restarted.metrics)[("fn4loader_last_success_timestamp_seconds", ())] == 0
    cycle(restarted)  # nothing new to load
    assert scrape(restarted.metrics)[("fn4loader_last_success_timestamp_seconds", ())] == loaded_at.timestamp()


# ---- status always answers: UNKNOWN when the catalogue cannot be read ----


@pytest.mark.parametrize("kind", ["missing-file", "no-tables", "not-a-database", "missing-postgresql-database"])
def test_status_on_an_unreadable_catalogue_is_unknown(tmp_path, kind):
    """Exit 3 with the reason: JSON under --json, one Error line otherwise; no file is made, no traceback."""
    import os
    path = tmp_path / "c.sqlite"
    url = f"sqlite:///{path}"
    if kind == "no-tables":
        path.touch()
    elif kind == "not-a-database":
        path.write_bytes(b"this is no SQLite file" * 100)
    elif kind == "missing-postgresql-database":
        if not os.environ.get("FN4_TEST_POSTGRES_URL"):
            pytest.skip("FN4_TEST_POSTGRES_URL is not set")
        url = sa.make_url(os.environ["FN4_TEST_POSTGRES_URL"]).set(database="no_such_catalogue_db")
        url = url.render_as_string(hide_password=False)
    result = status((url, None), "--json")
    assert result.exit_code == 3, result.output
    report = json.loads(result.stdout)
    assert report["status"] == "unknown" and report["exit_code"] == 3 and report["loaders"] == []
    words = {"missing-file": "does not exist", "no-tables": "no loader tables",
             "not-a-database": "cannot use the catalogue", "missing-postgresql-database": "cannot use the catalogue"}
    assert words[kind] in report["reason"]
    text = status((url, None))
    assert text.exit_code == 3 and "Traceback" not in text.output and text.stdout == ""
    assert len(text.stderr.splitlines()) == 1 and text.stderr.startswith("Error: ")
    assert words[kind] in text.stderr
    if kind == "missing-file":
        assert not path.exists()


# ---- Abandoned cycles: a column that existing catalogues gain ----


def test_existing_tables_gain_the_abandon_reason_column(database):
    """Tables of the previous version are upgraded in place: abandon_reason added, commented, rows kept."""
    url, schema = database
    engine = sa.create_engine(url)
    metadata, batches, _ = osa.build_tables(schema)
    old = sa.MetaData(schema=schema)
    tables = [sa.Table(table.name, old, *[c._copy() for c in table.columns if c.name != "abandon_reason"])
              for table in metadata.tables.values()]
    old.create_all(engine)
    with engine.begin() as conn:
        conn.execute(tables[0].insert(), [{"host_name": "h", "bucket_name": BUCKET, "batch_size": 2}])
    catalogue = osa.LoadLogger.from_database_arg(url, schema)
    catalogue.record_batch(osa.BatchRow(host_name="h", bucket_name=BUCKET, abandon_reason="fn4 down"))
    assert catalogue.close() == []
    with engine.connect() as conn:
        rows = conn.execute(sa.select(batches.c.batch_size, batches.c.abandon_reason)
                            .order_by(batches.c.bl_int_id)).all()
    assert [tuple(r) for r in rows] == [(2, None), (None, "fn4 down")]
    if engine.dialect.name != "sqlite":
        [column] = [c for c in sa.inspect(engine).get_columns("fn4batchload", schema=schema)
                    if c["name"] == "abandon_reason"]
        assert column["comment"] == batches.c.abandon_reason.comment
    engine.dispose()


def test_the_abandon_reason_upgrade_renders_for_oracle():
    """The Alembic upgrade of the previous version's tables, as Oracle SQL: one column, with its comment."""
    import io

    from alembic.migration import MigrationContext
    from alembic.operations import Operations

    metadata, _, _ = osa.build_tables()
    existing = {table.name: ([{"name": c.name, "type": c.type, "nullable": True} for c in table.columns
                              if c.name != "abandon_reason"], {i.name for i in table.indexes})
                for table in metadata.tables.values()}
    sql = io.StringIO()
    context = MigrationContext.configure(dialect_name="oracle", opts={"as_sql": True, "output_buffer": sql})
    changes = osa.upgrade_tables(lambda: Operations(context), "oracle", metadata, existing)
    assert changes == ["added fn4batchload.abandon_reason"]
    text = sql.getvalue()
    assert "ALTER TABLE fn4batchload ADD abandon_reason VARCHAR2(2000 CHAR)" in text
    assert "COMMENT ON COLUMN fn4batchload.abandon_reason IS 'Why the cycle was abandoned" in text


def test_status_redacts_known_secrets_from_error_text_written_before_redaction(tmp_path):
    """An old row's error_text that quotes a secret is shown redacted, in text and in JSON."""
    secret = "w@llet/S3cret"
    database = (f"sqlite:///{tmp_path / 'c.sqlite'}", None)
    catalogue = osa.LoadLogger(sa.create_engine(database[0]))
    catalogue.create_tables()
    now = osa.utcnow()
    catalogue.record_batch(osa.BatchRow(host_name="vm-1", findneighbour_server_url="http://fn4:5025",
                                        oci_namespace=NAMESPACE, bucket_name=BUCKET, check_time=now, batch_size=1))
    catalogue.record_attempt(osa.AttemptRow(
        host_name="vm-1", findneighbour_server_url="http://fn4:5025", oci_namespace=NAMESPACE, bucket_name=BUCKET,
        file_name="s1.fasta", object_etag="e1", batch_start_time=now, batch_sample_number=1, completed=1,
        outcome="failed", parse_status="fn4_refused", failed_attempts=0,
        error_text=f"fn4 answered 403: wallet {secret} refused; as sent: {quote(secret, safe='')}"))
    catalogue.start()
    assert catalogue.flush(30) and catalogue.close() == []
    text = cli("status", database[0], WALLET_PASSWORD=secret)
    as_json = cli("status", database[0], "--json", WALLET_PASSWORD=secret)
    code, report = as_json.exit_code, json.loads(as_json.stdout)
    assert "s1.fasta" in text.stdout and code == text.exit_code == 1, text.stdout
    [failed] = report["loaders"][0]["failed_files"]
    assert failed["error_text"] == "fn4 answered 403: wallet *** refused; as sent: ***"
    for output in (text.stdout, json.dumps(report)):
        assert "S3cret" not in output
