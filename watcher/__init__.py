"""backup-watcher: keeps every PostgreSQL database running in Docker backed up into restic."""

__version__ = "0.1.0"
