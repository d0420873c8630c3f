"""Detection rules as data: YAML rule packs, loaded and validated here.

A rule says which request signal it sets and carries the examples that prove it, so a reviewer can
change detection without touching code and every rule is tested by `tests/test_rules.py`. Rules
*set signals*; they never accuse anyone: the engine judges accounts and campaigns in aggregate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from distillguard.contract import CAPABILITIES

#: Signals a rule may set. `context` rules only record a hit (e.g. an evaluation-harness format)
#: that helps an analyst read the traffic; they set no boolean signal.
RULE_SIGNALS = ("cot", "reasoning_reconstruction", "rubric", "safe_rewrite", "capability", "context")

#: What a rule reads: the user turns ("prompt", the default) or the names of the tools offered and
#: called ("tools": capability evidence such as `run_shell` or `screenshot`).
RULE_SCOPES = ("prompt", "tools")

#: YAML flag names -> Hyperscan flag names (hyperscan.HS_FLAG_*).
RULE_FLAGS = ("caseless", "dotall", "multiline")
#: Rules are case-insensitive unless they list their own flags.
DEFAULT_FLAGS = ("caseless",)


class RuleError(ValueError):
    """A rule pack is malformed; the message names the file and the rule."""


@dataclass(frozen=True)
class Rule:
    """One detection rule: any of `patterns` matching sets `signal` (and `capability`)."""

    id: str
    description: str
    signal: str
    patterns: tuple[str, ...]
    flags: tuple[str, ...] = DEFAULT_FLAGS
    capability: str | None = None
    match_examples: tuple[str, ...] = ()
    no_match_examples: tuple[str, ...] = ()
    pack: str = ""
    scope: str = "prompt"


@dataclass(frozen=True)
class RulePack:
    """A named set of rules loaded from one YAML file."""

    name: str
    description: str
    rules: tuple[Rule, ...] = field(default_factory=tuple)
    source: str = ""


def _require(mapping: dict, key: str, kind: type, where: str) -> object:
    value = mapping.get(key)
    if not isinstance(value, kind) or (isinstance(value, str | list) and not value):
        raise RuleError(f"{where}: `{key}` must be a non-empty {kind.__name__}")
    return value


def _string_list(value: object, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RuleError(f"{where}: expected a string or a list of strings")
    return tuple(value)


def _parse_rule(raw: object, pack: str, where: str) -> Rule:
    if not isinstance(raw, dict):
        raise RuleError(f"{where}: each rule must be a mapping")
    rule_id = str(_require(raw, "id", str, where))
    where = f"{where} rule {rule_id!r}"
    signal = str(_require(raw, "signal", str, where))
    if signal not in RULE_SIGNALS:
        raise RuleError(f"{where}: signal {signal!r} is not one of {', '.join(RULE_SIGNALS)}")
    capability = raw.get("capability")
    if signal == "capability" and capability not in CAPABILITIES:
        raise RuleError(f"{where}: capability must be one of {', '.join(CAPABILITIES)}")
    if signal != "capability" and capability is not None:
        raise RuleError(f"{where}: only capability rules take `capability`")
    scope = raw.get("scope", "prompt")
    if scope not in RULE_SCOPES:
        raise RuleError(f"{where}: scope {scope!r} is not one of {', '.join(RULE_SCOPES)}")
    if scope == "tools" and signal != "capability":
        raise RuleError(f"{where}: tools-scope rules can only set a capability")
    patterns = _string_list(raw.get("patterns", raw.get("pattern")), f"{where} patterns")
    if not patterns:
        raise RuleError(f"{where}: needs at least one pattern")
    flags = _string_list(raw.get("flags", list(DEFAULT_FLAGS)), f"{where} flags")
    unknown = set(flags) - set(RULE_FLAGS)
    if unknown:
        raise RuleError(f"{where}: unknown flags {sorted(unknown)}; known: {RULE_FLAGS}")
    tests = raw.get("tests") or {}
    if not isinstance(tests, dict):
        raise RuleError(f"{where}: `tests` must be a mapping with match / no_match lists")
    match = _string_list(tests.get("match"), f"{where} tests.match")
    if not match:
        raise RuleError(f"{where}: needs at least one `tests.match` example")
    return Rule(
        id=rule_id,
        description=str(_require(raw, "description", str, where)).strip(),
        signal=signal,
        patterns=patterns,
        flags=flags,
        capability=capability,
        match_examples=match,
        no_match_examples=_string_list(tests.get("no_match"), f"{where} tests.no_match"),
        pack=pack,
        scope=scope,
    )


def parse_rule_pack(text: str, source: str = "<string>") -> RulePack:
    """Parse one YAML rule pack; raise RuleError naming `source` and the rule on any problem."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RuleError(f"{source}: not valid YAML: {exc}") from exc
    if not isinstance(doc, dict):
        raise RuleError(f"{source}: a rule pack is a mapping with `pack` and `rules`")
    name = str(_require(doc, "pack", str, source))
    raw_rules = _require(doc, "rules", list, source)
    rules = tuple(
        _parse_rule(raw, name, f"{source} #{i}") for i, raw in enumerate(raw_rules)
    )
    return RulePack(
        name=name, description=str(doc.get("description", "")).strip(), rules=rules, source=source
    )


def builtin_pack_paths() -> list[Path]:
    """The rule packs shipped in `distillguard/signals/rules/`, sorted by name."""
    folder = resources.files("distillguard.signals") / "rules"
    return sorted(Path(str(p)) for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_rule_packs(paths: list[Path] | list[str] | None = None) -> list[RulePack]:
    """Load rule packs (the built-in ones by default; a folder loads every *.yaml in it).

    Rule ids must be unique across all packs, so a hit names exactly one rule.
    """
    files: list[Path] = []
    for entry in [Path(p) for p in paths] if paths is not None else builtin_pack_paths():
        files.extend(sorted(entry.glob("*.yaml")) if entry.is_dir() else [entry])
    packs = [parse_rule_pack(f.read_text(encoding="utf-8"), str(f)) for f in files]
    seen: dict[str, str] = {}
    for pack in packs:
        for rule in pack.rules:
            if rule.id in seen:
                raise RuleError(f"rule id {rule.id!r} is defined in {seen[rule.id]} and {pack.source}")
            seen[rule.id] = pack.source
    return packs
