"""`simulate`: scenario -> labelled traffic on disk, streamed day by day in bounded memory.

Output layout (other stages depend on it exactly):

    OUT/exchanges/part-00000.parquet ...  contract.EXCHANGE_SCHEMA
    OUT/accounts.parquet                  contract.ACCOUNT_SCHEMA
    OUT/truth/accounts.parquet            contract.TRUTH_ACCOUNT_SCHEMA
    OUT/truth/exchanges.parquet           contract.TRUTH_EXCHANGE_SCHEMA
    OUT/truth/campaigns.parquet           contract.TRUTH_CAMPAIGN_SCHEMA
    OUT/truth/releases.parquet            contract.TRUTH_RELEASE_SCHEMA
    OUT/truth/scenario.yaml               the resolved scenario (after --scale)

Exchanges are sorted by time across all part files: the writer buffers one simulated day
(dictionary-encoded, a few hundred bytes per exchange in memory), sorts it and writes it as one
row group; part files rotate at day boundaries. accounts.parquet is shuffled: row order reveals
no group. Generation runs in the calling thread and Parquet encoding in a writer thread, so
both cores work.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from distillguard import contract
from distillguard.lab.infrastructure import Infrastructure, user_agent_pool
from distillguard.lab.prompts import PromptLibrary, find_corpus, prompt_library
from distillguard.lab.scenario import Scenario, list_scenarios, load_scenario
from distillguard.lab.traffic import DAY_MS, WRITE_SCHEMA, Group, _ms

__all__ = ["SimulationSummary", "list_scenarios", "simulate"]

#: Rows generated per block (bounds memory: a block is built, queued, written, dropped).
CHUNK_ROWS = 100_000
#: Row-group size of the truth file (exchanges get one row group per simulated day).
TRUTH_ROW_GROUP_ROWS = 1_000_000
#: Rows per exchanges part file.
ROWS_PER_FILE = 2_000_000
PARQUET_OPTIONS = {"compression": "zstd", "compression_level": 1,
                   "dictionary_pagesize_limit": 64 << 20}

#: Columns with Parquet min/max statistics (for readers' filter push-down). Statistics on long
#: text columns would cost more CPU than encoding them and filter nothing.
STATISTICS_COLUMNS = ["ts", "account_id", "model", "status", "input_tokens", "output_tokens",
                      "reasoning_tokens", "latency_ms"]

#: Queued after each simulated day: the writer sorts and writes the day.
END_OF_DAY = "end of day"

#: progress(done, total): called after each (day, group) step.
Progress = Callable[[int, int], None]


@dataclass
class GroupCounts:
    accounts: int = 0
    exchanges: int = 0
    attack_exchanges: int = 0


@dataclass
class SimulationSummary:
    """What `simulate` wrote: counts per population and campaign, and the files."""

    scenario: str
    scale: float
    seed: int
    corpus: str | None
    out: Path
    days: int
    exchanges: int = 0
    accounts: int = 0
    populations: dict[str, GroupCounts] = field(default_factory=dict)
    campaigns: dict[str, GroupCounts] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    seconds: float = 0.0
    #: malformed corpus records skipped, per file name (never fatal, never silent)
    corpus_skipped: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {
            "scenario": self.scenario, "scale": self.scale, "seed": self.seed,
            "corpus": self.corpus, "out": str(self.out), "days": self.days,
            "exchanges": self.exchanges, "accounts": self.accounts,
            "populations": {k: vars(v) for k, v in self.populations.items()},
            "campaigns": {k: vars(v) for k, v in self.campaigns.items()},
            "files": [str(f) for f in self.files], "seconds": round(self.seconds, 2),
            "corpus_skipped": dict(self.corpus_skipped),
        }


class _Writer(threading.Thread):
    """Writes queued (exchanges, truth) tables: exchanges to rotating part files, truth to one
    file. Errors are kept and re-raised in the producer."""

    def __init__(self, out: Path, rows_per_file: int) -> None:
        super().__init__(daemon=True)
        self.out, self.rows_per_file = out, rows_per_file
        self.queue: queue.Queue = queue.Queue(maxsize=3)
        self.error: BaseException | None = None
        self.files: list[Path] = []

    def put(self, item: tuple[pa.Table, pa.Table] | str | None) -> None:
        """Queue a block (exchanges, truth), END_OF_DAY, or None (finish)."""
        while True:
            if self.error is not None:
                raise RuntimeError("writing Parquet failed") from self.error
            try:
                self.queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def run(self) -> None:
        part: pq.ParquetWriter | None = None
        rows = 0
        pending: list[pa.Table] = []
        pending_truth: list[pa.Table] = []
        truth = pq.ParquetWriter(self.out / "truth" / "exchanges.parquet",
                                 contract.TRUTH_EXCHANGE_SCHEMA, **PARQUET_OPTIONS)
        try:
            while True:
                item = self.queue.get()
                if isinstance(item, tuple):
                    pending.append(item[0])
                    pending_truth.append(item[1])
                    continue
                if pending:
                    truth.write_table(pa.concat_tables(pending_truth),
                                      row_group_size=TRUTH_ROW_GROUP_ROWS)
                    if part is None or rows >= self.rows_per_file:
                        if part is not None:
                            part.close()
                        path = self.out / "exchanges" / f"part-{len(self.files):05d}.parquet"
                        self.files.append(path)
                        part = pq.ParquetWriter(path, WRITE_SCHEMA, store_schema=False,
                                                write_statistics=STATISTICS_COLUMNS,
                                                **PARQUET_OPTIONS)
                        rows = 0
                    # One row group per simulated day, sorted by time: the files are in time
                    # order and row order reveals nothing about which population or campaign
                    # generated a row. Dictionaries are merged, so each distinct text is
                    # stored once per day.
                    group = pa.concat_tables(pending).unify_dictionaries().combine_chunks()
                    group = group.take(pc.sort_indices(group["ts"]))
                    part.write_table(group, row_group_size=max(group.num_rows, 1))
                    rows += group.num_rows
                    pending, pending_truth = [], []
                if item is None:
                    break
        except BaseException as exc:  # surfaced by put()/finish()
            self.error = exc
            while self.queue.get() is not None:  # drain so the producer never blocks
                pass
        finally:
            if part is not None:
                part.close()
            truth.close()

    def finish(self) -> None:
        self.put(None)
        self.join()
        if self.error is not None:
            raise RuntimeError("writing Parquet failed") from self.error


def _prepare_out(out: Path) -> None:
    """Create the layout; remove files of an earlier run so no stale part survives."""
    (out / "exchanges").mkdir(parents=True, exist_ok=True)
    (out / "truth").mkdir(parents=True, exist_ok=True)
    for stale in (out / "exchanges").glob("part-*.parquet"):
        stale.unlink()


def _build_groups(sc: Scenario, lib: PromptLibrary, infra: Infrastructure,
                  seed: int) -> list[Group]:
    groups, first = [], 0
    user_agents = user_agent_pool()
    entries = [(name, spec, None) for name, spec in sc.populations.items()]
    entries += [(cid, spec, cid) for cid, spec in sc.campaigns.items()]
    for index, (name, spec, campaign_id) in enumerate(entries):
        groups.append(Group(name, spec, campaign_id, index, sc, lib, infra, user_agents, seed,
                            first))
        first += spec["accounts"]
    return groups


def simulate(scenario: str | Path = "smoke", out: Path = Path("lab-out"), scale: float = 1.0,
             seed: int = 0, corpus: Path | None = None, progress: Progress | None = None, *,
             builtin_prompts: bool = False, chunk_rows: int = CHUNK_ROWS,
             rows_per_file: int = ROWS_PER_FILE) -> SimulationSummary:
    """Generate the scenario's labelled traffic under `out` (layout in the module docstring).

    `corpus`: directory of public prompt corpora (default: found by `prompts.find_corpus`);
    `builtin_prompts=True` ignores any corpus. Same scenario, scale, seed and corpus -> the
    same bytes of data.
    """
    began = time.perf_counter()
    sc = load_scenario(scenario, scale)
    corpus_dir = None if builtin_prompts else find_corpus(corpus)
    out = Path(out)
    _prepare_out(out)
    lib = prompt_library(corpus_dir, seed)
    residential = sum(s["accounts"] * s["ip"]["per_account"] for s in sc.populations.values()
                      if s["ip"]["strategy"] == "residential")
    infra = Infrastructure(corpus_dir, residential, seed)
    groups = _build_groups(sc, lib, infra, seed)
    summary = SimulationSummary(sc.name, scale, seed, str(corpus_dir) if corpus_dir else None,
                                out, sc.days, corpus_skipped=dict(lib.skipped))
    attack_per_account = [np.zeros(g.spec["accounts"], dtype=np.int64) for g in groups]
    windows: dict[str, list] = {g.name: [None, None, None] for g in groups if g.is_attack}
    writer = _Writer(out, rows_per_file)
    writer.start()
    request_counter, steps = 0, 0
    try:
        for day in range(sc.days):
            for gi, group in enumerate(groups):
                for plan in group.day_blocks(day, chunk_rows):
                    exchanges, truth = group.assemble(plan, request_counter)
                    request_counter += exchanges.num_rows
                    _count(summary, group, plan, attack_per_account[gi], windows)
                    writer.put((exchanges, truth))
                steps += 1
                if progress is not None:
                    progress(steps, sc.days * len(groups))
            writer.put(END_OF_DAY)
    finally:
        writer.finish()
    summary.files = writer.files
    _write_static(out, sc, groups, attack_per_account, windows, summary)
    summary.seconds = time.perf_counter() - began
    return summary


def _count(summary: SimulationSummary, group: Group, plan: dict, attack_counts: np.ndarray,
           windows: dict[str, list]) -> None:
    stats = plan["stats"]
    target = summary.campaigns if group.is_attack else summary.populations
    counts = target.setdefault(group.name, GroupCounts(group.spec["accounts"]))
    n_attack = int(stats["attack"].sum())
    counts.exchanges += len(plan["ts"])
    counts.attack_exchanges += n_attack
    summary.exchanges += len(plan["ts"])
    if not n_attack:
        return
    np.add.at(attack_counts, plan["acct"][stats["attack"]], 1)
    ts = plan["ts"][stats["attack"]]
    window = windows[group.name]
    window[0] = min(window[0] or ts.min(), ts.min())
    window[1] = max(window[1] or ts.max(), ts.max())
    if group.pivot_model is not None:
        pivoted = ts[stats["model"][stats["attack"]] == group.pivot_model]
        if len(pivoted):
            window[2] = min(window[2] or pivoted.min(), pivoted.min())


def _write_static(out: Path, sc: Scenario, groups: list[Group], attack_counts: list,
                  windows: dict[str, list], summary: SimulationSummary) -> None:
    """Accounts, truth about accounts / campaigns / releases, and the resolved scenario."""
    accounts = pa.concat_tables([g.accounts.table for g in groups])
    # Shuffled (deterministically) so row order reveals no population or campaign.
    accounts = accounts.take(np.random.default_rng([summary.seed, 7003]).permutation(
        accounts.num_rows))
    pq.write_table(accounts, out / "accounts.parquet", **PARQUET_OPTIONS)
    truth_accounts = pa.concat_tables([
        pa.table({
            "account_id": g.accounts.ids,
            "population": pa.array(["attacker" if g.is_attack else g.name] * g.spec["accounts"]),
            "is_attack": pa.array(attack_counts[i] > 0),
            "campaign_id": pa.array([g.campaign_id] * g.spec["accounts"], pa.string()),
        }, schema=contract.TRUTH_ACCOUNT_SCHEMA)
        for i, g in enumerate(groups)
    ])
    pq.write_table(truth_accounts, out / "truth" / "accounts.parquet", **PARQUET_OPTIONS)
    start_ms = _ms(sc.start)
    rows = []
    for i, g in enumerate(groups):
        if not g.is_attack:
            continue
        first, last, pivot = windows[g.name]
        rows.append({
            "campaign_id": g.name, "kind": g.spec["kind"],
            "start": int(first) if first is not None else start_ms + int(g.start_day * DAY_MS),
            "end": int(last) if last is not None else start_ms + int(g.end_day * DAY_MS),
            "n_accounts": int((attack_counts[i] > 0).sum()),
            "n_exchanges": summary.campaigns.get(g.name, GroupCounts()).attack_exchanges,
            "pivot_model": g.models[g.pivot_model].name if pivot is not None else None,
            "pivot_start": int(pivot) if pivot is not None else None,
        })
    campaigns = pa.Table.from_pylist(rows, schema=_ms_schema(contract.TRUTH_CAMPAIGN_SCHEMA)) \
        if rows else contract.empty_table(contract.TRUTH_CAMPAIGN_SCHEMA)
    pq.write_table(campaigns.cast(contract.TRUTH_CAMPAIGN_SCHEMA),
                   out / "truth" / "campaigns.parquet", **PARQUET_OPTIONS)
    releases = pa.table({
        "model": [r.model.name for r in sc.releases],
        "released_at": pa.array([sc.start + timedelta(days=r.at_day) for r in sc.releases],
                                contract.UTC_TS),
    }, schema=contract.TRUTH_RELEASE_SCHEMA)
    pq.write_table(releases, out / "truth" / "releases.parquet", **PARQUET_OPTIONS)
    (out / "truth" / "scenario.yaml").write_text(
        yaml.safe_dump(sc.resolved(), sort_keys=False, allow_unicode=True))
    summary.accounts = accounts.num_rows
    for g in groups:
        target = summary.campaigns if g.is_attack else summary.populations
        target.setdefault(g.name, GroupCounts(g.spec["accounts"]))


def _ms_schema(schema: pa.Schema) -> pa.Schema:
    """`schema` with timestamps as int64 milliseconds, for building rows from epoch numbers."""
    return pa.schema([pa.field(f.name, pa.int64(), f.nullable) if pa.types.is_timestamp(f.type)
                      else f for f in schema])
