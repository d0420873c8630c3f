"""The two baselines: exact answers on hand-built logs, then the real simulator's `smoke` run."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distillguard import contract
from distillguard.lab.baselines import (
    isolation_forest_baseline,
    volume_threshold_baseline,
)
from distillguard.lab.evaluate import (
    EvalInputError,
    evaluate,
    load_findings,
    load_truth,
    write_findings,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def write_logs(root: Path, exchanges: list[dict]) -> Path:
    rows = [
        {
            "request_id": f"{e['account_id']}-{i}",
            "model": "m1",
            "messages": [{"role": "user", "content": "hello"}],
            "input_tokens": 40,
            "output_tokens": 200,
            **e,
        }
        for i, e in enumerate(exchanges)
    ]
    (root / "exchanges").mkdir(parents=True)
    pq.write_table(
        contract.conform(pa.Table.from_pylist(rows), contract.EXCHANGE_SCHEMA),
        root / "exchanges" / "part-0.parquet",
    )
    return root


def at(hours: float) -> datetime:
    return T0 + timedelta(hours=hours)


HONEST = [f"h{i}" for i in range(10)]


@pytest.fixture
def volume_logs(tmp_path: Path) -> Path:
    """10 honest accounts with 2 exchanges on each of 2 days (h0: 4 on day 2); a1 sends 5 on
    day 1 (hours 1-5), a2 sends 3 on day 2 (hours 25-27)."""
    exchanges = [
        {"account_id": a, "ts": at(24 * day + 10 + k)}
        for a in HONEST
        for day in (0, 1)
        for k in range(4 if (a == "h0" and day == 1) else 2)
    ]
    exchanges += [{"account_id": "a1", "ts": at(h)} for h in range(1, 6)]
    exchanges += [{"account_id": "a2", "ts": at(h)} for h in range(25, 28)]
    return write_logs(tmp_path / "lab", exchanges)


def test_volume_threshold_exact(volume_logs: Path) -> None:
    result = volume_threshold_baseline(volume_logs, pa.array(HONEST))
    # honest account-days: 19 of 2 and 1 of 4 -> interpolated 99.9th pct = 2 + 0.981 * 2
    assert "3.962" in result.description
    assert result.threshold == 4.0
    scores = dict(zip(*result.account_scores().to_pydict().values(), strict=True))
    assert scores["a1"] == 5.0 and scores["a2"] == 3.0 and scores["h0"] == 4.0 and scores["h1"] == 2
    flagged = {
        row["account_id"]: row["first_flagged_at"]
        for row in result.findings_at().accounts.to_pylist()
        if row["flagged"]
    }
    # flagged at the exchange that took the day over the limit: a1's 4th, h0's 4th on day 2
    assert flagged == {"a1": at(4), "h0": at(24 + 13)}
    at_three = {r["account_id"] for r in result.findings_at(3.0).accounts.to_pylist() if r["flagged"]}
    assert at_three == {"a1", "a2", "h0"}


@pytest.mark.parametrize(
    ("target", "flagged"),
    [
        (0.1, {"h0", "a1", "a2"}),  # FPR 0.1, and the lowest threshold with it: a2 (3) too
        (1.0, {*HONEST, "a1", "a2"}),
        (0.0, {"a1"}),  # FPR 0: above h0's 4, only a1 (5) remains
        (0.04, {"a1"}),  # nearest achievable: 0.0
        (0.05, {"a1"}),  # 0.0 and 0.1 tie: the lower rate
        (0.06, {"h0", "a1", "a2"}),
    ],
)
def test_threshold_for_fpr_nearest_then_lowest(volume_logs: Path, target: float, flagged) -> None:
    result = volume_threshold_baseline(volume_logs, pa.array(HONEST))
    threshold = result.threshold_for_fpr(pa.array(HONEST), target)
    found = {r["account_id"] for r in result.findings_at(threshold).accounts.to_pylist() if r["flagged"]}
    assert found == flagged


def test_volume_threshold_without_labels_uses_all_accounts(volume_logs: Path) -> None:
    result = volume_threshold_baseline(volume_logs)
    assert "of all account-days" in result.description
    # 22 account-days: 19 x 2, then 3, 4, 5: position 0.999 * 21 = 20.979 -> 4.979
    assert result.threshold == 5.0


def test_isolation_forest_finds_the_outlier(tmp_path: Path) -> None:
    honest = [
        {"account_id": f"h{i}", "ts": at(24 * day + 9 + (i % 8)), "ip": f"10.0.{i}.1"}
        for i in range(60)
        for day in range(3)
    ]
    attacker = [
        {"account_id": "x", "ts": at(24 + k * 0.05), "ip": f"203.0.113.{k % 40}",
         "reasoning_tokens": 500}
        for k in range(300)
    ]
    logs = write_logs(tmp_path / "lab", honest + attacker)
    result = isolation_forest_baseline(logs, seed=7, n_estimators=50)
    scores = dict(zip(*result.account_scores().to_pydict().values(), strict=True))
    assert max(scores, key=scores.get) == "x"
    findings = {r["account_id"]: r for r in result.findings_at().accounts.to_pylist()}
    assert findings["x"]["flagged"]
    # nightly job: flagged at the end of its first active day
    assert findings["x"]["first_flagged_at"] == at(48)
    again = isolation_forest_baseline(logs, seed=7, n_estimators=50)
    assert again.trajectory.equals(result.trajectory)


def test_no_logs_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(EvalInputError, match="no exchanges"):
        volume_threshold_baseline(tmp_path)


def test_baselines_on_the_smoke_scenario(tmp_path: Path) -> None:
    """The real simulator's smoke run: baselines scored by the evaluator's own code path, and
    a baseline's findings directory scored as if it were a detector."""
    simulate = pytest.importorskip("distillguard.lab.simulate").simulate
    out = tmp_path / "smoke"
    simulate("smoke", out=out, seed=11)
    truth = load_truth(out / "truth")
    volume = volume_threshold_baseline(out, truth.honest_account_ids)
    truth.con.close()
    as_detector = write_findings(volume.findings_at(), tmp_path / "volume")
    report = evaluate(out / "truth", as_detector, baseline_findings_dir=tmp_path / "baselines")
    points = [(s.name, s.operating_point) for s in report.baselines]
    assert points == [
        ("volume_threshold", "natural"), ("volume_threshold", "matched FPR"),
        ("isolation_forest", "natural"), ("isolation_forest", "matched FPR"),
    ]
    true_campaigns = {
        c["campaign_id"] for c in pq.read_table(out / "truth" / "campaigns.parquet").to_pylist()
    }
    for score in report.scores:
        a = score.account
        assert a.n_attack > 0 and a.n_honest > a.n_attack
        assert a.tp + a.fn == a.n_attack and a.fp + a.tn == a.n_honest
        assert 0.0 <= a.fpr <= 1.0
        assert score.exchange.attack_attributed_share == 0.0  # baselines attribute no campaign
        assert {c.campaign_id for c in score.campaigns} == true_campaigns
    # the same findings, read back from disk, score exactly as computed in memory
    assert report.detector.account == report.baselines[0].account
    # matched to its own FPR, the volume baseline keeps that FPR at a threshold no higher
    natural, matched = report.baselines[0], report.baselines[1]
    assert matched.account.fpr == natural.account.fpr and matched.threshold <= natural.threshold
    assert matched.account.recall >= natural.account.recall
    iforest = report.baselines[3]
    assert iforest.account.fpr == pytest.approx(report.detector.account.fpr, abs=0.01)
    assert load_findings(tmp_path / "baselines" / "isolation_forest").accounts.num_rows > 0
