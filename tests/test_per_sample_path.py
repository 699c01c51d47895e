"""The per-sample requests: signed downloads and inserts over kept-alive connections (KeptAlive, GetSigner)."""
import base64
import re
import socket
import threading
from datetime import timedelta

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding

import objectstoreaccess as osa
from conftest import BUCKET, NAMESPACE, T0, fasta
from fn4_standin import insert
from oci_emulator import _test_key

SIGNATURE = re.compile(r'Signature algorithm="rsa-sha256",headers="([^"]+)",keyId="([^"]+)",'
                       r'signature="([^"]+)",version="1"')


def verify_signature(record, public_key):
    """Check a recorded request's Authorization as Object Storage would: return the keyId it names."""
    headers_signed, key_id, signature = SIGNATURE.fullmatch(record.headers["authorization"]).groups()
    lines = [f"(request-target): {record.method.lower()} {record.target}" if name == "(request-target)"
             else f"{name}: {record.headers[name]}" for name in headers_signed.split()]
    public_key.verify(base64.b64decode(signature), "\n".join(lines).encode(), padding.PKCS1v15(), hashes.SHA256())
    return headers_signed, key_id


def public_key():
    return serialization.load_pem_private_key(_test_key()[0], None).public_key()


def put(emulator, names):
    for i, name in enumerate(names):
        emulator.put(BUCKET, name, fasta(name.split(".")[0]), time_created=T0 + timedelta(seconds=i))


def test_many_signed_downloads_in_a_row_verify_and_share_one_connection(store, emulator):
    names = [f"s{i:02d} with space+plus.fasta" for i in range(40)]
    put(emulator, names)
    emulator.clear_requests()
    for obj in sorted(store.list_objects(), key=lambda o: o.name):
        assert osa.parse_fasta(store.read_object(obj, 10_000))[0] == obj.name.split()[0]
    gets = [r for r in emulator.requests if r.method == "GET" and "/o/" in r.path]
    assert [r.status for r in gets] == [200] * len(names)
    for record in gets:
        headers_signed, key_id = verify_signature(record, public_key())
        assert headers_signed == "date (request-target) host"
        assert key_id.startswith("ocid1.tenancy.oc1..test/ocid1.user.oc1..test/")
        assert record.headers["if-match"] and record.headers["accept-encoding"] == "identity"
    assert len({r.client_port for r in gets}) == 1  # one kept-alive connection carried every download


def test_the_signer_of_downloads_signs_as_the_sdk_does(store, emulator):
    signer = store._client.base_client.signer
    fast = osa.GetSigner.matching(signer, "example.com:443", store._oci)
    assert fast is not None
    path = "/n/ns/b/bucket/o/a%20b.fasta"
    sdk = osa._sdk_signed_get(signer, store._sdk_requests, f"https://example.com:443{path}", '"e1"', fast.date())
    assert fast.headers(path, '"e1"') == {name.lower(): value for name, value in sdk.items()}


def test_downloads_signed_with_a_session_token_keep_the_sdks_signer(emulator, oci_config, tmp_path):
    token = tmp_path / "token"
    token.write_text("a-session-token")
    config = tmp_path / "config"
    config.write_text(oci_config.read_text() + f"security_token_file={token}\n")
    store = osa.ObjectStoreClient.from_config(NAMESPACE, BUCKET, auth="security_token", config_file=str(config),
                                              endpoint=emulator.endpoint)
    put(emulator, ["a.fasta", "b.fasta"])
    emulator.clear_requests()
    for obj in store.list_objects():
        store.read_object(obj, 10_000)
    gets = [r for r in emulator.requests if r.method == "GET" and "/o/" in r.path]
    assert [r.status for r in gets] == [200, 200]
    assert [verify_signature(r, public_key())[1] for r in gets] == ["ST$a-session-token"] * 2
    assert store._target.signer is None


class ScriptedServer:
    """A raw HTTP server: answers each request with the next scripted bytes; records (connection, request)."""

    def __init__(self, answers):
        self.answers = list(answers)
        self.requests = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(10)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        connection = 0
        while self.answers:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            connection += 1
            with conn, conn.makefile("rb") as reader:
                conn.settimeout(10)
                while self.answers:
                    lines = list(iter(reader.readline, b"\r\n")) if reader.peek(1) else []
                    head = b"".join(lines)
                    if not head or not head.endswith(b"\n"):
                        break
                    length = int(re.search(rb"Content-Length: (\d+)", head).group(1))
                    self.requests.append((connection, head.split(b"\r\n")[0], reader.read(length)))
                    answer, then_close = self.answers.pop(0)
                    conn.sendall(answer)
                    if then_close:
                        break

    def close(self):
        self.listener.close()
        self.thread.join(10)


def answer(head, body=b'"Guid a inserted."'):
    return head.replace(b"LENGTH", str(len(body)).encode()) + b"\r\n\r\n" + body


OK = answer(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: LENGTH")
CHUNKED = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"7\r\n\"Guid a\r\n5;ext=1\r\n inse\r\n6\r\nrted.\"\r\n0\r\nTrailer: x\r\n\r\n")


@pytest.mark.parametrize("first, closes", [
    ((OK, False), False),
    ((CHUNKED, False), False),
    ((b"HTTP/1.1 100 Continue\r\n\r\n" + OK, False), False),
    ((answer(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: LENGTH"), True), True),
    ((answer(b"HTTP/1.0 200 OK\r\nContent-Length: LENGTH"), True), True),
    ((b'HTTP/1.1 200 OK\r\n\r\n"Guid a inserted."', True), True),  # no length: the body ends when it closes
], ids=["length", "chunked", "interim-100", "connection-close", "http-1.0", "until-close"])
def test_inserts_read_each_answer_framing_and_reopen_only_a_closed_connection(first, closes):
    server = ScriptedServer([first, (OK, False)])
    client = osa.FN4Client(server.url + "/base/", timeout=(5.0, 5.0))
    try:
        results = [insert(client, "a", b"ACGT"), insert(client, "a", b"ACGT")]
    finally:
        client.close()
        server.close()
    assert [(r.status_code, r.outcome, r.message) for r in results] == [(200, osa.INSERTED, "Guid a inserted.")] * 2
    assert [(c, line, body) for c, line, body in server.requests] == [
        (1, b"POST /base/api/v2/insert HTTP/1.1", b"guid=a&seq=ACGT"),
        (2 if closes else 1, b"POST /base/api/v2/insert HTTP/1.1", b"guid=a&seq=ACGT")]


def test_an_answer_cut_short_is_an_unreachable_fn4_and_the_next_insert_reconnects():
    server = ScriptedServer([(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n\"Guid", True), (OK, False)])
    client = osa.FN4Client(server.url, timeout=(5.0, 5.0))
    try:
        results = [insert(client, "a", b"ACGT"), insert(client, "a", b"ACGT")]
    finally:
        client.close()
        server.close()
    assert [r.outcome for r in results] == [osa.SERVER_UNAVAILABLE, osa.INSERTED]
    assert [c for c, _, _ in server.requests] == [1, 2]
