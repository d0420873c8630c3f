"""A cheap language guess: Unicode script counts, then stopword sets for Latin-script text.

Deliberately a heuristic (no model in the hot path): it tells the big languages apart well enough
for an account's language mix, not dialects or short mixed-language prompts. Returns an ISO 639-1
code, or None when the text has too few letters to say.
"""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

#: Characters examined: the language of a prompt is clear from its start.
SAMPLE_CHARS = 1000
#: Words of Latin-script text looked up in the stopword sets.
SAMPLE_WORDS = 40

# Non-Latin scripts and the language each one most likely means.
_SCRIPTS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("ja", re.compile(r"[\u3040-\u30ff]")),
    ("ko", re.compile(r"[\uac00-\ud7af\u1100-\u11ff]")),
    ("zh", re.compile(r"[\u4e00-\u9fff\u3400-\u4dbf]")),
    ("ru", re.compile(r"[\u0400-\u04ff]")),
    ("el", re.compile(r"[\u0370-\u03ff]")),
    ("ar", re.compile(r"[\u0600-\u06ff]")),
    ("he", re.compile(r"[\u0590-\u05ff]")),
    ("hi", re.compile(r"[\u0900-\u097f]")),
    ("th", re.compile(r"[\u0e00-\u0e7f]")),
)
_UKRAINIAN = re.compile(r"[іїєґІЇЄҐ]")
_PERSIAN = re.compile(r"[پچژگ]")
_NON_LATIN = re.compile(r"[^\u0000-\u024f\u2000-\u206f]")
_LATIN_LETTER = re.compile(r"[A-Za-z\u00c0-\u024f]")
_WORD = re.compile(r"[a-zà-öø-ÿ]+")

_STOPWORDS: dict[str, frozenset[str]] = {
    lang: frozenset(words.split())
    for lang, words in {
        "en": "the and is are of to in that it for with on this be you what how can do not",
        "es": "el la los las de que y en es por para una un con no se del al como más qué",
        "fr": "le la les des de et est que une un dans pour pas sur qui du au avec ce vous",
        "de": "der die das und ist nicht ein eine zu mit den auf für von sich ich es dem wie",
        "pt": "o os as de que e em um uma para com não por se do da dos das mais é você",
        "it": "il lo la gli le di che e un una per con non si del della sono è come più",
        "nl": "de het een en van is dat niet op te met voor zijn er aan ik je wat hoe",
        "id": "yang dan di ini itu dengan untuk tidak dari ada saya akan pada juga bisa",
        "tr": "ve bir bu da de için ile ne mi çok daha gibi ama olan var ben sen nasıl",
        "pl": "i w nie się na to jest że z do co jak ale tak czy po od dla jestem",
    }.items()
}


_LANGUAGES = tuple(_STOPWORDS)
#: word -> indices (into _LANGUAGES) of the languages it is a stopword of
_STOPWORD_INDEX: dict[str, tuple[int, ...]] = {}
for _i, _lang in enumerate(_LANGUAGES):
    for _word in _STOPWORDS[_lang]:
        _STOPWORD_INDEX[_word] = (*_STOPWORD_INDEX.get(_word, ()), _i)


def _script_language(sample: str) -> str | None:
    """The language a non-Latin script says, if that script dominates the sample."""
    counts = {lang: len(pattern.findall(sample)) for lang, pattern in _SCRIPTS}
    # Japanese mixes kana with Han characters: a little kana is enough to tell it from Chinese.
    if counts["ja"] >= 2 and counts["ja"] * 10 >= counts["zh"]:
        counts["ja"] += counts.pop("zh")
    best_script, best_count = max(counts.items(), key=lambda item: item[1])
    if best_count < max(2, len(_LATIN_LETTER.findall(sample)) // 2):
        return None
    if best_script == "ru" and _UKRAINIAN.search(sample):
        return "uk"
    if best_script == "ar" and _PERSIAN.search(sample):
        return "fa"
    return best_script


def detect_language(text: str) -> str | None:
    """ISO 639-1 guess for `text` (see module docstring for what it can and cannot do)."""
    sample = text[:SAMPLE_CHARS]
    if _NON_LATIN.search(sample):
        script = _script_language(sample)
        if script is not None:
            return script
    words = _WORD.findall(sample.lower(), 0)[:SAMPLE_WORDS]
    if not words:
        return None
    scores = [0] * len(_LANGUAGES)
    for word in words:
        for i in _STOPWORD_INDEX.get(word, ()):
            scores[i] += 1
    best = max(range(len(_LANGUAGES)), key=scores.__getitem__)
    # Latin-script text without stopwords (code, lists of names) is most often English.
    return _LANGUAGES[best] if scores[best] > 0 else "en"


_VOCABULARY = pa.array(list(_STOPWORD_INDEX), pa.string())
#: row i: which languages word i of _VOCABULARY is a stopword of; the last row (no stopword) is 0
_MEMBERSHIP = np.zeros((len(_VOCABULARY) + 1, len(_LANGUAGES)), dtype=np.int64)
for _row, _langs in enumerate(_STOPWORD_INDEX.values()):
    _MEMBERSHIP[_row, list(_langs)] = 1
#: the languages of vocabulary word i: _WORD_LANGUAGES[start[i]:start[i] + count[i]]
_WORD_LANGUAGE_COUNT = _MEMBERSHIP[:-1].sum(axis=1)
_WORD_LANGUAGE_START = np.concatenate([[0], np.cumsum(_WORD_LANGUAGE_COUNT)[:-1]])
_WORD_LANGUAGES = np.nonzero(_MEMBERSHIP[:-1])[1]
_CODES = np.array([*_LANGUAGES, "en", None], dtype=object)
#: byte -> itself lower-cased if it is an ASCII letter, else a space
_LETTER_BYTE = np.full(256, ord(" "), dtype=np.uint8)
for _c in b"abcdefghijklmnopqrstuvwxyz":
    _LETTER_BYTE[_c] = _LETTER_BYTE[_c - 32] = _c


def detect_language_ascii(texts: pa.Array) -> list[str | None]:
    """`detect_language` of each ASCII text, vectorised in Arrow and numpy: ASCII has no
    non-Latin script, so only the stopword vote over the sample's first words remains."""
    sample = pa.concat_arrays([pc.utf8_slice_codeunits(texts, 0, SAMPLE_CHARS)])
    validity, offsets, data = sample.buffers()
    if data is not None:
        letters = pa.py_buffer(_LETTER_BYTE[np.frombuffer(data, dtype=np.uint8)])
        sample = pa.StringArray.from_buffers(len(sample), offsets, letters, validity)
    tokens = pc.ascii_split_whitespace(sample)
    words = pc.list_flatten(tokens)
    keep = pc.greater(pc.binary_length(words), 0)
    words = pc.filter(words, keep)
    rows = pc.filter(pc.list_parent_indices(tokens), keep).to_numpy()
    rank = np.arange(len(rows)) - np.searchsorted(rows, rows)  # position within its text
    first = rank < SAMPLE_WORDS
    words, rows = words.filter(first), rows[first]
    known = pc.fill_null(pc.index_in(words, value_set=_VOCABULARY), len(_VOCABULARY)).to_numpy()
    # One (text, language) count per stopword occurrence and language it belongs to.
    stop = known < len(_VOCABULARY)
    word, stop_rows = known[stop], rows[stop]
    per_word = _WORD_LANGUAGE_COUNT[word]
    ends = np.cumsum(per_word)
    rank = np.arange(int(ends[-1]) if len(ends) else 0) - np.repeat(ends - per_word, per_word)
    language = _WORD_LANGUAGES[np.repeat(_WORD_LANGUAGE_START[word], per_word) + rank]
    scores = np.bincount(np.repeat(stop_rows, per_word) * len(_LANGUAGES) + language,
                         minlength=len(texts) * len(_LANGUAGES)).reshape(len(texts), -1)
    best = scores.argmax(axis=1)  # the first of equal scores, as max() in detect_language
    # code index: the best language, "en" (no stopword at all) or None (no word at all)
    code = np.where(scores[np.arange(len(texts)), best] > 0, best, len(_LANGUAGES))
    code[np.bincount(rows, minlength=len(texts)) == 0] = len(_LANGUAGES) + 1
    return _CODES[code].tolist()
