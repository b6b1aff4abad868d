#!/bin/sh
# System packages the test suite can use but does not require.
#
# fuse3 (libfuse3 + fusermount3) lets tests/unit/test_lazyfs.py and the power-loss
# integration tests mount shardnode.testing.lazyfs.
# nftables (nft) and iproute2 (ip, tc) let the namespace-mode tests put each host in its
# own network namespace and cut or slow the links between them
# (tests/integration/test_partitions.py, docs/testing.md "Hosts in network namespaces").
# etcd-client (etcdctl) lets tests/integration/test_etcd_api.py drive the routers' etcd API
# with etcd's own command line (docs/etcd.md).
#
# Without them those tests skip, so this script never fails: it installs what it can and
# says in one line per package what will be skipped. It is quick when everything is present
# (no apt call at all), so `make test` can run it every time.

missing=""
command -v fusermount3 >/dev/null 2>&1 || missing="$missing fuse3"
command -v nft >/dev/null 2>&1 || missing="$missing nftables"
{ command -v ip >/dev/null 2>&1 && command -v tc >/dev/null 2>&1; } || missing="$missing iproute2"
command -v etcdctl >/dev/null 2>&1 || missing="$missing etcd-client"
[ -n "$missing" ] || exit 0

skipped() {
    # $1: package, $2: why it is not installed
    case "$1" in
        fuse3) what="the power-loss (lazyfs) tests" ;;
        etcd-client) what="the etcdctl checks of the etcd API tests" ;;
        *) what="the namespace-mode (network fault) tests" ;;
    esac
    echo "install-test-deps: $1 not installed ($2); $what will be skipped"
}

give_up() {
    for package in $missing; do skipped "$package" "$1"; done
    exit 0
}

[ "$(id -u)" = 0 ] || give_up "not root"
command -v apt-get >/dev/null 2>&1 || give_up "no apt-get"

export DEBIAN_FRONTEND=noninteractive
# The package lists may be missing or stale (fresh containers): update only if needed.
# shellcheck disable=SC2086  # $missing is a list of package names
if ! apt-get install -y -qq $missing >/dev/null 2>&1; then
    apt-get update -qq >/dev/null 2>&1 || give_up "apt-get update failed"
    for package in $missing; do
        apt-get install -y -qq "$package" >/dev/null 2>&1
    done
fi
for package in $missing; do
    case "$package" in
        fuse3) command -v fusermount3 >/dev/null 2>&1 ;;
        nftables) command -v nft >/dev/null 2>&1 ;;
        iproute2) command -v ip >/dev/null 2>&1 && command -v tc >/dev/null 2>&1 ;;
        etcd-client) command -v etcdctl >/dev/null 2>&1 ;;
    esac || skipped "$package" "apt-get install $package failed"
done
exit 0
