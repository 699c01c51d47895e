"""Soak: 1,000 files with about 10% faults of every kind, run to quiescence. Run alone: pytest -m soak."""
import gzip
import random
from collections import Counter
from datetime import timedelta

import pytest

from bad_inputs import cases
from conftest import BUCKET, T0, fasta
from fn4_standin import DATABASE_UNREACHABLE, Scripted
from oci_emulator import Fault
from test_faults import Harness

FILES = 1000


@pytest.mark.soak
def test_every_file_ends_loaded_or_finished_with_a_reason(store, emulator, fn4, tmp_path):
    rng = random.Random(20261129)
    bad = [c for c in cases() if c[0] != "bomb.fasta.gz"]
    faults = Counter()
    for i in range(FILES):
        guid = f"soak-{i:04d}"
        name = f"run{i % 7}/{guid}.fasta" + (".gz" if i % 2 else "")
        data = fasta(guid, length=200 + i % 50, seed=i)
        roll = rng.random()
        kind = None
        if roll < 0.10:
            kind = rng.choice(["bad_input", "403", "500_once", "500_always", "drop", "409", "truncate",
                               "corrupt", "throttle", "deleted", "duplicate", "cut_off_always",
                               "500_database", "429", "408", "wrong_length", "slow_download", "404_once"])
            faults[kind] += 1
        if kind == "bad_input":
            bad_name, data, *_ = rng.choice(bad)
            name = f"bad/{i:04d}-{bad_name}"
        elif kind == "403":
            fn4.script(Scripted(status=403, guid=guid))
        elif kind == "500_once":
            fn4.script(Scripted(status=500, guid=guid))
        elif kind == "500_always":
            fn4.script(Scripted(status=500, guid=guid, times=-1))
        elif kind == "drop":
            fn4.script(Scripted(drop=True, guid=guid))
        elif kind == "409":
            fn4.script(Scripted(status=409, guid=guid, times=2))
        elif kind == "500_database":  # fn4's own database is down: an outage, never a strike
            fn4.script(Scripted(status=500, guid=guid, text=DATABASE_UNREACHABLE, times=2))
        elif kind in ("429", "408"):
            fn4.script(Scripted(status=int(kind), guid=guid, times=2 if kind == "429" else 1,
                                headers={"Retry-After": "30"}))
        elif kind == "wrong_length":
            fn4.script(Scripted(status=500, guid=guid, text="sequence must of the same length as reference; "
                                                            "seq is 230 and ref is 29903"))
        elif kind == "slow_download":  # longer than fn4's idle timeout: the kept-alive connection is closed
            emulator.add_fault(Fault(method="GET", path_contains=f"/{guid}.", kind="delay", delay=0.15))
        elif kind in ("truncate", "corrupt"):
            emulator.add_fault(Fault(method="GET", path_contains=f"/{guid}.", kind=kind, times=1))
        elif kind == "cut_off_always":
            emulator.add_fault(Fault(method="GET", path_contains=f"/{guid}.", kind="truncate", times=-1))
        elif kind == "throttle":
            emulator.add_fault(Fault(method="GET", path_contains=f"/{guid}.", kind="status", status=429, times=2))
        elif kind == "deleted":  # deleted between listing and download
            emulator.add_fault(Fault(method="GET", path_contains=f"/{guid}.", kind="delete"))
        elif kind == "404_once":  # a transient 404 on the download: read again, not vanished
            emulator.add_fault(Fault(method="GET", path_contains=f"/{guid}.", kind="status", status=404))
        elif kind == "duplicate":
            emulator.put(BUCKET, f"copies/{guid}.fa", data, time_created=T0 + timedelta(days=1, seconds=i))
        emulator.put(BUCKET, name, gzip.compress(data) if name.endswith(".gz") and kind != "bad_input" else data,
                     time_created=T0 + timedelta(seconds=i))
    assert sum(faults.values()) >= 80

    fn4.idle_timeout = 0.1  # like gunicorn's async workers (2 s), scaled down: idle kept-alive connections close
    h = Harness(store, fn4, f"sqlite:///{tmp_path / 'soak.sqlite'}", max_attempts=3)
    for cycle in range(150):  # each 409, 429, 408 and database 500 pauses a batch once or twice
        summary = h.cycle()
        if summary.tried == 0:
            break
    assert summary.tried == 0, f"not quiescent after {cycle + 1} cycles"
    h.close()

    objects = emulator.names(BUCKET)
    assert len(objects) == FILES + faults["duplicate"] - faults["deleted"]
    latest = h.latest()
    objects += [name for name, row in latest.items() if row["outcome"] == "vanished"]
    for name in objects:
        row = latest[name]
        assert row["completed"] == 1, (name, row)
        if row["outcome"] in ("inserted", "already_present", "in_server"):
            assert fn4.guids.get(row["fn4id"]), name
        else:
            assert row["error_text"], name
    accepted = Counter(i.guid for i in fn4.inserts if i.status == 200)
    assert max(accepted.values()) == 1, "a guid was inserted twice"
    rows = h.rows()
    # Every insert fn4 answered has its row; an insert cut off without an answer on a kept-alive connection is
    # sent once more at once, so its one row stands for both.
    received = Counter(i.guid for i in fn4.inserts)
    answered = Counter(i.guid for i in fn4.inserts if i.status)
    with_insert = Counter(r["fn4id"] for r in rows if r["insert_start_time"] is not None)
    assert set(with_insert) == set(received)
    assert all(answered[g] <= with_insert[g] <= received[g] for g in received), "catalogue rows differ from fn4's"
    assert sum(received.values()) - sum(with_insert.values()) <= faults["drop"]
    assert len([r for r in rows if r["outcome"] == "inserted"]) == sum(accepted.values()) == len(fn4.guids)
    outcomes = Counter(latest[n]["outcome"] for n in objects)
    assert outcomes["gave_up"] == faults["500_always"] + faults["cut_off_always"]
    assert outcomes["vanished"] == faults["deleted"] and outcomes["duplicate"] == faults["duplicate"]
    assert outcomes["inserted"] == FILES - sum(faults[k] for k in (
        "bad_input", "403", "500_always", "deleted", "cut_off_always", "wrong_length"))
    busy = Counter(r["fn4id"] for r in rows if r["outcome"] in ("server_busy", "server_unavailable"))
    assert all(r["failed_attempts"] == 0 for r in rows if r["outcome"] in ("server_busy", "server_unavailable"))
    assert sum(busy.values()) >= 2 * faults["409"] + 2 * faults["500_database"] + 2 * faults["429"] + faults["408"]
    assert fn4.connections_accepted > 1  # idle connections really were closed under the loader
