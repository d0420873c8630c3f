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
            if n is not None and name.endswith("_share"):
                x = shrink_share(x, n)
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


@dataclass
class ClusterVerdict:
    """Score of one cluster and whether it is flagged, with the numbers behind it.

    `members` are the cluster's vertices; `core` those tied to the rest by control evidence
    (infrastructure, payment, sign-up: not only shared prompts) or in a dense block: only the
    core of a flagged cluster is flagged.
    """

    label: int
    members: np.ndarray
    core: np.ndarray
    score: float
    cohesion: float
    control: float
    behaviour_percentile: float
    flagged: bool


@dataclass
class ClusterScorer:
    """Flags clusters tied by unusually strong control evidence whose members sit in the
    behavioural tail.

    * cohesion: mean internal evidence weight per member must reach `min_cohesion`;
    * control: the part of it that is evidence of common control rather than common content
      (a benchmark's prompts or a popular agent's system prompt tie honest strangers too) must
      be an outlier among all clusters: robust z >= `control_z` (3.5, the usual
      Iglewicz-Hoaglin cut), so families sharing a card or colleagues behind one NAT, common
      everywhere, do not qualify, while an operator's pool of cards and addresses does;
    * behaviour: the median core member's score must exceed the population's `tail` quantile.
    A FRAUDAR dense block covering half the cluster stands in for cohesion and control.
    The core keeps members tied by control evidence (or in a dense block) whose own behaviour
    score is at least `member_fraction` of the core's median: honest users who merely share an
    address pool or prompts with a campaign stay out.
    """

    min_size: int = 3
    min_cohesion: float = 2.0
    control_z: float = 3.5
    min_member_control: float = 0.5
    member_fraction: float = 0.5
    tail: float = 0.9

    def score(
        self,
        members: dict[int, np.ndarray],
        behaviour: AccountScores,
        internal_weight: dict[int, float],
        member_control: np.ndarray,
        in_block: np.ndarray,
    ) -> list[ClusterVerdict]:
        """`member_control[i]`: control-evidence weight of vertex i's edges inside its cluster;
        `in_block[i]`: whether vertex i is in a FRAUDAR dense block."""
        threshold = float(np.quantile(behaviour.score, self.tail)) if behaviour.score.size else 0.0
        labs = list(members)
        controls = np.array([float(member_control[members[lab]].mean()) for lab in labs])
        control_z = robust_z(controls)[0] if controls.size >= 3 else np.full(controls.size, np.inf)
        out = []
        for k, lab in enumerate(labs):
            idx = members[lab]
            tied = idx[(member_control[idx] >= self.min_member_control) | in_block[idx]]
            basis = tied if tied.size else idx
            med = float(np.median(behaviour.score[basis]))
            core = tied[behaviour.score[tied] >= self.member_fraction * med]
            pct = float(np.median(behaviour.percentile[basis]))
            cohesion = 2.0 * internal_weight.get(lab, 0.0) / len(idx)
            block = float(in_block[idx].mean())
            tie = max(min(cohesion / self.min_cohesion, control_z[k] / self.control_z), 2 * block)
            score = pct * (1.0 - np.exp(-max(tie, 0.0))) * (1.0 + block) / 2.0
            flagged = bool(
                core.size >= self.min_size
                and med > threshold
                and ((cohesion >= self.min_cohesion and control_z[k] >= self.control_z)
                     or block >= 0.5)
            )
            out.append(ClusterVerdict(lab, idx, core, float(score), cohesion, float(controls[k]),
                                      pct, flagged))
        return out
