"""fn4's own faults, injected at the stand-in: 500s by cause, back-pressure, stale connections, garbage, exit codes."""
import email.utils
import json
import threading
import time
from collections import Counter
from datetime import timedelta

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

import objectstoreaccess as osa
from conftest import BUCKET, NAMESPACE, T0, fasta
from fn4_standin import DATABASE_UNREACHABLE, Scripted
from oci_emulator import Fault
import test_faults
from test_faults import put_all

harness = test_faults.harness  # the fixture: a LoadLoop on the emulator, the stand-in and a catalogue

SERVER_BUSY = getattr(osa, "SERVER_BUSY", "server_busy")


def files(emulator, *guids, length=300):
    put_all(emulator, [(f"{g}.fasta", fasta(g, length)) for g in guids])


def outcomes(h, name):
    return [(r["outcome"], r["failed_attempts"], r["completed"]) for r in h.rows() if r["file_name"] == name]


def recorded_waits(h, stop_after, longest=0.0):
    """Make the loop's waits last at most ``longest`` seconds, recording them; stop once ``stop_after(waits)``."""
    waits = []

    def wait(seconds):
        waits.append(seconds)
        if stop_after(waits):
            h.stop.set()
        return h.stop.wait(min(seconds, longest))

    h.on_wait = wait
    return waits


def run_once(fn4, emulator, oci_config, tmp_path):
    return CliRunner().invoke(osa.main, [fn4.url, NAMESPACE, BUCKET, f"sqlite:///{tmp_path / 'c.db'}", "--once",
                                         "--config-file", str(oci_config), "--endpoint", emulator.endpoint])


def catalogue_rows(tmp_path):
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'c.db'}")
    try:
        with engine.connect() as conn:
            return [r._asdict() for r in conn.execute(sa.text("select * from fn4loadattempt order by gp_int_id"))]
    finally:
        engine.dispose()


# ---- finding 2: fn4's 500s, by cause -------------------------------------------------------------


def test_wrong_length_500_is_a_permanent_failure_not_retried(harness, emulator, fn4):
    fn4.reference_length = 300
    files(emulator, "a")
    put_all(emulator, [("long.fasta", fasta("long", 301))])
    h = harness()
    summary = h.cycle()
    h.cycle()
    assert [(i.guid, i.status) for i in fn4.inserts] == [("a", 200), ("long", 500)]
    row = h.latest()["long.fasta"]
    assert (row["outcome"], row["completed"], row["failed_attempts"], row["parse_status"]) == (
        "failed", 1, 0, "wrong_length")
    assert row["insert_status_code"] == 500 and "seq is 301 and ref is 300" in row["error_text"]
    assert summary.failed == 1 and summary.retried == 0 and not summary.paused


def test_500_could_not_connect_to_database_is_an_outage_without_strikes(harness, emulator, fn4):
    files(emulator, "a", "b")
    fn4.script(Scripted(status=500, text=DATABASE_UNREACHABLE, times=-1))
    h = harness(max_attempts=2)
    for _ in range(3):  # more cycles than --max-attempts: a good file must never be given up for fn4's fault
        summary = h.cycle()
        assert summary.paused and summary.loaded == summary.failed == summary.retried == 0
    assert outcomes(h, "a.fasta") == [("server_unavailable", 0, 0)] * 3 and outcomes(h, "b.fasta") == []
    assert "Could not connect to database" in h.latest()["a.fasta"]["error_text"]
    fn4.clear_script()
    h.cycle()
    assert sorted(fn4.guids) == ["a", "b"]


def test_other_500_counts_against_the_file_only_if_fn4s_database_answers(harness, emulator, fn4):
    files(emulator, "a", "b")
    fn4.script(Scripted(status=500, guid="a", text="boom"),  # untrapped error, no telling text
               Scripted(status=500, route="exists", text=DATABASE_UNREACHABLE))  # the probe: database down
    h = harness()
    summary = h.cycle()
    assert summary.paused and outcomes(h, "a.fasta") == [("server_unavailable", 0, 0)]
    assert any(r.path == "/api/v2/a/exists" for r in fn4.requests)
    fn4.script(Scripted(status=500, guid="a", text="boom"))  # the probe answers normally now: a strike
    summary = h.cycle()
    assert outcomes(h, "a.fasta")[-1] == ("retry", 1, 0) and summary.retried == 1 and "b" in fn4.guids


def test_fn4_database_down_at_insert_time_never_gives_a_file_up(harness, emulator, fn4):
    files(emulator, "a", "b", "c")
    h = harness(max_attempts=1)
    h.cycle()  # the guid list is fetched; then fn4's database goes
    files(emulator, "d")
    fn4.script(Scripted(status=200, route="exists", body="false", times=-1))  # planning still works
    fn4.database_down = True
    summary = h.cycle()
    assert summary.paused and outcomes(h, "d.fasta") == [("server_unavailable", 0, 0)]
    fn4.database_down = False
    fn4.clear_script()
    h.cycle()
    assert sorted(fn4.guids) == ["a", "b", "c", "d"]


# ---- finding 3: given-up files get a slow automatic retry -----------------------------------------


def clocked(h, now):
    """Give the harness's loader an injected clock that reads ``now[0]``."""
    h.loader = osa.LoadLoop(h.loader.store, h.client, h.catalogue, h.loader.settings, clock=lambda: now[0],
                            stop=h.stop, wait=h.wait)
    return h


def test_a_file_given_up_during_an_fn4_incident_loads_the_next_day_without_an_operator(harness, emulator, fn4):
    files(emulator, "a", "b")
    fn4.script(Scripted(status=500, guid="a", text="boom", times=-1), Scripted(status=403, guid="b"))
    now = [T0]
    h = clocked(harness(max_attempts=2), now)
    h.cycle()
    h.cycle()
    h.cycle()  # the same day: finished means finished
    assert outcomes(h, "a.fasta") == [("retry", 1, 0), ("gave_up", 2, 1)]
    fn4.clear_script()  # the incident is over
    now[0] += timedelta(hours=23)
    h = clocked(h, now)  # a restart (or a --once run) does not hasten it: the time comes from the catalogue
    h.cycle()
    assert "a" not in fn4.guids  # not before a day has passed
    now[0] += timedelta(hours=1, seconds=1)
    summary = h.cycle()
    assert summary.loaded == 1 and list(fn4.guids) == ["a"]
    rows = [r for r in h.rows() if r["file_name"] == "a.fasta"]
    assert [r["outcome"] for r in rows] == ["retry", "gave_up", "requeued", "inserted"]
    assert "automatic" in rows[2]["error_text"] and f"1 of {osa.AUTO_RETRY_ROUNDS}" in rows[2]["error_text"]
    assert outcomes(h, "b.fasta") == [("failed", 0, 1)]  # 403 is permanent: never re-queued automatically


def test_automatic_retries_are_bounded_and_skip_permanent_failures(harness, emulator, fn4):
    fn4.reference_length = 300
    files(emulator, "a")
    put_all(emulator, [("long.fasta", fasta("long", 301)), ("bad.fasta", b">bad\nACGU\n")])
    fn4.script(Scripted(status=500, guid="a", text="boom", times=-1))
    now = [T0]
    h = clocked(harness(max_attempts=1), now)
    for _ in range(osa.AUTO_RETRY_ROUNDS + 3):  # one cycle a day
        h.cycle()
        now[0] += timedelta(days=1)
    tries = [r for r in h.rows() if r["file_name"] == "a.fasta"]
    requeues = [r["error_text"] for r in tries if r["outcome"] == "requeued"]
    assert len(requeues) == osa.AUTO_RETRY_ROUNDS
    assert [f"{k} of {osa.AUTO_RETRY_ROUNDS}" in text for k, text in enumerate(requeues, 1)] == [True] * len(requeues)
    assert [i.guid for i in fn4.inserts].count("a") == osa.AUTO_RETRY_ROUNDS + 1
    assert [r["outcome"] for r in h.rows() if r["file_name"] == "long.fasta"] == ["failed"]
    assert [r["outcome"] for r in h.rows() if r["file_name"] == "bad.fasta"] == ["failed"]


# ---- finding 4: back-pressure and a missing insert route -----------------------------------------


@pytest.mark.parametrize("status", [429, 408])
def test_back_pressure_pauses_the_batch_without_failing_files(harness, emulator, fn4, status):
    files(emulator, "a", "b", "c")
    fn4.script(Scripted(status=status, times=2))
    h = harness(max_attempts=1)
    for _ in range(2):
        summary = h.cycle()
        assert summary.paused and summary.failed == summary.retried == 0
    assert outcomes(h, "a.fasta") == [(SERVER_BUSY, 0, 0)] * 2
    h.cycle()
    assert sorted(fn4.guids) == ["a", "b", "c"] and h.latest()["a.fasta"]["outcome"] == "inserted"


@pytest.mark.parametrize("retry_after, low, high", [
    ("120", 120, 120), ("http-date", 85, 95), ("99999", None, None)], ids=["seconds", "http-date", "capped"])
def test_retry_after_is_honoured_and_capped(harness, emulator, fn4, retry_after, low, high):
    cap = getattr(osa, "RETRY_AFTER_CAP", 900.0)
    low, high = (cap, cap) if low is None else (low, high)
    if retry_after == "http-date":  # relative to the answer's own Date header
        retry_after = email.utils.formatdate(time.time() + 90, usegmt=True)
    files(emulator, "a")
    fn4.script(Scripted(status=429, headers={"Retry-After": retry_after}))
    h = harness(poll_interval=3600)
    waits = recorded_waits(h, lambda waits: waits[-1] == 3600)
    h.loader.run()
    assert low <= waits[0] <= high, waits
    assert list(fn4.guids) == ["a"]


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_on_a_route_the_cycle_needs_is_honoured(harness, emulator, fn4, status):
    """fn4, or a proxy before it, asking the loader to wait when it fetches the guid list: the abandoned
    cycle is tried again after what was asked, not after the loop's own shorter backoff."""
    files(emulator, "a")
    fn4.script(Scripted(status=status, route="guids", headers={"Retry-After": "120"}))
    h = harness(poll_interval=3600)
    waits = recorded_waits(h, lambda waits: waits[-1] == 3600)
    h.loader.run()
    assert waits[0] == 120, waits
    assert list(fn4.guids) == ["a"]


def test_404_on_the_insert_route_is_an_outage_not_a_bad_sample(harness, emulator, fn4):
    files(emulator, "a", "b")
    fn4.script(Scripted(status=404, times=2))
    h = harness(max_attempts=1)
    h.cycle()
    h.cycle()
    assert outcomes(h, "a.fasta") == [("server_unavailable", 0, 0)] * 2
    assert "404" in h.latest()["a.fasta"]["error_text"]
    h.cycle()
    assert sorted(fn4.guids) == ["a", "b"]


# ---- finding 5: a stale kept-alive connection -----------------------------------------------------


def test_inserts_survive_fn4_closing_idle_connections_while_downloads_are_slow(harness, emulator, fn4):
    files(emulator, "a", "b", "c")
    fn4.idle_timeout = 0.2  # gunicorn's async workers: 2 s; here scaled down with the download time
    emulator.add_fault(Fault(method="GET", path_contains=".fasta", kind="delay", delay=0.8, times=-1))
    h = harness()
    summary = h.cycle()
    assert not summary.paused and summary.loaded == 3
    assert [r["outcome"] for r in h.rows()] == ["inserted"] * 3
    assert [(i.guid, i.status) for i in fn4.inserts] == [("a", 200), ("b", 200), ("c", 200)]
    assert fn4.connections_accepted >= 3  # the connections really were closed under the loader


def test_insert_applied_but_unanswered_on_a_reused_connection_is_repeated_and_loaded(harness, emulator, fn4):
    files(emulator, "a", "b")
    fn4.script(Scripted(guid="b", drop=True, store=True))  # fn4 stores b, then the connection breaks
    h = harness()
    summary = h.cycle()
    assert not summary.paused and summary.loaded == 2
    assert h.latest()["b.fasta"]["outcome"] == "already_present" and list(fn4.guids) == ["a", "b"]
    assert [(i.guid, i.status) for i in fn4.inserts] == [("a", 200), ("b", 0), ("b", 201)]


def test_a_fresh_connection_failing_is_not_repeated(harness, emulator, fn4):
    files(emulator, "a")
    fn4.script(Scripted(guid="a", drop=True))
    h = harness()
    assert h.cycle().paused
    assert [(i.guid, i.status) for i in fn4.inserts] == [("a", 0)]


def test_a_get_cut_off_on_a_kept_alive_connection_is_asked_again(harness, emulator, fn4):
    files(emulator, "a")
    h = harness()
    h.cycle()
    files(emulator, "b")
    fn4.script(Scripted(route="exists", drop=True))  # as when fn4 closes the idle connection under the request
    summary = h.cycle()
    assert summary.loaded == 1 and sorted(fn4.guids) == ["a", "b"]
    assert [r.status for r in fn4.requests if r.path == "/api/v2/b/exists"] == [0, 200]


# ---- finding 9: --once exit code ----------------------------------------------------------------


@pytest.mark.parametrize("fault", [Scripted(status=503, times=-1), Scripted(drop=True, times=-1),
                                   Scripted(status=409, times=-1)], ids=["503", "killed", "409"])
def test_once_exits_1_when_the_batch_paused_with_files_left(emulator, oci_config, fn4, tmp_path, fault):
    files(emulator, "a", "b")
    fn4.script(fault)
    result = run_once(fn4, emulator, oci_config, tmp_path)
    assert result.exit_code == 1, result.output
    assert "Error:" in result.output and "Traceback" not in result.output
    assert [r["outcome"] for r in catalogue_rows(tmp_path)] in (["server_unavailable"], [SERVER_BUSY])
    fn4.clear_script()
    assert run_once(fn4, emulator, oci_config, tmp_path).exit_code == 0 and sorted(fn4.guids) == ["a", "b"]


# ---- finding 10: garbage from fn4 ---------------------------------------------------------------


@pytest.mark.parametrize("body", ["null", "42", '[["a"]]', '{"g00": 1}', '"g00"', "<html>oops</html>"])
def test_garbage_guid_list_is_one_error_line_and_never_a_false_in_server(emulator, oci_config, fn4, tmp_path,
                                                                         body):
    files(emulator, "g00")
    fn4.script(Scripted(status=200, route="guids", body=body))
    result = run_once(fn4, emulator, oci_config, tmp_path)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "/api/v2/guids" in errors[0] and "Traceback" not in result.output
    assert catalogue_rows(tmp_path) == [] and not fn4.inserts


@pytest.mark.parametrize("body", ['"false"', "0", "null", '{"exists": false}'])
def test_garbage_exists_answer_is_an_outage(harness, emulator, fn4, body):
    files(emulator, "a")
    h = harness()
    h.cycle()
    files(emulator, "b")
    fn4.script(Scripted(status=200, route="exists", body=body))
    with pytest.raises(osa.OutageError, match="/api/v2/b/exists"):
        h.loader.run_cycle()
    assert "b" not in fn4.guids
    h.cycle()
    assert sorted(fn4.guids) == ["a", "b"]


@pytest.mark.parametrize("body", ['"noon"', "[1, 2]", "null"])
def test_garbage_server_time_means_fn4_is_not_up(fn4, body):
    client = osa.FN4Client(fn4.url)
    try:
        assert client.is_up()
        fn4.script(Scripted(status=200, route="server_time", body=body))
        assert not client.is_up()
    finally:
        client.close()


# ---- finding 13: two loaders, fn4's insert lock ---------------------------------------------------


def test_409_is_server_busy_not_a_failure(harness, emulator, fn4, tmp_path):
    files(emulator, "a", "b")
    fn4.script(Scripted(status=409, text="Could not acquire the insert lock"))
    h = harness(max_attempts=1)
    summary = h.cycle()
    assert summary.paused and summary.failed == summary.retried == summary.loaded == 0
    assert outcomes(h, "a.fasta") == [(SERVER_BUSY, 0, 0)]
    h.cycle()
    assert sorted(fn4.guids) == ["a", "b"]
    result = CliRunner().invoke(osa.main, ["status", f"sqlite:///{tmp_path / 'c.sqlite'}", "--json"])
    report = json.loads(result.output)
    assert result.exit_code < 2 and not [p for r in report["loaders"] for p in r["problems"] if "fail" in p], report


def test_two_loaders_at_once_lose_nothing_send_nothing_twice_and_fail_nothing(
        harness, emulator, fn4, tmp_path, oci_config):
    fn4.lock_conflicts = True  # as the real server: an insert while another runs answers 409 at once
    fn4.insert_delay = 0.5  # 3 s of inserts: room for the other loader to start on a loaded machine, so they meet
    files(emulator, *[f"s{i}" for i in range(6)])
    # Two loaders are two processes, each with its own Object Storage client: a client serves one downloading thread.
    own_client = osa.ObjectStoreClient.from_config(NAMESPACE, BUCKET, config_file=str(oci_config),
                                                   endpoint=emulator.endpoint)
    first = harness(max_attempts=1)
    second = harness(f"sqlite:///{tmp_path / 'other.sqlite'}", client=own_client, max_attempts=1)
    for h in (first, second):  # each loader waits at most 50 ms, and stops once everything is in and it is idle
        recorded_waits(h, lambda waits: len(fn4.guids) == 6 and waits[-1] == osa.DEFAULT_POLL_INTERVAL, 0.05)
    threads = [threading.Thread(target=h.loader.run) for h in (first, second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for h in (first, second):
        h.stop.set()
    for t in threads:
        t.join(30)
        assert not t.is_alive()
    assert sorted(fn4.guids) == [f"s{i}" for i in range(6)]
    assert all(n == 1 for n in Counter(i.guid for i in fn4.inserts if i.status == 200).values())
    rows = first.rows() + second.rows()
    unexpected = [(r["file_name"], r["outcome"], r["insert_status_code"], r["parse_status"], r["error_text"])
                  for r in rows if r["outcome"] not in ("inserted", "in_server", "already_present", SERVER_BUSY)]
    assert not unexpected
    assert all(r["failed_attempts"] == 0 for r in rows)
    assert any(i.status == 409 for i in fn4.inserts) and SERVER_BUSY in {r["outcome"] for r in rows}  # they met
