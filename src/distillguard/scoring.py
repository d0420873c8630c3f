"""Stage 5: account and cluster risk from explainable contributions.

Unsupervised by default: every feature is compared with the whole population by a robust
z-score (median and MAD, so the attackers themselves cannot drag the reference), only the
suspicious direction counts, and each contribution is capped so no single odd habit decides.
The account's behaviour score is the sum of its contributions; every contribution is kept with
the account's value and the population median so reasons can quote them.

A cluster is a campaign candidate when its accounts are tied by rare shared evidence (cohesion)
AND its members behave unlike the population (median behaviour score far in the population's
tail). Neither alone flags: honest populations are often tied (a NAT, a shared agent) or odd
(evaluation harnesses), rarely both the same way attackers are.

With analyst verdicts (`fit_supervised`), a logistic regression on the same standardised
features replaces the hand weights; its per-feature terms are the contributions.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
from scipy.stats import rankdata

#: (feature, direction, weight, how a person reads it). Direction +1: high is suspicious.
BEHAVIOUR_FEATURES: tuple[tuple[str, int, float, str], ...] = (
    ("cot_share", 1, 1.0, "share of chain-of-thought requests"),
    ("reasoning_reconstruction_share", 1, 1.0, "share of reasoning-reconstruction requests"),
    ("rubric_share", 1, 1.0, "share of rubric / grading requests"),
    ("safe_rewrite_share", 1, 1.0, "share of 'safe rewrite' requests"),
    ("extraction_params_share", 1, 0.5, "share of extraction-friendly parameters"),
    ("distill_score_mean", 1, 1.0, "mean distillation-style classifier score"),
    ("n_capabilities", 1, 0.5, "breadth of capabilities targeted"),
    ("new_model_share", 1, 1.0, "share of traffic on newly released models"),
    ("release_reaction_share", 1, 1.0,
     "share of traffic sent to a new model in its first 24 h (release reaction)"),
    ("age_at_first_use_h", -1, 0.5, "account age at first use (hours)"),
    ("unique_template_share", 1, 0.25, "share of distinct prompt templates"),
    ("n_ips", 1, 0.25, "distinct IP addresses"),
    ("daily_mean", 1, 0.25, "exchanges per active day"),
    ("hour_entropy", 1, 0.5, "spread over the hours of the day (24/7 activity)"),
    ("gap_cv", -1, 0.25, "regularity of inter-arrival times"),
    ("depth_mean", -1, 0.25, "conversation depth (single-turn)"),
)

#: Cap of one feature's robust z contribution.
Z_CAP = 6.0

#: Features compared on a log scale (log1p): durations and counts spanning orders of magnitude,
#: where a 1-day-old account differs from a 10-day-old one far more than a 300-day-old one
#: from a 310-day-old one. Reasons still quote the raw value.
LOG_FEATURES = frozenset({"age_at_first_use_h"})

#: Shares whose denominator is not the account's whole traffic: the fingerprint column that
#: counts it (the empirical-Bayes shrinkage uses it instead of n_exchanges).
SHARE_BASIS = {"release_reaction_share": "release_window_n"}


def robust_z(x: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(z, median, scale) with scale = 1.4826 MAD, falling back to the mean absolute deviation
    and then to 1 when most of the population shares one value."""
    x = np.nan_to_num(np.asarray(x, dtype=float))
    med = float(np.median(x)) if x.size else 0.0
    dev = np.abs(x - med)
    scale = 1.4826 * float(np.median(dev)) if x.size else 0.0
    if scale <= 1e-9:
        scale = 1.2533 * float(dev.mean()) if x.size else 0.0
    if scale <= 1e-9:
        scale = 1.0
    return (x - med) / scale, med, scale


#: Pseudo-count of the empirical-Bayes prior on per-account shares.
PRIOR_EXCHANGES = 20.0


def shrink_share(share: np.ndarray, n: np.ndarray, prior_n: float = PRIOR_EXCHANGES) -> np.ndarray:
    """Shrink each account's share toward the population median by `prior_n` pseudo-exchanges,
    so one chain-of-thought prompt from a one-exchange account is not a 100% share."""
    prior = float(np.median(share)) if share.size else 0.0
    return (share * n + prior * prior_n) / (n + prior_n)


def _eligible_shrunk(x: np.ndarray, n: np.ndarray, eligible: np.ndarray) -> np.ndarray:
    """`shrink_share` toward the median of the eligible accounts; others get that median."""
    out = np.full(x.size, float(np.median(x[eligible])) if eligible.any() else 0.0)
    if eligible.any():
        out[eligible] = shrink_share(x[eligible], n[eligible])
    return out


def _eligible_z(x: np.ndarray, eligible: np.ndarray) -> tuple[np.ndarray, float]:
    """Robust z against the eligible accounts only (0 for the others)."""
    z = np.zeros(x.size)
    if not eligible.any():
        return z, 0.0
    ze, med, _scale = robust_z(x[eligible])
    z[eligible] = ze
    return z, med


@dataclass
class AccountScores:
    """Behaviour score per account with its per-feature contributions."""

    accounts: list[str]
    score: np.ndarray
    contributions: dict[str, np.ndarray]
    values: dict[str, np.ndarray]
    medians: dict[str, float]
    percentile: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def reasons(self, i: int, top: int = 3, min_contribution: float = 0.5) -> list[str]:
        """The account's strongest behavioural contributions, in words with numbers."""
        labels = {f: lab for f, _, _, lab in BEHAVIOUR_FEATURES}
        items = sorted(self.contributions.items(), key=lambda kv: -kv[1][i])
        out = []
        for name, contrib in items[:top]:
            if contrib[i] < min_contribution:
                break
            out.append(
                f"{labels.get(name, name)}: {self.values[name][i]:.3g} "
                f"(population median {self.medians[name]:.3g}; +{contrib[i]:.1f})"
            )
        return out


class BehaviourScorer:
    """Population-relative behaviour score (unsupervised) or learned from verdicts."""

    def __init__(self, features: tuple[tuple[str, int, float, str], ...] = BEHAVIOUR_FEATURES):
        self.features = features
        self.model = None

    def _matrix(self, fp: pa.Table) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, float]]:
        values, zs, meds = {}, [], {}
        n = (fp["n_exchanges"].to_numpy(zero_copy_only=False).astype(float)
             if "n_exchanges" in fp.column_names else None)
        for name, direction, _, _ in self.features:
            x = np.nan_to_num(fp[name].to_numpy(zero_copy_only=False).astype(float))
            basis, eligible = n, None
            if name in SHARE_BASIS and SHARE_BASIS[name] in fp.column_names:
                basis = np.nan_to_num(
                    fp[SHARE_BASIS[name]].to_numpy(zero_copy_only=False).astype(float))
                eligible = basis > 0
            if eligible is not None:
                # compared only among accounts that could show it (active in a release
                # window); the others sit at that reference's median (no contribution)
                x = _eligible_shrunk(x, basis, eligible)
                z, med = _eligible_z(x, eligible)
            else:
                if basis is not None and name.endswith("_share"):
                    x = shrink_share(x, basis)
                if name in LOG_FEATURES:
                    z, _, _ = robust_z(np.log1p(np.maximum(x, 0.0)))
                    med = float(np.median(x)) if x.size else 0.0
                else:
                    z, med, _ = robust_z(x)
            values[name], meds[name] = x, med
            zs.append(np.clip(direction * z, 0.0, Z_CAP))
        return values, np.column_stack(zs) if zs else np.zeros((fp.num_rows, 0)), meds

    def fit_supervised(self, fp: pa.Table, verdicts: Mapping[str, bool]) -> BehaviourScorer:
        """Learn feature weights from analyst verdicts (account_id -> is attacker).

        Needs both classes among the verdicts; the model is a class-balanced logistic regression
        on the same capped robust z features, so its contributions stay explainable.
        """
        from sklearn.linear_model import LogisticRegression

        ids = fp["account_id"].to_pylist()
        rows = [i for i, a in enumerate(ids) if a in verdicts]
        y = np.array([bool(verdicts[ids[i]]) for i in rows])
        if len(set(y.tolist())) < 2:
            raise ValueError("supervised scoring needs verdicts of both kinds (attacker, honest)")
        _, z, _ = self._matrix(fp)
        self.model = LogisticRegression(class_weight="balanced", max_iter=1000, random_state=0)
        self.model.fit(z[rows], y)
        return self

    def score(self, fp: pa.Table) -> AccountScores:
        values, z, meds = self._matrix(fp)
        if self.model is not None:
            weights = self.model.coef_[0]
        else:
            weights = np.array([w for _, _, w, _ in self.features])
        contrib = z * weights
        total = contrib.sum(axis=1)
        # tied scores share one (average) rank, so the result never depends on row order
        pct = (rankdata(total, method="average") - 1) / max(len(total) - 1, 1)
        return AccountScores(
            accounts=fp["account_id"].to_pylist(),
            score=total,
            contributions={f[0]: contrib[:, k] for k, f in enumerate(self.features)},
            values=values,
            medians=meds,
            percentile=pct,
        )


def cohort_p_value(u: np.ndarray, fraction: float = 0.75, min_k: int = 3) -> float:
    """How unlikely the accounts' sign-up times are to be this close together by chance.

    `u` are the accounts' sign-up times as population quantiles (the empirical CDF of every
    account's creation time, so u is uniform for a random group whatever the population's
    growth curve). With k = ceil(`fraction` * n) (at least `min_k`), R is the shortest
    quantile interval holding k of them; the p-value is the binomial tail P(Bin(n, R) >= k)
    times the 1/R windows such an interval could have fallen in (a Bonferroni bound on the
    scan statistic). An operator creating its accounts in one batch gives a tiny p; a few
    honest users who happen to sit in the cluster do not widen the densest window."""
    from scipy.stats import binom

    u = np.sort(np.asarray(u, dtype=float)[np.isfinite(u)])
    n = u.size
    k = max(min_k, int(np.ceil(fraction * n)))
    if n < k:
        return 1.0
    width = float(np.min(u[k - 1:] - u[: n - k + 1]))
    width = max(width, 1.0 / max(n, 1) ** 2, 1e-12)
    return float(min(1.0, binom.sf(k - 1, n, width) / width))


@dataclass
class ClusterVerdict:
    """Score of one cluster and whether it is flagged, with the numbers behind it.

    `members` are the cluster's vertices; `core` those tied to the rest by control evidence
    (infrastructure, payment, sign-up: not only shared prompts) or in a dense block: only the
    core of a flagged cluster is flagged. `cohort_p` is the sign-up cohort p-value of the core
    (`cohort_p_value`; 1.0 when unknown).
    """

    label: int
    members: np.ndarray
    core: np.ndarray
    score: float
    cohesion: float
    control: float
    behaviour_percentile: float
    flagged: bool
    cohort_p: float = 1.0
    cohort: bool = False
    #: how the cluster came to be, when several were joined (quoted in the campaign's reasons)
    notes: list[str] = field(default_factory=list)


@dataclass
class ClusterScorer:
    """Flags clusters tied by unusually strong control evidence whose members sit in the
    behavioural tail.

    * core: members whose strongest tie to another member carries at least
      `min_member_control` of control evidence (a rare shared card, address, sign-up address:
      not the sum of many everyday ones, so a popular user agent or a NAT shared with dozens
      does not make a member) and whose behaviour score is at least `member_fraction` of the
      core's median: honest users who merely share an address pool or prompts stay out;
    * cohesion: mean internal evidence weight per member must reach `min_cohesion`;
    * control: the core's mean control-evidence weight per member must be an outlier among
      all clusters: robust z >= `control_z` (3.5, the usual Iglewicz-Hoaglin cut), so families
      sharing a card or colleagues behind one NAT, common everywhere, do not qualify, while an
      operator's pool of cards and addresses does; **or** the core is a sign-up cohort: its
      members were created closer together than chance allows (`cohort_p_value` <=
      `cohort_alpha` / number of clusters, Bonferroni over the clusters tested). An operator
      provisions its accounts in batches; independent evaluation harnesses or colleagues
      sharing a cloud address pool were created months apart;
    * owner: an outlying control weight counts only when at least `owner_fraction` of the core
      shares a payment instrument with another member (or the core is a sign-up cohort):
      unrelated evaluation harnesses that sign up from and call from one cloud address, on
      their own cards and months apart, are tied by a place, not by an owner;
    * behaviour: the median core member's score must exceed the population's `tail` quantile.
    A FRAUDAR dense block covering half the cluster or half its core stands in for cohesion and
    control; the flagged core is then its members in a block.
    """

    min_size: int = 3
    min_cohesion: float = 2.0
    control_z: float = 3.5
    min_member_control: float = 0.5
    member_fraction: float = 0.5
    tail: float = 0.9
    cohort_alpha: float = 0.01
    cohort_fraction: float = 0.75
    owner_fraction: float = 0.5

    def tail_threshold(self, behaviour: AccountScores) -> float:
        """The behaviour score at the population's `tail` quantile."""
        return float(np.quantile(behaviour.score, self.tail)) if behaviour.score.size else 0.0

    def score(
        self,
        members: dict[int, np.ndarray],
        behaviour: AccountScores,
        internal_weight: dict[int, float],
        member_control: np.ndarray,
        in_block: np.ndarray,
        member_max_control: np.ndarray | None = None,
        signup_quantile: np.ndarray | None = None,
        member_owner: np.ndarray | None = None,
    ) -> list[ClusterVerdict]:
        """`member_control[i]`: control-evidence weight of vertex i's edges inside its cluster;
        `member_max_control[i]`: its strongest such edge (default: `member_control`);
        `in_block[i]`: whether vertex i is in a FRAUDAR dense block; `signup_quantile[i]`:
        its sign-up time as a population quantile (NaN: unknown; None: no cohort test);
        `member_owner[i]`: payment-instrument weight of its edges inside its cluster (None: no
        owner test)."""
        threshold = self.tail_threshold(behaviour)
        strongest = member_control if member_max_control is None else member_max_control
        labs = list(members)
        cores, tieds = {}, {}
        for lab in labs:
            idx = members[lab]
            tied = idx[strongest[idx] >= self.min_member_control]
            basis = tied if tied.size else idx
            med = float(np.median(behaviour.score[basis]))
            tieds[lab] = (basis, med)
            cores[lab] = tied[behaviour.score[tied] >= self.member_fraction * med]
        controls = np.array([
            float(member_control[cores[lab]].mean()) if cores[lab].size
            else float(member_control[members[lab]].mean()) for lab in labs])
        control_z = robust_z(controls)[0] if controls.size >= 3 else np.full(controls.size, np.inf)
        alpha = self.cohort_alpha / max(len(labs), 1)
        out = []
        for k, lab in enumerate(labs):
            idx = members[lab]
            basis, med = tieds[lab]
            core = cores[lab]
            pct = float(np.median(behaviour.percentile[basis]))
            cohesion = 2.0 * internal_weight.get(lab, 0.0) / len(idx)
            block = float(in_block[idx].mean())
            cohort_p = (cohort_p_value(signup_quantile[core], self.cohort_fraction, self.min_size)
                        if signup_quantile is not None and core.size >= self.min_size else 1.0)
            cohort = cohort_p <= alpha
            cz = max(float(control_z[k]), self.control_z if cohort else 0.0)
            tie = max(min(cohesion / self.min_cohesion, cz / self.control_z), 2 * block)
            score = pct * (1.0 - np.exp(-max(tie, 0.0))) * (1.0 + block) / 2.0
            owned = (cohort or member_owner is None or not core.size
                     or float(np.mean(member_owner[core] > 0)) >= self.owner_fraction)
            by_control = cohesion >= self.min_cohesion and cz >= self.control_z and owned
            # the dense block is evidence about its members: at least half the core (or half
            # the cluster) in a block, and then only the core's block members are implicated
            in_core_block = core[in_block[core]]
            by_block = (block >= 0.5 or 2 * in_core_block.size >= core.size) and (
                in_core_block.size >= self.min_size)
            flagged = bool(core.size >= self.min_size and med > threshold
                           and (by_control or by_block))
            if flagged and not by_control:
                core = in_core_block
            out.append(ClusterVerdict(lab, idx, core, float(score), cohesion, float(controls[k]),
                                      pct, flagged, float(cohort_p), bool(cohort)))
        return out
