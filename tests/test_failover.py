"""Fail over: two loaders, one active, through a lease row in the catalogue (issue: hot standby).

In-process tests drive the Lease on every database; process tests run real loaders against the
fn4 stand-in and check, from its insert log, that two never insert at the same time.
"""
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import oracle
from sqlalchemy.schema import CreateIndex, CreateTable, SetColumnComment

import objectstoreaccess as osa


def dead_pid():
    """Return the id of a process that ran and is gone (reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=30)
    return proc.pid


@pytest.fixture
def catalogue(database):
    url, schema = database
    catalogue = osa.LoadLogger(sa.create_engine(url), schema)
    catalogue.create_tables()
    yield catalogue
    catalogue.engine.dispose()


def lease(catalogue, host, ttl=60.0, pid=None, server="http://fn4:5025", namespace="ns", bucket="bucket"):
    lease = osa.Lease(catalogue.engine, catalogue.leases, osa.Target(server, namespace, bucket), ttl, host_name=host)
    if pid is not None:
        lease.identity["process_id"] = pid
    lease.join()
    return lease


def test_lease_table_and_its_statements_compile_for_oracle():
    table = osa.build_lease_table("FN4LOADER")
    dialect = oracle.dialect()
    ddl = str(CreateTable(table).compile(dialect=dialect))
    assert 'CREATE TABLE "FN4LOADER".fn4loaderlease' in ddl and "UNIQUE (active_key)" in ddl
    assert "PRIMARY KEY (instance_token)" in ddl and "TIMESTAMP" in ddl and "DATETIME" not in ddl
    assert not re.search(r"VARCHAR2(?!\()", ddl)
    assert all(len(name) <= 30 for name in re.findall(r"^\s+(\w+) ", ddl, re.M) + [table.name])
    assert len("uq_fn4loaderlease_active") <= 30
    for column in table.columns:
        assert column.comment and str(SetColumnComment(column).compile(dialect=dialect)).startswith("COMMENT ON")
    for index in table.indexes:
        assert len(index.name) <= 30 and "CREATE INDEX" in str(CreateIndex(index).compile(dialect=dialect))
    now = osa.database_utc("oracle", 4.5)
    renew = table.update().where(table.c.instance_token == "t", table.c.expires < osa.database_utc("oracle")
                                 ).values(renewed=osa.database_utc("oracle"), expires=now)
    sql = str(renew.compile(dialect=dialect))
    assert "SYS_EXTRACT_UTC(SYSTIMESTAMP) + NUMTODSINTERVAL(4.500, 'SECOND')" in sql
    catalogue = osa.LoadLogger(sa.create_engine("sqlite://"), "FN4LOADER")
    assert '"FN4LOADER".fn4loaderlease' in str(catalogue.leases.select().compile(dialect=dialect))


def test_start_up_adds_the_lease_table_to_an_existing_catalogue(database):
    url, schema = database
    engine = sa.create_engine(url)
    osa.build_tables(schema)[0].create_all(engine)  # a catalogue of the loader before fail over
    assert not sa.inspect(engine).has_table("fn4loaderlease", schema=schema)
    assert osa.LoadLogger(engine, schema).instances() == []  # status reads it without the table
    osa.LoadLogger(engine, schema).create_tables()
    columns = {c["name"]: c for c in sa.inspect(engine).get_columns("fn4loaderlease", schema=schema)}
    assert set(columns) == {f.name for f in osa.dataclasses.fields(osa.LeaseRow)}
    if engine.dialect.name != "sqlite":
        assert all(c["comment"] for c in columns.values())
    engine.dispose()


def test_one_holder_release_hands_over_and_the_database_clock_decides_expiry(catalogue, database):
    a, b = lease(catalogue, "host-a"), lease(catalogue, "host-b")
    a.tend()
    b.tend()
    assert a.active and not b.active and (a.terms, b.terms) == (1, 0)
    found = catalogue.instances()
    assert sorted((i["role"], i["host_name"]) for i in found) == [("active", "host-a"), ("standby", "host-b")]
    assert osa.assess_instances(found) == []
    assert a.tend() == pytest.approx(20.0) and a.active  # renewed, every third of the TTL
    a.release()  # SIGTERM: the row goes, and the next look takes the lease
    assert not a.active
    b.tend()
    assert b.active and b.terms == 1
    assert [(i["role"], i["host_name"]) for i in catalogue.instances()] == [("active", "host-b")]

    # An active instance that stops renewing: after its TTL, by the database's clock, another takes over.
    c = lease(catalogue, "host-c", ttl=3.0)
    d = lease(catalogue, "host-d", ttl=3.0)
    b.release()
    c.tend()
    renewed = time.monotonic()
    assert c.active
    d.tend()
    assert not d.active
    assert wait_for(lambda: not c.active, 10) <= 3.0  # it stops inserting a quarter TTL before the lapse
    lapsed = [i for i in catalogue.instances() if i["role"] == "active"]
    wait_for(lambda: catalogue.instances()[0]["lapsed"], 10)
    assert [level for level, _ in osa.assess_instances(catalogue.instances())] == [2]
    code, report = status_json(database)  # no batch row either: critical twice over
    assert code == 2 and [p.split(":")[0] for p in report["lease_problems"]] == ["critical"], report
    assert "stopped renewing" in report["lease_problems"][0]
    wait_for(lambda: d.tend() and d.active, 10)
    took = time.monotonic() - renewed
    assert took >= 2.5, "the lease was taken before it lapsed"
    assert lapsed and osa.assess_instances(catalogue.instances()) == []
    c.tend()  # the old holder's renewal finds the lease gone: it stays standby
    assert not c.active and c.terms == 1 and d.terms == 1


def test_a_restart_on_the_same_host_takes_the_lease_of_a_dead_process_at_once(catalogue):
    old = lease(catalogue, "host-a", pid=dead_pid())  # as left by kill -9: its row still holds the lease
    old.tend()
    assert old.active
    other_host = lease(catalogue, "host-b")
    other_host.tend()
    assert not other_host.active  # another host cannot tell whether that process lives: it waits
    restarted = lease(catalogue, "host-a")
    restarted.tend()
    assert restarted.active
    living = lease(catalogue, "host-a")  # a holder whose process runs (this one) is left alone
    living.tend()
    assert not living.active


def test_rows_of_instances_gone_for_a_day_are_removed_at_the_next_start(catalogue):
    lease(catalogue, "host-a")
    holder = lease(catalogue, "host-b", pid=dead_pid())
    holder.tend()
    t = catalogue.leases
    with catalogue.engine.begin() as conn:  # as if both had been killed years ago
        conn.execute(t.update().values(expires=osa.datetime(2020, 1, 1)))
    lease(catalogue, "host-c")
    with catalogue.engine.connect() as conn:
        left = conn.execute(sa.select(t.c.host_name, t.c.active_key).order_by(t.c.host_name)).all()
    assert [(host, key is not None) for host, key in left] == [("host-b", True), ("host-c", False)]


def test_two_standbys_racing_for_a_free_lease_give_one_holder(catalogue):
    leases = [lease(catalogue, f"host-{i}") for i in range(4)]
    threads = [threading.Thread(target=one.tend) for one in leases]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sum(one.active for one in leases) == 1
    assert sum(i["role"] == "active" for i in catalogue.instances()) == 1


def test_a_loader_loads_only_while_it_holds_the_lease_and_says_so_in_metrics(store, fn4, emulator, tmp_path):
    from test_faults import Harness
    upload_series(emulator, [("a.fasta", fasta("a"))])
    harness = Harness(store, fn4, f"sqlite:///{tmp_path / 'c.sqlite'}")
    other = lease(harness.catalogue, "host-b", server=fn4.url, namespace=NAMESPACE, bucket=BUCKET)
    other.tend()
    mine = lease(harness.catalogue, "host-a", server=fn4.url, namespace=NAMESPACE, bucket=BUCKET)
    loader = osa.LoadLoop(harness.loader.store, harness.client, harness.catalogue, harness.loader.settings,
                          stop=harness.stop, lease=mine, metrics=osa.Metrics())  # it reports to the observer given
    active = lambda: loader.metrics.registry.get_sample_value("fn4loader_active")  # noqa: E731
    with mine.kept():
        assert loader.run(once=True) == 0 and active() == 0  # another instance holds it: nothing listed
    assert fn4.guids == {} and not any(r.path.startswith("/api/v2/guids") for r in fn4.requests)
    other.release()
    with mine.kept():
        assert loader.run(once=True) == 1 and active() == 1
    assert list(fn4.guids) == ["a"]
    harness.close()


# ---- real loaders, in processes of their own ------------------------------------------------------

from conftest import BUCKET, NAMESPACE, fasta, upload_series, wait_for  # noqa: E402
from tcp_proxy import TCPProxy  # noqa: E402
from test_service import status_json  # noqa: E402

SCRIPT = Path(osa.__file__).resolve()
TTL = 5.0           # seconds: short, so that the tests finish fast
CHECK = TTL / 3     # a standby's look at the lease, with a TTL this short
SAMPLE = re.compile(r" (inserted|already_present) (\S+): ")


class Instance:
    """One loader process, its log in a file; ``host`` runs it under another host name (a UTS namespace)."""

    def __init__(self, name, fn4, emulator, oci_config, database, tmp_path, host=None, url=None):
        url_default, schema = database
        command = [sys.executable, str(SCRIPT), fn4.url, NAMESPACE, BUCKET, url or url_default,
                   "--config-file", str(oci_config), "--endpoint", emulator.endpoint, "--poll-interval", "1",
                   "--lease-ttl", str(TTL), "--journal", str(tmp_path / f"{name}.journal")
                   ] + (["--db-schema", schema] if schema else [])
        if host:
            command = ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', host, *command]
        self.name, self.log = name, tmp_path / f"{name}.log"
        with self.log.open("w") as err:
            self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err, cwd=tmp_path)

    def text(self):
        return self.log.read_text()

    def loaded(self):
        """Guids this instance inserted (fn4 answered 200 or 201), from its log."""
        return [guid for _, guid in SAMPLE.findall(self.text())]

    @property
    def active(self):
        return "active: this instance took the lease" in self.text()

    def stop(self, signum=signal.SIGTERM, seconds=15):
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        try:
            return self.proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            raise AssertionError(f"{self.name} did not stop within {seconds} s:\n{self.text()[-3000:]}")


@pytest.fixture
def instances():
    started = []
    yield started
    for one in started:
        if one.proc.poll() is None:
            one.proc.kill()
            one.proc.wait(timeout=10)


@pytest.fixture
def other_host():
    """A host name for the second instance, so it cannot see the first one's processes; skip without unshare."""
    done = subprocess.run(["unshare", "--uts", "sh", "-c", "hostname standby-host && hostname"],
                          capture_output=True, text=True, timeout=30) if shutil.which("unshare") else None
    if done is None or done.returncode != 0 or done.stdout.strip() != "standby-host":
        pytest.skip("unshare --uts is not permitted here: both instances would share one host name")
    return "standby-host"


def samples(emulator, count):
    guids = [f"s{i:03d}" for i in range(count)]
    upload_series(emulator, [(f"{g}.fasta", fasta(g, seed=i)) for i, g in enumerate(guids)])
    return guids


def by_instance(fn4, *loaders):
    """Return each loader's inserts as fn4's log records them (started, ended: the test's clock)."""
    owner = {guid: one.name for one in loaders for guid in one.loaded()}
    found = {one.name: [] for one in loaders}
    for record in list(fn4.inserts):
        found.setdefault(owner.get(record.guid, "unlogged"), []).append(record)
    return found


def all_loaded(fn4, guids, *loaders, unlogged=0):
    """True once fn4 holds every sample and the loaders logged all but ``unlogged`` of its inserts."""
    logged = {guid for one in loaders for guid in one.loaded()}
    return len(fn4.guids) == len(guids) and len({r.guid for r in list(fn4.inserts)} - logged) <= unlogged


def assert_each_sample_inserted_once(fn4, guids, killed=None):
    """Every sample stored by one 200, none answered 201 (sent again); else only a request cut by the kill."""
    assert sorted(fn4.guids) == guids
    answered = [r for r in fn4.inserts if r.status in (200, 201)]
    counts = Counter(record.guid for record in answered)
    assert {guid: n for guid, n in counts.items() if n != 1} == {}, "a sample was sent twice"
    assert [r.guid for r in answered if r.status != 200] == [], "a sample was sent twice"
    cut = [r for r in fn4.inserts if r.status not in (200, 201)]  # headers sent, body not: fn4 stores nothing
    assert cut == [] or (killed is not None and len(cut) == 1 and cut[0].started < killed), cut


def test_two_loaders_started_together_one_inserts_every_sample_once(fn4, emulator, oci_config, database, tmp_path,
                                                                    instances):
    guids = samples(emulator, 20)
    fn4.insert_delay = 0.2  # long enough for the later of the two to start while the other loads
    instances += [Instance(name, fn4, emulator, oci_config, database, tmp_path) for name in ("a", "b")]
    wait_for(lambda: all_loaded(fn4, guids, *instances) and all(
        one.active or "standby: " in one.text() for one in instances), 60)
    code, report = status_json(database)
    assert sorted(i["role"] for i in report["instances"]) == ["active", "standby"], report
    assert report["lease_problems"] == [] and code == 0, report
    for one in sorted(instances, key=lambda one: one.active):  # the standby first: no hand-over at the end
        assert one.stop() == 0, one.text()
    assert_each_sample_inserted_once(fn4, guids)
    assert sorted(len(one.loaded()) for one in instances) == [0, 20]
    assert sum(one.active for one in instances) == 1


def active_and_standby(fn4, emulator, oci_config, database, tmp_path, instances, a=None, b=None):
    """Start instance a and wait until it loads, then b (options ``a``, ``b``) until it stands by, a 5 inserts in."""
    first = Instance("a", fn4, emulator, oci_config, database, tmp_path, **(a or {}))
    instances.append(first)
    wait_for(lambda: first.active, 60)
    second = Instance("b", fn4, emulator, oci_config, database, tmp_path, **(b or {}))
    instances.append(second)
    wait_for(lambda: "standby: " in second.text(), 60)
    wait_for(lambda: fn4.inserts_begun >= 5, 60)
    return first, second


def test_kill_9_of_the_active_the_standby_takes_over_after_the_ttl(
        fn4, emulator, oci_config, database, tmp_path, instances, other_host):
    guids = samples(emulator, 25)
    fn4.insert_delay = 0.1
    a, b = active_and_standby(fn4, emulator, oci_config, database, tmp_path, instances, b={"host": other_host})
    a.proc.kill()  # SIGKILL mid-batch: no release, the row keeps the lease until it lapses
    killed = time.perf_counter()
    a.proc.wait(timeout=10)
    # two at most: the one in flight at the kill, and the one answered before it if its row was being written
    wait_for(lambda: all_loaded(fn4, guids, a, b, unlogged=2), 90)
    assert_each_sample_inserted_once(fn4, guids, killed)
    inserts = by_instance(fn4, a, b)
    assert inserts["a"] and inserts["b"], b.text()
    assert all(r.started < killed for r in inserts.get("unlogged", []))
    first = min(r.started for r in inserts["b"])
    assert max(r.ended for r in inserts["a"] + inserts.get("unlogged", [])) < first
    took = first - killed
    assert took >= TTL / 2, "the standby took the lease before it could have lapsed"
    assert took < TTL + CHECK + 10, f"took over {took:.1f} s after the kill"
    assert "lapsed at" in b.text() and "comparing the catalogue with fn4" in b.text()
    assert "in_server" in b.text() or len(inserts["a"]) + len(inserts["b"]) == len(guids)
    assert b.stop() == 0, b.text()


def test_sigterm_of_the_active_hands_over_within_seconds(fn4, emulator, oci_config, database, tmp_path, instances):
    guids = samples(emulator, 25)
    fn4.insert_delay = 0.1
    a, b = active_and_standby(fn4, emulator, oci_config, database, tmp_path, instances)
    signalled = time.perf_counter()
    assert a.stop() == 0, a.text()
    wait_for(lambda: all_loaded(fn4, guids, a, b), 90)
    assert_each_sample_inserted_once(fn4, guids)
    inserts = by_instance(fn4, a, b)
    first = min(r.started for r in inserts["b"])
    assert max(r.ended for r in inserts["a"]) < first
    assert first - signalled < 8.0, f"handed over {first - signalled:.1f} s after SIGTERM"
    assert "lease released" in a.text() and "no instance held it" in b.text()
    assert b.stop() == 0, b.text()


@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
def test_an_active_cut_off_from_the_catalogue_stops_before_the_standby_starts(
        fn4, emulator, oci_config, database, tmp_path, instances):
    url, schema = database
    target = sa.make_url(url)
    guids = samples(emulator, 20)
    fn4.insert_delay = 0.5  # slow enough that the lease, not the unwritten rows (MAX_UNWRITTEN_ROWS), stops a
    with TCPProxy(target.host or "127.0.0.1", target.port or 5432) as proxy:
        through = target.set(port=proxy.port).render_as_string(hide_password=False)
        a, b = active_and_standby(fn4, emulator, oci_config, database, tmp_path, instances, a={"url": through})
        proxy.blackhole(new=True)  # a's catalogue falls silent: no error, no answer
        cut = time.perf_counter()
        wait_for(lambda: all_loaded(fn4, guids, a, b), 90)
        assert_each_sample_inserted_once(fn4, guids)
        inserts = by_instance(fn4, a, b)
        last_of_a = max(r.ended for r in inserts["a"] + inserts.get("unlogged", []))
        first_of_b = min(r.started for r in inserts["b"])
        assert last_of_a < first_of_b, "both inserted at the same time"
        assert last_of_a - cut < TTL, "a went on inserting after its lease could have lapsed"
        assert "standby: stopped inserting" in a.text() and "lapsed at" in b.text()
        a.stop(seconds=20)  # the catalogue does not answer: each step of the shutdown gives up at its deadline
    assert b.stop() == 0, b.text()
