"""Keys and certificates the lab makes for itself, with the `cryptography` library (Debian's
python3-cryptography) instead of `wg genkey` and `openssl` subprocesses: X25519 keys for
WireGuard and obfs4, a throwaway P-256 CA and the certificates it signs (the lab's OpenVPN
server and client, the sink's per-name TLS certificates). Constant-time primitives from a
kept library, and one process instead of a dozen forks at `up`.

Everything here is for the lab only: nothing a real provider or bridge uses is made here."""

from __future__ import annotations

import base64
import datetime
import os
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_RAW = serialization.Encoding.Raw


def x25519_pair() -> tuple[bytes, bytes]:
    """(private, public) raw 32-byte X25519 keys (RFC 7748)."""
    k = X25519PrivateKey.generate()
    priv = k.private_bytes(_RAW, serialization.PrivateFormat.Raw,
                           serialization.NoEncryption())
    return priv, k.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw)


def x25519_public(priv: bytes) -> bytes:
    """The public key of a raw X25519 private key."""
    return X25519PrivateKey.from_private_bytes(priv).public_key().public_bytes(
        _RAW, serialization.PublicFormat.Raw)


def wg_keypair() -> tuple[str, str]:
    """A WireGuard key pair as `wg genkey` / `wg pubkey` print them (base64)."""
    priv, pub = x25519_pair()
    return base64.b64encode(priv).decode(), base64.b64encode(pub).decode()


def wg_psk() -> str:
    """A WireGuard preshared key as `wg genpsk` prints it."""
    return base64.b64encode(os.urandom(32)).decode()


@dataclass(frozen=True)
class Issued:
    key_pem: bytes
    cert_pem: bytes


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _key_pem(k: ec.EllipticCurvePrivateKey) -> bytes:
    return k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                           serialization.NoEncryption())


def make_ca(cn: str, days: int) -> Issued:
    """A self-signed P-256 CA (basicConstraints CA:TRUE, keyCertSign and cRLSign)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    return Issued(_key_pem(key), cert.public_bytes(serialization.Encoding.PEM))


def issue(ca: Issued, cn: str, days: int, usage: str, dns_names: tuple[str, ...] = ()
          ) -> Issued:
    """A P-256 leaf certificate signed by `ca`: usage "server" or "client" (the extended
    key usage OpenVPN's and TLS clients' checks look for), with DNS subjectAltNames."""
    ca_key = serialization.load_pem_private_key(ca.key_pem, None)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    eku = {"server": ExtendedKeyUsageOID.SERVER_AUTH,
           "client": ExtendedKeyUsageOID.CLIENT_AUTH}[usage]
    b = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_cert.subject)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + datetime.timedelta(days=days))
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.KeyUsage(
             digital_signature=True, content_commitment=False, key_encipherment=False,
             data_encipherment=False, key_agreement=True, key_cert_sign=False,
             crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
         .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
             ca_cert.public_key()), critical=False))
    if dns_names:
        b = b.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName(n) for n in dns_names]), critical=False)
    cert = b.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    return Issued(_key_pem(key), cert.public_bytes(serialization.Encoding.PEM))


def write_private(path: str, data: bytes) -> None:
    """A key file only root reads (made 0600 before any byte is written)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
