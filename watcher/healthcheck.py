"""`python -m watcher.healthcheck`: exit 0 when the daemon's /healthz answers 200 (the image's HEALTHCHECK).

It reads WATCHER_METRICS_ADDRESS through the same row of the table of settings as the daemon (its
default, its parser), and takes the same `--metrics-address` flag, so a changed port needs no second
setting.
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence

from watcher.config import SETTINGS
from watcher.settings import Address, flag_name, with_flags

ADDRESS_SETTING = SETTINGS["WATCHER_METRICS_ADDRESS"]


def address_of(argv: Sequence[str] | None = None) -> Address:
    """The daemon's address from the flag or the environment; raises SystemExit(1) naming a bad one."""
    parser = argparse.ArgumentParser(prog="python -m watcher.healthcheck", allow_abbrev=False)
    parser.add_argument(flag_name(ADDRESS_SETTING.name), dest="address", metavar="HOST:PORT", help=ADDRESS_SETTING.help)
    given = parser.parse_args(argv).address
    problems: list[str] = []
    address = ADDRESS_SETTING.read(with_flags(os.environ, {ADDRESS_SETTING.name: given}), problems)
    if not isinstance(address, Address):
        print("\n".join(problems), file=sys.stderr)
        raise SystemExit(1)
    return address


def main(argv: Sequence[str] | None = None) -> int:
    """Returns 0 if /healthz says healthy, 1 otherwise (with the reason on stderr)."""
    try:
        host, port = address_of(argv)
    except SystemExit as exc:  # Docker reserves exit code 2 of a healthcheck: a bad flag is unhealthy (1)
        return 0 if exc.code == 0 else 1
    if host in ("0.0.0.0", "::"):  # noqa: S104 - our own wildcard listener, reached on loopback
        host = "127.0.0.1"
    url = f"http://{Address(host, port)}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=8) as response:
            print(response.read().decode(errors="replace").strip())
            return 0 if response.status == 200 else 1
    except (OSError, urllib.error.URLError) as exc:
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
