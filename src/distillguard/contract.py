"""The log contract: one definition of every record distillguard reads or writes.

Every reader, writer, the traffic lab, the detection engine, the evaluator and the gateway
import their schemas from here, so a field is named, typed and capped in exactly one place.
`docs/log-contract.md` documents these definitions for people.
"""

from __future__ import annotations

import pyarrow as pa

#: Longest text kept for any single text field (prompt, response, ...). Longer values are
#: truncated to this many bytes and the field name is listed in `truncated_fields`.
TEXT_FIELD_CAP_BYTES = 1 << 20  # 1 MiB

#: Longest raw line kept in the quarantine table (its original length is kept beside it).
QUARANTINE_RAW_CAP_BYTES = 64 << 10  # 64 KiB

#: Whole input lines above this size are quarantined as `oversize` without being parsed.
LINE_CAP_BYTES = 32 << 20  # 32 MiB

ENDPOINTS = ("chat.completions", "messages", "completions", "responses", "batch")
VERIFICATION_PATHS = (
    "standard",
    "education",
    "research_program",
    "startup_program",
    "enterprise",
    "reseller",
)
MESSAGE_ROLES = ("system", "user", "assistant", "tool", "developer")
IMAGE_PLACEHOLDER = "[image]"

#: Reason codes a quarantined row can carry.
QUARANTINE_REASONS = (
    "bad_json",  # the line is not a JSON object
    "bad_utf8",  # the line is not valid UTF-8
    "missing_field",  # a required field is absent or empty
    "bad_type",  # a field has the wrong JSON type
    "bad_timestamp",  # ts is unparseable or has no time zone
    "bad_value",  # a field is typed right but outside its allowed values
    "oversize",  # the whole record exceeds LINE_CAP_BYTES
    "duplicate",  # request_id / account_id already stored or repeated in the batch
)

MESSAGE_TYPE = pa.struct([("role", pa.string()), ("content", pa.string())])

PARAMS_TYPE = pa.struct(
    [
        ("temperature", pa.float64()),
        ("top_p", pa.float64()),
        ("max_tokens", pa.int64()),
        ("n", pa.int64()),
        ("logprobs", pa.bool_()),
        ("stream", pa.bool_()),
        ("reasoning_effort", pa.string()),
        ("reasoning_budget", pa.int64()),
    ]
)

UTC_TS = pa.timestamp("ms", tz="UTC")

EXCHANGE_SCHEMA = pa.schema(
    [
        pa.field("request_id", pa.string(), nullable=False),
        pa.field("ts", UTC_TS, nullable=False),
        pa.field("account_id", pa.string(), nullable=False),
        pa.field("api_key_id", pa.string()),
        pa.field("org_id", pa.string()),
        pa.field("ip", pa.string()),
        pa.field("user_agent", pa.string()),
        pa.field("model", pa.string(), nullable=False),
        pa.field("endpoint", pa.string()),
        pa.field("system", pa.string()),
        pa.field("messages", pa.list_(MESSAGE_TYPE), nullable=False),
        pa.field("tools", pa.list_(pa.string())),
        pa.field("params", PARAMS_TYPE),
        pa.field("response_text", pa.string()),
        pa.field("reasoning_text", pa.string()),
        pa.field("tool_calls", pa.list_(pa.string())),
        pa.field("input_tokens", pa.int64()),
        pa.field("output_tokens", pa.int64()),
        pa.field("reasoning_tokens", pa.int64()),
        pa.field("status", pa.int32()),
        pa.field("error", pa.string()),
        pa.field("latency_ms", pa.float64()),
        pa.field("stop_reason", pa.string()),
        # Unknown input fields, kept as JSON text per key: never an error.
        pa.field("extra", pa.map_(pa.string(), pa.string())),
        # Names of text fields that were cut at TEXT_FIELD_CAP_BYTES.
        pa.field("truncated_fields", pa.list_(pa.string())),
    ]
)
EXCHANGE_REQUIRED = ("request_id", "ts", "account_id", "model", "messages")

ACCOUNT_SCHEMA = pa.schema(
    [
        pa.field("account_id", pa.string(), nullable=False),
        pa.field("created_at", UTC_TS),
        pa.field("email_domain", pa.string()),
        pa.field("payment_fingerprint", pa.string()),
        pa.field("billing_country", pa.string()),
        pa.field("verification_path", pa.string()),
        pa.field("org_id", pa.string()),
        pa.field("signup_ip", pa.string()),
        pa.field("plan", pa.string()),
        pa.field("extra", pa.map_(pa.string(), pa.string())),
    ]
)
ACCOUNT_REQUIRED = ("account_id",)

QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("source_file", pa.string(), nullable=False),
        pa.field("row_number", pa.int64(), nullable=False),  # 1-based line or Parquet row
        pa.field("kind", pa.string(), nullable=False),  # "exchanges" or "accounts"
        pa.field("reason", pa.string(), nullable=False),  # one of QUARANTINE_REASONS
        pa.field("detail", pa.string()),  # human-readable: which field, what was wrong
        pa.field("raw", pa.string()),  # capped at QUARANTINE_RAW_CAP_BYTES
        pa.field("raw_length", pa.int64()),  # original length in bytes
        pa.field("ingested_at", UTC_TS, nullable=False),
    ]
)

# --------------------------------------------------------------------------------------
# Request signals: one row per exchange, computed by `distillguard.signals` and cached in the
# store's `signals` table so incremental scans only annotate new exchanges.
# --------------------------------------------------------------------------------------
CAPABILITIES = (
    "reasoning_math",
    "coding",
    "agentic_tool_use",
    "computer_use_vision",
    "data_analysis",
    "creative",
    "general_chat",
)

SIGNAL_SCHEMA = pa.schema(
    [
        pa.field("request_id", pa.string(), nullable=False),
        pa.field("account_id", pa.string(), nullable=False),
        pa.field("ts", UTC_TS, nullable=False),
        pa.field("model", pa.string(), nullable=False),
        pa.field("prompt_chars", pa.int64()),  # length of the user turns
        pa.field("depth", pa.int64()),  # messages in the request, every role (null if none)
        pa.field("cot", pa.bool_()),  # elicits step-by-step reasoning
        pa.field("reasoning_reconstruction", pa.bool_()),  # reasoning behind a finished answer
        pa.field("rubric", pa.bool_()),  # grading / preference / reward-model task
        pa.field("safe_rewrite", pa.bool_()),  # "safe" rewrite of a sensitive query
        pa.field("capability", pa.string()),  # one of CAPABILITIES
        pa.field("extraction_params", pa.bool_()),  # n>1, logprobs, huge max_tokens, ...
        pa.field("template_sig", pa.string()),  # hash of the masked prompt skeleton
        pa.field("template_lsh", pa.list_(pa.string())),  # LSH band keys of its MinHash
        pa.field("system_hash", pa.string()),  # hash of the system prompt, null if none
        pa.field("language", pa.string()),  # ISO 639-1 guess
        pa.field("distill_score", pa.float64()),  # learned classifier probability
        pa.field("rule_hits", pa.list_(pa.string())),  # ids of matched rules
    ]
)

# --------------------------------------------------------------------------------------
# Findings: what a detector writes and the evaluator reads (docs/findings-format.md).
# A findings directory holds accounts.parquet, campaigns.parquet and, optionally,
# exchanges.parquet (per-exchange attribution).
# --------------------------------------------------------------------------------------
FINDING_ACCOUNT_SCHEMA = pa.schema(
    [
        pa.field("account_id", pa.string(), nullable=False),
        pa.field("score", pa.float64(), nullable=False),  # higher = more likely an attacker
        pa.field("flagged", pa.bool_(), nullable=False),
        pa.field("first_flagged_at", UTC_TS),  # simulated/log time it was first flagged
        pa.field("campaign_id", pa.string()),  # cluster/campaign it was attributed to
        pa.field("reasons", pa.list_(pa.string())),  # human-readable evidence
    ]
)
FINDING_CAMPAIGN_SCHEMA = pa.schema(
    [
        pa.field("campaign_id", pa.string(), nullable=False),
        pa.field("score", pa.float64()),
        pa.field("accounts", pa.list_(pa.string())),
        pa.field("n_accounts", pa.int64()),
        pa.field("n_exchanges", pa.int64()),
        pa.field("first_seen", UTC_TS),
        pa.field("last_seen", UTC_TS),
        pa.field("first_flagged_at", UTC_TS),
        pa.field("capabilities", pa.map_(pa.string(), pa.float64())),  # share per capability
        pa.field("models", pa.map_(pa.string(), pa.float64())),  # share per model
        pa.field("pivots", pa.list_(pa.struct([("model", pa.string()), ("flagged_at", UTC_TS)]))),
        pa.field("indicators", pa.map_(pa.string(), pa.list_(pa.string()))),
        pa.field("reasons", pa.list_(pa.string())),
    ]
)
FINDING_EXCHANGE_SCHEMA = pa.schema(
    [
        pa.field("request_id", pa.string(), nullable=False),
        pa.field("campaign_id", pa.string(), nullable=False),
    ]
)

# --------------------------------------------------------------------------------------
# Ground truth written by the traffic lab into truth/ (never read by the detector).
# --------------------------------------------------------------------------------------
TRUTH_ACCOUNT_SCHEMA = pa.schema(
    [
        pa.field("account_id", pa.string(), nullable=False),
        pa.field("population", pa.string(), nullable=False),  # honest population or "attacker"
        pa.field("is_attack", pa.bool_(), nullable=False),  # carries any campaign traffic
        pa.field("campaign_id", pa.string()),  # the campaign whose operator controls it
    ]
)
TRUTH_EXCHANGE_SCHEMA = pa.schema(
    [
        pa.field("request_id", pa.string(), nullable=False),
        pa.field("account_id", pa.string(), nullable=False),
        pa.field("campaign_id", pa.string()),  # null for honest exchanges
        pa.field("ts", UTC_TS, nullable=False),
    ]
)
TRUTH_CAMPAIGN_SCHEMA = pa.schema(
    [
        pa.field("campaign_id", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),  # e.g. reasoning_extraction
        pa.field("start", UTC_TS, nullable=False),
        pa.field("end", UTC_TS, nullable=False),
        pa.field("n_accounts", pa.int64()),
        pa.field("n_exchanges", pa.int64()),
        pa.field("pivot_model", pa.string()),  # model it pivots to, if any
        pa.field("pivot_start", UTC_TS),  # when the pivot began
    ]
)
TRUTH_RELEASE_SCHEMA = pa.schema(
    [
        pa.field("model", pa.string(), nullable=False),
        pa.field("released_at", UTC_TS, nullable=False),
    ]
)


def empty_table(schema: pa.Schema) -> pa.Table:
    """An empty table of `schema`: handy for DDL and for writers with nothing to write."""
    return schema.empty_table()


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Reorder, add missing nullable columns and cast `table` to `schema`.

    Raises ValueError naming the column if a required column is missing.
    """
    columns = []
    for field in schema:
        if field.name in table.column_names:
            columns.append(table[field.name].cast(field.type))
        elif field.nullable:
            columns.append(pa.nulls(table.num_rows, field.type))
        else:
            raise ValueError(f"required column {field.name!r} is missing")
    return pa.Table.from_arrays(columns, schema=schema)
