"""Stage 5: population-relative behaviour scores, supervised mode and cluster flags."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from distillguard import scoring

FEATURES = [f for f, _, _, _ in scoring.BEHAVIOUR_FEATURES]


def population(n: int = 200, odd: int = 10, seed: int = 0) -> pa.Table:
    """n accounts with ordinary habits; the first `odd` ask for chain-of-thought 90% of the time."""
    rng = np.random.default_rng(seed)
    cols = {f: rng.normal(1.0, 0.1, n).clip(0) for f in FEATURES}
    cols["cot_share"] = np.where(np.arange(n) < odd, 0.9, rng.uniform(0, 0.1, n))
    return pa.table({"account_id": [f"a{i:03d}" for i in range(n)], **cols})


def test_robust_z_ignores_the_outliers_themselves():
    x = np.r_[np.zeros(95) + np.linspace(0, 1, 95), [100.0] * 5]
    z, med, _scale = scoring.robust_z(x)
    assert med == pytest.approx(np.median(x))
    assert z[-1] > 50  # the outliers did not inflate the scale
    z_const, _, scale_const = scoring.robust_z(np.ones(10))
    assert scale_const == 1.0 and (z_const == 0).all()


def test_odd_accounts_score_high_with_an_explained_contribution():
    s = scoring.BehaviourScorer().score(population())
    assert s.score[:10].min() > np.quantile(s.score[10:], 0.95)
    assert s.contributions["cot_share"][0] == pytest.approx(scoring.Z_CAP)  # capped
    reasons = s.reasons(0)
    assert reasons and reasons[0].startswith("share of chain-of-thought requests: 0.9")
    assert "population median" in reasons[0]
    assert s.percentile.max() == 1.0


def test_direction_only_counts_the_suspicious_side():
    t = population(odd=0)
    t = t.set_column(FEATURES.index("depth_mean") + 1, "depth_mean",
                     pa.array(np.r_[[50.0], np.ones(199)]))  # very deep chat: not suspicious
    s = scoring.BehaviourScorer().score(t)
    assert s.contributions["depth_mean"][0] == 0.0


def test_supervised_mode_learns_from_verdicts():
    t = population()
    verdicts = {f"a{i:03d}": i < 10 for i in range(0, 200, 2)} | {"a001": True, "a003": True}
    s = scoring.BehaviourScorer().fit_supervised(t, verdicts).score(t)
    assert s.score[:10].min() > s.score[10:].max()
    with pytest.raises(ValueError, match="both kinds"):
        scoring.BehaviourScorer().fit_supervised(t, {"a000": True})


def background(control: np.ndarray) -> tuple[dict[int, np.ndarray], dict[int, float]]:
    """Thirty ordinary 3-account clusters (accounts 100..189) with everyday control ties."""
    members, internal = {}, {}
    for k in range(30):
        idx = np.arange(100 + 3 * k, 103 + 3 * k)
        control[idx] = 1.0 + 0.1 * (k % 5)
        members[10 + k], internal[10 + k] = idx, 3.0
    return members, internal


def test_cluster_needs_cohesion_control_and_behaviour():
    s = scoring.BehaviourScorer().score(population())
    odd, normal = np.arange(0, 10), np.arange(50, 60)
    control = np.zeros(200)
    members, internal = background(control)
    control[odd] = 20.0
    control[normal] = 20.0
    members |= {0: odd, 1: normal, 2: odd[:5]}
    internal |= {0: 100.0, 1: 100.0, 2: 1.0}  # cluster 2: odd but barely tied together
    no_block = np.zeros(200, dtype=bool)
    scorer = scoring.ClusterScorer()
    verdicts = {v.label: v for v in scorer.score(members, s, internal, control, no_block)}
    assert verdicts[0].flagged and set(verdicts[0].core) == set(odd)
    assert not verdicts[1].flagged  # tied but ordinary (a NAT, a team)
    assert not verdicts[2].flagged  # odd but not tied (independent heavy users)
    assert not any(verdicts[k].flagged for k in range(10, 40))
    assert verdicts[0].score > verdicts[1].score
    weak = control.copy()
    weak[odd] = 1.2  # tied only by everyday control evidence (or only by shared prompts)
    content_only = {v.label: v for v in scorer.score(members, s, internal, weak, no_block)}
    assert not content_only[0].flagged
    block = np.zeros(200, dtype=bool)
    block[odd[:5]] = True
    dense = {v.label: v for v in scorer.score(members, s, internal, control, block)}
    assert dense[2].flagged  # a FRAUDAR dense block stands in for cohesion


def test_outlying_control_without_a_shared_card_needs_a_sign_up_cohort():
    """Evaluation harnesses of unrelated organisations on their own cards, signed up months
    apart from one cloud address: tied by a place, not an owner, so not flagged."""
    s = scoring.BehaviourScorer().score(population())
    odd = np.arange(0, 10)
    control = np.zeros(200)
    members, internal = background(control)
    control[odd] = 20.0
    members[0], internal[0] = odd, 100.0
    no_block = np.zeros(200, dtype=bool)
    scorer = scoring.ClusterScorer()
    owner = np.zeros(200)

    def flagged(owner, signup=None):
        return {v.label: v for v in scorer.score(members, s, internal, control, no_block,
                                                 signup_quantile=signup,
                                                 member_owner=owner)}[0].flagged

    assert not flagged(owner)
    owner[odd[:6]] = 1.5  # most of the core shares cards: one payer
    assert flagged(owner)
    months_apart = np.linspace(0.0, 1.0, 200)
    months_apart[odd] = np.linspace(0.05, 0.95, 10)  # spread over the population's sign-ups
    assert not flagged(np.zeros(200), months_apart)
    one_batch = months_apart.copy()
    one_batch[odd] = 0.5 + np.arange(10) * 1e-4  # created within minutes of each other
    assert flagged(np.zeros(200), one_batch)


def test_only_the_core_of_a_mixed_cluster_is_flagged():
    s = scoring.BehaviourScorer().score(population())
    control = np.zeros(200)
    members, internal = background(control)
    ordinary = 10 + np.argsort(s.score[10:100])[:3]  # three of the most ordinary accounts
    mixed = np.r_[np.arange(0, 10), np.arange(50, 54), ordinary]
    control[:10] = 20.0  # attackers share cards and addresses ...
    control[ordinary] = 20.0  # ... and ordinary users sit in the same address pool
    members[0], internal[0] = mixed, 150.0
    v = {v.label: v for v in scoring.ClusterScorer().score(
        members, s, internal, control, np.zeros(200, dtype=bool))}[0]
    assert v.flagged and set(v.core) == set(range(10))
