"""A one-minute demo that needs no cloud account: the loader's whole round trip on this machine.

    pipenv run demo          # or: pipenv run python tests/demo.py

It starts the tests' Object Storage emulator and fn4 stand-in (real HTTP servers on loopback
ports), then runs the real command line four times, printing each command before it runs:
``upload`` the sample genomes, one loader cycle (``--once``), ``list`` and ``status``. The
catalogue is a SQLite file in a temporary folder that is removed at the end. The sample genomes
are the real ones in ``../shared/data/ac587`` when that folder exists, otherwise small generated
ones. Exit code: that of ``status`` (0 when all went well).
"""
from __future__ import annotations

import gzip
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from fn4_standin import FN4StandIn  # noqa: E402
from oci_emulator import ObjectStoreEmulator, write_oci_config  # noqa: E402

NAMESPACE, BUCKET = "demo-namespace", "FN4-queue"
SHARED_GENOMES = ROOT.parent / "shared" / "data" / "ac587"


def sample_genomes(folder: Path) -> list[Path]:
    """Return the real sample genomes if they are beside the project, else write four small ones."""
    real = sorted(SHARED_GENOMES.glob("*.mfasta.gz"))
    if real:
        return real
    files = []
    for number in range(1, 5):
        seq = "".join("ACGT"[(i * 7 + number * (i // 97)) % 4] for i in range(29903))
        path = folder / f"demo-sample-{number}.fasta.gz"
        path.write_bytes(gzip.compress(f">demo-sample-{number}\n{seq}\n".encode()))
        files.append(path)
    return files


def run(args: list[str], env: dict[str, str], cwd: Path) -> int:
    shown = [a if len(a) < 70 else "…/" + Path(a).name for a in args]
    print(f"\n$ python3 objectstoreaccess.py {shlex.join(shown)}", flush=True)
    return subprocess.run([sys.executable, str(ROOT / "objectstoreaccess.py"), *args], env=env, cwd=cwd).returncode


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="fn4-demo-") as tmp, \
            ObjectStoreEmulator(namespace=NAMESPACE) as emulator, FN4StandIn() as fn4:
        folder = Path(tmp)
        emulator.create_bucket(BUCKET)
        # Only what the demo sets: a user's own FN4_* or OCI_* settings must not change it.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FN4_", "OCI_", "DB_CONNECTION"))}
        env.update(OCI_CLI_CONFIG_FILE=str(write_oci_config(folder / "oci")),
                   OCI_OBJECT_STORAGE_ENDPOINT=emulator.endpoint, FN4_LOG_LEVEL="WARNING")
        database = f"sqlite:///{folder / 'catalogue.sqlite'}"
        print(f"Object Storage emulator at {emulator.endpoint}, fn4 stand-in at {fn4.url}, "
              f"catalogue {database}")
        files = [str(p) for p in sample_genomes(folder)]
        run(["upload", NAMESPACE, BUCKET, *files], env, folder)
        run([fn4.url, NAMESPACE, BUCKET, database, "--once", "--log-level", "INFO"], env, folder)
        run(["list", fn4.url, NAMESPACE, BUCKET, database], env, folder)
        code = run(["status", database], env, folder)
        print(f"\nfn4 now holds {len(fn4.guids)} genomes; status exited {code}.")
        return code


if __name__ == "__main__":
    sys.exit(main())
