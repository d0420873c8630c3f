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
from collections.abc import Sequence

import numpy as np
from rensa import RMinHash

from distillguard.signals import _skeleton as _compiled

#: MinHash size and LSH banding: 8 bands of 8 rows gives a match probability of ~0.5 at Jaccard
#: 0.77, ~0.99 at 0.9 and ~0.03 at 0.5 (S-curve 1 - (1 - J^8)^8).
NUM_PERM = 64
LSH_BANDS = 8
LSH_ROWS = NUM_PERM // LSH_BANDS
MINHASH_SEED = 20260223
SHINGLE_WORDS = 3
#: Below this many skeletons the per-text MinHash (`lsh_keys_batch`) is faster.
VECTOR_MIN_TEXTS = 64
_BAND_MULTIPLIERS = np.array(
    [pow(0x9E3779B97F4A7C15, k + 1, 1 << 64) | 1 for k in range(LSH_ROWS)], dtype=np.uint64
)

#: The skeleton is built from the head and tail of a prompt: a template's own words sit at its
#: start and end, and this bounds the cost of very long prompts.
SKELETON_HEAD_CHARS = 3000
SKELETON_TAIL_CHARS = 1000

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
#: Capitalised words that are not common English words are taken to be names (people, places,
#: products): a cheap heuristic, no NER model in the hot path.
_COMMON_CAPITALISED = frozenset(_COMMON_WORDS.split())

# The skeleton is a hand-written scanner in a compiled extension (`_skeleton.pyx`: the masks
# in order, each reading the previous one's output, with Python `re`'s semantics; tested equal
# to the regex implementation it replaced, `tests/skeleton_reference.py`).
_compiled.init([w.capitalize() for w in _COMMON_CAPITALISED], SKELETON_HEAD_CHARS,
               SKELETON_TAIL_CHARS)


def skeleton(text: str) -> str:
    """The prompt with its variable data masked, lower-cased, whitespace collapsed.

    Masked, in this order: fenced code (```...```, an unterminated fence to the end), XML-style
    tagged blocks (`<q>...</q>` -> `<q><data></q>`), inline code, URLs, e-mail addresses,
    quoted strings ("...", “...”, «...», '...'), dotted identifiers (`a.b`, `a.b()`), snake_case,
    `call()`, camelCase, names (capitalised words that are not common words) and numbers. A
    text longer than SKELETON_HEAD_CHARS + SKELETON_TAIL_CHARS is cut to its head and tail."""
    return _compiled.skeleton(text)


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
    for i, row_keys in zip(present, _band_keys(digests), strict=True):
        keys[i] = row_keys
    return keys


def _band_keys(digests: list[list[int]] | np.ndarray) -> list[list[str]]:
    """LSH band keys (`"band:hash"`) of each MinHash digest (NUM_PERM values): one 48-bit key
    per band, a polynomial hash of its rows (uint64 arithmetic wraps), in 12 hex digits."""
    rows = digests.tolist() if isinstance(digests, np.ndarray) else digests
    return _compiled.band_keys(rows, _BAND_MULTIPLIERS.tolist(), LSH_BANDS)


def lsh_keys_of_skeletons(skeletons: Sequence[str]) -> list[list[str]]:
    """`lsh_keys_batch([shingles(s) for s in skeletons])`, vectorised: a shingle of a skeleton
    (single spaces between tokens) is one byte range of its UTF-8 bytes, hashed there by the
    compiled extension with rensa's own token hash (rustc-hash 2's `FxHasher` on the bytes;
    `tests/test_skeleton_compiled.py` checks it against `RMinHash.hash_token_sets`), and the
    flat hash buffer is sketched by one rensa call; no Python string per shingle."""
    if len(skeletons) < VECTOR_MIN_TEXTS:
        return lsh_keys_batch([shingles(s) for s in skeletons])
    keys: list[list[str]] = [[] for _ in skeletons]
    hashes, row_offsets, present = _compiled.shingle_hashes(skeletons, SHINGLE_WORDS)
    if not len(present):
        return keys
    matrix = RMinHash.digest_matrix_from_flat_token_hashes(hashes, row_offsets,
                                                           num_perm=NUM_PERM, seed=MINHASH_SEED)
    for i, row_keys in zip(present.tolist(), _band_keys(matrix.to_rows()), strict=True):
        keys[i] = row_keys
    return keys


def template_signatures(texts: Sequence[str]) -> tuple[list[str | None], list[list[str]]]:
    """`template_sig` and `template_lsh` for each text (None / [] when nothing is left)."""
    skeletons = [_compiled.skeleton(t) for t in texts]
    sigs = [text_hash(s) if s else None for s in skeletons]
    return sigs, lsh_keys_of_skeletons(skeletons)
