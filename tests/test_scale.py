"""At scale: listing by key ranges equals the sequential listing, fn4's guid list is parsed as it
streams, and loaded files are kept compactly. Correctness only; the figures are in benchmark.py."""
import base64
import json
import random
import re
from datetime import timedelta

import pytest
import sqlalchemy as sa

import objectstoreaccess as osa
from conftest import BUCKET, T0, fasta
from fn4_standin import Scripted
from oci_emulator import _test_key
from test_faults import harness  # noqa: F401  (the fixture)

UNICODE = ["日本/配列.fasta", "é-1.fa", "dir/sub dir/gène 1.fa", "zz\u00ff.fasta", "~tilde.fa", "A.fa", "9.fa"]


def put_many(emulator, names, data=b">x\nACGT\n"):
    emulator.put_many(BUCKET, ((name, data, T0 + timedelta(seconds=i)) for i, name in enumerate(names)))


def listed_names(listing):
    return [obj.name for obj in listing.objects]


def sequential(store, archive=None, prefix=None):
    return [o.name for o in store.list_objects(prefix) if not (archive and o.name.startswith(archive))]


@pytest.mark.parametrize("workers", [1, 4])
@pytest.mark.parametrize("boundaries", [
    [], ["m"], ["0", "5", "a", "f", "k"], ["0", "0", "1"],                   # repeated: no empty duplicates
    ["s01000.fasta", "s01001.fasta", "s01999.fasta"],                           # boundaries that are names
    ["!", "~~~", "\U0010ffff"], ["loaded/", "loaded/s0", "loaded0"],            # empty ranges, the archive's edges
    ["d", "dir/sub", "é", "日"]])
def test_ranged_listing_equals_the_sequential_listing(emulator, store, boundaries, workers):
    names = [f"s{i:05d}.fasta" for i in range(2100)] + [f"loaded/s{i:05d}.fasta" for i in range(1100)]
    put_many(emulator, names + UNICODE + ["notes.txt", "dir/readme.md"])
    for archive in (None, "loaded/"):
        ranges = osa.key_ranges(None, archive, boundaries)
        listing = store.list_ranges(ranges, workers=workers)
        assert listed_names(listing) == sequential(store, archive)
        assert listing.listed == len(listing.objects) and listing.next_start is None
        assert [name for name, _ in listing.pages] == sorted(name for name, _ in listing.pages)
        assert sum(count for _, count in listing.pages) >= listing.listed
    listing = store.list_ranges(osa.key_ranges(None, "loaded/", boundaries), prefix="loaded/", workers=workers)
    assert listed_names(listing) == []


def test_split_points_make_ranges_of_at_least_a_page():
    pages = [(f"p{i:04d}", 1000) for i in range(2000)]
    points = osa.split_points(pages, 64)
    assert 56 <= len(points) <= 63 and points == sorted(points) and all(p.startswith("p") for p in points)
    assert osa.split_points([("a", 10), ("b", 400), ("c", 1)], 64) == []
    assert osa.split_points([("a", 1000), ("b", 250), ("c", 1000), ("d", 250)], 64) == ["b", "d"]
    assert osa.split_points([], 64) == []
    assert osa.split_points([("a", 1000), ("b\udcff", 1000), ("c", 1000)], 64) == ["c"]  # never sent: a lone surrogate


def test_a_name_sample_stays_bounded_and_evenly_spaced():
    sample = osa.NameSample(size=8)
    for i in range(1000):
        sample.add(f"n{i:04d}")
    assert len(sample.names) < 16 and sample.seen == 1000
    assert sample.names == [f"n{i:04d}" for i in range(0, 1000, sample.step)]
    assert sum(count for _, count in sample.pages()) >= 1000 - sample.step
    points = osa.split_points(sample.pages(), 4)
    assert points == sorted(points) and len(points) == 0                        # 1,000 names: under one page each
    big = osa.NameSample(size=64)
    for i in range(10_000):
        big.add(f"n{(i * 7919) % 10_000:05d}")                                  # met out of order
    points = osa.split_points(big.pages(), 4)
    assert len(points) == 3 and all(abs(int(p[1:]) - q) < 500 for p, q in zip(points, (2500, 5000, 7500))), points


def test_key_ranges_cover_the_key_space_once_and_leave_the_archive_out():
    names = sorted(["", "a", "loaded", "loaded/", "loaded/x", "loaded/\U0010ffff", "loaded0", "loadee", "z", "é"])
    for boundaries in ([], ["loaded/x"], ["a", "loaded0", "m"], ["loaded/", "loaded0"], ["b", "c"]):
        ranges = osa.key_ranges(None, "loaded/", boundaries)
        for name in names:
            covering = [r for r in ranges if (r[0] is None or r[0] <= name) and (r[1] is None or name < r[1])]
            assert len(covering) == (0 if name.startswith("loaded/") else 1), (boundaries, name, ranges)
    assert osa.prefix_end("loaded/") == "loaded0" and osa.prefix_end("a\U0010ffff") == "b"


def test_listing_by_range_follows_the_bucket_across_cycles(harness, emulator, fn4, tmp_path):  # noqa: F811
    """Two loaders on one bucket, one listing by key ranges and one page by page, see the same files."""
    first = [f"s{i:05d}.fasta" for i in range(2600)]
    put_many(emulator, first + UNICODE)
    fn4.guids.update(dict.fromkeys([osa.guid_from_name(n) for n in first] + ["A", "9"]))
    parallel = harness(list_workers=4)
    plain = harness(url=f"sqlite:///{tmp_path / 'plain.sqlite'}", list_workers=1)
    for step in range(4):
        expected = sorted(n for n in emulator.names(BUCKET) if osa.fasta_suffix(n))
        got_parallel, got_plain = parallel.cycle(), plain.cycle()
        assert got_parallel.listed == got_plain.listed == len(expected)
        assert loaded_or_not(parallel) == loaded_or_not(plain)
        assert set(outcomes(parallel)) >= set(expected)                  # every listed file has its row
        if step == 0:   # names added (one before all, one inside, one after all) and removed
            emulator.put(BUCKET, "-first.fasta", fasta("-first"))
            emulator.put(BUCKET, "s01500a.fasta", fasta("s01500a"))
            emulator.put(BUCKET, "\U0001f600.fasta", b">x\nACGT\n")
            for name in ("s00000.fasta", "s01200.fasta", "s02599.fasta", "é-1.fa"):
                emulator.delete(BUCKET, name)
        if step == 1:   # a new page's worth, and names at the end of the key space removed
            put_many(emulator, [f"t{i:05d}.fasta" for i in range(1200)])
            fn4.guids.update(dict.fromkeys(f"t{i:05d}" for i in range(1200)))
            for name in UNICODE[3:5]:
                emulator.delete(BUCKET, name)
    assert outcomes(parallel)["-first.fasta"] == outcomes(parallel)["s01500a.fasta"] == "inserted"
    assert outcomes(parallel)["s00005.fasta"] == outcomes(parallel)["t00005.fasta"] == "in_server"
    assert outcomes(parallel)["\U0001f600.fasta"] == outcomes(parallel)["日本/配列.fasta"] == "failed"


def outcomes(h):
    return {name: row["outcome"] for name, row in h.latest().items()}


def loaded_or_not(h):
    return {name: "loaded" if outcome in osa.LOADED else outcome for name, outcome in outcomes(h).items()}


def test_a_new_file_sharing_a_loaded_files_guid_is_a_duplicate_when_listing_by_range(harness, emulator, fn4):  # noqa: F811,E501
    put_many(emulator, [f"s{i:05d}.fasta" for i in range(1500)])
    fn4.guids.update(dict.fromkeys(f"s{i:05d}" for i in range(1500)))
    h = harness(list_workers=4)
    h.cycle()
    h.cycle()   # idle: the loaded files are only counted
    emulator.put(BUCKET, "later/s00007.fasta", fasta("s00007"), time_created=T0 + timedelta(days=1))
    summary = h.cycle()
    row = h.latest()["later/s00007.fasta"]
    assert summary.listed == 1501 and row["outcome"] == "duplicate" and "s00007.fasta" in row["error_text"]


def test_the_archive_prefix_is_never_listed(harness, emulator, fn4):  # noqa: F811
    put_many(emulator, [f"loaded/old{i:05d}.fasta" for i in range(2500)] + [f"s{i:05d}.fasta" for i in range(1200)])
    fn4.guids.update(dict.fromkeys(f"s{i:05d}" for i in range(1200)))
    h = harness(list_workers=4, on_success="rename:loaded/")
    for _ in range(2):
        emulator.clear_requests()
        summary = h.cycle()
        lists = [r.query for r in emulator.requests if r.method == "GET" and r.path.endswith("/o")]
        assert lists and not [q for q in lists if q.get("start", "") < "loaded0" and q.get("end", "\uffff") > "loaded/"]
        assert summary.tried == 0
    assert summary.listed == 0 and len(emulator.names(BUCKET)) == 3700   # the first cycle archived them all


def test_a_first_cycle_against_a_full_fn4_records_files_as_they_are_listed(
        harness, emulator, fn4, tmp_path, monkeypatch, caplog):  # noqa: F811
    """Past SETTLE_WHILE_LISTING unknown files in fn4, they are recorded page by page, not held; the
    outcomes are those of a loader holding everything, duplicates and files fn4 lacks included."""
    names = [f"s{i:05d}.fasta" for i in range(2400)]
    put_many(emulator, names + ["bad guid.fasta", "new-1.fasta", "s02000.fa"])   # s02000.fa: a younger duplicate
    emulator.put(BUCKET, "new-2.fasta", fasta("new-2"), time_created=T0)
    emulator.put(BUCKET, "z/s00010.fasta", fasta("s00010"), time_created=T0 - timedelta(days=1))  # an older one
    fn4.guids.update(dict.fromkeys(osa.guid_from_name(n) for n in names))
    plain = harness(url=f"sqlite:///{tmp_path / 'plain.sqlite'}", list_workers=1)
    plain.cycle()
    fn4.guids.pop("new-1", None), fn4.guids.pop("new-2", None)
    monkeypatch.setattr(osa, "SETTLE_WHILE_LISTING", 50)
    streamed = harness(list_workers=4)
    caplog.set_level("INFO", logger="fn4loader")
    summary = streamed.cycle()
    assert "2398 files fn4 already holds recorded in_server as they were listed" in caplog.text  # all but 7
    assert summary.listed == 2405 and summary.tried == 2   # new-1 and new-2, which the first loader loaded
    got, expected = outcomes(streamed), outcomes(plain)
    assert got.pop("new-1.fasta") == got.pop("new-2.fasta") == "inserted"
    assert expected.pop("new-1.fasta") == expected.pop("new-2.fasta") == "inserted"
    assert got == expected and got["s02000.fa"] == got["s00010.fasta"] == "duplicate"
    assert got["z/s00010.fasta"] == "in_server" and got["bad guid.fasta"] == "failed"
    assert streamed.cycle().tried == 0 and len(streamed.rows()) == 2405


# ---- fn4's guid list, parsed as it streams ----

def chunks_of(data, size):
    return [data[i:i + size] for i in range(0, len(data), size)]


@pytest.mark.parametrize("value", [[], ["a"], ["a", 'b"c', "日本", "x\\y", "\u2028", ""],
                                   [f"g{i}" * 7 for i in range(3000)]])
def test_json_strings_reads_any_chunking(value):
    for text in (json.dumps(value), json.dumps(value, ensure_ascii=False), " \n" + json.dumps(value, indent=2) + "\n"):
        for size in (1, 2, 3, 7, 4096):
            assert list(osa.json_strings(chunks_of(text.encode(), size), "t")) == value


@pytest.mark.parametrize("text", [b"", b"{}", b'"a"', b"null", b'["a", 1]', b'["a",]', b'["a"', b'["a" "b"]',
                                  b"[null]", b'["a"] x', b'[["a"]]', b'["a\\x"]', b'["a\x01"]', b"[", b'["\xff"]',
                                  b'["a"]]', b'{"a": 1}', b"[,]", b'["a", {"b": "c"}]'])
def test_json_strings_refuses_anything_but_a_list_of_strings(text):
    for size in (1, 3, 100):
        with pytest.raises(osa.OutageError, match="not a JSON list of strings"):
            list(osa.json_strings(chunks_of(text, size), "fn4 GET /api/v2/guids"))


def test_guid_set_streams_fn4s_list(fn4):
    fn4.guids.update(dict.fromkeys([f"guid-{i}" for i in range(20000)] + ["日本"]))
    client = osa.FN4Client(fn4.url)
    held = client.guid_set()
    assert len(held) == 20001 and "guid-0" in held and "guid-19999" in held and "日本" in held
    assert "guid-20000" not in held and "" not in held


def test_guid_set_cut_off_before_an_answer_is_asked_again(fn4):
    fn4.guids.update(dict.fromkeys(["a", "b"]))
    client = osa.FN4Client(fn4.url)
    fn4.script(Scripted(route="guids", drop=True))  # as when fn4 closes the idle connection under the request
    held = client.guid_set()
    assert len(held) == 2 and "a" in held
    assert [r.status for r in fn4.requests if r.path == "/api/v2/guids"] == [0, 200]
    fn4.script(Scripted(route="guids", drop=True, times=2))
    with pytest.raises(osa.OutageError, match="is not answering"):
        client.guid_set()


@pytest.mark.parametrize("body", ['["a", 1]', '{"guids": ["a"]}', '["a"', "null", "<html>oops</html>",
                                  "[" * 100000 + "]" * 100000], ids=["number", "object", "cut", "null", "html", "deep"])
def test_guid_set_of_a_malformed_answer_is_an_outage_never_an_answer(fn4, body):
    fn4.script(Scripted(status=200, route="guids", body=body))
    with pytest.raises(osa.OutageError, match="/api/v2/guids"):
        osa.FN4Client(fn4.url).guid_set()


def test_guid_set_of_an_error_answer_is_an_outage(fn4):
    fn4.script(Scripted(status=500, route="guids"))
    with pytest.raises(osa.OutageError, match="answered 500"):
        osa.FN4Client(fn4.url).guid_set()


# ---- Loaded files kept compactly ----

def test_file_states_answer_as_a_dict_would():
    rng = random.Random(7)
    outcomes_ = ["inserted", "already_present", "in_server", "failed", "retry", "gave_up", "requeued", "duplicate"]
    model, states = {}, osa.FileStates()
    keys = [(f"f{i}.fasta", f"etag{i % 3}") for i in range(30000)]
    for _ in range(200000):
        key = rng.choice(keys)
        outcome = rng.choice(outcomes_)
        state = osa.FileState(outcome not in ("retry", "requeued"), outcome, rng.choice([0, 0, 0, 1, 2]))
        model[key] = states[key] = state
    for key in keys:
        assert states.get(key, osa.FileState()) == model.get(key, osa.FileState())
    loaded = ("inserted", "already_present", "in_server")
    whole = {key: state for key, state in model.items()
             if not (state.completed and not state.failed_attempts and state.outcome in loaded)}
    assert dict(states.items()) == whole
    assert states.get(("other.fasta", "e")) is None
    assert states and not osa.FileStates()
    one = osa.FileStates()
    one[("a.fasta", "e")] = osa.FileState(True, "inserted", 0)  # kept compactly, still there
    assert one and one.loaded_by_name("a.fasta") and not one.loaded_by_name("b.fasta")


# ---- Downloads straight over one connection, signed by the SDK's signer ----

def verify_signature(record):
    """Check a request's OCI signature (draft-cavage HTTP signature) with the test key; return its fields."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding
    fields = dict(re.findall(r'(\w+)="([^"]*)"', record.headers["authorization"]))
    lines = [f"(request-target): {record.method.lower()} {record.target}" if name == "(request-target)"
             else f"{name}: {record.headers[name]}" for name in fields["headers"].split()]
    key = serialization.load_pem_private_key(_test_key()[0], None).public_key()
    key.verify(base64.b64decode(fields["signature"]), "\n".join(lines).encode(), padding.PKCS1v15(), hashes.SHA256())
    return fields


def test_downloads_are_signed_as_the_sdk_signs_them(emulator, store):
    name = "dir/sub dir/gène 1.fasta"           # quoted in the path, and signed as quoted
    emulator.put(BUCKET, name, fasta("x"))
    obj = next(store.list_objects())
    emulator.clear_requests()
    assert [osa.parse_fasta(store.read_object(obj, 1 << 20))[0] for _ in range(2)] == ["x", "x"]
    list(store.list_objects())                  # the SDK's own request, for comparison
    gets = [r for r in emulator.requests if r.method == "GET"]
    assert [r.path for r in gets] == [f"/n/lxxxx/b/{BUCKET}/o/{name}"] * 2 + [f"/n/lxxxx/b/{BUCKET}/o"]
    signed = [verify_signature(r) for r in gets]
    assert signed[0]["headers"] == signed[2]["headers"] == "date (request-target) host"
    assert signed[0]["keyId"] == signed[2]["keyId"] and all(r.headers["if-match"] == obj.etag for r in gets[:2])
    assert "Oracle-PythonSDK" not in gets[0].headers.get("user-agent", "")   # not through the SDK's stack


def test_with_a_proxy_in_the_environment_downloads_go_through_the_sdk(emulator, oci_config, monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")    # the emulator is http: not used
    store = osa.ObjectStoreClient.from_config("lxxxx", BUCKET, config_file=str(oci_config),
                                              endpoint=emulator.endpoint)
    emulator.put(BUCKET, "a.fasta", fasta("a"))
    obj = next(store.list_objects())
    emulator.clear_requests()
    assert osa.parse_fasta(store.read_object(obj, 1 << 20))[0] == "a"
    (get,) = [r for r in emulator.requests if r.method == "GET"]
    assert get.headers["user-agent"].startswith("Oracle-PythonSDK") and verify_signature(get)


def test_a_restart_splits_its_first_listing_at_the_catalogues_names(harness, emulator, fn4, store, tmp_path):  # noqa
    """A restarted loader lists its first cycle by key ranges cut at the catalogue's file names: in parallel even
    when every name starts alike (FIRST_LISTING_SPLITS would leave them one range), and the listing is whole."""
    names = [f"sample-{i:05d}.fasta" for i in range(5200)]
    put_many(emulator, names + UNICODE)
    fn4.guids.update(dict.fromkeys(osa.guid_from_name(n) for n in names + UNICODE))
    url = f"sqlite:///{tmp_path / 'c.sqlite'}"
    harness(url=url, list_workers=4).cycle()                 # records every file as in_server
    restarted = harness(url=url, list_workers=4)
    emulator.clear_requests()
    summary = restarted.cycle()
    lists = [r for r in emulator.requests if r.method == "GET" and r.path.endswith("/o")]
    ends = {r.query.get("end") for r in lists}
    assert (summary.listed, summary.tried) == (len(names) + len(UNICODE), 0)
    assert len({end for end in ends if end and end.startswith("sample-")}) >= 4, ends
    assert len(lists) <= len(names) // osa.LIST_PAGE_SIZE + 2 * len(ends), len(lists)   # no page-one probe first
    fresh = harness(url=url, list_workers=4).loader
    fresh._refresh_from_catalogue()
    assert fresh._boundaries and listed_names(fresh._list(None)) == sequential(store)
    sequential_loader = harness(url=url, list_workers=1).loader
    assert sequential_loader._refresh_from_catalogue() and sequential_loader._boundaries == []   # page by page


def test_a_loader_reads_back_rows_of_others_not_the_rows_it_wrote(harness, emulator, fn4, store, database):  # noqa
    """After a cycle that recorded thousands of files, the next reads none of those rows back from the catalogue
    (it set each state as it queued the row), but does read a row another process wrote meanwhile."""
    url, schema = database
    names = [f"s{i:05d}.fasta" for i in range(3000)]
    put_many(emulator, names)
    fn4.guids.update(dict.fromkeys(osa.guid_from_name(n) for n in names))
    h = harness(url=url, schema=schema, list_workers=4)
    reads, counter = [], sa.create_engine(url)

    @sa.event.listens_for(h.engine, "before_cursor_execute")
    def count(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("SELECT") and "gp_int_id >" in statement:
            with counter.connect() as other:       # the rows that query returns: what the loader reads back
                reads.append(len(other.exec_driver_sql(statement, parameters).fetchall()))

    h.cycle()
    assert len(h.rows()) == 3000 and {r["outcome"] for r in h.rows()} == {"in_server"}
    other = harness(url=url, schema=schema)
    obj = next(o for o in store.list_objects() if o.name == "s00005.fasta")
    other.catalogue.record_attempt(osa.AttemptRow(
        findneighbour_server_url=fn4.url, oci_namespace=store.namespace, bucket_name=store.bucket, file_name=obj.name,
        object_etag=obj.etag, completed=1, outcome="failed", failed_attempts=0, error_text="another process"))
    assert other.catalogue.flush(30)
    reads.clear()
    for _ in range(2):
        assert h.cycle().tried == 0
    assert reads == [1, 0]                          # the other process's row, then nothing new
    assert h.loader._files.get(obj.key) == osa.FileState(True, "failed", 0)
    assert all(h.loader._files.get(o.key) == osa.FileState(True, "in_server", 0)
               for o in store.list_objects() if o.name != obj.name)
    counter.dispose()
