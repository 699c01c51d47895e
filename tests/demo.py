"""A one-minute demo that needs no cloud account: the loader's whole round trip on this machine.

    pipenv run demo          # or: pipenv run python tests/demo.py
    pipenv run demo --serve  # keep the stand-ins running, to try README's commands by hand

It starts the tests' Object Storage emulator and fn4 stand-in (real HTTP servers on loopback
ports), then runs the real command line four times, printing each command before it runs:
``upload`` the sample genomes, one loader cycle (``--once``), ``list`` and ``status``. The
catalogue is a SQLite file in a temporary folder that is removed at the end. The sample genomes
are the real ones in ``../shared/data/ac587`` when that folder exists, otherwise small generated
ones. Exit code: that of ``status`` (0 when all went well).

With ``--serve`` it runs nothing itself: it starts the same two servers (the fn4 stand-in on
``--port``, 5025 unless told, so README's ``http://localhost:5025`` reaches it; namespace ``lxxxx``,
bucket ``FN4-queue``), writes a throwaway OCI config, a ``databases.json`` whose ``unittest_oracle``
entry is a SQLite catalogue, eight sample genomes under ``run42/`` and a link to the module, prints
the ``export`` lines README's commands need and a ``cd`` into that folder (so README's relative paths
work), and serves until Ctrl-C or SIGTERM, then removes its folder and exits 0.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
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
    return generated_genomes(folder, "demo-sample", 4)


def generated_genomes(folder: Path, stem: str, count: int) -> list[Path]:
    """Write count small SARS-CoV-2-sized genomes, folder/stem-1.fasta.gz and so on; return their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for number in range(1, count + 1):
        seq = "".join("ACGT"[(i * 7 + number * (i // 97)) % 4] for i in range(29903))
        path = folder / f"{stem}-{number}.fasta.gz"
        path.write_bytes(gzip.compress(f">{stem}-{number}\n{seq}\n".encode()))
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


SERVE_NAMESPACE, SERVE_DATABASE_KEY = "lxxxx", "unittest_oracle"  # the names README's commands use
SERVING = "# serving until Ctrl-C"  # the last line printed at start; a script can wait for it


def serve(port: int) -> int:
    """Start the stand-ins, print the export lines README's commands need, and serve until SIGINT or SIGTERM."""
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    with tempfile.TemporaryDirectory(prefix="fn4-demo-") as tmp, \
            ObjectStoreEmulator(namespace=SERVE_NAMESPACE) as emulator, FN4StandIn(port=port) as fn4:
        folder = Path(tmp)
        emulator.create_bucket(BUCKET)
        generated_genomes(folder / "run42", "sample", 8)
        (folder / "objectstoreaccess.py").symlink_to(ROOT / "objectstoreaccess.py")
        databases = folder / "databases.json"
        databases.write_text(json.dumps({SERVE_DATABASE_KEY: {
            "DBTYPE": "sqlite", "ENGINE_NAME": f"sqlite:///{folder / 'catalogue.sqlite'}"}}))
        url = f"http://localhost:{fn4.port}"
        exports = {"OCI_CLI_CONFIG_FILE": write_oci_config(folder / "oci"),
                   "OCI_OBJECT_STORAGE_ENDPOINT": emulator.endpoint, "DB_CONNECTION_CONFIG_FILE": databases,
                   "FN4_URL": url, "OCI_NAMESPACE": SERVE_NAMESPACE, "OCI_BUCKET": BUCKET,
                   "FN4_DATABASE": SERVE_DATABASE_KEY, "PIPENV_PIPFILE": ROOT / "Pipfile", "DEMO_DIR": folder}
        print(f"# Object Storage emulator at {emulator.endpoint} (namespace {SERVE_NAMESPACE}, bucket {BUCKET}), "
              f"fn4 stand-in at {url}, catalogue {SERVE_DATABASE_KEY} = {folder / 'catalogue.sqlite'}")
        print("# In another terminal paste these lines, then README's commands run as written "
              "(run42/ holds sample genomes):")
        for name, value in exports.items():
            print(f"export {name}={shlex.quote(str(value))}")
        print('cd "$DEMO_DIR"')
        print(SERVING, flush=True)
        while not stop.wait(1.0):
            pass
    print("# stopped; demo folder removed", flush=True)
    return 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pipenv run demo", description=__doc__.split("\n", 1)[0])
    parser.add_argument("--serve", action="store_true",
                        help="start the stand-ins, print the export lines README's commands need, serve until Ctrl-C")
    parser.add_argument("--port", type=int, default=5025,
                        help="with --serve: the fn4 stand-in's port on 127.0.0.1 (default 5025; 0: any free port)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = parse_args(sys.argv[1:])
    sys.exit(serve(args.port) if args.serve else main())
