"""Party certificates: a small CA, per-party certificates, TLS 1.3 contexts, party id extraction.

Rules of this module:

1. A gateway's identity is its certificate. The party id is the SAN ``URI:fedgate:party:<id>``
   (exactly one; authoritative). The subject CN (``fedgate party <id>``) is for people only.
   DNS/IP SANs may be added for tools that check host names, but links do not: routes often name
   IP addresses, and the party check is stronger than a host name check.
2. Links use TLS 1.3 only, with mutual authentication (``CERT_REQUIRED`` on both ends) against the
   configured CA bundle.
3. ``main(argv)`` is ``fedgate certs``: it creates (or reuses) ``ca.pem``/``ca.key`` in a directory
   and issues ``party-<id>.pem``/``party-<id>.key`` for each party named. Keys are written 0600.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import pathlib
import ssl
import sys
from collections.abc import Sequence
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

__all__ = [
    "K_PARTY_URI_PREFIX", "client_context", "issue_parties", "issue_party", "load_or_create_ca", "main",
    "party_files", "party_from_certificate", "party_from_peercert", "party_uri", "server_context",
]

K_PARTY_URI_PREFIX = "fedgate:party:"
K_DEFAULT_DAYS = 825  # days a certificate is valid


def party_uri(party: str) -> str:
    return f"{K_PARTY_URI_PREFIX}{party}"


def party_from_peercert(peercert: dict[str, Any] | None) -> str | None:
    """The party id in ``SSLObject.getpeercert()``'s SAN URI, or None if there is not exactly one."""
    if not peercert:
        return None
    parties = [
        value[len(K_PARTY_URI_PREFIX) :]
        for kind, value in peercert.get("subjectAltName", ())
        if kind == "URI" and isinstance(value, str) and value.startswith(K_PARTY_URI_PREFIX)
    ]
    return parties[0] if len(parties) == 1 and parties[0] else None


def party_from_certificate(cert: x509.Certificate) -> str | None:
    """The party id of a parsed certificate (same rule as :func:`party_from_peercert`)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    uris = [u[len(K_PARTY_URI_PREFIX) :] for u in san.get_values_for_type(x509.UniformResourceIdentifier)
            if u.startswith(K_PARTY_URI_PREFIX)]
    return uris[0] if len(uris) == 1 and uris[0] else None


def _context(purpose: int, ca_file: pathlib.Path | str, cert_file: pathlib.Path | str,
             key_file: pathlib.Path | str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # rule 1: the party SAN is checked instead
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=str(ca_file))
    ctx.load_cert_chain(str(cert_file), str(key_file))
    return ctx


def client_context(ca_file: pathlib.Path | str, cert_file: pathlib.Path | str,
                   key_file: pathlib.Path | str) -> ssl.SSLContext:
    """TLS 1.3 client context presenting our certificate and verifying the peer's against the CA."""
    return _context(ssl.PROTOCOL_TLS_CLIENT, ca_file, cert_file, key_file)


def server_context(ca_file: pathlib.Path | str, cert_file: pathlib.Path | str,
                   key_file: pathlib.Path | str) -> ssl.SSLContext:
    """TLS 1.3 server context that requires and verifies a client certificate."""
    return _context(ssl.PROTOCOL_TLS_SERVER, ca_file, cert_file, key_file)


# -- issuing ---------------------------------------------------------------------------------------------


def _write_key(path: pathlib.Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def load_or_create_ca(directory: pathlib.Path, *, days: int = K_DEFAULT_DAYS,
                      name: str = "fedgate test CA") -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Load ``ca.pem``/``ca.key`` from ``directory``, creating them first if absent."""
    cert_path, key_path = directory / "ca.pem", directory / "ca.key"
    if cert_path.exists() and key_path.exists():
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{key_path} is not an EC key")
        return cert, key
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(_now() - datetime.timedelta(minutes=5))
        .not_valid_after(_now() + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
        ), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_key(key_path, key)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert, key


def issue_party(
    directory: pathlib.Path, party: str, *, ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    hosts: Sequence[str] = ("localhost", "127.0.0.1"), days: int = K_DEFAULT_DAYS,
) -> tuple[pathlib.Path, pathlib.Path]:
    """Write ``party-<id>.pem`` and ``.key`` (usable as TLS client and server); returns their paths."""
    if not party or any(c in party for c in "/\\: \t\n"):
        raise ValueError(f"bad party id {party!r}")
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(party_uri(party))]
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"fedgate party {party}")]))
        .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(minutes=5))
        .not_valid_after(_now() + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage(
            [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH, x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"party-{party}.pem", directory / f"party-{party}.key"
    _write_key(key_path, key)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def issue_parties(
    directory: pathlib.Path, parties: Sequence[str], *, hosts: Sequence[str] = ("localhost", "127.0.0.1"),
    days: int = K_DEFAULT_DAYS,
) -> list[tuple[pathlib.Path, pathlib.Path]]:
    """Create (or reuse) the CA in ``directory`` and issue a certificate for each party."""
    ca = load_or_create_ca(directory, days=days)
    return [issue_party(directory, party, ca=ca, hosts=hosts, days=days) for party in parties]


def party_files(directory: pathlib.Path, party: str) -> tuple[pathlib.Path, pathlib.Path, pathlib.Path]:
    """``(ca.pem, party-<id>.pem, party-<id>.key)`` in a directory made by :func:`issue_parties`,
    in the argument order of :func:`client_context` and :func:`server_context`."""
    return directory / "ca.pem", directory / f"party-{party}.pem", directory / f"party-{party}.key"


def main(argv: Sequence[str]) -> int:
    """``fedgate certs``: create a CA (if missing) and certificates for the parties named."""
    parser = argparse.ArgumentParser(
        prog="fedgate certs",
        description="Create a small CA and per-party link certificates (party id in SAN URI fedgate:party:<id>).",
    )
    parser.add_argument("parties", nargs="+", metavar="PARTY", help="party ids to issue certificates for")
    parser.add_argument("--dir", type=pathlib.Path, default=pathlib.Path("var/certs"),
                        help="output directory; an existing ca.pem/ca.key there is reused (default: var/certs)")
    parser.add_argument("--host", action="append", default=None,
                        help="DNS name or IP to add as SAN (repeatable; default: localhost, 127.0.0.1)")
    parser.add_argument("--days", type=int, default=K_DEFAULT_DAYS, help="validity in days")
    args = parser.parse_args(list(argv))
    try:
        issued = issue_parties(args.dir, args.parties, hosts=args.host or ("localhost", "127.0.0.1"), days=args.days)
        print(f"CA          {args.dir / 'ca.pem'}")
        for party, (cert, key) in zip(args.parties, issued, strict=True):
            print(f"party {party:<6} {cert}  {key}")
    except (OSError, ValueError) as exc:
        print(f"fedgate certs: {exc}", file=sys.stderr)
        return 1
    return 0
