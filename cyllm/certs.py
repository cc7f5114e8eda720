"""``cyllm certs``: a private CA and one certificate per component role, for the
internal plane's mutual TLS (``protocol/plane.py``).

The certificate's common name is the role (``gateway``, ``coordinator``, ``worker``);
servers read it to decide what the caller may call.  Subject alternative names are
the hosts the component is dialled by.  A worker's certificate may also name the
worker (``--worker-id``: ``cyllm://worker/<id>`` among its names, written as
``worker-<id>.pem``): a coordinator then lets it register as that worker only, at an
address among its hosts (``protocol/plane.py``).  Keys are ECDSA P-256, written with mode 0600.
An existing CA in the folder is reused, so running the command again rotates the
component certificates without touching the others' trust.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import socket
from pathlib import Path
from typing import cast

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cyllm.protocol.plane import ROLES, WORKER_URI

CA_DAYS = 3650
_WORKER_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "CY-LLM"), x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    )


def _ca(out: Path) -> tuple[x509.Certificate, CertificateIssuerPrivateKeyTypes]:
    cert_path, key_path = out / "ca.pem", out / "ca.key"
    if cert_path.exists() and key_path.exists():
        # Ours is ECDSA; a CA key put there by hand may be another kind (``sign`` refuses
        # one that cannot sign certificates).
        loaded = serialization.load_pem_private_key(key_path.read_bytes(), None)
        ca_key = cast(CertificateIssuerPrivateKeyTypes, loaded)
        return x509.load_pem_x509_certificate(cert_path.read_bytes()), ca_key
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("CY-LLM internal CA"))
        .issuer_name(_name("CY-LLM internal CA"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    _write_key(key_path, key)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert, key


def _san(hosts: list[str], worker_id: str | None = None) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    if worker_id is not None:
        names.append(x509.UniformResourceIdentifier(WORKER_URI + worker_id))
    for host in dict.fromkeys(hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def issue(
    out: Path, role: str, hosts: list[str], days: int, worker_id: str | None = None
) -> tuple[Path, Path]:
    """Write ``<role>.pem`` and ``<role>.key`` signed by the folder's CA (made if absent);
    with ``worker_id`` (role ``worker``) ``worker-<id>.pem``, naming that worker."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    if worker_id is not None and (role != "worker" or not _WORKER_ID.match(worker_id)):
        raise ValueError(
            "a worker id (1 to 64 letters, digits, '.', '_', '-') names a worker's certificate only"
        )
    out.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = _ca(out)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(role))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(_san(hosts, worker_id), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    stem = role if worker_id is None else f"worker-{worker_id}"
    cert_path, key_path = out / f"{stem}.pem", out / f"{stem}.key"
    _write_key(key_path, key)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def default_hosts() -> list[str]:
    return ["localhost", "127.0.0.1", "::1", socket.gethostname()]
