"""The compiled skeleton (`distillguard.signals._skeleton`, behind `templates.skeleton`) gives
exactly the output of the Python `re` implementation it replaced (`skeleton_reference`):
crafted edge cases of every mask, seeded random texts, every prompt of the lab's built-in
generators, and the public corpora when `../shared/data` is present."""

from __future__ import annotations

import random
import re

import numpy as np
import pyarrow as pa
import pytest

import skeleton_reference as reference
from distillguard.signals import templates
from distillguard.signals.templates import skeleton, template_signatures, text_hash
from test_signals import _skeleton_corpus


def check(texts: list[str]) -> None:
    """Compiled == reference on every text (and, for ASCII texts, == the reference's batch
    path with Arrow hints, which the annotator used before)."""
    bad = [(t, reference.skeleton(t), skeleton(t)) for t in texts
           if skeleton(t) != reference.skeleton(t)]
    assert not bad, f"{len(bad)} of {len(texts)} differ, first: {bad[0]!r}"
    ascii_texts = [t for t in texts if t.isascii()]
    if ascii_texts:
        hints = reference.skeleton_hints(pa.array(ascii_texts)).tolist()
        bad = [t for t, h in zip(ascii_texts, hints, strict=True)
               if reference.skeleton(t, h) != skeleton(t)]
        assert not bad, f"hint path differs: {bad[0]!r}"


LONG = 4000  # templates.SKELETON_HEAD_CHARS + SKELETON_TAIL_CHARS

CRAFTED = {
    "empty and whitespace": ["", " ", "\t\n", "a", "A", "I", "\x00", "a\x00b", " a  b\t\tc \n",
                             "\x1c\x1d\x1e\x1f", "a\x1cb\x1fc", "a\u00a0b", "a\u2028b\u2029c",
                             "a\u3000b", "a\u200bb", "a\x85b", "a\x0bb\x0cc", "\r\n\r\n"],
    "fences": ["```py\nx = 1\n```", "a```b", "```unterminated Anna 42", "``````", "````",
               "```a``` ```b", "x```y```z```w", "`` ` ``", "```\n<q>x</q>\n```",
               "before ```a\n```after```", "```" + "x" * 5000],
    "tags": ["<q>what</q>", "<q>a</q><q>b</q>", "<a><b>x</b></a>", "<a>x</b>", "<a>x", "</a>",
             "<a>x</a", "<" + "a" * 30 + ">x</" + "a" * 30 + ">",
             "<" + "a" * 31 + ">x</" + "a" * 31 + ">", "<é>x</é>", "<a_1>x</a_1>",
             "<a>\n\nx\n</a>", "<q>a</Q>", "<<q>>x</q>", "<q>x</q></q>", "<1>2</1>",
             "<a>x</a> <a>y</a>", "<a>x<a>y</a>", "<q></q>", "<q>x</q >", "< q>x</q>",
             "<a>`b`</a>", "<code>x</code>", "<Anna>Bob</Anna>", "x </ y <a> z </a>"],
    "inline code": ["`a`", "``", "`\n`", "`" + "x" * 300 + "`", "`" + "x" * 301 + "`",
                    "`a` `b`", "`a``b`", "``a``", "`'a'`", "'`a`'", "`a\nb`", "`é`"],
    "urls": ["http://x", "https://x.y/z?q=1&r=2", "http://", "http:// x", "https://",
             "httpss://x", "hhttp://x", "xhttp://y", "http://a\u3000b", "http://a\x1cb",
             "HTTP://x", "www.", "www.x", "wwww.x", "www.http://a", "http://www.a",
             "see http://a.b,c and www.d.e now", "www. x", "www.\u00a0x"],
    "emails": ["a@b.c", "a@b", "a@b.", "a@.c", "@b.c", "a.b+c-d@e-f.g.h", "a@b.c@d.e",
               "a@b.c+d@e.f", "é@ü.ß", "x@y.z.", "a@@b.c", "..@-.-", "a@b_c.d", "+@-.x",
               "a@b-.c", "mail me: first.last@example.co.uk, or x@y.zz", "a @b.c", "a@ b.c"],
    "quotes": ['"a"', '""', '"\n"', '"' + "x" * 500 + '"', '"' + "x" * 501 + '"',
               '"a"b"c"', "“a”", "“a“b”", "“”", "“a\n”", "“" + "x" * 501 + "“y”", "«a»", "«»",
               "«a«b»", "'a'", "''", "it's", "'it's'", "O'Neil", "'a'b", "rock 'n' roll",
               "'x' 'y'", "'" + "x" * 300 + "'", "'" + "x" * 301 + "'", "I'm 'here'",
               "don't 'quote' me", "'é'", "x'y'", "é'y'", "'y'é", "'a'_", "'a'.", '"\'a\'"',
               "'\"a\"'", "\"a 'b' c\"", "“a 'b' c”", "'''", "'a''b'", "x''y'", "‘a’",
               "\"" + "a\"" * 20],
    "dotted": ["foo.bar", "foo.bar()", "a.b.c", "file_0.py", "x.1", "1.x", "_.x", "a._",
               "a..b", "a.b.", ".a.b", "é.a", "a.é", "aé.b", "Foo.Bar", "foo.bar()baz",
               "f.g()()", "return_0.py", "Find 'config.py' and return_0.py: now",
               "return_0.py and a.b", "x.y.z()", "os.path.join(a, b)", "e.g. this",
               "i.e., U.S.A.", "3.14", "v1.2.3", "a.b_c", "a_b.c", "a.B", "A.b"],
    "underscore": ["a_b", "_a", "a_", "__", "_a_", "a__b", "x_1", "é_é", "a_b()",
                   "snake_case_name", "_", "__init__", "1_000", "a_b_"],
    "call": ["f()", "f ()", "f()()", "f(x)", "é()", "()", "a_b()", "getValue()", "Anna()",
             "f().g", "x.f()"],
    "camel": ["getValue", "iPhone", "aB", "abC1", "éB", "getÉ", "get_Value", "ABc", "aBc_d",
              "eBay's", "x1Y", "a\u0130"],
    "names": ["Anna", "Über", "O'Neil", "McDonald", "Anna's", "Anna1", "Anna_b", "THE", "Rate",
              "Rate the Response", "Cafè", "Ab", "AB", "The Theory", "Hello World", "Éric",
              "Annaé", "Anna\u0301", "Yes No Ok", "Jean-Luc", "A B C", "Xx", "Questions",
              "Instructions Instruction", "Summarise Summarize", "I am Anna."],
    "numbers": ["42", "3rd", "1st.", "21st-century", "1,000.50", "12:30", "3/4", "50%", "1th",
                "2nd2", "1stx", "1st_", "٣", "²", "①", "Ⅻ", "1_000", "1.2.3.4", "v1.2", "x1",
                "1a", "١٢٣", "𝟙", "٣rd", "12.%", "1st%", "4th.5", "1/", "7,", "0x1F", "1e5",
                "123456789012345678901234567890", "1 2 3", "a1b2c3", "١st", "3\u0660"],
    "case": ["İstanbul", "ΣΑΣ ΟΔΟΣ", "ẞ", "Ǆ", "ǅ", "ß", "Ω", "ÀÉÎ", "ﬁ", "ΑΣ.", "İ1"],
    "surrogates and emoji": ["\ud800", "a\udfffb", "\ud83d\ude00", "🙂", "👍🏽 ok", "a🙂b",
                             "Anna🙂", "🙂Anna", "1🙂2", "`🙂`", "<🙂>x</🙂>", "'🙂'", "\ud800_a",
                             "a_\udc00"],
    "long": ["x" * 5000, "a " * 3000, "y" * LONG, "y" * (LONG + 1),
             "Anna " * 1000, "```" + "a" * 2998 + "```" + "b" * 2000,
             "a" * 2999 + "\"" + "b" * 100 + "\"" + "c" * 2000,
             "a" * 2990 + "<q>" + "x" * 5 + "</q>" + "z" * 1500,
             "'" + "q" * 2999 + "'" + "r" * 1000, "1" * 4001, "x" * 2999 + "y" * 4000,
             " ".join(f"Word{k} x_{k} http://u/{k} {k}th" for k in range(800))],
}


@pytest.mark.parametrize("kind", sorted(CRAFTED))
def test_crafted_edge_cases(kind: str) -> None:
    check(CRAFTED[kind])


def test_every_crafted_case_inside_prose() -> None:
    texts = [t for cases in CRAFTED.values() for t in cases if len(t) < 600]
    check([f"Please Anna, look at {t} now." for t in texts]
          + [f"{a}{b}" for a in texts[::7] for b in texts[::11]])


PIECES = ["a", "B", "Z", "_", ".", "(", ")", "()", "`", "```", "<q>", "</q>", "<", "/", ">",
          '"', "'", "“", "”", "«", "»", "@", "http://", "https://", "www.", "1", "7", "٣", "²",
          " ", " ", " ", "\n", "\t", "é", "É", "İ", "Σ", "\ud800", "🙂", "%", "st", "th", "nd",
          ":", ",", "-", "+", "Anna", "The", "getValue", "x_1", "\x1c", "\u3000", "\u00a0",
          "foo.bar", "a@b.c", "it's", "O'Neil", "<a>", "</a>", "rd", "x", "y"]


def test_seeded_random_texts() -> None:
    rng = random.Random(20260223)
    texts = ["".join(rng.choice(PIECES) for _ in range(rng.randrange(1, 40)))
             for _ in range(20_000)]
    # random code points too: every plane, surrogates and unassigned ones included
    texts += ["".join(chr(rng.choice([rng.randrange(0x80), rng.randrange(0x80, 0x800),
                                      rng.randrange(0x800, 0x10000),
                                      rng.randrange(0x10000, 0x110000)]))
                      for _ in range(rng.randrange(1, 30))) for _ in range(5_000)]
    texts += ["".join(rng.choice(PIECES) for _ in range(rng.randrange(500, 1500)))
              for _ in range(60)]
    check(texts)


def _generator_prompts(corpus) -> list[str]:
    """Every text of the lab's prompt library (pools and responses) and wrapped prompts of
    every wrapper grammar."""
    from distillguard.lab.prompts import WRAPPERS, PromptLibrary, wrapper_variants

    library = PromptLibrary(corpus, 1)
    texts = library.bank.distinct[1].to_pylist()
    rng = np.random.default_rng(3)
    questions = texts[:: max(1, len(texts) // 400)]
    for name in WRAPPERS:
        for k, (head, middle, tail) in enumerate(wrapper_variants(name, 200, rng)):
            q = questions[k % len(questions)]
            texts.append(head + q + (middle + "42" if middle else "") + tail)
    return list(dict.fromkeys(texts))


def test_every_builtin_generator_prompt() -> None:
    check(_generator_prompts(None))


def test_every_corpus_prompt() -> None:
    from distillguard.lab.prompts import find_corpus, load_corpus

    corpus = find_corpus()
    if corpus is None:
        pytest.skip("no ../shared/data corpus")
    pools, _ = load_corpus(corpus)
    texts = [t for pool in pools.values() for t in pool]
    assert len(texts) > 5_000
    check(list(dict.fromkeys(texts + _generator_prompts(corpus))))


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: the annotator replaces them first
        return False
    return True


def test_template_signatures_hash_the_reference_skeleton() -> None:
    texts = [t for cases in CRAFTED.values() for t in cases if _encodable(t)]
    texts = texts + texts  # above VECTOR_MIN_TEXTS: the vectorised MinHash path
    sigs, lsh = template_signatures(texts)
    expected = [reference.skeleton(t) for t in texts]
    assert sigs == [text_hash(s) if s else None for s in expected]
    assert lsh == templates.lsh_keys_batch([templates.shingles(s) for s in expected])


def test_compiled_token_hash_equals_rensas() -> None:
    from rensa import RMinHash

    from distillguard.signals import _skeleton

    tokens = ["x" * k for k in range(70)] + ["é日🙂 ab", "a b c", "\x00" * 20, "ab" * 100]
    expected = [h for (h,) in RMinHash.hash_token_sets([[t] for t in tokens])]
    assert [_skeleton.token_hash(t.encode()) for t in tokens] == expected


def test_shingle_hashes_are_rensas_hashes_of_the_shingles() -> None:
    from rensa import RMinHash

    from distillguard.signals import _skeleton

    rng = random.Random(11)
    words = ["a", "bb", "<num>", "<name>", "é", "日本", "🙂", "x" * 17, "y" * 40, "z" * 8]
    skeletons = ["", "a", "a b", "a b c", "a b c d", "", "é日 🙂"] + [
        " ".join(rng.choice(words) for _ in range(rng.randrange(1, 30))) for _ in range(500)]
    hashes, offsets, present = _skeleton.shingle_hashes(skeletons, templates.SHINGLE_WORDS)
    assert present.tolist() == [i for i, s in enumerate(skeletons) if s]
    flat = hashes.tolist()
    expected = RMinHash.hash_token_sets([templates.shingles(skeletons[i]) for i in present])
    assert [flat[offsets[k]:offsets[k + 1]] for k in range(len(present))] == \
        [list(row) for row in expected]


def test_compiled_band_keys_equal_the_formula() -> None:
    rng = np.random.default_rng(5)
    digests = rng.integers(0, 2**32, size=(templates.VECTOR_MIN_TEXTS + 3, templates.NUM_PERM),
                           dtype=np.uint64)
    digests[0] = 2**32 - 1
    digests[1] = 0
    multipliers = [pow(0x9E3779B97F4A7C15, k + 1, 1 << 64) | 1 for k in range(templates.LSH_ROWS)]
    expected = []
    for row in digests.tolist():
        keys = []
        for band in range(templates.LSH_BANDS):
            values = row[band * templates.LSH_ROWS:(band + 1) * templates.LSH_ROWS]
            value = sum(v * m for v, m in zip(values, multipliers, strict=True)) % (1 << 64)
            keys.append(f"{band}:{value >> 16:012x}")
        expected.append(keys)
    assert templates._band_keys(digests) == expected
    assert templates._band_keys(digests.tolist()) == expected


def test_reference_hints_and_rewritten_masks_change_nothing() -> None:
    """The reference's batch hints and look-behind / callback forms of the masks give the
    skeletons of the original patterns (moved here from test_signals with the reference)."""
    corpus = _skeleton_corpus()
    check(corpus)
    for original, rewritten in reference.ORIGINAL_PATTERNS:
        assert [re.sub(original, "<m>", t) for t in corpus] == [
            rewritten.sub("<m>", t) for t in corpus], original
    assert [reference._NAME.sub("<name>", t) for t in corpus] == [
        reference._CAPITALISED_WORD.sub(reference._name_or_common, t) for t in corpus]
    # the dotted-id hint is not a necessary condition: it is searched again at its turn
    quoted = "Find 'config.py' and return_0.py: now"
    assert reference.skeleton(quoted, [True] * 6) == reference.skeleton(quoted) == \
        skeleton(quoted)


def test_init_rejects_bad_words() -> None:
    from distillguard.signals import _skeleton

    with pytest.raises(ValueError):
        _skeleton.init(["not capitalised"], 3000, 1000)


def test_threads_share_the_scanner_safely() -> None:
    """The scanner keeps its buffers between calls (the GIL is held for a whole call): threads
    calling it at once get their own texts' skeletons."""
    from concurrent.futures import ThreadPoolExecutor

    texts = [t for cases in CRAFTED.values() for t in cases] * 5
    expected = [reference.skeleton(t) for t in texts]
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(skeleton, texts)) == expected
