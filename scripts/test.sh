#!/usr/bin/env bash
# Quick start, second command: the whole test suite (installs what is
# missing first). Every test starts its own cluster on free ports in a
# temporary directory; at the end no process the suite started may remain.
source "$(dirname "$0")/lib.sh"
install_packages
install_test_clients
build_and_install
cd "$REPO"
log "running the test suite"
status=0
cargo test --release --workspace --exclude multimaster -- --test-threads=2 || status=$?

# Tests stop their clusters on drop; anything left (a killed test binary)
# is reported and stopped here so the machine is clean either way.
left=$(pgrep -f 'mtm-test-' || true)
if [ -n "$left" ]; then
    log "processes left behind by the tests:"
    ps -o pid,args -p $left >&2 || true
    pkill -9 -f 'mtm-test-' || true
    status=1
fi
exit $status
