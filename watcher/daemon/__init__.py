"""The daemon, in parts: Docker events → inventory → registry → scheduler → jobs → outcomes.

- `loop.py`: the Daemon, a thin loop over a closed set of messages (`messages.py`);
- `inventory.py`: containers → targets in the registry (also the `status` command's survey);
- `scheduler.py`: the pure plan of which jobs to start now;
- `running.py`: the book of running and waiting jobs;
- `launcher.py`: runs jobs on a pool, each ending as its own message;
- `outcomes.py`: results → registry transitions, metrics and alerts.
"""

from watcher.daemon.inventory import survey
from watcher.daemon.loop import Daemon

__all__ = ["Daemon", "survey"]
