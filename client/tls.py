"""TLS for the links between stage hosts and their peers: a fresh certificate per host, pinned.

A stage host the daemon starts serves ``wss://`` with a self-signed certificate made in memory
for its advertised address (:func:`issue_host_certificate`). It reports the certificate with
its URL over its authenticated control session; the server passes exactly that certificate on
in the peer list, and a peer trusts nothing else at that URL (:func:`pinned_context`): a host
showing any other certificate, or one made for another name, is refused during the handshake.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import tempfile
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .errors import HostingError

_VALID_FOR = datetime.timedelta(days=30)
_MAX_PEM_CHARS = 16384  # a P-256 certificate with one SAN is under 1 KiB


@dataclass(frozen=True, slots=True)
class HostCertificate:
    """A stage host's certificate and private key, both PEM (the key never leaves the host)."""

    cert_pem: str
    key_pem: str = ""


def _subject_alt_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def issue_host_certificate(host: str) -> HostCertificate:
    """A new P-256 key and a self-signed certificate for ``host`` (an IP address or DNS name)."""
    if not host:
        raise HostingError("a stage host needs an address to put in its TLS certificate")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host[:64])])
    now = datetime.datetime.now(datetime.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + _VALID_FOR)
        .add_extension(x509.SubjectAlternativeName([_subject_alt_name(host)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    return HostCertificate(cert_pem=cert.public_bytes(serialization.Encoding.PEM).decode(), key_pem=key_pem)


def server_context(certificate: HostCertificate) -> ssl.SSLContext:
    """The server-side context a stage host serves ``wss://`` with."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # The ssl module loads a key only from a file: write it to a private temporary one (mode
    # 0600) and remove it at once.
    fd, path = tempfile.mkstemp(prefix="titanic-host-", suffix=".pem")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(certificate.cert_pem + certificate.key_pem)
        context.load_cert_chain(path)
    finally:
        os.unlink(path)
    return context


def pinned_context(cert_pem: str) -> ssl.SSLContext:
    """A client context that trusts only ``cert_pem``, checked against the URL's host name."""
    if not cert_pem or len(cert_pem) > _MAX_PEM_CHARS or "BEGIN CERTIFICATE" not in cert_pem:
        raise HostingError("the server vouched for no usable certificate for this host")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname by default
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_verify_locations(cadata=cert_pem)
    except ssl.SSLError as exc:
        raise HostingError(f"the certificate the server vouched for cannot be read: {exc}") from exc
    return context


def peer_context(url: str, cert_pem: str) -> ssl.SSLContext:
    """The context to reach a peer at ``url`` with: pinned to ``cert_pem``.

    Only ``wss://`` peers with a certificate are reached: every host a daemon starts serves TLS
    and the server names its certificate in the peer list, so a plain ``ws://`` URL (which
    anyone on the path could answer) or a ``wss://`` one without a certificate is refused.
    """
    if not url.startswith("wss://"):
        raise HostingError(
            f"peer {url[:200]!r} does not serve TLS: a daemon reaches hosts only over wss:// with the "
            "certificate the server vouches for"
        )
    return pinned_context(cert_pem)
