"""backup-watcher: keeps every PostgreSQL database running in Docker backed up into restic."""


def __getattr__(name: str) -> str:
    """`__version__`, read on first use: importing importlib.metadata and scanning the installed packages cost
    every process of the watcher 20-40 ms of start-up, the exec helper of each dump too, which needs no version.

    Returns the installed version ("0+unknown" in a source tree never installed); raises AttributeError for
    any other name.
    """
    if name != "__version__":
        raise AttributeError(f"module 'watcher' has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415 - lazy on purpose (the docstring)

    try:
        # The one place the version is written is pyproject.toml; this reads what was installed from it.
        value = version("backup-watcher")
    except PackageNotFoundError:  # run from a source tree that was never installed
        value = "0+unknown"
    globals()["__version__"] = value
    return value
