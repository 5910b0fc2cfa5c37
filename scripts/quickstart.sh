#!/usr/bin/env bash
# Quick start, first command: install what is missing, build and install the
# extension and the proxy, start a local 3-node cluster with the proxy.
# Extra arguments go to `mtmctl up` (e.g. --nodes 5).
source "$(dirname "$0")/lib.sh"
install_packages
build_and_install
cd "$REPO"
exec mtmctl up "$@"
