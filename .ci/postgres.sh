#!/usr/bin/env bash
# Install PostgreSQL's server binaries from Debian's packages, for the tests' throw-away cluster
# (tests/pg.py runs initdb and pg_ctl itself; no cluster is created or started here).
#
# The Debian package also creates the `postgres` system user: PostgreSQL refuses to run as root, so when
# CI runs the tests as root the cluster belongs to that user. Idempotent: does nothing when a server is
# installed and the user exists.
set -euo pipefail

have_server() {
    compgen -G "/usr/lib/postgresql/*/bin/initdb" > /dev/null
}

if ! have_server; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "postgres.sh: PostgreSQL is missing and installing it needs root" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    # postgresql-common would create and start a `main` cluster on port 5432: the tests need neither.
    mkdir -p /etc/postgresql-common/createcluster.d
    echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.d/graddiag-ci.conf
    apt-get install -y -q --no-install-recommends postgresql
fi

if ! id postgres > /dev/null 2>&1; then
    if [ "$(id -u)" -eq 0 ]; then
        useradd --system --home-dir /var/lib/postgresql --shell /bin/sh postgres
    fi
fi

have_server
echo "postgres.sh: $(ls -d /usr/lib/postgresql/*/bin | tail -n 1) ready"
