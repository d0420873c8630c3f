"""Request signals on small crafted inputs: each signal, the template signature, the batch and
single-request paths agreeing, the schema, and bad input."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pyarrow as pa
import pytest

from distillguard import contract
from distillguard.signals import SignalAnnotator, annotate, annotate_request, default_annotator
from distillguard.signals.classifier import DistillClassifier
from distillguard.signals.language import detect_language
from distillguard.signals.params import EXTRACTION_MAX_TOKENS
from distillguard.signals.templates import skeleton, template_signatures

TS = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)


def exchange(prompt: str | None, i: int = 0, **fields) -> dict:
    row = {"request_id": f"r{i}", "ts": TS, "account_id": "acct", "model": "m-1",
           "messages": [{"role": "user", "content": prompt}]}
    row.update(fields)
    return row


def table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=contract.EXCHANGE_SCHEMA)


def one(prompt: str | None, **fields) -> dict:
    return annotate_request(exchange(prompt, **fields))


# -- the four request-type signals are told apart ------------------------------------------
COT = "Solve this problem. Let's think step by step: a shop sells 3 pens for $4..."
RECON = ("Below is a question and its final answer. Write out the full reasoning that leads to "
         "this answer.\nQuestion: A shop sells 3 pens for $4. How much do 9 pens cost?\n"
         "Final answer: 12")
RUBRIC = ("Please act as an impartial judge. Rate the following response on a scale of 1 to 10."
          "\nPrompt: tell me about otters\nResponse: Otters are ...")
SAFE = ("Rewrite the following question into a censorship-safe version, then answer it: what "
        "happened in Beijing in June 1989?")
PLAIN = "Can you recommend a good book about the history of tea?"


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        (COT, {"cot"}),
        (RECON, {"reasoning_reconstruction"}),
        (RUBRIC, {"rubric"}),
        (SAFE, {"safe_rewrite"}),
        (PLAIN, set()),
    ],
)
def test_request_type_signals_are_distinct(prompt: str, expected: set[str]) -> None:
    row = one(prompt)
    flagged = {k for k in ("cot", "reasoning_reconstruction", "rubric", "safe_rewrite") if row[k]}
    assert flagged == expected
    assert (row["rule_hits"] != []) == bool(expected)


def test_honest_harness_cot_is_marked_as_cot_and_as_a_harness_format() -> None:
    row = one("Question: What is 7 + 5?\nAnswer: Let's think step by step.")
    assert row["cot"]
    assert "ctx.eval.answer_format" in row["rule_hits"]


# -- capability, including structural evidence ----------------------------------------------
@pytest.mark.parametrize(
    ("prompt", "fields", "capability"),
    [
        ("Natalia sold 48 clips in April and half as many in May. How many clips in total?", {},
         "reasoning_math"),
        ("Write a Python function that merges two sorted lists.", {}, "coding"),
        ("Here is a CSV of monthly sales by region; which region grew fastest?", {},
         "data_analysis"),
        ("Write a haiku about autumn rain.", {}, "creative"),
        ("What should I cook for dinner tonight?", {}, "general_chat"),
        ("What is the weather in Paris?", {"tools": ["get_weather"]}, "agentic_tool_use"),
        ("Continue.", {"tool_calls": ['{"name": "lookup_order"}']}, "agentic_tool_use"),
        ("[image] What is shown here?", {}, "computer_use_vision"),
        ("[image] Click the Submit button.", {"tools": ["click", "screenshot"]},
         "computer_use_vision"),
        ("Book the cheapest flight.", {"tools": ["screenshot", "left_click"]},
         "computer_use_vision"),
        ("Fix the login redirect bug.", {"tools": ["read_file", "edit_file", "run_tests"]},
         "coding"),
        ("Continue.", {"tool_calls": ['{"name": "run_shell", "arguments": {}}']}, "coding"),
    ],
)
def test_capability(prompt: str, fields: dict, capability: str) -> None:
    assert capability in contract.CAPABILITIES
    assert one(prompt, **fields)["capability"] == capability


# -- extraction-friendly parameters ----------------------------------------------------------
@pytest.mark.parametrize(
    ("params", "expected"),
    [
        (None, False),
        ({"temperature": 0.7, "max_tokens": 1024, "n": 1, "logprobs": False}, False),
        ({"n": 4}, True),
        ({"logprobs": True}, True),
        ({"max_tokens": EXTRACTION_MAX_TOKENS}, True),
        ({"max_tokens": EXTRACTION_MAX_TOKENS - 1}, False),
    ],
)
def test_extraction_params(params: dict | None, expected: bool) -> None:
    row = exchange(PLAIN, params=params)
    assert annotate_request(row)["extraction_params"] is expected
    assert annotate(table([row]))["extraction_params"][0].as_py() is expected


# -- template signatures -----------------------------------------------------------------------
def test_prompts_differing_only_in_data_share_the_template_signature() -> None:
    a = ('Maya has 12 apples and gives 5 to Kenji. How many are left? Use "exact" values, '
         "see https://a.example/x and call parse_input() on `foo.bar`.")
    b = ('Omar has 310 apples and gives 77 to Elena. How many are left? Use "rounded" values, '
         "see https://b.example/y and call read_rows() on `baz.qux`.")
    assert skeleton(a) == skeleton(b)
    assert one(a)["template_sig"] == one(b)["template_sig"]
    assert one(a)["template_sig"] != one(PLAIN)["template_sig"]


def test_near_duplicates_share_lsh_keys_and_unrelated_prompts_do_not() -> None:
    base = ("You are grading model outputs for a preference dataset. Read the instruction and "
            "the candidate response, then rate the response for helpfulness, honesty and "
            "harmlessness, give a one-paragraph justification and finish with a line of the "
            "form SCORE: n. Be strict and consistent across items.")
    near = base.replace("Be strict and consistent", "Be strict, fair and consistent")
    unrelated = ("My grandmother's garden has roses, tomatoes and a small pond with goldfish; "
                 "what plants would attract more butterflies in early summer without harming "
                 "the fish or the vegetables that grow there?")
    _, keys = template_signatures([base, near, unrelated])
    assert len(keys[0]) == 8
    assert set(keys[0]) & set(keys[1])
    assert not set(keys[0]) & set(keys[2])


def test_system_hash_ignores_dates_and_is_null_without_a_system_prompt() -> None:
    a = one(PLAIN, system="You are Forge, a coding agent. Today is 2026-03-01.")
    b = one(PLAIN, system="You are Forge, a coding agent. Today is 2026-03-02.")
    assert a["system_hash"] == b["system_hash"] is not None
    assert one(PLAIN)["system_hash"] is None
    assert one(PLAIN, system="   ")["system_hash"] is None


# -- language and classifier ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("How do I make my tomatoes grow faster this summer?", "en"),
        ("¿Cuál es la mejor manera de aprender a programar en casa?", "es"),
        ("Quelle est la différence entre un crocodile et un alligator ?", "fr"),
        ("Wie kann ich meine Steuererklärung online machen, und ist das sicher?", "de"),
        ("Как приготовить борщ?", "ru"),
        ("如何学习编程?", "zh"),
        ("日本の首都はどこですか?", "ja"),
        ("서울에서 가장 좋은 식당은 어디인가요?", "ko"),
        ("12345 67890", None),
    ],
)
def test_language(text: str, code: str | None) -> None:
    assert detect_language(text) == code


def test_vectorised_language_equals_the_per_text_guess() -> None:
    from distillguard.signals.language import SAMPLE_CHARS, SAMPLE_WORDS, detect_language_ascii

    texts = ["How do I make my tomatoes grow faster?", "Donde esta la casa de la playa y el mar",
             "", " \n", "12345 67890", "THE The the", "de la the and", "x" * (SAMPLE_CHARS + 10),
             "word " * SAMPLE_WORDS + "de la de la de la", "dog " * 300 + "le la les des",
             "snake_case camelCase a1b2 il lo la"]
    expected = [detect_language(t) if t.strip() else None for t in texts]
    assert detect_language_ascii(pa.array(texts)) == expected


def test_classifier_separates_task_prompts_from_organic_ones() -> None:
    task = one("Janet's ducks lay 16 eggs per day. She eats three for breakfast and bakes "
               "muffins with four. How many eggs does she sell? Let's think step by step.")
    organic = one("hey, my cat keeps scratching the sofa, any idea how to stop her?")
    assert 0.0 <= organic["distill_score"] < 0.5 < task["distill_score"] <= 1.0


def test_classifier_artifact_is_small_and_loads_without_pickle() -> None:
    from distillguard.signals.classifier import default_artifact_path

    path = default_artifact_path()
    assert path.stat().st_size < 2 * 2**20
    model = DistillClassifier.load(path)
    assert model.weights.shape == (model.config["n_features"],)
    assert "roc_auc" in model.metadata["metrics"]
    assert (path.parent / "MODEL_CARD.md").exists()


def test_without_a_classifier_the_score_is_null_and_the_rest_works() -> None:
    annotator = SignalAnnotator(load_classifier=False)
    row = annotator.annotate_request(exchange(COT))
    assert row["distill_score"] is None and row["cot"]


# -- the batch and single-request paths agree; schema ------------------------------------------
MIXED = [
    exchange(COT, 0, params={"n": 2}, system="sys A"),
    exchange(RECON, 1, tools=["calculator"]),
    exchange(RUBRIC, 2),
    exchange(SAFE, 3, params={"logprobs": True, "max_tokens": 100}),
    exchange(PLAIN, 4, system=""),
    exchange(COT, 5),  # repeated text
    exchange(None, 6),
    {**exchange("x", 7), "messages": []},
    {**exchange("x", 8), "messages": [{"role": "system", "content": "only a system turn"},
                                      {"role": "assistant", "content": "hi"},
                                      {"role": "user", "content": "first"},
                                      {"role": "tool", "content": "out"},
                                      {"role": "user", "content": "second"}]},
    exchange("Привет! Как дела? 你好", 9, tool_calls=[]),
    exchange("Fix the bug.", 10, tools=["read_file", None], tool_calls=["run_shell"]),
    exchange("Go on.", 11, tools=["screenshot"], tool_calls=[None]),
]


def test_annotate_equals_annotate_request_row_by_row() -> None:
    batch = annotate(table(MIXED)).to_pylist()
    assert [r["request_id"] for r in batch] == [r["request_id"] for r in MIXED]
    for row, expected in zip(MIXED, batch, strict=True):
        single = annotate_request(row)
        assert single.keys() == expected.keys()
        for key in expected:
            assert single[key] == expected[key], (row["request_id"], key)


def test_batch_path_in_worker_processes_equals_a_fresh_single_request_path(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The batch path (vectorised classifier, worker processes) and the per-request path of
    another annotator (empty cache: nothing is shared) give the same signals."""
    import importlib

    # the module, not the package's `annotate` function of the same name
    monkeypatch.setattr(importlib.import_module("distillguard.signals.annotate"),
                        "PARALLEL_MIN_TEXTS", 1)
    rows = [*MIXED, exchange("Let's think step by step. " + "filler " * 20_000 + "Rate it.", 12),
            exchange("Für die Übersetzung: explain `x_1` in 3 steps, Anna.", 13)]
    reference = default_annotator()
    batch_side = SignalAnnotator(reference.packs, reference.classifier, workers=2)
    single_side = SignalAnnotator(reference.packs, reference.classifier)
    try:
        batch = batch_side.annotate(table(rows)).to_pylist()
    finally:
        batch_side.close()
    for row, expected in zip(rows, batch, strict=True):
        assert single_side.annotate_request(row) == expected, row["request_id"]


def test_output_conforms_to_the_signal_schema() -> None:
    out = annotate(table(MIXED))
    assert out.schema == contract.SIGNAL_SCHEMA
    assert out.num_rows == len(MIXED)
    assert contract.conform(out, contract.SIGNAL_SCHEMA).equals(out)
    assert set(out["capability"].to_pylist()) <= set(contract.CAPABILITIES)
    assert out["prompt_chars"].to_pylist()[8] == len("first\nsecond")
    assert out["depth"].to_pylist() == [
        None if r.get("messages") is None else len(r["messages"]) for r in MIXED]


def test_record_batches_and_sliced_chunked_tables_keep_row_order() -> None:
    full = table(MIXED)
    expected = annotate(full)
    batch = full.to_batches()[0]
    assert annotate(batch).equals(expected)
    sliced = pa.concat_tables([full.slice(0, 3), full.slice(3)]).slice(2, 6)
    assert annotate(sliced).equals(expected.slice(2, 6))


def test_empty_batch() -> None:
    out = annotate(table([]))
    assert out.num_rows == 0 and out.schema == contract.SIGNAL_SCHEMA


# -- bad input never crashes ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "row",
    [
        exchange(None),
        exchange(""),
        {**exchange("x"), "messages": None},
        {**exchange("x"), "messages": [None, "not a dict", {"role": None, "content": 3}]},
        exchange("a" * (3 << 20)),
        exchange("\ud800 lone surrogate \x00 NUL"),
        exchange("🙂" * 1000),
        exchange("ثم " * 5000 + "Let's think step by step."),
        {"messages": [{"role": "user", "content": "only messages"}]},
    ],
    ids=["none-content", "empty", "no-messages", "junk-messages", "huge", "surrogate", "emoji",
         "long-rtl", "only-messages"],
)
def test_bad_input_never_crashes(row: dict) -> None:
    out = annotate_request(row)
    assert set(out) == set(contract.SIGNAL_SCHEMA.names)
    assert out["capability"] in contract.CAPABILITIES


def test_huge_prompt_in_a_batch_is_annotated_on_its_head_and_tail() -> None:
    prompt = "Let's think step by step. " + "filler " * 300_000 + " Rate it on a scale of 1 to 10."
    row = annotate(table([exchange(prompt)])).to_pylist()[0]
    assert row["cot"] and row["rubric"]
    assert row["prompt_chars"] == len(prompt)


def test_missing_required_columns_are_named() -> None:
    with pytest.raises(ValueError, match="'messages'"):
        annotate(pa.table({"request_id": ["r"], "account_id": ["a"], "ts": [TS], "model": ["m"]}))


def test_the_cache_does_not_change_results() -> None:
    annotator = default_annotator()
    first = annotator.annotate_request(exchange(RUBRIC))
    assert annotator.annotate_request(exchange(RUBRIC)) == first
    fresh = SignalAnnotator(annotator.packs, annotator.classifier)
    assert fresh.annotate_request(exchange(RUBRIC)) == first


def test_shared_corpora_prompts_annotate(shared_data: Path) -> None:
    import json

    lines = (shared_data / "tasks" / "gsm8k_train.jsonl").read_text().splitlines()[:200]
    rows = [exchange(json.loads(line)["question"], i) for i, line in enumerate(lines)]
    out = annotate(table(rows))
    capabilities = out["capability"].to_pylist()
    assert capabilities.count("reasoning_math") / len(rows) > 0.8


def test_fast_analyzer_yields_exactly_scikit_learns_features() -> None:
    from sklearn.feature_extraction.text import HashingVectorizer

    from distillguard.signals.classifier import VECTORIZER_CONFIG, make_vectorizer

    reference = HashingVectorizer(ngram_range=(1, 2), lowercase=True, alternate_sign=False,
                                  norm="l2", n_features=VECTORIZER_CONFIG["n_features"])
    docs = [COT, RECON, "Ünïcödé WORDS, a b cc dd_ee 12 345", "", "x"]
    difference = make_vectorizer().transform(docs) - reference.transform(docs)
    assert abs(difference).max() < 1e-6


def test_vectorised_murmurhash_equals_scikit_learns() -> None:
    import random

    import numpy as np
    from sklearn.utils import murmurhash3_32

    from distillguard.signals.classifier import murmurhash3_32_array

    rng = random.Random(3)
    alphabet = "ab_ 0Zé你🙂"
    words = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 30)))
             for _ in range(3000)] + ["", "a", "ab", "abc", "abcd", "abcde"]
    strings = pa.array(words).slice(1)  # a sliced array: buffers start at an offset
    expected = np.array([murmurhash3_32(w, seed=0) for w in words[1:]], dtype=np.int32)
    assert (murmurhash3_32_array(strings) == expected).all()


def test_vectorised_scoring_equals_the_per_text_scoring() -> None:
    classifier = DistillClassifier.load()
    texts = [COT, RECON, RUBRIC, SAFE, PLAIN, "", "a", "x_1 y_2 Z3", "word " * 2000]
    assert (classifier.predict_proba_ascii(pa.array(texts))
            == classifier.predict_proba(texts)).all()
    # one text at a time (the gateway's path) gives the same values too
    assert [classifier.predict_proba([t])[0] for t in texts] == classifier.predict_proba(
        texts).tolist()


def test_fast_scoring_matches_the_scikit_learn_pipeline() -> None:
    import numpy as np

    model = default_annotator().classifier
    docs = [COT, RECON, RUBRIC, SAFE, PLAIN, "", "a", "Ünïcödé " * 50, "word " * 5000]
    logits = model.vectorizer().transform([d[:4000] for d in docs]) @ model.weights
    expected = 1 / (1 + np.exp(-(logits + model.intercept)))
    assert np.allclose(model.predict_proba(docs), expected, atol=1e-5)
    assert model.predict_proba([]).shape == (0,)


def _tiny_corpus(root: Path) -> Path:
    """A miniature ../shared/data layout (same file formats) for a fast training run."""
    import gzip
    import json

    (root / "organic").mkdir(parents=True)
    (root / "tasks").mkdir()
    (root / "tool_use").mkdir()
    chats = ["how do I keep basil alive indoors", "any tips for a first date", "why is the sky "
             "blue", "what should I name my cat", "is coffee bad for you", "best way to learn "
             "guitar as an adult", "my landlord won't fix the heating, what can I do"]
    (root / "organic" / "oasst_prompt_lottery_en_250.jsonl").write_text(
        "\n".join(json.dumps(c) for c in chats))
    (root / "organic" / "arena_hard_v0.1.jsonl").write_text("\n".join(
        json.dumps({"uid": f"u{i}", "prompt": f"{c}? I'm asking for a friend"})
        for i, c in enumerate(chats)))
    with gzip.open(root / "organic" / "hh_rlhf_harmless_base_test.jsonl.gz", "wt") as fh:
        for c in chats:
            fh.write(json.dumps({"chosen": f"\n\nHuman: {c}\n\nAssistant: sure\n\nHuman: thanks"
                                           "\n\nAssistant: ok"}) + "\n")
    (root / "tasks" / "gsm8k_train.jsonl").write_text("\n".join(
        json.dumps({"question": f"Sam has {i} apples and buys {i + 3} more. How many apples "
                                "does Sam have?", "answer": f"{i}+{i + 3}\n#### {2 * i + 3}"})
        for i in range(20)))
    (root / "tool_use" / "bfcl_v4_simple_python.json").write_text("\n".join(
        json.dumps({"id": f"s{i}", "question": [[{"role": "user", "content":
                    f"Find the area of a triangle with base {i} and height {i + 1}."}]]})
        for i in range(10)))
    return root


def test_training_is_reproducible_and_writes_artifact_and_card(tmp_path: Path) -> None:
    import numpy as np

    from distillguard.signals.training import train, write_artifacts

    data = _tiny_corpus(tmp_path / "data")
    first = train(data, seed=7, per_family=10)
    second = train(data, seed=7, per_family=10)
    assert np.array_equal(first.classifier.weights, second.classifier.weights)
    assert first.n_test > 0 and "roc_auc" in first.metrics
    artifact, card = write_artifacts(first, tmp_path / "model", data)
    loaded = DistillClassifier.load(artifact)
    assert np.allclose(loaded.predict_proba([COT, PLAIN]),
                       first.classifier.predict_proba([COT, PLAIN]), atol=1e-2)
    text = card.read_text()
    assert "ROC AUC" in text and "gsm8k" in text and "Alpaca" in text


# -- vectorised template signatures: the same values as the per-text code -------------------
def _skeleton_corpus() -> list[str]:
    import random

    rng = random.Random(7)
    words = ["the", "Anna", "x_1", "foo.bar()", "getValue", "42", "3rd", "'config.py'",
             "\"quoted text\"", "https://e.x/a", "a@b.co", "<q>what</q>", "`code`", "Über",
             "naïve", "日本語", "return_0.py:", "Let's", "it's", "O'Neil", "call()", "x.y.z",
             "```py\nprint(1)\n```", "www.site.org", "Rate", "THE", "Theory", "\t", "\n", "é" * 9]
    texts = ["", " ", "a", "a b", "a b c", "a b c d", "x" * 40, "y " * 3000 + "end"]
    texts += [" ".join(rng.choice(words) for _ in range(rng.randrange(1, 60)))
              for _ in range(300)]
    return texts


def test_vectorised_lsh_keys_equal_the_per_text_minhash() -> None:
    from distillguard.signals.templates import (
        VECTOR_MIN_TEXTS,
        lsh_keys_batch,
        lsh_keys_of_skeletons,
        shingles,
    )

    skeletons = [skeleton(t) for t in _skeleton_corpus()]
    assert len(skeletons) >= VECTOR_MIN_TEXTS
    assert lsh_keys_of_skeletons(skeletons) == lsh_keys_batch([shingles(s) for s in skeletons])
    assert lsh_keys_of_skeletons(skeletons[:5]) == lsh_keys_batch(
        [shingles(s) for s in skeletons[:5]])


def test_vectorised_band_keys_equal_the_formatted_ones() -> None:
    import numpy as np

    from distillguard.signals import templates

    digests = np.random.default_rng(5).integers(0, 2**32, size=(templates.VECTOR_MIN_TEXTS + 3,
                                                                templates.NUM_PERM),
                                                dtype=np.uint64)
    vectorised = templates._band_keys(digests)
    assert vectorised == [row for chunk in range(0, len(digests), 8)
                          for row in templates._band_keys(digests[chunk:chunk + 8])]


def test_pipelined_stream_equals_batch_by_batch_annotate(monkeypatch: pytest.MonkeyPatch) -> None:
    """`annotate_stream` (next batch's texts in the workers while this one is handed back,
    texts shared with the batch in flight taken from it) gives `annotate`'s tables."""
    import importlib

    monkeypatch.setattr(importlib.import_module("distillguard.signals.annotate"),
                        "PARALLEL_MIN_TEXTS", 1)
    rows = [exchange(f"Task {i % 7}: rate answer {i % 5} for Anna, step by step", i)
            for i in range(60)]
    rows += [*MIXED, exchange("x_1 " * 30, 99)]
    batches = [table(rows[k:k + 16]) for k in range(0, len(rows), 16)]
    reference = default_annotator()
    expected = [SignalAnnotator(reference.packs, reference.classifier).annotate(b)
                for b in batches]
    streaming = SignalAnnotator(reference.packs, reference.classifier, workers=2)
    try:
        got = list(streaming.annotate_stream(iter(batches)))
        again = list(streaming.annotate_stream(batches))  # all cached now
    finally:
        streaming.close()
    assert len(got) == len(expected)
    for a, b, c in zip(got, expected, again, strict=True):
        assert a.equals(b) and c.equals(b)


def test_worker_processes_exit_when_their_parent_is_killed(tmp_path) -> None:
    """A scan killed by a signal never shuts its worker pool down; the workers must not
    outlive it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "parent.py"
    script.write_text(
        "import importlib, sys, time\n"
        "import pyarrow as pa\n"
        "from distillguard.signals import SignalAnnotator\n"
        "mod = importlib.import_module('distillguard.signals.annotate')\n"
        "mod.PARALLEL_MIN_TEXTS = 1\n"
        "if __name__ == '__main__':\n"
        "    a = SignalAnnotator(workers=2)\n"
        "    from datetime import datetime, UTC\n"
        "    from distillguard import contract\n"
        "    rows = [{'request_id': f'r{i}', 'ts': datetime(2026, 1, 1, tzinfo=UTC),\n"
        "             'account_id': 'acct', 'model': 'm-1',\n"
        "             'messages': [{'role': 'user', 'content': f'Solve {i} step by step'}]}\n"
        "            for i in range(50)]\n"
        "    a.annotate(pa.Table.from_pylist(rows, schema=contract.EXCHANGE_SCHEMA))\n"
        "    print(' '.join(str(p) for p in a._pool._processes), flush=True)\n"
        "    time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    workers: list[int] = []
    try:
        workers = [int(p) for p in parent.stdout.readline().split()]
        assert workers
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 15
        alive = workers
        while alive and time.monotonic() < deadline:
            time.sleep(0.2)
            alive = [p for p in alive if _running(p)]
        assert not alive, f"workers {alive} outlived their parent"
    finally:
        parent.kill()
        for p in workers:
            if _running(p):
                os.kill(p, signal.SIGKILL)


def _running(pid: int) -> bool:
    """Whether `pid` is a live process (not a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False
