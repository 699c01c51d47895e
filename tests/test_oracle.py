"""Oracle, checked without an Oracle server: every statement the loader really issues, compiled for Oracle.

Realistic runs on SQLite (a loader's cycles with failures, retries and a pause, a journal replay,
retry-failed, status, list, pruning, leases taken, renewed, lost and released, an upgrade) are
watched by an engine event that keeps each statement; each is then compiled with SQLAlchemy's
Oracle dialect, and held to the rules a compile alone does not enforce (ORA-01795's 1000 items
in an IN list, '' stored as NULL, no boolean in a select list, no LIMIT, short unquoted names,
naive UTC datetimes, the database's time only through database_utc). The statements' kinds must
cover every public LoadLogger and Lease method, so a new method is checked as soon as it exists.
"""
import inspect
import json
import re
import sys
import threading
from datetime import datetime, timedelta, timezone

import sqlalchemy as sa
from sqlalchemy.dialects import oracle, sqlite
from sqlalchemy.sql import operators, visitors
from sqlalchemy.sql.elements import BinaryExpression, BindParameter, Label, TextClause

import objectstoreaccess as osa
from conftest import BUCKET, NAMESPACE, T0, fasta, upload_series
from fn4_standin import FN4StandIn, Scripted
from test_service import cli
from test_upgrade import predecessor_tables

ORACLE = oracle.dialect()
ORACLE_IN_LIST_LIMIT = 1000  # ORA-01795: maximum number of expressions in a list is 1000
#: Public methods that issue no statement of their own, and why (the test fails for any other without one).
NO_STATEMENT = {
    "LoadLogger.connect": "builds an engine", "LoadLogger.from_database_arg": "calls create_tables",
    "LoadLogger.at_start": "calls its action", "LoadLogger.unusable": "builds an error",
    "LoadLogger.start": "starts the writer", "LoadLogger.record_batch": "queues: the writer inserts",
    "LoadLogger.record_attempt": "queues: the writer inserts", "LoadLogger.pending_attempts": "reads the queue",
    "LoadLogger.wait_until_below": "waits on the queue", "LoadLogger.flush": "waits on the writer",
    "LoadLogger.close": "stops the writer", "LoadLogger.status_queries": "builds what status runs",
    "Lease.kept": "calls tend and release", "LoadLogger.rows_held_after": "reads what the writer kept of its own rows",
    "LoadLogger.has_tables": "asks the dialect's own inspector (driver SQL, not a statement of ours)",
}
#: Functions the database's time may come from: only database_utc, the same clock for every host.
CLOCK_FUNCTIONS = {"now", "current_timestamp", "localtimestamp", "sysdate", "systimestamp", "current_date",
                   "utc_timestamp", "getdate"}


class Capture:
    """Keep every statement any engine executes, with the LoadLogger and Lease methods (and module
    functions) on the stack that issued it."""

    def __init__(self):
        self.statements = []
        self.lock = threading.Lock()

    def __call__(self, conn, element, multiparams, params, execution_options):
        callers, frame = set(), sys._getframe(1)
        while frame is not None:
            owner = frame.f_locals.get("self")
            if isinstance(owner, (osa.LoadLogger, osa.Lease)):
                callers.add(f"{type(owner).__name__}.{frame.f_code.co_name}")
            elif frame.f_globals is osa.__dict__:
                callers.add(frame.f_code.co_name)
            frame = frame.f_back
        with self.lock:
            self.statements.append((element, list(multiparams), dict(params), frozenset(callers)))

    def __enter__(self):
        sa.event.listen(sa.engine.Engine, "before_execute", self)
        return self

    def __exit__(self, *exc):
        sa.event.remove(sa.engine.Engine, "before_execute", self)


def public_methods():
    """Every public method of LoadLogger and Lease, as ``Class.method`` (properties are state, not calls)."""
    calls = (staticmethod, classmethod)
    return {f"{cls.__name__}.{name}" for cls in (osa.LoadLogger, osa.Lease) for name, member in vars(cls).items()
            if not name.startswith("_") and (inspect.isfunction(member) or isinstance(member, calls))}


def as_oracle(element):
    """Return the statement as it is built on Oracle: database_utc's SQLite text turned into Oracle's."""
    def swap(node):
        if isinstance(node, sa.sql.elements.ColumnClause) and node.is_literal and "strftime(" in node.name:
            seconds = float(re.search(r"'([-+][\d.]+) seconds'", node.name).group(1))
            return osa.database_utc("oracle", seconds)
        return None
    return visitors.replacement_traverse(element, {}, swap)


def oracle_sql(element, multiparams, literal):
    """Compile for Oracle, binds expanded; with ``literal``, values written into the SQL where they can be."""
    if literal and multiparams and isinstance(element, sa.sql.dml.Insert):
        element = element.values(multiparams[0])  # an executemany insert: one row's values
    kwargs = {"render_postcompile": True, **({"literal_binds": True} if literal else {})}
    return str(element.compile(dialect=ORACLE, compile_kwargs=kwargs))


def in_list_sizes(sql):
    """Return the item counts of the literal or bind lists after IN in ``sql`` (not subqueries)."""
    return [len(items.split(",")) for items in re.findall(r"\bIN \(((?!\s*SELECT\b)[^()]*)\)", sql, re.I)]


def problems(element, multiparams, params):
    """Return the ways one statement breaks an Oracle rule a compile does not catch."""
    found = []
    if isinstance(element, TextClause):
        return [f"raw SQL text bypasses the dialect: {element.text[:80]}"]
    sql = oracle_sql(element, multiparams, literal=False)
    try:
        literal = oracle_sql(element, multiparams, literal=True)
    except (sa.exc.CompileError, NotImplementedError) as exc:  # a type with no literal form: binds only
        literal = sql
        if not isinstance(element, sa.schema.ExecutableDDLElement):
            found.append(f"cannot render literally for Oracle: {exc}")
    found += [f"IN list of {n} items (ORA-01795)" for n in in_list_sizes(sql) if n > ORACLE_IN_LIST_LIMIT]
    found += [f"LIMIT/OFFSET/boolean literal: {sql[:120]}" for word in ("LIMIT", "OFFSET", "true", "false")
              if re.search(rf"\b{word}\b", sql)]
    found += [f"comparison with '' (Oracle's NULL: never true): {m}"
              for m in re.findall(r"(?:=|<>|!=|\bIN \(|,)\s*''(?!')", literal)]
    found += [f"identifier {name} longer than 30 characters" for name in
              re.findall(r'"([^"]+)"|:(\w+)|\bAS (\w+)', sql) for name in name if len(name) > 30]
    found += [f"quoted lower-case identifier {name!r}: case-sensitive on Oracle"
              for name in re.findall(r'"([^"]+)"', sql) if name != name.upper()]
    for node in visitors.iterate(element):
        if isinstance(node, sa.sql.Select):
            for column in node.selected_columns:
                inner = column.element if isinstance(column, Label) else column
                if isinstance(inner.type, sa.Boolean) and not isinstance(inner, sa.sql.elements.Case):
                    found.append(f"boolean expression in a select list (no boolean type before 23c): {inner}")
        if isinstance(node, sa.sql.functions.FunctionElement) and node.name.lower() in CLOCK_FUNCTIONS:
            found.append(f"database time from {node.name}(), not database_utc")
        if isinstance(node, BinaryExpression) and node.operator in (operators.eq, operators.ne, operators.in_op,
                                                                    operators.not_in_op):
            values = [getattr(side, "value", None) for side in (node.left, node.right)
                      if isinstance(side, BindParameter)]
            if any(v == "" or (isinstance(v, (list, tuple)) and "" in v) for v in values):
                found.append(f"comparison with '' (Oracle's NULL: never true): {node}")
        if isinstance(node, BindParameter) and node.value is not None:
            found += aware(node.value)
    for row in multiparams + [params]:
        for value in (row.values() if isinstance(row, dict) else row):
            found += aware(value)
    return found


def aware(value):
    values = value if isinstance(value, (list, tuple, set)) else [value]
    return [f"an aware datetime {v} (the catalogue keeps naive UTC)" for v in values
            if isinstance(v, datetime) and v.tzinfo is not None]


class Clock:
    def __init__(self, start):
        self.now = start

    def __call__(self):
        return self.now


def journal_replay(url, journal, rows):
    """Leave ``rows`` attempt rows in a journal (a process that died before writing them), then replay them."""
    first = osa.LoadLogger(sa.create_engine(url), journal=journal)
    for i in range(rows):
        first.record_attempt(osa.AttemptRow(
            host_name="vm-0", findneighbour_server_url="http://fn4:5025", oci_namespace=NAMESPACE,
            bucket_name=BUCKET, file_name=f"replayed/{i:05d}.fasta", object_etag=f"e{i}",
            batch_start_time=T0 + timedelta(seconds=i), outcome=osa.INSERTED, completed=1, failed_attempts=0))
    first.close(0)  # the writer never ran: every row is left in the journal
    second = osa.LoadLogger.from_database_arg(url, journal=journal, bucket=BUCKET)
    assert second.flush(60) and second.close() == []


def leases_come_and_go(catalogue):
    """Take, renew, lose and release leases: every path of Lease."""
    target = osa.Target("http://fn4:5025", NAMESPACE, BUCKET)
    first = catalogue.lease(target)
    first.tend()                                    # free: taken
    first.tend()                                    # renewed
    standby = osa.Lease(catalogue.engine, catalogue.leases, target, host_name="vm-2")
    standby.identity["process_id"] = 2 ** 22 + 7  # no such process: it will seem gone to vm-2's next instance
    standby.join()
    standby.tend()                                  # held: stands by
    lapsing = osa.Lease(catalogue.engine, catalogue.leases, target, ttl=-60.0, host_name="vm-3")
    first.release()
    lapsing.join()
    lapsing.tend()                                  # taken, lapsed at once (negative ttl)
    standby.tend()                                  # a lapsed lease: taken over
    lapsing.tend()                                  # renewal refused: lost
    gone = osa.Lease(catalogue.engine, catalogue.leases, target, host_name=standby.identity["host_name"])
    gone.join()
    gone.tend()                                     # its holder's process on this host is gone: taken
    with gone.kept():
        pass
    assert catalogue.instances() and catalogue.instances("http://other:5025") == []


def loader_cycles(store, fn4, url):
    """Cycles of a loader (good, bad, retried, given up, paused files), then prune a long time later."""
    clock = Clock(osa.utcnow() - timedelta(days=200))
    catalogue = osa.LoadLogger.from_database_arg(url)
    loader = osa.LoadLoop(store, osa.FN4Client(fn4.url), catalogue, osa.Settings(max_attempts=2, retention_days=90),
                          clock=clock, host_name="vm-1")
    fn4.script(Scripted(status=500, guid="r1", times=2), Scripted(status=500, guid="r2"),
               Scripted(status=503, guid="p1"))
    try:
        for _ in range(3):
            try:
                loader.run(once=True)
            except osa.OutageError:
                pass
            clock.now += timedelta(minutes=5)
        clock.now = osa.utcnow()
        loader.run(once=True)  # prunes the rows of 200 days ago
        assert catalogue.flush(30)
    finally:
        catalogue.close()
        loader.fn4.close()


def old_catalogue(path):
    """A predecessor's catalogue, for the upgrade."""
    engine = sa.create_engine(f"sqlite:///{path}")
    predecessor_tables(None)[0].create_all(engine)
    engine.dispose()


def test_every_statement_the_loader_issues_compiles_for_oracle_and_keeps_its_rules(
        store, fn4, emulator, oci_config, tmp_path):
    url = f"sqlite:///{tmp_path / 'c.sqlite'}"
    old_catalogue(tmp_path / "c.sqlite")
    upload_series(emulator, [("a.fasta", fasta("a")), ("bad.fasta", b"not fasta"), ("r1.fasta", fasta("r1", seed=1)),
                             ("r2.fasta", fasta("r2", seed=2)), ("p1.fasta", fasta("p1", seed=3)),
                             ("z.fasta", fasta("z", seed=4))])
    db = [url]
    with Capture() as capture:
        journal_replay(url, tmp_path / "rows.journal", 1500)
        loader_cycles(store, fn4, url)
        assert cli("retry-failed", fn4.url, NAMESPACE, BUCKET, *db).exit_code == 0
        assert cli("retry-failed", fn4.url, NAMESPACE, BUCKET, *db, "--name", "bad.fasta").exit_code == 0
        assert cli("status", *db, "--json").exit_code in (0, 1, 2)
        assert cli("status", *db, "--server", fn4.url).exit_code in (0, 1, 2)
        assert cli("list", fn4.url, NAMESPACE, BUCKET, *db, "--config-file", oci_config,
                   "--endpoint", emulator.endpoint).exit_code == 0
        catalogue = osa.LoadLogger.from_database_arg(url)
        try:
            leases_come_and_go(catalogue)
            assert list(catalogue.file_states(osa.Target(fn4.url, NAMESPACE, BUCKET)))
            assert catalogue.has_tables()
        finally:
            catalogue.close()

    called = set().union(*(callers for *_, callers in capture.statements))
    uncovered = public_methods() - set(NO_STATEMENT) - called
    assert not uncovered, f"public methods whose statements no run here issued: {sorted(uncovered)}"
    assert {"upgrade_tables", "LoadLogger._missing", "LoadLogger.prune", "LoadLogger.requeue", "LoadLogger.reports",
            "Lease._renew", "Lease._look", "Lease._write_row", "Lease.release"} <= called
    failures, widest = {}, 0
    for element, multiparams, params, callers in capture.statements:
        if "upgrade_tables" in callers and capture_is_sqlite_copy(element):
            continue  # Alembic copies a table only on SQLite; Oracle's upgrade is compiled in test_catalogue
        element = as_oracle(element)
        if not isinstance(element, TextClause):
            widest = max([widest, *in_list_sizes(oracle_sql(element, multiparams, literal=False))])
        for problem in problems(element, multiparams, params):
            failures.setdefault(problem, sorted(callers))
    assert not failures, "\n".join(f"{p} (from {c})" for p, c in failures.items())
    assert widest >= 100  # the journal's 1500 rows were looked for in the catalogue by IN lists, each short enough


def capture_is_sqlite_copy(element):
    """Return True for Alembic's copy of a table (SQLite cannot alter a column; Oracle alters it in place)."""
    return "_alembic_tmp_" in str(element.compile(dialect=sqlite.dialect()))


def test_the_rules_catch_what_oracle_refuses():
    """Each rule fails a statement that breaks it: the capture test cannot pass by checking nothing."""
    _, batches, attempts = osa.build_tables()
    a = attempts.c
    bad = {
        "ORA-01795": sa.select(a.file_name).where(a.file_name.in_([f"f{i}" for i in range(1001)])),
        "''": sa.select(a.file_name).where(a.error_text == ""),
        "boolean": sa.select(a.file_name, a.completed == 1),
        "now()": sa.select(a.file_name).where(a.batch_start_time < sa.func.now()),
        "aware": sa.select(a.file_name).where(a.batch_start_time < datetime(2026, 1, 1, tzinfo=timezone.utc)),
        "longer than 30": sa.select(a.file_name.label("a_label_that_is_far_too_long_for_oracle")),
        "raw SQL": sa.text("SELECT 1 FROM dual"),
    }
    for rule, statement in bad.items():
        assert problems(statement, [], {}), rule
    good = sa.select(a.file_name, sa.case((a.completed == 1, 1), else_=0)).where(
        a.file_name.in_([f"f{i}" for i in range(1000)]), a.error_text.is_(None))
    assert problems(good, [], {}) == []
    assert in_list_sizes(oracle_sql(good, [], literal=False)) == [1000]


def test_the_predecessors_oracle_dates_become_timestamps_at_upgrade():
    """The predecessor's DateTime columns are Oracle DATEs, which keep whole seconds: the upgrade makes them
    TIMESTAMPs, or a replayed row (microseconds) never matches its stored copy and is written twice."""
    import io

    from alembic.migration import MigrationContext
    from alembic.operations import Operations

    metadata = osa.build_tables()[0]
    old = predecessor_tables(None)[0]
    existing = {table.name: ([{"name": c.name, "nullable": c.nullable, "comment": None,
                               "type": oracle.DATE() if isinstance(c.type, sa.DateTime) else c.type}
                              for c in table.columns], set())
                for table in old.tables.values()}
    sql = io.StringIO()
    context = MigrationContext.configure(dialect_name="oracle", opts={"as_sql": True, "output_buffer": sql})
    changes = osa.upgrade_tables(lambda: Operations(context), "oracle", metadata, existing)
    text = sql.getvalue()
    for table, column in (("fn4batchload", "check_time"), ("fn4loadattempt", "batch_start_time"),
                          ("fn4loadattempt", "insert_end_time")):
        assert f"ALTER TABLE {table} MODIFY {column} TIMESTAMP" in text, text
        assert f"{table}.{column}: widened, nullable" in changes
    assert "DATE" not in text
    current = {t.name: ([{"name": c.name, "nullable": True, "type": c.type.dialect_impl(ORACLE)}
                         for c in t.columns], {i.name for i in t.indexes}) for t in metadata.tables.values()}
    assert osa.upgrade_tables(lambda: None, "oracle", metadata, current) == []  # TIMESTAMPs stay as they are


def as_oracle_stores_it(path):
    """Return an engine event handler that writes '' as NULL into the SQLite file at ``path``, as Oracle does."""
    def handler(conn, cursor, statement, parameters, context, executemany):
        if conn.engine.url.database != str(path):
            return statement, parameters

        def null(row):
            return tuple(None if v == "" else v for v in row)
        return statement, [null(row) for row in parameters] if executemany else null(parameters)
    return handler


def operator_view(fn4, emulator, oci_config, url):
    """Load, fail, retry, re-queue and load again; return what status, list and retry-failed say."""
    loads = [fn4.url, NAMESPACE, BUCKET, url, "--config-file", oci_config, "--endpoint", emulator.endpoint]
    fn4.script(Scripted(status=500, guid="r1", times=2), Scripted(status=503, guid="p1"))
    for _ in range(2):
        assert cli(*loads, "--once", "--max-attempts", "2").exit_code in (0, 1)
    requeued = cli("retry-failed", fn4.url, NAMESPACE, BUCKET, url).stdout
    assert cli(*loads, "--once").exit_code in (0, 1)
    report = json.loads(cli("status", url, "--json").stdout)["loaders"]
    listed = json.loads(cli("list", *loads, "--json").stdout)
    return (requeued, [(one["host_name"], one["backlog"], one["outcomes"], one["recent_files"], one["abandoned"],
                        sorted((f["file_name"], f["outcome"], f["parse_status"]) for f in one["failed_files"]))
                       for one in report], sorted((f["name"], f["state"], f["outcome"]) for f in listed))


def test_status_list_and_retry_failed_say_the_same_when_empty_text_is_stored_as_null(
        fn4, emulator, oci_config, tmp_path):
    """Oracle stores '' as NULL: the same runs on a catalogue that does so report the same states and failures."""
    upload_series(emulator, [("a.fasta", fasta("a")), ("bad.fasta", b"not fasta"), ("r1.fasta", fasta("r1", seed=1)),
                             ("p1.fasta", fasta("p1", seed=3)), ("noid.fasta", b">\n" + fasta("x").split(b"\n", 1)[1]),
                             ("empty.fasta", b"")])
    plain, nulled = tmp_path / "plain.sqlite", tmp_path / "nulled.sqlite"
    handler = as_oracle_stores_it(nulled)
    sa.event.listen(sa.engine.Engine, "before_cursor_execute", handler, retval=True)
    try:
        with FN4StandIn() as other:
            expected = operator_view(fn4, emulator, oci_config, f"sqlite:///{plain}")
            seen = operator_view(other, emulator, oci_config, f"sqlite:///{nulled}")
    finally:
        sa.event.remove(sa.engine.Engine, "before_cursor_execute", handler)
    empties = []
    for path in (plain, nulled):
        engine = sa.create_engine(f"sqlite:///{path}")
        with engine.connect() as conn:
            empties.append(conn.execute(sa.text("SELECT count(*) FROM fn4loadattempt WHERE seqid = ''")).scalar())
        engine.dispose()
    assert empties[0] and not empties[1]  # the plain catalogue stored '' (a header without a name), the other NULL
    assert expected[0] and expected[1][0][5]
    assert seen == expected


def test_rows_looked_for_by_the_writer_go_in_in_lists_oracle_takes(tmp_path):
    """However many uncertain rows the writer looks for at once, each IN list holds at most 1000 items
    (ORA-01795), and the rows already there are still found."""
    catalogue = osa.LoadLogger(sa.create_engine(f"sqlite:///{tmp_path / 'c.sqlite'}"))
    catalogue.create_tables()
    rows = [{**{k: None for k in catalogue.attempts.c.keys() if k != "gp_int_id"}, "host_name": "vm-1",
             "file_name": f"f{i:05d}.fasta", "object_etag": "", "outcome": osa.INSERTED,
             "batch_start_time": T0.replace(tzinfo=None) + timedelta(seconds=i)} for i in range(2500)]
    with catalogue.engine.begin() as conn:
        conn.execute(catalogue.attempts.insert(), rows[::2])
    with Capture() as capture, catalogue.engine.connect() as conn:
        missing = catalogue._missing(conn, catalogue.attempts, rows)
    catalogue.engine.dispose()
    assert missing == rows[1::2]
    sizes = [n for element, multiparams, *_ in capture.statements
             for n in in_list_sizes(oracle_sql(element, multiparams, literal=False))]
    assert sizes and max(sizes) <= ORACLE_IN_LIST_LIMIT, sizes
