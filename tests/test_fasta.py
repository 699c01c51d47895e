"""The pure helpers: FASTA names and guids, decompression, parsing, backoff, redaction."""
import gzip
import zlib

import pytest

import objectstoreaccess as osa
from bad_inputs import GENOME, cases


@pytest.mark.parametrize("name, guid", [
    ("abc.fasta", "abc"), ("sub/dir/abc.mfasta.gz", "abc"), ("x.FA", "x"), ("x.fas.gz", "x"),
    ("x.fna", "x"), ("a.b.fasta", "a.b"), ("01ada54a-e908.mfasta.gz", "01ada54a-e908"),
])
def test_guid_is_the_base_name_without_fasta_endings(name, guid):
    assert osa.fasta_suffix(name)
    assert osa.guid_from_name(name) == guid


@pytest.mark.parametrize("name", ["x.txt", "x.gz", "x.fasta.zip", "fasta", "x.fastq.gz", "dir.fasta/readme"])
def test_other_names_are_not_fasta(name):
    assert osa.fasta_suffix(name) is None


@pytest.mark.parametrize("guid, ok", [
    ("01ada54a-e908-4431-ae32-7704a732f325", True), ("a" * 59, True), ("a" * 60, False),
    ("", False), ("a b", False), ("a/b", False), ("a?b", False), ("a#b", False), ("a%b", False),
    ("naïve", False), ("a\tb", False), ("S.1_x-2", True),
])
def test_guid_rules_match_what_fn4_can_address(guid, ok):
    assert (osa.guid_problem(guid) is None) is ok


def test_parse_accepts_multiline_mixed_case_crlf():
    data = b">id1 some description\r\nacgt\r\nNNRY\r\n-kmB\r\n\r\n"
    assert osa.parse_fasta(data) == ("id1", b"ACGTNNRY-KMB")


def test_parse_accepts_no_trailing_newline_and_reports_first_word():
    assert osa.parse_fasta(b">x\tdesc\nACGT") == ("x", b"ACGT")


@pytest.mark.parametrize("name, data, _outcome, status, words", [
    c for c in cases() if c[3] in ("empty", "no_header", "no_sequence", "multiple_records", "bad_characters")
    and c[1][:2] != b"\x1f\x8b" and c[1]])
def test_parse_rejects_bad_files_with_a_reason(name, data, _outcome, status, words):
    with pytest.raises(osa.SampleError) as caught:
        osa.parse_fasta(data)
    assert caught.value.status == status
    assert words in caught.value.reason


def test_bad_character_reason_names_the_characters_and_position():
    with pytest.raises(osa.SampleError, match=r"'U', 'X' \(first at base 5\)"):
        osa.parse_fasta(b">x\nACGTUXACGT\n")


def chunked(data, size=7):
    return (data[i:i + size] for i in range(0, len(data), size))


def test_inflate_detects_gzip_by_magic_not_name():
    text = b">x\n" + GENOME
    assert osa.inflate(chunked(gzip.compress(text)), 10_000) == text
    assert osa.inflate(chunked(text), 10_000) == text


def test_inflate_reads_concatenated_gzip_members():
    assert osa.inflate(chunked(gzip.compress(b">x\nAC") + gzip.compress(b"GT\n")), 100) == b">x\nACGT\n"


def test_inflate_caps_a_gzip_bomb_without_inflating_it_all():
    bomb = zlib.compressobj(9, zlib.DEFLATED, 31)
    data = bomb.compress(b"\0" * 50_000_000) + bomb.flush()
    with pytest.raises(osa.SampleError) as caught:
        osa.inflate(chunked(data, 65536), 1_000_000)
    assert caught.value.status == "too_large"


def test_inflate_caps_plain_content_too():
    with pytest.raises(osa.SampleError, match="limit"):
        osa.inflate(chunked(b"A" * 1000), 999)
    assert osa.inflate(chunked(b"A" * 999), 999) == b"A" * 999


@pytest.mark.parametrize("data, status", [
    (b"", "empty"), (gzip.compress(b""), "empty"), (gzip.compress(b">x\nACGT" * 100)[:-9], "corrupt_gzip"),
    (b"\x1f\x8b\x08\x00garbage-garbage-garbage", "corrupt_gzip"), (gzip.compress(b">x\nA") + b"junk", "corrupt_gzip"),
])
def test_inflate_rejects_empty_and_corrupt(data, status):
    with pytest.raises(osa.SampleError) as caught:
        osa.inflate(chunked(data), 10_000)
    assert caught.value.status == status


def test_real_genome_parses(ac587_files):
    for path in ac587_files:
        seqid, seq = osa.parse_fasta(osa.inflate([path.read_bytes()], osa.DEFAULT_MAX_OBJECT_BYTES))
        assert seqid == osa.guid_from_name(path.name)
        assert 4_300_000 < len(seq) < 4_500_000
        assert not seq.translate(None, osa.FN4_ALPHABET)


def test_backoff_is_capped_exponential_with_jitter():
    assert osa.backoff(1, rng=lambda: 0.0) == osa.BACKOFF_BASE / 2
    assert osa.backoff(2, rng=lambda: 1.0) == osa.BACKOFF_BASE * 2
    assert osa.backoff(50, rng=lambda: 1.0) == osa.BACKOFF_CAP
    assert osa.BACKOFF_CAP == osa.DEFAULT_POLL_INTERVAL


def test_redact_replaces_every_secret():
    assert osa.redact("user:hunter22@db and hunter22", ["hunter22", ""]) == "user:***@db and ***"


def test_a_greater_than_sign_mid_line_is_a_bad_character():
    with pytest.raises(osa.SampleError) as caught:
        osa.parse_fasta(b">x\nAC>GT\n")
    assert caught.value.status == "bad_characters" and "'>'" in caught.value.reason


def test_key_ranges_leave_out_exactly_the_archive_prefix():
    assert osa.key_ranges(None, None) == [(None, None)]
    assert osa.key_ranges(None, "arch/") == [(None, "arch/"), ("arch0", None)]
    assert osa.key_ranges("incoming/", "loaded/") == [(None, None)]  # apart: nothing to leave out
    assert osa.key_ranges("in/", "in/done/") == [(None, "in/done/"), ("in/done0", None)]
    assert osa.key_ranges("arch/sub/", "arch/") == []
    start, end = osa.key_ranges(None, "arch/")[1][0], "arch/"
    for name in ("arch_sample7.fasta", "archa1.fasta", "arch.fasta", "loaded0.fasta", "\u00e4rch.fasta"):
        assert name < end or name >= start, name
    for name in ("arch/x.fasta", "arch/\u00fc.fasta", "arch/\U0001f600.fasta", "arch/"):
        assert end <= name < start, name
        assert name.encode() >= end.encode() and name.encode() < start.encode()  # the same in UTF-8 byte order
