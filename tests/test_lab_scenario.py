"""Scenario files: presets merge, bad input fails with a message naming the key, scaling."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from distillguard.lab.scenario import ScenarioError, list_scenarios, load_scenario
from test_lab_simulate import TINY, write_scenario


@pytest.mark.parametrize("name", ["smoke", "standard", "seeds-2026"])
def test_shipped_scenarios_load(name: str):
    sc = load_scenario(name)
    assert sc.releases, "every scenario has at least one release event"
    assert sc.campaigns and sc.populations


def test_seeds_2026_has_the_reported_campaigns_and_honest_majority():
    sc = load_scenario("seeds-2026")
    assert {c["kind"] for c in sc.campaigns.values()} == {
        "reasoning_extraction", "agentic_capabilities", "agentic_coding_at_scale",
        "reseller_hydra", "long_campaign"}
    sizes = {c["kind"]: c["exchanges"] for c in sc.campaigns.values()}
    assert sizes["reasoning_extraction"] == 150_000 and sizes["long_campaign"] == 28_800_000
    assert sc.campaigns["long_campaign"]["accounts"] == 25_000
    attack_accounts = sum(c["accounts"] for c in sc.campaigns.values())
    honest_accounts = sum(p["accounts"] for p in sc.populations.values())
    assert honest_accounts >= 20 * attack_accounts


def test_presets_merge_and_overrides_win():
    sc = load_scenario("smoke")
    batch = sc.populations["batch_job"]
    assert batch["volume"]["median"] == 1500  # file
    assert batch["params"]["temperature"] == {"0.0": 1.0}  # preset
    assert batch["error_rate"] == 0.004  # default
    assert sc.campaigns["code-1"]["pivot"]["share"] == 0.5


def test_scale_multiplies_accounts_and_exchanges_not_days():
    full, tenth = load_scenario("standard"), load_scenario("standard", scale=0.1)
    assert tenth.days == full.days
    assert tenth.campaigns["rex"]["exchanges"] == full.campaigns["rex"]["exchanges"] // 10
    assert tenth.populations["casual_chat"]["accounts"] == 600
    assert tenth.populations["batch_job"]["accounts"] >= 1


def _broken(tmp_path: Path, mutate) -> Path:
    data = copy.deepcopy(TINY)
    mutate(data)
    return write_scenario(tmp_path, data, "broken")


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda d: d["campaigns"]["lb"].update(accountz=3), "campaigns.lb.accountz: unknown knob"),
    (lambda d: d["campaigns"]["lb"].update(kind="nope"), "campaigns.lb.kind"),
    (lambda d: d["campaigns"]["lb"]["ip"].update(strategy="tor"), "campaigns.lb.ip.strategy"),
    (lambda d: d["campaigns"]["lb"].update(families={"cot": 1, "dance": 1}),
     "families.dance: unknown"),
    (lambda d: d["campaigns"]["lb"].update(paraphrase_rate=1.5), "paraphrase_rate"),
    (lambda d: d["campaigns"]["lb"].update(exchanges=0), "lb.exchanges"),
    (lambda d: d["populations"]["office"].update(models={"galactic": 1}), "models"),
    (lambda d: d["populations"]["office"].update(weekly=[1, 1]), "weekly"),
    (lambda d: d.update(days=0), "days"),
    (lambda d: d.update(start="2026-01-01T00:00:00"), "time zone"),
    (lambda d: d["releases"][0].update(at_day=9), "releases[0].at_day"),
    (lambda d: d.update(colour="blue"), "unknown top-level"),
    (lambda d: d["populations"].update(lb={"kind": "casual_chat"}), "differ"),
])
def test_bad_scenarios_fail_with_the_key(tmp_path: Path, mutate, message: str):
    with pytest.raises(ScenarioError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_scenario(_broken(tmp_path, mutate))


def test_unknown_name_and_bad_yaml(tmp_path: Path):
    with pytest.raises(ScenarioError, match="shipped"):
        load_scenario("definitely-not-a-scenario")
    bad = tmp_path / "bad.yaml"
    bad.write_text("days: [1,\n")
    with pytest.raises(ScenarioError, match="not valid YAML"):
        load_scenario(bad)
    with pytest.raises(ScenarioError, match="scale"):
        load_scenario("smoke", scale=0)
    assert "smoke" in list_scenarios()
