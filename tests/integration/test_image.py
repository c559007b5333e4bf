"""The container image: builds without a registry, runs as non-root, backs up through the socket and
through the least-privilege proxy, stops cleanly; the proxy refuses everything else."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import (
    BIG_TABLE,
    TEST_HOST,
    TEST_LABEL,
    PgContainer,
    Repo,
    StartPg,
    docker,
    wait_for,
    wait_for_copy,
)

pytestmark = [pytest.mark.engine, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
IMAGE = "backup-watcher:test"
# The watcher containers' host identity, one per pytest-xdist worker: a watcher removes the drill containers of
# its own identity at start (and a one-shot `drill` at its own), so two of these tests on two workers under one
# identity took each other's running drill container for a leftover (404 while waiting for it: CI, session 8).
IMAGE_HOST = f"image-{TEST_HOST}"  # conftest's identity of this worker
BASE_IMAGE = "backup-watcher-test/python-base:bookworm"


def engine_socket() -> str:
    return os.environ["DOCKER_HOST"].removeprefix("unix://")


def extra_ca_certs() -> str:
    """CAs this machine trusts beyond Debian's (a TLS-intercepting proxy to PyPI), for the build stage."""
    extra = sorted(Path("/usr/local/share/ca-certificates").glob("*.crt"))
    return "".join(path.read_text() for path in extra)


@pytest.fixture(scope="module")
def image() -> str:
    done = subprocess.run(["docker", "build", "--network", "host", "--build-arg", f"BASE_IMAGE={BASE_IMAGE}",
                           "--build-arg", f"EXTRA_CA_CERT={extra_ca_certs()}", "-t", IMAGE, str(ROOT)],
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return IMAGE


class Proxy:
    """The shipped HAProxy configuration, listening on a unix socket instead of :2375."""

    def __init__(self, directory: Path, allow_drills: bool) -> None:
        self.socket = directory / "docker-proxy.sock"
        config = (ROOT / "deploy" / "socket-proxy" / "haproxy.cfg").read_text()
        assert "    bind :2375\n" in config
        config = config.replace("    bind :2375\n", f"    bind unix@{self.socket} mode 666\n")
        (directory / "haproxy.cfg").write_text(config)
        env = {**os.environ, "DOCKER_SOCKET": engine_socket(), "ALLOW_DRILLS": "1" if allow_drills else "0"}
        checked = subprocess.run(["haproxy", "-c", "-f", str(directory / "haproxy.cfg")], env=env,
                                 capture_output=True, text=True)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        # HAProxy leaves its socket file behind when it stops, and binds a new one by renaming over it: the
        # previous proxy's file would pass for this one's, and a container started then mounts that dead
        # inode (its daemon exits: "cannot reach the Docker engine"; CI, session 8).
        self.socket.unlink(missing_ok=True)
        self.proc = subprocess.Popen(["haproxy", "-db", "-f", str(directory / "haproxy.cfg")], env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self._accepts, 10, "the proxy socket")

    def _accepts(self) -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            try:
                sock.connect(str(self.socket))
            except OSError:
                return False
        return True

    def request(self, method: str, path: str, body: dict[str, object] | None = None) -> int:
        """Sends one API request through the proxy; returns the HTTP status.

        A refusal may arrive (and the proxy close) before the body is sent: the status is read anyway.
        """
        payload = json.dumps(body).encode() if body is not None else b""
        raw = (f"{method} {path} HTTP/1.1\r\nHost: docker\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n").encode() + payload
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(30)
            sock.connect(str(self.socket))
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(raw)
            status_line = sock.makefile("rb").readline().decode()
        return int(status_line.split()[1])

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self.socket.unlink(missing_ok=True)


@pytest.fixture
def proxy_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "proxy"
    directory.mkdir()
    return directory


def run_watcher_container(name: str, repo_dir: Path, secrets_dir: Path, docker_sock: str, pattern: str,
                          extra_env: dict[str, str] | None = None) -> None:
    gid = os.stat(docker_sock).st_gid
    env = {"RESTIC_REPOSITORY": "/repo", "RESTIC_PASSWORD_FILE": "/run/secrets/restic_password",
           "WATCHER_INIT_REPOSITORY": "true", "WATCHER_CONTAINER_PATTERNS": pattern,
           "WATCHER_HOST": IMAGE_HOST, "DOCKER_HOST": "unix:///var/run/docker.sock", **(extra_env or {})}
    docker("rm", "-f", name, check=False)  # a leftover of an interrupted run
    argv = ["run", "-d", "--name", name, "--network", "none", "--label", TEST_LABEL, "--group-add", str(gid),
            "-v", f"{docker_sock}:/var/run/docker.sock", "-v", f"{repo_dir}:/repo",
            "-v", f"{secrets_dir}:/run/secrets:ro"]
    for key, value in env.items():
        argv += ["-e", f"{key}={value}"]
    docker(*argv, IMAGE)
    # Its start removes the drill containers of its identity: a drill exec'd before that would lose its own.
    def watching() -> bool:
        logs = docker("logs", name, check=False)
        if '"event": "watching"' in logs.stdout + logs.stderr:
            return True
        running = docker("inspect", "--format", "{{.State.Running}}", name, check=False).stdout.strip()
        assert running == "true", f"the watcher container exited before watching:\n{logs.stdout}{logs.stderr}"
        return False
    try:
        wait_for(watching, 120, "the watcher container's daemon to be watching", interval=0.5)
    except AssertionError as timed_out:
        logs = docker("logs", "--tail", "40", name, check=False)
        raise AssertionError(f"{timed_out}; its log ends:\n{logs.stdout}{logs.stderr}") from None


@pytest.fixture
def secrets_dir(tmp_path: Path, repo: Repo) -> Path:
    directory = tmp_path / "secrets"
    directory.mkdir()
    (directory / "restic_password").write_text(repo.password + "\n")
    # The watcher runs as uid 10001: it must read the secret and write the repository.
    os.chmod(directory / "restic_password", 0o444)
    return directory


@pytest.fixture
def repo_dir(repo: Repo) -> Iterator[Path]:
    repo.path.mkdir(parents=True)
    shutil.chown(repo.path, 10001, 10001)
    yield repo.path
    subprocess.run(["chown", "-R", "root:root", str(repo.path)], check=False)


@pytest.mark.timeout(2400)  # the module's image build (its own bound: 1800 s) counts towards the first test
def test_image_runs_as_non_root_backs_up_through_the_socket_and_stops_cleanly(
        image: str, start_pg: StartPg, repo: Repo, repo_dir: Path, secrets_dir: Path) -> None:
    db: PgContainer = start_pg("bwt-img-db", "17")
    db.psql(BIG_TABLE)
    name = "bwt-img-watcher"  # its own pattern below matches it: the image's role label keeps it from being a target
    try:
        # docker stop in the middle of the first dump: exit 0 within seconds, no partial snapshot.
        run_watcher_container(name, repo_dir, secrets_dir, engine_socket(), "bwt-img-*",
                              {"WATCHER_SHUTDOWN_GRACE": "0"})
        wait_for_copy(db)
        started = time.monotonic()
        docker("stop", name)  # the default 10 s timeout: SIGKILL after it would mean tini failed
        stopped_in = time.monotonic() - started
        state = json.loads(docker("inspect", name).stdout)[0]["State"]
        assert state["ExitCode"] == 0, docker("logs", name).stdout[-3000:]
        assert stopped_in < 8, stopped_in
        assert repo.snapshots_of(db.name) == []
        assert "no errors were found" in repo.restic("check").stdout
        docker("rm", name)

        # The same image, left alone: discovers the database through the socket and backs it up.
        run_watcher_container(name, repo_dir, secrets_dir, engine_socket(), "bwt-img-*")
        wait_for(lambda: len(repo.snapshots_of(db.name)) == 1, 180, "the backup from the image", interval=1)
        info = json.loads(docker("inspect", name).stdout)[0]
        assert docker("exec", name, "id", "-u").stdout.strip() == "10001"
        assert info["Config"]["User"] == "watcher"
        assert info["Config"]["Entrypoint"] == ["tini", "--", "backup-watcher"]
        assert info["Config"]["Labels"]["org.opencontainers.image.title"] == "backup-watcher"
        assert info["Config"]["Labels"]["backup-watcher.role"] == "watcher"
        status = docker("exec", name, "backup-watcher", "status").stdout
        assert db.name in status and name not in status, status
        assert "restic 0.18" in docker("exec", name, "restic", "version").stdout
        assert docker("exec", name, "python3", "-m", "watcher.healthcheck").returncode == 0
        # The password came from a file: it is in no part of the container's configuration or argv.
        assert repo.password not in json.dumps(info)
        assert repo.password not in docker("exec", name, "sh", "-c", "cat /proc/[0-9]*/cmdline").stdout
        history = docker("history", "--no-trunc", "--format", "{{.CreatedBy}}", image).stdout
        assert repo.password not in history
    finally:
        docker("rm", "-f", name, check=False)


@pytest.mark.timeout(2400)  # the module's image build (its own bound: 1800 s) when this test runs first
def test_image_through_the_socket_proxy_and_what_the_proxy_refuses(
        image: str, start_pg: StartPg, repo: Repo, repo_dir: Path, secrets_dir: Path, proxy_dir: Path) -> None:
    db: PgContainer = start_pg("bwt-proxied-db", "15")
    db.psql("CREATE TABLE t AS SELECT g FROM generate_series(1, 1000) AS g;")
    name = "bwt-watcher-proxied"
    leftovers = docker("ps", "-aq", "--filter", f"label=backup-watcher.drill-host={IMAGE_HOST}").stdout.split()
    if leftovers:
        docker("rm", "-f", "-v", *leftovers)
    proxy = Proxy(proxy_dir, allow_drills=False)
    try:
        # Outside the allowed set: refused.
        assert proxy.request("POST", "/v1.41/images/create?fromImage=alpine&tag=latest") == 403
        assert proxy.request("POST", "/v1.41/volumes/create", {"Name": "bwt-should-not-exist"}) == 403
        assert proxy.request("POST", "/v1.41/containers/create?name=bwt-nope", {"Image": "x"}) == 403
        assert proxy.request("DELETE", f"/v1.41/containers/{db.name}?force=1") == 403
        assert proxy.request("POST", f"/v1.41/containers/{db.name}/stop") == 403
        assert proxy.request("GET", "/v1.41/containers/json") == 200
        assert "bwt-should-not-exist" not in docker("volume", "ls", "--format", "{{.Name}}").stdout

        run_watcher_container(name, repo_dir, secrets_dir, str(proxy.socket), "bwt-proxied-*")
        wait_for(lambda: len(repo.snapshots_of(db.name)) == 1, 180, "the backup through the proxy", interval=1)
        drill = docker("exec", name, "backup-watcher", "drill", db.name, check=False, timeout=300)
        assert drill.returncode == 1
        assert "403" in drill.stdout + drill.stderr
        docker("rm", "-f", name)
    finally:
        proxy.stop()

    # With drills allowed, container create/start/remove pass the proxy; Debian bookworm's HAProxy 2.6
    # answers the exec upgrade with 200 instead of 101 (haproxy/haproxy#2684), which cannot carry the
    # dump into pg_restore: the drill must fail at once with that reason, never hang, and leave nothing.
    allowed = Proxy(proxy_dir, allow_drills=True)
    try:
        run_watcher_container(name, repo_dir, secrets_dir, str(allowed.socket), "bwt-proxied-*")
        started = time.monotonic()
        drill = docker("exec", name, "backup-watcher", "drill", db.name, check=False, timeout=300)
        output = drill.stdout + drill.stderr
        if drill.returncode == 0:
            assert "public.t: dump 1000, restored 1000" in drill.stdout  # a proxy without the bug
        else:
            assert drill.returncode == 1, output
            assert "did not upgrade the exec connection" in output, output
            assert time.monotonic() - started < 120
        leftovers = docker("ps", "-aq", "--filter", f"label=backup-watcher.drill-host={IMAGE_HOST}").stdout.split()
        assert leftovers == [], "the drill container was removed through the proxy"
    finally:
        docker("rm", "-f", name, check=False)
        allowed.stop()


def test_compose_example_is_valid(tmp_path: Path) -> None:
    deploy = tmp_path / "deploy"
    shutil.copytree(ROOT / "deploy", deploy)
    for example in (deploy / "secrets").glob("*.example"):
        example.with_suffix("").write_text(example.read_text())
    for shipped in ("prometheus", "grafana"):
        shutil.copytree(ROOT / shipped, tmp_path / shipped)
    shutil.copy(ROOT / "Dockerfile", tmp_path / "Dockerfile")
    done = subprocess.run(["docker-compose", "-f", str(deploy / "docker-compose.example.yml"), "config"],
                          capture_output=True, text=True, env={**os.environ, "DOCKER_GID": "999"})
    assert done.returncode == 0, done.stderr
    for service in ("socket-proxy:", "watcher:", "prometheus:", "grafana:", "log-shipper:"):
        assert service in done.stdout
    assert "tcp://socket-proxy:2375" in done.stdout
    # No secret value in the file itself, and the watcher never mounts the Docker socket.
    watcher_section = done.stdout.split("  watcher:", 1)[1].split("\n  [a-z]", 1)[0]
    assert "docker.sock" not in watcher_section.split("\n  log-shipper:")[0].split("\n  prometheus:")[0]
    # The header a newcomer follows names every secret file the file needs, and the repository's creation.
    source = (ROOT / "deploy" / "docker-compose.example.yml").read_text()
    header = source.split("\nservices:", 1)[0]
    needed = re.findall(r"file: \./secrets/(\w+)", source)
    assert len(needed) == 5
    for name in needed:
        assert name in header, f"the header does not say to create deploy/secrets/{name}"
    assert "WATCHER_INIT_REPOSITORY=true" in header and "chown 10001" in header


def readme_docker_run_steps() -> list[str]:
    """The README's docker run block (Deployment), one shell command a line (continuations joined)."""
    text = (ROOT / "README.md").read_text()
    start = text.index("```sh\n", text.index("Every step on a Docker host")) + len("```sh\n")
    block = text[start:text.index("```", start)]
    joined = block.replace("\\\n", " ")
    return [line.split("  #")[0].strip() for line in joined.splitlines() if line.strip()]


HOOK_PORT = 8999
# An Apprise json:// target: prints each notification's title on one line.
HOOK_SERVER = f"""
import http.server, json
class Hook(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        print("PAGE", json.loads(body).get("title"), flush=True)
        self.send_response(200)
        self.end_headers()
    def log_message(self, *args):
        pass
server = http.server.HTTPServer(("127.0.0.1", {HOOK_PORT}), Hook)
print("LISTENING", flush=True)
server.serve_forever()
"""


def restarted_pages_once(run_step: str, name: str, secrets: Path, image: str) -> None:
    """The README's docker run as it is (--restart unless-stopped) with the Apprise URLs file of its next
    paragraph, and a repository password that is wrong: Docker starts the watcher again and again, and its
    FAILED notice goes out once. The notice's receiver shares the watcher's network namespace (loopback
    only, no bridge)."""
    hook = f"{name}-hook"
    (secrets / "apprise_urls").write_text(f"json://127.0.0.1:{HOOK_PORT}/\n")
    shutil.chown(secrets / "apprise_urls", 10001, 10001)
    (secrets / "apprise_urls").chmod(0o400)
    docker("rm", "-f", name, hook, check=False)
    docker("run", "-d", "--name", hook, "--network", "none", "--label", TEST_LABEL, "--entrypoint", "python3",
           image, "-c", HOOK_SERVER)
    wait_for(lambda: "LISTENING" in docker("logs", hook).stdout, 30, "the notice's receiver to listen")
    step = run_step.replace(" --restart unless-stopped ", " ")  # as the caller had it, then as the README has it
    step = step.replace("docker run -d ", "docker run -d --restart unless-stopped ", 1)
    step = step.replace(" --network none ", f" --network container:{hook} ")
    step = step.replace(" -e RESTIC_REPOSITORY=", " -e WATCHER_APPRISE_URLS_FILE=/run/secrets/apprise_urls"
                                                   " -e RESTIC_REPOSITORY=", 1)
    assert "--restart unless-stopped" in step and f"container:{hook}" in step and "APPRISE_URLS_FILE" in step
    try:
        subprocess.run(["bash", "-c", step], check=True, capture_output=True, timeout=60)
        # Four restarts: the first four starts have failed (the fifth may be under way).
        wait_for(lambda: json.loads(docker("inspect", name).stdout)[0]["RestartCount"] >= 4, 90,
                 "Docker to start the failing watcher four more times", interval=1)
        logs = docker("logs", name)
        pages = [line for line in docker("logs", hook).stdout.splitlines() if line.startswith("PAGE ")]
        assert pages == ["PAGE [backup-watcher] FAILED: backup-watcher did not start"], (pages, logs.stderr[-3000:])
        assert logs.stderr.count("wrong password or no key found") >= 4  # every start failed the same way
        assert "not paged again: an earlier start failed the same way" in logs.stderr
    finally:
        docker("rm", "-f", name, hook, check=False)
        (secrets / "apprise_urls").unlink()


@pytest.mark.timeout(2400)  # the module's image build (its own bound: 1800 s) when this test runs first
def test_readme_docker_run_followed_literally_ends_in_a_snapshot_and_a_bad_start_exits_2(
        image: str, start_pg: StartPg, tmp_path: Path) -> None:
    db: PgContainer = start_pg("bwt-readme-db", "17")
    name = "bwt-readme-watcher"
    srv, etc = tmp_path / "srv-restic", tmp_path / "etc-secrets"
    # What this machine cannot take literally: the image is built by the fixture (no registry here,
    # its own base image), the engine's socket and the host paths are the test's, containers get
    # --network none and the test label, and the watcher watches this test's database only.
    replacements = [
        ("docker build -t backup-watcher .", f"docker tag {image} bwt-readme-image"),
        ("/var/run/docker.sock:/var/run/docker.sock", f"{engine_socket()}:/var/run/docker.sock"),
        ("stat -c %g /var/run/docker.sock", f"stat -c %g {engine_socket()}"),
        ("/srv/restic", str(srv)), ("/etc/backup-watcher/secrets", str(etc)),
        ("--name backup-watcher ", f"--name {name} --network none --label {TEST_LABEL} "
                                   f"-e WATCHER_CONTAINER_PATTERNS={db.name} "),
        ("-e WATCHER_INIT_REPOSITORY=true backup-watcher", "-e WATCHER_INIT_REPOSITORY=true bwt-readme-image"),
        ("docker exec backup-watcher ", f"docker exec {name} "),
    ]
    def here(step: str) -> str:
        for old, new in replacements:
            step = step.replace(old, new)
        return step

    steps = readme_docker_run_steps()
    assert steps[0] == "docker build -t backup-watcher ." and steps[-1].endswith("snapshots")
    docker("rm", "-f", name, check=False)
    try:
        for step in steps[:-1]:
            done = subprocess.run(["bash", "-c", here(step)], capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, (here(step), done.stderr)

        def listed() -> bool:
            out = subprocess.run(["bash", "-c", here(steps[-1])], capture_output=True, text=True, timeout=60).stdout
            return any(db.name in line and "appdb" in line for line in out.splitlines())

        wait_for(listed, 180, "the first snapshot, listed as the README says", interval=2)
        # The same container with a wrong password: it exits 2 within seconds, the reason in its log.
        docker("rm", "-f", name)
        (etc / "restic_password").write_text("not-the-password-of-this-repository\n")
        run_step = here(next(s for s in steps if s.startswith("docker run")))
        # Back after a reboot, an engine restart or a crash; dropped here so that the bad starts below stay
        # exited to be looked at (with it, Docker starts them again and again, each exiting 2 the same way).
        assert " --restart unless-stopped " in run_step
        run_step = run_step.replace(" --restart unless-stopped ", " ")
        subprocess.run(["bash", "-c", run_step], check=True, capture_output=True, timeout=60)
        wait_for(lambda: json.loads(docker("inspect", name).stdout)[0]["State"]["Status"] == "exited", 15,
                 "the container to exit at once")
        state = json.loads(docker("inspect", name).stdout)[0]["State"]
        logs = docker("logs", name)
        assert state["ExitCode"] == 2, logs.stdout[-2000:] + logs.stderr[-2000:]
        assert "wrong password or no key found" in logs.stderr
        assert "RESTIC_PASSWORD" in logs.stderr
        restarted_pages_once(run_step, name, etc, image)
        # No repository there and WATCHER_INIT_REPOSITORY=false; no Docker engine at DOCKER_HOST: the same.
        empty = tmp_path / "empty-repo"
        empty.mkdir()
        shutil.chown(empty, 10001, 10001)
        no_repository = [(f"-v {srv}:/repo", f"-v {empty}:/repo"),
                         ("WATCHER_INIT_REPOSITORY=true", "WATCHER_INIT_REPOSITORY=false")]
        no_engine = [("-e RESTIC_REPOSITORY", "-e DOCKER_HOST=unix:///nowhere.sock -e RESTIC_REPOSITORY")]
        for changes, said in ((no_repository, "WATCHER_INIT_REPOSITORY=true"),
                              (no_engine, "DOCKER_HOST=unix:///nowhere.sock")):
            docker("rm", "-f", name)
            step = run_step
            for old, new in changes:
                step = step.replace(old, new)
            subprocess.run(["bash", "-c", step], check=True, capture_output=True, timeout=60)
            wait_for(lambda: json.loads(docker("inspect", name).stdout)[0]["State"]["Status"] == "exited", 15,
                     f"the container to exit at once ({said})")
            assert json.loads(docker("inspect", name).stdout)[0]["State"]["ExitCode"] == 2
            assert said in docker("logs", name).stderr
    finally:
        docker("rm", "-f", name, check=False)
        docker("rmi", "bwt-readme-image", check=False)
        subprocess.run(["chown", "-R", "root:root", str(srv)], check=False)
