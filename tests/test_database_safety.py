"""The tests themselves cannot hurt a real database: they work only in schemas they made, and drop them.

A fresh PostgreSQL database stands for a production catalogue: it holds the two tables in its
default schema, with rows. The tests that reach the FN4_TEST_POSTGRES_URL database run against it
in a subprocess; afterwards its rows are as they were and no schema is left behind.
"""
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

import objectstoreaccess as osa

ROOT = Path(__file__).resolve().parent.parent
#: Every test that reads FN4_TEST_POSTGRES_URL itself, and one through the `database` fixture.
TESTS = ["tests/test_faults.py::test_catalogue_outage_keeps_rows_pauses_inserts_and_recovers",
         "tests/test_cli.py::test_secrets_never_reach_logs_sentry_tables_or_metrics[percent-encoded]",
         "tests/test_catalogue.py::test_tables_are_created_with_comments_and_round_trip_rows[postgresql]"]


def test_database_tests_leave_an_existing_catalogue_alone():
    raw = os.environ.get("FN4_TEST_POSTGRES_URL")
    if not raw:
        pytest.skip("FN4_TEST_POSTGRES_URL is not set")
    name = f"fn4guard_{uuid.uuid4().hex[:10]}"
    server = sa.create_engine(raw, isolation_level="AUTOCOMMIT")
    with server.connect() as conn:
        conn.execute(sa.text(f"CREATE DATABASE {name}"))
    url = sa.make_url(raw).set(database=name)
    guard = sa.create_engine(url)
    try:
        metadata, batches, attempts = osa.build_tables()
        metadata.create_all(guard)
        with guard.begin() as conn:
            conn.execute(batches.insert(), [{"host_name": "prod-vm", "bucket_name": "FN4-queue", "batch_size": 7}])
            conn.execute(attempts.insert(), [{"host_name": "prod-vm", "file_name": "precious.fasta",
                                              "outcome": "inserted", "completed": 1}])

        def snapshot():
            with guard.connect() as conn:
                return (conn.execute(sa.select(batches.c.host_name, batches.c.batch_size)).all(),
                        conn.execute(sa.select(attempts.c.file_name, attempts.c.outcome)).all(),
                        sorted(sa.inspect(conn).get_schema_names()))

        before = snapshot()
        env = {**os.environ, "FN4_TEST_POSTGRES_URL": url.render_as_string(hide_password=False)}
        env.pop("FN4_TEST_MARIADB_URL", None)
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0 and f"{len(TESTS)} passed" in done.stdout, done.stdout[-3000:]
        assert snapshot() == before
    finally:
        guard.dispose()
        with server.connect() as conn:
            conn.execute(sa.text(f"DROP DATABASE {name}"))
        server.dispose()
