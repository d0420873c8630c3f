"""The learned text classifier: hashed word n-grams + logistic regression.

It scores how much a prompt reads like a *task / benchmark / data-generation* prompt rather than a
person's organic question (see model/MODEL_CARD.md for data, metrics and limits). The artifact is a
small `.npz` of the non-zero coefficients plus the vectorizer settings, so loading it never
unpickles code; `signals train` (distillguard.signals.training) rebuilds it reproducibly.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from importlib import resources
from itertools import pairwise
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from sklearn.feature_extraction.text import HashingVectorizer
from sklearn.utils import murmurhash3_32

ARTIFACT_NAME = "distill_classifier.npz"

#: Vectorizer settings: fixed here and stored in the artifact, checked on load.
VECTORIZER_CONFIG = {
    "n_features": 2**18,
    "ngram_range": [1, 2],
    "alternate_sign": False,
    "norm": "l2",
    "lowercase": True,
}
#: Characters of a prompt the classifier reads (the start carries the style; caps the cost).
MAX_CHARS = 4000


_WORD = re.compile(r"(?u)\b\w\w+\b")  # scikit-learn's default token_pattern


def word_ngrams(doc: str) -> list[str]:
    """Lower-cased word uni- and bigrams, exactly the features HashingVectorizer's built-in
    analyzer yields for VECTORIZER_CONFIG, in one list comprehension instead of its generic
    n-gram loop (about twice as fast; `tests/test_signals.py` checks they are identical)."""
    tokens = _WORD.findall(doc.lower())
    return tokens + [f"{a} {b}" for a, b in pairwise(tokens)]


#: N-grams whose hashed column is remembered (Zipf: a small vocabulary covers most of the text).
INDEX_CACHE_ENTRIES = 500_000


class _FeatureIndex(dict):
    """n-gram -> column, as scikit-learn's FeatureHasher computes it (murmurhash3, |h| mod n),
    memoised: a dict hit costs a fraction of a murmurhash call through scikit-learn's wrapper."""

    def __init__(self, n_features: int):
        super().__init__()
        self.n_features = n_features

    def __missing__(self, feature: str) -> int:
        # scikit-learn special-cases h == -2**31 ((2**31 - n) mod n): that is |h| mod n too
        index = abs(murmurhash3_32(feature, seed=0)) % self.n_features
        if len(self) < INDEX_CACHE_ENTRIES:
            self[feature] = index
        return index


#: byte -> itself lower-cased if it is an ASCII word character (`\\w`: [0-9A-Za-z_]), else a space
_WORD_BYTE = np.full(256, ord(" "), dtype=np.uint8)
for _c in b"0123456789_abcdefghijklmnopqrstuvwxyz":
    _WORD_BYTE[_c] = _c
for _c in b"ABCDEFGHIJKLMNOPQRSTUVWXYZ":
    _WORD_BYTE[_c] = _c + 32


def _word_chars(texts: pa.Array) -> pa.Array:
    """ASCII texts lower-cased with every non-word character made a space: splitting that on
    whitespace gives `re.findall(r"\\w+", text.lower())` (plus empty strings)."""
    texts = pa.concat_arrays([texts])  # own buffers, offset 0
    validity, offsets, data = texts.buffers()
    if data is None:
        return texts
    mapped = pa.py_buffer(_WORD_BYTE[np.frombuffer(data, dtype=np.uint8)])
    return pa.StringArray.from_buffers(len(texts), offsets, mapped, validity)


_C1, _C2 = np.uint32(0xCC9E2D51), np.uint32(0x1B873593)


def _rotl(x: np.ndarray, r: int) -> np.ndarray:
    return (x << np.uint32(r)) | (x >> np.uint32(32 - r))


def _fmix(h: np.ndarray) -> np.ndarray:
    h ^= h >> np.uint32(16)
    h *= np.uint32(0x85EBCA6B)
    h ^= h >> np.uint32(13)
    h *= np.uint32(0xC2B2AE35)
    h ^= h >> np.uint32(16)
    return h


def murmurhash3_32_array(strings: pa.Array) -> np.ndarray:
    """MurmurHash3_x86_32 (seed 0) of each string's UTF-8 bytes as signed int32: exactly
    `sklearn.utils.murmurhash3_32`, for a whole Arrow array at numpy speed. Strings are sorted
    by block count so that the k-th round works on a prefix (the strings that still have a k-th
    4-byte block)."""
    strings = pa.concat_arrays([strings.cast(pa.large_binary())])  # offset 0, int64 offsets
    num = len(strings)
    if num == 0:
        return np.zeros(0, dtype=np.int32)
    offsets = np.frombuffer(strings.buffers()[1], dtype=np.int64, count=num + 1)
    data = np.frombuffer(strings.buffers()[2] or b"\0", dtype=np.uint8)
    data = np.concatenate([data, np.zeros(4, dtype=np.uint8)])  # room for the last tail read
    # words[i] = the little-endian uint32 at byte i (overlapping, unaligned view: one gather).
    words = np.ndarray((len(data) - 3,), dtype="<u4", buffer=data, strides=(1,))
    lengths = np.diff(offsets)
    key = -(lengths // 4)
    if key.min() > np.iinfo(np.int16).min:  # n-grams: numpy's stable sort is a radix sort here
        key = key.astype(np.int16)
    order = np.argsort(key, kind="stable")
    starts, lengths = offsets[:-1][order], lengths[order]
    blocks = lengths // 4
    h = np.zeros(num, dtype=np.uint32)
    with np.errstate(over="ignore"):
        alive = np.searchsorted(-blocks, -np.arange(1, int(blocks[0]) + 1), side="right")
        for k, m in enumerate(alive.tolist()):
            hk = _rotl(h[:m] ^ (_rotl(words[starts[:m] + 4 * k] * _C1, 15) * _C2), 13)
            h[:m] = hk * np.uint32(5) + np.uint32(0xE6546B64)
        tail_len = lengths % 4
        at = starts + 4 * blocks
        tail = np.zeros(num, dtype=np.uint32)
        for j in (2, 1, 0):
            has = tail_len > j
            tail[has] |= data[at[has] + j].astype(np.uint32) << np.uint32(8 * j)
        has = tail_len > 0
        h[has] ^= _rotl(tail[has] * _C1, 15) * _C2
        h ^= lengths.astype(np.uint32)
        h = _fmix(h)
    out = np.empty(num, dtype=np.int32)
    out[order] = h.view(np.int32)
    return out


def hashed_columns(strings: pa.Array, n_features: int) -> np.ndarray:
    """FeatureHasher's column (int64) of every string of an Arrow array (`_FeatureIndex`)."""
    return np.abs(murmurhash3_32_array(strings).astype(np.int64)) % n_features


def make_vectorizer(config: dict | None = None) -> HashingVectorizer:
    """The HashingVectorizer used both to train and to score (stateless: nothing to fit)."""
    cfg = dict(VECTORIZER_CONFIG if config is None else config)
    if list(cfg.pop("ngram_range")) != [1, 2] or not cfg.pop("lowercase"):
        raise ValueError(f"unsupported vectorizer settings {config}: retrain the classifier")
    return HashingVectorizer(analyzer=word_ngrams, dtype=np.float32, **cfg)


def default_artifact_path() -> Path:
    return Path(str(resources.files("distillguard.signals") / "model" / ARTIFACT_NAME))


@dataclass
class DistillClassifier:
    """Linear model over hashed n-grams; `predict_proba(texts)` gives P(task-style prompt)."""

    weights: np.ndarray  # dense, float32, one per hashed feature
    intercept: float
    config: dict
    metadata: dict

    def __post_init__(self) -> None:
        self._vectorizer = make_vectorizer(self.config)
        self._index = _FeatureIndex(int(self.config["n_features"]))

    def __getstate__(self) -> dict:
        # Worker processes get the model, not the (large, rebuildable) n-gram memo.
        return {k: getattr(self, k) for k in ("weights", "intercept", "config", "metadata")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.__post_init__()

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        """Probability per text (float64); empty input gives an empty array.

        Scores with the exact feature hashing of scikit-learn's HashingVectorizer (murmurhash3
        of each n-gram, |h| mod n_features, summed counts, l2 norm) but without its per-call
        validation, which costs about a millisecond: too much for the gateway's single
        requests. `tests/test_signals.py` checks it against `self.vectorizer().transform`.
        """
        lengths = np.zeros(len(texts), dtype=np.int64)
        indices: list[int] = []
        column_of = self._index.__getitem__
        for row, text in enumerate(texts):
            features = word_ngrams(text[:MAX_CHARS])
            lengths[row] = len(features)
            indices.extend(map(column_of, features))
        if len(texts) == 1:
            return self._score_one(indices)
        rows = np.repeat(np.arange(len(texts)), lengths)
        return self._score(rows, np.asarray(indices, dtype=np.int64), len(texts))

    def _score_one(self, columns: list[int]) -> np.ndarray:
        """`_score` of one text (a live request) without numpy's per-call overheads of
        unique and bincount on a hundred items: the same sums in the same order (ascending
        column, from 0.0), so the same float64 values; the logistic is left to numpy."""
        counts = Counter(columns)
        dot, squared_norm = 0.0, 0.0
        weights = self.weights
        for column in sorted(counts):
            count = float(counts[column])
            squared_norm += count * count
            dot += count * float(weights[column])
        logit = dot / math.sqrt(squared_norm) if squared_norm > 0 else 0.0
        return 1.0 / (1.0 + np.exp(-(np.array([logit]) + self.intercept)))

    def predict_proba_ascii(self, texts: pa.Array) -> np.ndarray:
        """`predict_proba` for an Arrow array of ASCII texts, vectorised: words split in Arrow,
        n-grams joined in Arrow, murmurhash3 in numpy."""
        tokens = pc.ascii_split_whitespace(_word_chars(pc.utf8_slice_codeunits(texts, 0, MAX_CHARS)))
        flat = pc.list_flatten(tokens)
        keep = pc.greater_equal(pc.binary_length(flat), 2)  # \b\w\w+\b: runs of 2 or more
        unigrams = pc.filter(flat, keep)
        rows = pc.filter(pc.list_parent_indices(tokens), keep).to_numpy()
        pairs = np.flatnonzero(rows[1:] == rows[:-1])
        # Each distinct n-gram is hashed once (Zipf: far fewer distinct than occurrences).
        encoded = pc.dictionary_encode(unigrams)
        words = encoded.dictionary
        ids = encoded.indices.to_numpy().astype(np.int64)
        pair_ids = pc.dictionary_encode(pa.array(ids[pairs] * len(words) + ids[pairs + 1]))
        first, second = np.divmod(pair_ids.dictionary.to_numpy(), len(words))
        bigrams = pc.binary_join_element_wise(words.take(first), words.take(second), " ")
        n = int(self.config["n_features"])
        columns = np.concatenate([hashed_columns(words, n)[ids],
                                  hashed_columns(bigrams, n)[pair_ids.indices.to_numpy()]])
        return self._score(np.concatenate([rows, rows[pairs]]), columns, len(texts))

    def _score(self, rows: np.ndarray, columns: np.ndarray, num_texts: int) -> np.ndarray:
        """Probabilities from the (text, feature column) pair of every n-gram occurrence."""
        n_features = int(self.config["n_features"])
        keys, counts = np.unique(rows * n_features + columns, return_counts=True)
        key_rows, key_features = np.divmod(keys, n_features)
        counts = counts.astype(np.float64)
        squared_norm = np.bincount(key_rows, weights=counts * counts, minlength=num_texts)
        dot = np.bincount(key_rows, weights=counts * self.weights[key_features],
                          minlength=num_texts)
        logits = np.divide(dot, np.sqrt(squared_norm), out=np.zeros(num_texts),
                           where=squared_norm > 0) + self.intercept
        return 1.0 / (1.0 + np.exp(-logits))

    def vectorizer(self) -> HashingVectorizer:
        """The scikit-learn vectorizer this model was trained with."""
        return self._vectorizer

    def save(self, path: Path) -> None:
        """Write the artifact: non-zero coefficients (float16) + settings as JSON."""
        nonzero = np.flatnonzero(self.weights).astype(np.int32)
        np.savez_compressed(
            path,
            indices=nonzero,
            values=self.weights[nonzero].astype(np.float16),
            intercept=np.array([self.intercept], dtype=np.float64),
            config=np.array(json.dumps(self.config)),
            metadata=np.array(json.dumps(self.metadata)),
        )

    @classmethod
    def load(cls, path: Path | None = None) -> DistillClassifier:
        """Load an artifact written by `save` (no pickle: `allow_pickle=False`)."""
        path = default_artifact_path() if path is None else Path(path)
        with np.load(path, allow_pickle=False) as data:
            config = json.loads(str(data["config"]))
            weights = np.zeros(int(config["n_features"]), dtype=np.float32)
            weights[data["indices"]] = data["values"].astype(np.float32)
            return cls(
                weights=weights,
                intercept=float(data["intercept"][0]),
                config=config,
                metadata=json.loads(str(data["metadata"])),
            )
