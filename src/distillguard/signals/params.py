"""Extraction-friendly request parameters: several samples per prompt, log-probabilities, or an
output budget far beyond what chat needs.

These are what a distiller asks for to harvest more (and richer) training signal per request. Honest
evaluation and research code uses them too, so this is one signal among many. Parameter *sweeps*
(temperature varied across requests) are an account-level habit and belong to the fingerprints.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

#: `max_tokens` at or above this asks for far more output than a chat answer (long reasoning
#: traces, full solutions); typical clients send 256-16k.
EXTRACTION_MAX_TOKENS = 32_768
#: More than one sample per prompt (`n`).
EXTRACTION_MIN_N = 2


def is_extraction(params: Mapping | None) -> bool:
    """True if one request's parameters are extraction-friendly (the single-request path)."""
    if not params:
        return False
    n, logprobs, max_tokens = params.get("n"), params.get("logprobs"), params.get("max_tokens")
    return bool(
        (isinstance(n, int | float) and n >= EXTRACTION_MIN_N)
        or logprobs is True
        or (type(logprobs) is int and logprobs > 0)
        or (isinstance(max_tokens, int | float) and max_tokens >= EXTRACTION_MAX_TOKENS)
    )


def _all_false(num_rows: int) -> pa.Array:
    return pa.array(np.zeros(num_rows, dtype=bool))


def extraction_mask(params: pa.Array | pa.ChunkedArray | None, num_rows: int) -> pa.Array:
    """`is_extraction` for a whole column of contract params structs, vectorised (never null)."""
    if params is None:
        return _all_false(num_rows)
    if isinstance(params, pa.ChunkedArray):
        params = params.combine_chunks()
    names = {params.type.field(i).name for i in range(params.type.num_fields)}

    def field(name: str) -> pa.Array | None:
        return pc.struct_field(params, name) if name in names else None

    conditions = []
    if (n := field("n")) is not None:
        conditions.append(pc.greater_equal(n, EXTRACTION_MIN_N))
    if (logprobs := field("logprobs")) is not None:
        conditions.append(pc.equal(logprobs, True))
    if (max_tokens := field("max_tokens")) is not None:
        conditions.append(pc.greater_equal(max_tokens, EXTRACTION_MAX_TOKENS))
    mask = _all_false(num_rows)
    for condition in conditions:
        mask = pc.or_(mask, pc.fill_null(condition, False))
    return mask
