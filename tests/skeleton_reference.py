"""The template skeleton as it was written with Python `re` (sequential masks), kept only as
the reference the compiled scanner (`distillguard.signals._skeleton`) is tested against.

Copied unchanged from `distillguard/signals/templates.py` before the compiled skeleton
replaced it (commit 2fe1399), with the batch hints (`skeleton_hints`, Arrow RE2) and the
original forms of the rewritten patterns (`ORIGINAL_PATTERNS`)."""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from distillguard.signals.templates import (
    _COMMON_CAPITALISED,
    SKELETON_HEAD_CHARS,
    SKELETON_TAIL_CHARS,
)

_MASKS: tuple[tuple[str, re.Pattern[str], str], ...] = (
    ("```", re.compile(r"```.*?(```|\Z)", re.S), " <code> "),
    ("</", re.compile(r"<(\w{1,30})>.*?</\1>", re.S), r" <\1><data></\1> "),
    ("`", re.compile(r"`[^`\n]{1,300}`"), " <code> "),
    ("http", re.compile(r"https?://\S+"), " <url> "),
    ("www.", re.compile(r"www\.\S+"), " <url> "),
    ("@", re.compile(r"[\w.+-]+@[\w-]+\.[\w.-]+"), " <email> "),
    ('"', re.compile(r'"[^"\n]{1,500}"'), " <q> "),
    ("“", re.compile(r"“[^”\n]{1,500}”"), " <q> "),
    ("«", re.compile(r"«[^»\n]{1,500}»"), " <q> "),
    ("'", re.compile(r"'(?<!\w')[^'\n]{1,300}'(?!\w)"), " <q> "),  # (?<!\w) before the quote
)
_NAME = re.compile(
    r"\b(?=[A-Z])(?!(?:" + "|".join(sorted((w.capitalize() for w in _COMMON_CAPITALISED),
                                           key=len, reverse=True)) + r")\b)[A-Za-z]{2,}\b"
)
_TOKEN_MASKS: tuple[tuple[re.Pattern[str], re.Pattern[str], str], ...] = (
    (re.compile(r"[A-Za-z_]\.[A-Za-z_]"),
     re.compile(r"[A-Za-z_](?<=\b[A-Za-z_])\w*(?:\.[A-Za-z_]\w*)+(?:\(\))?"), "<id>"),
    (re.compile("_"), re.compile(r"\w(?<=\b\w)\w*_\w+\b"), "<id>"),  # literal hints: fast search
    (re.compile(r"\(\)"), re.compile(r"\w(?<=\b\w)\w*\(\)"), "<id>"),
    (re.compile(r"[a-z][A-Z]"), re.compile(r"[a-z](?<=\b[a-z])[a-z]*[A-Z]\w*"), "<id>"),
    (re.compile(r"[A-Z]"), _NAME, "<name>"),
    (re.compile(r"\d"), re.compile(r"\d[\d,._:/]*(?:%|st\b|nd\b|rd\b|th\b)?"), "<num>"),
)
_NAME_INDEX = 4
_CAPITALISED = frozenset(w.capitalize() for w in _COMMON_CAPITALISED)
_CAPITALISED_WORD = re.compile(r"[A-Z](?<=\b[A-Z])[A-Za-z]+\b")


def _name_or_common(match: re.Match[str]) -> str:
    word = match[0]
    return word if word in _CAPITALISED else "<name>"


_HINT_IS_NECESSARY = tuple(k != 0 for k in range(len(_TOKEN_MASKS)))

#: The patterns as first written, before the look-behind rewrites (the same matches).
ORIGINAL_PATTERNS = [
    (r"(?<!\w)'[^'\n]{1,300}'(?!\w)", _MASKS[9][1]),
    (r"\b[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+(?:\(\))?", _TOKEN_MASKS[0][1]),
    (r"\b\w+_\w+\b", _TOKEN_MASKS[1][1]),
    (r"\b\w+\(\)", _TOKEN_MASKS[2][1]),
    (r"\b[a-z]+[A-Z]\w*", _TOKEN_MASKS[3][1]),
]


def skeleton(text: str, hints: Sequence[bool] | None = None) -> str:
    """The prompt with its variable data masked, lower-cased, whitespace collapsed."""
    if len(text) > SKELETON_HEAD_CHARS + SKELETON_TAIL_CHARS:
        text = text[:SKELETON_HEAD_CHARS] + "\n" + text[-SKELETON_TAIL_CHARS:]
    for trigger, pattern, replacement in _MASKS:
        if trigger in text:
            text = pattern.sub(replacement, text)
    for k, (hint, pattern, replacement) in enumerate(_TOKEN_MASKS):
        if hints is None or not _HINT_IS_NECESSARY[k]:
            if (hints is not None and not hints[k]) or not hint.search(text):
                continue
        elif not hints[k]:
            continue
        if k == _NAME_INDEX:
            text = _CAPITALISED_WORD.sub(_name_or_common, text)
        else:
            text = pattern.sub(replacement, text)
    return " ".join(text.split()).lower()


def skeleton_hints(texts: pa.Array) -> np.ndarray:
    """Per ASCII text (rows, len(_TOKEN_MASKS)): whether each token mask's hint occurs in it."""
    out = np.zeros((len(texts), len(_TOKEN_MASKS)), dtype=bool)
    for k, (hint, _, _) in enumerate(_TOKEN_MASKS):
        out[:, k] = pc.match_substring_regex(texts, hint.pattern).to_numpy(zero_copy_only=False)
    return out
