"""Soak: 1,000 files with about 10% faults of every kind, run to quiescence. Run alone: pytest -m soak."""
import gzip
import random
from collections import Counter
from datetime import timedelta

import pytest

from bad_inputs import cases
from conftest import BUCKET, T0, fasta
from fn4_standin import Scripted
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
                               "corrupt", "throttle", "deleted", "duplicate", "cut_off_always", "404_once"])
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

    h = Harness(store, fn4, f"sqlite:///{tmp_path / 'soak.sqlite'}", max_attempts=3)
    for cycle in range(30):
        summary = h.cycle()
        if summary.found == 0:
            break
    assert summary.found == 0, f"not quiescent after {cycle + 1} cycles"
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
    assert len([r for r in rows if r["insert_start_time"] is not None]) == len(fn4.inserts)
    assert len([r for r in rows if r["outcome"] == "inserted"]) == sum(accepted.values()) == len(fn4.guids)
    outcomes = Counter(latest[n]["outcome"] for n in objects)
    assert outcomes["gave_up"] == faults["500_always"] + faults["cut_off_always"]
    assert outcomes["vanished"] == faults["deleted"] and outcomes["duplicate"] == faults["duplicate"]
    assert outcomes["inserted"] == FILES - sum(faults[k] for k in (
        "bad_input", "403", "500_always", "deleted", "cut_off_always"))
