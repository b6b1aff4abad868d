"""A cluster's certificates: one CA, one certificate per host, one for clients.

    shardnode certs init [--config etc/cluster.toml] [--force]

writes into the cluster's certificate directory (`[security] certs_dir`,
`data_dir/certs` by default):

    ca.crt, ca.key           the cluster's own certificate authority
    HOST.crt, HOST.key       each host's identity: CN and a DNS SAN of the host's
                             name, an IP SAN (or DNS SAN) of its address; used by
                             its router and workers both as server and as client
    client.crt, client.key   clients (Client, kv739, the CLI): CN "client"

Every file is written 0600 (private keys never readable by others; the
certificates, too, so that a directory copied to a host keeps its mode). Keys
are ECDSA P-256, certificates valid for `VALID_DAYS`. Everything X.509 is done
by `cryptography`; nothing here builds ASN.1 by hand.

The CA key is only needed to issue certificates: on a real deployment keep it
off the hosts (copy ca.crt, HOST.crt/key and the admin credential to each).
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .errors import ShardnodeError
from .security import ensure_admin_credential, write_private

if TYPE_CHECKING:
    from .config import ClusterConfig

__all__ = [
    "CLIENT_IDENTITY",
    "CertsRefused",
    "VALID_DAYS",
    "Authority",
    "Issued",
    "init_cluster",
    "issue_certificate",
    "new_authority",
]

#: The identity (CN) of the clients' certificate.
CLIENT_IDENTITY = "client"
VALID_DAYS = 825   # the longest a public CA may issue; rotate before then (docs/security.md)


@dataclass(slots=True, frozen=True)
class Issued:
    """A certificate and its private key, both PEM."""

    cert_pem: bytes
    key_pem: bytes


@dataclass(slots=True, frozen=True)
class Authority:
    """A CA that can issue certificates."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return _key_pem(self.key)

    @classmethod
    def load(cls, cert_pem: bytes, key_pem: bytes) -> "Authority":
        key = serialization.load_pem_private_key(key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError("the CA key is not an ECDSA key")
        return cls(x509.load_pem_x509_certificate(cert_pem), key)


def new_authority(cluster_name: str, *, days: int = VALID_DAYS) -> Authority:
    """A new self-signed CA for one cluster."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "shardnode"),
        x509.NameAttribute(NameOID.COMMON_NAME, f"{cluster_name} CA"),
    ])
    now = _now()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Authority(certificate, key)


def issue_certificate(authority: Authority, common_name: str, *, dns_names: Iterable[str] = (),
                      addresses: Iterable[str] = (), days: int = VALID_DAYS) -> Issued:
    """A certificate for `common_name`, signed by `authority`, usable as a TLS
    server and as a TLS client. `addresses` that are IP addresses become IP
    SANs, others DNS SANs; the common name is always a DNS SAN too (gRPC
    checks a server's name against the SANs)."""
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    seen: set[str] = set()
    for value in (common_name, *dns_names, *addresses):
        if value in seen:
            continue
        seen.add(value)
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(value)))
        except ValueError:
            names.append(x509.DNSName(value))
    now = _now()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "shardnode"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]))
        .issuer_name(authority.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_encipherment=False, content_commitment=False,
            data_encipherment=False, key_agreement=True, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(authority.key.public_key()),
                       critical=False)
        .sign(authority.key, hashes.SHA256())
    )
    return Issued(certificate.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


class CertsRefused(ShardnodeError):
    """`certs init` will not do what it was asked without `--force`: it
    would replace a certificate that exists, or make a new CA beside
    certificates of another one (one line: what and why)."""


def init_cluster(cluster: "ClusterConfig", *, force: bool = False) -> list[Path]:
    """Create what is missing of the cluster's certificates (all of them again
    with `force`, under a new CA) and its admin credential; return the files
    written. An existing CA is reused to issue missing certificates.

    Without `force` it never replaces a certificate that exists, and makes a
    new CA only where no certificate exists at all: a host laid out as the
    docs say (ca.crt, its own HOST.crt/.key, no ca.key) is left as it is when
    nothing is missing, and CertsRefused says so when something is (a new CA
    would have cut the host off from the cluster and left a CA key on it)."""
    security = cluster.security
    written: list[Path] = []
    ca_cert, ca_key = security.ca_file, security.ca_key_file
    client_name = security.allowed_clients[0] if security.allowed_clients else CLIENT_IDENTITY
    pairs = [(security.host_cert_file(h.name), security.host_key_file(h.name), h.name, [h.address])
             for h in cluster.hosts]
    pairs.append((security.client_cert_file, security.client_key_file, client_name, []))
    new_ca = force
    if not force:
        for cert_file, key_file, _, _ in pairs:
            if cert_file.exists() and not key_file.exists():
                raise CertsRefused(f"{cert_file} exists without its key {key_file}: refusing to replace the "
                                   "certificate (restore the key, remove both, or use --force to reissue everything)")
        missing = [pair for pair in pairs if not pair[0].exists()]
        fresh = len(missing) == len(pairs) and not ca_cert.exists() and not ca_key.exists()
        if missing and not fresh and not (ca_cert.exists() and ca_key.exists()):
            names = ", ".join(pair[2] for pair in missing)
            absent = ca_key if not ca_key.exists() else ca_cert
            raise CertsRefused(f"cannot issue certificates for {names}: {security.certs_dir} holds certificates "
                               f"but not {absent} (ca.key is kept off the hosts); run `shardnode certs init` "
                               "where the CA is and copy the files, or --force to replace every certificate "
                               "under a new CA")
        pairs, new_ca = missing, fresh
    if new_ca:
        authority = new_authority(cluster.name)
        for path, data in ((ca_key, authority.key_pem), (ca_cert, authority.cert_pem)):
            write_private(path, data)
            written.append(path)
    elif pairs:
        authority = Authority.load(ca_cert.read_bytes(), ca_key.read_bytes())

    for cert_file, key_file, name, addresses in pairs:
        issued = issue_certificate(authority, name, addresses=addresses)
        # The key first: a reader that sees the new certificate finds its key.
        write_private(key_file, issued.key_pem)
        write_private(cert_file, issued.cert_pem)
        written.extend((key_file, cert_file))
    if not security.admin_file.exists():
        ensure_admin_credential(security)
        written.append(security.admin_file)
    return written


def user_cert_files(cluster: "ClusterConfig", user: str, out_dir: Path | None = None) -> tuple[Path, Path]:
    """Where `shardnode user add` writes a user's certificate and key."""
    where = out_dir if out_dir is not None else cluster.security.certs_dir / "users"
    return where / f"{user}.crt", where / f"{user}.key"


def issue_user_certificate(cluster: "ClusterConfig", user: str, out_dir: Path | None = None, *,
                           force: bool = False) -> tuple[Path, Path]:
    """A client certificate whose CN is `user`, signed by the cluster's CA
    (ca.key must be here). An existing one is kept unless `force`."""
    security = cluster.security
    cert_file, key_file = user_cert_files(cluster, user, out_dir)
    if cert_file.exists() and not force:
        return cert_file, key_file
    if not security.ca_key_file.exists():
        raise CertsRefused(f"cannot issue {user}'s certificate: {security.ca_key_file} is not here (run this where "
                           "the CA is, or add the user with --no-cert and issue the certificate there)")
    authority = Authority.load(security.ca_file.read_bytes(), security.ca_key_file.read_bytes())
    issued = issue_certificate(authority, user)
    write_private(key_file, issued.key_pem)
    write_private(cert_file, issued.cert_pem)
    return cert_file, key_file
