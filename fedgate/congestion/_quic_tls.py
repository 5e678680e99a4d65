"""Party identities for the QUIC carrier: certificate files, party ids, peer verification.

Rules of this module:

1. A party certificate names its party id in the subject CN or in a subjectAltName (DNS name or URI).
   :func:`party_ids` lists them, CN first.
2. Both ends verify the peer the same way, after the TLS handshake proved possession of the key and
   before any channel is surfaced: the chain must lead to the configured CA (dates included), and when
   a party is expected it must be one of the certificate's party ids (:func:`verify_peer`).
   aioquic's own chain check is switched off (it would compare DNS names with the server name).
3. Insecure mode (tests, the bulk tool) uses an in-memory self-signed certificate and verifies nothing;
   channels then report ``peer_party = None``.
4. Failures are :class:`~fedgate.errors.PeerUnavailableError` (the peer is not who it must be) or
   :class:`~fedgate.errors.ConfigError` (our own files are unreadable), raised ``from`` the cause.
"""

from __future__ import annotations

import datetime
import pathlib
from dataclasses import dataclass
from typing import Any

from aioquic import tls as aioquic_tls
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fedgate.errors import ConfigError, PeerUnavailableError

__all__ = ["QuicIdentity", "party_ids", "self_signed", "verify_peer"]

K_SELF_SIGNED_DAYS = 2  # validity of the insecure mode's throw-away certificate, days


@dataclass(frozen=True, slots=True)
class QuicIdentity:
    """This gateway's TLS identity (the ``[tls]`` files), as the QUIC carrier uses it."""

    ca_file: pathlib.Path
    """PEM bundle of the CA(s) that sign peer gateways' certificates."""
    cert_file: pathlib.Path
    """PEM certificate (chain) of this gateway; party id in the CN or a SAN."""
    key_file: pathlib.Path
    """PEM private key of ``cert_file``."""

    @classmethod
    def from_tls_config(cls, tls: Any) -> QuicIdentity | None:
        """From an object with ``ca_file``, ``cert_file``, ``key_file`` (``fedgate.config.TlsConfig``)."""
        ca, cert, key = tls.ca_file, tls.cert_file, tls.key_file
        if ca is None and cert is None and key is None:
            return None
        if ca is None or cert is None or key is None:
            raise ConfigError("the QUIC carrier needs ca_file, cert_file and key_file together", path="tls")
        return cls(pathlib.Path(ca), pathlib.Path(cert), pathlib.Path(key))

    def check(self) -> None:
        """Fail early, with the file named, if a file is missing or not PEM."""
        for name in ("ca_file", "cert_file", "key_file"):
            path: pathlib.Path = getattr(self, name)
            try:
                head = path.read_bytes()[:4096]
            except OSError as exc:
                raise ConfigError(f"cannot read {path}: {exc.strerror}", path=f"tls.{name}") from exc
            if b"-----BEGIN" not in head:
                raise ConfigError(f"{path} is not a PEM file", path=f"tls.{name}")


def party_ids(cert: x509.Certificate) -> list[str]:
    """The party ids a certificate names.

    fedgate's own certificates (``fedgate certs``) carry exactly one SAN URI ``fedgate:party:<id>``,
    the identity the TCP carrier checks too; when present it is the only answer. Certificates made
    elsewhere fall back to the subject CN, then SAN DNS names and URIs.
    """
    from fedgate.proxy.certs import party_from_certificate

    fedgate_party = party_from_certificate(cert)
    if fedgate_party is not None:
        return [fedgate_party]
    out: list[str] = []
    for attr in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME):
        value = attr.value if isinstance(attr.value, str) else attr.value.decode()
        out.append(value)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    if san is not None:
        out.extend(san.get_values_for_type(x509.DNSName))
        out.extend(san.get_values_for_type(x509.UniformResourceIdentifier))
    return [v for i, v in enumerate(out) if v and v not in out[:i]]


def verify_peer(
    cert: x509.Certificate | None,
    chain: list[x509.Certificate],
    *,
    ca_file: pathlib.Path,
    expected_party: str | None,
    peer: str,
) -> str:
    """Check the peer's certificate; return its party id (the expected one, or its first)."""
    if cert is None:
        raise PeerUnavailableError(f"{peer}: presented no certificate (mutual TLS is required)")
    try:
        aioquic_tls.verify_certificate(certificate=cert, chain=chain, cafile=str(ca_file))
    except aioquic_tls.Alert as exc:
        raise PeerUnavailableError(f"{peer}: certificate rejected: {exc}") from exc
    ids = party_ids(cert)
    if not ids:
        raise PeerUnavailableError(f"{peer}: certificate names no party (no CN, no SAN)")
    if expected_party is None:
        return ids[0]
    if expected_party not in ids:
        raise PeerUnavailableError(
            f"{peer}: certificate is for party {', '.join(map(repr, ids))}, expected {expected_party!r}"
        )
    return expected_party


def self_signed(name: str = "fedgate-insecure") -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A throw-away certificate for insecure mode (nothing verifies it)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=K_SELF_SIGNED_DAYS))
        .sign(key, hashes.SHA256())
    )
    return cert, key
