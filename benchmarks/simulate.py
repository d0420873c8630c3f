"""Traffic-lab benchmark: generation speed, seeds-2026 at --scale 0.1, and the baselines' bar.

1. speed: `standard` at `--scale` (default 1: ~1M exchanges) generated `--repeats` times into a
   fresh directory; the median wall-clock rate is quoted, with the CPU seconds the process and
   its worker processes used and CPU/wall, the parallelism achieved (on a shared machine the
   wall rate is capped by what the scheduler gives us; `--workers N` overrides one per core);
2. `--seeds`: `seeds-2026 --scale 0.1` (~20M exchanges) once in a child process: wall time,
   exchanges/s, peak RSS of its largest process (bounded memory) and bytes on disk;
3. `--baselines`: the evaluator's two baselines (volume threshold, IsolationForest) scored on
   the last `standard` run: the bar the detection engine must clear.

    .venv/bin/python benchmarks/simulate.py --scale 1 --repeats 3 --baselines
    .venv/bin/python benchmarks/simulate.py --repeats 0 --seeds
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_summary, peak_rss_mib
from distillguard.lab.simulate import simulate


def _cpu_seconds(*who: int) -> float:
    return sum(u.ru_utime + u.ru_stime for u in map(resource.getrusage, who))


#: This process and its finished worker processes (the simulator joins its workers).
_OWN_AND_WORKERS = (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)


def _size_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def speed(scale: float, repeats: int, work: Path, workers: int | None) -> Path | None:
    """Generate `standard` `repeats` times; print each run and the median rate."""
    rates, out = [], None
    for i in range(repeats):
        out = work / f"standard-{i}"
        cpu0, start = _cpu_seconds(*_OWN_AND_WORKERS), time.perf_counter()
        summary = simulate("standard", out, scale=scale, seed=0, workers=workers)
        wall = time.perf_counter() - start
        cpu = _cpu_seconds(*_OWN_AND_WORKERS) - cpu0
        rates.append(summary.exchanges / wall)
        print(f"  run {i + 1}: {summary.exchanges:,} exchanges, {summary.accounts:,} accounts in "
              f"{wall:.1f} s wall = {rates[-1]:,.0f} exchanges/s; {cpu:.1f} CPU s "
              f"({summary.exchanges / cpu:,.0f} exchanges per CPU-second; CPU/wall "
              f"{cpu / wall:.2f} with {summary.workers} worker(s)); "
              f"{_size_mib(out):.0f} MiB on disk; load avg {os.getloadavg()[0]:.1f}")
        if i < repeats - 1:
            shutil.rmtree(out)
    if rates:
        print(f"standard --scale {scale}: median {statistics.median(rates):,.0f} exchanges/s "
              f"written to Parquet (of {repeats} runs)")
    return out


def seeds(work: Path) -> None:
    """seeds-2026 --scale 0.1 in a child process, so its peak RSS is measured on its own."""
    out = work / "seeds-2026"
    code = ("import json; from pathlib import Path; from distillguard.lab.simulate import "
            f"simulate; s = simulate('seeds-2026', Path({str(out)!r}), scale=0.1); "
            "print(json.dumps({'exchanges': s.exchanges, 'accounts': s.accounts}))")
    cpu0, start = _cpu_seconds(resource.RUSAGE_CHILDREN), time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    wall = time.perf_counter() - start
    cpu = _cpu_seconds(resource.RUSAGE_CHILDREN) - cpu0
    counts = json.loads(result.stdout.strip().splitlines()[-1])
    child_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"seeds-2026 --scale 0.1: {counts['exchanges']:,} exchanges, {counts['accounts']:,} "
          f"accounts in {wall / 60:.1f} min wall = {counts['exchanges'] / wall:,.0f} "
          f"exchanges/s; {cpu:.0f} CPU s; peak RSS {child_peak:,.0f} MiB (largest process); "
          f"{_size_mib(out):,.0f} MiB on disk; load avg {os.getloadavg()[0]:.1f}")
    shutil.rmtree(out)


def baselines(out: Path) -> None:
    """Score the evaluator's baselines on a `standard` run (no detector: natural thresholds)."""
    from rich.console import Console

    from distillguard.lab.evaluate import evaluate, render_report

    start = time.perf_counter()
    report = evaluate(out / "truth", None, out, baselines=True)
    print(f"baselines on {out.name}: {time.perf_counter() - start:.1f} s")
    render_report(report, Console(width=180))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="scale of the standard runs")
    parser.add_argument("--repeats", type=int, default=3, help="standard runs (median quoted)")
    parser.add_argument("--seeds", action="store_true", help="also run seeds-2026 --scale 0.1")
    parser.add_argument("--baselines", action="store_true",
                        help="score the baselines on the last standard run")
    parser.add_argument("--workers", type=int, default=None,
                        help="worker processes (default: one per core)")
    parser.add_argument("--work", type=Path, default=None, help="scratch directory")
    args = parser.parse_args()
    print(machine_summary())
    work = Path(args.work or tempfile.mkdtemp(prefix="dg-lab-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        last = speed(args.scale, args.repeats, work, args.workers)
        if args.baselines and last is not None:
            baselines(last)
        if args.seeds:
            seeds(work)
        print(f"peak RSS of this process and its children: {peak_rss_mib():,.0f} MiB")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
