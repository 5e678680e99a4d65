"""fedgate certs: CA and party certificates, party extraction, TLS 1.3 contexts."""

from __future__ import annotations

import pathlib
import ssl
import stat

from cryptography import x509

from fedgate.proxy.certs import (
    client_context,
    main,
    party_from_certificate,
    party_from_peercert,
    server_context,
)


def test_main_creates_ca_and_party_certificates(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "certs"
    assert main(["--dir", str(out), "9999", "10000"]) == 0
    for name in ("ca.pem", "ca.key", "party-9999.pem", "party-9999.key", "party-10000.pem", "party-10000.key"):
        assert (out / name).is_file()
    assert stat.S_IMODE((out / "party-9999.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((out / "ca.key").stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate((out / "party-10000.pem").read_bytes())
    assert party_from_certificate(cert) == "10000"
    ca = x509.load_pem_x509_certificate((out / "ca.pem").read_bytes())
    cert.verify_directly_issued_by(ca)


def test_second_run_reuses_the_ca(tmp_path: pathlib.Path) -> None:
    assert main(["--dir", str(tmp_path), "1"]) == 0
    ca_before = (tmp_path / "ca.pem").read_bytes()
    assert main(["--dir", str(tmp_path), "2", "--host", "gw2.example", "--host", "10.0.0.2"]) == 0
    assert (tmp_path / "ca.pem").read_bytes() == ca_before
    cert = x509.load_pem_x509_certificate((tmp_path / "party-2.pem").read_bytes())
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca_before))
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["gw2.example"]


def test_bad_party_id_fails_cleanly(tmp_path: pathlib.Path) -> None:
    assert main(["--dir", str(tmp_path), "a/b"]) == 1


def test_contexts_are_tls13_with_client_certificates_required(tmp_path: pathlib.Path) -> None:
    main(["--dir", str(tmp_path), "1"])
    for make in (client_context, server_context):
        ctx = make(tmp_path / "ca.pem", tmp_path / "party-1.pem", tmp_path / "party-1.key")
        assert ctx.minimum_version is ssl.TLSVersion.TLSv1_3
        assert ctx.verify_mode is ssl.CERT_REQUIRED


def test_party_from_peercert_needs_exactly_one_party_uri() -> None:
    assert party_from_peercert({"subjectAltName": (("URI", "fedgate:party:42"), ("DNS", "x"))}) == "42"
    assert party_from_peercert({"subjectAltName": (("DNS", "party-42.fedgate"),)}) is None
    two = {"subjectAltName": (("URI", "fedgate:party:1"), ("URI", "fedgate:party:2"))}
    assert party_from_peercert(two) is None
    assert party_from_peercert(None) is None and party_from_peercert({}) is None
