"""A daemon that cannot start pages once per cause, not once per restart.

Deployed with a restart policy (`docker run --restart unless-stopped`, compose `restart: unless-stopped`),
a watcher whose start fails (a wrong repository password, no Docker, a bad setting) exits 2 and is started
again by Docker, with pauses growing to a minute, for as long as the cause stays: a page at every start would
be a page a minute. The first start that fails pages and leaves a marker: the cause's digest, when it paged
and whether every target took it, in a file of the temporary directory (in the image, the container's own file
system, which outlives a restart of the container but not its removal). A later start that fails for the
same cause within REPAGE_AFTER_S does not page again (its log line still says why it did not start, and stderr
that it was paged already); another cause pages at once, and so does the same cause a day later, as the
alert policy's reminder would (a page a target did not take: an hour later). A start that succeeds removes
the marker, so that the next failure pages again.

The marker holds no secret: a digest of the (masked) alert text and a time. Its name is a digest of what
tells one watcher from another on the same host (the repository, the Docker host, the metrics address), so
that two watchers beside each other outside containers keep their own.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

# A page one target did not take is sent again after this long, to all (a broken target must not turn the
# working ones' page into a page at every restart, nor keep the others from being told for a day).
RETRY_UNDELIVERED_S = 3600.0
REPAGE_AFTER_S = 24 * 3600.0  # as the alert policy reminds of a failure (cli: reminder_after)
MARKER_PREFIX = "backup-watcher-startup-failure-"
_IDENTITY = ("RESTIC_REPOSITORY", "DOCKER_HOST", "WATCHER_METRICS_ADDRESS")


def digest(text: str) -> str:
    """A short hex digest of `text`."""
    return hashlib.sha256(text.encode("utf-8", errors="replace")).hexdigest()[:32]


def marker_path(environ: Mapping[str, str], directory: str | None = None) -> Path:
    """The marker file of the watcher `environ` configures, in `directory` (default: the temporary one)."""
    identity = "\0".join(environ.get(name, "") for name in _IDENTITY)
    if directory is None:
        try:
            directory = tempfile.gettempdir()
        except OSError:
            # No writable temporary directory (a full disk, a read-only file system): gettempdir raises, which
            # would keep the very page this marker is about from going out (and a good start from running).
            # The usual place is read as it is; a marker that cannot be written pages at every start.
            directory = environ.get("TMPDIR") or "/tmp"  # noqa: S108 - read and written as _read, _write say
    return Path(directory) / f"{MARKER_PREFIX}{digest(identity)[:16]}"


def page_due(marker: str | None, cause: str, now: float) -> bool:
    """Whether a failed start for `cause` (a digest) pages, given the marker's text left by an earlier failed
    start (None: there is none, or it cannot be read): yes unless that start paged the same cause less than
    REPAGE_AFTER_S before `now`, or tried to and could not deliver it (to some target: Apprise says only
    whether all took it) less than RETRY_UNDELIVERED_S before."""
    if marker is None:
        return True
    paged_cause, paged_at, delivered = ([*marker.split(), "", "", ""])[:3]
    try:
        since = now - float(paged_at)
    except ValueError:
        return True
    # A marker of two fields is of a version that wrote one only once the page was delivered.
    wait = RETRY_UNDELIVERED_S if delivered == "undelivered" else REPAGE_AFTER_S
    return paged_cause != cause or not 0 <= since < wait


class StartupPages:
    """The marker of one watcher's failed starts (see the module's docstring)."""

    def __init__(self, path: Path, clock: Callable[[], float]) -> None:
        self.path = path
        self._clock = clock

    def due(self, alert_text: str) -> bool:
        """Whether a failed start whose alert says `alert_text` pages now. Never raises: a marker that cannot be
        read pages."""
        return page_due(self._read(), digest(alert_text), self._clock())

    def paged(self, alert_text: str, delivered: bool) -> None:
        """Records that the alert saying `alert_text` was sent now, and whether every target took it. Never
        raises: a marker that cannot be written only means a page at every start, as before."""
        self._write(f"{digest(alert_text)} {self._clock():.0f} {'delivered' if delivered else 'undelivered'}\n")

    def started(self) -> None:
        """The watcher started: the next failure pages. Never raises."""
        with contextlib.suppress(OSError):
            self.path.unlink(missing_ok=True)

    def _read(self) -> str | None:
        # O_NONBLOCK: a FIFO in the marker's place (a shared temporary directory) would otherwise hold the start
        # for ever, unpaged. Only a regular file of this user's is a marker: another user's says nothing of this
        # watcher's pages (and in a sticky directory this one could not remove it).
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            return None
        with os.fdopen(fd, encoding="ascii", errors="replace") as marker:
            try:
                found = os.fstat(fd)
                if not stat.S_ISREG(found.st_mode) or found.st_uid != os.geteuid():
                    return None
                return marker.read(200)
            except OSError:
                return None

    def _write(self, text: str) -> None:
        # Written beside, then renamed over: a start killed mid-write leaves the old marker or none. O_EXCL and
        # O_NOFOLLOW: a link someone else left in a shared temporary directory is never written through.
        part = self.path.with_name(f"{self.path.name}.{os.getpid()}")
        try:
            part.unlink(missing_ok=True)
            fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "w", encoding="ascii") as marker:
                marker.write(text)
            os.replace(part, self.path)
        except OSError:
            with contextlib.suppress(OSError):
                part.unlink(missing_ok=True)  # a write that failed half way leaves nothing behind
