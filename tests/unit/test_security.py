"""[security] in cluster.toml, certificates, the admin credential and the
gatekeeper of every server (docs/security.md)."""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from shardnode.certs import CertsRefused, init_cluster
from shardnode.config import ClusterConfig, ConfigError
from shardnode.security import (
    ADMIN_METHODS,
    AdminCredential,
    Gatekeeper,
    SecurityError,
    SecurityStats,
    admin_metadata,
    ensure_admin_credential,
    host_token,
    load_admin_credential,
    write_private,
)
from shardnode.supervisor import host_config

ROOT = Path(__file__).resolve().parents[2]


def _raw(**security: object) -> dict:
    raw: dict = {
        "cluster": {"name": "sec", "replicas": 2, "groups": 1, "data_dir": "data"},
        "host": [{"name": f"h{i}", "address": f"127.0.0.{i}", "router_port": 50051, "worker_port_base": 50100,
                  "metrics_port": 9090} for i in (1, 2)],
    }
    if security:
        raw["security"] = security
    return raw


def test_security_is_off_by_default_and_in_the_local_cluster(tmp_path: Path) -> None:
    assert not ClusterConfig.load(ROOT / "etc" / "cluster.toml").security.tls
    cluster = ClusterConfig.from_dict(_raw(), source=tmp_path / "etc" / "cluster.toml")
    security = cluster.security
    assert not security.tls
    assert security.certs_dir == tmp_path / "data" / "certs"
    assert security.ca_file == security.certs_dir / "ca.crt"
    assert security.host_cert_file("h1") == security.certs_dir / "h1.crt"
    assert security.admin_file == security.certs_dir / "admin.credential"
    assert security.allowed_clients == ("client",)


def test_security_paths_are_taken_from_the_project_root(tmp_path: Path) -> None:
    cluster = ClusterConfig.from_dict(_raw(tls=True, certs_dir="pki", admin_file="/srv/admin.cred",
                                           allowed_clients=["app", "ops"]),
                                      source=tmp_path / "etc" / "cluster.toml")
    security = cluster.security
    assert security.tls and security.certs_dir == tmp_path / "pki"
    assert security.client_cert_file == tmp_path / "pki" / "client.crt"
    assert security.admin_file == Path("/srv/admin.cred")
    assert security.allowed_clients == ("app", "ops")


@pytest.mark.parametrize("security, field", [
    ({"tls": "yes"}, "security.tls"),
    ({"tls": 1}, "security.tls"),
    ({"certs_dir": 5}, "security.certs_dir"),
    ({"allowed_clients": "client"}, "security.allowed_clients"),
    ({"allowed_clients": ["bad name!"]}, "security.allowed_clients"),
    ({"cert_allowed_cn": ["x"]}, "security.cert_allowed_cn"),
])
def test_bad_security_settings_get_one_line_naming_the_field(security: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field) as error:
        ClusterConfig.from_dict(_raw(**security))
    assert "\n" not in str(error.value)


def _cluster(tmp_path: Path, tls: bool = True) -> ClusterConfig:
    raw = _raw(tls=tls)
    raw["cluster"]["data_dir"] = str(tmp_path / "data")
    return ClusterConfig.from_dict(raw)


def test_certs_init_writes_private_files_and_is_idempotent(tmp_path: Path) -> None:
    cluster = _cluster(tmp_path)
    written = init_cluster(cluster)
    names = sorted(p.name for p in written)
    assert names == sorted(["ca.crt", "ca.key", "h1.crt", "h1.key", "h2.crt", "h2.key", "client.crt", "client.key",
                            "admin.credential"])
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE(cluster.security.certs_dir.stat().st_mode) == 0o700
    host = x509.load_pem_x509_certificate(cluster.security.host_cert_file("h2").read_bytes())
    sans = host.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.2"]
    assert sans.get_values_for_type(x509.DNSName) == ["h2"]
    assert host.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == "h2"
    ca = x509.load_pem_x509_certificate(cluster.security.ca_file.read_bytes())
    host.verify_directly_issued_by(ca)
    # Again: nothing to do. A missing host certificate is issued by the same CA.
    assert init_cluster(cluster) == []
    cluster.security.host_cert_file("h1").unlink()
    assert sorted(p.name for p in init_cluster(cluster)) == ["h1.crt", "h1.key"]
    x509.load_pem_x509_certificate(cluster.security.host_cert_file("h1").read_bytes()).verify_directly_issued_by(ca)
    # --force: a new CA and every certificate again; the admin credential stays.
    admin = load_admin_credential(cluster.security)
    init_cluster(cluster, force=True)
    new_ca = x509.load_pem_x509_certificate(cluster.security.ca_file.read_bytes())
    assert new_ca.serial_number != ca.serial_number
    x509.load_pem_x509_certificate(cluster.security.client_cert_file.read_bytes()).verify_directly_issued_by(new_ca)
    assert load_admin_credential(cluster.security) == admin


def test_write_private_makes_an_existing_file_private(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_text("old")
    path.chmod(0o644)
    write_private(path, b"new")
    assert path.read_bytes() == b"new" and stat.S_IMODE(path.stat().st_mode) == 0o600


def test_the_admin_credential_is_made_once_and_read_strictly(tmp_path: Path) -> None:
    security = _cluster(tmp_path, tls=False).security
    with pytest.raises(SecurityError, match="no admin credential"):
        load_admin_credential(security)
    first = ensure_admin_credential(security)
    assert ensure_admin_credential(security) == first
    assert first.username == "admin" and len(first.password) >= 32
    assert first.password not in repr(first)
    assert stat.S_IMODE(security.admin_file.stat().st_mode) == 0o600
    for bad in ("nocolon", "admin:short", "admin:has spaces in the password!", ""):
        security.admin_file.write_text(bad)
        with pytest.raises(SecurityError) as error:
            load_admin_credential(security)
        assert "\n" not in str(error.value) and str(security.admin_file) in str(error.value)


def test_supervisord_configs_carry_their_hosts_token_only(tmp_path: Path) -> None:
    """Issue 20: every host's file held the cluster-wide admin password, also on its XML-RPC port."""
    cluster = _cluster(tmp_path, tls=False)
    admin = ensure_admin_credential(cluster.security)
    tokens = {}
    for host in ("h1", "h2"):
        text = host_config(cluster, host, config_path=tmp_path / "cluster.toml", project_root=tmp_path)
        assert admin.password not in text and "[inet_http_server]" not in text
        tokens[host] = host_token(admin, host)
        agent = text.split("[rpcinterface:shardnode]")[1].split("[supervisorctl]")[0]
        assert f"host={host}" in agent and f"token={tokens[host]}" in agent
        client = text.split("[supervisorctl]")[1]
        assert f"serverurl=unix://{tmp_path / 'data' / f'{host}.supervisor.sock'}" in client
    assert tokens["h1"] != tokens["h2"]


def test_host_tokens_are_distinct_and_follow_the_admin_password() -> None:
    admin = AdminCredential("admin", "x" * 32)
    token = host_token(admin, "h1")
    assert token == host_token(AdminCredential("admin", "x" * 32), "h1")      # derived, not stored
    assert len(token) >= 40 and token.replace("-", "").replace("_", "").isalnum() and admin.password not in token
    assert token not in {host_token(admin, "h2"), host_token(AdminCredential("admin", "y" * 32), "h1")}


# --- The gatekeeper, with TLS off: admin RPCs need the token, data RPCs do not -----------

ADMIN = next(iter(ADMIN_METHODS))
SERVICE, ADMIN_NAME = ADMIN.rsplit("/", 1)[0].lstrip("/"), ADMIN.rsplit("/", 1)[1]


async def _serve(gatekeeper: Gatekeeper) -> tuple[grpc.aio.Server, str]:
    async def echo(request: bytes, context) -> bytes:
        return request

    server = grpc.aio.server(interceptors=[gatekeeper])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
        ADMIN_NAME: grpc.unary_unary_rpc_method_handler(echo),
        "Status": grpc.unary_unary_rpc_method_handler(echo),
    }),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


async def _code(address: str, method: str, metadata=()) -> grpc.StatusCode:
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            await channel.unary_unary(f"/{SERVICE}/{method}")(b"x", metadata=metadata, timeout=5)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def test_admin_rpcs_need_the_token_and_data_rpcs_do_not(tmp_path: Path) -> None:
    admin = ensure_admin_credential(_cluster(tmp_path, tls=False).security)

    async def main() -> None:
        stats = SecurityStats()
        server, address = await _serve(Gatekeeper(tls=False, allowed=frozenset(), admin=admin, stats=stats))
        try:
            assert await _code(address, "Status") is grpc.StatusCode.OK
            assert await _code(address, ADMIN_NAME) is grpc.StatusCode.UNAUTHENTICATED
            wrong = (("authorization", "Bearer " + "x" * len(admin.password)),)
            assert await _code(address, ADMIN_NAME, wrong) is grpc.StatusCode.UNAUTHENTICATED
            assert await _code(address, ADMIN_NAME, (("authorization", admin.password),)) is \
                grpc.StatusCode.UNAUTHENTICATED
            assert await _code(address, ADMIN_NAME, admin_metadata(admin)) is grpc.StatusCode.OK
        finally:
            await server.stop(None)
        assert stats.refused == {"admin_token_missing": 1, "admin_token_wrong": 2}
        # A server without a credential refuses every admin call.
        server, address = await _serve(Gatekeeper(tls=False, allowed=frozenset(), admin=None, stats=SecurityStats()))
        try:
            assert await _code(address, ADMIN_NAME, admin_metadata(admin)) is grpc.StatusCode.UNAUTHENTICATED
            assert await _code(address, "Status") is grpc.StatusCode.OK
        finally:
            await server.stop(None)

    asyncio.run(main())


def test_concurrent_creators_of_the_admin_credential_agree(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    security = _cluster(tmp_path, tls=False).security
    with ThreadPoolExecutor(8) as pool:
        credentials = list(pool.map(lambda _: ensure_admin_credential(security), range(16)))
    assert len(set(credentials)) == 1
    assert sorted(p.name for p in security.admin_file.parent.iterdir()) == ["admin.credential"]


def test_certs_init_never_makes_a_ca_beside_a_hosts_certificates(tmp_path: Path) -> None:
    """A host laid out as the docs say (ca.crt, its own certificate and key,
    no ca.key): nothing missing is nothing to do; something missing is refused
    in one line, and no file is replaced or added (issue 20: a new CA was made
    and every certificate overwritten, cutting the host off)."""
    cluster = _cluster(tmp_path)
    init_cluster(cluster)
    security = cluster.security
    security.ca_key_file.unlink()
    before = {p.name: p.read_bytes() for p in security.certs_dir.iterdir()}
    assert init_cluster(cluster) == []
    security.host_cert_file("h2").unlink()
    security.host_key_file("h2").unlink()
    del before["h2.crt"], before["h2.key"]
    with pytest.raises(CertsRefused, match="cannot issue certificates for h2: .* but not .*ca.key") as refused:
        init_cluster(cluster)
    assert "\n" not in str(refused.value)
    assert {p.name: p.read_bytes() for p in security.certs_dir.iterdir()} == before


def test_certs_init_never_replaces_a_certificate_without_force(tmp_path: Path) -> None:
    cluster = _cluster(tmp_path)
    init_cluster(cluster)
    security = cluster.security
    security.host_key_file("h1").unlink()
    certificate = security.host_cert_file("h1").read_bytes()
    with pytest.raises(CertsRefused, match="h1.crt exists without its key"):
        init_cluster(cluster)
    assert security.host_cert_file("h1").read_bytes() == certificate
    # --force replaces everything, as documented.
    assert security.host_key_file("h1") in init_cluster(cluster, force=True)


def test_certs_init_command_refuses_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from shardnode.cli.main import main

    cluster = _cluster(tmp_path)
    init_cluster(cluster)
    cluster.security.ca_key_file.unlink()
    cluster.security.client_cert_file.unlink()
    config = tmp_path / "cluster.toml"
    hosts = "".join(f'[[host]]\nname = "h{i}"\naddress = "127.0.0.{i}"\nrouter_port = 50051\n'
                    f'worker_port_base = 50100\nmetrics_port = 9090\n' for i in (1, 2))
    config.write_text(f'[cluster]\nname = "sec"\nreplicas = 2\ngroups = 1\ndata_dir = "{tmp_path / "data"}"\n'
                      f'[security]\ntls = true\n{hosts}')
    assert main(["--config", str(config), "certs", "init"]) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("shardnode: cannot issue certificates for client") and "\n" not in err
