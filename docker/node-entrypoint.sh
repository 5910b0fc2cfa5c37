#!/bin/sh
# Node container: initdb on first start with conf/node.conf, then run the
# server in the foreground on port 5432.
set -e
PGDATA=/var/lib/postgresql/data
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    initdb -D "$PGDATA" -U postgres --auth=trust -E UTF8 --no-locale
    cat /etc/multimaster/node.conf >> "$PGDATA/postgresql.conf"
    echo "listen_addresses = '*'" >> "$PGDATA/postgresql.conf"
    echo "host all all 0.0.0.0/0 trust" >> "$PGDATA/pg_hba.conf"
    echo "host replication all 0.0.0.0/0 trust" >> "$PGDATA/pg_hba.conf"
fi
exec postgres -D "$PGDATA" -p 5432
