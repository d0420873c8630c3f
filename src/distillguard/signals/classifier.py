"""The learned text classifier: hashed word n-grams + logistic regression.

It scores how much a prompt reads like a *task / benchmark / data-generation* prompt rather than a
person's organic question (see model/MODEL_CARD.md for data, metrics and limits). The artifact is a
small `.npz` of the non-zero coefficients plus the vectorizer settings, so loading it never
unpickles code; `signals train` (distillguard.signals.training) rebuilds it reproducibly.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from itertools import pairwise
from pathlib import Path

import numpy as np
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
        h = murmurhash3_32(feature, seed=0)
        n = self.n_features
        index = (2**31 - 1 - (n - 1)) % n if h == -(2**31) else abs(h) % n
        if len(self) < INDEX_CACHE_ENTRIES:
            self[feature] = index
        return index


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

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        """Probability per text (float64); empty input gives an empty array.

        Scores with the exact feature hashing of scikit-learn's HashingVectorizer (murmurhash3
        of each n-gram, |h| mod n_features, summed counts, l2 norm) but without its per-call
        validation, which costs about a millisecond: too much for the gateway's single
        requests. `tests/test_signals.py` checks it against `self.vectorizer().transform`.
        """
        n_features = int(self.config["n_features"])
        lengths = np.zeros(len(texts), dtype=np.int64)
        indices: list[int] = []
        column_of = self._index.__getitem__
        for row, text in enumerate(texts):
            features = word_ngrams(text[:MAX_CHARS])
            lengths[row] = len(features)
            indices.extend(map(column_of, features))
        rows = np.repeat(np.arange(len(texts)), lengths)
        keys, counts = np.unique(rows * n_features + np.asarray(indices, dtype=np.int64),
                                 return_counts=True)
        key_rows, key_features = np.divmod(keys, n_features)
        counts = counts.astype(np.float64)
        squared_norm = np.bincount(key_rows, weights=counts * counts, minlength=len(texts))
        dot = np.bincount(key_rows, weights=counts * self.weights[key_features],
                          minlength=len(texts))
        logits = np.divide(dot, np.sqrt(squared_norm), out=np.zeros(len(texts)),
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
