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
from itertools import chain

import numpy as np
import pyarrow as pa
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
    for i, row_keys in zip(present, _band_keys(np.asarray(digests, dtype=np.uint64)),
                           strict=True):
        keys[i] = row_keys
    return keys


_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
_KEY_CHARS = 2 + 12  # "band:" + 12 hex digits of a 48-bit band hash
_NIBBLE_SHIFTS = np.arange(44, -1, -4, dtype=np.uint64)


def _band_keys(digests: np.ndarray) -> list[list[str]]:
    """LSH band keys (`"band:hash"`) of each row of a (rows, NUM_PERM) matrix of MinHash
    values."""
    bands = digests.astype(np.uint64).reshape(len(digests), LSH_BANDS, LSH_ROWS)
    # One 48-bit key per band: a polynomial hash of its rows (uint64 arithmetic wraps).
    band_hash = (bands * _BAND_MULTIPLIERS).sum(axis=2, dtype=np.uint64) >> np.uint64(16)
    if len(digests) < VECTOR_MIN_TEXTS:
        return [[f"{band}:{value:012x}" for band, value in enumerate(row)]
                for row in band_hash.tolist()]
    # Every key has the same width: format them all at once as bytes, then slice one string.
    chars = np.empty((len(digests), LSH_BANDS, _KEY_CHARS), dtype=np.uint8)
    chars[:, :, 0] = ord("0") + np.arange(LSH_BANDS, dtype=np.uint8)
    chars[:, :, 1] = ord(":")
    chars[:, :, 2:] = _HEX[(band_hash[:, :, None] >> _NIBBLE_SHIFTS) & np.uint64(15)]
    text = chars.tobytes().decode("ascii")
    width = LSH_BANDS * _KEY_CHARS
    return [[text[at + k: at + k + _KEY_CHARS] for k in range(0, width, _KEY_CHARS)]
            for at in range(0, len(text), width)]


# rensa's token hash (`utils::calculate_hash_fast`: rustc-hash 2's FxHasher::write + finish on
# the token's UTF-8 bytes), reproduced in numpy so that a batch's shingles are hashed without
# building one Python string per shingle. `tests/test_signals.py` checks it against
# `RMinHash.hash_token_sets`.
_FX_SEED1 = np.uint64(0x243F6A8885A308D3)
_FX_SEED2 = np.uint64(0x13198A2E03707344)
_FX_ZERO_COLLAPSE = np.uint64(0xA4093822299F31D0)
_FX_K = np.uint64(0xF1357AEA2E62A9C5)
_LOW32 = np.uint64(0xFFFFFFFF)
_U32 = np.uint64(32)


def _multiply_mix(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(x * y as 128 bits): low half XOR high half, from 32-bit limbs (numpy has no u128)."""
    x0, x1, y0, y1 = x & _LOW32, x >> _U32, y & _LOW32, y >> _U32
    p01, p10 = x0 * y1, x1 * y0
    carry = ((x0 * y0 >> _U32) + (p01 & _LOW32) + (p10 & _LOW32)) >> _U32
    high = x1 * y1 + (p01 >> _U32) + (p10 >> _U32) + carry
    return (x * y) ^ high


def rensa_hashes(data: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """rensa's u64 hash of each byte range `data[start:start + length]` (`data`: uint8, with
    at least 8 readable bytes after every range, e.g. zero padding)."""
    starts, lengths = starts.astype(np.int64), lengths.astype(np.int64)
    # u64 / u32 little-endian words at every byte offset (overlapping, unaligned views).
    u64 = np.ndarray((len(data) - 7,), dtype="<u8", buffer=data, strides=(1,))
    u32 = np.ndarray((len(data) - 3,), dtype="<u4", buffer=data, strides=(1,))
    n = len(starts)
    s0 = np.full(n, _FX_SEED1, dtype=np.uint64)
    s1 = np.full(n, _FX_SEED2, dtype=np.uint64)
    ends = starts + lengths
    with np.errstate(over="ignore"):
        big = (lengths >= 8) & (lengths <= 16)
        s0[big] ^= u64[starts[big]]
        s1[big] ^= u64[ends[big] - 8]
        mid = (lengths >= 4) & (lengths < 8)
        s0[mid] ^= u32[starts[mid]].astype(np.uint64)
        s1[mid] ^= u32[ends[mid] - 4].astype(np.uint64)
        small = (lengths > 0) & (lengths < 4)
        lo = data[starts[small]].astype(np.uint64)
        s0[small] ^= lo
        s1[small] ^= (data[ends[small] - 1].astype(np.uint64) << np.uint64(8)) | data[
            starts[small] + lengths[small] // 2].astype(np.uint64)
        # Longer than 16 bytes: 16-byte rounds, then the last 16 bytes.
        long_rows = np.flatnonzero(lengths > 16)
        if len(long_rows):
            rounds = (lengths[long_rows] - 1) // 16
            order = np.argsort(-rounds, kind="stable")
            long_rows, rounds = long_rows[order], rounds[order]
            a, b = s0[long_rows], s1[long_rows]
            at = starts[long_rows]
            alive = np.searchsorted(-rounds, -np.arange(1, int(rounds[0]) + 1), side="right")
            for k, m in enumerate(alive.tolist()):
                off = at[:m] + 16 * k
                t = _multiply_mix(a[:m] ^ u64[off], _FX_ZERO_COLLAPSE ^ u64[off + 8])
                a[:m], b[:m] = b[:m], t
            tail = ends[long_rows] - 16
            s0[long_rows] = a ^ u64[tail]
            s1[long_rows] = b ^ u64[tail + 8]
        compressed = _multiply_mix(s0, s1) ^ lengths.astype(np.uint64)
        h = compressed * _FX_K
        return (h << np.uint64(26)) | (h >> np.uint64(38))


def lsh_keys_of_skeletons(skeletons: Sequence[str]) -> list[list[str]]:
    """`lsh_keys_batch([shingles(s) for s in skeletons])`, vectorised: a shingle of a skeleton
    (single spaces between tokens) is one byte range of it, so shingle ranges are found on
    the skeletons' UTF-8 buffer, hashed in numpy (`rensa_hashes`) and sketched by one rensa
    call on the flat hash buffer; no Python string per shingle."""
    if len(skeletons) < VECTOR_MIN_TEXTS:
        return lsh_keys_batch([shingles(s) for s in skeletons])
    column = pa.array(skeletons, pa.large_string())
    offsets = np.frombuffer(column.buffers()[1], dtype=np.int64, count=len(column) + 1)
    raw = column.buffers()[2]
    body = np.frombuffer(raw, dtype=np.uint8, count=int(offsets[-1])) if raw is not None \
        else np.zeros(0, dtype=np.uint8)
    data = np.concatenate([body, np.zeros(8, dtype=np.uint8)])
    lengths = np.diff(offsets)
    present = np.flatnonzero(lengths > 0)
    keys: list[list[str]] = [[] for _ in skeletons]
    if not len(present):
        return keys
    # Token i of the batch spans [token_start[i], token_end[i]); tokens never cross skeletons.
    spaces = np.flatnonzero(body == 32)
    row_starts, row_ends = offsets[present], offsets[present + 1]
    token_start = np.sort(np.concatenate([row_starts, spaces + 1]))
    token_end = np.sort(np.concatenate([spaces, row_ends]))
    token_row = np.searchsorted(row_starts, token_start, side="right") - 1
    tokens_per_row = np.bincount(token_row, minlength=len(present))
    first_token = np.concatenate([[0], np.cumsum(tokens_per_row)[:-1]])
    # Shingle j of a row starts at its token j and ends at token j + SHINGLE_WORDS - 1; a row
    # with no more than SHINGLE_WORDS tokens has one shingle, the whole skeleton.
    shingles_per_row = np.maximum(tokens_per_row - (SHINGLE_WORDS - 1), 1)
    shingle_row = np.repeat(np.arange(len(present)), shingles_per_row)
    row_offsets = np.zeros(len(present) + 1, dtype=np.uint64)
    np.cumsum(shingles_per_row, out=row_offsets[1:])
    rank = np.arange(len(shingle_row)) - row_offsets[:-1].astype(np.int64)[shingle_row]
    first = first_token[shingle_row] + rank
    last = np.minimum(first + SHINGLE_WORDS - 1, first_token[shingle_row]
                      + tokens_per_row[shingle_row] - 1)
    starts = token_start[first]
    hashes = rensa_hashes(data, starts, token_end[last] - starts)
    matrix = RMinHash.digest_matrix_from_flat_token_hashes(hashes, row_offsets,
                                                           num_perm=NUM_PERM, seed=MINHASH_SEED)
    digests = np.fromiter(chain.from_iterable(matrix.to_rows()), dtype=np.uint32,
                          count=len(present) * NUM_PERM).reshape(len(present), NUM_PERM)
    for i, row_keys in zip(present.tolist(), _band_keys(digests), strict=True):
        keys[i] = row_keys
    return keys


def template_signatures(texts: Sequence[str]) -> tuple[list[str | None], list[list[str]]]:
    """`template_sig` and `template_lsh` for each text (None / [] when nothing is left)."""
    skeletons = [_compiled.skeleton(t) for t in texts]
    sigs = [text_hash(s) if s else None for s in skeletons]
    return sigs, lsh_keys_of_skeletons(skeletons)
