"""backup-watcher: keeps every PostgreSQL database running in Docker backed up into restic."""

from importlib.metadata import PackageNotFoundError, version

try:
    # The one place the version is written is pyproject.toml; this reads what was installed from it.
    __version__ = version("backup-watcher")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
