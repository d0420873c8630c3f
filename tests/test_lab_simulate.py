"""The simulator's output: layout, contract, truth coverage, determinism, prompt sources.

Also home of the lab tests' shared helpers (`TINY`, `write_scenario`, `query`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from distillguard import contract
from distillguard.cli import app
from distillguard.lab.simulate import list_scenarios, simulate

TINY = {
    "name": "tiny",
    "start": "2026-03-02T00:00:00Z",
    "days": 2,
    "models": [{"name": "m-flag", "tier": "flagship"},
               {"name": "m-reason", "tier": "reasoning", "reasoning": True}],
    "releases": [{"name": "m-next", "tier": "flagship", "reasoning": True, "at_day": 1.0}],
    "populations": {
        "office": {"kind": "power_user", "accounts": 40,
                   "timing": {"mode": "diurnal", "profile": "office", "timezones": {0: 1.0}}},
        "casual": {"kind": "casual_chat", "accounts": 120, "active_days": 0.9},
        "campus": {"kind": "university", "accounts": 60,
                   "ip": {"accounts_per_ip": 30}},
        "evals": {"kind": "eval_harness", "accounts": 2, "release_burst": {"volume": 300}},
        "batch": {"kind": "batch_job", "accounts": 1, "volume": {"median": 400, "sigma": 0.1}},
        "coders": {"kind": "agentic_coder", "accounts": 3, "volume": {"median": 80}},
    },
    "campaigns": {
        "lb": {"kind": "reasoning_extraction", "accounts": 20, "exchanges": 1500,
               "volume": {"cap": 60}, "ip": {"accounts_per_ip": 5},
               "payment": {"accounts_per_payment": 4}},
        "pivoter": {"kind": "agentic_coding_at_scale", "accounts": 10, "exchanges": 1500,
                    "pivot": {"share": 0.5, "delay_hours": 3}},
        "mimic": {"kind": "long_campaign", "accounts": 10, "exchanges": 600, "start_day": 0.5,
                  "phases": [{"from_fraction": 0.5,
                              "families": {"trace_reconstruction": 1.0}}]},
        "hydra": {"kind": "reseller_hydra", "accounts": 20, "exchanges": 800,
                  "honest_share": 0.4},
    },
}


def write_scenario(directory: Path, data: dict | None = None, name: str = "tiny") -> Path:
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data or TINY, sort_keys=False))
    return path


def query(out: Path, sql: str) -> list[tuple]:
    """Run `sql` with views exchanges, accounts, t_accounts, t_exchanges, t_campaigns."""
    con = duckdb.connect()
    con.execute(f"CREATE VIEW exchanges AS SELECT * FROM '{out}/exchanges/*.parquet'")
    con.execute(f"CREATE VIEW accounts AS SELECT * FROM '{out}/accounts.parquet'")
    for name in ("accounts", "exchanges", "campaigns", "releases"):
        con.execute(f"CREATE VIEW t_{name} AS SELECT * FROM '{out}/truth/{name}.parquet'")
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


SCHEMAS = {
    "accounts.parquet": contract.ACCOUNT_SCHEMA,
    "truth/accounts.parquet": contract.TRUTH_ACCOUNT_SCHEMA,
    "truth/exchanges.parquet": contract.TRUTH_EXCHANGE_SCHEMA,
    "truth/campaigns.parquet": contract.TRUTH_CAMPAIGN_SCHEMA,
    "truth/releases.parquet": contract.TRUTH_RELEASE_SCHEMA,
}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smoke")
    simulate("smoke", out)
    return out


@pytest.fixture(scope="module")
def tiny_builtin(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("tiny")
    scenario = write_scenario(base)
    out = base / "out"
    simulate(scenario, out, seed=3, builtin_prompts=True)
    return scenario, out


def test_shipped_scenarios_are_listed():
    assert {"smoke", "standard", "seeds-2026"} <= set(list_scenarios())


def test_files_match_the_contract(smoke: Path):
    parts = sorted((smoke / "exchanges").glob("part-*.parquet"))
    assert parts
    for part in parts:
        assert pq.read_schema(part).remove_metadata().equals(contract.EXCHANGE_SCHEMA)
    # Sorted by time across parts, so row order says nothing about who generated a row.
    ts = pa.concat_arrays([pq.read_table(p, columns=["ts"])["ts"].combine_chunks()
                           for p in parts]).cast(pa.int64()).to_numpy()
    assert (np.diff(ts) >= 0).all()
    for name, schema in SCHEMAS.items():
        assert pq.read_schema(smoke / name).remove_metadata().equals(schema), name
    assert (smoke / "truth" / "scenario.yaml").read_text().startswith("name: smoke")


def test_smoke_has_the_declared_size(smoke: Path):
    ((exchanges, accounts, days),) = query(smoke, """
        SELECT count(*), (SELECT count(*) FROM accounts), count(DISTINCT ts::DATE)
        FROM exchanges""")
    assert 14_000 <= exchanges <= 28_000
    assert 450 <= accounts <= 550
    assert days == 2
    ((campaigns,),) = query(smoke, "SELECT count(*) FROM t_campaigns")
    assert campaigns == 2


def test_truth_covers_every_exchange_and_account_exactly_once(smoke: Path):
    ((n, distinct_ids, matched, same_fields),) = query(smoke, """
        SELECT (SELECT count(*) FROM t_exchanges), (SELECT count(DISTINCT request_id)
        FROM t_exchanges), count(t.request_id), count_if(t.account_id = e.account_id
        AND t.ts = e.ts)
        FROM exchanges e LEFT JOIN t_exchanges t USING (request_id)""")
    ((n_exchanges,),) = query(smoke, "SELECT count(*) FROM exchanges")
    assert n == distinct_ids == matched == same_fields == n_exchanges
    ((accounts, truth_accounts, joined, orphans),) = query(smoke, """
        SELECT (SELECT count(DISTINCT account_id) FROM accounts),
               (SELECT count(*) FROM t_accounts),
               (SELECT count(*) FROM accounts JOIN t_accounts USING (account_id)),
               (SELECT count(*) FROM exchanges e ANTI JOIN accounts a USING (account_id))""")
    assert accounts == truth_accounts == joined and orphans == 0
    # Campaign truth agrees with the exchange truth.
    rows = query(smoke, """
        SELECT c.n_exchanges, count(t.request_id), c.start = min(t.ts), c."end" = max(t.ts)
        FROM t_campaigns c JOIN t_exchanges t USING (campaign_id)
        GROUP BY c.campaign_id, c.n_exchanges, c.start, c."end" """)
    assert rows and all(r[0] == r[1] and r[2] and r[3] for r in rows)


def test_ingest_accepts_every_generated_row(smoke: Path, con):
    from distillguard.ingest import ingest_paths

    report = ingest_paths(con, smoke / "exchanges", kind="exchanges")
    accounts = ingest_paths(con, smoke / "accounts.parquet", kind="accounts")
    ((n,),) = query(smoke, "SELECT count(*) FROM exchanges")
    assert report.stored == n and not report.quarantined and not report.errors
    assert accounts.stored > 0 and not accounts.quarantined


def _same_data(a: Path, b: Path) -> None:
    """Every output file of run `a` holds the same rows, in the same order, as run `b`'s."""
    names = sorted(p.relative_to(a) for p in a.rglob("*.parquet"))
    assert names == sorted(p.relative_to(b) for p in b.rglob("*.parquet"))
    assert len([n for n in names if n.parts[0] == "exchanges"]) == 2  # one part per day
    for name in names:
        assert pq.read_table(a / name).equals(pq.read_table(b / name)), name
    assert (a / "truth" / "scenario.yaml").read_text() == \
        (b / "truth" / "scenario.yaml").read_text()


def test_same_seed_same_data_other_seed_differs(tiny_builtin, tmp_path: Path):
    scenario, first = tiny_builtin
    simulate(scenario, tmp_path / "again", seed=3, builtin_prompts=True)
    simulate(scenario, tmp_path / "other", seed=4, builtin_prompts=True)
    _same_data(first, tmp_path / "again")
    assert not pq.read_table(first / "accounts.parquet").equals(
        pq.read_table(tmp_path / "other" / "accounts.parquet"))


def test_same_seed_same_data_in_another_process(tiny_builtin, tmp_path: Path):
    # Another interpreter, another string-hash seed: nothing may depend on set or dict order.
    scenario, first = tiny_builtin
    code = ("import sys; from pathlib import Path; from distillguard.lab.simulate import "
            "simulate; simulate(Path(sys.argv[1]), Path(sys.argv[2]), seed=3, "
            "builtin_prompts=True)")
    subprocess.run([sys.executable, "-c", code, str(scenario), str(tmp_path / "again")],
                   check=True, env={**os.environ, "PYTHONHASHSEED": "12345"})
    _same_data(first, tmp_path / "again")


def test_output_does_not_depend_on_the_number_of_workers(tiny_builtin, tmp_path: Path):
    scenario, _ = tiny_builtin
    one = simulate(scenario, tmp_path / "one", seed=3, builtin_prompts=True, workers=1)
    two = simulate(scenario, tmp_path / "two", seed=3, builtin_prompts=True, workers=2)
    assert (one.workers, two.workers) == (1, 2)
    assert one.as_dict() | {"out": "", "files": [], "seconds": 0, "workers": 0} == \
        two.as_dict() | {"out": "", "files": [], "seconds": 0, "workers": 0}
    _same_data(tmp_path / "one", tmp_path / "two")
    # Many blocks per day and group: the same volumes, request ids still unique.
    simulate(scenario, tmp_path / "blocks", seed=3, builtin_prompts=True, chunk_rows=500)
    ((n, distinct),) = query(tmp_path / "blocks",
                             "SELECT count(*), count(DISTINCT request_id) FROM exchanges")
    assert n == distinct == one.exchanges


def test_a_failing_worker_fails_the_run_and_leaves_no_partial_file(tiny_builtin, tmp_path: Path,
                                                                   monkeypatch):
    import distillguard.lab.simulate as module

    def day_table(blocks, bank, seed, day):
        if day == 1:
            raise RuntimeError("disk on fire")
        return real(blocks, bank, seed, day)

    real = module.day_table
    monkeypatch.setattr(module, "day_table", day_table)  # forked workers inherit it
    scenario, _ = tiny_builtin
    with pytest.raises(RuntimeError, match="disk on fire"):
        simulate(scenario, tmp_path / "o", seed=3, builtin_prompts=True, workers=2)
    assert not list((tmp_path / "o" / "exchanges").glob("*.partial"))


def test_builtin_prompts_need_no_corpus(tiny_builtin):
    _, out = tiny_builtin
    ((n, with_text),) = query(out, """
        SELECT count(*), count_if(len(messages) > 0 AND length(messages[1].content) > 10)
        FROM exchanges""")
    assert n > 1000 and with_text == n


def test_corpus_prompts_are_used(shared_data: Path, smoke: Path):
    # gsm8k's first training question appears verbatim in the math pools.
    import json

    questions = {json.loads(line)["question"] for line in
                 (shared_data / "tasks" / "gsm8k_train.jsonl").read_text().splitlines()}
    rows = query(smoke, """
        SELECT m.content FROM exchanges, unnest(messages) AS u(m)
        WHERE m.role = 'user' AND m.content LIKE 'Question: %' LIMIT 50""")
    assert rows
    assert any(r[0].removeprefix("Question: ").split("\nAnswer:")[0] in questions for r in rows)


def test_cli_simulate_and_errors(tmp_path: Path, tiny_builtin):
    scenario, _ = tiny_builtin
    stale = tmp_path / "o" / "exchanges" / "part-00099.parquet"
    stale.parent.mkdir(parents=True)
    stale.write_text("left over from an earlier run")
    runner = CliRunner()
    result = runner.invoke(app, ["simulate", "--scenario", str(scenario), "--scale", "0.3",
                                 "--builtin-prompts", "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert "exchanges" in result.output and (tmp_path / "o" / "truth" / "scenario.yaml").exists()
    assert not stale.exists()
    bad = runner.invoke(app, ["simulate", "--scenario", "no-such-scenario", "--out",
                              str(tmp_path / "x")])
    assert bad.exit_code == 1 and "no-such-scenario" in bad.output
    listed = runner.invoke(app, ["simulate", "--list"])
    assert "standard" in listed.output


def test_malformed_corpus_records_are_skipped_and_counted(tmp_path: Path, tiny_builtin):
    scenario, _ = tiny_builtin
    corpus = tmp_path / "corpus"
    (corpus / "tasks").mkdir(parents=True)
    (corpus / "organic").mkdir()
    (corpus / "tasks" / "gsm8k_train.jsonl").write_text("\n".join([
        '{"question": "Ada has 3 pens and buys 4 more. How many pens?", "answer": "3+4=7\\n#### 7"}',
        "{not json",
        '{"question": "No final answer here", "answer": "just prose"}',
        '{"answer": "#### 1"}',
    ]) + "\n")
    (corpus / "organic" / "arena_hard_v0.1.jsonl").write_text(
        '{"prompt": "Explain monads to a Python programmer."}\n[1, 2]\n')
    summary = simulate(scenario, tmp_path / "out", scale=0.3, corpus=corpus)
    assert summary.corpus == str(corpus)
    assert summary.corpus_skipped == {"gsm8k_train.jsonl": 3, "arena_hard_v0.1.jsonl": 1}
    ((hits,),) = query(tmp_path / "out", """
        SELECT count(*) FROM exchanges WHERE messages[1].content LIKE '%Ada has 3 pens%'""")
    assert hits > 0
