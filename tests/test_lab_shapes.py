"""Each population and campaign has the statistical shape its scenario declares: volumes,
caps, timing, address and payment sharing, prompt families, reasoning, release pivot."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from distillguard.lab.infrastructure import Infrastructure
from distillguard.lab.prompts import AGENT_SYSTEM_PROMPT
from distillguard.lab.simulate import simulate
from test_lab_simulate import TINY, query, write_scenario


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("shapes")
    target = base / "out"
    simulate(write_scenario(base), target, seed=11, builtin_prompts=True)
    return target


def test_campaign_volumes_hit_their_targets_under_the_cap(out: Path):
    attack = dict(query(out, """
        SELECT campaign_id, count(*) FROM t_exchanges WHERE campaign_id IS NOT NULL
        GROUP BY campaign_id"""))
    for cid, spec in TINY["campaigns"].items():
        assert abs(attack[cid] - spec["exchanges"]) <= 0.2 * spec["exchanges"], cid
    ((busiest,),) = query(out, """
        SELECT max(n) FROM (SELECT count(*) n FROM exchanges e JOIN t_accounts t
        USING (account_id) WHERE t.campaign_id = 'lb' GROUP BY account_id, ts::DATE)""")
    assert busiest <= 60


def test_honest_volume_is_heavy_tailed(out: Path):
    counts = np.array([r[0] for r in query(out, """
        SELECT count(*) FROM exchanges JOIN t_accounts USING (account_id)
        WHERE population = 'office' GROUP BY account_id""")])
    assert counts.max() > 3 * np.median(counts)


def _gap_cv(out: Path, group_sql: str) -> float:
    """Median over accounts of the coefficient of variation of gaps between sessions."""
    rows = query(out, f"""
        SELECT account_id, list(epoch_ms(ts) ORDER BY ts) FROM exchanges
        JOIN t_accounts USING (account_id) WHERE {group_sql} GROUP BY account_id""")
    cvs = []
    for _, times in rows:
        gaps = np.diff(np.array(times, dtype=np.float64))
        gaps = gaps[gaps > 60_000]  # gaps between sessions, not inside one
        if len(gaps) >= 5:
            cvs.append(gaps.std() / gaps.mean())
    return float(np.median(cvs))


def test_load_balanced_campaign_is_regular_and_honest_users_are_bursty(out: Path):
    assert _gap_cv(out, "campaign_id = 'lb'") < 0.4
    assert _gap_cv(out, "population = 'office'") > 0.8


def test_diurnal_population_follows_its_office_profile(out: Path):
    ((office_share,),) = query(out, """
        SELECT avg((hour(ts) BETWEEN 7 AND 18)::INT) FROM exchanges
        JOIN t_accounts USING (account_id) WHERE population = 'office'""")
    assert office_share > 0.75


def test_no_pile_up_at_day_edges(out: Path):
    ((at_edges, n),) = query(out, """
        SELECT count_if(epoch_ms(ts) % 86400000 IN (0, 86399999)), count(*) FROM exchanges""")
    assert at_edges <= max(2, n // 20_000)


def test_ip_strategies(out: Path):
    # datacenter_pool: one pool of accounts/accounts_per_ip data-centre addresses for all.
    ((lb_ips, lb_accounts_per_ip),) = query(out, """
        SELECT count(DISTINCT ip), max(n) FROM (SELECT ip, count(DISTINCT account_id) n
        FROM exchanges JOIN t_accounts USING (account_id) WHERE campaign_id = 'lb'
        GROUP BY ip)""")
    assert lb_ips == 4 and lb_accounts_per_ip >= 15
    # sticky_per_account: one address per account, never shared.
    ((max_ips, max_accounts),) = query(out, """
        SELECT (SELECT max(n) FROM (SELECT count(DISTINCT ip) n FROM exchanges
                JOIN t_accounts USING (account_id) WHERE campaign_id = 'pivoter'
                GROUP BY account_id)),
               (SELECT max(n) FROM (SELECT count(DISTINCT account_id) n FROM exchanges
                WHERE ip IN (SELECT ip FROM exchanges JOIN t_accounts USING (account_id)
                WHERE campaign_id = 'pivoter') GROUP BY ip))""")
    assert max_ips == 1 and max_accounts == 1
    # residential_shared_with_honest: the campaign's addresses are also honest users'.
    ((shared,),) = query(out, """
        SELECT count(DISTINCT e.ip) FROM exchanges e JOIN t_accounts t USING (account_id)
        WHERE t.campaign_id = 'mimic' AND e.ip IN (SELECT ip FROM exchanges
        JOIN t_accounts USING (account_id) WHERE NOT is_attack)""")
    assert shared > 0
    # university NAT: many unrelated accounts behind each address.
    ((campus_accounts_per_ip,),) = query(out, """
        SELECT max(n) FROM (SELECT ip, count(DISTINCT account_id) n FROM exchanges
        JOIN t_accounts USING (account_id) WHERE population = 'campus' GROUP BY ip)""")
    assert campus_accounts_per_ip >= 15


def test_datacenter_addresses_come_from_datacenter_ranges(out: Path):
    bases, sizes = Infrastructure(None, 16, 0).ranges["datacenter"]
    ips = [r[0] for r in query(out, """
        SELECT DISTINCT ip FROM exchanges JOIN t_accounts USING (account_id)
        WHERE campaign_id = 'lb' OR population = 'batch'""")]
    values = np.array([int.from_bytes(bytes(map(int, ip.split("."))), "big") for ip in ips])
    inside = ((values[:, None] >= bases) & (values[:, None] < bases + sizes)).any(axis=1)
    assert inside.all()


def test_payment_and_signup_sharing(out: Path):
    sizes = [r[0] for r in query(out, """
        SELECT count(*) FROM accounts JOIN t_accounts USING (account_id)
        WHERE campaign_id = 'lb' GROUP BY payment_fingerprint""")]
    assert sorted(sizes) == [4] * 5
    ((span_hours,),) = query(out, """
        SELECT (epoch(max(created_at)) - epoch(min(created_at))) / 3600 FROM accounts
        JOIN t_accounts USING (account_id) WHERE campaign_id = 'lb'""")
    assert span_hours <= 12
    ((paths,),) = query(out, """
        SELECT list(DISTINCT verification_path) FROM accounts JOIN t_accounts
        USING (account_id) WHERE population = 'campus'""")
    assert paths == ["education"]


FAMILY_MARKERS = {
    "rubric": re.compile(r"1-10|1 to 10|reward model"),
    "safe_rewrite": re.compile(r"politically|censor|officially|strict content rules"),
    "reasoning_reconstruction": re.compile(
        r"\n(Final answer|Answer): [^\n]+$|The answer is |already know the final answer"),
}


def test_campaign_prompt_families_follow_the_declared_mix(out: Path):
    prompts = [r[0] for r in query(out, """
        SELECT messages[1].content FROM exchanges JOIN t_accounts USING (account_id)
        WHERE campaign_id = 'lb'""")]
    weights = {"rubric": 0.2, "safe_rewrite": 0.15, "reasoning_reconstruction": 0.2}
    for family, marker in FAMILY_MARKERS.items():
        share = np.mean([bool(marker.search(p)) for p in prompts])
        assert abs(share - weights[family]) < 0.07, (family, share)
    # Paraphrase + template diversity: many distinct wrappers, none dominant.
    openings = {p[:40] for p in prompts}
    assert len(openings) > 50


def test_reasoning_text_exactly_when_reasoning_was_asked_or_cot_on_reasoning_model(out: Path):
    ((asked_without_text, lb_share),) = query(out, """
        SELECT count_if((params.reasoning_effort IS NOT NULL OR params.reasoning_budget
               IS NOT NULL) AND status = 200 AND reasoning_text IS NULL),
               (SELECT avg((reasoning_text IS NOT NULL)::INT) FROM exchanges
                JOIN t_accounts USING (account_id) WHERE campaign_id = 'lb')
        FROM exchanges""")
    assert asked_without_text == 0 and lb_share > 0.6
    ((casual_share,),) = query(out, """
        SELECT avg((reasoning_text IS NOT NULL)::INT) FROM exchanges
        JOIN t_accounts USING (account_id) WHERE population = 'casual'""")
    assert casual_share < 0.15


def test_release_pivot(out: Path):
    ((model, pivot_start, released_at),) = query(out, """
        SELECT pivot_model, pivot_start, (SELECT released_at FROM t_releases)
        FROM t_campaigns WHERE campaign_id = 'pivoter'""")
    assert model == "m-next"
    assert 0 <= (pivot_start - released_at).total_seconds() <= 24 * 3600
    ((before, share_after),) = query(out, f"""
        SELECT count_if(model = 'm-next' AND e.ts < TIMESTAMPTZ '{released_at.isoformat()}'),
               avg((model = 'm-next')::INT) FILTER (WHERE e.ts >= TIMESTAMPTZ
               '{pivot_start.isoformat()}')
        FROM exchanges e JOIN t_exchanges t USING (request_id)
        WHERE t.campaign_id = 'pivoter'""")
    assert before == 0 and 0.35 <= share_after <= 0.65


def test_eval_harness_bursts_after_the_release(out: Path):
    ((burst_share, single_turn, cold, templated),) = query(out, """
        SELECT avg((ts >= (SELECT released_at FROM t_releases) AND ts < (SELECT released_at
               FROM t_releases) + INTERVAL 24 HOUR)::INT), bool_and(len(messages) = 1),
               bool_and(params.temperature = 0),
               avg((messages[1].content LIKE '%step by step%' OR messages[1].content LIKE
               'Complete the following Python function%')::INT)
        FROM exchanges JOIN t_accounts USING (account_id) WHERE population = 'evals'""")
    assert burst_share > 0.7 and single_turn and cold and templated == 1.0


def test_batch_jobs_are_templated_single_turn_and_cold(out: Path):
    ((n, templates, single, cold),) = query(out, """
        SELECT count(*), count(DISTINCT messages[1].content[:40]), bool_and(len(messages) = 1),
               bool_and(params.temperature = 0)
        FROM exchanges JOIN t_accounts USING (account_id) WHERE population = 'batch'""")
    assert n > 300 and templates == 1 and single and cold


def test_agentic_coders_share_one_harness_with_the_coding_campaign(out: Path):
    rows = dict((r[0], r[1:]) for r in query(out, """
        SELECT coalesce(campaign_id, population) g, list(DISTINCT system), max(len(messages)),
               bool_or(list_contains(list_transform(messages, m -> m.role), 'tool')),
               bool_or(list_contains(tools, 'read_file'))
        FROM exchanges JOIN t_accounts USING (account_id)
        WHERE population = 'coders' OR campaign_id = 'pivoter' GROUP BY g"""))
    for group in ("coders", "pivoter"):
        systems, longest, has_tool_turns, declares_tools = rows[group]
        assert AGENT_SYSTEM_PROMPT in systems
        assert longest >= 9 and has_tool_turns and declares_tools


def test_reseller_hydra_mixes_honest_and_attack_traffic_on_the_same_accounts(out: Path):
    ((mixed_accounts, honest_share, population),) = query(out, """
        SELECT count_if(n_attack > 0 AND n_honest > 0), sum(n_honest) / sum(n_attack + n_honest),
               min(population)
        FROM (SELECT account_id, count(t.campaign_id) n_attack,
                     count(*) - count(t.campaign_id) n_honest
              FROM t_exchanges t JOIN t_accounts a USING (account_id)
              WHERE a.campaign_id = 'hydra' GROUP BY account_id)
        JOIN t_accounts USING (account_id)""")
    assert mixed_accounts >= 5 and 0.3 <= honest_share <= 0.5 and population == "attacker"
    ((flagged_ok,),) = query(out, """
        SELECT bool_and(is_attack = (campaign_id IS NOT NULL AND account_id IN
               (SELECT account_id FROM t_exchanges WHERE campaign_id IS NOT NULL)))
        FROM t_accounts""")
    assert flagged_ok


def test_campaign_window_and_late_phase(out: Path):
    rows = query(out, """
        SELECT e.ts::DATE - DATE '2026-03-02' AS day, min(e.ts), count(*),
               avg((e.messages[1].content LIKE '%agent transcript%')::INT)
        FROM exchanges e JOIN t_exchanges t USING (request_id)
        WHERE t.campaign_id = 'mimic' GROUP BY day ORDER BY day""")
    (day0, first, _, trace0), (day1, _, _, trace1) = rows
    assert (day0, day1) == (0, 1)
    assert first.hour >= 12  # start_day 0.5: nothing before noon of day 0
    assert trace0 == 0 and trace1 == 1.0  # the reconstruction phase covers the late window
