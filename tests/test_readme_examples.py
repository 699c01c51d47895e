"""README's examples, executed: its commands against `pipenv run demo --serve`, its JSON and settings files.

Every fenced block of README.md is either run by a test (here, or named in EXECUTED) or listed in
NOT_RUN with the reason it cannot run on a development machine; a new block fails
test_every_readme_block_is_run_or_says_why until it is one or the other.
"""
from __future__ import annotations

import json
import os
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import objectstoreaccess as osa
import readme
from test_cli import variables_the_module_reads

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "tests" / "demo.py"
START_LIMIT = 60      # seconds for the demo to print its settings on a loaded machine
COMMAND_LIMIT = 120   # seconds for one command line
STOP_LIMIT = 20       # seconds from a signal to the demo's exit

# (section heading, block language): the test that runs those blocks.
EXECUTED = {
    ("Set-up: two commands", "bash"): "test_readme_set_up_commands_are_what_ci_runs (.ci/run runs them)",
    ("Try it", "bash"): "test_cli.py::test_demo_uploads_loads_lists_and_reports_ok and test_demo_serve_* here",
    ("Run it", "bash"): "test_readme_run_it_commands_run_as_written",
    ("Oracle Autonomous Database with a wallet", "json"): "test_readme_databases_json_resolves",
    ("Monitoring SQL", "sql"): "test_catalogue.py::test_readme_monitoring_sql_runs_on_every_database",
    ("Deployment", "sh"): "test_readme_settings_file_names_only_variables_the_program_reads",
    ("The service", "ini"): "test_cli.py::test_readme_systemd_units_pass_systemd_analyze_verify",
    ("Health check every 5 minutes", "ini"): "test_cli.py::test_readme_systemd_units_pass_systemd_analyze_verify",
}
# (section heading, block language): why it is not run here.
NOT_RUN = {
    ("Oracle Autonomous Database with a wallet", "bash"): "needs an OCI tenancy, an Autonomous Database and root",
    ("Oracle Autonomous Database with a wallet", "sql"): "Oracle-only DDL run as ADMIN; no Oracle database here",
    ("Deployment", "bash"): "creates a system user and installs under /opt and /etc as root",
    ("On an OCI VM with instance principals", "bash"): "needs an OCI VM in a dynamic group",
}


def readme_blocks() -> list[tuple[str, str]]:
    """Return (nearest heading, language) of every fenced block of README.md that holds commands, SQL or settings."""
    text = readme.README.read_text()
    found, heading = [], None
    lines = iter(text.splitlines())
    for line in lines:
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        elif line.startswith("```"):
            language = line[3:].strip()
            for inner in lines:
                if inner.startswith("```"):
                    break
            if language in ("bash", "sh", "sql", "json", "ini"):
                found.append((heading, language))
    return found


def test_every_readme_block_is_run_or_says_why():
    blocks = readme_blocks()
    unaccounted = [b for b in blocks if b not in EXECUTED and b not in NOT_RUN]
    assert not unaccounted, f"README blocks neither run by a test nor listed in NOT_RUN: {unaccounted}"
    stale = (set(EXECUTED) | set(NOT_RUN)) - set(blocks)
    assert not stale, f"listed README blocks that no longer exist: {sorted(stale)}"


# ---- pipenv run demo --serve ----

class DemoServer:
    """`tests/demo.py --serve --port 0` in a real subprocess: its settings, and a way to stop it."""

    def __init__(self, log: Path):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FN4_", "OCI_", "DB_CONNECTION"))}
        self._log = open(log, "wb")
        self.process = subprocess.Popen([sys.executable, str(DEMO), "--serve", "--port", "0"], env=env,
                                        stdout=subprocess.PIPE, stderr=self._log, text=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.printed: list[str] = []
        self.exports: dict[str, str] = {}
        deadline = time.monotonic() + START_LIMIT
        while True:
            line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            assert line is not None, f"demo --serve ended early: {self.printed} {log.read_text()}"
            self.printed.append(line)
            if line.startswith("export "):
                name, _, value = shlex.split(line)[1].partition("=")
                self.exports[name] = value
            if line.startswith("# serving"):
                break
        assert 'cd "$DEMO_DIR"' in self.printed, self.printed
        self.folder = Path(self.exports["DEMO_DIR"])

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def env(self) -> dict[str, str]:
        """The environment of a second terminal where the printed lines were pasted."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FN4_", "OCI_", "DB_CONNECTION"))}
        return {**env, **self.exports}

    def stop(self, signum: int) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signum)
        try:
            return self.process.wait(timeout=STOP_LIMIT)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait(timeout=STOP_LIMIT)
            self._log.close()


@pytest.fixture
def demo(tmp_path):
    server = DemoServer(tmp_path / "demo-stderr.log")
    yield server
    server.stop(signal.SIGTERM)


def cli(demo: DemoServer, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "objectstoreaccess.py"), *args], env=demo.env(),
                          cwd=demo.folder, capture_output=True, text=True, timeout=COMMAND_LIMIT)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_demo_serve_serves_real_commands_until_a_signal(tmp_path, signum):
    demo = DemoServer(tmp_path / "demo-stderr.log")
    try:
        assert {"OCI_CLI_CONFIG_FILE", "OCI_OBJECT_STORAGE_ENDPOINT", "DB_CONNECTION_CONFIG_FILE", "FN4_URL",
                "OCI_NAMESPACE", "OCI_BUCKET", "FN4_DATABASE"} <= set(demo.exports)
        files = sorted(str(p) for p in (demo.folder / "run42").glob("*.fasta.gz"))
        assert len(files) == 8
        uploaded = cli(demo, "upload", "lxxxx", "FN4-queue", *files)
        assert uploaded.returncode == 0 and "8 uploaded, 0 not" in uploaded.stdout, uploaded.stdout + uploaded.stderr
        loaded = cli(demo, "run", "--once")  # every argument from the printed settings
        assert loaded.returncode == 0, loaded.stderr
        listed = cli(demo, "list", demo.exports["FN4_URL"], "lxxxx", "FN4-queue", "unittest_oracle")
        assert "8 FASTA files: 8 loaded, 0 pending, 0 failed" in listed.stdout, listed.stdout + listed.stderr
        assert demo.process.poll() is None  # still serving
    finally:
        started = time.monotonic()
        code = demo.stop(signum)
    assert code == 0, (tmp_path / "demo-stderr.log").read_text()
    assert time.monotonic() - started < STOP_LIMIT
    assert not demo.folder.exists()


# ---- the commands of "Run it", as written ----

PREFIXES = ("pipenv run python3 objectstoreaccess.py ", "python3 objectstoreaccess.py ")


def run_it_commands() -> list[str]:
    lines = [line for block in readme.blocks(readme.section("Run it"), "bash") for line in block.splitlines()
             if line.strip() and not line.startswith("#")]
    for line in lines:
        assert line.startswith(PREFIXES), f"a README 'Run it' line this test cannot run: {line}"
    return lines


def as_run_here(line: str, demo: DemoServer) -> tuple[str, str]:
    """Return the command's subcommand and the line to give bash: this interpreter, the stand-in's URL,
    and --once for the loader (as written it runs for months)."""
    rest = next(line[len(p):] for p in PREFIXES if line.startswith(p))
    words = shlex.split(rest)
    command = words[0] if words[0] in osa.main.commands else "run"
    line = f"{shlex.quote(sys.executable)} objectstoreaccess.py {rest}"
    line = line.replace("http://localhost:5025", demo.exports["FN4_URL"])
    return command, line + (" --once" if command == "run" else "")


def test_readme_run_it_commands_run_as_written(demo):
    commands = run_it_commands()
    assert any(line.startswith("pipenv run python3 objectstoreaccess.py \"http://localhost:5025\" \"lxxxx\" "
                               "\"FN4-queue\" \"unittest_oracle\"") for line in commands), "the seed command"
    outputs = {}
    for line in commands + commands[:1]:  # the seed command again at the end, to load what was uploaded
        command, bash_line = as_run_here(line, demo)
        done = subprocess.run(["bash", "-c", bash_line], env=demo.env(), cwd=demo.folder, capture_output=True,
                              text=True, timeout=COMMAND_LIMIT)
        assert done.returncode == 0, f"{line}\n{done.stdout}{done.stderr}"
        outputs[command] = done.stdout
    assert {"run", "upload", "list", "download", "retry-failed"} <= set(outputs)
    assert re.search(r"\b8 uploaded, 0 not\b", outputs["upload"]), outputs["upload"]
    assert "8 FASTA files: 0 loaded, 8 pending" in outputs["list"], outputs["list"]
    assert "re-queued 0 file(s)" in outputs["retry-failed"], outputs["retry-failed"]
    downloaded = demo.folder / "check" / "incoming_sample-7.fasta.gz"
    assert downloaded.read_bytes() == (demo.folder / "run42" / "sample-7.fasta.gz").read_bytes()
    listed = cli(demo, "list", demo.exports["FN4_URL"], "lxxxx", "FN4-queue", "unittest_oracle")
    assert "8 FASTA files: 8 loaded, 0 pending, 0 failed" in listed.stdout, listed.stdout + listed.stderr


# ---- set-up, settings and databases.json ----

def test_readme_set_up_commands_are_what_ci_runs():
    """The two set-up commands are the ones .ci/run runs, and the install takes exactly Pipfile.lock."""
    block = readme.blocks(readme.section("Set-up: two commands"), "bash")[0]
    commands = [c.split("#")[0].strip() for line in block.splitlines() for c in line.split("&&")]
    pipenv = [c for c in commands if c.startswith("pipenv ")]
    assert len(pipenv) == 2, commands
    assert re.fullmatch(r"pipenv (sync --dev|install --dev --deploy)", pipenv[0]), f"not the lock: {pipenv[0]}"
    ci = (ROOT / ".ci" / "run").read_text()
    for command in pipenv:
        assert re.search(rf"^{re.escape(command)}$", ci, re.M), f".ci/run does not run `{command}`"


def test_pipfile_lock_holds_every_package_of_the_pipfile_at_an_allowed_version():
    """A Pipfile edited without `pipenv lock` fails here as well as at CI's install."""
    from packaging.specifiers import SpecifierSet
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    pipfile = tomllib.loads((ROOT / "Pipfile").read_text())
    lock = json.loads((ROOT / "Pipfile.lock").read_text())
    for section, locked in (("packages", "default"), ("dev-packages", "develop")):
        pinned = {re.sub(r"[-_.]+", "-", name).lower(): entry["version"].lstrip("=")
                  for name, entry in lock[locked].items()}
        for name, spec in pipfile[section].items():
            key = re.sub(r"[-_.]+", "-", name).lower()
            assert key in pinned, f"Pipfile.lock lacks {name}: run `pipenv lock`"
            spec = spec if isinstance(spec, str) else spec.get("version", "*")
            assert spec == "*" or pinned[key] in SpecifierSet(spec), \
                f"Pipfile.lock pins {name} {pinned[key]}, outside the Pipfile's {spec}: run `pipenv lock`"


def test_readme_settings_file_names_only_variables_the_program_reads():
    block = readme.blocks(readme.section("Deployment"), "sh")[0]
    names = re.findall(r"^([A-Z][A-Z0-9_]*)=", block, re.M)
    declared = {p.envvar for c in osa.main.commands.values() for p in c.params if p.envvar}
    assert names and set(names) <= declared | variables_the_module_reads(), names


def test_readme_databases_json_resolves(tmp_path, monkeypatch):
    monkeypatch.setenv("TNS_ADMIN", "")  # resolving an Oracle entry sets it; monkeypatch restores it
    entries = json.loads(readme.blocks(readme.section("Oracle Autonomous Database with a wallet"), "json")[0])
    path = tmp_path / "databases.json"
    path.write_text(json.dumps(entries))
    env = {"DB_CONNECTION_CONFIG_FILE": str(path)}
    oracle = osa.resolve_database("unittest_oracle", dict(env))
    assert (oracle.drivername, oracle.username, oracle.host) == ("oracle+oracledb", "FN4LOADER", "fn4db_low")
    assert os.environ["TNS_ADMIN"] == entries["unittest_oracle"]["TNS_ADMIN"]
    assert osa.resolve_database("laptop", dict(env)).drivername == "sqlite"
