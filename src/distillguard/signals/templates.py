"""Template signatures: a prompt's skeleton (data masked) hashed, plus MinHash/LSH band keys.

Distillers fill one prompt template with many questions, numbers and names. Masking the parts that
vary (numbers, names, code identifiers, quoted or fenced data, URLs, e-mail addresses) leaves the
skeleton the operator wrote; its hash is `template_sig`, shared by every fill of a template. The
MinHash (rensa) of the skeleton's word shingles, cut into LSH bands, gives `template_lsh`: prompts
whose skeletons are near-duplicates (Jaccard ≳ 0.75) share at least one band key with high
probability, unrelated prompts almost never do.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

import numpy as np
from rensa import RMinHash

#: MinHash size and LSH banding: 8 bands of 8 rows gives a match probability of ~0.5 at Jaccard
#: 0.77, ~0.99 at 0.9 and ~0.03 at 0.5 (S-curve 1 - (1 - J^8)^8).
NUM_PERM = 64
LSH_BANDS = 8
LSH_ROWS = NUM_PERM // LSH_BANDS
MINHASH_SEED = 20260223
SHINGLE_WORDS = 3
_BAND_MULTIPLIERS = np.array(
    [pow(0x9E3779B97F4A7C15, k + 1, 1 << 64) | 1 for k in range(LSH_ROWS)], dtype=np.uint64
)

#: The skeleton is built from the head and tail of a prompt: a template's own words sit at its
#: start and end, and this bounds the cost of very long prompts.
SKELETON_HEAD_CHARS = 3000
SKELETON_TAIL_CHARS = 1000

# (trigger, pattern, replacement): a mask is only tried when its trigger substring occurs (cheap
# `in` tests skip most regexes on most prompts). Order matters: blocks of data first (they may
# contain numbers and names), then single tokens.
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
    ("'", re.compile(r"(?<!\w)'[^'\n]{1,300}'(?!\w)"), " <q> "),
)
_COMMON_WORDS = """a about above after again against all also an and any are as at be because been before
    being below between both but by can could did do does doing down during each few for from
    further had has have having he her here hers herself him himself his how i if in into is it its
    itself just let me more most my myself no nor not now of off on once only or other our ours out
    over own same she should so some such than that the their theirs them then there these they
    this those through to too under until up very was we were what when where which while who whom
    why will with would you your yours yourself yourselves yes ok okay hi hello hey dear please
    thanks thank write solve explain describe give list provide generate create make find tell show
    answer question questions rate compare evaluate summarize summarise translate rewrite rephrase
    imagine consider assume suppose given calculate compute determine prove use act pretend step
    steps task instructions instruction note context example examples input output response
    responses assistant user system human final problem solution option options true false none
    first second third next finally also however therefore thus one two three
"""
_COMMON_CAPITALISED = frozenset(_COMMON_WORDS.split())


# Token masks, applied with literal replacements (C speed, no per-token Python callback), each
# only when a cheap `search` hint shows it can match. Capitalised words that are not common
# English words are taken to be names (people, places, products): a cheap heuristic, no NER
# model in the hot path.
_NAME = re.compile(
    r"\b(?=[A-Z])(?!(?:" + "|".join(sorted((w.capitalize() for w in _COMMON_CAPITALISED),
                                           key=len, reverse=True)) + r")\b)[A-Za-z]{2,}\b"
)
_TOKEN_MASKS: tuple[tuple[re.Pattern[str], re.Pattern[str], str], ...] = (
    (re.compile(r"[A-Za-z_]\.[A-Za-z_]"),
     re.compile(r"\b[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+(?:\(\))?"), "<id>"),
    (re.compile("_"), re.compile(r"\b\w+_\w+\b"), "<id>"),  # literal hints: fast search
    (re.compile(r"\(\)"), re.compile(r"\b\w+\(\)"), "<id>"),
    (re.compile(r"[a-z][A-Z]"), re.compile(r"\b[a-z]+[A-Z]\w*"), "<id>"),
    (re.compile(r"[A-Z]"), _NAME, "<name>"),
    (re.compile(r"\d"), re.compile(r"\d[\d,._:/]*(?:%|st\b|nd\b|rd\b|th\b)?"), "<num>"),
)


def skeleton(text: str) -> str:
    """The prompt with its variable data masked, lower-cased, whitespace collapsed."""
    if len(text) > SKELETON_HEAD_CHARS + SKELETON_TAIL_CHARS:
        text = text[:SKELETON_HEAD_CHARS] + "\n" + text[-SKELETON_TAIL_CHARS:]
    for trigger, pattern, replacement in _MASKS:
        if trigger in text:
            text = pattern.sub(replacement, text)
    for hint, pattern, replacement in _TOKEN_MASKS:
        if hint.search(text):
            text = pattern.sub(replacement, text)
    return " ".join(text.split()).lower()


def _hex_hash(data: bytes, size: int = 8) -> str:
    return hashlib.blake2b(data, digest_size=size).hexdigest()


def text_hash(text: str) -> str:
    """Stable 64-bit hex hash of a text (template_sig, system_hash)."""
    return _hex_hash(text.encode("utf-8", errors="replace"))


def shingles(skel: str) -> list[str]:
    """Word shingles of a skeleton (the whole token list if it is shorter than one shingle)."""
    tokens = skel.split()
    if len(tokens) <= SHINGLE_WORDS:
        return [" ".join(tokens)] if tokens else []
    grams = zip(*(tokens[k:] for k in range(SHINGLE_WORDS)), strict=False)
    return [" ".join(gram) for gram in grams]


def lsh_keys_batch(shingle_sets: Sequence[list[str]]) -> list[list[str]]:
    """LSH band keys (`"band:hash"`) of the MinHash of each shingle set; [] for an empty set."""
    keys: list[list[str]] = [[] for _ in shingle_sets]
    present = [i for i, s in enumerate(shingle_sets) if s]
    if not present:
        return keys
    # One sketch object per text: rensa's batch call spins up a thread pool per call, which
    # costs milliseconds for a single request and measured slower here even for batches.
    digests = []
    for i in present:
        sketch = RMinHash(num_perm=NUM_PERM, seed=MINHASH_SEED)
        sketch.update(shingle_sets[i])
        digests.append(sketch.digest())
    bands = np.asarray(digests, dtype=np.uint64).reshape(len(present), LSH_BANDS, LSH_ROWS)
    # One 48-bit key per band: a polynomial hash of its rows (uint64 arithmetic wraps).
    band_hash = (bands * _BAND_MULTIPLIERS).sum(axis=2, dtype=np.uint64) >> np.uint64(16)
    for row, i in enumerate(present):
        keys[i] = [f"{band}:{value:012x}" for band, value in enumerate(band_hash[row].tolist())]
    return keys


def template_signatures(texts: Sequence[str]) -> tuple[list[str | None], list[list[str]]]:
    """`template_sig` and `template_lsh` for each text (None / [] when nothing is left)."""
    skeletons = [skeleton(t) for t in texts]
    sigs = [text_hash(s) if s else None for s in skeletons]
    return sigs, lsh_keys_batch([shingles(s) for s in skeletons])
