"""https fn4 servers: certificates are verified, and --ca-bundle names the CA to trust."""
import datetime
import ipaddress
import ssl

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import objectstoreaccess as osa
from conftest import BUCKET, NAMESPACE, T0, fasta
from fn4_standin import FN4StandIn, insert


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1: (certificate file, server SSL context)."""
    folder = tmp_path_factory.mktemp("tls")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fn4 test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    return cert_file, context


@pytest.fixture
def https_fn4(certificate):
    with FN4StandIn(tls=certificate[1]) as server:
        yield server


def test_an_unknown_certificate_is_refused(https_fn4):
    client = osa.FN4Client(https_fn4.url)
    result = insert(client, "a", b"ACGT")
    assert result.outcome == osa.SERVER_UNAVAILABLE and "CERTIFICATE_VERIFY_FAILED" in result.message
    with pytest.raises(osa.OutageError, match="CERTIFICATE_VERIFY_FAILED"):
        client.guids()
    assert not https_fn4.guids


def test_the_ca_bundle_is_trusted(https_fn4, certificate):
    client = osa.FN4Client(https_fn4.url, verify=str(certificate[0]))
    assert insert(client, "a", b"ACGT").outcome == osa.INSERTED
    assert client.guids() == {"a"} and client.exists("a")
    client.close()


def test_ca_bundle_option_end_to_end(https_fn4, certificate, emulator, oci_config, tmp_path):
    emulator.put(BUCKET, "a.fasta", fasta("a"), time_created=T0)
    result = CliRunner().invoke(osa.main, [
        https_fn4.url, NAMESPACE, BUCKET, f"sqlite:///{tmp_path / 'c.db'}", "--once", "--ca-bundle",
        str(certificate[0]), "--config-file", str(oci_config), "--endpoint", emulator.endpoint])
    assert result.exit_code == 0, result.output
    assert list(https_fn4.guids) == ["a"]
