"""Object Storage answers to a download: only a confirmed deletion or replacement finishes a file as vanished."""
from datetime import timedelta

import pytest
from click.testing import CliRunner

import objectstoreaccess as osa
from conftest import BUCKET, NAMESPACE, T0, fasta
from oci_emulator import Fault
from test_faults import Harness


@pytest.fixture
def harness(store, fn4, tmp_path):
    made = []

    def make(**settings):
        made.append(Harness(store, fn4, f"sqlite:///{tmp_path / 'c.sqlite'}", **settings))
        return made[-1]

    yield make
    for h in made:
        h.stop.set()
        h.close()


def put_all(emulator, names):
    for i, name in enumerate(names):
        emulator.put(BUCKET, name, fasta(name.split(".")[0]), time_created=T0 + timedelta(seconds=i))


@pytest.mark.parametrize("status", [404, 412])
def test_one_transient_404_or_412_on_a_download_is_read_again_not_vanished(harness, emulator, fn4, status):
    put_all(emulator, ["a.fasta", "b.fasta"])
    emulator.add_fault(Fault(method="GET", path_contains="a.fasta", kind="status", status=status, times=1))
    h = harness()
    h.cycle()
    assert sorted(fn4.guids) == ["a", "b"]
    assert [(r["file_name"], r["outcome"], r["completed"]) for r in h.rows()] == [
        ("a.fasta", "inserted", 1), ("b.fasta", "inserted", 1)]
    gets = [r.status for r in emulator.requests if r.method == "GET" and r.path.endswith("/a.fasta")]
    assert gets == [status, 200]


def test_a_404_while_the_object_is_still_listed_is_a_retry_then_loads(harness, emulator, fn4):
    put_all(emulator, ["a.fasta", "b.fasta"])
    fault = Fault(method="GET", path_contains="a.fasta", kind="status", status=404, times=osa.DOWNLOAD_TRIES)
    emulator.add_fault(fault)
    h = harness(max_attempts=3)
    h.cycle()
    row = h.latest()["a.fasta"]
    assert (row["outcome"], row["completed"], row["failed_attempts"]) == ("retry", 0, 1)
    assert row["parse_status"] == "download_failed" and "still listed" in row["error_text"]
    h.cycle()
    assert h.latest()["a.fasta"]["outcome"] == "inserted" and sorted(fn4.guids) == ["a", "b"]


@pytest.mark.parametrize("change", ["delete", "replace"])
def test_an_object_deleted_or_replaced_after_listing_is_vanished(harness, emulator, fn4, change):
    put_all(emulator, ["a.fasta", "b.fasta"])
    emulator.add_fault(Fault(method="GET", path_contains="a.fasta", kind=change, times=1))
    h = harness()
    h.cycle()
    row = h.latest()["a.fasta"]
    assert (row["outcome"], row["completed"]) == ("vanished", 1)
    assert ("deleted" if change == "delete" else "replaced") in row["error_text"]
    assert list(fn4.guids) == ["b"]
    h.cycle()  # a replaced object is a new file: its new version loads
    assert sorted(fn4.guids) == (["a", "b"] if change == "replace" else ["b"])


def test_retry_failed_requeues_vanished_files(harness, emulator, fn4, tmp_path):
    put_all(emulator, ["a.fasta"])
    emulator.add_fault(Fault(method="GET", path_contains="a.fasta", kind="delete", times=1))
    h = harness()
    h.cycle()
    assert h.latest()["a.fasta"]["outcome"] == "vanished"
    result = CliRunner().invoke(osa.main, ["retry-failed", fn4.url, NAMESPACE, BUCKET,
                                           f"sqlite:///{tmp_path / 'c.sqlite'}"])
    assert result.exit_code == 0 and "re-queued 1 file(s)" in result.output, result.output
    assert [r["outcome"] for r in h.rows()] == ["vanished", "requeued"]
