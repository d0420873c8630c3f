"""What every benchmark prints first: the machine it ran on, so figures can be compared."""

from __future__ import annotations

import os
import platform
import resource
import statistics
import threading
import time
from collections.abc import Callable


def machine_summary() -> str:
    """One line: CPU model, cores, memory, Python, OS."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"machine: {cpu}; {os.cpu_count()} cores; {mem_gib:.1f} GiB; "
        f"Python {platform.python_version()}; {platform.system()} {platform.release()}"
    )


def peak_rss_mib() -> float:
    """Peak resident memory of this process (and waited-for children), in MiB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024


def median_seconds(fn: Callable[[], object], repeats: int = 3) -> tuple[float, list[float]]:
    """Run `fn` `repeats` times; return the median wall time and all times."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def rss_mib() -> float:
    """Current resident memory of this process, in MiB."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class StagePeaks:
    """Peak resident memory per stage, sampled every `interval` seconds on a thread; `stage`
    is the progress callback's first argument (the stage now running)."""

    def __init__(self, interval: float = 0.1):
        self.stage = "start"
        self.peaks: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.peaks[self.stage] = max(self.peaks.get(self.stage, 0.0), rss_mib())

    def progress(self, stage: str, done: int, total: int) -> None:
        self.stage = stage
        self.peaks[stage] = max(self.peaks.get(stage, 0.0), rss_mib())  # short stages too

    def __enter__(self) -> StagePeaks:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
