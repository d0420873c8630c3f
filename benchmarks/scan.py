"""End-to-end `scan` throughput and peak memory, with the time of every stage.

    .venv/bin/python benchmarks/scan.py --scenario seeds-2026 --scale 0.055    # the 10M run
    .venv/bin/python benchmarks/scan.py --scenario standard --scale 0.2        # quick check

Simulates the scenario (unless the lab directory already holds it), ingests it into a fresh
store, then times `engine.scan` from a store with no signals cached (so signals are part of the
end-to-end figure). With `--repeats N` > 1 the signal cache is cleared between runs and the
median is reported. With `--cached-signals` the signal cache is kept (the first run fills
it), so the figure is the stages after signals alone. Prints exchanges/s, CPU seconds, time per
stage (the slowest stage is marked) with the peak resident memory seen during it (sampled
every 0.1 s), and the process's peak resident memory.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._machine import StagePeaks, machine_summary, peak_rss_mib  # noqa: E402
from distillguard import engine, store  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="standard")
    parser.add_argument("--scale", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/distillguard-bench-scan"))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--engine", default="duckdb", choices=engine.ENGINES)
    parser.add_argument("--cached-signals", action="store_true",
                        help="keep the store's signals: time the stages after signals only")
    args = parser.parse_args()

    from distillguard.ingest import ingest_paths
    from distillguard.lab.simulate import simulate

    print(machine_summary())
    lab = args.workdir / f"{args.scenario}-{args.scale}-{args.seed}"
    if not (lab / "accounts.parquet").exists():
        t = time.perf_counter()
        summary = simulate(args.scenario, out=lab, scale=args.scale, seed=args.seed)
        print(f"simulated {summary.exchanges:,} exchanges in {time.perf_counter() - t:.0f} s")
    db = lab.parent / f"{lab.name}.duckdb"
    if not db.exists():
        con = store.connect(db)
        t = time.perf_counter()
        ingest_paths(con, lab / "exchanges", kind="exchanges")
        ingest_paths(con, lab / "accounts.parquet", kind="accounts")
        print(f"ingested in {time.perf_counter() - t:.0f} s (not part of the scan figure)")
        print(store_size(con, db))
        con.close()

    walls, cpus, runs = [], [], []
    for _ in range(args.repeats):
        con = store.connect(db)
        if not args.cached_signals:
            con.execute("DELETE FROM signals")
            con.execute("CHECKPOINT")
        t, cpu = time.perf_counter(), time.process_time()
        with StagePeaks() as peaks:
            findings = engine.scan(con, engine=args.engine, progress=peaks.progress)
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - cpu)
        runs.append((findings, peaks.peaks))
        con.close()
    wall = statistics.median(walls)
    f, stage_peaks = runs[walls.index(wall)] if wall in walls else runs[-1]
    n = f.n_exchanges
    print(f"scenario {args.scenario} scale {args.scale} seed {args.seed}, engine {args.engine}")
    print(f"exchanges scanned: {n:,}; accounts: {f.accounts.num_rows:,}; "
          f"campaigns: {f.campaigns.num_rows}; flagged: "
          f"{sum(1 for x in f.accounts['flagged'].to_pylist() if x):,}")
    print(f"end-to-end scan: median {wall:.1f} s of {len(walls)} run(s) "
          f"({', '.join(f'{w:.1f}' for w in walls)}) -> {n / wall:,.0f} exchanges/s; "
          f"CPU {statistics.median(cpus):.1f} s (this process, all its threads)")
    if args.cached_signals:
        print(f"signals were cached: {f.n_annotated:,} exchanges annotated by the timed run(s)")
    slowest = max(f.seconds, key=f.seconds.get)
    for stage, sec in f.seconds.items():
        mark = "  <- slowest" if stage == slowest else ""
        print(f"  {stage:<13} {sec:8.1f} s  {100 * sec / wall:5.1f}%  "
              f"peak RSS {stage_peaks.get(stage, 0):7,.0f} MiB{mark}")
    print(f"peak RSS: {peak_rss_mib():,.0f} MiB")
    con = store.connect(db, read_only=True)
    print(store_size(con, db))
    con.close()


def store_size(con, db: Path) -> str:
    """The store's file, WAL and per-table size (DuckDB blocks; a table's share of partly
    filled blocks is counted whole), per million exchanges."""
    block, used, free = con.execute(
        "SELECT block_size, used_blocks, free_blocks FROM pragma_database_size() "
        "WHERE database_name = current_database()").fetchone()
    wal = db.with_name(db.name + ".wal")
    n = con.execute("SELECT count(*) FROM exchanges").fetchone()[0]
    per_m = f" ({db.stat().st_size / max(n, 1) * 1e6 / 2**30:.2f} GiB per million exchanges)"
    lines = [f"store {db}: {db.stat().st_size / 2**20:,.0f} MiB{per_m}, "
             f"used {used * block / 2**20:,.0f} MiB, free {free * block / 2**20:,.0f} MiB, "
             f"WAL {(wal.stat().st_size if wal.exists() else 0) / 2**20:,.0f} MiB"]
    for name in ("exchanges", "signals", "accounts"):
        blocks = con.execute(
            "SELECT count(DISTINCT block_id) + coalesce(sum(len(additional_block_ids)), 0) "
            "FROM pragma_storage_info(?) WHERE persistent", [name]).fetchone()[0]
        lines.append(f"  {name:<10} {blocks * block / 2**20:9,.0f} MiB")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
