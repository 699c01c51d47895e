"""The bucket commands (upload, download, list), --on-success and catalogue retention.

Everything crosses real boundaries: the click command line, the real OCI SDK against the Object
Storage emulator, the fn4 stand-in over HTTP and real catalogue databases. Time is injected.
"""
import gzip
import json
import os
import re
import resource
import subprocess
import sys
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

import objectstoreaccess as osa
from bad_inputs import _bomb
from conftest import BUCKET, NAMESPACE, T0, fasta, upload_series
from fn4_standin import FN4StandIn, Scripted
from test_end_to_end import rows, run_cli
from test_scale import verify_signature

SCRIPT = Path(__file__).resolve().parent.parent / "objectstoreaccess.py"
SAFE_NAME = re.compile(r"[A-Za-z0-9._-]+")


def invoke(*args):
    return CliRunner().invoke(osa.main, [str(a) for a in args], catch_exceptions=False)


def oci(emulator, oci_config):
    return ["--config-file", oci_config, "--endpoint", emulator.endpoint]


def catalogue_args(database):
    url, schema = database
    return [url] + (["--db-schema", schema] if schema else [])


@contextmanager
def make_loader(store, fn4_url, database, clock, **settings):
    """An osa.LoadLoop on a real catalogue with an injected clock."""
    url, schema = database
    catalogue = osa.LoadLogger(sa.create_engine(url), schema)
    catalogue.create_tables()
    catalogue.start()
    client = osa.FN4Client(fn4_url)
    try:
        yield osa.LoadLoop(store, client, catalogue, osa.Settings(**settings), clock=clock)
        assert catalogue.flush(30)
    finally:
        catalogue.close()
        client.close()


def write(folder, name, data):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data)
    return folder / name


# ---- upload ----

def test_upload_stores_files_as_they_are_and_never_replaces(emulator, oci_config, tmp_path):
    """upload stores bytes as is with if-none-match: *, honours --prefix and never overwrites."""
    plain, packed = fasta("s1"), gzip.compress(fasta("s2"))
    files = [write(tmp_path, "s1.fasta", plain), write(tmp_path, "s2.fasta.gz", packed)]
    result = invoke("upload", NAMESPACE, BUCKET, *files, *oci(emulator, oci_config))
    assert result.exit_code == 0, result.output
    assert emulator.get(BUCKET, "s1.fasta") == plain and emulator.get(BUCKET, "s2.fasta.gz") == packed
    puts = [r for r in emulator.requests if r.method == "PUT"]
    assert len(puts) == 2 and all(r.headers.get("if-none-match") == "*" for r in puts)

    result = invoke("upload", NAMESPACE, BUCKET, write(tmp_path, "s3.fa", fasta("s3")), "--prefix", "incoming/",
                    *oci(emulator, oci_config))
    assert result.exit_code == 0, result.output
    assert emulator.names(BUCKET) == ["incoming/s3.fa", "s1.fasta", "s2.fasta.gz"]

    again = write(tmp_path / "again", "s1.fasta", fasta("s1", seed=2))
    result = invoke("upload", NAMESPACE, BUCKET, again, *oci(emulator, oci_config))
    assert result.exit_code == 1
    assert "not uploaded" in result.output and "exists" in result.output
    assert emulator.get(BUCKET, "s1.fasta") == plain


def test_upload_refuses_bad_names_and_still_uploads_the_good_ones(emulator, oci_config, tmp_path):
    """Non-FASTA names and unsafe or too long guids are refused with a reason; the rest upload."""
    bad = ["notes.txt", "bad guid.fasta", "g" * 60 + ".fasta"]
    files = [write(tmp_path, name, fasta("x")) for name in bad]
    files.insert(1, write(tmp_path, "good.fasta", fasta("good")))
    result = invoke("upload", NAMESPACE, BUCKET, *files, *oci(emulator, oci_config))
    assert result.exit_code == 1
    assert emulator.names(BUCKET) == ["good.fasta"] and emulator.get(BUCKET, "good.fasta") == fasta("good")
    refusals = [line for line in result.stdout.splitlines() if line.startswith("not uploaded: ")]
    assert len(refusals) == 3
    for name, line in zip(bad, refusals):
        assert line.startswith(f"not uploaded: {name}: ") and len(line) > len(f"not uploaded: {name}: ") + 10
    assert "FASTA" in refusals[0] and "60" in refusals[2]


def _hostile(tmp_path, kind):
    """Make the hostile file of one kind; return (path as given to upload, the words its refusal must hold)."""
    if kind == "fifo":
        os.mkfifo(tmp_path / "pipe.fasta")
        return tmp_path / "pipe.fasta", "not a regular file"
    if kind == "device-symlink":
        (tmp_path / "zero.fasta").symlink_to("/dev/zero")
        return tmp_path / "zero.fasta", "not a regular file"
    if kind == "folder":
        (tmp_path / "folder.fasta").mkdir()
        return tmp_path / "folder.fasta", "not a regular file"
    if kind == "oversized":  # sparse: reading it whole would take 3 GiB
        with open(tmp_path / "huge.fasta", "wb") as out:
            out.truncate(3 * 2**30)
        return tmp_path / "huge.fasta", "limit"
    if kind == "not-fasta":
        return write(tmp_path, "notes.fasta", b"meeting notes, not a genome\n"), "header"
    if kind == "config-symlink":
        secret = write(tmp_path / "oci", "config", b"[DEFAULT]\nuser=ocid1.user.oc1..x\nkey_file=/k.pem\n")
        (tmp_path / "cfg.fasta").symlink_to(secret)
        return tmp_path / "cfg.fasta", "header"
    if kind == "gzip-bomb":
        return write(tmp_path, "bomb.fasta.gz", _bomb()), "limit"
    if kind == "two-records":
        return write(tmp_path, "two.fasta", fasta("a") + fasta("b")), "2 records"
    if kind == "missing":
        return tmp_path / "absent.fasta", "No such file"
    raise AssertionError(kind)


def run_upload(emulator, oci_config, *args, cwd=None):
    """Run upload in a real process with a time limit and a memory cap, so a hang or a runaway read fails fast."""
    def cap_memory():
        resource.setrlimit(resource.RLIMIT_AS, (2 * 2**30, 2 * 2**30))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FN4_", "OCI_", "FN_SENTRY"))}
    try:
        return subprocess.run([sys.executable, str(SCRIPT), "upload", NAMESPACE, BUCKET, "--config-file",
                               str(oci_config), "--endpoint", emulator.endpoint, *map(str, args)], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=30, preexec_fn=cap_memory)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"upload {args} did not finish within 30 s") from None


@pytest.mark.parametrize("kind", ["fifo", "device-symlink", "folder", "oversized", "not-fasta", "config-symlink",
                                  "gzip-bomb", "two-records", "missing"])
def test_upload_refuses_what_the_loader_would_not_load_and_uploads_the_rest(emulator, oci_config, tmp_path, kind):
    """Each hostile file is refused with its reason, within a time limit; the good file beside it uploads."""
    path, words = _hostile(tmp_path, kind)
    good = write(tmp_path, "good.fasta", fasta("good"))
    done = run_upload(emulator, oci_config, path, good)
    assert done.returncode == 1, done.stdout + done.stderr
    refusals = [line for line in done.stdout.splitlines() if line.startswith("not uploaded: ")]
    assert len(refusals) == 1, done.stdout + done.stderr[-300:]
    refusal = refusals[0]
    assert refusal.startswith(f"not uploaded: {path.name}: ") and words in refusal, refusal
    assert "Traceback" not in done.stderr and "ocid1" not in done.stdout + done.stderr
    assert emulator.names(BUCKET) == ["good.fasta"]
    assert "1 uploaded, 1 not" in done.stdout


def test_upload_takes_a_name_starting_with_a_dash_after_double_dash(emulator, oci_config, tmp_path):
    write(tmp_path, "-dash.fasta", fasta("-dash"))
    done = run_upload(emulator, oci_config, "--", "-dash.fasta", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert emulator.names(BUCKET) == ["-dash.fasta"] and emulator.get(BUCKET, "-dash.fasta") == fasta("-dash")


# ---- download ----

def test_download_writes_safe_names_inside_the_folder_and_never_replaces(emulator, oci_config, tmp_path):
    """download keeps bytes as stored, names files safely inside --to (made if missing), never replaces."""
    objects = {"a/b/x.fasta.gz": gzip.compress(fasta("x")), "../evil.fasta": fasta("evil"),
               ".hidden.fasta": fasta("hidden"), "sp ace/ü.fa": fasta("u")}
    for name, data in objects.items():
        emulator.put(BUCKET, name, data)
    folder = tmp_path / "new" / "deeper"
    result = invoke("download", NAMESPACE, BUCKET, *objects, "--to", folder, *oci(emulator, oci_config))
    assert result.exit_code == 0, result.output
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) == 4 and all(p.resolve().parent == folder.resolve() for p in files)
    for path in files:
        assert SAFE_NAME.fullmatch(path.name) and not path.name.startswith("."), path.name
    assert sorted(p.read_bytes() for p in files) == sorted(objects.values())
    assert [p.name for p in files if p.read_bytes() == objects["a/b/x.fasta.gz"]][0].endswith(".fasta.gz")

    before = {p.name: p.read_bytes() for p in files}
    emulator.put(BUCKET, "../evil.fasta", fasta("evil", seed=3))  # the object changes; the file must not
    result = invoke("download", NAMESPACE, BUCKET, "../evil.fasta", "--to", folder, *oci(emulator, oci_config))
    assert result.exit_code == 1 and "not downloaded" in result.output
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_download_of_a_missing_object_fails_and_the_others_still_download(emulator, oci_config, tmp_path):
    """A missing name is reported with 404 and exit 1; the other names in the call are written."""
    emulator.put(BUCKET, "here.fasta", fasta("here"))
    result = invoke("download", NAMESPACE, BUCKET, "missing.fasta", "here.fasta", "--to", tmp_path / "out",
                    *oci(emulator, oci_config))
    assert result.exit_code == 1
    failed = [line for line in result.stdout.splitlines() if line.startswith("not downloaded")]
    assert len(failed) == 1 and "missing.fasta" in failed[0] and "404" in failed[0]
    assert [(p.name, p.read_bytes()) for p in (tmp_path / "out").iterdir()] == [("here.fasta", fasta("here"))]


def test_download_reads_objects_the_way_the_loader_does(emulator, oci_config, tmp_path):
    """download GETs objects as the loader does (signed as the SDK signs, not through its stack); 404 still reported."""
    names = ["a.fasta", "dir/sub dir/gène 1.fasta"]
    for name in names:
        emulator.put(BUCKET, name, fasta(name[0]))
    emulator.clear_requests()
    result = invoke("download", NAMESPACE, BUCKET, *names, "missing.fasta", "--to", tmp_path / "out",
                    *oci(emulator, oci_config))
    assert result.exit_code == 1 and sum(line.startswith("not downloaded") for line in result.stdout.splitlines()) == 1
    gets = [r for r in emulator.requests if r.method == "GET" and "/o/" in r.path]
    assert [r.path for r in gets] == [f"/n/{NAMESPACE}/b/{BUCKET}/o/{n}" for n in names + ["missing.fasta"]]
    assert all("Oracle-PythonSDK" not in r.headers.get("user-agent", "") and "if-match" not in r.headers
               and verify_signature(r)["headers"] == "date (request-target) host" for r in gets)
    assert sorted(p.read_bytes() for p in (tmp_path / "out").iterdir()) == sorted(fasta(n[0]) for n in names)


@pytest.mark.parametrize("name", ["///", "..", ".", "-", "x" * 300 + ".fasta", "x" * 50 + "." + "y" * 199,
                                  "a" * 30 + "/-" + "b" * 199, "../../etc/passwd", "ü" * 40])
def test_safe_file_name_gives_a_plain_visible_name_of_at_most_200_chars(name):
    """safe_file_name returns a non-empty, safe, visible name of at most 200 characters."""
    safe = osa.safe_file_name(name)
    assert SAFE_NAME.fullmatch(safe) and 0 < len(safe) <= 200
    assert safe not in (".", "..") and not safe.startswith((".", "-")), safe[:20]


# ---- list ----

def test_list_shows_each_file_loaded_pending_or_failed(fn4, emulator, oci_config, database):
    """list reports loaded/failed/pending oldest first, fn4's own guids as loaded, and the counts."""
    upload_series(emulator, [("good1.fasta", fasta("good1")), ("good2.fasta.gz", gzip.compress(fasta("good2"))),
                             ("bad.fasta", b"not fasta")])
    assert run_cli(fn4, emulator, oci_config, database).exit_code == 0
    upload_series(emulator, [("new.fasta", fasta("new")), ("held.fasta", fasta("held"))],
                  start=T0 + timedelta(hours=1))
    fn4.guids["held"] = "ACGT"
    args = ["list", fn4.url, NAMESPACE, BUCKET, *catalogue_args(database), *oci(emulator, oci_config)]
    result = invoke(*args, "--json")
    assert result.exit_code == 0, result.output
    assert [(f["name"], f["state"]) for f in json.loads(result.stdout)] == [
        ("good1.fasta", "loaded"), ("good2.fasta.gz", "loaded"), ("bad.fasta", "failed"),
        ("new.fasta", "pending"), ("held.fasta", "loaded")]
    assert "held.fasta" not in {r["file_name"] for r in rows(database, "attempts")}

    result = invoke(*args)
    assert result.exit_code == 0, result.output
    [line] = [line for line in result.stdout.splitlines() if "FASTA files" in line]
    counts = {state: int(n) for n, state in re.findall(r"(\d+) (loaded|pending|failed)", line)}
    assert line.startswith("5 FASTA files") and counts == {"loaded": 3, "pending": 1, "failed": 1}

    fn4.down = True
    result = invoke(*args)
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert len([line for line in result.output.splitlines() if line.startswith("Error:")]) == 1


# ---- --on-success ----

def test_on_success_rename_moves_loaded_objects_out_of_the_queue(fn4, emulator, oci_config, database):
    """rename:loaded/ moves loaded objects unchanged under loaded/, and later runs ignore them."""
    items = [("a.fasta", fasta("a")), ("b.fasta.gz", gzip.compress(fasta("b"))), ("bad.fasta", b"not fasta")]
    upload_series(emulator, items)
    assert run_cli(fn4, emulator, oci_config, database, "--on-success", "rename:loaded/").exit_code == 0
    assert emulator.names(BUCKET) == ["bad.fasta", "loaded/a.fasta", "loaded/b.fasta.gz"]
    assert [emulator.get(BUCKET, n) for n in ("loaded/a.fasta", "loaded/b.fasta.gz", "bad.fasta")] == [
        data for _, data in items]
    attempts = len(rows(database, "attempts"))
    assert run_cli(fn4, emulator, oci_config, database, "--on-success", "rename:loaded/").exit_code == 0
    assert sorted(i.guid for i in fn4.inserts) == ["a", "b"]
    assert len(rows(database, "attempts")) == attempts
    assert not [r for r in rows(database, "attempts") if r["file_name"].startswith("loaded/")]
    assert rows(database, "batches")[-1]["objects_listed"] == 1


def test_on_success_rename_never_replaces_an_object_at_the_new_name(fn4, emulator, oci_config, database):
    """A taken destination leaves the source in place; the inserted row says why."""
    upload_series(emulator, [("loaded/x.fasta", b"older"), ("x.fasta", fasta("x"))])
    assert run_cli(fn4, emulator, oci_config, database, "--on-success", "rename:loaded/").exit_code == 0
    assert "x" in fn4.guids
    assert emulator.get(BUCKET, "x.fasta") == fasta("x") and emulator.get(BUCKET, "loaded/x.fasta") == b"older"
    [row] = rows(database, "attempts")
    assert row["outcome"] == "inserted" and "--on-success" in row["error_text"] and "412" in row["error_text"]


def test_on_success_tries_again_in_later_cycles(fn4, emulator, oci_config, database):
    """A failed archive is retried by the next run once the obstacle is gone; earlier loads are archived too."""
    upload_series(emulator, [("loaded/x.fasta", b"older"), ("x.fasta", fasta("x")), ("y.fasta", fasta("y"))])
    assert run_cli(fn4, emulator, oci_config, database, "--on-success", "rename:loaded/").exit_code == 0
    assert emulator.names(BUCKET) == ["loaded/x.fasta", "loaded/y.fasta", "x.fasta"]
    emulator.delete(BUCKET, "loaded/x.fasta")
    emulator.put(BUCKET, "z.fasta", fasta("z"), time_created=T0 + timedelta(hours=1))
    assert run_cli(fn4, emulator, oci_config, database).exit_code == 0  # keep: z stays
    result = run_cli(fn4, emulator, oci_config, database, "--on-success", "rename:loaded/")
    assert result.exit_code == 0, result.output
    assert emulator.names(BUCKET) == ["loaded/x.fasta", "loaded/y.fasta", "loaded/z.fasta"]
    assert emulator.get(BUCKET, "loaded/x.fasta") == fasta("x")
    assert [i.guid for i in fn4.inserts] == ["x", "y", "z"]  # nothing was sent twice


def test_on_success_delete_removes_only_loaded_objects(fn4, emulator, oci_config, database):
    """delete removes loaded objects, guarded by if-match on their etag; failed ones stay."""
    etag = emulator.put(BUCKET, "a.fasta", fasta("a"), time_created=T0)
    emulator.put(BUCKET, "bad.fasta", b"not fasta", time_created=T0 + timedelta(minutes=1))
    assert run_cli(fn4, emulator, oci_config, database, "--on-success", "delete").exit_code == 0
    assert emulator.names(BUCKET) == ["bad.fasta"] and list(fn4.guids) == ["a"]
    deletes = [r for r in emulator.requests if r.method == "DELETE"]
    assert [(r.path.rsplit("/", 1)[-1], r.headers.get("if-match")) for r in deletes] == [("a.fasta", etag)]


def test_on_success_keep_is_the_default(fn4, emulator, oci_config, database):
    """By default loaded objects stay where they are."""
    upload_series(emulator, [("a.fasta", fasta("a")), ("bad.fasta", b"not fasta")])
    assert run_cli(fn4, emulator, oci_config, database).exit_code == 0
    assert emulator.names(BUCKET) == ["a.fasta", "bad.fasta"] and list(fn4.guids) == ["a"]
    assert not [r for r in emulator.requests if r.method in ("DELETE", "POST")]


def test_on_success_refuses_an_unknown_action(fn4, emulator, oci_config, tmp_path):
    """--on-success move is a usage error naming the option."""
    result = run_cli(fn4, emulator, oci_config, (f"sqlite:///{tmp_path / 'c.sqlite'}", None), "--on-success", "move")
    assert result.exit_code == 2 and "--on-success" in result.output and not fn4.requests


# ---- retention ----

@pytest.mark.parametrize("days", [None, "0"], ids=["default-90", "zero-keeps-all"])
def test_run_removes_old_rows_but_keeps_each_files_latest(fn4, emulator, oci_config, store, database, days):
    """run prunes this server's batch rows and superseded attempt rows older than --retention-days."""
    upload_series(emulator, [("a.fasta", fasta("a")), ("bad.fasta", b"not fasta")])
    past = lambda: osa.utcnow() - timedelta(days=100)  # noqa: E731
    fn4.script(Scripted(status=500, guid="a"))
    with make_loader(store, fn4.url, database, past) as old:
        old.run_cycle()  # a: retry, bad: failed
        old.run_cycle()  # a: inserted
    with FN4StandIn() as other, make_loader(store, other.url, database, past) as elsewhere:
        elsewhere.run_cycle()
    emulator.put(BUCKET, "c.fasta", fasta("c"), time_created=T0 + timedelta(hours=1))
    result = run_cli(fn4, emulator, oci_config, database, *(["--retention-days", days] if days else []))
    assert result.exit_code == 0, result.output

    recent = osa.utcnow().replace(tzinfo=None) - timedelta(days=1)
    batches = [(b["findneighbour_server_url"], b["check_time"] > recent) for b in rows(database, "batches")]
    attempts = [(r["findneighbour_server_url"], r["file_name"], r["outcome"]) for r in rows(database, "attempts")]
    kept_old = [(fn4.url, "a.fasta", "inserted"), (fn4.url, "bad.fasta", "failed")]
    if days == "0":
        kept_old.insert(0, (fn4.url, "a.fasta", "retry"))
    assert sorted(attempts) == sorted(kept_old + [(other.url, "a.fasta", "inserted"),
                                                  (other.url, "bad.fasta", "failed"), (fn4.url, "c.fasta", "inserted")])
    old_batches = [(fn4.url, False)] * 2 if days == "0" else []
    assert sorted(batches) == sorted(old_batches + [(other.url, False), (fn4.url, True)])


def test_retention_runs_once_a_day_not_every_cycle(fn4, store, database):
    """The loop prunes on its first cycle, then not again until a day has passed."""
    now = [T0 - timedelta(days=2)]
    with make_loader(store, fn4.url, database, lambda: now[0], retention_days=1) as loader:
        def at(moment, cycle):
            now[0] = moment
            cycle()
            assert loader.catalogue.flush(30)
            return [b["check_time"] - T0.replace(tzinfo=None) for b in rows(database, "batches")]

        at(T0 - timedelta(days=2), loader.run_cycle)  # an old row, written without pruning
        assert at(T0, lambda: loader.run(once=True)) == [timedelta(0)]
        at(T0 - timedelta(days=2), loader.run_cycle)
        hour, day = timedelta(hours=1), timedelta(days=1)
        assert at(T0 + hour, lambda: loader.run(once=True)) == [timedelta(0), -2 * day, hour]
        assert at(T0 + 25 * hour, lambda: loader.run(once=True)) == [hour, 25 * hour]


def test_a_failed_removal_is_tried_again_an_hour_later(fn4, store, tmp_path, caplog):
    """When the database refuses the deletes, the loader warns, goes on loading, and tries again in an hour."""
    database = (f"sqlite:///{tmp_path / 'c.sqlite'}", None)
    now = [T0 - timedelta(days=2)]
    with make_loader(store, fn4.url, database, lambda: now[0], retention_days=1) as loader:
        loader.run_cycle()  # an old batch row
        assert loader.catalogue.flush(30)
        with loader.catalogue.engine.begin() as conn:
            conn.execute(sa.text("CREATE TRIGGER refuse BEFORE DELETE ON fn4batchload "
                                 "BEGIN SELECT RAISE(ABORT, 'deletes refused'); END"))
        now[0] = T0
        assert loader.run(once=True) == 1
        assert "could not remove old catalogue rows" in caplog.text and "deletes refused" in caplog.text
        with loader.catalogue.engine.begin() as conn:
            conn.execute(sa.text("DROP TRIGGER refuse"))
        for minutes, old_rows_left in ((30, 1), (61, 0)):
            now[0] = T0 + timedelta(minutes=minutes)
            loader.run(once=True)
            assert loader.catalogue.flush(30)
            times = [b["check_time"] for b in rows(database, "batches")]
            assert sum(t < (T0 - timedelta(days=1)).replace(tzinfo=None) for t in times) == old_rows_left


# ---- the archive prefix of --on-success rename: ----

BESIDE_ARCH = ["arch_sample7.fasta", "archa1.fasta", "arch.fasta", "loaded/x.fasta", "loaded0.fasta"]
UNDER_ARCH = ["arch/done1.fasta", "arch/sub/done2.fasta", "arch/\u00fcber.fasta"]


@pytest.mark.parametrize("value", ["rename:arch", "rename:loaded", "rename:arch/x"])
def test_an_archive_prefix_must_end_with_a_slash(fn4, emulator, oci_config, tmp_path, value):
    """rename:arch would hide arch_sample7.fasta: refused at start with exit 2 and one line naming the option."""
    upload_series(emulator, [("arch_sample7.fasta", fasta("arch_sample7"))])
    result = run_cli(fn4, emulator, oci_config, (f"sqlite:///{tmp_path / 'c.sqlite'}", None), "--on-success", value)
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert result.exit_code == 2 and len(errors) == 1 and "--on-success" in errors[0], result.output
    assert "'/'" in errors[0] and not fn4.requests


def test_a_listed_prefix_under_the_archive_prefix_is_refused(fn4, emulator, oci_config, tmp_path):
    result = run_cli(fn4, emulator, oci_config, (f"sqlite:///{tmp_path / 'c.sqlite'}", None),
                     "--on-success", "rename:arch/", "--prefix", "arch/sub/")
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert result.exit_code == 2 and len(errors) == 1 and "--prefix" in errors[0], result.output


def test_archive_prefix_is_left_out_by_key_range_and_everything_beside_it_loads(fn4, emulator, oci_config, database):
    """Objects beside arch/ load (and move under it); objects under it are never listed, only warned about."""
    upload_series(emulator, [(name, fasta(osa.guid_from_name(name))) for name in UNDER_ARCH + BESIDE_ARCH])
    result = run_cli(fn4, emulator, oci_config, database, "--on-success", "rename:arch/")
    assert result.exit_code == 0, result.output
    assert sorted(i.guid for i in fn4.inserts) == sorted(osa.guid_from_name(n) for n in BESIDE_ARCH)
    assert sorted(emulator.names(BUCKET)) == sorted(UNDER_ARCH + ["arch/" + n for n in BESIDE_ARCH])
    listings = [r for r in emulator.requests if r.method == "GET" and r.path.endswith("/o") and r.query.get("fields")
                and "prefix" not in r.query]  # the bucket's listings, not the look under arch/ at start
    assert {(r.query.get("start"), r.query.get("end")) for r in listings} == {(None, "arch/"), ("arch0", None)}
    warnings = [line for line in result.output.splitlines() if "WARNING" in line and "arch/" in line]
    assert len(warnings) == 1 and "3 FASTA objects" in warnings[0] and "arch/done1.fasta" in warnings[0], warnings
    assert {r["file_name"] for r in rows(database, "attempts")} == set(BESIDE_ARCH)
    assert rows(database, "batches")[-1]["objects_listed"] == len(BESIDE_ARCH)

    result = run_cli(fn4, emulator, oci_config, database, "--on-success", "rename:arch/")
    assert result.exit_code == 0 and len(fn4.inserts) == len(BESIDE_ARCH)
    warnings = [line for line in result.output.splitlines() if "WARNING" in line and "arch/" in line]
    assert len(warnings) == 1 and "3 FASTA objects" in warnings[0], warnings  # the archived ones are known

    args = ["list", fn4.url, NAMESPACE, BUCKET, *catalogue_args(database), *oci(emulator, oci_config), "--json"]
    for extra, env in ((["--on-success", "rename:arch/"], {}), ([], {"FN4_ON_SUCCESS": "rename:arch/"})):
        shown = CliRunner().invoke(osa.main, [str(a) for a in args + extra], env=env, catch_exceptions=False)
        assert shown.exit_code == 0, shown.output
        assert json.loads(shown.stdout) == [], shown.stdout  # everything is archived: nothing pending, nothing shown
    upload_series(emulator, [("arch_new.fasta", fasta("arch_new"))], start=T0 + timedelta(hours=1))
    shown = CliRunner().invoke(osa.main, [str(a) for a in args], env={"FN4_ON_SUCCESS": "rename:arch/"})
    assert [(f["name"], f["state"]) for f in json.loads(shown.stdout)] == [("arch_new.fasta", "pending")]
    report = CliRunner().invoke(osa.main, ["status", *catalogue_args(database), "--json"])
    assert [loader["backlog"] for loader in json.loads(report.stdout)["loaders"]] == [0], report.stdout
