"""The evaluator on hand-built truth/findings pairs whose every metric is worked out by hand.

The lab (times in hours after 2026-01-01 00:00 UTC):
- honest: h1..h4 (casual), h5, h6 (batch), r2 (reseller_customer): 2 exchanges each;
- campaign A (start 0 h): a1..a4 (attacker), 3 exchanges each: 12 attack exchanges;
- campaign B (start 0 h, pivots to model m2 at 24 h): b1, b2 (attacker), 3 exchanges each, and
  the reseller account r1 (reseller_customer) carrying 2 B exchanges and 2 honest ones.
So: 7 honest and 7 attacking accounts; 20 attack exchanges (A 12, B 8), 16 honest exchanges.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distillguard import contract
from distillguard.lab.evaluate import (
    EvalInputError,
    Findings,
    evaluate,
    load_findings,
    load_findings_from_store,
    write_findings,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def hours(h: float) -> datetime:
    return T0 + timedelta(hours=h)


ACCOUNTS = [  # account_id, population, is_attack, campaign, [(campaign of each exchange)]
    *[(f"h{i}", "casual", False, None, [None, None]) for i in range(1, 5)],
    *[(f"h{i}", "batch", False, None, [None, None]) for i in (5, 6)],
    ("r2", "reseller_customer", False, None, [None, None]),
    *[(f"a{i}", "attacker", True, "A", ["A"] * 3) for i in range(1, 5)],
    *[(f"b{i}", "attacker", True, "B", ["B"] * 3) for i in (1, 2)],
    ("r1", "reseller_customer", True, "B", ["B", None, "B", None]),
]
ATTACKERS = [a for a in ACCOUNTS if a[2]]


def request_ids(account: str) -> list[str]:
    n = next(len(a[4]) for a in ACCOUNTS if a[0] == account)
    return [f"{account}-{i}" for i in range(n)]


def write_lab(root: Path) -> Path:
    """truth/ and the logs beside it; returns the truth dir."""
    truth = root / "truth"
    truth.mkdir(parents=True)
    (root / "exchanges").mkdir()
    pq.write_table(
        pa.Table.from_pylist(
            [
                {"account_id": a, "population": p, "is_attack": x, "campaign_id": c}
                for a, p, x, c, _ in ACCOUNTS
            ],
            schema=contract.TRUTH_ACCOUNT_SCHEMA,
        ),
        truth / "accounts.parquet",
    )
    exchanges = [
        {"request_id": f"{a}-{i}", "account_id": a, "campaign_id": c, "ts": hours(1 + i)}
        for a, _, _, _, camps in ACCOUNTS
        for i, c in enumerate(camps)
    ]
    pq.write_table(
        pa.Table.from_pylist(exchanges, schema=contract.TRUTH_EXCHANGE_SCHEMA),
        truth / "exchanges.parquet",
    )
    campaigns = [
        {"campaign_id": "A", "kind": "reasoning_extraction", "start": T0, "end": hours(48),
         "n_accounts": 4, "n_exchanges": 12},
        {"campaign_id": "B", "kind": "agentic_coding_at_scale", "start": T0, "end": hours(48),
         "n_accounts": 3, "n_exchanges": 8, "pivot_model": "m2", "pivot_start": hours(24)},
    ]
    pq.write_table(
        pa.Table.from_pylist(campaigns, schema=contract.TRUTH_CAMPAIGN_SCHEMA),
        truth / "campaigns.parquet",
    )
    pq.write_table(
        pa.Table.from_pylist(
            [{"model": "m2", "released_at": hours(23)}], schema=contract.TRUTH_RELEASE_SCHEMA
        ),
        truth / "releases.parquet",
    )
    logs = pa.Table.from_pylist(
        [
            {**e, "model": "m1", "messages": [{"role": "user", "content": "hi"}], "ip": "10.0.0.1",
             "input_tokens": 10, "output_tokens": 20}
            for e in exchanges
        ]
    )
    pq.write_table(contract.conform(logs, contract.EXCHANGE_SCHEMA), root / "exchanges" / "0.parquet")
    return truth


@pytest.fixture
def lab(tmp_path: Path) -> Path:
    return write_lab(tmp_path / "lab")


def findings_dir(
    tmp_path: Path,
    flagged: dict[str, tuple[str | None, float | None]],
    campaigns: list[dict] | None = None,
    exchanges: list[dict] | None = None,
    name: str = "findings",
) -> Path:
    """Findings where `flagged` maps account -> (campaign id, hours it was flagged at)."""
    rows = [
        {
            "account_id": a,
            "score": 1.0 if a in flagged else 0.0,
            "flagged": a in flagged,
            "first_flagged_at": hours(flagged[a][1])
            if a in flagged and flagged[a][1] is not None
            else None,
            "campaign_id": flagged[a][0] if a in flagged else None,
        }
        for a, *_ in ACCOUNTS
    ]
    if campaigns is None:
        campaigns = [{"campaign_id": c} for c in sorted({v[0] for v in flagged.values() if v[0]})]
    findings = Findings(
        accounts=contract.conform(pa.Table.from_pylist(rows), contract.FINDING_ACCOUNT_SCHEMA),
        campaigns=pa.Table.from_pylist(campaigns, schema=contract.FINDING_CAMPAIGN_SCHEMA),
        exchanges=None
        if exchanges is None
        else pa.Table.from_pylist(exchanges, schema=contract.FINDING_EXCHANGE_SCHEMA),
    )
    return write_findings(findings, tmp_path / name)


PERFECT = {
    "a1": ("X", 1), "a2": ("X", 2), "a3": ("X", 3), "a4": ("X", 4),
    "b1": ("Y", 1), "b2": ("Y", 5), "r1": ("Y", 10),
}
PIVOT_Y = [{"campaign_id": "X"}, {"campaign_id": "Y", "pivots": [{"model": "m2", "flagged_at": hours(27)}]}]


def run(lab: Path, findings: Path):
    return evaluate(lab, findings, baselines=False).detector


def by_id(items, key: str):
    return {getattr(item, key): item for item in items}


def test_perfect_findings(lab: Path, tmp_path: Path) -> None:
    score = run(lab, findings_dir(tmp_path, PERFECT, PIVOT_Y))
    a = score.account
    assert (a.tp, a.fp, a.fn, a.tn) == (7, 0, 0, 7)
    assert (a.precision, a.recall, a.f1, a.fpr) == (1.0, 1.0, 1.0, 0.0)
    assert a.roc_auc == 1.0
    assert score.cluster.ari == 1.0 and score.cluster.ari_flagged == 1.0
    assert score.cluster.mapping == {"X": "A", "Y": "B"}
    assert score.cluster.true_campaigns_found == 2
    campaigns = by_id(score.campaigns, "campaign_id")
    assert campaigns["A"].recall == 1.0
    assert (campaigns["A"].hours_to_50pct, campaigns["A"].hours_to_90pct) == (2.0, 4.0)
    assert campaigns["A"].hours_to_first == 1.0 and campaigns["B"].hours_to_first == 1.0
    assert (campaigns["B"].hours_to_50pct, campaigns["B"].hours_to_90pct) == (5.0, 10.0)
    assert campaigns["A"].pivot_model is None and campaigns["A"].hours_to_pivot is None
    assert campaigns["B"].hours_to_pivot == 3.0
    # No per-exchange attribution: the reseller's 2 honest exchanges count against it.
    ex = score.exchange
    assert ex.mode == "per-account"
    assert (ex.n_attack, ex.n_honest) == (20, 16)
    assert ex.attack_attributed_share == 1.0 and ex.attack_flagged_share == 1.0
    assert ex.honest_flagged == 2 and ex.honest_wrong_share == 2 / 16


def test_empty_findings(lab: Path, tmp_path: Path) -> None:
    score = run(lab, findings_dir(tmp_path, {}))
    a = score.account
    assert (a.tp, a.fp, a.fn, a.tn) == (0, 0, 7, 7)
    assert a.precision is None and a.recall == 0.0 and a.f1 == 0.0 and a.fpr == 0.0
    assert score.cluster.ari == 0.0 and score.cluster.ari_flagged is None
    assert score.cluster.n_found_campaigns == 0
    assert score.exchange.attack_attributed_share == 0.0 and score.exchange.honest_wrong_share == 0
    for c in score.campaigns:
        assert c.recall == 0.0 and c.hours_to_50pct is None and c.hours_to_90pct is None
        assert c.hours_to_first is None
    assert by_id(score.campaigns, "campaign_id")["B"].hours_to_pivot is None


def test_all_flagged_one_campaign(lab: Path, tmp_path: Path) -> None:
    score = run(lab, findings_dir(tmp_path, {a[0]: ("all", 0) for a in ACCOUNTS}))
    a = score.account
    assert (a.precision, a.recall, a.fpr) == (0.5, 1.0, 1.0)
    assert a.f1 == pytest.approx(2 / 3)
    assert score.cluster.ari == 0.0
    # "all" holds 12 A and 8 B attack exchanges: it maps to A, so only A's count as right.
    assert score.cluster.mapping == {"all": "A"}
    assert score.exchange.attack_attributed_share == 12 / 20
    assert score.exchange.attack_flagged_share == 1.0
    assert score.exchange.honest_wrong_share == 1.0
    assert all(p.fpr == 1.0 for p in score.populations if p.n_honest)
    campaigns = by_id(score.campaigns, "campaign_id")
    assert campaigns["A"].hours_to_50pct == 0.0 and campaigns["B"].hours_to_90pct == 0.0


HALF = {"a1": ("X", 1), "a2": ("X", 2), "h1": ("X", 1), "b1": ("Z", 3)}


def test_half_right(lab: Path, tmp_path: Path) -> None:
    score = run(lab, findings_dir(tmp_path, HALF))
    a = score.account
    assert (a.tp, a.fp, a.fn, a.tn) == (3, 1, 4, 6)
    assert a.precision == 0.75 and a.recall == 3 / 7 and a.fpr == 1 / 7
    assert a.f1 == pytest.approx(6 / 11)
    # ARI by hand: n=7, sum C(n_ij,2)=1, true pairs 6+3=9, found pairs 1, C(7,2)=21:
    # (1 - 9/21) / ((9+1)/2 - 9/21) = 1/8
    assert score.cluster.ari == pytest.approx(0.125)
    assert score.cluster.ari_flagged == 1.0
    assert score.cluster.mapping == {"X": "A", "Z": "B"}
    assert score.exchange.attack_attributed == 9 and score.exchange.attack_attributed_share == 0.45
    assert score.exchange.honest_wrong_share == 2 / 16
    campaigns = by_id(score.campaigns, "campaign_id")
    assert campaigns["A"].recall == 0.5 and campaigns["B"].recall == pytest.approx(1 / 3)
    assert campaigns["A"].hours_to_50pct == 2.0 and campaigns["A"].hours_to_90pct is None
    assert campaigns["B"].hours_to_50pct is None
    assert campaigns["A"].found_campaigns == ["X"] and campaigns["B"].found_campaigns == ["Z"]


def test_false_positive_rate_per_population(lab: Path, tmp_path: Path) -> None:
    flagged = {"h1": ("Q", 1), "h2": ("Q", 1), "h5": (None, 1), "r2": ("Q", 2), "r1": (None, 2)}
    score = run(lab, findings_dir(tmp_path, flagged))
    pops = by_id(score.populations, "population")
    assert set(pops) == {"casual", "batch", "reseller_customer", "attacker"}
    assert (pops["casual"].n_honest, pops["casual"].flagged_honest, pops["casual"].fpr) == (4, 2, 0.5)
    assert pops["batch"].fpr == 0.5
    # The mixed reseller population: its honest account and its attacking one kept apart.
    r = pops["reseller_customer"]
    assert (r.n_honest, r.flagged_honest, r.fpr, r.n_attack, r.flagged_attack) == (1, 1, 1.0, 1, 1)
    assert pops["attacker"].n_honest == 0 and pops["attacker"].fpr is None
    assert score.account.fpr == 4 / 7
    # Q holds only honest exchanges: it maps to no campaign.
    assert score.cluster.mapping == {"Q": None} and score.cluster.n_unmapped == 1
    # r1 flagged without a campaign: its exchanges are flagged but attributed to no campaign.
    assert score.exchange.attack_flagged == 2 and score.exchange.attack_attributed == 0


def test_reseller_per_exchange_attribution(lab: Path, tmp_path: Path) -> None:
    attack_ids = [
        {"request_id": rid, "campaign_id": "X" if a[3] == "A" else "Y"}
        for a in ATTACKERS
        for rid, c in zip(request_ids(a[0]), a[4], strict=True)
        if c is not None
    ]
    score = run(lab, findings_dir(tmp_path, PERFECT, PIVOT_Y, exchanges=attack_ids))
    ex = score.exchange
    assert ex.mode == "per-exchange"
    assert ex.attack_attributed_share == 1.0 and ex.honest_wrong_share == 0.0
    # Attributing one of the reseller's honest exchanges costs exactly one.
    wrong = [*attack_ids, {"request_id": "r1-1", "campaign_id": "Y"}]
    score = run(lab, findings_dir(tmp_path, PERFECT, PIVOT_Y, exchanges=wrong, name="wrong"))
    assert score.exchange.honest_flagged == 1 and score.exchange.honest_wrong_share == 1 / 16
    # Attributing request ids the truth never saw changes nothing but is reported.
    ghost = [*attack_ids, {"request_id": "ghost-1", "campaign_id": "Y"}]
    report = evaluate(
        lab, findings_dir(tmp_path, PERFECT, PIVOT_Y, exchanges=ghost, name="ghost"),
        baselines=False,
    )
    assert report.detector.exchange.attack_attributed_share == 1.0
    assert report.detector.exchange.honest_flagged == 0
    assert any("1 attributed request ids are not in the truth" in w for w in report.warnings)
    # With per-exchange attribution, unlisted exchanges of flagged accounts are not attributed.
    partial = [e for e in attack_ids if not e["request_id"].startswith("a1-")]
    score = run(lab, findings_dir(tmp_path, PERFECT, PIVOT_Y, exchanges=partial, name="partial"))
    assert score.exchange.attack_attributed == 17
    assert by_id(score.campaigns, "campaign_id")["A"].attributed_share == 9 / 12


@pytest.mark.parametrize(
    ("pivots", "expected"),
    [
        ([{"model": "m2", "flagged_at": hours(30.5)}, {"model": "m2", "flagged_at": hours(40)}], 6.5),
        ([{"model": "m2", "flagged_at": hours(20)}], 0.0),  # flagged before the pivot: 0
        ([{"model": "m1", "flagged_at": hours(25)}], None),  # another model: not the pivot
        ([{"model": "m2", "flagged_at": None}], None),
        ([], None),
    ],
)
def test_pivot_timing(lab: Path, tmp_path: Path, pivots, expected) -> None:
    campaigns = [{"campaign_id": "X"}, {"campaign_id": "Y", "pivots": pivots}]
    score = run(lab, findings_dir(tmp_path, PERFECT, campaigns))
    assert by_id(score.campaigns, "campaign_id")["B"].hours_to_pivot == expected


def test_pivot_on_a_campaign_mapped_elsewhere_does_not_count(lab: Path, tmp_path: Path) -> None:
    campaigns = [{"campaign_id": "X", "pivots": [{"model": "m2", "flagged_at": hours(25)}]},
                 {"campaign_id": "Y"}]
    score = run(lab, findings_dir(tmp_path, PERFECT, campaigns))
    assert by_id(score.campaigns, "campaign_id")["B"].hours_to_pivot is None


def test_undated_flags_count_but_not_for_timing(lab: Path, tmp_path: Path) -> None:
    flagged = {**PERFECT, "a1": ("X", None), "a2": ("X", None)}
    report = evaluate(lab, findings_dir(tmp_path, flagged, PIVOT_Y), baselines=False)
    a_metrics = by_id(report.detector.campaigns, "campaign_id")["A"]
    assert a_metrics.recall == 1.0
    assert a_metrics.hours_to_50pct == 4.0 and a_metrics.hours_to_90pct is None
    assert any("no first_flagged_at" in w for w in report.warnings)


def test_json_findings_match_parquet(lab: Path, tmp_path: Path) -> None:
    document = {
        "accounts": [
            {"account_id": a, "score": 1.0, "flagged": True,
             "first_flagged_at": hours(h).isoformat().replace("+00:00", "Z"), "campaign_id": c}
            for a, (c, h) in HALF.items()
        ],
        "campaigns": [{"campaign_id": "X", "capabilities": {"coding": 1.0}}, {"campaign_id": "Z"}],
    }
    path = tmp_path / "findings.json"
    path.write_text(json.dumps(document))
    from_json = run(lab, path)
    from_parquet = run(lab, findings_dir(tmp_path, HALF))
    assert from_json.account == from_parquet.account
    assert from_json.cluster == from_parquet.cluster
    assert from_json.campaigns == from_parquet.campaigns


def test_report_json_and_rendering(lab: Path, tmp_path: Path) -> None:
    from rich.console import Console

    from distillguard.lab.evaluate import render_report

    report = evaluate(lab, findings_dir(tmp_path, HALF), baselines=False)
    data = json.loads(report.to_json())
    assert data["detector"]["account"]["precision"] == 0.75
    assert data["detector"]["campaigns"][0]["campaign_id"] == "A"
    console = Console(record=True, width=200)
    render_report(report, console)
    text = console.export_text()
    assert "75.00%" in text and "casual" in text and "never" in text


# ---- malformed inputs -----------------------------------------------------------------------
def test_missing_findings_path(lab: Path, tmp_path: Path) -> None:
    with pytest.raises(EvalInputError, match="findings not found"):
        evaluate(lab, tmp_path / "nope", baselines=False)


def test_missing_accounts_file(lab: Path, tmp_path: Path) -> None:
    path = findings_dir(tmp_path, HALF)
    (path / "accounts.parquet").unlink()
    with pytest.raises(EvalInputError, match="no accounts"):
        load_findings(path)


def test_missing_required_column(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.mkdir()
    pq.write_table(pa.table({"account_id": ["a1"], "score": [1.0]}), path / "accounts.parquet")
    pq.write_table(contract.empty_table(contract.FINDING_CAMPAIGN_SCHEMA), path / "campaigns.parquet")
    with pytest.raises(EvalInputError, match="'flagged' is missing"):
        load_findings(path)


def test_wrong_column_type(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.mkdir()
    pq.write_table(
        pa.table({"account_id": ["a1"], "score": ["very high"], "flagged": [True]}),
        path / "accounts.parquet",
    )
    pq.write_table(contract.empty_table(contract.FINDING_CAMPAIGN_SCHEMA), path / "campaigns.parquet")
    with pytest.raises(EvalInputError, match="'score' has type string"):
        load_findings(path)


def test_duplicate_accounts_and_null_required(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.mkdir()
    pq.write_table(contract.empty_table(contract.FINDING_CAMPAIGN_SCHEMA), path / "campaigns.parquet")
    pq.write_table(
        pa.table({"account_id": ["a1", "a1"], "score": [1.0, 2.0], "flagged": [True, True]}),
        path / "accounts.parquet",
    )
    with pytest.raises(EvalInputError, match="1 duplicate account_id"):
        load_findings(path)
    pq.write_table(
        pa.table({"account_id": ["a1"], "score": [None], "flagged": [True]},
                 schema=pa.schema([("account_id", pa.string()), ("score", pa.float64()),
                                   ("flagged", pa.bool_())])),
        path / "accounts.parquet",
    )
    with pytest.raises(EvalInputError, match="'score' has 1 nulls"):
        load_findings(path)


def test_not_parquet_and_bad_json(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.mkdir()
    (path / "accounts.parquet").write_text("not parquet")
    with pytest.raises(EvalInputError, match="not a readable Parquet"):
        load_findings(path)
    bad = tmp_path / "f.json"
    bad.write_text("{oops")
    with pytest.raises(EvalInputError, match="not valid JSON"):
        load_findings(bad)
    bad.write_text(json.dumps({"accounts": [{"account_id": "a1", "score": 1, "flagged": True,
                                             "first_flagged_at": "yesterday"}], "campaigns": []}))
    with pytest.raises(EvalInputError, match="bad timestamp"):
        load_findings(bad)


def test_missing_truth(tmp_path: Path, lab: Path) -> None:
    with pytest.raises(EvalInputError, match="truth directory not found"):
        evaluate(tmp_path / "none", None, baselines=False)
    (lab / "campaigns.parquet").unlink()
    with pytest.raises(EvalInputError, match=r"campaigns\.parquet: missing"):
        evaluate(lab, None, baselines=False)


def test_campaign_without_a_row_is_reported(lab: Path, tmp_path: Path) -> None:
    report = evaluate(lab, findings_dir(tmp_path, HALF, campaigns=[{"campaign_id": "X"}]),
                      baselines=False)
    assert report.detector.cluster.mapping == {"X": "A", "Z": "B"}
    assert any("1 campaign ids of flagged accounts have no row" in w for w in report.warnings)


def test_unknown_accounts_are_reported(lab: Path, tmp_path: Path) -> None:
    path = findings_dir(tmp_path, HALF)
    accounts = pq.read_table(path / "accounts.parquet")
    extra = contract.conform(
        pa.Table.from_pylist([{"account_id": "ghost", "score": 9.0, "flagged": True}]),
        contract.FINDING_ACCOUNT_SCHEMA,
    )
    pq.write_table(pa.concat_tables([accounts, extra]), path / "accounts.parquet")
    report = evaluate(lab, path, baselines=False)
    assert report.detector.account.n_flagged == 4
    assert any("1 finding accounts are not in the truth" in w for w in report.warnings)


# ---- the command ----------------------------------------------------------------------------
def test_eval_command_writes_json_beside_findings(lab: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from distillguard.cli import app

    findings = findings_dir(tmp_path, HALF)
    result = CliRunner().invoke(
        app,
        ["eval", "--truth", str(lab), "--findings", str(findings), "--fpr", "1"],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    assert "Detector vs baselines" in result.output and "volume_threshold" in result.output
    data = json.loads((tmp_path / "findings.eval.json").read_text())
    assert data["detector"]["account"]["recall"] == 3 / 7
    points = [(b["name"], b["operating_point"]) for b in data["baselines"]]
    assert points == [
        ("volume_threshold", "natural"), ("volume_threshold", "matched FPR"),
        ("volume_threshold", "FPR 100.00%"),
        ("isolation_forest", "natural"), ("isolation_forest", "matched FPR"),
        ("isolation_forest", "FPR 100.00%"),
    ]
    assert all(b["account"]["fpr"] == 1.0 for b in data["baselines"][2::3])
    bad = CliRunner().invoke(app, ["eval", "--truth", str(lab), "--fpr", "5"])
    assert bad.exit_code == 1 and "between 0 and 1" in bad.output


def test_eval_command_bad_findings_is_one_clear_line(lab: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from distillguard.cli import app

    result = CliRunner().invoke(
        app, ["eval", "--truth", str(lab), "--findings", str(tmp_path / "missing"), "--no-baselines"]
    )
    assert result.exit_code == 1
    assert "findings not found" in result.output and "Traceback" not in result.output


def test_empty_exchange_attribution_falls_back_to_accounts(lab: Path, tmp_path: Path) -> None:
    score = run(lab, findings_dir(tmp_path, PERFECT, PIVOT_Y, exchanges=[]))
    assert score.exchange.mode == "per-account" and score.exchange.honest_flagged == 2


def test_findings_from_the_store(lab: Path, tmp_path: Path, con, db_path: Path) -> None:
    from typer.testing import CliRunner

    from distillguard.cli import app

    findings = load_findings(findings_dir(tmp_path, HALF))
    for name, table in (("accounts", findings.accounts), ("campaigns", findings.campaigns)):
        con.register("rows", table)
        con.execute(f"INSERT INTO finding_{name} SELECT * FROM rows")
    con.close()
    from_store = run(lab, load_findings_from_store(db_path))
    assert from_store.account == run(lab, findings_dir(tmp_path, HALF, name="again")).account
    out = tmp_path / "report.json"
    result = CliRunner().invoke(
        app, ["eval", "--truth", str(lab), "--db", str(db_path), "--no-baselines", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["detector"]["account"]["tp"] == 3
    with pytest.raises(EvalInputError, match="cannot open the store"):
        load_findings_from_store(tmp_path / "missing.duckdb")


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    choice=st.lists(st.sampled_from([None, "P", "Q", "R"]), min_size=len(ACCOUNTS),
                    max_size=len(ACCOUNTS))
)
def test_metrics_agree_with_sklearn_on_random_findings(lab: Path, choice) -> None:
    """Any findings: the counts are consistent and the rates are sklearn's."""
    from sklearn.metrics import adjusted_rand_score, precision_score, recall_score

    flagged = {a[0]: c for a, c in zip(ACCOUNTS, choice, strict=True) if c is not None}
    rows = [
        {"account_id": a[0], "score": float(a[0] in flagged), "flagged": a[0] in flagged,
         "first_flagged_at": hours(1), "campaign_id": flagged.get(a[0])}
        for a in ACCOUNTS
    ]
    findings = Findings.from_accounts(pa.Table.from_pylist(rows))
    score = evaluate(lab, findings, baselines=False).detector
    truth = [a[2] for a in ACCOUNTS]
    predicted = [a[0] in flagged for a in ACCOUNTS]
    a = score.account
    assert a.tp + a.fp == len(flagged) and a.tp + a.fn == 7
    assert a.recall == recall_score(truth, predicted)
    if flagged:
        assert a.precision == precision_score(truth, predicted)
    true_labels = [a[3] for a in ATTACKERS]
    found_labels = [flagged.get(a[0], f"single-{a[0]}") for a in ATTACKERS]
    assert score.cluster.ari == pytest.approx(adjusted_rand_score(true_labels, found_labels))
    ex = score.exchange
    assert ex.n_attack == 20 and ex.n_honest == 16
    assert 0 <= ex.attack_attributed <= ex.attack_flagged <= ex.n_attack
    assert sum(c.exchanges_attributed for c in score.campaigns) == ex.attack_attributed
