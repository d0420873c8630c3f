"""Prompt and response pools for the traffic lab.

Prompts come from the public corpora in `--corpus DIR` (see `/work/shared/data/README.md` for
the layout: organic/, tasks/, tool_use/) when present, and from small seeded grammars otherwise,
so the lab runs on a fresh machine. Responses are always synthetic text of realistic length: no
model is ever run. Every pool lands in one `TextBank`, so the simulator gathers text with
`take` instead of a loop per exchange.

Corpus resolution (`find_corpus`): an explicit directory wins; otherwise `./../shared/data`
relative to the current working directory, then `../shared/data` next to the repository that
holds this package. Nothing is found -> built-in generators.
"""

from __future__ import annotations

import functools
import gzip
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from distillguard.contract import IMAGE_PLACEHOLDER
from distillguard.lab._arrow import TextBank

#: Pool sizes for generated text. Large enough that repeats are rare within an account-day.
GENERATED_PROMPTS = 3000
RESPONSES_PER_KIND = 1500
WRAPPER_VARIANTS = 4000


@dataclass(frozen=True)
class Family:
    """What one session asks for: base prompt pool, the wrapper around it, the kind of reply."""

    base: str  # prompt pool
    wrapper: str  # wrapper grammar ("plain" = the prompt as is)
    response: str  # response pool kind
    capability: str  # contract.CAPABILITIES value (for documentation and tests)
    toolset: str | None = None  # "agent", "computer" or "bfcl" (tools from the prompt)
    loop: bool = False  # a tool-use loop: assistant tool calls + tool results in the history
    second: str | None = None  # pool filling the wrapper's second slot (answers, candidates)


FAMILIES: dict[str, Family] = {
    # honest everyday use
    "chat": Family("organic", "plain", "chat", "general_chat"),
    "technical": Family("technical", "plain", "chat", "general_chat"),
    "redteam": Family("redteam", "plain", "refusal", "general_chat"),
    "homework": Family("homework", "plain", "chat", "reasoning_math"),
    "instruction": Family("instruction", "plain", "chat", "creative"),
    "coding": Family("coding", "plain", "code", "coding"),
    "agentic_coding": Family("agent_tasks", "plain", "tool_step", "coding", "agent", True),
    "tool_use": Family("tool_use", "plain", "tool_step", "agentic_tool_use", "bfcl"),
    "data_analysis": Family("data_analysis", "plain", "analysis", "data_analysis"),
    "computer_use": Family(
        "computer_use", "plain", "tool_step", "computer_use_vision", "computer", True
    ),
    "vision": Family("vision", "plain", "chat", "computer_use_vision"),
    # evaluation harnesses and batch jobs (honest, but templated)
    "eval_math": Family("math", "harness_cot", "cot", "reasoning_math"),
    "eval_code": Family("coding", "harness_code", "code", "coding"),
    "batch": Family("batch_records", "batch", "batch", "data_analysis"),
    # distillation
    "cot": Family("reasoning_tasks", "cot", "cot", "reasoning_math"),
    "reasoning_reconstruction": Family("math", "reconstruct", "cot", "reasoning_math", None,
                                       False, "math_answer"),
    "rubric": Family("instruction", "rubric", "rubric", "general_chat", None, False, "chat"),
    "safe_rewrite": Family("sensitive", "safe_rewrite", "rewrite", "general_chat"),
    "trace_reconstruction": Family("agent_tasks", "trace", "cot", "agentic_tool_use", None,
                                   False, "tool_result"),
}

AGENT_TOOLS = ["read_file", "write_file", "edit_file", "run_shell", "search_code", "list_dir",
               "run_tests", "git_diff"]
COMPUTER_TOOLS = ["screenshot", "click", "type_text", "scroll", "key_press", "open_url"]

#: The system prompt shipped by a popular open-source coding agent: thousands of honest users
#: send it verbatim, so a shared system prompt is not by itself evidence of common control.
AGENT_SYSTEM_PROMPT = (
    "You are Forge, an autonomous software engineering agent running in the user's terminal. "
    "Use the provided tools to read and modify files, run commands and tests. Make minimal, "
    "correct changes, explain what you did, and never run destructive commands without "
    "confirmation. Working directory: the user's repository."
)
COMPUTER_SYSTEM_PROMPT = (
    "You control a virtual desktop through screenshots and input actions. Describe what you see "
    "before acting, prefer keyboard shortcuts, and stop when the task is complete."
)

# ----------------------------------------------------------------------------------------
# Grammars: "{a|b}" picks one alternative; <Q> and <A> are the wrapper's slots.
# ----------------------------------------------------------------------------------------
WRAPPERS: dict[str, list[str]] = {
    "plain": ["<Q>"],
    "harness_cot": [
        "Question: <Q>\nAnswer: Let's think step by step.",
        "<Q>\nPlease reason step by step, and put your final answer within \\boxed{}.",
    ],
    "harness_code": [
        "Complete the following Python function. Return only code.\n\n<Q>",
    ],
    "batch": [
        "Classify the sentiment of the following customer review as positive, negative or "
        "neutral. Respond with one word.\n\nReview: <Q>",
        "Extract the product name, price and currency from this listing as JSON with keys "
        "name, price, currency.\n\nListing: <Q>",
        "Summarise this support ticket in one sentence for the triage queue.\n\nTicket: <Q>",
        "Translate the following product description into German. Keep formatting.\n\n<Q>",
    ],
    "cot": [
        "{Solve|Work through|Answer|Tackle} {the following|this} {problem|question|task}. "
        "{Think step by step|Reason step by step|Show every step of your reasoning|Explain your "
        "reasoning carefully, one step at a time}{ before answering|| in detail|, leaving nothing "
        "out}.{| Put the final answer on its own line.| End with 'Final answer:'.}\n\n<Q>",
        "<Q>\n\n{Let's think step by step.|Walk me through your full reasoning, step by step."
        "|Please give a detailed step-by-step derivation, then the answer.|Think it through "
        "carefully and show all intermediate steps.}",
        "{I need|Give me|Provide} a {complete|thorough|detailed} {chain of thought|step-by-step "
        "solution|worked solution} for {this|the following}{| problem}:\n<Q>",
    ],
    "reconstruct": [
        "{Here is|Below is} a {question|problem} and its {final|finished|correct} answer. "
        "{Write out|Reconstruct|Explain in full} the {reasoning|step-by-step reasoning|chain of "
        "thought} {behind|that leads to|that justifies} this {finished |final |}answer.\n\n"
        "{Question|Problem}: <Q>\n{Final answer|Answer}: <A>",
        "<Q>\n\n{The answer is|We already know the final answer:} <A>. {Write out the "
        "reasoning behind this finished answer|Show the full derivation that reaches it|Produce "
        "the detailed thinking that arrives at it}, step by step.",
    ],
    "rubric": [
        "{Score|Rate|Grade} {this|the following} response {from 1 to 10|on a 1-10 scale|1-10} "
        "against the rubric{ below|}. {Rubric|Criteria}: {correctness, completeness, clarity|"
        "helpfulness, honesty, harmlessness|accuracy, depth, concision}.{ Explain the score.|"
        " Give the score first, then a justification.| Output JSON with score and rationale.}"
        "\n\n{Prompt|Instruction|Task}: <Q>\n\n{Response|Answer|Candidate}: <A>",
        "{Which is better|Compare these}: {response A or response B|the two responses}? "
        "{Judge|Evaluate} them as a reward model would{, citing the rubric|| and explain why}."
        "\n\n{Task|Prompt}: <Q>\n\nResponse A: <A>\n\nResponse B: {Same as A but shorter.|"
        "A brief answer without details.|It declines to answer.}",
    ],
    "safe_rewrite": [
        "{Rewrite|Reformulate|Rephrase} {the following|this} {question|query|request} so that "
        "{it avoids politically sensitive framing|it is acceptable under strict content rules|"
        "a censored model could answer it}, then answer the {rewritten|safe} version{| "
        "neutrally}.\n\n<Q>",
        "{Give|Write} a {politically safe|neutral, officially acceptable|censorship-compliant} "
        "answer to: <Q>{| Avoid any criticism of the government.| Keep to the official position.}",
    ],
    "trace": [
        "{Below is|Here is} an agent transcript {that ended in success|with its final tool "
        "output}. {Reconstruct|Write out} the {hidden reasoning|step-by-step thinking|internal "
        "plan} the agent {must have followed|used} at each step.\n\nTask: <Q>\n\nLast tool "
        "output:\n<A>",
    ],
}

_ALT = re.compile(r"\{([^{}]*\|[^{}]*)\}")


def expand_many(grammar: str, count: int, rng: np.random.Generator) -> list[str]:
    """`count` random expansions of `grammar` (every "{a|b|...}" replaced by one
    alternative), one vectorised choice per alternative slot."""
    pieces = _ALT.split(grammar)  # literal, alternatives, literal, alternatives, ...
    columns = []
    for i, piece in enumerate(pieces):
        if i % 2 == 0:
            columns.append(np.full(count, piece, dtype=object))
        else:
            options = np.array(piece.split("|"), dtype=object)
            columns.append(options[rng.integers(len(options), size=count)])
    return ["".join(parts) for parts in zip(*columns, strict=True)]


def wrapper_variants(name: str, count: int, rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """`count` expansions of wrapper `name`, each split into (prefix, middle, suffix) around
    the <Q> and <A> slots, which every grammar uses in that order (middle is empty for
    one-slot wrappers)."""
    grammars = WRAPPERS[name]
    # The first variants are one expansion of each grammar, so a count of len(grammars) covers
    # every shape; the rest draw grammars at random.
    which = np.concatenate([np.arange(min(count, len(grammars))),
                            rng.integers(len(grammars), size=max(count - len(grammars), 0))])
    texts = np.empty(count, dtype=object)
    for g, grammar in enumerate(grammars):
        rows = np.flatnonzero(which == g)
        texts[rows] = expand_many(grammar, len(rows), rng)
    out = []
    for text in texts:
        head, _, rest = text.partition("<Q>")
        middle, _, tail = rest.partition("<A>")
        out.append((head, middle, tail))
    return out


# ----------------------------------------------------------------------------------------
# Built-in prompt generators (no corpus) and always-generated pools.
# ----------------------------------------------------------------------------------------
_NAMES = ["Maya", "Liam", "Aisha", "Kenji", "Sofia", "Omar", "Elena", "Ravi", "Chloe", "Tomas"]
_ITEMS = ["apples", "stickers", "books", "marbles", "cupcakes", "pencils", "tickets", "shells"]
_TOPICS = ["sourdough starters", "the French revolution", "index funds", "sleep hygiene",
           "houseplants", "learning Spanish", "black holes", "marathon training", "jazz chords",
           "home insurance", "the Roman empire", "composting", "job interviews", "climate models",
           "electric cars", "photosynthesis", "budget travel in Japan", "chess openings"]
_LANGS = ["Python", "TypeScript", "Go", "Rust", "Java", "SQL", "Bash", "C++"]
_CODE_TASKS = ["parse a CSV file and sum a column", "debounce a function", "read a config file "
               "with defaults", "retry an HTTP request with backoff", "find duplicate rows",
               "implement an LRU cache", "validate an email address", "merge two sorted lists",
               "stream a large file line by line", "write a unit test for a date parser"]
_REPO_THINGS = ["the failing test in tests/test_api.py", "the login redirect bug",
                "the flaky integration test", "type errors reported by mypy",
                "the N+1 query in the orders view", "the memory leak in the worker",
                "the broken CI lint step", "pagination in the search endpoint"]
_SENSITIVE = ["the 1989 Tiananmen Square protests", "Taiwan's political status",
              "the treatment of Uyghurs in Xinjiang", "press freedom in Hong Kong",
              "the Tibetan independence movement", "criticism of the ruling party's leader",
              "the Cultural Revolution's death toll", "internet censorship and VPN use"]


def _alts(options: list[str]) -> str:
    """A grammar alternative choosing one of `options`."""
    return "{" + "|".join(options) + "}"


def _math_problems(rng: np.random.Generator, n: int) -> tuple[list[str], list[str]]:
    a, b, c = rng.integers(2, 60, size=(3, n))
    share = c % 5 + 2
    names = rng.permuted(np.tile(np.arange(len(_NAMES)), (n, 1)), axis=1)[:, :2]
    items = rng.integers(len(_ITEMS), size=n)
    questions = [
        f"{_NAMES[w]} has {x} {_ITEMS[i]}. {_NAMES[o]} gives {_NAMES[w]} {y} more, and then "
        f"{_NAMES[w]} shares them equally among {k} friends. How many {_ITEMS[i]} does each "
        f"friend get, rounded down?"
        for (w, o), x, y, k, i in zip(names.tolist(), a.tolist(), b.tolist(), share.tolist(),
                                      items.tolist(), strict=True)
    ]
    return questions, [str(v) for v in ((a + b) // share).tolist()]


def _builtin_pools(rng: np.random.Generator, n: int) -> dict[str, list[str]]:
    """Stand-ins for the corpus pools on a machine without the corpus."""
    questions, answers = _math_problems(rng, n)
    topics = _alts(_TOPICS)
    return {
        "math": questions, "math_answer": answers,
        "organic": expand_many("{What is|Can you explain|Tell me about|Give me tips on|How do I "
                               f"get started with}} {topics}{{?| in simple terms?| for a "
                               "beginner?}", n, rng),
        "technical": expand_many(f"I'm comparing approaches for {topics}. {{What are the "
                                 "trade-offs|Write a detailed plan|Give a structured analysis}"
                                 "{ with pros and cons|, with sources| in a table}.", n, rng),
        "coding": expand_many(f"Write a {_alts(_LANGS)} function to {_alts(_CODE_TASKS)}.", n,
                              rng),
        "instruction": expand_many("{Write|Draft|Compose} a {short|friendly|formal} {email|poem|"
                                   f"tweet|summary|cover letter}} about {topics}.", n, rng),
        "redteam": expand_many("{how do i|what's the best way to} {prank|get back at|annoy} my "
                               "{neighbor|coworker|roommate}", n, rng),
        "tool_use": expand_many("{Find|Get|Look up} the {weather|exchange rate|stock price|"
                                "flight status} for {Paris|Tokyo|AAPL|EUR to USD|UA 123}.", n,
                                rng),
    }


def _generated_pools(rng: np.random.Generator, n: int) -> dict[str, list[str]]:
    """Pools with no public corpus equivalent: generated in both modes."""
    rows = [f"2026-0{m}-1{m},{r},{v}" for m, r, v in zip(
        rng.integers(1, 10, 6 * n).tolist(), rng.choice(list("NSEW"), 6 * n).tolist(),
        rng.integers(10, 999, 6 * n).tolist(), strict=True)]
    tables = ["\n".join(rows[i * 6 : i * 6 + 6]) for i in range(n)]
    analysis = expand_many("{Here is a CSV of|I uploaded a spreadsheet with} {monthly sales|"
                           "sensor readings|survey answers|web traffic} {by region|by week|per "
                           "customer}. {Find the trend|Compute summary statistics|Detect "
                           "outliers|Fit a regression} {and plot it|and explain the result|in "
                           "pandas}.\n\ndate,region,value\n", n, rng)
    orders = rng.integers(10**6, 10**7, n).tolist()
    return {
        "agent_tasks": expand_many("{Fix|Investigate|Refactor|Add tests for} "
                                   f"{_alts(_REPO_THINGS)}{{.| and run the test suite.| then "
                                   "open a summary of the diff.| without changing the public "
                                   "API.}", n, rng),
        "data_analysis": [a + t for a, t in zip(analysis, tables, strict=True)],
        "computer_use": expand_many(IMAGE_PLACEHOLDER + "\n{Open|Go to} the {settings|billing|"
                                    "profile} page and {change|update|export} the {email "
                                    "address|invoice|notification preferences}.", n, rng),
        "vision": expand_many(IMAGE_PLACEHOLDER + "\n{What does this chart show?|Transcribe the "
                              "text in this photo.|Describe this diagram.|What is wrong with "
                              "this UI screenshot?}", n, rng),
        "sensitive": expand_many("{What happened during|Explain|Give the history of|What is the "
                                 f"truth about}} {_alts(_SENSITIVE)}?", n, rng),
        "followup": expand_many("{Can you make it shorter?|Thanks! Can you give an example?|Why "
                                "is that?|Could you explain the second point?|Make it more "
                                "formal.|What about the opposite case?|ok and then?|Great, now "
                                "in a table please.}", n, rng),
        "batch_records": [r + str(o) for r, o in zip(expand_many(
            "{Great|Terrible|Okay} {product|service|delivery}, {arrived late|works as "
            "described|stopped working after a week|better than expected}. Order #", n, rng),
            orders, strict=True)],
    }


# ----------------------------------------------------------------------------------------
# Synthetic responses
# ----------------------------------------------------------------------------------------
_WORDS = str.split("the of and to in is that for it as with be on this are by we can an which from "
          "result value step first next then so because therefore function file data model "
          "answer total each number test error case example approach method however note "
          "consider output input return list check update using within between")

#: response kind -> (median characters, lognormal sigma)
RESPONSE_LENGTHS: dict[str, tuple[int, float]] = {
    "chat": (900, 0.6), "refusal": (220, 0.3), "code": (1400, 0.5), "cot": (1300, 0.5),
    "rubric": (450, 0.4), "rewrite": (700, 0.4), "analysis": (1100, 0.5),
    "batch": (40, 0.6), "tool_step": (120, 0.5), "final_step": (500, 0.5),
    "reasoning": (2600, 0.6), "tool_result": (500, 0.8),
}


_WORD_ARRAY = np.array(_WORDS)


class _Lorem:
    """One long seeded stream of sentences; a text of n characters is a slice of it, which is
    orders of magnitude faster than sampling words per response."""

    def __init__(self, rng: np.random.Generator, chars: int = 1 << 21) -> None:
        words = _WORD_ARRAY[rng.integers(len(_WORDS), size=chars // 5)]
        ends = np.arange(len(words)) % 11 == 10
        self.text = " ".join(np.where(ends, np.char.add(words, "."), words).tolist())
        self.rng = rng

    def __call__(self, chars: int) -> str:
        chars = min(chars, len(self.text) // 2)
        start = self.text.find(". ", int(self.rng.integers(0, len(self.text) - chars))) + 2
        return self.text[start : start + chars].capitalize().rstrip() + "."


def _response(kind: str, rng: np.random.Generator, lorem: _Lorem) -> str:
    median, sigma = RESPONSE_LENGTHS[kind]
    chars = max(8, int(rng.lognormal(np.log(median), sigma)))
    if kind == "cot":
        steps = max(2, chars // 250)
        body = "\n".join(f"Step {i + 1}: {lorem(chars // steps)}" for i in range(steps))
        return f"{body}\nFinal answer: {int(rng.integers(1, 500))}"
    if kind == "code":
        code = "\n".join(f"    {w} = {w}_{i}" for i, w in
                         enumerate(rng.choice(_WORDS, size=max(3, chars // 60))))
        return f"{lorem(chars // 4)}\n\n```python\ndef solve(data):\n{code}\n    return " \
               f"result\n```\n{lorem(chars // 5)}"
    if kind == "rubric":
        return f"Score: {int(rng.integers(1, 11))}/10\nJustification: {lorem(chars)}"
    if kind == "batch":
        return str(rng.choice(["positive", "negative", "neutral", '{"name": "Widget", "price": '
                               '19.99, "currency": "EUR"}', "Customer reports a late delivery."]))
    if kind == "refusal":
        return "I can't help with that. " + lorem(chars)
    if kind == "tool_result":
        lines = [f"{w}_{i}.py:{int(rng.integers(1, 400))}: {lorem(60)}"
                 for i, w in enumerate(rng.choice(_WORDS, size=max(1, chars // 70)))]
        return "\n".join(lines)
    return lorem(chars)


def _tool_calls(tools: list[str], rng: np.random.Generator, n: int) -> list[str]:
    calls = []
    for _ in range(n):
        name = str(rng.choice(tools))
        arg = str(rng.choice(["src/app.py", "tests/", "pytest -q", "TODO", "README.md", "#submit",
                              "https://example.com/settings", "42"]))
        calls.append(json.dumps({"name": name, "arguments": {"arg": arg}}))
    return calls


# ----------------------------------------------------------------------------------------
# Corpus loading
# ----------------------------------------------------------------------------------------
def find_corpus(explicit: Path | None = None) -> Path | None:
    """The corpus directory to use (see the module docstring), or None for built-ins."""
    if explicit is not None:
        if not (explicit / "tasks").is_dir() and not (explicit / "organic").is_dir():
            raise FileNotFoundError(f"{explicit}: not a corpus directory (no organic/ or tasks/)")
        return explicit
    repo_root = Path(__file__).resolve().parents[3]
    for candidate in (Path.cwd() / ".." / "shared" / "data", repo_root.parent / "shared" / "data"):
        if (candidate / "tasks").is_dir() or (candidate / "organic").is_dir():
            return candidate.resolve()
    return None


_MALFORMED = (ValueError, KeyError, TypeError, AttributeError, IndexError)


def _records(path: Path, extract, skipped: dict[str, int]) -> list:
    """`extract(record)` for every JSON line of `path` (plain or .gz); lines that are not JSON
    or lack the expected fields are skipped and counted in `skipped[file name]`, never fatal.
    `extract` returns one value, or a list of values to add."""
    out: list = []
    if not path.is_file():
        return out
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            for line in fh:
                if not line.strip():
                    continue
                try:
                    value = extract(json.loads(line))
                except _MALFORMED:
                    skipped[path.name] = skipped.get(path.name, 0) + 1
                    continue
                if isinstance(value, list):
                    out.extend(value)
                elif value:
                    out.append(value)
    except (OSError, EOFError, UnicodeDecodeError):  # unreadable or truncated file
        skipped[path.name] = skipped.get(path.name, 0) + 1
    return out


def _first_human_turn(record: dict) -> str:
    transcript = record["chosen"]
    return transcript.split("\n\nHuman: ", 1)[-1].split("\n\nAssistant:", 1)[0].strip()


def _alpaca(record: dict) -> str:
    instances = record.get("instances") or [{}]
    extra = instances[0].get("input") if isinstance(instances[0], dict) else None
    return str(record["instruction"]) + (f"\n\n{extra}" if extra else "")


def _user_turns(record: dict) -> list[str]:
    return [str(m["content"]) for turn in record["question"] for m in turn
            if m.get("role") == "user" and m.get("content")]


def _bfcl(record: dict) -> list[tuple[str, list[str]]]:
    names = [str(f["name"]) for f in record.get("function", [])]
    return [(prompt, names) for prompt in _user_turns(record)]


def load_corpus(root: Path, skipped: dict[str, int] | None = None
                ) -> tuple[dict[str, list[str]], list[list[str]]]:
    """Prompt pools read from the corpus (only the pools it can fill) and, aligned with the
    `tool_use` pool, the tool names each of those prompts declares. Malformed records are
    counted per file in `skipped`."""
    skipped = {} if skipped is None else skipped
    pools: dict[str, list[str]] = {}
    organic, tasks, tool_use = root / "organic", root / "tasks", root / "tool_use"
    oasst = _records(organic / "oasst_prompt_lottery_en_250.jsonl",
                     lambda r: r if isinstance(r, str) else r["text"], skipped)
    arena = _records(organic / "arena_hard_v0.1.jsonl", lambda r: str(r["prompt"]), skipped)
    if oasst or arena:
        pools["organic"] = oasst + arena[: max(1, len(arena) // 4)]
        pools["technical"] = arena or oasst
        code_words = ("code", "python", "function", "script", "sql", "program", "javascript")
        pools["coding"] = [p for p in arena if any(w in p.lower() for w in code_words)] or \
            pools["technical"]
    hh = _records(organic / "hh_rlhf_harmless_base_test.jsonl.gz", _first_human_turn, skipped)
    if hh:
        pools["redteam"] = hh
    gsm = _records(tasks / "gsm8k_train.jsonl", lambda r: (str(r["question"]), str(
        r["answer"]).rsplit("####", 1)[1].strip()), skipped)
    if gsm:
        pools["math"] = [q for q, _ in gsm]
        pools["math_answer"] = [a for _, a in gsm]
    alpaca = _records(tasks / "alpaca_seed_tasks.jsonl", _alpaca, skipped)
    if alpaca:
        pools["instruction"] = alpaca
    bfcl = [pair for name in ("simple_python", "multiple", "parallel")
            for pair in _records(tool_use / f"bfcl_v4_{name}.json", _bfcl, skipped)]
    if bfcl:
        pools["tool_use"] = [prompt for prompt, _ in bfcl]
    multi = _records(tool_use / "bfcl_v4_multi_turn_base.json", _user_turns, skipped)
    if multi:
        pools["agent_tasks_corpus"] = multi
    # A pool the corpus fills too thinly keeps its built-in stand-in.
    return {name: values for name, values in pools.items() if values}, \
        [names for _, names in bfcl]


@functools.lru_cache(maxsize=4)
def prompt_library(corpus: Path | None, seed: int) -> PromptLibrary:
    """A shared, read-only `PromptLibrary` per (corpus, seed): building one takes a few
    seconds, and repeated simulations in one process (tests, benchmarks) need not pay again."""
    return PromptLibrary(corpus, seed)


class PromptLibrary:
    """Every text pool the simulator draws from, in one `TextBank`, plus tool metadata."""

    def __init__(self, corpus: Path | None, seed: int) -> None:
        rng = np.random.default_rng([seed, 7001])
        self.corpus = corpus
        pools = _builtin_pools(rng, GENERATED_PROMPTS)
        tool_names: list[list[str]] = [[]]
        #: malformed corpus records skipped, per file name
        self.skipped: dict[str, int] = {}
        if corpus is not None:
            loaded, names = load_corpus(corpus, self.skipped)
            if "tool_use" in loaded:
                tool_names = names
            pools.update(loaded)
        pools.update(_generated_pools(rng, GENERATED_PROMPTS))
        if "agent_tasks_corpus" in pools:  # BFCL multi-turn requests join the agent tasks
            pools["agent_tasks"] = pools["agent_tasks"] + pools.pop("agent_tasks_corpus")
        pools["homework"] = pools["math"][: len(pools["math"]) // 2] + pools["instruction"]
        pools["reasoning_tasks"] = pools["math"] + pools["instruction"] + pools["technical"]
        self.bank = TextBank()
        lorem = _Lorem(rng)
        for name, values in pools.items():
            self.bank.add(name, values)
        for kind in RESPONSE_LENGTHS:
            self.bank.add(f"resp:{kind}", [_response(kind, rng, lorem)
                                           for _ in range(RESPONSES_PER_KIND)])
        self.bank.add("system:agent", [AGENT_SYSTEM_PROMPT])
        self.bank.add("system:computer", [COMPUTER_SYSTEM_PROMPT])
        # Tool names per tool_use prompt (cycled if the pool came from built-ins).
        if tool_names == [[]]:
            tool_names = [["get_weather", "get_exchange_rate", "get_stock_price"]]
        self.toolsets = {"agent": AGENT_TOOLS, "computer": COMPUTER_TOOLS}
        self.bfcl_tools = pa.array(tool_names, pa.list_(pa.string()))
        self.tool_call_pool = {
            "agent": pa.array(_tool_calls(AGENT_TOOLS, rng, 512)),
            "computer": pa.array(_tool_calls(COMPUTER_TOOLS, rng, 512)),
            "bfcl": pa.array(_tool_calls(sorted({n for ns in tool_names for n in ns}) or
                                         ["get_weather"], rng, 512)),
        }

    def wrappers(self, name: str, count: int, rng: np.random.Generator) -> pa.Table:
        """A table of `count` wrapper variants (prefix, middle, suffix columns)."""
        prefix, middle, suffix = zip(*wrapper_variants(name, count, rng), strict=True)
        return pa.table({"prefix": list(prefix), "middle": list(middle), "suffix": list(suffix)})
