# Shared steps of scripts/quickstart.sh and scripts/test.sh. Every step
# checks first and does only what is missing, so re-running is cheap.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config
PGRX_VERSION=0.18.0
export PATH="$HOME/.cargo/bin:$PATH"

log() { printf '==> %s\n' "$*" >&2; }

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"
    elif command -v sudo >/dev/null; then sudo "$@"
    else log "need root for: $*"; exit 1
    fi
}

# Debian packages: PostgreSQL 15 server + headers (pgrx), clang for bindgen,
# acl (the launcher grants the postgres user access to the data directory),
# pgbouncer and haproxy (benchmark baselines), and the client stacks the tests drive.
DEB_PACKAGES=(postgresql-15 postgresql-server-dev-15 postgresql-client-15 clang libclang-dev acl
              pgbouncer haproxy openssl)
# What the driver tests (tests/clients/) run with.
TEST_DEB_PACKAGES=(libpostgresql-jdbc-java)

install_packages() {
    local missing=()
    for p in "${DEB_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing Debian packages: ${missing[*]}"
        as_root apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
    # The packaged default cluster (port 5432) is not ours; leave it stopped.
    command -v cargo >/dev/null || { log "cargo not found: install Rust (rustup) first"; exit 1; }
    if ! cargo pgrx --version 2>/dev/null | grep -q " $PGRX_VERSION"; then
        log "installing cargo-pgrx $PGRX_VERSION (a few minutes)"
        cargo install cargo-pgrx --version "$PGRX_VERSION" --locked --quiet
    fi
    if ! grep -qs '^pg15' "${PGRX_HOME:-$HOME/.pgrx}/config.toml"; then
        log "cargo pgrx init (system PostgreSQL 15)"
        cargo pgrx init --pg15 "$PG_CONFIG" >/dev/null
    fi
}

# The extension into PostgreSQL's directories, mtm-proxy and mtmctl into
# /usr/local/bin (or ~/.cargo/bin without root).
build_and_install() {
    log "building and installing the multimaster extension"
    (cd "$REPO/extension" && if [ "$(id -u)" = 0 ]; then
        cargo pgrx install --release --pg-config "$PG_CONFIG" >/dev/null
    else
        cargo pgrx install --release --sudo --pg-config "$PG_CONFIG" >/dev/null
    fi)
    log "building mtm-proxy and mtmctl"
    (cd "$REPO" && cargo build --release --quiet)
    local dest=/usr/local/bin
    [ "$(id -u)" = 0 ] || dest="$HOME/.cargo/bin"
    install -m 755 "$REPO/target/release/mtm-proxy" "$REPO/target/release/mtmctl" "$dest/"
}

# The drivers tests/clients/ exercise: psycopg 3 and asyncpg (PyPI),
# node-postgres (npm), the PostgreSQL JDBC driver (Debian) with a JDK.
install_test_clients() {
    local missing=()
    for p in "${TEST_DEB_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    command -v javac >/dev/null || missing+=(openjdk-17-jdk-headless)
    command -v node >/dev/null || missing+=(nodejs)
    command -v npm >/dev/null || missing+=(npm)
    command -v python3 >/dev/null || missing+=(python3 python3-pip)
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing Debian packages for the driver tests: ${missing[*]}"
        as_root apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
    if ! python3 -c 'import psycopg, asyncpg' 2>/dev/null; then
        log "installing psycopg 3 and asyncpg"
        python3 -m pip install -q --root-user-action=ignore 'psycopg[binary]>=3.1' 'asyncpg>=0.29' \
            || python3 -m pip install -q --break-system-packages 'psycopg[binary]>=3.1' 'asyncpg>=0.29'
    fi
    if [ ! -d "$REPO/tests/clients/node_modules/pg-cursor" ]; then
        log "installing node-postgres"
        (cd "$REPO/tests/clients" && npm install --silent --no-audit --no-fund)
    fi
}
