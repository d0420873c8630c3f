"""Ingest throughput: native JSONL (plain and gzip) and Parquet, >=1M generated exchanges.

Prompts are real public prompts from ../shared/data when present (gsm8k questions, Arena
and Open Assistant queries: median a few hundred characters), otherwise synthetic text of
the same length distribution. Each run ingests into a fresh store file; the median of the
repeats is quoted, plus the time to re-ingest the same file (every row a replay).

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
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
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


def generate(rows: int, seed: int = 7) -> list[dict]:
    rng = random.Random(seed)
    prompts = load_prompts(rng)
    answers = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 250))) for _ in range(500)]
    start = datetime(2026, 1, 5, tzinfo=UTC)
    records = []
    for i in range(rows):
        ts = start + timedelta(milliseconds=i * 250 + rng.randint(0, 999))
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


def write_inputs(records: list[dict], folder: Path) -> dict[str, Path]:
    jsonl = folder / "exchanges.jsonl"
    with jsonl.open("wb") as fh:
        for record in records:
            fh.write(orjson.dumps(record) + b"\n")
    gz = folder / "exchanges.jsonl.gz"
    with jsonl.open("rb") as src, gzip.open(gz, "wb", compresslevel=1) as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    # Parquet in the contract, as the traffic lab writes it.
    con = store.connect(folder / "seed.duckdb")
    ingest_paths(con, [jsonl])
    parquet = folder / "exchanges.parquet"
    table = contract.conform(con.execute("SELECT * FROM exchanges").to_arrow_table(),
                             contract.EXCHANGE_SCHEMA)
    pq.write_table(table, parquet, row_group_size=100_000)
    con.close()
    return {"jsonl": jsonl, "jsonl.gz": gz, "parquet": parquet}


def cpu_seconds() -> float:
    """User + system CPU time of this process (all threads): robust to a busy machine."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run(path: Path, folder: Path, repeats: int) -> tuple[list[float], list[float], float, int]:
    """Fresh-store ingest wall and CPU times, one replay time, rows stored."""
    times, cpu = [], []
    stored = 0
    db = folder / "bench.duckdb"
    for _ in range(repeats):
        db.unlink(missing_ok=True)
        con = store.connect(db)
        started, cpu_started = time.perf_counter(), cpu_seconds()
        report = ingest_paths(con, [path])
        times.append(time.perf_counter() - started)
        cpu.append(cpu_seconds() - cpu_started)
        stored = report.stored
        assert not report.errors and report.quarantined_total == 0, report
        con.close()
    con = store.connect(db)
    started = time.perf_counter()
    replay = ingest_paths(con, [path])
    replay_time = time.perf_counter() - started
    assert replay.stored == 0 and replay.duplicates == stored, replay
    con.close()
    return times, cpu, replay_time, stored


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(machine_summary())
    print(f"load average at start: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    folder = Path(tempfile.mkdtemp(prefix="dg-ingest-bench-"))
    try:
        started = time.perf_counter()
        records = generate(args.rows)
        prompt_chars = sorted(len(r["messages"][0]["content"]) for r in records)
        inputs = write_inputs(records, folder)
        del records
        print(
            f"generated {args.rows:,} exchanges in {time.perf_counter() - started:.1f} s; "
            f"median prompt {prompt_chars[len(prompt_chars) // 2]} chars; "
            f"JSONL {inputs['jsonl'].stat().st_size / 2**20:,.0f} MiB, "
            f"gzip {inputs['jsonl.gz'].stat().st_size / 2**20:,.0f} MiB, "
            f"Parquet {inputs['parquet'].stat().st_size / 2**20:,.0f} MiB"
        )
        for name, path in inputs.items():
            times, cpu, replay, stored = run(path, folder, args.repeats)
            median = statistics.median(times)
            cpu_median = statistics.median(cpu)
            mib = inputs["jsonl"].stat().st_size / 2**20
            print(
                f"{name:9s} {stored / median:>10,.0f} exchanges/s  "
                f"({mib / median:,.0f} MiB/s of JSON text)  median {median:.2f} s of "
                f"{', '.join(f'{t:.2f}' for t in times)}; CPU {cpu_median:.2f} s = "
                f"{stored / cpu_median:,.0f} exchanges per CPU-second; re-ingest (all replays) "
                f"{replay:.2f} s = {stored / replay:,.0f} rows/s"
            )
        print(f"peak memory: {peak_rss_mib():,.0f} MiB")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
