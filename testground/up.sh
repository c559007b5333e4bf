#!/usr/bin/env bash
# Brings up the real-parts test ground on a bare Debian bookworm machine (as root) and prints
# the environment that points at it, as `export` lines, on stdout. Everything it makes lives
# outside the clone, under $BW_TESTGROUND (default /var/lib/backup-watcher-test), so that
# images and tools survive between runs; every step is skipped when its product is there.
#
#   eval "$(testground/up.sh)"          # engine + PostgreSQL 15/17, MariaDB (bookworm 10.11, trixie 11.8) and
#                                       # Redis images + restic 0.18 + rest-server 0.13
#   BW_TESTGROUND_PARTS=engine,pg15 ... # only some parts (the demo needs no PG 17)
#
# Progress goes to stderr; only the export lines go to stdout.
set -euo pipefail

TG=${BW_TESTGROUND:-/var/lib/backup-watcher-test}
RUN=${BW_TESTGROUND_RUN:-/run/backup-watcher-test}
PARTS=${BW_TESTGROUND_PARTS:-engine,pg15,pg17,restic,restserver,prometheus,pybase,proxy,mariadb,redis}
MIRROR=${BW_DEBIAN_MIRROR:-http://deb.debian.org/debian}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# BW_ENGINE_HOST: use this already running engine instead of starting a private one.
ENGINE_HOST=${BW_ENGINE_HOST:-unix://$RUN/docker.sock}

log() { printf 'testground: %s\n' "$*" >&2; }

# Removes a rootfs left by an interrupted debootstrap: unmount what it mounted (proc, sys) first,
# so that rm never walks into a live /proc or /sys.
remove_rootfs() {
    local root=$1
    local mounted
    mounted=$(findmnt -rn -o TARGET | grep -F "$root/" | sort -r || true)
    for mountpoint in $mounted; do
        umount -l "$mountpoint" || true
    done
    if findmnt -rn -o TARGET | grep -qF "$root/"; then
        log "refusing to remove $root: something is still mounted under it"
        exit 1
    fi
    rm -rf "$root"
}
want() { [[ ",$PARTS," == *",$1,"* ]]; }

mkdir -p "$TG/bin" "$RUN"
# One set-up at a time: two runs must not debootstrap into the same directory.
exec 9>"$TG/.lock"
flock 9

apt_ready=0
apt_install() {
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ $apt_ready -eq 0 ]; then
        log "apt-get update"
        apt-get update -qq >&2
        apt_ready=1
    fi
    log "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
}

# --- packages of Debian trixie, unpacked into $TG/tools (bookworm's are too old) -------------------
# Downloads package $1 from a private trixie source (the host's own apt sources stay as they are) and
# unpacks it into $TG/tools/$2.
fetch_trixie_package() {
    local package=$1 into=$2
    log "fetching $package from Debian trixie"
    local apt_dir="$TG/apt-trixie"
    mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$apt_dir/debs"
    chmod 755 "$apt_dir/debs"
    chown _apt "$apt_dir/debs" 2>/dev/null || true
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $MIRROR trixie main" >"$apt_dir/sources.list"
    local opts=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o Dir::Etc::SourceParts=/dev/null
        -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache" -o APT::Get::List-Cleanup=0)
    apt-get "${opts[@]}" update -qq >&2
    (cd "$apt_dir/debs" && rm -f "${package}"_*.deb && apt-get "${opts[@]}" download "$package" >&2)
    rm -rf "$TG/tools/$into"
    mkdir -p "$TG/tools"
    dpkg -x "$apt_dir/debs/${package}"_*.deb "$TG/tools/$into"
}

# --- restic 0.18 ------------------------------------------------------------------------------------
install_restic() {
    if [ -x "$TG/bin/restic" ] && "$TG/bin/restic" version 2>/dev/null | grep -q 'restic 0.1[89]'; then
        return 0
    fi
    fetch_trixie_package restic restic
    ln -sf "$TG/tools/restic/usr/bin/restic" "$TG/bin/restic"
    "$TG/bin/restic" version >&2
}

# --- restic's rest-server 0.13: a remote backend, and its --append-only mode for least privilege ----
install_rest_server() {
    if [ -x "$TG/bin/rest-server" ] && "$TG/bin/rest-server" --version 2>/dev/null | grep -q '0\.13'; then
        return 0
    fi
    fetch_trixie_package restic-rest-server rest-server
    ln -sf "$TG/tools/rest-server/usr/bin/restic-rest-server" "$TG/bin/rest-server"
    "$TG/bin/rest-server" --version >&2
}

# --- Debian bookworm's restic 0.14, only to prove that a too-old restic is refused ------------
install_old_restic() {
    [ -x "$TG/bin/restic-0.14" ] && return 0
    log "fetching bookworm's restic 0.14 (for the version-gate test)"
    local debs="$TG/apt-bookworm"
    mkdir -p "$debs"
    chmod 755 "$debs"
    chown _apt "$debs" 2>/dev/null || true
    if ! (cd "$debs" && rm -f restic_*.deb && apt-get download restic >&2 2>/dev/null); then
        apt-get update -qq >&2
        (cd "$debs" && apt-get download restic >&2)
    fi
    rm -rf "$TG/tools/restic-0.14"
    mkdir -p "$TG/tools"
    dpkg -x "$debs"/restic_*.deb "$TG/tools/restic-0.14"
    ln -sf "$TG/tools/restic-0.14/usr/bin/restic" "$TG/bin/restic-0.14"
}

# --- a private Docker engine: no bridge, no iptables ------------------------------------------
engine_alive() { DOCKER_HOST="$ENGINE_HOST" timeout 5 docker info >/dev/null 2>&1; }
start_engine() {
    if engine_alive; then return 0; fi
    if [ -n "${BW_ENGINE_HOST:-}" ]; then
        log "the engine at BW_ENGINE_HOST=$BW_ENGINE_HOST does not answer"
        exit 1
    fi
    if [ -f "$RUN/dockerd.pid" ] && kill -0 "$(cat "$RUN/dockerd.pid")" 2>/dev/null; then
        kill "$(cat "$RUN/dockerd.pid")" || true
        sleep 2
    fi
    log "starting dockerd (data root $TG/docker)"
    mkdir -p "$TG/docker" "$RUN/exec"
    # setsid: the engine outlives the shell that started it, and a test run can restart it.
    # 9>&-: it must not inherit the set-up lock, or it would hold it for as long as it runs.
    setsid dockerd --data-root "$TG/docker" --exec-root "$RUN/exec" --host "unix://$RUN/docker.sock" \
        --pidfile "$RUN/dockerd.pid" --bridge=none --iptables=false --ip-masq=false \
        >"$RUN/dockerd.log" 2>&1 </dev/null 9>&- &
    for _ in $(seq 1 100); do
        engine_alive && return 0
        sleep 0.2
    done
    log "dockerd did not come up; its log:"
    tail -n 30 "$RUN/dockerd.log" >&2
    exit 1
}

# --- PostgreSQL images from Debian packages, following the official image's env contract -------
build_pg_image() {
    local major=$1 suite=$2 tag="backup-watcher-test/postgres:$1"
    local image_version
    image_version=$(sha256sum "$HERE/pg-entrypoint.sh" | cut -c1-12)
    if DOCKER_HOST="$ENGINE_HOST" docker image inspect "$tag" \
        --format '{{index .Config.Labels "backup-watcher-test.entrypoint"}}' 2>/dev/null | grep -qx "$image_version"; then
        return 0
    fi
    local root="$TG/rootfs/pg$major"
    if [ ! -x "$root/usr/lib/postgresql/$major/bin/postgres" ]; then
        log "debootstrap $suite with postgresql-$major (about a minute)"
        remove_rootfs "$root"
        mkdir -p "$root"
        debootstrap --variant=minbase --include="postgresql-$major,postgresql-client-$major,util-linux" \
            "$suite" "$root" "$MIRROR" >"$TG/rootfs/pg$major.log" 2>&1 || {
            tail -n 30 "$TG/rootfs/pg$major.log" >&2
            exit 1
        }
        rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    fi
    install -m 0755 "$HERE/pg-entrypoint.sh" "$root/usr/local/bin/docker-entrypoint.sh"
    mkdir -p "$root/docker-entrypoint-initdb.d"
    log "importing $tag"
    tar -C "$root" -c . | DOCKER_HOST="$ENGINE_HOST" docker import \
        -c 'ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]' \
        -c "ENV PATH=/usr/lib/postgresql/$major/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
        -c "ENV PGDATA=/var/lib/postgresql/data" -c "ENV PG_MAJOR=$major" -c 'ENV LANG=C.UTF-8' \
        -c "LABEL backup-watcher-test.entrypoint=$image_version" \
        - "$tag" >/dev/null
}

# --- MariaDB and Redis images from Debian packages (engines beside PostgreSQL, SPEC §13) -----------
# debootstrap_rootfs NAME SUITE PACKAGES: a minbase root file system under $TG/rootfs/NAME with PACKAGES,
# made once (about two minutes each on a bare machine, mostly downloads; the three run at once).
debootstrap_rootfs() {
    local name=$1 suite=$2 packages=$3 root="$TG/rootfs/$1"
    [ -f "$root/.complete" ] && return 0
    log "debootstrap $suite with $packages (about two minutes)"
    remove_rootfs "$root"
    mkdir -p "$root"
    debootstrap --variant=minbase --include="$packages" "$suite" "$root" "$MIRROR" >"$TG/rootfs/$name.log" 2>&1 || {
        tail -n 30 "$TG/rootfs/$name.log" >&2
        exit 1
    }
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    touch "$root/.complete"
}

have_image() { DOCKER_HOST="$ENGINE_HOST" docker image inspect "$1" >/dev/null 2>&1; }

# MariaDB of Debian SUITE as backup-watcher-test/mariadb:SUITE, with the official image's env contract
# (testground/mariadb-entrypoint.sh). Debian's postinst made a data directory: it goes, so that the
# first start initialises one from the env as the official image does.
build_mariadb_image() {
    local suite=$1 tag="backup-watcher-test/mariadb:$1"
    local image_version
    image_version=$(sha256sum "$HERE/mariadb-entrypoint.sh" | cut -c1-12)
    if DOCKER_HOST="$ENGINE_HOST" docker image inspect "$tag" \
        --format '{{index .Config.Labels "backup-watcher-test.entrypoint"}}' 2>/dev/null | grep -qx "$image_version"; then
        return 0
    fi
    local root="$TG/rootfs/mariadb-$suite"
    debootstrap_rootfs "mariadb-$suite" "$suite" mariadb-server,mariadb-client,util-linux  # made already: a no-op
    rm -rf "$root"/var/lib/mysql/*
    install -m 0755 "$HERE/mariadb-entrypoint.sh" "$root/usr/local/bin/docker-entrypoint.sh"
    mkdir -p "$root/docker-entrypoint-initdb.d"
    log "importing $tag"
    tar -C "$root" --exclude=./.complete -c . | DOCKER_HOST="$ENGINE_HOST" docker import \
        -c 'ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]' \
        -c "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" -c 'ENV LANG=C.UTF-8' \
        -c "LABEL backup-watcher-test.entrypoint=$image_version" \
        - "$tag" >/dev/null
}

# Redis of Debian bookworm as backup-watcher-test/redis:bookworm: the official image's way of running
# (redis-server in the foreground, data in /data), for the engine=command tests.
build_redis_image() {
    local tag="backup-watcher-test/redis:bookworm"
    if DOCKER_HOST="$ENGINE_HOST" docker image inspect "$tag" >/dev/null 2>&1; then
        return 0
    fi
    local root="$TG/rootfs/redis-bookworm"
    debootstrap_rootfs redis-bookworm bookworm redis-server,redis-tools
    mkdir -p "$root/data"
    log "importing $tag"
    tar -C "$root" --exclude=./.complete -c . | DOCKER_HOST="$ENGINE_HOST" docker import \
        -c "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" -c 'ENV LANG=C.UTF-8' \
        -c 'WORKDIR /data' -c 'CMD ["redis-server", "--dir", "/data"]' - "$tag" >/dev/null
}

# --- a Python base image from Debian packages, for building the watcher's image without a registry ---
build_python_base() {
    local tag="backup-watcher-test/python-base:bookworm"
    if DOCKER_HOST="$ENGINE_HOST" docker image inspect "$tag" >/dev/null 2>&1; then
        return 0
    fi
    local root="$TG/rootfs/python-base"
    if [ ! -x "$root/usr/bin/python3" ]; then
        log "debootstrap bookworm with python3 (about a minute)"
        remove_rootfs "$root"
        mkdir -p "$root"
        debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,tini \
            bookworm "$root" "$MIRROR" >"$TG/rootfs/python-base.log" 2>&1 || {
            tail -n 30 "$TG/rootfs/python-base.log" >&2
            exit 1
        }
        rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    fi
    log "importing $tag"
    tar -C "$root" -c . | DOCKER_HOST="$ENGINE_HOST" docker import \
        -c "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" -c 'ENV LANG=C.UTF-8' \
        -c 'CMD ["python3"]' - "$tag" >/dev/null
}

need=(ca-certificates)
# An engine of the user's own (BW_ENGINE_HOST) needs only a docker client; never replace their packages.
if want engine && { [ -z "${BW_ENGINE_HOST:-}" ] || ! command -v docker >/dev/null; }; then
    need+=(docker.io)
fi
{ want pg15 || want pg17 || want pybase || want mariadb || want redis; } && need+=(debootstrap)
want proxy && need+=(haproxy docker-compose)
{ want restic || want restserver; } && need+=(gnupg)
want prometheus && need+=(prometheus)
# The progress tests drive a real terminal through it (tests/integration/test_progress.py).
need+=(tmux)
apt_install "${need[@]}"
want restic && install_restic && install_old_restic
want restserver && install_rest_server
if want engine; then
    start_engine
    want pg15 && build_pg_image 15 bookworm
    want pg17 && build_pg_image 17 trixie
    want pybase && build_python_base
    if want mariadb || want redis; then
        # The three root file systems download at once: about 2.5 minutes on a bare machine, not 6.
        rootfs_jobs=()
        for suite in bookworm trixie; do
            if want mariadb && ! have_image "backup-watcher-test/mariadb:$suite"; then
                debootstrap_rootfs "mariadb-$suite" "$suite" mariadb-server,mariadb-client,util-linux &
                rootfs_jobs+=($!)
            fi
        done
        if want redis && ! have_image backup-watcher-test/redis:bookworm; then
            debootstrap_rootfs redis-bookworm bookworm redis-server,redis-tools &
            rootfs_jobs+=($!)
        fi
        for job in "${rootfs_jobs[@]}"; do
            wait "$job" || { log "a debootstrap failed (see $TG/rootfs/*.log)"; exit 1; }
        done
    fi
    if want mariadb; then build_mariadb_image bookworm && build_mariadb_image trixie; fi
    want redis && build_redis_image
fi

echo "export DOCKER_HOST=$ENGINE_HOST"
echo "export BW_TEST_DOCKERD_PIDFILE=$RUN/dockerd.pid"
echo "export BW_TESTGROUND=$TG"
echo "export BW_TESTGROUND_RUN=$RUN"
echo "export PATH=$TG/bin:\$PATH"
