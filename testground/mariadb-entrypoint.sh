#!/bin/sh
# Entrypoint of the test ground's MariaDB images (Debian's packages). It keeps the official `mariadb`
# image's env contract, so the watcher meets in tests what it meets in life: MARIADB_ROOT_PASSWORD or
# MYSQL_ROOT_PASSWORD (or MARIADB_ALLOW_EMPTY_ROOT_PASSWORD), MARIADB_DATABASE / MYSQL_DATABASE,
# MARIADB_USER / MYSQL_USER with MARIADB_PASSWORD / MYSQL_PASSWORD (granted all on that database), each
# *_PASSWORD also as *_PASSWORD_FILE; on first start mariadb-install-db, a temporary server without
# networking for the SQL and /docker-entrypoint-initdb.d/*.sql, then mariadbd as PID 1 as user mysql.
set -eu
# printf, not echo: dash's echo would read the backslashes of an escaped password.
DATADIR=/var/lib/mysql

# file_env VAR: VAR from VAR, else from the file VAR_FILE names (the official image's helper).
file_env() {
    eval "value=\${$1:-}" "file=\${$1_FILE:-}"
    if [ -z "$value" ] && [ -n "$file" ]; then
        value=$(cat "$file")
    fi
    eval "$1=\$value"
}
# sql_string TEXT: TEXT as a quoted SQL string literal (backslashes and quotes escaped).
sql_string() {
    printf "'%s'" "$(printf '%s' "$1" | sed -e 's/\\/\\\\/g' -e "s/'/\\\\'/g")"
}

if [ "$(id -u)" = 0 ]; then
    mkdir -p "$DATADIR" /run/mysqld
    chown mysql:mysql "$DATADIR" /run/mysqld
    exec setpriv --reuid=mysql --regid=mysql --init-groups "$0" "$@"
fi

if [ ! -d "$DATADIR/mysql" ]; then
    for name in ROOT_PASSWORD DATABASE USER PASSWORD; do
        file_env "MARIADB_$name"
        file_env "MYSQL_$name"
        eval "[ -n \"\$MARIADB_$name\" ] || MARIADB_$name=\$MYSQL_$name"
    done
    if [ -z "$MARIADB_ROOT_PASSWORD" ] && [ -z "${MARIADB_ALLOW_EMPTY_ROOT_PASSWORD:-}" ]; then
        echo "error: MARIADB_ROOT_PASSWORD (or MYSQL_ROOT_PASSWORD, or a *_FILE of one) is not set" >&2
        exit 1
    fi
    # --rpm, as the official image: no host name check, which fails where Docker writes no /etc/hosts.
    mariadb-install-db --datadir="$DATADIR" --rpm --auth-root-authentication-method=normal --skip-test-db \
        --skip-name-resolve >/dev/null
    mariadbd --skip-networking --socket=/run/mysqld/init.sock --datadir="$DATADIR" &
    server=$!
    i=0
    until mariadb --protocol=socket --socket=/run/mysqld/init.sock -uroot -e 'SELECT 1' >/dev/null 2>&1; do
        i=$((i + 1))
        [ $i -lt 300 ] || { echo "error: the temporary server did not start" >&2; exit 1; }
        sleep 0.2
    done
    {
        printf '%s\n' "SET @@SESSION.SQL_LOG_BIN=0;"
        printf '%s\n' "DELETE FROM mysql.user WHERE user = '' OR (user = 'root' AND host NOT IN ('localhost'));"
        printf '%s\n' "SET PASSWORD FOR 'root'@'localhost' = PASSWORD($(sql_string "$MARIADB_ROOT_PASSWORD"));"
        printf '%s\n' "CREATE USER 'root'@'%' IDENTIFIED BY $(sql_string "$MARIADB_ROOT_PASSWORD");"
        printf '%s\n' "GRANT ALL ON *.* TO 'root'@'%' WITH GRANT OPTION;"
        if [ -n "$MARIADB_DATABASE" ]; then
            printf '%s\n' "CREATE DATABASE IF NOT EXISTS \`$MARIADB_DATABASE\`;"
        fi
        if [ -n "$MARIADB_USER" ]; then
            printf '%s\n' "CREATE USER '$MARIADB_USER'@'%' IDENTIFIED BY $(sql_string "$MARIADB_PASSWORD");"
            [ -z "$MARIADB_DATABASE" ] || printf '%s\n' "GRANT ALL ON \`$MARIADB_DATABASE\`.* TO '$MARIADB_USER'@'%';"
        fi
        printf '%s\n' "FLUSH PRIVILEGES;"
    } | mariadb --protocol=socket --socket=/run/mysqld/init.sock -uroot
    for f in /docker-entrypoint-initdb.d/*; do
        case "$f" in
            *.sql) MYSQL_PWD=$MARIADB_ROOT_PASSWORD mariadb --protocol=socket --socket=/run/mysqld/init.sock \
                -uroot ${MARIADB_DATABASE:+"$MARIADB_DATABASE"} <"$f" ;;
            *) ;;
        esac
    done
    kill "$server"
    wait "$server" || true
fi

exec mariadbd --datadir="$DATADIR" "$@"
