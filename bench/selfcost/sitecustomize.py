"""Loaded by every Python process the cost benchmark starts (bench/cost.py puts this directory on
PYTHONPATH): when BW_BENCH_RUSAGE_FILE is set, the process appends its own resource usage at exit,
one JSON line, to that file. So the CPU of the watcher's processes (the CLI, the daemon, the exec
helper that restic starts) is counted exactly, from the kernel's own accounting, with no change to
the code measured: the same hook serves the code tree of an older commit (--compare-ref)."""

import os

_PATH = os.environ.get("BW_BENCH_RUSAGE_FILE")

if _PATH:
    import atexit
    import json
    import resource
    import sys

    def _peak_rss_kib() -> int:
        """VmHWM, the peak RSS of this program. Not ru_maxrss: a process started by restic (Go: clone with
        CLONE_VM, then exec) inherits restic's peak there (about 70 MB), which is not the helper's."""
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        return 0

    def _report(path: str = _PATH) -> None:
        usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process, none of its children
        line = json.dumps({"pid": os.getpid(), "argv": sys.argv[:2], "utime": usage.ru_utime,
                           "stime": usage.ru_stime, "maxrss_kib": _peak_rss_kib()}) + "\n"
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode())  # one write of one short line: lines of processes never interleave
        finally:
            os.close(fd)

    atexit.register(_report)
