"""Upgrading the predecessor's catalogue tables in place: columns added, old rows kept, NULLs allowed."""
import json
from datetime import datetime, timedelta, timezone

import sqlalchemy as sa
from click.testing import CliRunner

import objectstoreaccess as osa
from conftest import BUCKET, NAMESPACE, T0, fasta, upload_series


def predecessor_tables(schema):
    """The predecessor's two tables, exactly: short strings, some columns NOT NULL, no index."""
    metadata = sa.MetaData(schema=schema)

    def col(name, sqltype, required=False):
        return sa.Column(name, sqltype, nullable=not required)

    batches = sa.Table(
        "fn4batchload", metadata, sa.Column("bl_int_id", sa.Integer, sa.Identity(), primary_key=True),
        col("host_name", sa.String(64), True), col("findneighbour_server_url", sa.String(128), True),
        col("check_time", sa.DateTime, True), col("batch_size", sa.Integer), col("number_in_server", sa.Integer))
    attempts = sa.Table(
        "fn4loadattempt", metadata, sa.Column("gp_int_id", sa.Integer, sa.Identity(), primary_key=True),
        col("host_name", sa.String(64), True), col("findneighbour_server_url", sa.String(128), True),
        col("parse_status", sa.String(64), True), col("batch_start_time", sa.DateTime),
        col("batch_sample_number", sa.Integer), col("batch_size", sa.Integer), col("seqid", sa.String(256), True),
        col("file_name", sa.String(256), True), col("len_seq", sa.Integer, True),
        col("first_128_chars", sa.String(128)), col("bucket_read_start_time", sa.DateTime),
        col("bucket_read_end_time", sa.DateTime), col("fn4id", sa.String(64)), col("insert_start_time", sa.DateTime),
        col("insert_end_time", sa.DateTime), col("insert_status_code", sa.Integer), col("completed", sa.Integer, True))
    return metadata, batches, attempts


def old_rows(server):
    """The predecessor's rows for ``server``: three batches and six attempts, among them a parse failure
    and a file tried twice. Dated days ago, well inside the retention period, in whole seconds."""
    old = datetime.now(timezone.utc).replace(tzinfo=None, microsecond=0) - timedelta(days=3)

    def attempt(i, guid, status=200, completed=1, parse_status="ok", seqid=None, length=300):
        t = old + timedelta(minutes=i)
        return {"host_name": "oldhost", "findneighbour_server_url": server, "parse_status": parse_status,
                "batch_start_time": t, "batch_sample_number": i, "batch_size": 6,
                "seqid": guid if seqid is None else seqid, "file_name": f"old/{guid}.fasta", "len_seq": length,
                "first_128_chars": "ACGT" * 8, "bucket_read_start_time": t,
                "bucket_read_end_time": t + timedelta(seconds=1), "fn4id": guid,
                "insert_start_time": t + timedelta(seconds=2) if status else None,
                "insert_end_time": t + timedelta(seconds=3) if status else None,
                "insert_status_code": status, "completed": completed}

    batches = [{"host_name": "oldhost", "findneighbour_server_url": server, "check_time": old + timedelta(hours=i),
                "batch_size": n, "number_in_server": 10 + i} for i, n in ((1, 4), (2, 2), (3, 0))]
    attempts = [attempt(1, "old-a"), attempt(2, "old-b"), attempt(3, "old-c"),
                attempt(4, "old-bad", None, parse_status="not fasta", seqid="", length=0),
                attempt(5, "old-d", None, completed=0), attempt(6, "old-d")]
    return batches, attempts


def make_predecessor(database, server):
    """Create the predecessor's tables in the test's schema, fill them, and return their rows as stored."""
    url, schema = database
    engine = sa.create_engine(url)
    metadata, batches, attempts = predecessor_tables(schema)
    metadata.create_all(engine)
    wanted = old_rows(server)
    with engine.begin() as conn:  # ids come from the identity, as the predecessor's did
        conn.execute(batches.insert(), wanted[0])
        conn.execute(attempts.insert(), wanted[1])
    engine.dispose()
    stored = [naive(rows) for rows in read(database, [batches, attempts])]
    without_ids = [[{k: v for k, v in r.items() if not k.endswith("_int_id")} for r in rows] for rows in stored]
    assert without_ids == list(wanted)
    return stored


def run_once(fn4, emulator, oci_config, database):
    url, schema = database
    args = ["run", fn4.url, NAMESPACE, BUCKET, url, "--config-file", str(oci_config),
            "--endpoint", emulator.endpoint, "--once", *(["--db-schema", schema] if schema else [])]
    return CliRunner().invoke(osa.main, args, catch_exceptions=False)


def read(database, tables):
    """The rows of each of ``tables``, in id order, selecting only the columns it declares."""
    url, schema = database
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return [[r._asdict() for r in conn.execute(sa.select(t).order_by(t.primary_key.columns.values()[0]))]
                    for t in tables]
    finally:
        engine.dispose()


def shape(database):
    """Each table's columns as {name: (type, nullable, comment)}, and the attempts table's index names."""
    url, schema = database
    engine = sa.create_engine(url)
    try:
        inspector, info = sa.inspect(engine), {}
        for table in ("fn4batchload", "fn4loadattempt"):
            columns = inspector.get_columns(table, schema)
            info[table] = {c["name"]: (c["type"], c["nullable"], c.get("comment")) for c in columns}
            assert len(info[table]) == len(columns), f"{table} has a column twice"
        return info, {i["name"] for i in inspector.get_indexes("fn4loadattempt", schema)}
    finally:
        engine.dispose()


def naive(rows):
    """The rows with their datetimes naive, as some drivers return them aware."""
    return [{k: v.replace(tzinfo=None) if hasattr(v, "tzinfo") else v for k, v in r.items()} for r in rows]


def test_old_rows_are_kept_and_missing_columns_added(fn4, emulator, oci_config, database):
    """run --once on the predecessor's tables adds the new columns and index, keeps every old row as it
    was, appends this run's rows after them, loads the new files and skips a guid fn4 already holds."""
    old = make_predecessor(database, fn4.url)
    upload_series(emulator, [(f"old/{g}.fasta", fasta(g)) for g in ("old-a", "old-b")]
                  + [("new/new-1.fasta", fasta("new-1")), ("new/new-2.fasta", fasta("new-2", seed=1))])
    fn4.guids.update({"old-a": "ACGT", "old-b": "ACGT"})
    status = ["status", database[0], *(["--db-schema", database[1]] if database[1] else [])]
    before = CliRunner().invoke(osa.main, status)
    assert before.exit_code == 3 and "upgraded when `run` next starts" in before.output, before.output
    result = run_once(fn4, emulator, oci_config, database)
    assert result.exit_code == 0, result.output
    assert "catalogue tables upgraded, every row kept" in result.output
    assert "added fn4batchload.oci_namespace" in result.output
    assert [i.guid for i in fn4.inserts] == ["new-1", "new-2"]
    after = CliRunner().invoke(osa.main, [*status, "--json"])
    assert after.exit_code == 0 and json.loads(after.output)["status"] == "ok", after.output

    _, old_batches, old_attempts = predecessor_tables(database[1])
    batches, attempts = read(database, [old_batches, old_attempts])
    assert [naive(batches[:3]), naive(attempts[:6])] == old
    assert len(batches) == 4 and batches[3]["bl_int_id"] > old[0][-1]["bl_int_id"]
    assert len(attempts) == 10 and min(r["gp_int_id"] for r in attempts[6:]) > old[1][-1]["gp_int_id"]

    _, new_batches, new_attempts = osa.build_tables(database[1])
    info, indexes = shape(database)
    for table in (new_batches, new_attempts):
        assert set(info[table.name]) == set(table.columns.keys())
        added = set(table.columns.keys()) - set((old_batches if table is new_batches else old_attempts).columns.keys())
        if database[1]:  # SQLite keeps no column comments
            assert {n: info[table.name][n][2] for n in added} == {n: table.c[n].comment for n in added}
    assert "ix_fn4loadattempt_bucket" in indexes
    new_rows = read(database, [new_attempts])[0][6:]
    assert {r["file_name"]: r["outcome"] for r in new_rows} == {
        "old/old-a.fasta": "in_server", "old/old-b.fasta": "in_server",
        "new/new-1.fasta": "inserted", "new/new-2.fasta": "inserted"}
    assert all(r["oci_namespace"] == NAMESPACE and r["bucket_name"] == BUCKET for r in new_rows)


def test_short_strings_are_widened_and_not_null_relaxed(fn4, emulator, oci_config, database):
    """After the upgrade host_name and the fn4 URL are as wide as the loader declares, no column but the key
    is NOT NULL, and a bad file's row (NULL seqid and len_seq, once refused) is written."""
    make_predecessor(database, fn4.url)
    upload_series(emulator, [("bad.fasta", b"not fasta"), ("good.fasta", fasta("good"))])
    result = run_once(fn4, emulator, oci_config, database)
    assert result.exit_code == 0, result.output
    _, attempts = read(database, osa.build_tables(database[1])[1:])
    bad = [r for r in attempts if r["file_name"] == "bad.fasta"]
    assert [(r["outcome"], r["completed"], r["seqid"], r["len_seq"]) for r in bad] == [("failed", 1, None, None)]
    assert [i.guid for i in fn4.inserts] == ["good"]
    info, _ = shape(database)
    for table, key in (("fn4batchload", "bl_int_id"), ("fn4loadattempt", "gp_int_id")):
        assert [n for n, (_, nullable, _) in info[table].items() if not nullable] == [key]
        if database[1]:  # SQLite does not enforce VARCHAR lengths, so they are left as they were
            assert info[table]["host_name"][0].length >= 255
            assert info[table]["findneighbour_server_url"][0].length >= 512
    good = next(r for r in attempts if r["file_name"] == "good.fasta")
    assert good["insert_end_time"] > good["insert_start_time"], "times lost their fraction of a second"


def test_upgrading_twice_is_harmless(fn4, emulator, oci_config, database):
    """A second run on the upgraded tables succeeds, alters nothing, adds no duplicate column, and loads on."""
    old = make_predecessor(database, fn4.url)
    upload_series(emulator, [("new/new-1.fasta", fasta("new-1"))])
    assert run_once(fn4, emulator, oci_config, database).exit_code == 0
    before = shape(database)
    emulator.put(BUCKET, "new/new-2.fasta", fasta("new-2"), time_created=T0 + timedelta(hours=1))
    result = run_once(fn4, emulator, oci_config, database)
    assert result.exit_code == 0, result.output
    assert repr(shape(database)) == repr(before) and "tables upgraded" not in result.output
    assert [i.guid for i in fn4.inserts] == ["new-1", "new-2"]
    assert naive(read(database, predecessor_tables(database[1])[2:])[0][:6]) == old[1]


def test_current_tables_are_left_alone(fn4, emulator, oci_config, database):
    """Tables the new loader made itself need no upgrade: a later run changes nothing about them."""
    upload_series(emulator, [("a.fasta", fasta("a"))])
    assert run_once(fn4, emulator, oci_config, database).exit_code == 0
    before = shape(database)
    result = run_once(fn4, emulator, oci_config, database)
    assert result.exit_code == 0, result.output
    assert repr(shape(database)) == repr(before) and "tables upgraded" not in result.output
