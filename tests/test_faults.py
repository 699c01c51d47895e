"""Faults and bad input: every file ends loaded or finished with a reason, and nothing blocks the queue."""
import gzip
import threading
from datetime import timedelta

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

import objectstoreaccess as osa
from bad_inputs import cases
from conftest import BUCKET, NAMESPACE, T0, fasta
from fn4_standin import Scripted
from oci_emulator import Fault
from tcp_proxy import TCPProxy


class Clock:
    """An injected clock: the real time, plus whatever ``advance`` added."""

    def __init__(self):
        self.offset = timedelta(0)

    def __call__(self):
        return osa.utcnow() + self.offset

    def advance(self, **kwargs):
        self.offset += timedelta(**kwargs)


class Harness:
    """A LoadLoop wired to the emulator, the fn4 stand-in and a real catalogue, run a cycle at a time.

    Its clock and its waits are injected: ``clock.advance`` moves the loader's time on, and a test
    that sets ``on_wait`` (seconds -> True once stopped) decides every wait of the loop.
    """

    def __init__(self, store, fn4, url, schema=None, retry_cap=30.0, **settings):
        self.fn4 = fn4
        self.engine = sa.create_engine(url)
        self.catalogue = osa.LoadLogger(self.engine, schema, retry_cap=retry_cap)
        self.catalogue.create_tables()
        self.catalogue.start()
        self.client = osa.FN4Client(fn4.url, timeout=settings.pop("timeout", (5.0, 30.0)))
        self.stop = threading.Event()
        self.clock = Clock()
        self.on_wait = None
        self.loader = osa.LoadLoop(store, self.client, self.catalogue,
                                   osa.Settings(**settings), stop=self.stop, clock=self.clock, wait=self.wait)

    def wait(self, seconds):
        """Every wait the loop asks for: decided by ``on_wait`` if set, else a wait on the stop event."""
        return self.on_wait(seconds) if self.on_wait else self.stop.wait(seconds)

    def cycle(self):
        summary = self.loader.run_cycle()
        assert self.catalogue.flush(30)
        return summary

    def rows(self):
        a = self.catalogue.attempts
        with self.engine.connect() as conn:
            return [r._asdict() for r in conn.execute(sa.select(a).order_by(a.c.gp_int_id))]

    def latest(self):
        return {r["file_name"]: r for r in self.rows()}

    def close(self):
        self.catalogue.close()
        self.client.close()


@pytest.fixture
def harness(store, fn4, tmp_path):
    made = []

    def make(url=None, client=None, **settings):
        made.append(Harness(client or store, fn4, url or f"sqlite:///{tmp_path / 'c.sqlite'}", **settings))
        return made[-1]

    yield make
    for h in made:
        h.stop.set()
        h.close()


def put_all(emulator, items):
    etags = {}
    for i, (name, data) in enumerate(items):
        etags[name] = emulator.put(BUCKET, name, data, time_created=T0 + timedelta(seconds=i))
    return etags


def test_bad_input_corpus_is_recorded_and_the_good_file_behind_it_loads(harness, emulator, fn4):
    corpus = cases()
    put_all(emulator, [(name, data) for name, data, *_ in corpus] + [("zz-good.fasta", fasta("zz-good"))])
    h = harness()
    summary = h.cycle()
    assert [i.guid for i in fn4.inserts] == ["zz-good"]
    latest = h.latest()
    for name, _data, outcome, status, words in corpus:
        row = latest[name]
        assert (row["outcome"], row["parse_status"], row["completed"]) == (outcome, status, 1), name
        assert words in row["error_text"], (name, row["error_text"])
    assert latest["zz-good.fasta"]["outcome"] == "inserted"
    assert summary.loaded == 1
    h.cycle()  # finished means finished: nothing is tried again
    assert len(fn4.inserts) == 1 and len(h.rows()) == len(corpus) + 1


def test_large_bad_gzip_is_judged_by_content_in_one_download(harness, emulator, fn4):
    """A gzip bomb and an early-corrupt gzip, both over 1 MiB compressed, fail for good at the first read."""
    big = {name: case for name, *case in cases() if name.startswith("big-")}
    assert sorted(big) == ["big-bomb.fasta.gz", "big-corrupt.fasta.gz"]
    assert all(len(data) > 2**20 for data, *_ in big.values())
    put_all(emulator, [(name, data) for name, (data, *_) in big.items()] + [("zz-good.fasta", fasta("zz-good"))])
    h = harness()
    h.cycle()
    h.cycle()
    for name, (_data, outcome, status, words) in big.items():
        mine = [r for r in h.rows() if r["file_name"] == name]
        assert len(mine) == 1, [(r["outcome"], r["error_text"]) for r in mine]
        row = mine[0]
        assert (row["outcome"], row["parse_status"], row["completed"]) == (outcome, status, 1), row["error_text"]
        assert words in row["error_text"] and "cut off" not in row["error_text"]
        reads = [r for r in emulator.requests if r.method == "GET" and r.path.endswith("/" + name)]
        assert len(reads) == 1, f"{name} was downloaded {len(reads)} times"
    [report] = h.catalogue.reports(osa.utcnow())
    assert set(report.outcomes) == {"failed", "inserted"}  # no retry, gave_up: no failed download
    assert [i.guid for i in fn4.inserts] == ["zz-good"]


def test_expected_length_is_checked_before_sending(harness, emulator, fn4):
    put_all(emulator, [("short.fasta", fasta("short", 299)), ("right.fasta", fasta("right", 300))])
    h = harness(expected_length=300)
    h.cycle()
    assert [i.guid for i in fn4.inserts] == ["right"]
    row = h.latest()["short.fasta"]
    assert row["parse_status"] == "wrong_length" and "299" in row["error_text"] and "300" in row["error_text"]


def test_403_is_permanent_and_not_retried(harness, emulator, fn4):
    put_all(emulator, [("a.fasta", fasta("a")), ("b.fasta", fasta("b"))])
    fn4.script(Scripted(status=403, guid="a", body="<html><p>guid too long</p></html>"))
    h = harness()
    h.cycle()
    h.cycle()
    assert [(i.guid, i.status) for i in fn4.inserts] == [("a", 403), ("b", 200)]
    row = h.latest()["a.fasta"]
    assert (row["outcome"], row["completed"], row["insert_status_code"]) == ("failed", 1, 403)
    assert "guid too long" in row["error_text"] and "<" not in row["error_text"]


def test_poison_file_is_given_up_after_max_attempts_without_blocking_others(harness, emulator, fn4):
    put_all(emulator, [("poison.fasta", fasta("poison")), ("b.fasta", fasta("b")), ("c.fasta", fasta("c"))])
    fn4.script(Scripted(status=500, guid="poison", body="<html><title>500</title>boom</html>", times=-1))
    h = harness(max_attempts=3)
    first = h.cycle()
    assert first.loaded == 2 and first.retried == 1 and not first.paused
    h.cycle()
    h.cycle()
    h.cycle()  # a fourth cycle must not try it again
    tries = [r for r in h.rows() if r["file_name"] == "poison.fasta"]
    assert [(r["outcome"], r["failed_attempts"], r["completed"]) for r in tries] == [
        ("retry", 1, 0), ("retry", 2, 0), ("gave_up", 3, 1)]
    assert "boom" in tries[-1]["error_text"] and "3 failed attempts" in tries[-1]["error_text"]
    assert [i.guid for i in fn4.inserts].count("poison") == 3
    assert {"b", "c"} <= set(fn4.guids)


@pytest.mark.parametrize("fault, outcome", [
    (Scripted(status=409, times=-1), "server_busy"), (Scripted(status=503, times=-1), "server_unavailable"),
    (Scripted(drop=True, times=-1), "server_unavailable")], ids=["409-lock", "503-busy", "refused"])
def test_server_outage_pauses_the_batch_instead_of_failing_every_file(harness, emulator, fn4, fault, outcome):
    put_all(emulator, [(f"s{i}.fasta", fasta(f"s{i}")) for i in range(6)])
    h = harness()
    fn4.script(fault)
    summary = h.cycle()
    assert summary.paused and summary.loaded == 0
    rows = h.rows()
    assert len(rows) == 1 and rows[0]["outcome"] == outcome and rows[0]["completed"] == 0
    assert rows[0]["failed_attempts"] == 0 and rows[0]["file_name"] == "s0.fasta"
    fn4.clear_script()
    h.cycle()
    assert sorted(fn4.guids) == [f"s{i}" for i in range(6)]
    assert h.latest()["s0.fasta"]["outcome"] == "inserted"


def test_run_backs_off_after_an_outage_and_recovers(harness, emulator, fn4):
    """run() keeps going through an fn4 outage; the stop event ends its waits at once."""
    put_all(emulator, [("a.fasta", fasta("a"))])
    h = harness(poll_interval=3600)
    fn4.down = True
    waits = []

    def wait(seconds):  # record the loop's waits; recover fn4 after the first backoff, stop when idle
        waits.append(seconds)
        if len(waits) == 1:
            fn4.down = False
            return False
        if seconds == 3600:
            h.stop.set()
        return h.stop.wait(0)

    h.on_wait = wait
    assert h.loader.run() >= 1
    assert 0 < waits[0] <= osa.BACKOFF_BASE and waits[-1] == 3600
    assert list(fn4.guids) == ["a"]


def test_once_fails_with_a_clear_line_when_fn4_is_down(emulator, oci_config, fn4, tmp_path):
    fn4.down = True
    result = CliRunner().invoke(osa.main, [fn4.url, NAMESPACE, BUCKET, f"sqlite:///{tmp_path / 'c.db'}", "--once",
                                           "--config-file", str(oci_config), "--endpoint", emulator.endpoint])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "fn4 GET /api/v2/server_time answered 503" in result.output  # the start-up check asks first


def test_insert_timeout_counts_against_the_file_when_the_server_is_up(harness, emulator, fn4):
    put_all(emulator, [("slow.fasta", fasta("slow")), ("b.fasta", fasta("b"))])
    fn4.script(Scripted(status=200, guid="slow", delay=1.0))
    h = harness(timeout=(2.0, 0.3))
    h.cycle()
    row = [r for r in h.rows() if r["file_name"] == "slow.fasta"][0]
    assert row["outcome"] == "retry" and row["failed_attempts"] == 1 and "did not answer" in row["error_text"]
    h.cycle()
    assert h.latest()["slow.fasta"]["outcome"] == "inserted"


def test_fn4_answer_that_is_not_json(harness, emulator, fn4):
    put_all(emulator, [("a.fasta", fasta("a"))])
    fn4.script(Scripted(status=502, body="<!DOCTYPE html><html><body><h1>Bad Gateway</h1></body></html>"))
    h = harness()
    h.cycle()
    row = h.latest()["a.fasta"]
    assert row["outcome"] == "retry" and "Bad Gateway" in row["error_text"] and "<h1>" not in row["error_text"]


def test_throttling_and_5xx_from_object_storage_are_retried_by_the_sdk(harness, emulator, fn4):
    put_all(emulator, [("a.fasta.gz", gzip.compress(fasta("a")))])
    emulator.add_fault(Fault(method="GET", path_contains="/o", kind="status", status=429, times=2))
    emulator.add_fault(Fault(method="GET", path_contains="a.fasta.gz", kind="status", status=503, times=1))
    harness().cycle()
    assert list(fn4.guids) == ["a"]
    assert [r.status for r in emulator.requests if r.method == "GET"].count(429) == 2


def test_listing_that_keeps_failing_abandons_the_cycle_with_a_batch_row_that_says_why(harness, emulator, fn4):
    put_all(emulator, [("a.fasta", fasta("a"))])
    emulator.add_fault(Fault(method="GET", path_contains="/o", kind="status", status=503, times=-1))
    h = harness()
    with pytest.raises(osa.OutageError, match="listing bucket 'FN4-queue' failed: Object Storage answered 503"):
        h.loader.run(once=True)
    assert h.catalogue.flush(30) and not h.rows() and not fn4.inserts
    b = h.catalogue.batches.c
    with h.engine.connect() as conn:
        [row] = conn.execute(sa.select(b.batch_size, b.abandon_reason)).all()
    assert row.batch_size is None and "listing bucket 'FN4-queue' failed" in row.abandon_reason
    emulator.clear_faults()
    h.cycle()
    assert list(fn4.guids) == ["a"]


@pytest.mark.parametrize("fault, words", [
    (Fault(method="GET", path_contains="a.fasta", kind="status", status=500, times=-1), "answered 500"),
    (Fault(method="GET", path_contains="a.fasta", kind="drop", times=-1), "unreachable")], ids=["500", "drop"])
def test_object_storage_failing_every_read_of_a_file_retries_then_gives_up(harness, emulator, fn4, fault, words):
    put_all(emulator, [("a.fasta", fasta("a")), ("b.fasta", fasta("b"))])
    emulator.add_fault(fault)
    h = harness(max_attempts=2)
    h.cycle()
    h.cycle()
    tries = [(r["outcome"], r["parse_status"]) for r in h.rows() if r["file_name"] == "a.fasta"]
    assert tries == [("retry", "download_failed"), ("gave_up", "download_failed")]
    assert words in h.latest()["a.fasta"]["error_text"] and list(fn4.guids) == ["b"]


def test_fn4_answering_201_finishes_the_file_as_already_present(harness, emulator, fn4):
    put_all(emulator, [("a.fasta", fasta("a"))])
    fn4.script(Scripted(status=201, guid="a"))
    h = harness()
    h.cycle()
    h.cycle()
    [row] = h.rows()
    assert (row["outcome"], row["completed"], row["insert_status_code"], row["error_text"]) == (
        "already_present", 1, 201, None)


def test_object_deleted_after_listing_is_recorded(harness, emulator, fn4):
    put_all(emulator, [("gone.fasta", fasta("gone")), ("b.fasta", fasta("b"))])
    emulator.add_fault(Fault(method="GET", path_contains="gone.fasta", kind="delete"))
    h = harness()
    h.cycle()
    row = h.latest()["gone.fasta"]
    assert (row["outcome"], row["completed"]) == ("vanished", 1) and "deleted after listing" in row["error_text"]
    assert list(fn4.guids) == ["b"]


def test_replaced_object_is_loaded_in_its_new_version(harness, emulator, fn4):
    put_all(emulator, [("a.fasta", b">a\nACGTU\n")])
    h = harness()
    h.cycle()
    assert h.latest()["a.fasta"]["parse_status"] == "bad_characters"
    emulator.put(BUCKET, "a.fasta", fasta("a"), time_created=T0 + timedelta(hours=1))  # a new etag
    h.cycle()
    assert h.latest()["a.fasta"]["outcome"] == "inserted" and "a" in fn4.guids


@pytest.mark.parametrize("kind", ["truncate", "corrupt", "drop"])
def test_a_damaged_download_is_read_again_and_never_sent(harness, emulator, fn4, kind):
    put_all(emulator, [("a.fasta.gz", gzip.compress(fasta("a", 5000)))])
    emulator.add_fault(Fault(method="GET", path_contains="a.fasta.gz", kind=kind, times=1))
    harness().cycle()
    assert [(i.guid, i.seq_len) for i in fn4.inserts] == [("a", 5000)]


@pytest.mark.parametrize("kind, words", [("truncate", "cut off"), ("corrupt", "md5")])
def test_a_download_damaged_every_time_is_retried_then_given_up(harness, emulator, fn4, kind, words):
    put_all(emulator, [("a.fasta", fasta("a", 5000))])
    emulator.add_fault(Fault(method="GET", path_contains="a.fasta", kind=kind, times=-1))
    h = harness(max_attempts=2)
    h.cycle()
    h.cycle()
    outcomes = [(r["outcome"], r["parse_status"]) for r in h.rows()]
    assert outcomes == [("retry", "download_failed"), ("gave_up", "download_failed")]
    assert words in h.rows()[-1]["error_text"] and not fn4.inserts


def test_same_guid_twice_loads_the_older_and_records_the_duplicate(harness, emulator, fn4):
    put_all(emulator, [("x.fasta", fasta("x", seed=1)), ("later/x.fasta.gz", gzip.compress(fasta("x", seed=2)))])
    h = harness()
    h.cycle()
    assert [i.guid for i in fn4.inserts] == ["x"]
    row = h.latest()["later/x.fasta.gz"]
    assert row["outcome"] == "duplicate" and "x.fasta" in row["error_text"] and row["completed"] == 1


def test_unicode_and_spaces_in_object_names(harness, emulator, fn4):
    put_all(emulator, [("run 7/Zürich samples/abc-1.fasta", fasta("abc-1"))])
    h = harness()
    h.cycle()
    assert list(fn4.guids) == ["abc-1"]
    assert h.latest()["run 7/Zürich samples/abc-1.fasta"]["outcome"] == "inserted"


def test_retry_failed_requeues_for_another_try(harness, emulator, fn4, tmp_path, oci_config):
    put_all(emulator, [("a.fasta", fasta("a")), ("b.fasta", fasta("b"))])
    fn4.script(Scripted(status=403, guid="a"), Scripted(status=403, guid="b"))
    h = harness()
    h.cycle()
    assert not fn4.guids
    result = CliRunner().invoke(osa.main, ["retry-failed", fn4.url, NAMESPACE, BUCKET,
                                           f"sqlite:///{tmp_path / 'c.sqlite'}", "--name", "a.fasta"])
    assert result.exit_code == 0 and "re-queued 1 file(s)" in result.output and "a.fasta" in result.output
    h.cycle()
    assert list(fn4.guids) == ["a"]
    assert [r["outcome"] for r in h.rows() if r["file_name"] == "a.fasta"] == ["failed", "requeued", "inserted"]


def test_etag_of_a_loaded_file_changing_does_not_insert_twice(harness, emulator, fn4):
    put_all(emulator, [("a.fasta", fasta("a"))])
    h = harness()
    h.cycle()
    emulator.put(BUCKET, "a.fasta", fasta("a", seed=3), time_created=T0 + timedelta(hours=1))
    h.cycle()
    assert [i.guid for i in fn4.inserts] == ["a"]
    assert [r["outcome"] for r in h.rows()] == ["inserted", "in_server"]


def test_reset_server_is_refilled_at_reconciliation(harness, emulator, fn4):
    put_all(emulator, [("a.fasta", fasta("a")), ("b.fasta", fasta("b"))])
    h = harness()
    h.cycle()
    fn4.guids.clear()  # the fn4 server was rebuilt empty
    h.clock.advance(seconds=h.loader.settings.reconcile_interval)  # the reconcile interval has passed
    h.cycle()
    assert sorted(fn4.guids) == ["a", "b"] and len(fn4.inserts) == 4


def test_idle_cycle_does_not_fetch_the_guid_list(harness, emulator, fn4):
    put_all(emulator, [(f"s{i}.fasta", fasta(f"s{i}")) for i in range(5)])
    h = harness()
    h.cycle()
    before = fn4.bytes_sent("/api/v2/guids")
    h.cycle()
    h.cycle()
    assert fn4.bytes_sent("/api/v2/guids") == before
    put_all(emulator, [("new.fasta", fasta("new"))])
    h.cycle()
    assert fn4.bytes_sent("/api/v2/guids") == before and "new" in fn4.guids
    assert any(r.path == "/api/v2/new/exists" for r in fn4.requests)


def test_catalogue_outage_keeps_rows_pauses_inserts_and_recovers(harness, emulator, fn4, postgres_schema):
    url, schema = postgres_schema
    url = sa.make_url(url)
    with TCPProxy(url.host or "127.0.0.1", url.port or 5432) as proxy:
        h = harness(url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False),
                    schema=schema, retry_cap=0.2)
        total = osa.MAX_UNWRITTEN_ROWS + 15
        put_all(emulator, [(f"s{i:03d}.fasta", fasta(f"s{i:03d}")) for i in range(total)])
        proxy.cut()
        h.engine.dispose()
        worker = threading.Thread(target=h.loader.run_cycle)
        worker.start()
        stuck = threading.Event()
        for _ in range(600):  # wait, bounded, for the loader to stop inserting
            if h.catalogue.unwritten > osa.MAX_UNWRITTEN_ROWS:
                break
            stuck.wait(0.05)
        assert h.catalogue.unwritten == osa.MAX_UNWRITTEN_ROWS + 1
        assert len(fn4.inserts) == osa.MAX_UNWRITTEN_ROWS  # the batch row is one of the unwritten
        proxy.restore()
        worker.join(60)
        assert not worker.is_alive()
        assert h.catalogue.flush(30)
        rows = h.rows()
    assert len(fn4.inserts) == total == len({i.guid for i in fn4.inserts})
    assert len(rows) == total and all(r["outcome"] == "inserted" for r in rows)


def test_fn4_does_not_wait_while_the_sample_before_is_archived_and_recorded(harness, emulator, fn4):
    """The next insert is sent before the last sample is archived and its row recorded: a slow
    archive step (a rename taking 0.5 s) leaves fn4, whose inserts take 0.8 s, no idler."""
    put_all(emulator, [(f"s{i}.fasta", fasta(f"s{i}")) for i in range(4)])
    fn4.insert_delay = 0.8
    emulator.add_fault(Fault(method="POST", path_contains="renameObject", kind="delay", delay=0.5, times=-1))
    h = harness(on_success="rename:loaded/")
    assert h.cycle().loaded == 4
    gaps = [later.started - earlier.ended for earlier, later in zip(fn4.inserts, fn4.inserts[1:])]
    assert len(gaps) == 3 and max(gaps) < 0.5, gaps  # each gap held a whole rename before
    assert [(r["file_name"], r["outcome"]) for r in h.rows()] == [(f"s{i}.fasta", osa.INSERTED) for i in range(4)]
    assert sorted(o.name for o in h.loader.store.list_objects()) == [f"loaded/s{i}.fasta" for i in range(4)]
