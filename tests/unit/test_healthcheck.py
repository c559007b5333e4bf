"""The image's healthcheck reads the daemon's address by the same setting, default and flag as the daemon."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from watcher.healthcheck import address_of, main


class Health(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        body = b"ok" if self.path == "/healthz" and self.status == 200 else b"unhealthy"
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[ThreadingHTTPServer]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Health)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    Health.status = 200


def test_healthy_by_the_variable(server: ThreadingHTTPServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHER_METRICS_ADDRESS", f"127.0.0.1:{server.server_address[1]}")
    assert main([]) == 0


def test_the_flag_wins_and_an_unhealthy_answer_is_exit_1(server: ThreadingHTTPServer,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHER_METRICS_ADDRESS", "127.0.0.1:1")
    assert main(["--metrics-address", f"127.0.0.1:{server.server_address[1]}"]) == 0
    Health.status = 503
    assert main(["--metrics-address", f"127.0.0.1:{server.server_address[1]}"]) == 1


def test_a_bad_address_is_named_and_unhealthy(monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("WATCHER_METRICS_ADDRESS", "localhost")
    assert main([]) == 1
    assert "WATCHER_METRICS_ADDRESS='localhost': expected HOST:PORT" in capsys.readouterr().err


def test_a_bad_flag_is_unhealthy_never_docker_s_reserved_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--no-such-flag"]) == 1


def test_the_default_address_is_the_daemon_s_on_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHER_METRICS_ADDRESS", raising=False)
    assert address_of([]) == ("0.0.0.0", 9810)


def test_an_unanswered_address_is_named(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as unused:  # a port nothing listens on
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    monkeypatch.setenv("WATCHER_METRICS_ADDRESS", f"0.0.0.0:{port}")
    assert main([]) == 1
    assert f"unhealthy: http://127.0.0.1:{port}/healthz" in capsys.readouterr().err
