"""The bad-input corpus: files a pipeline might drop in the bucket, with what the loader must record.

Each case is (object name, content, expected outcome, expected parse_status, words the recorded
reason must contain). Content is built here rather than stored, so the gzip bomb stays small in git.
"""
import gzip
import random
import zlib

GENOME = b"ACGTNRYKM-" * 30  # 300 bases of the fn4 alphabet


def _bomb(size: int = 80 * 2**20) -> bytes:
    """Return a gzip file of ``size`` zero bytes: tiny compressed, huge decompressed."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = b"\0" * 2**20
    return b"".join([*(compressor.compress(block) for _ in range(size // len(block))), compressor.flush()])


def _noise(size: int = 3 * 2**19) -> bytes:
    """Return ``size`` bytes that do not compress, so a gzip file holding them is over 1 MiB."""
    return random.Random(1048576).randbytes(size)


def _big_bomb(max_object_bytes: int) -> bytes:
    """Return a gzip file over 1 MiB compressed whose first MiB already inflates beyond ``max_object_bytes``."""
    return _bomb(max(80 * 2**20, max_object_bytes + 2**20)) + gzip.compress(_noise(), 1)


def cases(max_object_bytes: int = 64 * 2**20) -> list[tuple[str, bytes, str, str, str]]:
    """Return the corpus; ``max_object_bytes`` is the limit the loader under test runs with."""
    good = b">sample-1 a good one\n" + GENOME + b"\n"
    return [
        ("empty.fasta", b"", "failed", "empty", "empty"),
        ("empty-gz.fasta.gz", b"", "failed", "empty", "empty"),
        ("empty-member.fasta.gz", gzip.compress(b""), "failed", "empty", "empty"),
        ("corrupt.fasta.gz", gzip.compress(good)[:12] + b"\xff" * 40, "failed", "corrupt_gzip", "gzip"),
        ("truncated-gzip.fasta.gz", gzip.compress(good * 50)[:-30], "failed", "corrupt_gzip", "truncated"),
        ("bomb.fasta.gz", _bomb(max(80 * 2**20, max_object_bytes + 2**20)), "failed", "too_large", "limit"),
        # over 1 MiB compressed, so the verdict comes before the whole object is read
        ("big-bomb.fasta.gz", _big_bomb(max_object_bytes), "failed", "too_large", "limit"),
        ("big-corrupt.fasta.gz", gzip.compress(good)[:12] + b"\xff" * 40 + _noise(), "failed", "corrupt_gzip",
         "corrupt"),
        ("no-header.fasta", GENOME + b"\n", "failed", "no_header", "header"),
        ("header-only.fasta", b">lonely header\n", "failed", "no_sequence", "no sequence"),
        ("two-records.fasta", good + b">second\n" + GENOME + b"\n", "failed", "multiple_records", "2 records"),
        ("junk.fasta", bytes(range(256)) * 4, "failed", "no_header", "header"),
        ("junk-after-header.fa", b">x\n\x00\x01\xfe\xffACGT\n", "failed", "bad_characters", "refuses"),
        ("not-iupac.fasta", b">x\nACGTUXACGT\n", "failed", "bad_characters", "'U', 'X'"),
        ("spaces-in-seq.fasta", b">x\nACGT ACGT\n", "failed", "bad_characters", "' '"),
        (("g" * 60) + ".fasta", good, "failed", "failed", "60 or more"),
        ("unsafe#guid.fasta", good, "failed", "failed", "unsafe in a URL"),
        ("dir with space/naïve name.fasta", good, "failed", "failed", "unsafe in a URL"),
    ]
