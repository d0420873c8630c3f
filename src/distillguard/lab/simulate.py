"""`simulate`: scenario -> labelled traffic on disk, streamed day by day in bounded memory.

Output layout (other stages depend on it exactly):

    OUT/exchanges/part-00000.parquet ...  contract.EXCHANGE_SCHEMA
    OUT/accounts.parquet                  contract.ACCOUNT_SCHEMA
    OUT/truth/accounts.parquet            contract.TRUTH_ACCOUNT_SCHEMA
    OUT/truth/exchanges.parquet           contract.TRUTH_EXCHANGE_SCHEMA
    OUT/truth/campaigns.parquet           contract.TRUTH_CAMPAIGN_SCHEMA
    OUT/truth/releases.parquet            contract.TRUTH_RELEASE_SCHEMA
    OUT/truth/scenario.yaml               the resolved scenario (after --scale)

Exchanges are sorted by time across all part files: one part file per simulated day, holding
the day sorted as one row group. Days are independent work units (every random draw derives
from the seed, the group and the day), so worker processes make them in parallel, each holding
one day (dictionary-encoded, a few hundred bytes per exchange); the calling process writes the
truth rows in day order and names the part files. accounts.parquet is shuffled: row order
reveals no group.
"""

from __future__ import annotations

import collections
import gc
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from distillguard import contract
from distillguard.lab.infrastructure import Infrastructure, user_agent_pool
from distillguard.lab.prompts import PromptLibrary, find_corpus, prompt_library
from distillguard.lab.scenario import Scenario, list_scenarios, load_scenario
from distillguard.lab.traffic import (
    DAY_MS,
    TRUTH_WRITE_SCHEMA,
    WRITE_SCHEMA,
    Group,
    _ms,
    day_table,
)

__all__ = ["SimulationSummary", "list_scenarios", "simulate"]

#: Rows generated per block (bounds memory: a day is built from blocks of at most this size).
CHUNK_ROWS = 100_000
#: Row-group size of the truth file (exchanges get one row group per simulated day).
TRUTH_ROW_GROUP_ROWS = 1_000_000
PARQUET_OPTIONS = {"compression": "zstd", "compression_level": 1,
                   "dictionary_pagesize_limit": 64 << 20}

#: Columns with Parquet min/max statistics (for readers' filter push-down). Statistics on long
#: text columns would cost more CPU than encoding them and filter nothing.
STATISTICS_COLUMNS = ["ts", "account_id", "model", "status", "input_tokens", "output_tokens",
                      "reasoning_tokens", "latency_ms"]

#: Near-unique columns: a Parquet dictionary would cost hashing and save nothing.
PLAIN_COLUMNS = {"request_id", "ts", "latency_ms"}


def _dictionary_columns(schema: pa.Schema) -> list[str]:
    """Parquet paths of the leaf columns of `schema` outside PLAIN_COLUMNS."""
    def leaves(path: str, type_: pa.DataType) -> list[str]:
        if pa.types.is_struct(type_):
            return [p for f in type_ for p in leaves(f"{path}.{f.name}", f.type)]
        if pa.types.is_map(type_):
            return [*leaves(f"{path}.key_value.key", type_.key_type),
                    *leaves(f"{path}.key_value.value", type_.item_type)]
        if pa.types.is_list(type_):
            return leaves(f"{path}.list.element", type_.value_type)
        return [path]
    return [p for f in schema if f.name not in PLAIN_COLUMNS for p in leaves(f.name, f.type)]


EXCHANGE_OPTIONS = {**PARQUET_OPTIONS, "write_statistics": STATISTICS_COLUMNS,
                    "use_dictionary": _dictionary_columns(WRITE_SCHEMA)}
TRUTH_OPTIONS = {**PARQUET_OPTIONS, "use_dictionary": _dictionary_columns(TRUTH_WRITE_SCHEMA)}

#: progress(done, total): called as (day, group) steps complete.
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
    #: processes that generated the days (1: in the calling process)
    workers: int = 1

    def as_dict(self) -> dict:
        return {
            "scenario": self.scenario, "scale": self.scale, "seed": self.seed,
            "corpus": self.corpus, "out": str(self.out), "days": self.days,
            "exchanges": self.exchanges, "accounts": self.accounts,
            "populations": {k: vars(v) for k, v in self.populations.items()},
            "campaigns": {k: vars(v) for k, v in self.campaigns.items()},
            "files": [str(f) for f in self.files], "seconds": round(self.seconds, 2),
            "corpus_skipped": dict(self.corpus_skipped), "workers": self.workers,
        }


@dataclass
class _Tally:
    """One group's counts for the truth files: exchanges, attack exchanges per account, and
    the attack window (first, last, first on the pivot model) in epoch ms."""

    exchanges: int = 0
    attack_exchanges: int = 0
    attack_per_account: np.ndarray | None = None
    first: int | None = None
    last: int | None = None
    pivot: int | None = None

    def add(self, group: Group, plan: dict) -> None:
        attack = plan["stats"]["attack"]
        self.exchanges += len(plan["ts"])
        n_attack = int(attack.sum())
        if not n_attack:
            return
        self.attack_exchanges += n_attack
        per_account = np.bincount(plan["acct"][attack], minlength=group.spec["accounts"])
        self._merge_window(per_account, plan["ts"][attack].min(), plan["ts"][attack].max())
        if group.pivot_model is not None:
            pivoted = plan["ts"][attack][plan["stats"]["model"][attack] == group.pivot_model]
            if len(pivoted):
                self.pivot = _min(self.pivot, int(pivoted.min()))

    def merge(self, other: _Tally) -> None:
        self.exchanges += other.exchanges
        self.attack_exchanges += other.attack_exchanges
        if other.attack_per_account is not None:
            self._merge_window(other.attack_per_account, other.first, other.last)
        if other.pivot is not None:
            self.pivot = _min(self.pivot, other.pivot)

    def _merge_window(self, per_account: np.ndarray, first: int, last: int) -> None:
        self.attack_per_account = per_account if self.attack_per_account is None \
            else self.attack_per_account + per_account
        self.first = _min(self.first, int(first))
        self.last = int(last) if self.last is None else max(self.last, int(last))


def _min(a: int | None, b: int) -> int:
    return b if a is None else min(a, b)


@dataclass
class _Day:
    """One simulated day, as a worker hands it back: its part file (written under a temporary
    name, None if the day is empty), its truth rows and a tally per group."""

    day: int
    path: Path | None
    truth: pa.Table | None
    tallies: list[_Tally]


@dataclass
class _DayMaker:
    """Everything needed to generate any day on its own: workers inherit it when forked."""

    groups: list[Group]
    out: Path
    chunk_rows: int

    def __call__(self, day: int) -> _Day:
        """Generate, sort and write day `day`.

        Every random draw and identifier derives from (seed, group, day, block), never from
        what other days produced, so the output is the same whichever process makes the day.
        """
        blocks, tallies = [], []
        for group in self.groups:
            tally = _Tally()
            for plan in group.day_blocks(day, self.chunk_rows):
                blocks.append(group.assemble(plan))
                tally.add(group, plan)
            tallies.append(tally)
        if not blocks:
            return _Day(day, None, None, tallies)
        # One row group per simulated day, sorted by time: the files are in time order and row
        # order reveals nothing about which population or campaign generated a row. Each
        # distinct text is stored once per day.
        table, truth = day_table(blocks, self.groups[0].lib.bank, self.groups[0].seed, day)
        del blocks
        path = self.out / "exchanges" / f"day-{day:05d}{PARTIAL}"
        pq.write_table(table, path, row_group_size=max(table.num_rows, 1), store_schema=False,
                       **EXCHANGE_OPTIONS)
        return _Day(day, path, truth, tallies)


#: Suffix of part files still being written (readers glob *.parquet and never see them).
PARTIAL = ".parquet.partial"

#: The day maker of a worker process (handed over at fork, never pickled).
_MAKER: _DayMaker | None = None


def _start_worker(maker: _DayMaker) -> None:
    global _MAKER
    _MAKER = maker


def _make_day(day: int) -> _Day:
    assert _MAKER is not None, "not a simulate() worker"
    return _MAKER(day)


#: Days queued per worker: a worker never waits for the calling process to hand it the next
#: day, while memory stays bounded (each worker holds one day; finished days wait in the
#: calling process only as truth rows).
DAYS_IN_FLIGHT_PER_WORKER = 2


def _days(maker: _DayMaker, days: int, workers: int) -> Iterator[_Day]:
    """Days 0..days-1 in order, made by `workers` forked processes (or here if 1)."""
    if workers <= 1:
        yield from map(maker, range(days))
        return
    # Frozen objects are never scanned by the workers' garbage collector, so the pages the
    # forked workers share with this process stay shared instead of being copied.
    gc.freeze()
    try:
        pool = multiprocessing.get_context("fork").Pool(workers, _start_worker, (maker,))
    finally:
        gc.unfreeze()
    try:
        pending: collections.deque = collections.deque()
        for day in range(days):
            pending.append(pool.apply_async(_make_day, (day,)))
            if len(pending) >= DAYS_IN_FLIGHT_PER_WORKER * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
        pool.close()
    finally:
        pool.terminate()
        pool.join()


#: Default cap on worker processes: each holds a whole day in memory.
MAX_WORKERS = 8


def default_workers() -> int:
    """Worker processes by default: one per core this process may run on, at most
    MAX_WORKERS (1 where processes cannot be forked)."""
    if "fork" not in multiprocessing.get_all_start_methods():
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
        os.cpu_count() or 1
    return min(cores, MAX_WORKERS)


def _prepare_out(out: Path) -> None:
    """Create the layout; remove files of an earlier run so no stale part survives."""
    (out / "exchanges").mkdir(parents=True, exist_ok=True)
    (out / "truth").mkdir(parents=True, exist_ok=True)
    for stale in [*(out / "exchanges").glob("part-*.parquet"),
                  *(out / "exchanges").glob(f"*{PARTIAL}")]:
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
             workers: int | None = None) -> SimulationSummary:
    """Generate the scenario's labelled traffic under `out` (layout in the module docstring).

    `corpus`: directory of public prompt corpora (default: found by `prompts.find_corpus`);
    `builtin_prompts=True` ignores any corpus. `workers`: processes generating days (default
    `default_workers()`). Same scenario, scale, seed and corpus -> the same data, whatever the
    number of workers.
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
    workers = max(1, min(default_workers() if workers is None else workers, sc.days))
    summary = SimulationSummary(sc.name, scale, seed, str(corpus_dir) if corpus_dir else None,
                                out, sc.days, corpus_skipped=dict(lib.skipped), workers=workers)
    tallies = [_Tally() for _ in groups]
    truth = pq.ParquetWriter(out / "truth" / "exchanges.parquet", TRUTH_WRITE_SCHEMA,
                             store_schema=False, **TRUTH_OPTIONS)
    try:
        for made in _days(_DayMaker(groups, out, chunk_rows), sc.days, workers):
            if made.truth is not None:
                truth.write_table(made.truth, row_group_size=TRUTH_ROW_GROUP_ROWS)
            for total, tally in zip(tallies, made.tallies, strict=True):
                total.merge(tally)
            if made.path is not None:
                summary.files.append(made.path.rename(
                    out / "exchanges" / f"part-{len(summary.files):05d}.parquet"))
            if progress is not None:
                progress((made.day + 1) * len(groups), sc.days * len(groups))
    except BaseException:
        for partial in (out / "exchanges").glob(f"*{PARTIAL}"):  # the workers have stopped
            partial.unlink()
        raise
    finally:
        truth.close()
    for group, tally in zip(groups, tallies, strict=True):
        target = summary.campaigns if group.is_attack else summary.populations
        target[group.name] = GroupCounts(group.spec["accounts"], tally.exchanges,
                                         tally.attack_exchanges)
        summary.exchanges += tally.exchanges
    _write_static(out, sc, groups, tallies, summary)
    summary.seconds = time.perf_counter() - began
    return summary


def _write_static(out: Path, sc: Scenario, groups: list[Group], tallies: list[_Tally],
                  summary: SimulationSummary) -> None:
    """Accounts, truth about accounts / campaigns / releases, and the resolved scenario."""
    accounts = pa.concat_tables([g.accounts.table for g in groups])
    # Shuffled (deterministically) so row order reveals no population or campaign.
    accounts = accounts.take(np.random.default_rng([summary.seed, 7003]).permutation(
        accounts.num_rows))
    pq.write_table(accounts, out / "accounts.parquet", **PARQUET_OPTIONS)
    attacked = [np.zeros(g.spec["accounts"], dtype=bool) if t.attack_per_account is None
                else t.attack_per_account > 0 for g, t in zip(groups, tallies, strict=True)]
    truth_accounts = pa.concat_tables([
        pa.table({
            "account_id": g.accounts.ids,
            "population": pa.array(["attacker" if g.is_attack else g.name] * g.spec["accounts"]),
            "is_attack": pa.array(attacked[i]),
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
        t = tallies[i]
        rows.append({
            "campaign_id": g.name, "kind": g.spec["kind"],
            "start": t.first if t.first is not None else start_ms + int(g.start_day * DAY_MS),
            "end": t.last if t.last is not None else start_ms + int(g.end_day * DAY_MS),
            "n_accounts": int(attacked[i].sum()),
            "n_exchanges": t.attack_exchanges,
            "pivot_model": g.models[g.pivot_model].name if t.pivot is not None else None,
            "pivot_start": t.pivot,
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


def _ms_schema(schema: pa.Schema) -> pa.Schema:
    """`schema` with timestamps as int64 milliseconds, for building rows from epoch numbers."""
    return pa.schema([pa.field(f.name, pa.int64(), f.nullable) if pa.types.is_timestamp(f.type)
                      else f for f in schema])
