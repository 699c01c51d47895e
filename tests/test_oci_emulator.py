"""Tests of tests/oci_emulator.py, driven through the real ``oci`` SDK."""
import base64
import hashlib
import json
import os
import urllib.error
import urllib.request
from datetime import datetime, timedelta, timezone

import oci
import pytest
import urllib3
from oci._vendor.requests.exceptions import ChunkedEncodingError   # the SDK vendors its own requests

try:
    from oci_emulator import Fault, ObjectStoreEmulator, write_oci_config
except ImportError:                       # tests/ is a package or the rootdir is on sys.path
    from tests.oci_emulator import Fault, ObjectStoreEmulator, write_oci_config

NS = "lxxxx"
BUCKET = "fasta"
FIELDS = "name,size,etag,md5,timeCreated"


def md5_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


@pytest.fixture(scope="module")
def sdk_config(tmp_path_factory):
    return oci.config.from_file(str(write_oci_config(tmp_path_factory.mktemp("oci"))))


@pytest.fixture
def emu():
    with ObjectStoreEmulator(namespace=NS) as emulator:
        emulator.create_bucket(BUCKET)
        yield emulator
    assert emulator.errors == []


def make_client(emu, config, retry_strategy=None, timeout=(5, 30)):
    # The default circuit breaker is ONE process-wide breaker shared by every client; injected
    # 429/5xx faults must not trip it for the rest of the test session, hence NoCircuitBreakerStrategy.
    return oci.object_storage.ObjectStorageClient(
        config, service_endpoint=emu.endpoint, timeout=timeout,
        retry_strategy=retry_strategy or oci.retry.NoneRetryStrategy(),
        circuit_breaker_strategy=oci.circuit_breaker.NoCircuitBreakerStrategy())


@pytest.fixture
def client(emu, sdk_config):
    return make_client(emu, sdk_config)


def read_stream(response) -> bytes:
    return b"".join(response.data.raw.stream(65536, decode_content=False))


# ---- Config helper ----

def test_write_oci_config(tmp_path):
    path = write_oci_config(tmp_path, profile="LOADER")
    config = oci.config.from_file(str(path), profile_name="LOADER")
    oci.config.validate_config(config)
    assert config["region"] == "uk-london-1"
    assert os.stat(config["key_file"]).st_mode & 0o777 == 0o600
    assert write_oci_config(tmp_path / "again").read_text().count(config["fingerprint"]) == 1


# ---- Namespace and listing ----

def test_get_namespace(client):
    assert client.get_namespace().data == NS


def test_list_objects_pages_with_fields(emu, client):
    for i in range(2500):
        emu.put(BUCKET, f"seq/{i:05d}.fa", b">s%d\nACGT\n" % i)
    emu.put(BUCKET, "other/x.fa", b">x\n")
    pages, start = [], None
    while True:
        data = client.list_objects(NS, BUCKET, prefix="seq/", fields=FIELDS, limit=1000, start=start).data
        pages.append(data)
        start = data.next_start_with
        if start is None:
            break
    assert [len(p.objects) for p in pages] == [1000, 1000, 500]
    assert [p.next_start_with for p in pages] == ["seq/01000.fa", "seq/02000.fa", None]
    first = pages[0].objects[0]
    assert (first.name, first.size, first.md5) == ("seq/00000.fa", 9, md5_b64(b">s0\nACGT\n"))
    assert first.etag and isinstance(first.time_created, datetime) and first.time_modified is None
    names = [o.name for p in pages for o in p.objects]
    assert names == sorted(names) == emu.names(BUCKET)[1:]
    assert len(client.list_objects(NS, BUCKET).data.objects) == 1000       # default limit


def test_list_objects_name_only_start_end_and_delimiter(emu, client):
    for name in ["b/2.fa", "a.fa", "b/1.fa", "c.fa", "B.fa"]:
        emu.put(BUCKET, name, b"x")
    data = client.list_objects(NS, BUCKET).data
    assert [o.name for o in data.objects] == ["B.fa", "a.fa", "b/1.fa", "b/2.fa", "c.fa"]
    assert data.objects[0].size is None and data.objects[0].etag is None and data.prefixes == []
    ranged = client.list_objects(NS, BUCKET, start="a.fa", end="b/2.fa").data
    assert [o.name for o in ranged.objects] == ["a.fa", "b/1.fa"]
    folded = client.list_objects(NS, BUCKET, delimiter="/").data
    assert ([o.name for o in folded.objects], folded.prefixes) == (["B.fa", "a.fa", "c.fa"], ["b/"])


def test_list_wire_format(emu):
    created = datetime(2026, 11, 29, 17, 1, 2, 345678, tzinfo=timezone.utc)
    etag = emu.put(BUCKET, "x.fa", b"ACGT", time_created=created)
    request = urllib.request.Request(f"{emu.endpoint}/n/{NS}/b/{BUCKET}/o?fields=name,timeCreated,md5,etag",
                                     headers={"Authorization": "Signature test"})
    with urllib.request.urlopen(request) as response:
        body = json.loads(response.read())
        assert response.headers["opc-request-id"]
    assert body == {"objects": [{"name": "x.fa", "timeCreated": "2026-11-29T17:01:02.345Z",
                                 "md5": md5_b64(b"ACGT"), "etag": etag}], "prefixes": []}


def test_missing_bucket_and_authorization(emu, client):
    with pytest.raises(oci.exceptions.ServiceError) as info:
        client.list_objects(NS, "nope")
    assert (info.value.status, info.value.code) == (404, "BucketNotFound")
    with pytest.raises(urllib.error.HTTPError) as unsigned:
        urllib.request.urlopen(f"{emu.endpoint}/n/{NS}/b/{BUCKET}/o")
    assert unsigned.value.code == 401


# ---- Objects ----

def test_get_object_stream_and_content(emu, client):
    data = os.urandom(300_000)
    etag = emu.put(BUCKET, "big.fa", data)
    response = client.get_object(NS, BUCKET, "big.fa")
    assert response.headers["etag"] == etag
    assert response.headers["content-md5"] == md5_b64(data)
    assert int(response.headers["content-length"]) == len(data)
    assert response.headers["content-type"] == "application/octet-stream"
    assert response.headers["last-modified"] and response.headers["opc-request-id"]
    assert read_stream(response) == data
    assert client.get_object(NS, BUCKET, "big.fa").data.content == data
    partial = client.get_object(NS, BUCKET, "big.fa", range="bytes=10-19")
    assert (partial.status, partial.data.content) == (206, data[10:20])


def test_get_object_conditions_and_missing(emu, client):
    etag = emu.put(BUCKET, "x.fa", b"ACGT")
    assert client.get_object(NS, BUCKET, "x.fa", if_match=etag).data.content == b"ACGT"
    with pytest.raises(oci.exceptions.ServiceError) as info:
        client.get_object(NS, BUCKET, "x.fa", if_match="stale")
    assert (info.value.status, info.value.code) == (412, "IfMatchFailed")
    with pytest.raises(oci.exceptions.ServiceError) as info:
        client.get_object(NS, BUCKET, "missing.fa")
    assert (info.value.status, info.value.code) == (404, "ObjectNotFound")


def test_head_object(emu, client):
    etag = emu.put(BUCKET, "x.fa", b">x\nACGT\n")
    response = client.head_object(NS, BUCKET, "x.fa")
    assert response.status == 200
    assert (response.headers["etag"], response.headers["content-length"]) == (etag, "8")
    assert response.headers["content-md5"] == md5_b64(b">x\nACGT\n")
    with pytest.raises(oci.exceptions.ServiceError) as info:
        client.head_object(NS, BUCKET, "missing.fa")
    assert info.value.status == 404
    assert client.get_namespace().data == NS                 # connection still in sync after HEAD


def test_put_if_none_match_twice(emu, client):
    first = client.put_object(NS, BUCKET, "x.fa", b"one", if_none_match="*")
    assert first.status == 200 and first.headers["content-md5"] == md5_b64(b"one")
    with pytest.raises(oci.exceptions.ServiceError) as info:
        client.put_object(NS, BUCKET, "x.fa", b"two", if_none_match="*")
    assert (info.value.status, info.value.code) == (412, "IfNoneMatchFailed")
    assert emu.get(BUCKET, "x.fa") == b"one"
    assert emu.requests[-1].headers["if-none-match"] == "*"


def test_put_if_match_and_etag_changes(emu, client):
    etag = emu.put(BUCKET, "x.fa", b"one")
    with pytest.raises(oci.exceptions.ServiceError) as info:
        client.put_object(NS, BUCKET, "x.fa", b"two", if_match="stale")
    assert (info.value.status, info.value.code) == (412, "IfMatchFailed")
    new_etag = client.put_object(NS, BUCKET, "x.fa", b"two", if_match=etag).headers["etag"]
    assert new_etag != etag and emu.get(BUCKET, "x.fa") == b"two"


def test_delete_object(emu, client):
    emu.put(BUCKET, "x.fa", b"ACGT")
    assert client.delete_object(NS, BUCKET, "x.fa").status == 204
    assert emu.names(BUCKET) == []
    with pytest.raises(oci.exceptions.ServiceError) as info:
        client.delete_object(NS, BUCKET, "x.fa")
    assert (info.value.status, info.value.code) == (404, "ObjectNotFound")


def test_rename_object(emu, client):
    Rename = oci.object_storage.models.RenameObjectDetails
    etag = emu.put(BUCKET, "in/x.fa", b"ACGT")
    emu.put(BUCKET, "done/y.fa", b"old")
    stale_source = Rename(source_name="in/x.fa", new_name="done/x.fa", src_obj_if_match_e_tag="stale")
    existing_target = Rename(source_name="in/x.fa", new_name="done/y.fa", new_obj_if_none_match_e_tag="*")
    for details, code in [(stale_source, "IfMatchFailed"), (existing_target, "IfNoneMatchFailed")]:
        with pytest.raises(oci.exceptions.ServiceError) as info:
            client.rename_object(NS, BUCKET, details)
        assert (info.value.status, info.value.code) == (412, code)
    details = Rename(source_name="in/x.fa", new_name="done/x.fa", src_obj_if_match_e_tag=etag,
                     new_obj_if_none_match_e_tag="*")
    assert client.rename_object(NS, BUCKET, details).status == 200
    assert emu.names(BUCKET) == ["done/x.fa", "done/y.fa"] and emu.get(BUCKET, "done/x.fa") == b"ACGT"


@pytest.mark.parametrize("name", ["dir/sub dir/gène 1.fa", "日本/配列.fasta", "plus+and%20pct.fa",
                                  "q?hash#semi;.fa", "trailing space .fa"])
def test_unusual_names_round_trip(emu, client, name):
    client.put_object(NS, BUCKET, name, b">s\nACGT\n")
    assert emu.names(BUCKET) == [name]
    assert [o.name for o in client.list_objects(NS, BUCKET).data.objects] == [name]
    assert [o.name for o in client.list_objects(NS, BUCKET, prefix=name[:-3]).data.objects] == [name]
    assert client.get_object(NS, BUCKET, name).data.content == b">s\nACGT\n"
    assert client.head_object(NS, BUCKET, name).status == 200
    client.delete_object(NS, BUCKET, name)
    assert emu.names(BUCKET) == []


# ---- Fault injection ----

@pytest.mark.parametrize("status, code", [(429, "TooManyRequests"), (503, "ServiceUnavailable"),
                                          (500, "InternalServerError")])
def test_status_fault(emu, client, status, code):
    emu.put(BUCKET, "x.fa", b"ACGT")
    emu.add_fault(Fault(method="GET", path_contains="x.fa", status=status))
    with pytest.raises(oci.exceptions.ServiceError) as info:
        client.get_object(NS, BUCKET, "x.fa")
    assert (info.value.status, info.value.code) == (status, code)
    assert client.get_object(NS, BUCKET, "x.fa").data.content == b"ACGT"      # consumed
    assert [(r.status, r.fault) for r in emu.requests] == [(status, "status"), (200, "")]


def test_fault_matching_and_times(emu, client):
    emu.put(BUCKET, "a.fa", b"A")
    emu.put(BUCKET, "b.fa", b"B")
    emu.add_fault(Fault(method="PUT", status=503, times=-1))
    emu.add_fault(Fault(path_contains="b.fa", status=500, times=2))
    assert client.get_object(NS, BUCKET, "a.fa").data.content == b"A"
    for _ in range(2):
        with pytest.raises(oci.exceptions.ServiceError):
            client.head_object(NS, BUCKET, "b.fa")
    assert client.get_object(NS, BUCKET, "b.fa").data.content == b"B"
    for _ in range(3):
        with pytest.raises(oci.exceptions.ServiceError):
            client.put_object(NS, BUCKET, "c.fa", b"C")
    emu.clear_faults()
    client.put_object(NS, BUCKET, "c.fa", b"C")
    assert emu.names(BUCKET) == ["a.fa", "b.fa", "c.fa"]
    with pytest.raises(ValueError):
        emu.add_fault(Fault(kind="explode"))


def test_drop_fault(emu, client):
    emu.put(BUCKET, "x.fa", b"ACGT")
    emu.add_fault(Fault(kind="drop"))
    with pytest.raises(oci.exceptions.RequestException):
        client.get_object(NS, BUCKET, "x.fa")
    assert emu.requests[-1].status == 0 and emu.requests[-1].fault == "drop"
    assert client.get_object(NS, BUCKET, "x.fa").data.content == b"ACGT"


def test_truncate_fault(emu, client):
    data = os.urandom(200_000)
    emu.put(BUCKET, "x.fa", data)
    emu.add_fault(Fault(kind="truncate", fraction=0.25, times=2))
    response = client.get_object(NS, BUCKET, "x.fa")
    assert int(response.headers["content-length"]) == len(data)
    with pytest.raises(urllib3.exceptions.ProtocolError):
        read_stream(response)
    with pytest.raises(ChunkedEncodingError):
        client.get_object(NS, BUCKET, "x.fa").data.content
    assert read_stream(client.get_object(NS, BUCKET, "x.fa")) == data


def test_corrupt_fault(emu, client):
    data = b">s\n" + b"ACGT" * 1000
    emu.put(BUCKET, "x.fa", data)
    emu.add_fault(Fault(kind="corrupt"))
    response = client.get_object(NS, BUCKET, "x.fa")
    body = read_stream(response)
    assert len(body) == len(data) and body != data
    assert response.headers["content-md5"] == md5_b64(data) != md5_b64(body)


def test_delay_fault_is_served(emu, client):
    emu.add_fault(Fault(kind="delay", delay=0.05))
    assert client.get_namespace().data == NS
    assert [(r.path, r.status, r.fault) for r in emu.requests] == [("/n", 200, "delay")]


def test_delay_fault_beyond_read_timeout(emu, sdk_config):
    emu.add_fault(Fault(kind="delay", delay=30))        # emulator.stop() cuts the wait short
    impatient = make_client(emu, sdk_config, timeout=(5, 0.2))
    with pytest.raises(oci.exceptions.RequestException):
        impatient.get_namespace()


# ---- SDK retries ----

def fast_retry_strategy():
    return oci.retry.RetryStrategyBuilder(
        max_attempts_check=True, max_attempts=3,
        total_elapsed_time_check=True, total_elapsed_time_seconds=30,
        service_error_check=True, service_error_retry_on_any_5xx=True,
        retry_base_sleep_time_seconds=0, decorrelated_jitter=0,
        retry_max_wait_between_calls_seconds=0).get_retry_strategy()


@pytest.mark.parametrize("fault", [Fault(status=503), Fault(status=429), Fault(kind="drop")])
def test_retry_strategy_retries_through_one_fault(emu, sdk_config, fault):
    emu.put(BUCKET, "x.fa", b"ACGT")
    emu.add_fault(fault)
    retrying = make_client(emu, sdk_config, retry_strategy=fast_retry_strategy())
    start = datetime.now(timezone.utc)
    assert retrying.get_object(NS, BUCKET, "x.fa").data.content == b"ACGT"
    assert [r.status for r in emu.requests] == [fault.status if fault.kind == "status" else 0, 200]
    assert datetime.now(timezone.utc) - start < timedelta(seconds=2)


# ---- Listing at scale: sorted index, page latency ----

def _expected_names(names, prefix="", start="", end=None, start_after=None):
    """What a listing covers, worked out by brute force over every name."""
    return [n for n in sorted(names) if n.startswith(prefix) and n >= start and (end is None or n < end)
            and (start_after is None or n > start_after)]


def test_sorted_index_follows_every_write(emu, client):
    Rename = oci.object_storage.models.RenameObjectDetails
    emu.put_many(BUCKET, ((f"s/{i:04d}.fa", b"x", None) for i in range(0, 300, 3)))
    client.put_object(NS, BUCKET, "s/0001.fa", b"y")                      # new name through HTTP
    emu.put(BUCKET, "日本/配列.fasta", b"z")                                 # new name, unicode
    emu.put(BUCKET, "s/0003.fa", b"replaced")                              # same name again
    client.delete_object(NS, BUCKET, "s/0006.fa")
    emu.delete(BUCKET, "s/0009.fa")
    client.rename_object(NS, BUCKET, Rename(source_name="s/0012.fa", new_name="done/s/0012.fa"))
    names = set(emu._buckets[BUCKET])
    assert emu.names(BUCKET) == sorted(names)
    cases = [{}, {"prefix": "s/"}, {"start": "s/0100.fa"}, {"end": "s/0100.fa"}, {"start": "s/01", "end": "s/02"},
             {"start": "t", "end": "u"}, {"prefix": "s/", "start": "a", "end": "s/0020.fa"},
             {"start_after": "s/0003.fa", "end": "s/0030.fa"}]
    for case in cases:
        listed, start = [], case.get("start")
        while True:
            page = client.list_objects(NS, BUCKET, prefix=case.get("prefix"), start=start, end=case.get("end"),
                                       start_after=case.get("start_after"), limit=7).data
            listed += [o.name for o in page.objects]
            start = page.next_start_with
            if start is None:
                break
        assert listed == _expected_names(names, **case), case


def test_page_entries_change_with_their_object(emu, client):
    emu.put(BUCKET, "a.fa", b"one")
    first = client.list_objects(NS, BUCKET, fields=FIELDS).data.objects[0]
    etag = emu.put(BUCKET, "a.fa", b"second")
    again = client.list_objects(NS, BUCKET, fields=FIELDS).data.objects[0]
    assert (again.etag, again.size, again.md5) == (etag, 6, md5_b64(b"second")) != (first.etag, 3, first.md5)


def test_list_latency_delays_each_page_and_pages_overlap(emu, sdk_config):
    import threading
    import time
    emu.put_many(BUCKET, ((f"{i:03d}.fa", b"x", None) for i in range(8)))
    emu.list_latency = 0.4
    pages_before = emu.list_pages
    clients = [make_client(emu, sdk_config) for _ in range(4)]
    started = time.perf_counter()
    assert len(clients[0].list_objects(NS, BUCKET).data.objects) == 8
    alone = time.perf_counter() - started
    results = []
    threads = [threading.Thread(target=lambda c=c: results.append(len(c.list_objects(NS, BUCKET).data.objects)))
               for c in clients]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    together = time.perf_counter() - started
    assert alone >= 0.4 and together >= 0.4 and results == [8] * 4
    assert together < 4 * 0.4 + 0.4          # four pages at once overlap: well below four in a row
    assert emu.list_pages - pages_before == 5


def test_list_objects_start_is_inclusive_and_end_exclusive_across_pages(emu, client):
    """As on OCI: names >= start and < end, in code point (UTF-8) order, paged with nextStartWith inside the range."""
    names = ["arch.fasta", "arch/", "arch/a.fasta", "arch/\u00fc.fasta", "arch/\U0001f600.fasta", "arch0",
             "arch0.fasta", "arch_1.fasta", "archa1.fasta", "\u00e4rch.fasta"]
    for name in names:
        emu.put(BUCKET, name, b"x")
    got, start = [], "arch/"
    while start:
        page = client.list_objects(NS, BUCKET, start=start, end="arch0", limit=2).data
        got += [o.name for o in page.objects]
        start = page.next_start_with
    assert got == ["arch/", "arch/a.fasta", "arch/\u00fc.fasta", "arch/\U0001f600.fasta"]
    below = client.list_objects(NS, BUCKET, end="arch/").data.objects
    above = client.list_objects(NS, BUCKET, start="arch0").data.objects
    assert [o.name for o in below] == ["arch.fasta"]
    assert [o.name for o in above] == ["arch0", "arch0.fasta", "arch_1.fasta", "archa1.fasta", "\u00e4rch.fasta"]
