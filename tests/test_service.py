"""The loader as a service: the `status` command, Prometheus /metrics and /healthz, and structured logs."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import requests
import sqlalchemy as sa
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.dialects import oracle

import objectstoreaccess as osa
from conftest import BUCKET, NAMESPACE, fasta, upload_series, free_port
from fn4_standin import Scripted

SCRIPT = Path(__file__).resolve().parent.parent / "objectstoreaccess.py"
GOOD_AND_BAD = [("a.fasta", fasta("a")), ("b.fasta", fasta("b", seed=1)), ("c.fasta", fasta("c", seed=2)),
                ("bad.fasta", b"not fasta")]


def cli(*args, **env):
    """Invoke the real command line in-process, with no FN4_/OCI_ settings leaking in from outside."""
    env = {**{k: None for k in os.environ if k.startswith(("FN4_", "OCI_", "FN_SENTRY"))}, **env}
    return CliRunner().invoke(osa.main, [str(a) for a in args], env=env, catch_exceptions=False)


def load_once(fn4, emulator, oci_config, database, *extra):
    url, schema = database
    return cli(fn4.url, NAMESPACE, BUCKET, url, "--config-file", oci_config, "--endpoint", emulator.endpoint,
               "--once", *(["--db-schema", schema] if schema else []), *extra)


def status(database, *extra):
    url, schema = database
    return cli("status", url, *(["--db-schema", schema] if schema else []), *extra)


def status_json(database, *extra):
    result = status(database, "--json", *extra)
    return result.exit_code, json.loads(result.stdout)


@pytest.fixture
def loaders(store, fn4):
    """Build Loaders on the emulator, the fn4 stand-in and a real catalogue, with an injected clock."""
    made = []

    def make(url, schema=None, **kwargs):
        catalogue = osa.LoadLogger(sa.create_engine(url), schema)
        catalogue.create_tables()
        made.append(osa.LoadLoop(store, osa.FN4Client(fn4.url), catalogue.start(),
                                 osa.Settings(), **kwargs))
        return made[-1]

    yield make
    for loader in made:
        loader.catalogue.close()
        loader.fn4.close()
        loader.catalogue.engine.dispose()


def test_status_reports_backlog_outcomes_and_failed_files(fn4, emulator, oci_config, database):
    """status reads one loader's last batch, success, outcomes and failed files on every database; warning."""
    upload_series(emulator, GOOD_AND_BAD)
    assert load_once(fn4, emulator, oci_config, database).exit_code == 0
    code, report = status_json(database)
    assert code == 1 and report["status"] == "warning" and report["exit_code"] == 1
    [loader] = report["loaders"]
    assert loader["host_name"] == socket.gethostname() and loader["server_url"] == fn4.url
    for key in ("last_batch", "last_success"):
        assert datetime.fromisoformat(loader[key]) > osa.utcnow() - timedelta(minutes=5)
    assert loader["backlog"] == 0  # files pending: all are loaded or failed
    assert loader["outcomes"] == {"inserted": 3, "failed": 1}
    [failed] = loader["failed_files"]
    assert failed["file_name"] == "bad.fasta" and failed["outcome"] == "failed"
    assert "'>' header" in failed["error_text"]
    text = status(database)
    assert text.exit_code == 1
    assert "WARNING" in text.stdout and fn4.url in text.stdout and "bad.fasta" in text.stdout


def test_status_server_filter_matches_what_the_loader_was_given(fn4, emulator, oci_config, tmp_path):
    """--server (or FN4_URL) picks the loader of that fn4 server, also written with the trailing slash run accepts."""
    url = f"sqlite:///{tmp_path / 'c.sqlite'}"
    upload_series(emulator, GOOD_AND_BAD[:1])
    assert cli(fn4.url + "/", NAMESPACE, BUCKET, url, "--config-file", oci_config, "--endpoint", emulator.endpoint,
               "--once").exit_code == 0
    assert [r["server_url"] for r in status_json((url, None), "--server", fn4.url)[1]["loaders"]] == [fn4.url]
    assert status_json((url, None), "--server", "http://elsewhere:5025")[1]["loaders"] == []
    result = cli("status", url, "--json", FN4_URL=fn4.url + "/")  # the same FN4_URL as the loader's
    assert result.exit_code == 0 and len(json.loads(result.stdout)["loaders"]) == 1, result.stdout


def test_status_is_critical_when_the_catalogue_is_stale(loaders, emulator, database):
    """No batch nor attempt for 3 poll intervals is critical; a longer poll interval makes the same rows OK."""
    upload_series(emulator, GOOD_AND_BAD[:3])
    half_hour_ago = osa.utcnow() - timedelta(minutes=30)
    loader = loaders(*database, clock=lambda: half_hour_ago)
    loader.run(once=True)
    assert loader.catalogue.flush(30)
    code, report = status_json(database, "--poll-interval", 180)
    assert code == 2 and report["status"] == "critical"
    [problem] = report["loaders"][0]["problems"]
    assert "poll intervals" in problem
    code, report = status_json(database, "--poll-interval", 7200)
    assert code == 0 and report["status"] == "ok" and report["loaders"][0]["problems"] == []
    assert report["loaders"][0]["outcomes"] == {"inserted": 3}


def test_a_loader_replaced_by_another_host_is_not_critical(loaders, emulator, tmp_path):
    """A host that stopped while another host loads the same fn4 server is reported, but not as critical."""
    database = (f"sqlite:///{tmp_path / 'c.sqlite'}", None)
    upload_series(emulator, GOOD_AND_BAD[:1])
    hour_ago = osa.utcnow() - timedelta(hours=1)
    old = loaders(*database, clock=lambda: hour_ago, host_name="old-vm")
    old.run(once=True)
    assert old.catalogue.flush(30)
    code, report = status_json(database)
    assert code == 2 and [r["host_name"] for r in report["loaders"]] == ["old-vm"]
    new = loaders(*database, host_name="new-vm")
    new.run(once=True)
    assert new.catalogue.flush(30)
    code, report = status_json(database)
    assert code == 0, report
    problems = {r["host_name"]: r["problems"] for r in report["loaders"]}
    assert problems["new-vm"] == [] and "another host loads this fn4 server now" in problems["old-vm"][0]


def test_status_is_critical_when_most_inserts_fail(fn4, emulator, oci_config, tmp_path):
    """Files whose inserts fn4 answers 500 count as failures: critical above the share, warning at share 1."""
    database = (f"sqlite:///{tmp_path / 'c.sqlite'}", None)
    upload_series(emulator, GOOD_AND_BAD[:3])
    fn4.script(Scripted(status=500, times=-1))
    assert load_once(fn4, emulator, oci_config, database).exit_code == 0
    code, report = status_json(database)
    assert code == 2 and report["loaders"][0]["outcomes"] == {"retry": 3}
    assert [p.split(":")[0] for p in report["loaders"][0]["problems"] if "3 of 3 files" in p] == ["critical"]
    code, report = status_json(database, "--critical-failure-share", 1)
    assert code == 1 and report["status"] == "warning"
    assert [p.split(":")[0] for p in report["loaders"][0]["problems"] if "3 of 3 files" in p] == ["warning"]


def test_status_on_an_empty_catalogue_says_no_batch(tmp_path):
    """A catalogue whose tables hold no rows is critical: no loader has run."""
    url = f"sqlite:///{tmp_path / 'c.sqlite'}"
    engine = sa.create_engine(url)
    osa.LoadLogger(engine).create_tables()
    engine.dispose()
    result = status((url, None))
    assert result.exit_code == 2 and "CRITICAL" in result.stdout and "no batch" in result.stdout
    code, report = status_json((url, None))
    assert code == 2 and report["loaders"] == []


def test_status_queries_compile_for_oracle():
    """Every status query compiles for Oracle, schema-qualified, with no LIMIT and no boolean literals."""
    catalogue = osa.LoadLogger(sa.create_engine("sqlite://"), "FN4LOADER")
    for server in (None, "http://fn4:5025"):
        queries = catalogue.status_queries(osa.utcnow() - osa.STATUS_WINDOW, server)
        assert set(queries) == {"batches", "backlog", "abandoned", "times", "latest", "outcomes", "recent", "failed"}
        for name, query in queries.items():
            sql = str(query.compile(dialect=oracle.dialect()))
            assert '"FN4LOADER".fn4' in sql, name
            assert "LIMIT" not in sql.upper() and " true" not in sql.lower() and " false" not in sql.lower(), sql


def test_clients_dripping_their_request_cannot_hold_healthz():
    """A client has METRICS_TIMEOUT seconds in all to send its request: clients sending a byte a second,
    one per worker, are cut off then, and /healthz answers a monitor that came after them."""
    server = osa.Metrics(max_age=60).serve("127.0.0.1", 0)
    address = ("127.0.0.1", server.server_address[1])
    done = threading.Event()

    def drip(sock):
        with sock:
            try:
                for byte in b"ET /metrics HTTP/1.1\r\nX-Slow: " + b"x" * 60:
                    if done.wait(1.0):
                        return
                    sock.sendall(bytes([byte]))
            except OSError:  # cut off by the server
                return

    # Connected, and their first byte sent, before the monitor connects: the server takes them first.
    socks = [socket.create_connection(address, timeout=5) for _ in range(osa.METRICS_WORKERS)]
    for sock in socks:
        sock.sendall(b"G")
    drippers = [threading.Thread(target=drip, args=(sock,)) for sock in socks]
    try:
        for thread in drippers:
            thread.start()
        began = time.monotonic()
        health = requests.get(f"http://{address[0]}:{address[1]}/healthz", timeout=osa.METRICS_TIMEOUT + 10)
        assert health.status_code in (200, 503)
        assert time.monotonic() - began < osa.METRICS_TIMEOUT + 5
    finally:
        done.set()
        for thread in drippers:
            thread.join(15)
        server.close()


def test_metrics_and_healthz_in_process(loaders, emulator, tmp_path):
    """/metrics counts attempts, inserts, cycles and backlog; /healthz turns 503 once progress is max_age old."""
    upload_series(emulator, GOOD_AND_BAD[:2] + GOOD_AND_BAD[3:])
    now = [osa.utcnow()]
    metrics = osa.Metrics(clock=lambda: now[0], max_age=60)
    loader = loaders(f"sqlite:///{tmp_path / 'c.sqlite'}", clock=lambda: now[0], metrics=metrics)
    server = metrics.serve("127.0.0.1", 0)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert loader.run(once=True) == 1
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for family in text_string_to_metric_families(requests.get(base + "/metrics", timeout=5).text)
                   for s in family.samples}
        assert samples[("fn4loader_attempts_total", (("outcome", "inserted"),))] == 2
        assert samples[("fn4loader_attempts_total", (("outcome", "failed"),))] == 1
        assert samples[("fn4loader_attempts_total", (("outcome", "gave_up"),))] == 0  # alert rules see it from start
        assert samples[("fn4loader_insert_seconds_count", ())] == 2
        assert samples[("fn4loader_insert_seconds_sum", ())] == 0  # timed by the injected clock, which stood still
        assert samples[("fn4loader_backlog", ())] == 0
        assert samples[("fn4loader_last_success_timestamp_seconds", ())] == now[0].timestamp()
        assert samples[("fn4loader_cycles_total", ())] == 1
        health = requests.get(base + "/healthz", timeout=5)
        assert health.status_code == 200 and health.json()["healthy"] is True and health.json()["cycles"] == 1
        now[0] += timedelta(seconds=61)
        health = requests.get(base + "/healthz", timeout=5)
        assert health.status_code == 503 and health.json()["healthy"] is False
        assert requests.get(base + "/nowhere", timeout=5).status_code == 404
    finally:
        server.shutdown()
        server.server_close()


def poll(url, condition, proc, seconds=20):
    """GET url until condition(answer) holds; fail at the deadline or if the process has ended."""
    deadline, tick = time.monotonic() + seconds, threading.Event()
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            answer = requests.get(url, timeout=2)
            if condition(answer):
                return answer
        except requests.ConnectionError:
            pass
        tick.wait(0.05)
    raise AssertionError(f"{url} never satisfied the condition (loader exit code {proc.poll()})")


def test_metrics_port_serves_the_running_cli(fn4, emulator, oci_config, tmp_path):
    """The CLI loop serves /healthz and /metrics on --metrics-port, and still exits 0 on SIGTERM."""
    upload_series(emulator, GOOD_AND_BAD[:1])
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FN4_", "OCI_", "FN_SENTRY"))}
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), fn4.url, NAMESPACE, BUCKET, f"sqlite:///{tmp_path / 'c.sqlite'}",
         "--config-file", str(oci_config), "--endpoint", emulator.endpoint, "--poll-interval", "1",
         "--metrics-port", f"127.0.0.1:{port}"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        poll(base + "/healthz", lambda r: r.status_code == 200 and r.json()["cycles"] >= 1, proc)
        text = requests.get(base + "/metrics", timeout=5).text
        assert "fn4loader_cycles_total" in text
        assert 'fn4loader_attempts_total{outcome="inserted"} 1.0' in text
    finally:
        try:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=10)
        finally:
            if proc.poll() is None:  # it ignored SIGTERM: the test fails, and leaves no process behind
                proc.kill()
                proc.communicate(timeout=10)
    assert proc.returncode == 0, err


def test_metrics_port_that_is_taken_or_nonsense_exits_2(fn4, emulator, oci_config, tmp_path):
    """A --metrics-port already in use, or not a port, stops the CLI with exit 2 before loading."""
    database = (f"sqlite:///{tmp_path / 'c.sqlite'}", None)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = load_once(fn4, emulator, oci_config, database,
                           "--metrics-port", f"127.0.0.1:{taken.getsockname()[1]}")
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert result.exit_code == 2 and len(errors) == 1 and "--metrics-port" in errors[0], result.output
    assert "Traceback" not in result.output
    result = load_once(fn4, emulator, oci_config, database, "--metrics-port", "nonsense")
    assert result.exit_code == 2 and "--metrics-port" in result.output


def test_json_logs_give_one_event_per_sample_and_per_cycle(fn4, emulator, oci_config, tmp_path):
    """--log-format json writes only JSON lines: a sample event per file and one cycle event with counts."""
    upload_series(emulator, GOOD_AND_BAD[:2] + GOOD_AND_BAD[3:])
    result = load_once(fn4, emulator, oci_config, (f"sqlite:///{tmp_path / 'c.sqlite'}", None),
                       "--log-format", "json")
    assert result.exit_code == 0, result.output
    entries = [json.loads(line) for line in result.stderr.splitlines() if line.strip()]
    assert entries and all({"time", "level", "logger", "message"} <= set(e) for e in entries)
    samples = {e["guid"]: e for e in entries if e.get("event") == "sample"}
    assert len([e for e in entries if e.get("event") == "sample"]) == 3 and set(samples) == {"a", "b", "bad"}
    for guid in ("a", "b"):
        assert samples[guid]["outcome"] == "inserted" and samples[guid]["status"] == 200
        assert samples[guid]["bytes"] == len(dict(GOOD_AND_BAD)[f"{guid}.fasta"])
        assert samples[guid]["read_ms"] >= 0 and samples[guid]["insert_ms"] >= 0
    assert samples["bad"]["outcome"] == "failed" and "'>' header" in samples["bad"]["error"]
    [cycle] = [e for e in entries if e.get("event") == "cycle"]
    assert cycle["loaded"] == 2 and cycle["failed"] == 1


def test_text_logs_give_one_line_per_loaded_sample(fn4, emulator, oci_config, tmp_path):
    """The default text log has one INFO line per loaded sample with its guid, size, timings and status."""
    upload_series(emulator, GOOD_AND_BAD[:2] + GOOD_AND_BAD[3:])
    result = load_once(fn4, emulator, oci_config, (f"sqlite:///{tmp_path / 'c.sqlite'}", None))
    assert result.exit_code == 0, result.output
    for guid in ("a", "b"):
        lines = [line for line in result.stderr.splitlines() if f"inserted {guid}:" in line]
        assert len(lines) == 1 and " INFO " in lines[0], result.stderr
        assert all(word in lines[0] for word in ("bytes", "ms", "status 200"))


def test_json_logs_redact_secrets_in_their_fields(fn4, emulator, oci_config, tmp_path):
    """A secret in a sample's error is redacted in the JSON 'error' field, as it is in the message."""
    upload_series(emulator, GOOD_AND_BAD[:1])
    fn4.script(Scripted(status=403, body=json.dumps("refused: wallet password s3cret-Wallet-9")))
    result = cli(fn4.url, NAMESPACE, BUCKET, f"sqlite:///{tmp_path / 'c.sqlite'}", "--config-file", oci_config,
                 "--endpoint", emulator.endpoint, "--once", "--log-format", "json", WALLET_PASSWORD="s3cret-Wallet-9")
    assert result.exit_code == 0, result.output
    [sample] = [json.loads(line) for line in result.stderr.splitlines() if '"sample"' in line]
    assert sample["outcome"] == "failed" and "***" in sample["message"]
    assert "s3cret-Wallet-9" not in result.stderr, sample["error"]
