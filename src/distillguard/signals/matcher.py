"""All rules of all packs compiled to ONE Hyperscan block-mode database, scanned once per text.

One scan costs about the same for 10 rules or 1,000, which is what lets rule packs grow without
slowing the engine or the gateway.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import threading
from collections.abc import Sequence
from pathlib import Path

import hyperscan

from distillguard.signals.rules import Rule, RuleError, RulePack

_HS_FLAGS = {
    "caseless": hyperscan.HS_FLAG_CASELESS,
    "dotall": hyperscan.HS_FLAG_DOTALL,
    "multiline": hyperscan.HS_FLAG_MULTILINE,
}
# Every pattern reports at most once per scan. Patterns are ASCII and texts are scanned as UTF-8
# bytes WITHOUT HS_FLAG_UTF8: with it, bounded repeats such as `.{0,400}` become multi-byte
# automata that take minutes to compile, and ASCII rules gain nothing from it.
_BASE_FLAGS = hyperscan.HS_FLAG_SINGLEMATCH


def _pattern_flags(rule: Rule) -> int:
    flags = _BASE_FLAGS
    for name in rule.flags:
        flags |= _HS_FLAGS[name]
    return flags


def cache_dir() -> Path:
    """Where compiled databases are kept: $DISTILLGUARD_CACHE, else ~/.cache/distillguard."""
    return Path(os.environ.get("DISTILLGUARD_CACHE") or Path.home() / ".cache" / "distillguard")


def _compiled(expressions: list[bytes], flags: list[int]) -> hyperscan.Database:
    """Compile the patterns into one block-mode database, reusing a serialized copy when the
    same patterns were compiled before (compiling takes seconds; loading, milliseconds: this is
    what every Spark worker, gateway and CLI process would otherwise pay at start)."""
    key = hashlib.blake2b(digest_size=16)
    key.update(f"hyperscan {hyperscan.__version__} {platform.machine()}".encode())
    for expression, flag in zip(expressions, flags, strict=True):
        key.update(len(expression).to_bytes(4, "little") + expression + flag.to_bytes(4, "little"))
    path = cache_dir() / f"rules-{key.hexdigest()}.hsdb"
    with contextlib.suppress(OSError, hyperscan.error):
        return hyperscan.loadb(path.read_bytes(), mode=hyperscan.HS_MODE_BLOCK)
    db = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
    try:
        db.compile(expressions=expressions, ids=list(range(len(expressions))), flags=flags)
    except hyperscan.error as exc:
        raise RuleError(f"rules do not compile for Hyperscan: {exc}") from exc
    with contextlib.suppress(OSError):  # a read-only home only costs the compile next time
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(hyperscan.dumpb(db))
        tmp.replace(path)
    return db


class RuleMatcher:
    """Compiled rule set: `scan(text)` returns the ids of the rules that match, in rule order."""

    def __init__(self, rules: Sequence[Rule]):
        self.rules: tuple[Rule, ...] = tuple(rules)
        expressions: list[bytes] = []
        pattern_rule: list[int] = []
        flags: list[int] = []
        for index, rule in enumerate(self.rules):
            for pattern in rule.patterns:
                expressions.append(pattern.encode("utf-8"))
                pattern_rule.append(index)
                flags.append(_pattern_flags(rule))
        self._pattern_rule = pattern_rule
        self._db = _compiled(expressions, flags) if expressions else None
        self._local = threading.local()

    @classmethod
    def from_packs(cls, packs: Sequence[RulePack], scope: str = "prompt") -> RuleMatcher:
        """The rules of `packs` that read `scope` (see rules.RULE_SCOPES)."""
        return cls([rule for pack in packs for rule in pack.rules if rule.scope == scope])

    def _scratch(self) -> hyperscan.Scratch:
        # Hyperscan scratch space is not thread-safe: one per thread (the gateway is threaded).
        scratch = getattr(self._local, "scratch", None)
        if scratch is None:
            scratch = self._local.scratch = hyperscan.Scratch(self._db)
        return scratch

    def scan_indices(self, text: str) -> list[int]:
        """Indices (into `self.rules`) of the rules matching `text`, sorted, without repeats."""
        if self._db is None or not text:
            return []
        hits: set[int] = set()
        pattern_rule = self._pattern_rule

        def on_match(pattern_id: int, _start: int, _end: int, _flags: int, _ctx: object) -> None:
            hits.add(pattern_rule[pattern_id])

        data = text.encode("utf-8", errors="replace")
        self._db.scan(data, match_event_handler=on_match, scratch=self._scratch())
        return sorted(hits)

    def scan(self, text: str) -> list[str]:
        """Ids of the rules matching `text`, in rule order."""
        return [self.rules[i].id for i in self.scan_indices(text)]
