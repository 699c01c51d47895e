"""The loader end to end, through the real command line, the real OCI SDK and real databases."""
import gzip
import random
from datetime import timedelta

import sqlalchemy as sa
from click.testing import CliRunner

import objectstoreaccess as osa
from conftest import BUCKET, NAMESPACE, T0, fasta


def run_cli(fn4, emulator, oci_config, database, *extra):
    url, schema = database
    args = [fn4.url, NAMESPACE, BUCKET, url, "--config-file", str(oci_config),
            "--endpoint", emulator.endpoint, "--once", *extra]
    if schema:
        args += ["--db-schema", schema]
    return CliRunner().invoke(osa.main, args, catch_exceptions=False)


def rows(database, table):
    url, schema = database
    engine = sa.create_engine(url)
    try:
        metadata, batches, attempts = osa.build_tables(schema)
        chosen = {"batches": batches, "attempts": attempts}[table]
        with engine.connect() as conn:
            key = chosen.primary_key.columns.values()[0]
            return [r._asdict() for r in conn.execute(sa.select(chosen).order_by(key))]
    finally:
        engine.dispose()


def thirty_files(ac587_files):
    """30 FASTA objects: the 4 real genomes and 26 small ones, plain and gzip, in shuffled times."""
    items = [(f"ac587/{p.name}", p.read_bytes()) for p in ac587_files]
    for i in range(26):
        guid = f"sample-{i:02d}"
        data = fasta(guid, length=500 + i, seed=i)
        ending = [".fasta", ".fasta.gz", ".fa", ".fna.gz", ".mfasta", ".fas"][i % 6]
        items.append((f"batch{i % 3}/{guid}{ending}", gzip.compress(data) if ending.endswith(".gz") else data))
    random.Random(587).shuffle(items)  # name order is not time order
    return items


def test_once_loads_exactly_the_new_files_oldest_first(fn4, emulator, oci_config, database, ac587_files):
    items = thirty_files(ac587_files)
    etags = {name: emulator.put(BUCKET, name, data, time_created=T0 + timedelta(minutes=i))
             for i, (name, data) in enumerate(items)}
    emulator.put(BUCKET, "notes/readme.txt", b"not a genome", time_created=T0)
    already = [osa.guid_from_name(items[3][0]), osa.guid_from_name(items[10][0])]
    for guid in already:
        fn4.guids[guid] = "ACGT"

    result = run_cli(fn4, emulator, oci_config, database)
    assert result.exit_code == 0, result.output

    expected_order = [osa.guid_from_name(n) for n, _ in items if osa.guid_from_name(n) not in already]
    assert [i.guid for i in fn4.inserts] == expected_order
    assert all(i.status == 200 for i in fn4.inserts)
    for path in ac587_files:  # real genomes arrive whole, upper-cased, without line ends
        seq = osa.parse_fasta(gzip.decompress(path.read_bytes()))[1].decode()
        assert fn4.guids[osa.guid_from_name(path.name)] == seq

    batches = rows(database, "batches")
    assert len(batches) == 1
    assert batches[0]["objects_listed"] == 30 and batches[0]["batch_size"] == 28
    assert batches[0]["number_in_server"] == 2 and batches[0]["reconciled"] == 1
    assert batches[0]["oci_namespace"] == NAMESPACE and batches[0]["bucket_name"] == BUCKET

    attempts = rows(database, "attempts")
    assert len(attempts) == 30
    by_name = {r["file_name"]: r for r in attempts}
    assert set(by_name) == {n for n, _ in items}
    for name, data in items:
        row = by_name[name]
        guid = osa.guid_from_name(name)
        assert row["fn4id"] == guid and row["completed"] == 1
        assert row["object_etag"] == etags[name]
        assert row["object_size"] == len(data)
        assert row["findneighbour_server_url"] == fn4.url
        if guid in already:
            assert row["outcome"] == "in_server" and row["insert_status_code"] is None
            continue
        seq = fn4.guids[guid]
        assert row["outcome"] == "inserted" and row["insert_status_code"] == 200
        assert row["parse_status"] == "ok" and row["seqid"] == guid
        assert row["len_seq"] == len(seq) and row["first_128_chars"] == seq[:128]
        assert row["batch_size"] == 28
        assert row["bucket_read_start_time"] <= row["bucket_read_end_time"] <= row["insert_start_time"]
        assert row["insert_start_time"] <= row["insert_end_time"]
        assert row["error_text"] is None and row["failed_attempts"] == 0
    loaded = sorted((r for r in attempts if r["outcome"] == "inserted"), key=lambda r: r["batch_sample_number"])
    assert [r["fn4id"] for r in loaded] == expected_order
    assert [r["batch_sample_number"] for r in loaded] == list(range(1, 29))
    times = [r["object_time_created"] for r in loaded]
    assert times == sorted(times) and times[0] >= T0.replace(tzinfo=None)

    # The second run finds nothing new, inserts nothing, and still writes its heartbeat.
    inserts_before = len(fn4.inserts)
    result = run_cli(fn4, emulator, oci_config, database)
    assert result.exit_code == 0, result.output
    assert len(fn4.inserts) == inserts_before
    batches = rows(database, "batches")
    assert len(batches) == 2 and batches[1]["batch_size"] == 0 and batches[1]["objects_listed"] == 30
    assert len(rows(database, "attempts")) == 30


def test_ties_in_time_created_break_by_name(fn4, emulator, oci_config, database):
    for name in ["c.fasta", "a.fasta", "b.fasta"]:
        emulator.put(BUCKET, name, fasta(name[0]), time_created=T0)
    emulator.put(BUCKET, "z.fasta", fasta("z"), time_created=T0 - timedelta(seconds=1))
    assert run_cli(fn4, emulator, oci_config, database).exit_code == 0
    assert [i.guid for i in fn4.inserts] == ["z", "a", "b", "c"]


def test_prefix_limits_the_listing(fn4, emulator, oci_config, database):
    emulator.put(BUCKET, "in/a.fasta", fasta("a"), time_created=T0)
    emulator.put(BUCKET, "out/b.fasta", fasta("b"), time_created=T0)
    assert run_cli(fn4, emulator, oci_config, database, "--prefix", "in/").exit_code == 0
    assert [i.guid for i in fn4.inserts] == ["a"]


def test_listing_reads_every_page(fn4, emulator, oci_config, tmp_path):
    for i in range(1203):
        emulator.put(BUCKET, f"s{i:05d}.fasta", fasta(f"s{i:05d}", length=60), time_created=T0)
    fn4.guids.update({f"s{i:05d}": "A" for i in range(1200)})
    result = run_cli(fn4, emulator, oci_config, (f"sqlite:///{tmp_path / 'c.sqlite'}", None))
    assert result.exit_code == 0, result.output
    assert [i.guid for i in fn4.inserts] == ["s01200", "s01201", "s01202"]
    list_calls = [r for r in emulator.requests if r.method == "GET" and r.path.endswith("/o")]
    assert len(list_calls) >= 3
