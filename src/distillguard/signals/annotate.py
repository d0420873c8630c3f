"""Per-exchange request signals (contract.SIGNAL_SCHEMA), for a batch or for one live request.

Both paths share one per-text analysis (`SignalAnnotator.analyse`): rules (one Hyperscan scan),
template signature + LSH keys, language and classifier score depend only on the user turns, so
they are computed once per DISTINCT prompt text (traffic repeats prompts a lot, distillation
traffic most of all) and cached across calls. Everything that depends on the rest of the exchange
(tools, tool calls, parameters, system prompt) is vectorised in Arrow for batches.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing as mp
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from itertools import islice, pairwise
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from distillguard import contract
from distillguard.signals.classifier import DistillClassifier, default_artifact_path
from distillguard.signals.language import detect_language, detect_language_ascii
from distillguard.signals.matcher import RuleMatcher
from distillguard.signals.params import extraction_mask, is_extraction
from distillguard.signals.rules import RulePack, load_rule_packs
from distillguard.signals.templates import skeleton, template_signatures, text_hash

log = logging.getLogger(__name__)

#: When rules of several capabilities match, the most specific one wins (first in this order).
CAPABILITY_PRIORITY = (
    "computer_use_vision",
    "agentic_tool_use",
    "data_analysis",
    "coding",
    "reasoning_math",
    "creative",
    "general_chat",
)
DEFAULT_CAPABILITY = "general_chat"
#: Boolean signals a rule can set (rules.RULE_SIGNALS minus capability/context).
BOOLEAN_SIGNALS = ("cot", "reasoning_reconstruction", "rubric", "safe_rewrite")

#: Very long prompts are analysed on their head and tail only: bounded cost per prompt, and a
#: template's instructions sit at the start or the end of the data they wrap.
HEAD_CHARS = 64_000
TAIL_CHARS = 16_000
#: Per-text results are cached for texts up to this length, at most CACHE_ENTRIES of them.
CACHE_MAX_TEXT_CHARS = 2_048
CACHE_ENTRIES = 250_000

USER_JOIN = "\n"
#: The exchange columns `annotate` reads (callers select just these: responses are the bulk).
INPUT_COLUMNS = ("request_id", "account_id", "ts", "model", "system", "messages", "tools",
                 "tool_calls", "params")
#: Below this many new distinct texts in a batch, worker processes cost more than they save.
PARALLEL_MIN_TEXTS = 2_000


class TextSignals(NamedTuple):
    """Everything derived from the user turns alone. A named tuple rather than a frozen
    dataclass: one is built and (from a worker) pickled and unpickled per distinct prompt,
    which a tuple makes several times cheaper."""

    flags: tuple[bool, bool, bool, bool]  # BOOLEAN_SIGNALS, in that order
    capability: str  # from text rules alone (structure is applied per exchange)
    template_sig: str | None
    template_lsh: tuple[str, ...]
    language: str | None
    distill_score: float | None
    rule_hits: tuple[str, ...]


@dataclass(slots=True)
class _Batch:
    """A batch between `_start_batch` and `_finish_batch` (its workers may be running)."""

    table: pa.Table
    texts: pa.Array  # per row: the prompt text
    encoded: pa.DictionaryArray  # texts, dictionary-encoded: one entry per distinct text
    keys: list[str]  # the distinct texts
    out: list[TextSignals | None]  # their signals (cache hits so far)
    new: list[int]  # distinct texts analysed for this batch (here or in workers)
    deferred: list[int]  # distinct texts the batch before is analysing
    own: list[int]  # the share of `new` analysed in this process
    futures: list[tuple[list[int], Future]]  # the workers' shares


def analysis_view(text: str) -> str:
    """The part of a prompt that is analysed (all of it unless it is very long), as valid
    Unicode (a live request's JSON can carry lone surrogates; Arrow strings cannot)."""
    if len(text) > HEAD_CHARS + TAIL_CHARS:
        text = text[:HEAD_CHARS] + "\n" + text[-TAIL_CHARS:]
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", errors="replace").decode("utf-8")
    return text


def _table_column(table: pa.Table, name: str) -> pa.Array | None:
    if name not in table.column_names:
        return None
    column = table[name]
    if isinstance(column, pa.ChunkedArray):
        # combine_chunks copies even a single chunk (the messages of a batch: 100+ MB)
        return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    return column


def user_text_column(messages: pa.Array) -> pa.Array:
    """Per row: the contents of the user turns joined by a newline ("" if none), vectorised."""
    num_rows = len(messages)
    flat = pc.list_flatten(messages)
    parents = pc.list_parent_indices(messages)
    is_user = pc.fill_null(pc.equal(pc.struct_field(flat, "role"), "user"), False)
    content = pc.fill_null(pc.filter(pc.struct_field(flat, "content"), is_user), "")
    counts = np.bincount(
        pc.filter(parents, is_user).to_numpy(zero_copy_only=False), minlength=num_rows
    )
    offsets = np.zeros(num_rows + 1, dtype=np.int32)
    np.cumsum(counts, out=offsets[1:])
    lists = pa.ListArray.from_arrays(pa.array(offsets), content.cast(pa.string()))
    return pc.binary_join(lists, USER_JOIN)


def user_text(messages: Sequence[Any] | None) -> str:
    """The single-request twin of `user_text_column`."""
    return USER_JOIN.join(
        (m.get("content") or "")
        for m in messages or ()
        if isinstance(m, Mapping) and m.get("role") == "user"
    )


def tools_text_of(exchange: Mapping[str, Any]) -> str:
    """The single-request twin of `SignalAnnotator._tools_text` (a list holding a null joins to
    "" there, as Arrow's binary_join makes it null)."""
    parts = []
    for key in ("tools", "tool_calls"):
        items = exchange.get(key)
        ok = isinstance(items, list | tuple) and all(item is not None for item in items)
        parts.append("\n".join(str(item) for item in items) if ok else "")
    return "\n".join(parts).strip("\n")


def system_hash(system: str | None) -> str | None:
    """Hash of the system prompt's skeleton (dates, names, ids masked), None if there is none."""
    if system is None or not system.strip():
        return None
    return text_hash(skeleton(analysis_view(system)))


class SignalAnnotator:
    """Compiled rules + classifier + per-text cache; thread-safe for the gateway."""

    def __init__(
        self,
        packs: Sequence[RulePack] | None = None,
        classifier: DistillClassifier | None = None,
        *,
        load_classifier: bool = True,
        workers: int = 1,
    ):
        """`workers` > 1 analyses a batch's new texts in that many processes (this one and
        workers - 1 children, started on first use; `close()` stops them)."""
        self.workers = max(1, workers)
        self._pool: ProcessPoolExecutor | None = None
        self.packs = list(load_rule_packs() if packs is None else packs)
        self.matcher = RuleMatcher.from_packs(self.packs, "prompt")
        self.tool_matcher = RuleMatcher.from_packs(self.packs, "tools")
        rules = self.matcher.rules
        self._rule_signal = [BOOLEAN_SIGNALS.index(r.signal) if r.signal in BOOLEAN_SIGNALS
                             else -1 for r in rules]
        self._rule_capability_rank = [
            CAPABILITY_PRIORITY.index(r.capability) if r.capability else len(CAPABILITY_PRIORITY)
            for r in rules
        ]
        if classifier is None and load_classifier:
            path = default_artifact_path()
            if path.exists():
                classifier = DistillClassifier.load(path)
            else:
                log.warning("no classifier artifact at %s: distill_score will be null", path)
        self.classifier = classifier
        self._cache: dict[str, TextSignals] = {}
        self._cache_lock = threading.Lock()
        self._timing = (0.0, 0.0)  # the last batch: own analysis, waiting for workers (s)

    # -- tools ----------------------------------------------------------------------------
    def tool_capability(self, tools_text: str) -> str | None:
        """Capability the tool names point to (tools-scope rules), None if none matches."""
        ranks = [CAPABILITY_PRIORITY.index(self.tool_matcher.rules[i].capability)
                 for i in self.tool_matcher.scan_indices(tools_text)]
        return CAPABILITY_PRIORITY[min(ranks)] if ranks else None

    def capability(self, text_capability: str, tools_text: str) -> str:
        """The exchange's capability: vision evidence in the prompt wins; with tools, what the
        tool names say (e.g. a coding agent's file and shell tools), else agentic_tool_use."""
        if not tools_text or text_capability == CAPABILITY_PRIORITY[0]:
            return text_capability
        return self.tool_capability(tools_text) or "agentic_tool_use"

    # -- per text --------------------------------------------------------------------------
    def analyse(self, texts: Sequence[str]) -> list[TextSignals]:
        """Signals of each text (cached); the one place per-text work happens."""
        return self._cached(texts, lambda rows: self._analyse_uncached([texts[i] for i in rows]))

    def _cached(self, texts: Sequence[str],
                compute: Callable[[list[int]], list[TextSignals]]) -> list[TextSignals]:
        """Cached signals of `texts`; `compute(rows)` gives those of the uncached rows."""
        out: list[TextSignals | None] = [self._cache.get(t) for t in texts]
        missing = [i for i, hit in enumerate(out) if hit is None]
        if missing:
            fresh = compute(missing)
            for i, signals in zip(missing, fresh, strict=True):
                out[i] = signals
            self._remember([texts[i] for i in missing], fresh)
        return out  # type: ignore[return-value]

    def _analyse_uncached(self, texts: Sequence[str] | pa.Array) -> list[TextSignals]:
        """Signals of each text, computed. An Arrow array of texts (the batch path) has its
        ASCII texts scored by the classifier's vectorised twin (identical values)."""
        column = texts if isinstance(texts, pa.Array) else None
        views = [analysis_view(t) for t in (texts.to_pylist() if column is not None else texts)]
        fast = np.zeros(len(views), dtype=bool)
        if column is not None:
            # ASCII texts up to HEAD + TAIL characters: their view is the text itself, and the
            # vectorised twins of the per-text functions apply (identical values).
            fast = pc.and_(pc.string_is_ascii(column),
                           pc.less_equal(pc.binary_length(column), HEAD_CHARS + TAIL_CHARS)
                           ).to_numpy(zero_copy_only=False)
        sigs, lsh = template_signatures(views)
        scores, languages = self._scores_and_languages(views, column, fast)
        results = []
        for view, sig, keys, score, language in zip(views, sigs, lsh, scores, languages,
                                                    strict=True):
            hit_indices = self.matcher.scan_indices(view)
            flags = [False] * len(BOOLEAN_SIGNALS)
            rank = len(CAPABILITY_PRIORITY) - 1
            for i in hit_indices:
                if self._rule_signal[i] >= 0:
                    flags[self._rule_signal[i]] = True
                rank = min(rank, self._rule_capability_rank[i])
            results.append(
                TextSignals(
                    flags=tuple(flags),  # type: ignore[arg-type]
                    capability=CAPABILITY_PRIORITY[rank],
                    template_sig=sig,
                    template_lsh=tuple(keys),
                    language=language,
                    distill_score=None if score is None or not view.strip() else score,
                    rule_hits=tuple(self.matcher.rules[i].id for i in hit_indices),
                )
            )
        return results

    def _scores_and_languages(self, views: list[str], column: pa.Array | None,
                              fast: np.ndarray) -> tuple[list[float | None], list[str | None]]:
        """Classifier score and language of each view; the `fast` texts of an Arrow column by
        the vectorised twins of the per-text functions (identical values)."""
        fast_rows, slow_rows = np.flatnonzero(fast).tolist(), np.flatnonzero(~fast).tolist()
        slow = [views[i] for i in slow_rows]
        scores: list[float | None] = [None] * len(views)
        languages: list[str | None] = [None] * len(views)
        _scatter(languages, slow_rows, [detect_language(v) if v.strip() else None for v in slow])
        if self.classifier is not None:
            _scatter(scores, slow_rows, self.classifier.predict_proba(slow).tolist())
        if fast_rows:
            texts = column.take(fast_rows)
            _scatter(languages, fast_rows, detect_language_ascii(texts))
            if self.classifier is not None:
                _scatter(scores, fast_rows, self.classifier.predict_proba_ascii(texts).tolist())
        return scores, languages

    def _start_batch(self, exchanges: pa.Table | pa.RecordBatch,
                     in_flight: set[str] | None = None,
                     balance: tuple[float, float] | None = None) -> _Batch:
        """Validate a batch, look its distinct texts up in the cache and hand the workers
        their share of the new ones (they start at once); this process keeps an equal share,
        or less by `balance` = (seconds per text, other busy seconds per batch) measured on
        the batch before. Texts in `in_flight` (new in the batch before, still being
        analysed) are taken from that batch's results instead."""
        table = pa.Table.from_batches([exchanges]) if isinstance(exchanges, pa.RecordBatch) \
            else exchanges
        for name in ("request_id", "account_id", "ts", "model", "messages"):
            if name not in table.column_names:
                raise ValueError(f"exchanges have no {name!r} column (see contract.EXCHANGE_SCHEMA)")
        texts = user_text_column(_table_column(table, "messages"))
        encoded = pc.dictionary_encode(texts)
        keys = encoded.dictionary.to_pylist()
        out: list[TextSignals | None] = [self._cache.get(t) for t in keys]
        missing = [i for i, hit in enumerate(out) if hit is None]
        deferred: list[int] = []
        if in_flight:
            deferred = [i for i in missing if keys[i] in in_flight]
            if deferred:
                missing = [i for i in missing if keys[i] not in in_flight]
        batch = _Batch(table, texts, encoded, keys, out, missing, deferred, missing, [])
        if self.workers > 1 and len(missing) >= PARALLEL_MIN_TEXTS:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(
                    self.workers - 1, mp_context=mp.get_context("spawn"),
                    initializer=_init_worker,
                    initargs=(self.packs, self.classifier, os.getpid()))
            own = len(missing) // self.workers
            if balance is not None:
                # This process also spends `other` seconds per batch outside the analysis:
                # keep fewer texts so that it and each worker are busy equally long, i.e.
                # own * per_text + other = worker's texts * per_text.
                per_text, other = balance
                own = int(max(0.0, min(own, (len(missing) - (self.workers - 1) * other
                                             / per_text) / self.workers)))
            bounds = [0, *np.linspace(own, len(missing), self.workers).astype(int).tolist()]
            column = encoded.dictionary
            for lo, hi in pairwise(bounds[1:]):
                rows = missing[lo:hi]
                batch.futures.append((rows, self._pool.submit(_worker_analyse,
                                                              column.take(rows))))
            batch.own = missing[: bounds[1]]
        return batch

    def _finish_batch(self, batch: _Batch, earlier: Mapping[str, TextSignals] | None = None
                      ) -> pa.Table:
        """Analyse this process's share of the batch's new texts, collect the workers', and
        build the SIGNAL_SCHEMA table; `earlier` holds the results of the batch before (for
        the deferred texts)."""
        out, keys = batch.out, batch.keys
        start = time.perf_counter()
        if batch.own:
            _scatter(out, batch.own,
                     self._analyse_uncached(batch.encoded.dictionary.take(batch.own)))
        analysed = time.perf_counter()
        for rows, future in batch.futures:
            _scatter(out, rows, future.result())
        self._timing = (analysed - start, time.perf_counter() - analysed)
        for i in batch.deferred:
            found = (earlier or {}).get(keys[i]) or self._cache.get(keys[i])
            out[i] = found if found is not None else self._analyse_uncached([keys[i]])[0]
        if batch.new:
            self._remember([keys[i] for i in batch.new], [out[i] for i in batch.new])
        return self._signal_table(batch.table, batch.texts, batch.encoded.indices,
                                  out)  # type: ignore[arg-type]

    def close(self) -> None:
        """Stop the worker processes (if any were started)."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def _remember(self, texts: Sequence[str], results: Sequence[TextSignals]) -> None:
        with self._cache_lock:
            if len(self._cache) + len(texts) > CACHE_ENTRIES:
                for key in list(islice(self._cache, CACHE_ENTRIES // 2)):
                    self._cache.pop(key, None)
            for text, signals in zip(texts, results, strict=True):
                if len(text) <= CACHE_MAX_TEXT_CHARS:
                    self._cache[text] = signals

    # -- batch -----------------------------------------------------------------------------
    def annotate(self, exchanges: pa.Table | pa.RecordBatch) -> pa.Table:
        """Signals for every exchange, as a SIGNAL_SCHEMA table in the same row order."""
        return self._finish_batch(self._start_batch(exchanges))

    def annotate_stream(self, batches: Iterable[pa.Table | pa.RecordBatch]
                        ) -> Iterator[pa.Table]:
        """`annotate` of each batch, in order, pipelined: the next batch is read and its new
        texts handed to the worker processes before this batch's table is yielded, so the
        workers analyse while the caller writes the table (and reads the next batch), instead
        of idling. The same tables as `annotate` batch by batch."""
        pending: _Batch | None = None
        earlier: dict[str, TextSignals] = {}
        balance: tuple[float, float] | None = None
        for exchanges in batches:
            cycle_start = time.perf_counter()
            in_flight = {pending.keys[i] for i in pending.new} if pending else None
            started = self._start_batch(exchanges, in_flight, balance)
            if pending is not None:
                table = self._finish_batch(pending, earlier)
                earlier = {pending.keys[i]: pending.out[i] for i in pending.new}
                yield table
                own, waited = self._timing
                if pending.own and own > 0:  # per-text cost here, other busy seconds here
                    balance = (own / len(pending.own),
                               max(0.0, time.perf_counter() - cycle_start - own - waited))
            pending = started
        if pending is not None:
            yield self._finish_batch(pending, earlier)

    def _signal_table(self, table: pa.Table, texts: pa.Array, indices: pa.Array,
                      distinct: list[TextSignals]) -> pa.Table:
        """The SIGNAL_SCHEMA table of a batch from the signals of its distinct texts."""
        num_rows = table.num_rows

        def per_text(values: Sequence, type_: pa.DataType) -> pa.Array:
            return pc.take(pa.array(values, type_), indices)

        # one transposition of the distinct texts' signals into a sequence per field
        fields = TextSignals(*zip(*distinct, strict=True)) if distinct \
            else TextSignals(*([()] * len(TextSignals._fields)))
        columns: dict[str, pa.Array] = {
            name: _table_column(table, name).cast(contract.SIGNAL_SCHEMA.field(name).type)
            for name in ("request_id", "account_id", "ts", "model")
        }
        columns["prompt_chars"] = pc.utf8_length(texts).cast(pa.int64())
        # here, where `messages` is read anyway: the exchange view would otherwise read every
        # message's text from the store for its length (at 20M exchanges, 140 of the view's 170 s)
        columns["depth"] = pc.list_value_length(_table_column(table, "messages")).cast(pa.int64())
        flags = list(zip(*fields.flags, strict=True)) or [()] * len(BOOLEAN_SIGNALS)
        for k, name in enumerate(BOOLEAN_SIGNALS):
            columns[name] = per_text(flags[k], pa.bool_())
        text_capability = per_text(fields.capability, pa.string())
        # Capability depends on (prompt capability, tool names) only: resolved per distinct pair.
        pairs = pc.dictionary_encode(pc.binary_join_element_wise(
            text_capability, self._tools_text(table), "\x1f"))
        resolved = [self.capability(*pair.split("\x1f", 1))
                    for pair in pairs.dictionary.to_pylist()]
        columns["capability"] = pc.take(pa.array(resolved, pa.string()), pairs.indices)
        columns["extraction_params"] = extraction_mask(_table_column(table, "params"), num_rows)
        columns["template_sig"] = per_text(fields.template_sig, pa.string())
        columns["template_lsh"] = per_text(fields.template_lsh, pa.list_(pa.string()))
        columns["system_hash"] = self._system_hashes(_table_column(table, "system"), num_rows)
        columns["language"] = per_text(fields.language, pa.string())
        columns["distill_score"] = per_text(fields.distill_score, pa.float64())
        columns["rule_hits"] = per_text(fields.rule_hits, pa.list_(pa.string()))
        return pa.Table.from_pydict(
            {f.name: columns[f.name] for f in contract.SIGNAL_SCHEMA},
            schema=contract.SIGNAL_SCHEMA,
        )

    @staticmethod
    def _tools_text(table: pa.Table) -> pa.Array:
        """Per row: tool names offered, then tool calls, one per line ("" if none)."""
        parts = []
        for name in ("tools", "tool_calls"):
            column = _table_column(table, name)
            if column is not None and pa.types.is_list(column.type):
                parts.append(pc.fill_null(pc.binary_join(column.cast(pa.list_(pa.string())),
                                                         "\n"), ""))
        if not parts:
            return pa.array([""] * table.num_rows, pa.string())
        joined = parts[0] if len(parts) == 1 else pc.binary_join_element_wise(*parts, "\n")
        return pc.utf8_trim(joined, "\n")

    @staticmethod
    def _system_hashes(system: pa.Array | None, num_rows: int) -> pa.Array:
        if system is None:
            return pa.nulls(num_rows, pa.string())
        encoded = pc.dictionary_encode(system.cast(pa.string()))
        hashes = pa.array([system_hash(s) for s in encoded.dictionary.to_pylist()], pa.string())
        return pc.take(hashes, encoded.indices)

    # -- one live request ------------------------------------------------------------------
    def annotate_request(self, exchange: Mapping[str, Any]) -> dict[str, Any]:
        """Signals of one exchange given as a contract-shaped dict (keys of SIGNAL_SCHEMA)."""
        messages = exchange.get("messages")
        text = user_text(messages)
        signals = self.analyse([text])[0]
        tools_text = tools_text_of(exchange)
        system = exchange.get("system")
        return {
            "request_id": exchange.get("request_id"),
            "account_id": exchange.get("account_id"),
            "ts": exchange.get("ts"),
            "model": exchange.get("model"),
            "prompt_chars": len(text),
            "depth": len(messages) if isinstance(messages, list) else None,
            "cot": signals.flags[0],
            "reasoning_reconstruction": signals.flags[1],
            "rubric": signals.flags[2],
            "safe_rewrite": signals.flags[3],
            "capability": self.capability(signals.capability, tools_text),
            "extraction_params": is_extraction(exchange.get("params")),
            "template_sig": signals.template_sig,
            "template_lsh": list(signals.template_lsh),
            "system_hash": system_hash(system) if isinstance(system, str) else None,
            "language": signals.language,
            "distill_score": signals.distill_score,
            "rule_hits": list(signals.rule_hits),
        }


def _scatter(out: list, rows: Sequence[int], values: Sequence) -> None:
    for i, value in zip(rows, values, strict=True):
        out[i] = value


_worker: SignalAnnotator | None = None


def _init_worker(packs: list[RulePack], classifier: DistillClassifier | None,
                 parent_pid: int) -> None:
    global _worker
    _worker = SignalAnnotator(packs, classifier, load_classifier=False)
    # What is alive now (modules, rules, the model) lives as long as the worker: the cyclic
    # collector need not traverse it on every full collection the analysis triggers.
    gc.freeze()
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()


def _exit_with_parent(parent_pid: int, every_s: float = 1.0) -> None:
    """In a worker process: exit when the process that started it is gone. A parent killed
    by a signal never shuts its pool down, and its workers would wait on the pool's queue
    (or finish a batch nobody reads) forever."""
    while os.getppid() == parent_pid:
        time.sleep(every_s)
    os._exit(1)


def _worker_analyse(texts: pa.Array) -> list[TextSignals]:
    """In a worker process: the signals of a slice of a batch's new texts."""
    assert _worker is not None
    return _worker._analyse_uncached(texts)


_default: SignalAnnotator | None = None
_default_lock = threading.Lock()


def default_annotator() -> SignalAnnotator:
    """The process-wide annotator with the built-in rule packs and classifier (built once)."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = SignalAnnotator()
    return _default


def annotate(exchanges: pa.Table | pa.RecordBatch) -> pa.Table:
    """contract.SIGNAL_SCHEMA rows for `exchanges` (EXCHANGE_SCHEMA columns), same row order."""
    return default_annotator().annotate(exchanges)


def annotate_request(exchange: Mapping[str, Any]) -> dict[str, Any]:
    """One exchange (contract-shaped dict) -> one signal row dict; same code path as `annotate`."""
    return default_annotator().annotate_request(exchange)
