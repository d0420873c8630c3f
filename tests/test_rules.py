"""Every rule of every shipped pack, on its own YAML examples, through the ONE compiled database."""

from __future__ import annotations

from pathlib import Path

import pytest

from distillguard.signals import RuleError, default_annotator, load_rule_packs
from distillguard.signals.matcher import RuleMatcher
from distillguard.signals.rules import parse_rule_pack

RULES = [rule for pack in load_rule_packs() for rule in pack.rules]
POSITIVE = [pytest.param(r.id, ex, id=f"{r.id}+{i}") for r in RULES
            for i, ex in enumerate(r.match_examples)]
NEGATIVE = [pytest.param(r.id, ex, id=f"{r.id}-{i}") for r in RULES
            for i, ex in enumerate(r.no_match_examples)]


SCOPE = {r.id: r.scope for r in RULES}


@pytest.fixture(scope="module")
def matchers() -> dict[str, RuleMatcher]:
    annotator = default_annotator()
    return {"prompt": annotator.matcher, "tools": annotator.tool_matcher}


@pytest.mark.parametrize(("rule_id", "example"), POSITIVE)
def test_rule_matches_its_examples(matchers: dict[str, RuleMatcher], rule_id: str,
                                   example: str) -> None:
    assert rule_id in matchers[SCOPE[rule_id]].scan(example)


@pytest.mark.parametrize(("rule_id", "example"), NEGATIVE)
def test_rule_ignores_its_counter_examples(matchers: dict[str, RuleMatcher], rule_id: str,
                                           example: str) -> None:
    assert rule_id not in matchers[SCOPE[rule_id]].scan(example)


def test_every_rule_has_negative_examples_and_a_description() -> None:
    for rule in RULES:
        assert rule.no_match_examples, rule.id
        assert len(rule.description) > 10, rule.id


def test_one_database_per_scope_holds_every_rule(matchers: dict[str, RuleMatcher]) -> None:
    assert {r.id for m in matchers.values() for r in m.rules} == {r.id for r in RULES}
    assert {r.id for r in matchers["prompt"].rules} == {r.id for r in RULES
                                                        if r.scope == "prompt"}
    assert len(RULES) >= 20


GOOD_RULE = """
pack: t
rules:
  - id: t.one
    description: a test rule
    signal: cot
    patterns: ['step by step']
    tests: {match: ['think step by step'], no_match: ['hello']}
"""


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("pack: t\nrules: [", "not valid YAML"),
        ("- just a list", "a rule pack is a mapping"),
        (GOOD_RULE.replace("signal: cot", "signal: accuse"), "signal 'accuse'"),
        (GOOD_RULE.replace("signal: cot", "signal: capability"), "capability must be one of"),
        (GOOD_RULE.replace("    tests: {match: ['think step by step'], no_match: ['hello']}\n",
                           ""), "tests.match"),
        (GOOD_RULE.replace("patterns: ['step by step']", "patterns: []"), "at least one pattern"),
        (GOOD_RULE.replace("signal: cot", "signal: cot\n    flags: [utf16]"), "unknown flags"),
        (GOOD_RULE.replace("    description: a test rule\n", ""), "`description`"),
        (GOOD_RULE.replace("signal: cot", "signal: cot\n    scope: response"), "scope 'response'"),
        (GOOD_RULE.replace("signal: cot", "signal: cot\n    scope: tools"), "only set a capability"),
    ],
)
def test_malformed_packs_are_rejected_with_the_reason(text: str, message: str) -> None:
    with pytest.raises(RuleError, match=message):
        parse_rule_pack(text, "bad.yaml")


def test_duplicate_ids_across_packs_are_rejected(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(GOOD_RULE)
    (tmp_path / "b.yaml").write_text(GOOD_RULE)
    with pytest.raises(RuleError, match=r"t\.one"):
        load_rule_packs([tmp_path])


def test_a_pattern_hyperscan_cannot_compile_is_reported() -> None:
    pack = parse_rule_pack(GOOD_RULE.replace("['step by step']", r"['(a)\1']"))
    with pytest.raises(RuleError, match="Hyperscan"):
        RuleMatcher.from_packs([pack])


def test_a_custom_pack_directory_is_loaded_and_scanned(tmp_path: Path) -> None:
    (tmp_path / "custom.yaml").write_text(GOOD_RULE)
    matcher = RuleMatcher.from_packs(load_rule_packs([tmp_path]))
    assert matcher.scan("Please THINK STEP BY STEP.") == ["t.one"]
    assert matcher.scan("hello") == []
    assert matcher.scan("") == []


def test_compiled_database_is_cached_and_a_corrupt_cache_is_recompiled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DISTILLGUARD_CACHE", str(tmp_path / "cache"))
    pack = parse_rule_pack(GOOD_RULE)
    first = RuleMatcher.from_packs([pack])
    cached = list((tmp_path / "cache").glob("rules-*.hsdb"))
    assert len(cached) == 1
    assert RuleMatcher.from_packs([pack]).scan("step by step") == first.scan("step by step")
    cached[0].write_bytes(b"not a database")
    assert RuleMatcher.from_packs([pack]).scan("step by step") == ["t.one"]
