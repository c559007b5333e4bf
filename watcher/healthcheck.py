"""`python -m watcher.healthcheck`: exit 0 when the daemon's /healthz answers 200 (the image's HEALTHCHECK).

It reads WATCHER_METRICS_ADDRESS like the daemon does, so a changed port needs no second setting.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

from watcher.config import parse_address


def main() -> int:
    """Returns 0 if /healthz says healthy, 1 otherwise (with the reason on stderr)."""
    raw = os.environ.get("WATCHER_METRICS_ADDRESS", "").strip() or "0.0.0.0:9810"
    address = parse_address(raw)
    if address is None:
        print(f"WATCHER_METRICS_ADDRESS={raw!r} is not HOST:PORT", file=sys.stderr)
        return 1
    host, port = address
    if host in ("0.0.0.0", "::"):  # noqa: S104 - our own wildcard listener, reached on loopback
        host = "127.0.0.1"
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/healthz", timeout=8) as response:
            print(response.read().decode(errors="replace").strip())
            return 0 if response.status == 200 else 1
    except (OSError, urllib.error.URLError) as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
