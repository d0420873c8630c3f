"""Request-signal throughput (`annotate`) and single-request latency (`annotate_request`).

Data: a traffic-lab run (`--logs DIR` holding exchanges/*.parquet), or, by default, a fresh lab
simulation of `--scenario` at `--scale` in a temporary directory (real prompts from
../shared/data when present). The batch path is fed record batches of `--batch-rows` rows, as the
engine does. Figures:
- cold: a fresh annotator (empty per-text cache) over all rows: every distinct prompt analysed once,
  in `--workers` processes (default: one per core, as `scan` does; includes starting them);
  `--pipelined` feeds the batches through `annotate_stream` instead of `annotate`;
- warm: the same annotator again (every prompt text cached): the vectorised Arrow part alone;
- annotate_request latency per request, p50/p99, on distinct prompts (cold) and repeated (warm).
Medians of `--repeats` runs are quoted.

    .venv/bin/python benchmarks/signals.py --scenario smoke
    .venv/bin/python benchmarks/signals.py --logs lab-out --repeats 3
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from _machine import machine_summary, peak_rss_mib  # benchmarks/ is sys.path[0]
from distillguard.signals import SignalAnnotator
from distillguard.signals.annotate import INPUT_COLUMNS, user_text_column
from distillguard.signals.classifier import DistillClassifier
from distillguard.signals.rules import load_rule_packs

COLUMNS = list(INPUT_COLUMNS)  # responses are not needed: keeps memory down


def load_exchanges(args: argparse.Namespace) -> pa.Table:
    if args.logs is not None:
        files = sorted((args.logs / "exchanges").glob("*.parquet")) or sorted(
            args.logs.glob("*.parquet"))
        if not files:
            sys.exit(f"{args.logs}: no exchanges/*.parquet")
        return pa.concat_tables(pq.read_table(f, columns=COLUMNS) for f in files)
    from distillguard.lab.simulate import simulate

    with tempfile.TemporaryDirectory() as tmp:
        print(f"simulating {args.scenario} at scale {args.scale} ...", flush=True)
        simulate(args.scenario, Path(tmp) / "lab", scale=args.scale, seed=args.seed)
        files = sorted((Path(tmp) / "lab" / "exchanges").glob("*.parquet"))
        return pa.concat_tables(pq.read_table(f, columns=COLUMNS) for f in files)


def run_batches(annotator: SignalAnnotator, table: pa.Table, batch_rows: int,
                pipelined: bool = False) -> float:
    start = time.perf_counter()
    batches = table.to_batches(max_chunksize=batch_rows)
    if pipelined:
        for _ in annotator.annotate_stream(batches):
            pass
    else:
        for batch in batches:
            annotator.annotate(batch)
    return time.perf_counter() - start


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def latency_us(annotator: SignalAnnotator, requests: list[dict]) -> tuple[float, float]:
    times = []
    for request in requests:
        start = time.perf_counter_ns()
        annotator.annotate_request(request)
        times.append((time.perf_counter_ns() - start) / 1000)
    return float(np.percentile(times, 50)), float(np.percentile(times, 99))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logs", type=Path, help="lab output directory to read")
    parser.add_argument("--scenario", default="smoke")
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-rows", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="processes analysing new texts (1: this process only)")
    parser.add_argument("--pipelined", action="store_true",
                        help="cold pass through annotate_stream (workers start on the next "
                             "batch while this one is handed back) instead of annotate")
    args = parser.parse_args()

    print(machine_summary())
    table = load_exchanges(args)
    texts = pa.concat_arrays([user_text_column(chunk) for chunk in table["messages"].chunks])
    distinct = len(pc.unique(texts))
    print(f"{table.num_rows:,} exchanges, {distinct:,} distinct prompt texts "
          f"({distinct / max(table.num_rows, 1):.0%}), median prompt "
          f"{int(np.median(pc.utf8_length(texts).to_numpy()))} chars")

    start = time.perf_counter()
    packs = load_rule_packs()
    annotator = SignalAnnotator(packs)
    print(f"startup (compile {sum(len(p.rules) for p in packs)} rules into one Hyperscan "
          f"database + load classifier): {time.perf_counter() - start:.2f} s")
    classifier = annotator.classifier or DistillClassifier.load()

    cold, warm, cold_cpu = [], [], []
    for _ in range(args.repeats):
        fresh = SignalAnnotator(packs, classifier, workers=args.workers)
        cpu = time.process_time(), children_cpu()
        cold.append(run_batches(fresh, table, args.batch_rows, args.pipelined))
        fresh.close()  # the workers exit: their CPU time is counted
        cold_cpu.append(time.process_time() - cpu[0] + children_cpu() - cpu[1])
        warm.append(run_batches(fresh, table, args.batch_rows))
    n = table.num_rows
    print(f"workers: {args.workers}{' (pipelined)' if args.pipelined else ''}; cold CPU-seconds (this process + its workers): "
          f"median {statistics.median(cold_cpu):.1f} s")
    for name, times in (("cold (empty cache)", cold), ("warm (cached texts)", warm)):
        median = statistics.median(times)
        print(f"annotate {name}: median {median:.2f} s = {n / median:,.0f} exchanges/s "
              f"(runs: {', '.join(f'{t:.2f}' for t in times)})")
    print(f"  per distinct prompt (cold): {statistics.median(cold) / distinct * 1e6:.0f} µs")

    rows = table.slice(0, min(args.requests * 4, n)).to_pylist()
    seen: set[str] = set()
    requests = []
    for row, text in zip(rows, texts.slice(0, len(rows)).to_pylist(), strict=True):
        if text not in seen:
            seen.add(text)
            requests.append(row)
        if len(requests) == args.requests:
            break
    fresh = SignalAnnotator(packs, classifier)
    p50, p99 = latency_us(fresh, requests)
    print(f"annotate_request, distinct prompts (cold): p50 {p50:.0f} µs, p99 {p99:.0f} µs "
          f"over {len(requests)}")
    p50, p99 = latency_us(fresh, requests)
    print(f"annotate_request, repeated prompts (warm): p50 {p50:.0f} µs, p99 {p99:.0f} µs")
    print(f"peak RSS: {peak_rss_mib():,.0f} MiB")


if __name__ == "__main__":
    main()
