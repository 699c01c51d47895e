"""The command line: README's options table kept in step with the code, configuration errors, the seed command, .env."""
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from datetime import timedelta
from pathlib import Path
from urllib.parse import quote, quote_plus, unquote

import click
import pytest
import requests
import sqlalchemy as sa
from click.testing import CliRunner

import objectstoreaccess as osa
import readme
from conftest import BUCKET, NAMESPACE, T0, fasta, upload_series, free_port
from fn4_standin import FN4StandIn, Scripted
from oci_emulator import write_oci_config
from sentry_catcher import SentryCatcher
from test_service import poll

ROOT = Path(__file__).resolve().parent.parent
UNSET = getattr(click.core, "UNSET", None)  # click 8.3+ marks "no default" with it; older click with None
SEED = ["http://localhost:5025", "lxxxx", "FN4-queue", "unittest_oracle"]


def help_text(*args):
    result = CliRunner().invoke(osa.main, [*args, "--help"], terminal_width=80, prog_name="objectstoreaccess.py")
    assert result.exit_code == 0
    return result.output


def variables_the_module_reads():
    source = (ROOT / "objectstoreaccess.py").read_text()
    read = set(re.findall(r"environ(?:\.get)?\(\s*\"([A-Z][A-Z0-9_]+)\"", source))
    read |= set(re.findall(r"environ\[\"([A-Z][A-Z0-9_]+)\"\]", source))
    for names in re.findall(r"for name in \(((?:\"[A-Z0-9_]+\",?\s*)+)\):\n\s+\S*environ", source):
        read |= set(re.findall(r"\"([A-Z0-9_]+)\"", names))  # for name in ("A", "B"): ... os.environ.get(name)
    read.discard("OCI_PYTHON_SDK_NO_SERVICE_IMPORTS")  # set for the SDK, not read from the user
    return read


def documented_default(param):
    """What the README's default column must say for a parameter, as the code has it."""
    if param.required:
        return "required"
    if isinstance(param, click.Option) and param.is_flag:
        return "off"
    if param.default not in (None, UNSET):
        return f"`{param.default}`"
    stated = re.search(r"Default: (.+?)\.(?:\s|$)", getattr(param, "help", None) or "")
    return stated.group(1) if stated else None


def test_readme_options_table_matches_the_code():
    """Every option and argument of every command has one row with its variable, default and commands; no others."""
    code = {}
    for command in osa.main.commands.values():
        for param in command.params:
            if param.name == "help" or (isinstance(param, click.Argument) and not param.envvar):
                continue  # FILE... and NAME... are what one invocation names: in the README's command table
            if isinstance(param, click.Option):
                name = f"`{max(param.opts, key=len)}`"
            else:
                name = f"`{param.human_readable_name}` (argument)"
            env = f"`{param.envvar}`" if param.envvar else "—"
            entry = code.setdefault(name, {"env": env, "default": documented_default(param), "commands": set()})
            assert (entry["env"], entry["default"]) == (env, documented_default(param)), \
                f"{name} differs between commands; one README row cannot describe it"
            entry["commands"].add(command.name)
    every = set(osa.main.commands)
    rows = readme.table(readme.section("Configuration"), "option")
    shown = {}
    for option, env, default, commands, meaning in rows:
        assert meaning, f"README options row {option} {env} says nothing"
        commands = every if commands == "all" else set(commands.split(", "))
        assert commands <= every, f"README options row {option} {env} names unknown commands {commands - every}"
        if option == "—":  # a variable that is no option: the program must read it
            assert env.strip("`") in variables_the_module_reads(), f"README documents {env}, which nothing reads"
            shown[env] = None
            continue
        assert option not in shown, f"README options table has two rows for {option}"
        shown[option] = {"env": env, "default": default, "commands": commands}
    for name, entry in code.items():
        commands = ", ".join(sorted(entry["commands"]))
        row = f"| {name} | {entry['env']} | {entry['default'] or 'none'} | {commands} | ... |"
        assert name in shown, f"README options table lacks {name}; add a row like\n{row}"
        got = shown[name]
        assert got["env"] == entry["env"], f"README says {name} reads {got['env']}; the code reads {entry['env']}"
        assert got["commands"] == entry["commands"], \
            f"README says {name} is an option of {sorted(got['commands'])}; the code: {sorted(entry['commands'])}"
        if entry["default"] is None:  # no default in the code nor its help: free words, not a value
            assert "`" not in got["default"], f"README gives {name} the default {got['default']}; the code has none"
        else:  # a default stated in the help may be shown as code or as words
            assert got["default"] in (entry["default"], f"`{entry['default']}`"), \
                f"README says {name} defaults to {got['default']}; the code: {entry['default']}"
    stray = set(shown) - set(code) - {env for env in shown if shown[env] is None}
    assert not stray, f"README options table has rows for options no command has: {sorted(stray)}"
    variables = {entry["env"] for entry in code.values()} | {env for env in shown if shown[env] is None}
    unlisted = {f"`{name}`" for name in variables_the_module_reads()} - variables
    assert not unlisted, f"README options table lacks variables the program reads: {sorted(unlisted)}"


def test_help_lists_every_option_with_help_and_env_var():
    for command in osa.main.commands.values():
        for param in command.params:
            if param.name in ("help", "names", "files", "folder", "as_json"):  # what each invocation names
                continue
            assert param.envvar, f"{command.name} {param.name} reads no environment variable"
            if isinstance(param, click.Option):
                assert param.help, f"{command.name} --{param.name} has no help"


def test_env_example_lists_every_variable_the_program_reads():
    listed = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", (ROOT / ".env.example").read_text(), re.M))
    declared = {p.envvar for c in osa.main.commands.values() for p in c.params if p.envvar}
    read = set(re.findall(r"environ(?:\.get)?\(\s*\"([A-Z][A-Z0-9_]+)\"", (ROOT / "objectstoreaccess.py").read_text()))
    read |= set(re.findall(r"environ\[\"([A-Z][A-Z0-9_]+)\"\]", (ROOT / "objectstoreaccess.py").read_text()))
    read.discard("OCI_PYTHON_SDK_NO_SERVICE_IMPORTS")  # set for the SDK, not read from the user
    assert declared | read <= listed, f"missing from .env.example: {sorted((declared | read) - listed)}"


def one_line_error(result, *words):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    assert "Traceback" not in result.output
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


@pytest.fixture
def base_args(emulator, oci_config, fn4):
    return [fn4.url, NAMESPACE, BUCKET]


def invoke(args, env=None, oci_config=None, emulator=None):
    extra = ["--once"]
    if oci_config is not None:
        extra += ["--config-file", str(oci_config), "--endpoint", emulator.endpoint]
    return CliRunner().invoke(osa.main, [*args, *extra], env=env or {})


def test_unknown_database_key_names_the_file_and_keys(tmp_path, base_args, oci_config, emulator):
    config = tmp_path / "db.json"
    config.write_text(json.dumps({"prod": {"DBTYPE": "sqlite", "ENGINE_NAME": "sqlite:///x.db"}}))
    result = invoke([*base_args, "nosuchkey"], {"DB_CONNECTION_CONFIG_FILE": str(config)}, oci_config, emulator)
    one_line_error(result, "'nosuchkey'", "prod")


def test_missing_database_config_file(tmp_path, base_args, oci_config, emulator):
    env = {"DB_CONNECTION_CONFIG_FILE": str(tmp_path / "absent.json")}
    one_line_error(invoke([*base_args, "key"], env, oci_config, emulator), "absent.json")
    one_line_error(invoke([*base_args, "key"], {"DB_CONNECTION_CONFIG_FILE": ""}, oci_config, emulator),
                   "DB_CONNECTION_CONFIG_FILE")


def test_bad_database_url(base_args, oci_config, emulator):
    one_line_error(invoke([*base_args, "nosuchdriver://u:pw@h/db"], None, oci_config, emulator), "database")


def test_unreachable_database_hides_its_password(base_args, oci_config, emulator):
    port = free_port()
    url = f"postgresql+psycopg2://loader:s3cretpw@127.0.0.1:{port}/fn4"
    line = one_line_error(invoke([*base_args, url], None, oci_config, emulator), "catalogue database")
    assert "s3cretpw" not in line and "***" in line


def test_in_memory_sqlite_is_refused(base_args, oci_config, emulator):
    one_line_error(invoke([*base_args, "sqlite://"], None, oci_config, emulator), "in-memory")


def test_bad_fn4_url(emulator, oci_config):
    one_line_error(invoke(["localhost:5025", NAMESPACE, BUCKET, "sqlite:///x.db"], None, oci_config, emulator),
                   "http://")


def test_missing_oci_config(tmp_path, fn4):
    result = CliRunner().invoke(osa.main, [fn4.url, NAMESPACE, BUCKET, f"sqlite:///{tmp_path / 'c.db'}", "--once",
                                           "--config-file", str(tmp_path / "nope")])
    one_line_error(result, "--config-file")


def test_unknown_bucket(base_args, oci_config, emulator, tmp_path):
    args = [base_args[0], NAMESPACE, "no-such-bucket", f"sqlite:///{tmp_path / 'c.db'}"]
    one_line_error(invoke(args, None, oci_config, emulator), "404", "no-such-bucket")


def test_oracle_key_sets_tns_admin_and_uses_python_oracledb(tmp_path, monkeypatch):
    config = tmp_path / "db.json"
    config.write_text(json.dumps({"unittest_oracle": {
        "DBTYPE": "oracle", "ENGINE_NAME": "oracle+cx_oracle://fn4:pw@fn4db_high", "TNS_ADMIN": str(tmp_path)}}))
    monkeypatch.delenv("TNS_ADMIN", raising=False)
    url = osa.resolve_database("unittest_oracle", {"DB_CONNECTION_CONFIG_FILE": str(config)})
    assert url.drivername == "oracle+oracledb" and url.host == "fn4db_high"
    assert os.environ["TNS_ADMIN"] == str(tmp_path)
    args = osa._connect_args(url)
    assert args["config_dir"] == str(tmp_path) and args["wallet_location"] == str(tmp_path)
    engine = sa.create_engine(url)  # the driver is importable and the dialect accepts it
    assert engine.dialect.driver == "oracledb"


def _port_free(port):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def test_seed_command_runs_as_written_with_a_dot_env(tmp_path, emulator, oci_config):
    """The documented command, word for word, configured only by a .env file in the working folder."""
    if not _port_free(5025):
        pytest.skip("port 5025 is taken, so the fn4 stand-in cannot listen where the seed command points")
    db_config = tmp_path / "db.json"
    db_config.write_text(json.dumps({"unittest_oracle": {
        "DBTYPE": "sqlite", "ENGINE_NAME": f"sqlite:///{tmp_path / 'catalogue.sqlite'}"}}))
    settings = {"DB_CONNECTION_CONFIG_FILE": str(db_config), "OCI_CLI_CONFIG_FILE": str(oci_config),
                "OCI_OBJECT_STORAGE_ENDPOINT": emulator.endpoint, "FN4_ONCE": "1"}
    example = (ROOT / ".env.example").read_text()
    dot_env = "\n".join(line for line in example.splitlines() if line.split("=")[0] not in settings)
    (tmp_path / ".env").write_text(dot_env + "\n" + "\n".join(f"{k}={v}" for k, v in settings.items()) + "\n")
    emulator.put(BUCKET, "seed/abc.fasta", fasta("abc"), time_created=T0)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FN4_", "OCI_", "DB_CONNECTION"))}
    with FN4StandIn(port=5025) as fn4:
        done = subprocess.run([sys.executable, str(ROOT / "objectstoreaccess.py"), *SEED], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert [i.guid for i in fn4.inserts] == ["abc"]
    assert "inserted abc" in done.stderr


PASS_PHRASE = 'pp-"Sesame"-42'       # the OCI API key's pass phrase
SENTRY_KEY = "sentrykey4711"


def written_forms(*typed):
    """Every way a secret typed so may be written: as typed, decoded, percent-encoded, escaped in JSON or repr."""
    texts = set()
    for text in typed:
        plain = unquote(text)
        texts |= {text, plain, quote(plain, safe=""), quote_plus(plain)}
    return texts | {json.dumps(t)[1:-1] for t in texts} | {json.dumps(t, ensure_ascii=False)[1:-1] for t in texts} \
        | {repr(t)[1:-1] for t in texts}


def strings_in(value):
    """Yield every string (keys too) inside parsed JSON."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from strings_in(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings_in(item)


def frame_vars(event):
    for exception in (event.get("exception") or {}).get("values", []):
        for frame in (exception.get("stacktrace") or {}).get("frames", []):
            yield frame.get("function"), frame.get("vars") or {}


@pytest.mark.skipif(not os.environ.get("FN4_TEST_POSTGRES_URL"), reason="FN4_TEST_POSTGRES_URL is not set")
@pytest.mark.parametrize("typed", ["Tr0ub%40dor%3A3x", "q\"uo\\te'd+1%20x", "p%C3%A4ssw%C3%B6rd%20%E2%82%AC",
                                   "p\u00e4ssw\u00f6rd\u20ac"],
                         ids=["percent-encoded", "quoted", "non-ascii-encoded", "non-ascii"])
def test_secrets_never_reach_logs_sentry_tables_or_metrics(emulator, fn4, tmp_path, typed):
    """A database password, in any form, the OCI key's pass phrase and the Sentry DSN appear nowhere we write.

    Two real runs with the password in argv: a service run whose fn4 echoes the secrets in a refusal (logs,
    catalogue rows, /metrics), and a --once run that crashes on a guid list nested too deep to parse (Sentry
    events with sys.argv, frame locals, breadcrumbs and messages, sent to a local catcher).
    """
    base = sa.make_url(os.environ["FN4_TEST_POSTGRES_URL"])  # trust auth: the password is ignored, but used
    schema = f"t_{uuid.uuid4().hex[:12]}"
    url = f"{base.drivername}://{base.username}:{typed}@{base.host}:{base.port or 5432}/{base.database}"
    oci_config = write_oci_config(tmp_path / "oci", pass_phrase=PASS_PHRASE)
    upload_series(emulator, [("a.fasta", fasta("a")), ("b.fasta", fasta("b"))])
    fn4.script(Scripted(status=403, guid="a", body=json.dumps(f"refused: {typed} {unquote(typed)} {PASS_PHRASE}")))
    engine = sa.create_engine(base)
    with engine.begin() as conn:
        conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
    port = free_port()
    try:
        with SentryCatcher() as catcher:
            env = {**{k: v for k, v in os.environ.items() if not k.startswith(("FN4_", "OCI_", "FN_SENTRY"))},
                   "FN_SENTRY_URL": catcher.dsn(SENTRY_KEY)}
            args = [sys.executable, str(ROOT / "objectstoreaccess.py"), fn4.url, NAMESPACE, BUCKET, url,
                    "--db-schema", schema, "--config-file", str(oci_config), "--endpoint", emulator.endpoint]
            service = subprocess.Popen([*args, "--poll-interval", "1", "--metrics-port", f"127.0.0.1:{port}"],
                                       cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                poll(f"http://127.0.0.1:{port}/healthz", lambda r: r.json()["cycles"] >= 1, service)
                metrics = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
            finally:
                service.send_signal(signal.SIGTERM)
                served = service.communicate(timeout=20)
            assert service.returncode == 0, served[1]
            assert 'fn4loader_attempts_total{outcome="failed"} 1.0' in metrics
            # An insert answered with JSON nested too deep to parse: an error nobody foresaw, which reaches
            # Sentry through `run` (the guid list is parsed as it streams, so nesting there is an outage)
            upload_series(emulator, [("c.fasta", fasta("c"))], start=T0 + timedelta(hours=1))
            fn4.script(Scripted(status=200, guid="c", body="[" * 100000 + "]" * 100000))
            crashed = subprocess.run([*args, "--once"], cwd=tmp_path, env=env, capture_output=True, text=True,
                                     timeout=60)
            assert crashed.returncode == 1 and "RecursionError" in crashed.stderr, \
                "this test needs an unforeseen error to crash `run --once`; pick another:\n" + crashed.stderr
        with engine.connect() as conn:
            stored = [dict(row._mapping) for table in ("fn4loadattempt", "fn4batchload")
                      for row in conn.execute(sa.text(f"SELECT * FROM {schema}.{table}"))]
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
        engine.dispose()

    forms = written_forms(typed, PASS_PHRASE)
    [refused] = [row for row in stored if row.get("file_name") == "a.fasta"]
    assert refused["outcome"] == "failed" and refused["error_text"].count("***") == 3, refused["error_text"]
    for output in (*served, crashed.stdout, crashed.stderr):
        warnings = [line for line in output.splitlines() if "command line" in line and "ps" in line]
        assert len(warnings) == (1 if output in (served[1], crashed.stderr) else 0), output
    events = catcher.events()
    assert len(events) >= 2 and not catcher.errors, catcher.errors
    crash = events[-1]  # the uncaught RecursionError, through the run command whose locals hold the URL
    assert "***" in str(crash["extra"]["sys.argv"]) and crash.get("breadcrumbs"), crash.keys()
    # run's locals hold the URL in the record of its arguments and options (given.catalogue.database)
    urls = [url for function, v in frame_vars(crash) if function == "run"
            for url in re.findall(r"\bdatabase='([^']*)'", " ".join(map(str, v.values())))]
    assert urls and all("***" in url for url in urls), urls
    texts = {"stdout": served[0] + crashed.stdout, "stderr": served[1] + crashed.stderr, "/metrics": metrics,
             "catalogue rows": repr(stored) + " ".join(str(v) for row in stored for v in row.values())}
    for number, body in enumerate(catcher.envelopes):
        texts[f"envelope {number}"] = body.decode("utf-8", "replace")
        for line in body.split(b"\n"):
            with contextlib.suppress(ValueError):
                texts[f"envelope {number}"] += "\n" + "\n".join(strings_in(json.loads(line)))
    for place, text in texts.items():
        assert not [form for form in forms if form in text], (place, [form for form in forms if form in text])
    for place in ("stdout", "stderr", "catalogue rows", "/metrics"):
        assert SENTRY_KEY not in texts[place], place


def test_password_from_the_config_file_is_redacted_from_logs(tmp_path, base_args, oci_config, emulator, capsys):
    port = free_port()
    config = tmp_path / "db.json"
    config.write_text(json.dumps({"prod": {"DBTYPE": "postgresql",
                                           "ENGINE_NAME": f"postgresql+psycopg2://u:topsecret99@127.0.0.1:{port}/x"}}))
    result = invoke([*base_args, "prod"], {"DB_CONNECTION_CONFIG_FILE": str(config)}, oci_config, emulator)
    line = one_line_error(result, "catalogue database")
    assert "topsecret99" not in line
    osa.log.error("a driver message that quotes the password topsecret99")  # through the CLI's log handler
    assert "topsecret99" not in capsys.readouterr().err


def test_demo_uploads_loads_lists_and_reports_ok():
    """The README's one-minute demo runs the real command line end to end and ends with status OK."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FN4_", "OCI_"))}
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "demo.py")], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    for words in ("4 uploaded, 0 not", "4 FASTA files: 4 loaded, 0 pending, 0 failed", "OK at",
                  "fn4 now holds 4 genomes; status exited 0"):
        assert words in done.stdout, done.stdout


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is not installed")
def test_readme_systemd_units_pass_systemd_analyze_verify(tmp_path):
    """The Deployment section's unit files are valid systemd units (paths swapped for ones that exist here)."""
    deployment = readme.section("Deployment")
    units = re.findall(r"^# /etc/systemd/system/(\S+)\n(.*?)(?=^# /etc/systemd/system/|^```)", deployment, re.M | re.S)
    assert {name for name, _ in units} == {"fn4loader.service", "fn4loader-status.service", "fn4loader-status.timer"}
    for name, text in units:
        text = text.replace("/opt/fn4loader/.venv/bin/python3", sys.executable).replace(
            "/opt/fn4loader", str(tmp_path)).replace("OnFailure=fn4loader-alert.service", "")
        (tmp_path / name).write_text(text)
    done = subprocess.run(["systemd-analyze", "verify", *(str(tmp_path / name) for name, _ in units)],
                          capture_output=True, text=True, timeout=60)
    complaints = [line for line in done.stderr.splitlines() if "fn4loader" in line]
    assert done.returncode == 0 and not complaints, done.stderr


def test_readme_links_point_at_its_headings():
    text = (ROOT / "README.md").read_text()
    headings = re.findall(r"^#+ (.+)$", re.sub(r"^```.*?^```", "", text, flags=re.M | re.S), re.M)
    anchors = {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}
    links = set(re.findall(r"\]\(#([^)]+)\)", text))
    assert links and links <= anchors, f"README links to missing headings: {sorted(links - anchors)}"


def _files_under(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_read_only_commands_create_no_file_nor_folder(tmp_path, emulator, oci_config, fn4):
    """status and list, without a catalogue to read, say so in one line and leave HOME and the disk as they were."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FN4_", "OCI_", "DB_CONNECTION", "FN_SENTRY"))}
    env["HOME"] = str(home)
    missing = f"sqlite:///{tmp_path / 'missing.sqlite'}"
    bucket = [fn4.url, NAMESPACE, BUCKET]
    oci = ["--config-file", str(oci_config), "--endpoint", emulator.endpoint]
    for args, codes in ((["status"], (2, 3)), (["status", missing], (2, 3)),
                        (["list", *bucket, *oci], (2,)), (["list", *bucket, missing, *oci], (2,))):
        done = subprocess.run([sys.executable, str(ROOT / "objectstoreaccess.py"), *args], cwd=home, env=env,
                              capture_output=True, text=True, timeout=60)
        errors = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
        assert done.returncode in codes and len(errors) == 1, (args, done.returncode, done.stdout + done.stderr)
        assert "does not exist" in errors[0] and "Traceback" not in done.stderr, errors[0]
        assert _files_under(home) == [] and not (tmp_path / "missing.sqlite").exists(), (args, _files_under(home))


def declared_fields(record):
    """The fields of a command's record that are its arguments and options, a group's in its place."""
    for declared in osa.dataclasses.fields(record):
        if "group" in declared.metadata:
            only = declared.metadata["only"]
            yield from (f for f in declared_fields(declared.metadata["group"]) if not only or f.name in only)
        elif "env" in declared.metadata:
            yield declared


def test_an_option_is_one_field_of_its_command_record_as_the_readme_shows():
    """Each parameter of a command is one field of its record, so a new option is its field and its use."""
    records = {"run": osa.RunOptions, "list": osa.ListOptions, "retry-failed": osa.RetryOptions,
               "status": osa.StatusOptions, "upload": osa.UploadOptions, "download": osa.DownloadOptions}
    assert set(records) == set(osa.main.commands)
    for name, record in records.items():
        params = [p.name for p in osa.main.commands[name].params if p.name != "help"]
        assert params == [f.name for f in declared_fields(record)], name
    source = (ROOT / "objectstoreaccess.py").read_text()
    assert source.count("click.option(") == 1 and source.count("click.argument(") == 1, \
        "options and arguments are declared as fields of a command's record (option, argument, group, knob)"
    [example] = readme.blocks(readme.section("Adding an option"), "python")
    lines = {line.strip() for line in source.splitlines()}
    assert all(line.strip() in lines for line in example.splitlines()), "README's example is not the code's"
    assert "given.metrics_port" in example and "metrics_port" in {f.name for f in declared_fields(osa.RunOptions)}
