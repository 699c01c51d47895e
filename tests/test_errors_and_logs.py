"""What an operator reads: start-up errors that name the service and the cause, one-line option errors,
JSON logs that stay JSON, and log lines that say what happened. Real subprocesses, real servers."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from conftest import BUCKET, NAMESPACE, T0, fasta, upload_series, free_port
from fn4_standin import FN4StandIn, Scripted

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "objectstoreaccess.py"


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FN4_", "OCI_", "FN_SENTRY", "DB_CONNECTION"))}
    return {**env, **extra}


def loader(*args, cwd, env=None, timeout=60):
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=cwd, env=env or clean_env(),
                          capture_output=True, text=True, timeout=timeout)
    return done, time.monotonic() - started


def error_lines(text):
    return [line for line in text.splitlines() if line.startswith("Error:")]


def oci(emulator, oci_config, endpoint=None):
    return ["--config-file", oci_config, "--endpoint", endpoint or emulator.endpoint]


def db(tmp_path):
    return f"sqlite:///{tmp_path / 'c.sqlite'}"


# ---- unreachable services at start ------------------------------------------------------------


def test_unreachable_fn4_at_start_is_one_line_naming_the_url_and_the_cause(emulator, oci_config, tmp_path):
    """--once with nothing listening at the fn4 URL: exit 1 at once, one Error line, no urllib3 internals."""
    url = f"http://127.0.0.1:{free_port()}"
    done, took = loader(url, NAMESPACE, BUCKET, db(tmp_path), *oci(emulator, oci_config), "--once", cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert took < 15
    [line] = error_lines(done.stderr)
    assert line == f"Error: fn4 at {url} is not answering: connection refused", done.stderr
    assert "HTTPConnectionPool" not in done.stderr and "Traceback" not in done.stderr


def test_unreachable_object_storage_at_start_is_one_line_within_15_s(fn4, oci_config, tmp_path):
    """--once with nothing listening at --endpoint: one Error line naming the endpoint, well within 15 s."""
    endpoint = f"http://127.0.0.1:{free_port()}"
    done, took = loader(fn4.url, NAMESPACE, BUCKET, db(tmp_path), "--config-file", oci_config,
                        "--endpoint", endpoint, "--once", cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert took < 15
    [line] = error_lines(done.stderr)
    assert line == f"Error: Object Storage at {endpoint} is not answering: connection refused", done.stderr
    assert "HTTPConnectionPool" not in done.stderr and "('" not in done.stderr


def test_list_fails_fast_when_fn4_is_unreachable(emulator, oci_config, tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    done, took = loader("list", url, NAMESPACE, BUCKET, db(tmp_path), *oci(emulator, oci_config), cwd=tmp_path)
    assert done.returncode == 1 and took < 15, done.stderr
    assert error_lines(done.stderr) == [f"Error: fn4 at {url} is not answering: connection refused"], done.stderr


def test_the_daemon_warns_about_an_unreachable_fn4_and_loads_once_it_answers(emulator, oci_config, tmp_path):
    """Without --once an unreachable fn4 at start is a warning, not the end: the loader loads when fn4 comes up."""
    port = free_port()
    upload_series(emulator, [("a.fasta", fasta("a"))])
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), f"http://127.0.0.1:{port}", NAMESPACE, BUCKET, db(tmp_path),
         *oci(emulator, oci_config), "--poll-interval", "3600"],
        cwd=tmp_path, env=clean_env(), stderr=subprocess.PIPE, text=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        deadline, tick = time.monotonic() + 15, threading.Event()
        warning = f"fn4 at http://127.0.0.1:{port} is not answering: connection refused"
        while not any(warning in line for line in lines) and time.monotonic() < deadline:
            tick.wait(0.05)
        assert any(" WARNING " in line and warning in line for line in lines), lines
        assert proc.poll() is None
        with FN4StandIn(port=port) as fn4:
            deadline = time.monotonic() + 30
            while "a" not in fn4.guids and time.monotonic() < deadline:
                tick.wait(0.05)
            assert "a" in fn4.guids
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)
        reader.join(timeout=5)
    assert proc.returncode == 0, lines
    assert not any("Traceback" in line or "HTTPConnectionPool" in line for line in lines), lines


# ---- option errors ----------------------------------------------------------------------------


def test_an_option_error_is_one_line_and_names_the_variable_only_when_it_was_used(tmp_path):
    args = ["http://127.0.0.1:9", NAMESPACE, BUCKET, db(tmp_path)]
    done, _ = loader(*args, "--poll-interval", "0", cwd=tmp_path)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and "--poll-interval" in lines[0], done.stderr
    assert "FN4_POLL_INTERVAL" not in done.stderr
    done, _ = loader(*args, cwd=tmp_path, env=clean_env(FN4_POLL_INTERVAL="0"))
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and "FN4_POLL_INTERVAL" in lines[0], done.stderr


# ---- JSON logs --------------------------------------------------------------------------------


def all_json(text):
    entries = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert entries
    return entries


def test_json_logs_keep_fatal_errors_and_option_errors_json(emulator, oci_config, tmp_path):
    """With --log-format json, a fatal start-up error and an option error are JSON lines too."""
    url = f"http://127.0.0.1:{free_port()}"
    done, _ = loader(url, NAMESPACE, BUCKET, db(tmp_path), *oci(emulator, oci_config), "--once",
                     "--log-format", "json", cwd=tmp_path)
    assert done.returncode == 1
    fatal = [e for e in all_json(done.stderr) if e["level"] in ("ERROR", "CRITICAL")]
    assert [e["message"] for e in fatal] == [f"Error: fn4 at {url} is not answering: connection refused"]
    done, _ = loader("localhost:5025", NAMESPACE, BUCKET, db(tmp_path), "--log-format", "json", cwd=tmp_path)
    assert done.returncode == 2 and "http://" in all_json(done.stderr)[-1]["message"]
    done, _ = loader(url, NAMESPACE, BUCKET, "--poll-interval", "0", "--log-format", "json", cwd=tmp_path)
    assert done.returncode == 2 and "--poll-interval" in all_json(done.stderr)[-1]["message"]


def test_json_logs_of_upload_and_download_have_no_progress_bar(emulator, oci_config, tmp_path):
    sample = tmp_path / "a.fasta"
    sample.write_bytes(fasta("a"))
    done, _ = loader("upload", NAMESPACE, BUCKET, sample, *oci(emulator, oci_config), "--log-format", "json",
                     cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "1 uploaded, 0 not" in done.stdout
    for line in done.stderr.splitlines():
        json.loads(line)
    done, _ = loader("download", NAMESPACE, BUCKET, "a.fasta", "--to", tmp_path / "out", *oci(emulator, oci_config),
                     "--log-format", "json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    for line in done.stderr.splitlines():
        json.loads(line)


# ---- log lines --------------------------------------------------------------------------------


def test_log_lines_say_what_happened(fn4, emulator, oci_config, tmp_path):
    """No 'rows unwritten' when none are; the duplicate names its object; an HTML page is not repeated;
    DEBUG adds read, parse and insert timings per sample and why files were skipped."""
    upload_series(emulator, [("a.fasta", fasta("a")), ("again/a.fasta", fasta("a", seed=1)),
                             ("e.fasta", fasta("e", seed=2))])
    fn4.script(Scripted(status=500, guid="e"))  # Werkzeug's HTML page: the reason in <title> and in <h1>
    args = [fn4.url, NAMESPACE, BUCKET, db(tmp_path), *oci(emulator, oci_config), "--once"]
    done, _ = loader(*args, "--log-level", "DEBUG", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    [cycle] = [line for line in done.stderr.splitlines() if " cycle 1:" in line]
    assert "catalogue rows" not in cycle
    [duplicate] = [line for line in done.stderr.splitlines() if " duplicate a" in line]
    assert "again/a.fasta" in duplicate
    [retry] = [line for line in done.stderr.splitlines() if "retry e" in line]
    assert retry.count("Internal Server Error") == 1, retry
    debug = [line for line in done.stderr.splitlines() if " DEBUG fn4loader " in line]
    [read_a] = [line for line in debug if "a.fasta" in line and "parsed in" in line]
    assert "downloaded in" in read_a and "bases" in read_a
    assert any("a.fasta" in line and "fn4 answered 200 in" in line for line in debug), debug
    done, _ = loader(*args, "--log-level", "DEBUG", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    skipped = [line for line in done.stderr.splitlines() if " DEBUG " in line and "skip" in line]
    assert any("again/a.fasta" in line and "duplicate" in line for line in skipped), skipped
    assert any("1 loaded earlier" in line for line in skipped), skipped


# ---- bucket commands and the bare script read the environment ----------------------------------


def test_bucket_commands_read_namespace_and_bucket_from_a_dot_env(emulator, oci_config, fn4, tmp_path):
    """upload, download, run and list take NAMESPACE and BUCKET (and the rest) from .env."""
    (tmp_path / ".env").write_text(f"OCI_NAMESPACE={NAMESPACE}\nOCI_BUCKET={BUCKET}\n"
                                   f"OCI_CLI_CONFIG_FILE={oci_config}\n"
                                   f"OCI_OBJECT_STORAGE_ENDPOINT={emulator.endpoint}\n"
                                   f"FN4_URL={fn4.url}\nFN4_DATABASE={db(tmp_path)}\n")
    sample = tmp_path / "a.fasta"
    sample.write_bytes(fasta("a"))
    done, _ = loader("upload", sample, cwd=tmp_path)
    assert done.returncode == 0 and "1 uploaded, 0 not" in done.stdout, done.stdout + done.stderr
    done, _ = loader("download", "a.fasta", "--to", tmp_path / "out", cwd=tmp_path)
    assert done.returncode == 0 and (tmp_path / "out" / "a.fasta").read_bytes() == fasta("a"), done.stderr
    done, _ = loader(cwd=tmp_path, env=clean_env(FN4_ONCE="1"))  # the bare script: run, configured by .env
    assert done.returncode == 0 and sorted(fn4.guids) == ["a"], done.stderr
    done, _ = loader("list", cwd=tmp_path)
    assert done.returncode == 0 and "1 FASTA files: 1 loaded, 0 pending" in done.stdout, done.stderr
    done, _ = loader("upload", NAMESPACE, BUCKET, sample, cwd=tmp_path)  # the names may still be given
    assert done.returncode == 1 and "0 uploaded, 1 not" in done.stdout and "exists" in done.stdout, done.stdout


def test_a_bare_script_runs_the_loader_from_the_environment_or_shows_help(emulator, oci_config, fn4, tmp_path):
    upload_series(emulator, [("a.fasta", fasta("a"))], start=T0)
    env = clean_env(FN4_URL=fn4.url, OCI_NAMESPACE=NAMESPACE, OCI_BUCKET=BUCKET, FN4_DATABASE=db(tmp_path),
                    OCI_CLI_CONFIG_FILE=str(oci_config), OCI_OBJECT_STORAGE_ENDPOINT=emulator.endpoint, FN4_ONCE="1")
    done, _ = loader(cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    assert sorted(fn4.guids) == ["a"]
    done, _ = loader(cwd=tmp_path)
    assert done.returncode == 0 and "Usage:" in done.stdout and "retry-failed" in done.stdout
