# backup-watcher: one container beside the databases, reaching Docker through its socket (or a
# socket proxy, see deploy/). Build:
#   docker build -t backup-watcher .
#   docker build --build-arg BASE_IMAGE=my-registry/python:3.11-slim-bookworm -t backup-watcher .
# The base must be Debian-based with python3 (>= 3.11) and python3-venv; the build reaches Debian's
# and PyPI's package registries (use --network host where builds have no default network).

ARG BASE_IMAGE=python:3.11-slim-bookworm

# --- restic, pinned: Debian trixie's 0.18 build, a static Go binary verified by apt's signatures -----
FROM ${BASE_IMAGE} AS restic
ARG RESTIC_DEB_VERSION=0.18.0-1+b4
ARG DEBIAN_MIRROR=http://deb.debian.org/debian
RUN set -eux; \
    mkdir -p /tmp/apt/lists/partial /tmp/apt/cache/archives/partial /tmp/restic; \
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] ${DEBIAN_MIRROR} trixie main" \
        > /tmp/apt/sources.list; \
    opts="-o Dir::Etc::SourceList=/tmp/apt/sources.list -o Dir::Etc::SourceParts=/dev/null \
          -o Dir::State::Lists=/tmp/apt/lists -o Dir::Cache=/tmp/apt/cache -o APT::Sandbox::User=root"; \
    apt-get $opts update -qq; \
    cd /tmp/restic && apt-get $opts download "restic=${RESTIC_DEB_VERSION}"; \
    dpkg -x /tmp/restic/restic_*.deb /tmp/restic/root; \
    install -m 0755 /tmp/restic/root/usr/bin/restic /restic; \
    /restic version | grep -q '^restic 0\.1[89]\.'

# --- the watcher and its Python dependencies, in a venv -------------------------------------------
FROM ${BASE_IMAGE} AS build
# EXTRA_CA_CERT: PEM text of a CA that a TLS-intercepting proxy between the build and PyPI uses.
# It is used by this stage only and does not reach the image.
ARG EXTRA_CA_CERT=""
RUN python3 -m venv /opt/watcher
COPY pyproject.toml README.md requirements.lock /src/
COPY watcher /src/watcher
COPY alerting /src/alerting
# The dependencies at the exact versions of requirements.lock (scripts/lock makes it), and nothing else:
# --no-deps, so a dependency missing from the lock fails `pip check` here instead of being resolved anew.
RUN set -eu; \
    if [ -n "$EXTRA_CA_CERT" ]; then \
        cat /etc/ssl/certs/ca-certificates.crt > /tmp/ca.pem; printf '%s\n' "$EXTRA_CA_CERT" >> /tmp/ca.pem; \
        export PIP_CERT=/tmp/ca.pem; \
    fi; \
    /opt/watcher/bin/pip install --no-cache-dir --disable-pip-version-check --no-deps \
        -r /src/requirements.lock /src; \
    /opt/watcher/bin/pip check; \
    /opt/watcher/bin/backup-watcher --version

# --- the image ------------------------------------------------------------------------------------
FROM ${BASE_IMAGE}
# The version is written once, in pyproject.toml (`backup-watcher --version` reads it); pass it for the label:
#   --build-arg VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
ARG VERSION=unspecified
ARG REVISION=unknown
ARG BASE_IMAGE
ARG WATCHER_UID=10001
# backup-watcher.role: the watcher's own container is never one of its targets, whatever pattern matches its name.
LABEL backup-watcher.role="watcher" \
      org.opencontainers.image.title="backup-watcher" \
      org.opencontainers.image.description="Backs up every PostgreSQL database running in Docker into restic, and proves the backups restore." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"
# tini is PID 1: it forwards SIGTERM to the watcher and reaps the helpers restic leaves behind.
RUN set -eux; \
    if ! command -v tini >/dev/null; then \
        apt-get update -qq && apt-get install -y -qq --no-install-recommends tini && rm -rf /var/lib/apt/lists/*; \
    fi; \
    groupadd --system --gid "${WATCHER_UID}" watcher; \
    useradd --system --uid "${WATCHER_UID}" --gid watcher --home-dir /nonexistent --shell /usr/sbin/nologin watcher; \
    mkdir -p /cache; chown watcher:watcher /cache
COPY --from=restic /restic /usr/local/bin/restic
COPY --from=build /opt/watcher /opt/watcher
ENV PATH=/opt/watcher/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONUNBUFFERED=1 \
    RESTIC_CACHE_DIR=/cache \
    WATCHER_METRICS_ADDRESS=0.0.0.0:9810
# The Docker socket's group is added at run time (`--group-add <gid>`, compose `group_add`): the
# image cannot know the host's GID.
USER watcher
EXPOSE 9810
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["python3", "-m", "watcher.healthcheck"]
ENTRYPOINT ["tini", "--", "backup-watcher"]
CMD ["run"]
