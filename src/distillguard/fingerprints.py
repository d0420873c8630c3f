"""Stage 2: per-account behaviour fingerprints, expressed once in Ibis.

Every function here takes and returns Ibis table expressions, so the same code runs on DuckDB
(the default store) and on PySpark (the `spark` engine). Nothing is executed until the caller
materialises the result (`.to_pyarrow()`), which lets the backend plan the whole stage at once.

A single attacking account is small and looks clean; these fingerprints are not verdicts, they
are the population-relative raw material that `scoring` compares against everyone else.
"""

from __future__ import annotations

from datetime import datetime

import ibis
import ibis.expr.types as ir

#: Signal columns carried from the `signals` table into the exchange view.
SIGNAL_COLUMNS = (
    "cot",
    "reasoning_reconstruction",
    "rubric",
    "safe_rewrite",
    "capability",
    "extraction_params",
    "template_sig",
    "system_hash",
    "distill_score",
    "depth",
)

#: A model first seen this long after the log starts counts as released inside the window.
NEW_MODEL_AFTER_S = 6 * 3600

#: The release-reaction window: how soon after a model first appears an account moves to it.
RELEASE_WINDOW_S = 24 * 3600

#: Boolean signals whose per-account share is a fingerprint feature.
SHARE_SIGNALS = ("cot", "reasoning_reconstruction", "rubric", "safe_rewrite", "extraction_params")

#: Fingerprint columns that are numbers (what scoring standardises); order is stable.
NUMERIC_FEATURES = (
    "n_exchanges",
    "n_days",
    "daily_mean",
    "daily_cv",
    "daily_max",
    "gap_mean_s",
    "gap_cv",
    "hour_entropy",
    "n_hours",
    "weekday_entropy",
    "depth_mean",
    "unique_template_share",
    "top_template_share",
    "n_capabilities",
    "cot_share",
    "reasoning_reconstruction_share",
    "rubric_share",
    "safe_rewrite_share",
    "extraction_params_share",
    "distill_score_mean",
    "token_ratio",
    "temp0_share",
    "n_models",
    "new_model_share",
    "release_reaction_share",
    "n_ips",
    "n_prefixes",
    "n_user_agents",
    "age_at_first_use_h",
)


def ip_prefix(ip: ir.StringValue) -> ir.StringValue:
    """The /24 of an IPv4 address or the /48 (first three hextets) of an IPv6 address.

    IPv6 addresses compressed with `::` inside their first three hextets fall back to the whole
    address, which only makes the prefix evidence rarer (never wrongly shared).
    """
    v4 = ip.re_extract(r"^(\d+\.\d+\.\d+)\.\d+$", 1)
    v6 = ip.re_extract(r"^([0-9A-Fa-f]{1,4}:[0-9A-Fa-f]{1,4}:[0-9A-Fa-f]{1,4}):", 1)
    return ibis.cases((v4 != "", v4 + ".0/24"), (v6 != "", v6.lower() + "::/48"), else_=ip)


def exchange_view(
    exchanges: ir.Table, signals: ir.Table, *, until: datetime | None = None
) -> ir.Table:
    """Exchanges up to `until` joined to their signals: the one table every later stage reads."""
    x = exchanges
    if until is not None:
        x = x.filter(x.ts <= ibis.literal(until))
    s = signals.select("request_id", *SIGNAL_COLUMNS)
    joined = x.join(s, "request_id")
    return joined.select(
        "request_id",
        "account_id",
        "ts",
        "model",
        "ip",
        "user_agent",
        "org_id",
        *SIGNAL_COLUMNS,
        day=joined.ts.truncate("D"),
        hour=joined.ts.hour(),
        weekday=joined.ts.day_of_week.index(),
        temperature=joined.params.temperature,
        input_tokens=joined.input_tokens,
        output_tokens=joined.output_tokens,
        prefix=ip_prefix(joined.ip),
    )


def band_view(signals: ir.Table, *, until: datetime | None = None) -> ir.Table:
    """(request_id, account_id, ts, template_lsh) of the signals up to `until`, read from the
    signals table alone. The LSH bands are the widest signal (eight strings per exchange) and
    only evidence and attribution read them: kept out of the cached exchange view, that view
    fits in DuckDB's memory limit at 10M exchanges instead of spilling to disk."""
    s = signals
    if until is not None:
        s = s.filter(s.ts <= ibis.literal(until))
    return s.select("request_id", "account_id", "ts", "template_lsh")


def _entropy(view: ir.Table, column: str) -> ir.Table:
    """Shannon entropy (bits) of each account's distribution over `column`."""
    counts = view.group_by(["account_id", column]).aggregate(c=view.count())
    per = counts.group_by("account_id").aggregate(
        total=counts.c.sum(), clogc=(counts.c * counts.c.log2()).sum(), k=counts.count()
    )
    return per.select(
        "account_id",
        **{f"{column}_entropy": per.total.log2() - per.clogc / per.total, f"n_{column}s": per.k},
    )


def daily_fingerprints(view: ir.Table) -> ir.Table:
    """Per account per day: volume and the signal mix of that day."""
    return view.group_by(["account_id", "day"]).aggregate(
        n=view.count(),
        n_templates=view.template_sig.nunique(),
        first_ts=view.ts.min(),
        last_ts=view.ts.max(),
        **{f"n_{s}": view[s].cast("int64").sum() for s in SHARE_SIGNALS},
    )


def model_first_seen(view: ir.Table) -> ir.Table:
    """When each model first appears in the log: the release proxy when no release feed exists."""
    return view.group_by("model").aggregate(model_first_ts=view.ts.min())


def account_fingerprints(view: ir.Table, accounts: ir.Table) -> ir.Table:
    """Cumulative per-account fingerprint (one row per active account), see NUMERIC_FEATURES."""
    log_start = view.ts.min().as_scalar()
    firsts = model_first_seen(view)
    # A "new" model is one first seen well after the log starts (a release inside the window);
    # the share of an account's traffic on such models is its release reaction.
    firsts = firsts.mutate(
        is_new=(firsts.model_first_ts.epoch_seconds() - log_start.epoch_seconds())
        > NEW_MODEL_AFTER_S
    )
    v = view.join(firsts.select("model", "is_new"), "model")
    # ordered by time alone: rows with equal times may come in any order, the gaps between
    # consecutive times (all that is aggregated) are the same
    v = v.mutate(
        gap=v.ts.epoch_seconds()
        - v.ts.epoch_seconds().lag().over(group_by=v.account_id, order_by=v.ts)
    )
    base = v.group_by("account_id").aggregate(
        n_exchanges=v.count(),
        n_days=v.day.nunique(),
        first_ts=v.ts.min(),
        last_ts=v.ts.max(),
        gap_mean_s=v.gap.mean(),
        gap_std_s=v.gap.std(how="pop"),
        depth_mean=v.depth.mean(),
        n_template_sigs=v.template_sig.nunique(),
        n_capabilities=v.capability.nunique(),
        distill_score_mean=v.distill_score.mean(),
        sum_in=v.input_tokens.sum(),
        sum_out=v.output_tokens.sum(),
        temp0_share=(v.temperature == 0).cast("float64").mean(),
        n_models=v.model.nunique(),
        new_model_share=v.is_new.cast("float64").mean(),
        n_ips=v.ip.nunique(),
        n_prefixes=v.prefix.nunique(),
        n_user_agents=v.user_agent.nunique(),
        **{f"{s}_share": v[s].cast("float64").mean() for s in SHARE_SIGNALS},
    )
    # Release reaction: of an account's exchanges in the first RELEASE_WINDOW_S after a new
    # model first appears, the share sent to that model. Honest users adopt a release over days;
    # an operator who switches its fleet to a fresh model within hours stands out here, even
    # when its share over the whole log looks like everyone's.
    nm = firsts.filter(firsts.is_new).select(nm_model=firsts.model,
                                              nm_s=firsts.model_first_ts.epoch_seconds())
    w = view.select("account_id", "model", ts_s=view.ts.epoch_seconds()).cross_join(nm)
    w = w.filter((w.ts_s >= w.nm_s) & (w.ts_s < w.nm_s + RELEASE_WINDOW_S))
    early = w.group_by("account_id").aggregate(
        release_window_n=w.count(), release_new_n=(w.model == w.nm_model).cast("int64").sum()
    )
    base = base.left_join(early, "account_id")
    base = base.drop([c for c in base.columns if c.endswith("_right")])
    daily = daily_fingerprints(view)
    dstats = daily.group_by("account_id").aggregate(
        daily_mean=daily.n.mean(), daily_std=daily.n.std(how="pop"), daily_max=daily.n.max()
    )
    tcounts = view.group_by(["account_id", "template_sig"]).aggregate(c=view.count())
    top = tcounts.group_by("account_id").aggregate(top_template_n=tcounts.c.max())
    hours = _entropy(view, "hour")
    weekdays = _entropy(view, "weekday")
    acc = accounts.select(
        "account_id", "created_at", "verification_path", "email_domain", acct_org=accounts.org_id
    )
    f = (
        base.join(dstats, "account_id")
        .join(top, "account_id")
        .join(hours, "account_id")
        .join(weekdays.select("account_id", "weekday_entropy"), "account_id")
        .left_join(acc, "account_id")
    )
    f = f.drop([c for c in f.columns if c.endswith("_right")])
    return f.select(
        "account_id",
        "first_ts",
        "last_ts",
        "verification_path",
        "email_domain",
        "n_exchanges",
        "n_days",
        "daily_mean",
        "daily_max",
        "gap_mean_s",
        "depth_mean",
        "n_capabilities",
        "distill_score_mean",
        "temp0_share",
        "n_models",
        "new_model_share",
        "n_ips",
        "n_prefixes",
        "n_user_agents",
        "hour_entropy",
        "n_hours",
        "weekday_entropy",
        *[f"{s}_share" for s in SHARE_SIGNALS],
        "created_at",
        org_id=f.acct_org,
        release_window_n=f.release_window_n.fill_null(0),
        release_reaction_share=(
            f.release_new_n.cast("float64") / f.release_window_n.nullif(0)
        ).fill_null(0),
        daily_cv=(f.daily_std / f.daily_mean).fill_null(0),
        gap_cv=(f.gap_std_s / f.gap_mean_s.nullif(0)).fill_null(0),
        unique_template_share=f.n_template_sigs / f.n_exchanges,
        top_template_share=f.top_template_n / f.n_exchanges,
        token_ratio=(f.sum_out / f.sum_in.nullif(0)).fill_null(0),
        age_at_first_use_h=(
            (f.first_ts.epoch_seconds() - f.created_at.epoch_seconds()) / 3600.0
        ).fill_null(0),
    ).order_by("account_id")
