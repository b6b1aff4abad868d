#!/bin/sh
# System packages the test suite can use but does not require.
#
# fuse3 (libfuse3 + fusermount3) lets tests/unit/test_lazyfs.py and the power-loss
# integration tests mount shardnode.testing.lazyfs. Without it those tests skip, so this
# script never fails: it installs what it can and says in one line what will be skipped.
# It is quick when everything is present (no apt call at all), so `make test` can run it
# every time.

if command -v fusermount3 >/dev/null 2>&1; then
    exit 0
fi

skip_notice() {
    echo "install-test-deps: fuse3 not installed ($1); the power-loss (lazyfs) tests will be skipped"
    exit 0
}

[ "$(id -u)" = 0 ] || skip_notice "not root"
command -v apt-get >/dev/null 2>&1 || skip_notice "no apt-get"

export DEBIAN_FRONTEND=noninteractive
# The package lists may be missing or stale (fresh containers): update only if needed.
if ! apt-get install -y -qq fuse3 >/dev/null 2>&1; then
    apt-get update -qq >/dev/null 2>&1 || skip_notice "apt-get update failed"
    apt-get install -y -qq fuse3 >/dev/null 2>&1 || skip_notice "apt-get install fuse3 failed"
fi
command -v fusermount3 >/dev/null 2>&1 || skip_notice "fusermount3 still missing after install"
exit 0
