"""Moving a running cluster to a new CA with overlapping trust
(`shardnode certs rotate begin|issue|finish`, docs/security.md).

At no moment may two processes fail to accept each other, whichever of the
files each has loaded:

1. `begin`: a new CA is made beside the old one (`ca.next.crt`,
   `ca.next.key`) and `ca.crt` trusts both. Certificates of either CA are
   now accepted by everyone who loaded the new `ca.crt`, and every process
   still presents an old-CA certificate, which everyone accepts.
2. `issue`: every host's and the clients' certificates are issued again
   under the new CA. Everyone already trusts it (step 1).
3. `finish`: `ca.crt` trusts the new CA only, which becomes `ca.crt` and
   `ca.key`. Refused while any certificate is still the old CA's.

Each step is idempotent and may be killed and run again; run one only once
every process has read the files of the one before (servers re-read them at
their next TLS handshake, channels within a second: shardnode.channel_cache;
on several machines, copy certs_dir to every host first).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from .certs import CLIENT_IDENTITY, Authority, issue_certificate, new_authority
from .errors import ShardnodeError
from .security import write_private

if TYPE_CHECKING:
    from .config import ClusterConfig


class RotationRefused(ShardnodeError):
    """A rotation step that cannot be taken now; nothing was written."""


@dataclass(frozen=True, slots=True)
class _Files:
    ca_cert: Path
    ca_key: Path
    next_cert: Path
    next_key: Path


def _files(cluster: ClusterConfig) -> _Files:
    security = cluster.security
    return _Files(security.ca_file, security.ca_key_file, security.certs_dir / "ca.next.crt",
                  security.certs_dir / "ca.next.key")


def _certificates(path: Path) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(path.read_bytes())
    except FileNotFoundError:
        raise RotationRefused(f"{path} does not exist (run `shardnode certs init` first)") from None
    except ValueError as exc:
        raise RotationRefused(f"{path} is not a PEM certificate file: {exc}") from None


def _issued_identities(cluster: ClusterConfig) -> list[tuple[str, Path, Path, list[str]]]:
    """(name, certificate file, key file, IP addresses) of every certificate the cluster uses."""
    security = cluster.security
    out = [(h.name, security.host_cert_file(h.name), security.host_key_file(h.name), [h.address])
           for h in cluster.hosts]
    client = security.allowed_clients[0] if security.allowed_clients else CLIENT_IDENTITY
    out.append((client, security.client_cert_file, security.client_key_file, []))
    return out


def begin(cluster: ClusterConfig) -> list[str]:
    """Step 1: the new CA beside the old one, trusted by `ca.crt` with it."""
    files = _files(cluster)
    if not files.ca_key.exists():
        raise RotationRefused(f"{files.ca_key} does not exist: rotate where the CA's key is kept")
    trusted = _certificates(files.ca_cert)
    done: list[str] = []
    if files.next_cert.exists() and files.next_key.exists():
        upcoming = Authority.load(files.next_cert.read_bytes(), files.next_key.read_bytes())
    else:
        # A name of its own: logs and `openssl x509 -issuer` tell the two CAs apart.
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        upcoming = new_authority(f"{cluster.name} (from {stamp})")
        # The key first: a rerun after a kill finds the pair whole or makes another.
        write_private(files.next_key, upcoming.key_pem)
        write_private(files.next_cert, upcoming.cert_pem)
        done.append(f"made the new CA: {files.next_cert}")
    if upcoming.certificate not in trusted:
        bundle = b"".join(_pem(c) for c in trusted) + upcoming.cert_pem
        write_private(files.ca_cert, bundle)
        done.append(f"{files.ca_cert} now trusts the old and the new CA")
    return done


def issue(cluster: ClusterConfig) -> list[str]:
    """Step 2: every certificate again under the new CA (those not yet)."""
    files = _files(cluster)
    if not (files.next_cert.exists() and files.next_key.exists()):
        raise RotationRefused(f"no rotation under way ({files.next_cert} does not exist): run "
                              "`shardnode certs rotate begin` first")
    upcoming = Authority.load(files.next_cert.read_bytes(), files.next_key.read_bytes())
    if upcoming.certificate not in _certificates(files.ca_cert):
        raise RotationRefused(f"{files.ca_cert} does not trust the new CA yet: run `shardnode certs rotate begin`")
    done = []
    for name, cert_file, key_file, addresses in _issued_identities(cluster):
        if cert_file.exists() and _issued_by(cert_file, upcoming):
            continue
        issued = issue_certificate(upcoming, name, addresses=addresses)
        # The key first; until the certificate follows, readers keep the set they have (the pair does not match).
        write_private(key_file, issued.key_pem)
        write_private(cert_file, issued.cert_pem)
        done.append(f"issued {cert_file} under the new CA")
    return done


def finish(cluster: ClusterConfig) -> list[str]:
    """Step 3: trust the new CA only; it becomes the cluster's CA."""
    files = _files(cluster)
    if not (files.next_cert.exists() and files.next_key.exists()):
        if files.ca_key.exists() and len(_certificates(files.ca_cert)) == 1:
            return []       # finished already (a rerun after the last write)
        raise RotationRefused(f"no rotation under way ({files.next_cert} does not exist)")
    upcoming = Authority.load(files.next_cert.read_bytes(), files.next_key.read_bytes())
    stale = [str(cert_file) for _, cert_file, _, _ in _issued_identities(cluster)
             if not (cert_file.exists() and _issued_by(cert_file, upcoming))]
    if stale:
        raise RotationRefused(f"still issued by the old CA: {', '.join(stale)}; run `shardnode certs rotate issue`")
    write_private(files.ca_key, upcoming.key_pem)
    write_private(files.ca_cert, upcoming.cert_pem)
    files.next_cert.unlink(missing_ok=True)
    files.next_key.unlink(missing_ok=True)
    return [f"{files.ca_cert} trusts the new CA only; the old CA's key is gone"]


def _issued_by(cert_file: Path, authority: Authority) -> bool:
    certificate = x509.load_pem_x509_certificate(cert_file.read_bytes())
    try:
        certificate.verify_directly_issued_by(authority.certificate)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def _pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)
