"""Reproducible training of the shipped classifier (`distillguard signals train`).

Data (all from ../shared/data, see its README; Alpaca is CC BY-NC and is NOT used):
- task-style (label 1): GSM8K questions, BFCL tool-use user turns, and prompts of both kinds and of
  organic users wrapped in distillation-style templates generated here (CoT, reasoning
  reconstruction, rubric / preference, safe rewrite, bulk data generation);
- organic (label 0): Open Assistant prompt lottery, Arena-Hard questions, hh-rlhf human turns.

The split is by source record (every variant of one record falls on the same side) and by
template (half the templates are only seen at test time), so the held-out metrics measure
generalisation to new prompts AND new wrappers, not memorised ones.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from distillguard.signals.classifier import (
    MAX_CHARS,
    VECTORIZER_CONFIG,
    DistillClassifier,
    make_vectorizer,
)

SEED = 20260223
TEST_FRACTION = 0.2
#: Inverse regularisation strength of the logistic regression.
C = 4.0
#: Coefficients smaller than this are dropped from the artifact (keeps it small; measured effect
#: on the held-out metrics is reported in the model card).
PRUNE_BELOW = 0.02

#: Distillation-style wrappers ({q} = the prompt, {a} = an answer). Written for training; the
#: second half of each family is held out (only seen at test time).
TEMPLATES: dict[str, list[str]] = {
    "cot": [
        "{q}\n\nLet's think step by step.",
        "Solve the following problem. Show all of your reasoning before the final answer.\n\n{q}",
        "Think carefully and explain each step of your reasoning.\nQuestion: {q}",
        "Provide a complete chain of thought, then the answer.\n{q}",
        "{q}\nReason through this step-by-step and put the final answer on the last line.",
        "Work through this task methodically, writing out every intermediate step:\n{q}",
    ],
    "reconstruction": [
        "Question: {q}\nFinal answer: {a}\nWrite out the full reasoning that leads to this answer.",
        "Here is a problem and its correct answer. Explain step by step how to reach it.\n"
        "Problem: {q}\nAnswer: {a}",
        "{q}\nThe answer is {a}. Reconstruct the reasoning behind it in detail.",
        "Given the task below and the reference solution's result ({a}), produce the thought "
        "process that arrives at it.\n\nTask: {q}",
    ],
    "rubric": [
        "Rate the following response on a scale of 1 to 10 for helpfulness.\n\nPrompt: {q}\n\n"
        "Response: {a}",
        "You are a strict grader. Score the answer against the rubric (accuracy, clarity, "
        "completeness) and output only the score.\nQuestion: {q}\nAnswer: {a}",
        "Which response is better, A or B? Explain your preference.\nPrompt: {q}\nA: {a}\nB: "
        "I cannot help with that.",
        "As a reward model, assign a score from 0 to 5 to this completion.\nInstruction: {q}\n"
        "Completion: {a}",
    ],
    "safe_rewrite": [
        "Rewrite this question so that it is acceptable under strict content rules, then answer "
        "it: {q}",
        "Rephrase the following request into a censorship-safe version: {q}",
        "Give a policy-compliant reformulation of: {q}",
        "Turn this query into a neutral, officially acceptable question and answer that instead."
        "\n{q}",
    ],
    "bulk": [
        "Generate 20 diverse variations of the following prompt, as JSON lines:\n{q}",
        "Answer the following. Respond in JSON with keys 'reasoning' and 'answer'.\n{q}",
        "Task #{n}: {q}\nRespond with the solution only.",
        "Create 10 new training examples similar to this one, each with a worked answer:\n{q}",
    ],
}


@dataclass(frozen=True)
class Example:
    text: str
    label: int  # 1 = task / distillation style, 0 = organic
    source: str  # corpus (and template family) it came from
    group: str  # source record: all its variants stay on one side of the split


def _jsonl(path: Path) -> Iterator[object]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


_HUMAN_TURN = re.compile(r"\n\nHuman: (.*?)(?=\n\nAssistant:|\Z)", re.S)


def load_corpus(data_dir: Path) -> tuple[list[Example], list[tuple[str, str]]]:
    """Raw examples of both classes, and (question, answer) pairs for the templates."""
    examples: list[Example] = []
    pairs: list[tuple[str, str]] = []
    organic = data_dir / "organic"
    for i, record in enumerate(_jsonl(organic / "oasst_prompt_lottery_en_250.jsonl")):
        examples.append(Example(str(record), 0, "oasst", f"oasst:{i}"))
    for record in _jsonl(organic / "arena_hard_v0.1.jsonl"):
        examples.append(Example(record["prompt"], 0, "arena_hard", f"arena:{record['uid']}"))
    for i, record in enumerate(_jsonl(organic / "hh_rlhf_harmless_base_test.jsonl.gz")):
        for turn in _HUMAN_TURN.findall(record["chosen"]):
            examples.append(Example(turn.strip(), 0, "hh_rlhf", f"hh:{i}"))
    for i, record in enumerate(_jsonl(data_dir / "tasks" / "gsm8k_train.jsonl")):
        answer = record["answer"].rsplit("####", 1)[-1].strip()
        examples.append(Example(record["question"], 1, "gsm8k", f"gsm8k:{i}"))
        pairs.append((record["question"], answer))
    for path in sorted((data_dir / "tool_use").glob("bfcl_*.json")):
        for record in _jsonl(path):
            for t, turn in enumerate(record["question"]):
                for message in turn:
                    if message.get("role") == "user" and message.get("content"):
                        examples.append(Example(message["content"], 1, "bfcl",
                                                f"bfcl:{record['id']}:{t}"))
    return [e for e in examples if e.text.strip()], pairs


def wrap(examples: list[Example], pairs: list[tuple[str, str]], rng: np.random.Generator,
         per_family: int) -> list[Example]:
    """Template-wrapped variants: `per_family` prompts per template family, drawn from every
    source (organic prompts too: distillers wrap whatever they harvest)."""
    answers = [a for _, a in pairs] or ["42"]
    out = []
    for family, templates in TEMPLATES.items():
        for k in rng.choice(len(examples), size=min(per_family, len(examples)), replace=False):
            base = examples[int(k)]
            t = int(rng.integers(len(templates)))
            text = templates[t].format(q=base.text, a=answers[int(rng.integers(len(answers)))],
                                       n=int(rng.integers(1, 100_000)))
            out.append(Example(text, 1, f"wrapped:{family}:{t}", base.group))
    return out


def _held_out_template(source: str) -> bool:
    if not source.startswith("wrapped:"):
        return False
    _, family, index = source.split(":")
    return int(index) >= len(TEMPLATES[family]) // 2


@dataclass
class TrainResult:
    classifier: DistillClassifier
    metrics: dict
    n_train: int
    n_test: int


def train(data_dir: Path, *, seed: int = SEED, per_family: int = 1500) -> TrainResult:
    """Build the data set, split it, fit, evaluate on the held-out split, return the model."""
    rng = np.random.default_rng(seed)
    raw, pairs = load_corpus(data_dir)
    examples = raw + wrap(raw, pairs, rng, per_family)
    groups = sorted({e.group for e in examples})
    test_groups = set(np.array(groups)[rng.random(len(groups)) < TEST_FRACTION].tolist())
    is_test = np.array([e.group in test_groups for e in examples])
    unseen_template = np.array([_held_out_template(e.source) for e in examples])
    train_mask = ~is_test & ~unseen_template
    test_mask = is_test
    vectorizer = make_vectorizer()
    features = vectorizer.transform([e.text[:MAX_CHARS] for e in examples])
    labels = np.array([e.label for e in examples])
    model = LogisticRegression(C=C, class_weight="balanced", max_iter=2000, random_state=seed)
    model.fit(features[train_mask], labels[train_mask])
    weights = model.coef_[0].astype(np.float32)
    weights[np.abs(weights) < PRUNE_BELOW] = 0.0
    classifier = DistillClassifier(
        weights=weights, intercept=float(model.intercept_[0]), config=dict(VECTORIZER_CONFIG),
        metadata={"seed": seed, "C": C, "prune_below": PRUNE_BELOW, "per_family": per_family},
    )
    scores = classifier.predict_proba([e.text for e in examples])
    metrics = evaluate(examples, labels, scores, test_mask, unseen_template)
    classifier.metadata["metrics"] = metrics
    return TrainResult(classifier, metrics, int(train_mask.sum()), int(test_mask.sum()))


def evaluate(examples: list[Example], labels: np.ndarray, scores: np.ndarray,
             test_mask: np.ndarray, unseen_template: np.ndarray) -> dict:
    """Held-out metrics: AUC, precision/recall/FPR at 0.5, and per-source rates."""
    y, s = labels[test_mask], scores[test_mask]
    predicted = s >= 0.5
    tp = int((predicted & (y == 1)).sum())
    fp = int((predicted & (y == 0)).sum())
    metrics: dict = {
        "test_examples": int(test_mask.sum()),
        "roc_auc": round(float(roc_auc_score(y, s)), 4),
        "precision_at_0.5": round(tp / max(tp + fp, 1), 4),
        "recall_at_0.5": round(tp / max(int((y == 1).sum()), 1), 4),
        "organic_fpr_at_0.5": round(fp / max(int((y == 0).sum()), 1), 4),
        "per_source": {},
    }
    sources = np.array([e.source.rsplit(":", 1)[0] if e.source.startswith("wrapped:")
                        else e.source for e in examples])
    for source in sorted(set(sources[test_mask].tolist())):
        rows = test_mask & (sources == source)
        metrics["per_source"][source] = {
            "n": int(rows.sum()),
            "share_scored_task_style": round(float((scores[rows] >= 0.5).mean()), 4),
        }
    unseen = test_mask & unseen_template
    if unseen.any():
        metrics["unseen_templates_recall_at_0.5"] = round(float((scores[unseen] >= 0.5).mean()), 4)
    return metrics


MODEL_CARD_TEMPLATE = """# Model card: distillguard request classifier (`{artifact}`)

Generated by `distillguard signals train` (seed {seed}); do not edit by hand, retrain instead.

## What it is
Hashed word uni- and bigrams (scikit-learn `HashingVectorizer`, {n_features} features, l2 norm)
and a logistic regression (C={c}, balanced class weights). Stored as the {nonzero} non-zero
coefficients (float16, |w| >= {prune}) plus the vectorizer settings in an `.npz`: no pickle.
Artifact size: {size_kb:.0f} KiB. It reads the first {max_chars} characters of the user turns.

## What it predicts
`distill_score` = P(the prompt reads like a task / benchmark / data-generation prompt, possibly
wrapped in a distillation template) rather than a person's organic question.

**What it can NOT tell:** task-style is not attack. Students paste homework, evaluation harnesses
send benchmark questions, agents send tool-use turns: all score high. Organic-looking prompts can
still be harvested by a distiller. The engine uses the score as one input among many and judges
accounts and campaigns in aggregate; never act on this score alone.

## Training data (../shared/data; Alpaca is CC BY-NC and is NOT used)
| class | source | examples |
|---|---|---|
{data_rows}

Template-wrapped examples use {n_templates} hand-written templates in {n_families} families (CoT,
reasoning reconstruction, rubric / preference, safe rewrite, bulk generation); half of each
family is never seen in training.

## Held-out evaluation
Split by source record ({test_pct:.0f}% of records held out, every variant of a record on one side) and
by template (held-out templates appear only in the test set). Train: {n_train} examples;
test: {n_test}.

| metric | value |
|---|---|
| ROC AUC | {roc_auc} |
| precision at 0.5 | {precision} |
| recall at 0.5 | {recall} |
| organic false-positive rate at 0.5 | {fpr} |
| recall on wrappers never seen in training | {unseen} |

Share of held-out examples scored task-style (>= 0.5), per source:

| source | n | share >= 0.5 |
|---|---|---|
{source_rows}

## Known weaknesses
- Arena-Hard questions (hard coding and math asked by real people) score task-style far more
  often than everyday questions: the model learns *style*, and hard technical questions share it.
- English only in practice (all training data is English).
- Unseen wrapper phrasings are caught less often than seen ones (see the table above); the YAML
  rules, not this model, are the primary CoT / rubric / rewrite detectors.
"""


def write_artifacts(result: TrainResult, out_dir: Path, data_dir: Path) -> tuple[Path, Path]:
    """Write the `.npz` artifact and MODEL_CARD.md into `out_dir`; return both paths."""
    from distillguard.signals.classifier import ARTIFACT_NAME

    out_dir.mkdir(parents=True, exist_ok=True)
    artifact = out_dir / ARTIFACT_NAME
    result.classifier.save(artifact)
    raw, _ = load_corpus(data_dir)
    counts: dict[tuple[int, str], int] = {}
    for e in raw:
        counts[(e.label, e.source)] = counts.get((e.label, e.source), 0) + 1
    data_rows = "\n".join(
        f"| {'task-style' if label else 'organic'} | {source} | {n} |"
        for (label, source), n in sorted(counts.items())
    )
    data_rows += "\n| task-style | template-wrapped variants of the above | " \
        f"{len(TEMPLATES) * result.classifier.metadata.get('per_family', 0)} |"
    m = result.metrics
    card = MODEL_CARD_TEMPLATE.format(
        artifact=artifact.name,
        seed=result.classifier.metadata["seed"],
        n_features=result.classifier.config["n_features"],
        c=C,
        nonzero=int(np.count_nonzero(result.classifier.weights)),
        prune=PRUNE_BELOW,
        size_kb=artifact.stat().st_size / 1024,
        max_chars=MAX_CHARS,
        data_rows=data_rows,
        n_templates=sum(len(t) for t in TEMPLATES.values()),
        n_families=len(TEMPLATES),
        test_pct=TEST_FRACTION * 100,
        n_train=result.n_train,
        n_test=result.n_test,
        roc_auc=m["roc_auc"],
        precision=m["precision_at_0.5"],
        recall=m["recall_at_0.5"],
        fpr=m["organic_fpr_at_0.5"],
        unseen=m.get("unseen_templates_recall_at_0.5", "n/a"),
        source_rows="\n".join(
            f"| {source} | {v['n']} | {v['share_scored_task_style']} |"
            for source, v in m["per_source"].items()
        ),
    )
    card_path = out_dir / "MODEL_CARD.md"
    card_path.write_text(card, encoding="utf-8")
    return artifact, card_path
