"""`certs rotate begin|issue|finish` and the channels' watch of the certificate
files (shardnode.cert_rotation, shardnode.channel_cache)."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509

from shardnode import cert_rotation
from shardnode.certs import init_cluster
from shardnode.channel_cache import CredentialWatch
from shardnode.config import ClusterConfig
from shardnode.security import write_private

from ..integration.ports import write_cluster_toml


@pytest.fixture
def cluster(tmp_path: Path) -> ClusterConfig:
    config = ClusterConfig.load(write_cluster_toml(tmp_path, hosts=3, tls=True))
    init_cluster(config)
    return config


def _authorities(path: Path) -> list[str]:
    return [c.subject.rfc4514_string() for c in x509.load_pem_x509_certificates(path.read_bytes())]


def _issuer(path: Path) -> str:
    return x509.load_pem_x509_certificate(path.read_bytes()).issuer.rfc4514_string()


def test_the_three_steps_overlap_trust_and_each_may_run_again(cluster: ClusterConfig) -> None:
    security = cluster.security
    (old_ca,) = _authorities(security.ca_file)
    assert cert_rotation.begin(cluster)
    assert cert_rotation.begin(cluster) == []          # a rerun changes nothing
    old, new = _authorities(security.ca_file)
    assert old == old_ca and new != old_ca
    assert _issuer(security.host_cert_file("h1")) == old_ca       # still the old CA's: both trusted

    assert len(cert_rotation.issue(cluster)) == 4      # three hosts and the clients
    assert cert_rotation.issue(cluster) == []
    assert {_issuer(security.host_cert_file(h.name)) for h in cluster.hosts} == {new}
    assert _issuer(security.client_cert_file) == new
    assert _authorities(security.ca_file) == [old, new]

    assert cert_rotation.finish(cluster)
    assert cert_rotation.finish(cluster) == []
    assert _authorities(security.ca_file) == [new]
    assert x509.load_pem_x509_certificate(security.ca_file.read_bytes()).public_key() \
        .public_numbers() == _ca_key_public_numbers(security.ca_key_file)
    assert not (security.certs_dir / "ca.next.crt").exists()


def _ca_key_public_numbers(path: Path):  # type: ignore[no-untyped-def]
    from cryptography.hazmat.primitives import serialization

    return serialization.load_pem_private_key(path.read_bytes(), password=None).public_key().public_numbers()


def test_steps_out_of_order_are_refused_and_change_nothing(cluster: ClusterConfig) -> None:
    security = cluster.security
    before = {p: p.read_bytes() for p in security.certs_dir.iterdir()}
    with pytest.raises(cert_rotation.RotationRefused, match="rotate begin"):
        cert_rotation.issue(cluster)
    with pytest.raises(cert_rotation.RotationRefused, match="no rotation under way"):
        cert_rotation.finish(_with_two_cas(cluster))
    cert_rotation.begin(cluster)
    with pytest.raises(cert_rotation.RotationRefused, match="still issued by the old CA"):
        cert_rotation.finish(cluster)
    assert security.ca_key_file.read_bytes() == before[security.ca_key_file]
    security.ca_key_file.unlink()
    (security.certs_dir / "ca.next.crt").unlink()
    with pytest.raises(cert_rotation.RotationRefused, match="where the CA's key is kept"):
        cert_rotation.begin(cluster)


def _with_two_cas(cluster: ClusterConfig) -> ClusterConfig:
    """`finish` with nothing under way and a ca.crt of two CAs (not a finished rotation)."""
    ca = cluster.security.ca_file
    write_private(ca, ca.read_bytes() * 2)
    return cluster


def test_the_watch_moves_only_when_the_files_form_a_whole_set_again(cluster: ClusterConfig) -> None:
    now = [0.0]
    watch = CredentialWatch(cluster.security, "h1", check_every=1.0, clock=lambda: now[0])
    assert watch.generation() == 0
    security = cluster.security
    other_key = security.host_key_file("h2").read_bytes()
    cert = security.host_cert_file("h1").read_bytes()
    write_private(security.host_key_file("h1"), other_key)      # a rotation halfway: the key, not yet the cert
    now[0] += 1.5
    assert watch.generation() == 0                              # a certificate and a key that do not match
    cert_rotation.begin(cluster)
    cert_rotation.issue(cluster)
    assert watch.generation() == 0                              # looked less than a second ago
    now[0] += 1.5
    assert watch.generation() == 1
    assert watch.generation() == 1
    assert security.host_cert_file("h1").read_bytes() != cert


def test_with_tls_off_the_watch_never_moves(tmp_path: Path) -> None:
    config = ClusterConfig.load(write_cluster_toml(tmp_path, hosts=3))
    assert CredentialWatch(config.security, "h1", check_every=0).generation() == 0
