"""The two baselines every detector is compared with on the same lab run.

1. `volume_threshold_baseline`: the usual per-account rate limit, set at the honest 99.9th
   percentile of daily volume (per account-day). It flags an account at the exchange that
   pushes one of its days over the limit.
2. `isolation_forest_baseline`: scikit-learn's IsolationForest on simple per-account features
   (volume, active days, daily peak, distinct IPs, mean prompt and answer length, night and
   reasoning shares), run as a nightly job on each account's cumulative features, so it has a
   time of detection too.

Both return a `BaselineResult`: a score trajectory per account (the moments its running
maximum score rose) from which findings at any threshold are derived, so the evaluator scores
a baseline with exactly the code path it uses for a detector, at the natural threshold and at
the detector's false-positive rate. Everything over the exchanges runs in DuckDB.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from sklearn.ensemble import IsolationForest

from distillguard import contract
from distillguard.lab.evaluate import EvalInputError, Findings, duckdb_connection

#: (name, SQL expression over cumulative columns) of the IsolationForest features, in order.
IFOREST_FEATURES: tuple[tuple[str, str], ...] = (
    ("log_exchanges", "ln(1 + cum_n)"),
    ("active_days", "active_days"),
    ("log_per_active_day", "ln(1 + cum_n / active_days)"),
    ("log_max_daily", "ln(1 + max_daily)"),
    ("log_distinct_ips", "ln(1 + cum_ips)"),
    ("log_mean_input_tokens", "ln(1 + coalesce(cum_in / nullif(cum_in_n, 0), 0))"),
    ("log_mean_output_tokens", "ln(1 + coalesce(cum_out / nullif(cum_out_n, 0), 0))"),
    ("night_share", "cum_night / cum_n"),
    ("reasoning_share", "cum_reasoning / cum_n"),
)


def exchange_files(logs_dir: str | Path) -> str:
    """The Parquet glob of the logs' exchanges (`DIR/exchanges/**/*.parquet`, or DIR itself)."""
    logs_dir = Path(logs_dir)
    for base in (logs_dir / "exchanges", logs_dir):
        if base.is_dir() and any(base.rglob("*.parquet")):
            return str(base / "**" / "*.parquet")
    raise EvalInputError(
        f"{logs_dir}: no exchanges/*.parquet logs here (pass --logs DIR, or --no-baselines)"
    )


@dataclass
class BaselineResult:
    """A baseline's scores over time; `threshold` is its natural operating point."""

    name: str
    description: str
    threshold: float  # flag an account once its score >= threshold
    #: account_id, ts (UTC), score: one row each time an account's running max score rose
    trajectory: pa.Table

    def account_scores(self) -> pa.Table:
        """account_id, score: each account's highest score over the whole window."""
        return self.trajectory.group_by("account_id").aggregate([("score", "max")]).rename_columns(
            ["account_id", "score"]
        )

    def findings_at(self, threshold: float | None = None) -> Findings:
        """Findings (accounts only, no campaigns) of this baseline at `threshold`."""
        threshold = self.threshold if threshold is None else threshold
        con = duckdb_connection()
        con.register("trajectory", self.trajectory)
        accounts = con.execute(
            """SELECT account_id, max(score) AS score, max(score) >= $t AS flagged,
                      min(ts) FILTER (score >= $t) AS first_flagged_at,
                      NULL::VARCHAR AS campaign_id,
                      CASE WHEN max(score) >= $t
                           THEN [printf('%s: score %.6g >= threshold %.6g', $name, max(score), $t)]
                           ELSE []::VARCHAR[] END AS reasons
               FROM trajectory GROUP BY account_id ORDER BY account_id""",
            {"t": threshold, "name": self.name},
        ).arrow().read_all()
        con.close()
        return Findings.from_accounts(accounts, source=f"baseline {self.name}")

    def threshold_for_fpr(self, honest_account_ids: pa.Array, target_fpr: float) -> float:
        """The lowest threshold whose honest false-positive rate is the achievable rate nearest
        `target_fpr` (ties: the lower rate). Lowest, so the baseline gets the most recall that
        rate allows. Honest accounts absent from the logs are never flagged but count."""
        n_honest = len(honest_account_ids)
        scores = self.account_scores()
        if n_honest == 0 or scores.num_rows == 0:
            return self.threshold
        honest = pc.is_in(scores["account_id"], value_set=honest_account_ids)
        values, counts = np.unique(scores.filter(honest)["score"].to_numpy(), return_counts=True)
        # candidate 0 flags every scored account; candidate i flags honest scores > values[i-1]
        lowest = float(pc.min(scores["score"]).as_py())
        candidates = np.append(lowest, np.nextafter(values, np.inf))
        fprs = np.append(np.cumsum(counts[::-1])[::-1], 0) / n_honest
        best = min(range(len(candidates)), key=lambda i: (abs(fprs[i] - target_fpr), fprs[i]))
        return float(candidates[best])


TRAJECTORY_SCHEMA = pa.schema(
    [("account_id", pa.string()), ("ts", contract.UTC_TS), ("score", pa.float64())]
)


def _trajectory(con: duckdb.DuckDBPyConnection, sql: str) -> pa.Table:
    """Run `sql` (account_id, ts, score) into a TRAJECTORY_SCHEMA table ordered by account, ts."""
    rows = con.execute(
        f"SELECT account_id, ts::TIMESTAMPTZ AS ts, score::DOUBLE AS score FROM ({sql}) "
        "ORDER BY account_id, ts"
    )
    return rows.arrow().read_all().cast(TRAJECTORY_SCHEMA)


def volume_threshold_baseline(
    logs_dir: str | Path, honest_account_ids: pa.Array | None = None, *, quantile: float = 0.999
) -> BaselineResult:
    """Rate limit at the `quantile` of honest account-day volumes (all accounts if no labels).

    Score = an exchange's rank within its account's UTC day, so the account is flagged at the
    exchange that takes a day above the limit: daily volume > p  <=>  rank >= floor(p) + 1.
    """
    glob = exchange_files(logs_dir)
    con = duckdb_connection()
    quoted = "'" + glob.replace("'", "''") + "'"  # views take no prepared parameters
    con.execute(  # views: re-reading two columns beats holding every exchange in memory
        "CREATE VIEW ex AS SELECT account_id, ts, epoch_ms(ts) // 86400000 AS day "
        f"FROM read_parquet({quoted})"
    )
    con.execute("CREATE TEMP TABLE daily AS SELECT account_id, day, count(*) AS n FROM ex GROUP BY ALL")
    honest = pa.table(
        {"account_id": honest_account_ids if honest_account_ids is not None else pa.array([], pa.string())}
    )
    con.register("honest", honest)
    only_honest = "WHERE account_id IN (SELECT account_id FROM honest)" if len(honest) else ""
    (limit,) = con.execute(
        f"SELECT quantile_cont(n, {quantile}) FROM daily {only_honest}"
    ).fetchone()
    limit = float(limit or 0.0)
    # The account's running maximum of daily rank only rises on days busier than every
    # earlier day, and then only past the earlier peak: rank only those days' exchanges.
    trajectory = _trajectory(
        con,
        """WITH record_days AS (
               SELECT account_id, day, prev FROM (
                   SELECT account_id, day, n, coalesce(max(n) OVER (
                       PARTITION BY account_id ORDER BY day
                       ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0) AS prev
                   FROM daily)
               WHERE n > prev)
           SELECT account_id, ts, rank AS score FROM (
               SELECT account_id, ts, prev,
                      row_number() OVER (PARTITION BY account_id, day ORDER BY ts) AS rank
               FROM ex JOIN record_days USING (account_id, day))
           WHERE rank > prev""",
    )
    con.close()
    whose = "honest" if len(honest) else "all"
    return BaselineResult(
        name="volume_threshold",
        description=(
            f"daily volume > {limit:.6g} exchanges ({100 * quantile:g}th percentile of "
            f"{whose} account-days)"
        ),
        threshold=float(np.floor(limit) + 1),
        trajectory=trajectory,
    )


def _daily_cumulative_features(con: duckdb.DuckDBPyConnection, glob: str) -> None:
    """Table `snapshots`: per account and active UTC day, the account's features so far."""
    con.execute(
        """CREATE TEMP TABLE snapshots AS
        WITH ex AS (  -- integer day / hour arithmetic: no time-zone calendar per row
            SELECT account_id, epoch_ms(ts) // 86400000 AS day,
                   epoch_ms(ts) % 86400000 < 6 * 3600000 AS night, ip,
                   input_tokens, output_tokens, reasoning_tokens
            FROM read_parquet(?)),
        daily AS (
            SELECT account_id, day, count(*) AS n,
                   sum(input_tokens) AS in_sum, count(input_tokens) AS in_n,
                   sum(output_tokens) AS out_sum, count(output_tokens) AS out_n,
                   count(*) FILTER (night) AS night,
                   count(*) FILTER (reasoning_tokens > 0) AS reasoning
            FROM ex GROUP BY ALL),
        new_ips AS (
            SELECT account_id, day, count(*) AS n_new FROM (
                SELECT account_id, ip, min(day) AS day FROM ex WHERE ip IS NOT NULL GROUP BY ALL)
            GROUP BY ALL)
        SELECT account_id, epoch_ms((day + 1) * 86400000) AS ts,
               sum(n) OVER w AS cum_n, count(*) OVER w AS active_days, max(n) OVER w AS max_daily,
               sum(coalesce(n_new, 0)) OVER w AS cum_ips,
               sum(in_sum) OVER w AS cum_in, sum(in_n) OVER w AS cum_in_n,
               sum(out_sum) OVER w AS cum_out, sum(out_n) OVER w AS cum_out_n,
               sum(night) OVER w AS cum_night, sum(reasoning) OVER w AS cum_reasoning
        FROM daily LEFT JOIN new_ips USING (account_id, day)
        WINDOW w AS (PARTITION BY account_id ORDER BY day ROWS UNBOUNDED PRECEDING)""",
        [glob],
    )


def isolation_forest_baseline(
    logs_dir: str | Path, *, seed: int = 0, n_estimators: int = 100, contamination: float = 0.001
) -> BaselineResult:
    """IsolationForest on per-account features, run as a nightly job: each account is scored
    on its cumulative features at the end of every UTC day it was active.

    Score = the anomaly score (-score_samples, higher = more anomalous). The natural threshold
    is the model's `contamination` cut: the (1 - contamination) quantile of nightly snapshot
    scores, 99.9 % by default like the rate limit (scikit-learn's "auto" cut at 0.5 flags most
    accounts once every night of every account gets a chance).
    """
    glob = exchange_files(logs_dir)
    con = duckdb_connection()
    _daily_cumulative_features(con, glob)
    names = ", ".join(f"({expr})::DOUBLE AS {name}" for name, expr in IFOREST_FEATURES)
    columns = con.execute(
        f"SELECT account_id, ts, {names} FROM snapshots ORDER BY account_id, ts"
    ).arrow().read_all()
    features = np.column_stack(
        [columns[name].to_numpy(zero_copy_only=False) for name, _ in IFOREST_FEATURES]
    )
    features = np.nan_to_num(features)
    n_accounts = pc.count_distinct(columns["account_id"]).as_py()
    # Fitted on every nightly snapshot, not only the final ones, so an account's early nights
    # (one active day, little volume) are in the distribution the model learned.
    # The contamination cut is taken from these same scores rather than by scikit-learn's
    # `contamination=`, which would score every snapshot a second time.
    model = IsolationForest(n_estimators=n_estimators, random_state=seed, n_jobs=1)
    scores = -model.fit(features).score_samples(features)
    threshold = float(np.quantile(scores, 1 - contamination))
    scored = pa.table({"account_id": columns["account_id"], "ts": columns["ts"], "score": scores})
    con.register("scored", scored)
    trajectory = _trajectory(  # keep only the nights an account's running max score rose
        con,
        """SELECT account_id, ts, score FROM (
               SELECT account_id, ts, score, max(score) OVER (
                   PARTITION BY account_id ORDER BY ts
                   ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS prev
               FROM scored)
           WHERE prev IS NULL OR score > prev""",
    )
    con.close()
    return BaselineResult(
        name="isolation_forest",
        description=(
            f"IsolationForest ({n_estimators} trees, seed {seed}, contamination "
            f"{contamination:g}) on "
            f"{len(IFOREST_FEATURES)} per-account features, {n_accounts:,} accounts, "
            "run nightly on cumulative features"
        ),
        threshold=threshold,
        trajectory=trajectory,
    )
