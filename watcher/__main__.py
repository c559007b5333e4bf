"""`python -m watcher` is the `backup-watcher` command."""

import sys

from watcher.cli import main

sys.exit(main())
