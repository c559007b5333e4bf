"""The backup-watcher benchmark (bench/README.md), run as `python -m bench` by bench/run from the
clone's root (so that the test kit, `tests.kit`, imports as it does in the tests).

One module per benchmark (throughput, storage, events, fleet, footprint, restore), each declaring
its rows of the table and filling them in; common (timing, repetitions, statistics, formats, the
report), world (engine, repositories, containers, daemons), data (the orders table and its day
change) and pipelines (the backups compared) are what they share; __main__ is the entry.
"""
