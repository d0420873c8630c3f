"""Ingest throughput: native JSONL (plain and gzip) and Parquet, >=1M generated exchanges.

Prompts are real public prompts from ../shared/data when present (gsm8k questions, Arena and
Open Assistant queries: median a few hundred characters), otherwise synthetic text of a similar
length; responses are 40-250 words. Input files are generated in a streaming way (bounded
memory). Every measured ingest runs in its own fresh process against a fresh store, so its peak
memory is the ingest's own; the median of the repeats is quoted, plus the time to re-ingest the
same file into the filled store (every row a replay). For context the same process also times
DuckDB's own `read_json` loading the file with no validation at all.

    .venv/bin/python benchmarks/ingest.py --rows 1000000
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from _machine import machine_summary, peak_rss_mib  # benchmarks/ is sys.path[0]
from distillguard import contract, store
from distillguard.ingest import ingest_paths

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
MODELS = ("frontier-large", "frontier-mini", "reasoner-1", "coder-2")
FILLER = (
    "explain the difference between model training data analysis step by step function "
    "python error result value please write a short summary of this article about climate "
    "policy and give three examples with numbers"
)
WORDS = FILLER.split(" ")
GENERATE_CHUNK = 50_000


def load_prompts(rng: random.Random) -> list[str]:
    """Real prompts if the shared corpora are present, else synthetic ones."""
    prompts: list[str] = []
    gsm = SHARED / "tasks" / "gsm8k_train.jsonl"
    arena = SHARED / "organic" / "arena_hard_v0.1.jsonl"
    oasst = SHARED / "organic" / "oasst_prompt_lottery_en_250.jsonl"
    if gsm.exists():
        prompts += [json.loads(line)["question"] for line in gsm.open()]
    if arena.exists():
        prompts += [json.loads(line)["prompt"] for line in arena.open()]
    if oasst.exists():
        prompts += [json.loads(line) for line in oasst.open()]
    if not prompts:
        for _ in range(5000):
            n = int(rng.lognormvariate(3.8, 0.7))
            prompts.append(" ".join(rng.choice(WORDS) for _ in range(max(n, 3))))
    return [p for p in prompts if isinstance(p, str) and p]


def generate(start: int, count: int, rng: random.Random, prompts: list[str],
             answers: list[str]) -> list[dict]:
    """`count` exchanges numbered from `start`; ts alternates RFC 3339 strings and epoch ms."""
    origin = datetime(2026, 1, 5, tzinfo=UTC)
    records = []
    for i in range(start, start + count):
        ts = origin + timedelta(milliseconds=i * 250 + rng.randint(0, 999))
        record = {
            "request_id": f"req-{i:09d}",
            "ts": ts.isoformat().replace("+00:00", "Z") if i % 3 else int(ts.timestamp() * 1000),
            "account_id": f"acct-{rng.randint(0, 20000):06d}",
            "api_key_id": f"key-{rng.randint(0, 40000):06d}",
            "ip": f"10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
            "user_agent": "python-httpx/0.27",
            "model": rng.choice(MODELS),
            "endpoint": "chat.completions",
            "messages": [{"role": "user", "content": rng.choice(prompts)}],
            "params": {"temperature": 0.7, "max_tokens": 1024},
            "response_text": rng.choice(answers),
            "input_tokens": rng.randint(10, 900),
            "output_tokens": rng.randint(20, 1500),
            "status": 200,
            "latency_ms": round(rng.uniform(150, 9000), 1),
            "stop_reason": "stop",
        }
        if i % 4 == 0:
            record["system"] = "You are a helpful assistant."
        records.append(record)
    return records


def _as_contract(records: list[dict]) -> pa.Table:
    rows = []
    for r in records:
        ts = r["ts"]
        ts = datetime.fromtimestamp(ts / 1000, UTC) if isinstance(ts, int) else \
            datetime.fromisoformat(ts)
        rows.append({**r, "ts": ts})
    return contract.conform(pa.Table.from_pylist(rows), contract.EXCHANGE_SCHEMA)


def write_inputs(rows: int, folder: Path, seed: int = 7) -> tuple[dict[str, Path], int]:
    """JSONL, gzip JSONL and contract Parquet of the same exchanges; median prompt chars."""
    rng = random.Random(seed)
    prompts = load_prompts(rng)
    answers = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 250)))
               for _ in range(500)]
    paths = {"jsonl": folder / "exchanges.jsonl", "jsonl.gz": folder / "exchanges.jsonl.gz",
             "parquet": folder / "exchanges.parquet"}
    prompt_lengths: list[int] = []
    with paths["jsonl"].open("wb") as plain, \
            gzip.open(paths["jsonl.gz"], "wb", compresslevel=1) as gz, \
            pq.ParquetWriter(paths["parquet"], contract.EXCHANGE_SCHEMA) as parquet:
        for start in range(0, rows, GENERATE_CHUNK):
            records = generate(start, min(GENERATE_CHUNK, rows - start), rng, prompts, answers)
            data = b"".join(orjson.dumps(r) + b"\n" for r in records)
            plain.write(data)
            gz.write(data)
            parquet.write_table(_as_contract(records), row_group_size=GENERATE_CHUNK)
            prompt_lengths += [len(r["messages"][0]["content"]) for r in records]
    prompt_lengths.sort()
    return paths, prompt_lengths[len(prompt_lengths) // 2]


def cpu_seconds() -> float:
    """User + system CPU time of this process (all threads): robust to a busy machine."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


#: Loads with no validation, dedupe or quarantine, for scale: DuckDB's own JSON reader into a
#: table of the types it infers, and rows already in the contract's types (Parquet) appended
#: to the store's exchanges table (what writing the store costs by itself).
REFERENCES = {
    "read_json": "CREATE TABLE raw AS SELECT * FROM read_json('{path}', "
                 "format='newline_delimited')",
    "store_write": "INSERT INTO exchanges SELECT * FROM read_parquet('{path}')",
}


def measure(path: Path, db: Path, reference: str | None) -> dict:
    """One ingest (or `reference` load) into `db` (in this process); print-ready figures."""
    con = store.connect(db)
    started, cpu_started = time.perf_counter(), cpu_seconds()
    if reference:
        stored = con.execute(REFERENCES[reference].format(path=path)).fetchone()[0]
        report = None
    else:
        report = ingest_paths(con, [path])
        stored = report.stored
    con.execute("CHECKPOINT")
    con.close()
    return {
        "seconds": time.perf_counter() - started,
        "cpu": cpu_seconds() - cpu_started,
        "stored": stored,
        "duplicates": report.duplicates if report else 0,
        "problems": (report.quarantined_total + len(report.errors)) if report else 0,
        "peak_rss_mib": peak_rss_mib(),
    }


def run_measure(path: Path, db: Path, reference: str | None = None) -> dict:
    """`measure` in a fresh process, so memory and caches start clean."""
    cmd = [sys.executable, __file__, "--measure", str(path), "--db", str(db)]
    if reference:
        cmd += ["--reference", reference]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--db", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--reference", choices=REFERENCES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.db, args.reference)))
        return
    print(machine_summary())
    print(f"load average at start: {', '.join(f'{x:.1f}' for x in os.getloadavg())} "
          "(other work on the machine inflates wall times; CPU-seconds are steadier)")
    folder = Path(tempfile.mkdtemp(prefix="dg-ingest-bench-"))
    try:
        started = time.perf_counter()
        inputs, median_prompt = write_inputs(args.rows, folder)
        sizes = {k: p.stat().st_size / 2**20 for k, p in inputs.items()}
        print(f"generated {args.rows:,} exchanges in {time.perf_counter() - started:.0f} s; "
              f"median prompt {median_prompt} chars; JSONL {sizes['jsonl']:,.0f} MiB "
              f"({sizes['jsonl'] * 2**20 / args.rows:,.0f} B/line), gzip "
              f"{sizes['jsonl.gz']:,.0f} MiB, Parquet {sizes['parquet']:,.0f} MiB")
        db = folder / "bench.duckdb"
        cpu_per_format = {}
        for name, path in inputs.items():
            runs = []
            for _ in range(args.repeats):
                db.unlink(missing_ok=True)
                runs.append(run_measure(path, db))
                assert runs[-1]["stored"] == args.rows and runs[-1]["problems"] == 0, runs[-1]
            replay = run_measure(path, db)
            assert replay["stored"] == 0 and replay["duplicates"] == args.rows, replay
            wall = statistics.median(r["seconds"] for r in runs)
            cpu = statistics.median(r["cpu"] for r in runs)
            cpu_per_format[name] = cpu
            peak = max(r["peak_rss_mib"] for r in runs)
            times = ", ".join(f"{r['seconds']:.1f}" for r in runs)
            print(f"{name:9s} {args.rows / wall:>9,.0f} exchanges/s (median of {times} s); "
                  f"{args.rows / cpu:,.0f} exchanges per CPU-second; peak {peak:,.0f} MiB; "
                  f"re-ingest (all replays) {args.rows / replay['seconds']:,.0f} rows/s")
        for reference, source, what in (
            ("read_json", "jsonl", "DuckDB read_json of the JSONL into a table"),
            ("store_write", "parquet", "contract-typed Parquet rows appended to the store"),
        ):
            db.unlink(missing_ok=True)
            ref = run_measure(inputs[source], db, reference)
            if reference == "read_json":
                base = ref
            print(f"reference, no validation/dedupe/quarantine: {what}: "
                  f"{args.rows / ref['seconds']:,.0f} rows/s, "
                  f"{args.rows / ref['cpu']:,.0f} rows per CPU-second, "
                  f"peak {ref['peak_rss_mib']:,.0f} MiB")
        # A busy machine inflates CPU figures too, roughly alike: the ratio to the reference is steadier.
        print("CPU per exchange relative to the reference: " + ", ".join(
            f"{name} {cpu / base['cpu']:.2f}x" for name, cpu in cpu_per_format.items()))
        print(f"peak memory of any process of this benchmark: {peak_rss_mib():,.0f} MiB")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
