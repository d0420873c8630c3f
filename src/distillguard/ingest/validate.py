"""Vectorised validation: raw rows -> contract rows or a quarantine reason, in one DuckDB query.

Nothing here loops over rows in Python. A batch of input lines (JSONL) or of Parquet rows is
turned by a single SQL statement into the contract columns plus `reason` / `detail` for rows
that must be quarantined. The SQL is generated from the Arrow schemas in `contract`, so a new
contract field is validated without touching this module.

Stages of the generated query:
1. *format* (JSON or Parquet): extract each field, check its type, parse timestamps. A clean
   JSON line is parsed once (one `json_transform`) and typed from that; any other line takes
   the exact per-field path that names every problem (see `json_stage`);
2. *common*: required fields, allowed values, at least one user message, text caps;
3. *verdict*: the first problem (by `contract.QUARANTINE_REASONS` order) becomes the reason,
   every problem goes into `detail`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import duckdb
import pyarrow as pa

from distillguard import contract

CAP = contract.TEXT_FIELD_CAP_BYTES
RAW_CAP = contract.QUARANTINE_RAW_CAP_BYTES

#: RFC 3339 date-time with a mandatory zone (Z or +hh:mm); space or T separator.
RFC3339 = r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:?\d{2})"
IPV4 = r"((25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
IPV6 = r"[0-9A-Fa-f:]*:[0-9A-Fa-f:.]*(%[0-9A-Za-z._-]+)?"

# Helper macros, created per connection (TEMP) before the first batch.
_MACROS = f"""
CREATE OR REPLACE TEMP MACRO dg_fit(t, cap) AS
    left(t, (length(t) - greatest(0, strlen(t) - cap))::BIGINT);
-- Cut text to at most `cap` UTF-8 bytes on a character boundary (estimate, then fit).
CREATE OR REPLACE TEMP MACRO dg_cap(s, cap) AS CASE
    WHEN s IS NULL OR strlen(s) <= cap THEN s
    ELSE dg_fit(left(s, (cap * length(s) // strlen(s))::BIGINT), cap) END;
-- RFC 3339 with zone -> UTC instant, truncated to milliseconds; zone-less -> NULL.
CREATE OR REPLACE TEMP MACRO dg_ts(s) AS CASE
    WHEN regexp_full_match(s, '{RFC3339}')
    THEN make_timestamptz(epoch_ms(try_cast(upper(s) AS TIMESTAMPTZ)) * 1000) END;
CREATE OR REPLACE TEMP MACRO dg_epoch_ms(x) AS make_timestamptz((x * 1000)::BIGINT);
CREATE OR REPLACE TEMP MACRO dg_is_ip(s) AS
    regexp_full_match(s, '{IPV4}') OR regexp_full_match(s, '{IPV6}');
-- One content part (JSON text) -> text: text parts keep their text, images become
-- the image placeholder, any other part becomes "[type]".
CREATE OR REPLACE TEMP MACRO dg_part(p) AS CASE left(p, 1)
    WHEN '"' THEN p ->> '$'
    WHEN '{{' THEN CASE
        WHEN json_type(p, '$.text') = 'VARCHAR' THEN json_extract_string(p, '$.text')
        WHEN json_extract_string(p, '$.type') ILIKE '%image%'
            THEN '{contract.IMAGE_PLACEHOLDER}'
        ELSE '[' || coalesce(json_extract_string(p, '$.type'), 'part') || ']' END
    ELSE '' END;
-- Message content (JSON text): a string, a list of parts, or null/absent (-> '').
CREATE OR REPLACE TEMP MACRO dg_content(c) AS CASE
    WHEN c IS NULL OR c = 'null' THEN ''
    WHEN left(c, 1) = '"' THEN c ->> '$'
    WHEN left(c, 1) = '[' THEN array_to_string(
        list_transform(json_transform(c, '["JSON"]'), lambda p: dg_part(p)), chr(10))
    END;
-- Well-typed content starts like a string, a list, or null.
CREATE OR REPLACE TEMP MACRO dg_content_ok(c) AS c IS NULL OR left(c, 1) IN ('"', '[', 'n');
"""


def install_macros(con: duckdb.DuckDBPyConnection) -> None:
    """Create the helper macros on `con` (idempotent, connection-local)."""
    con.execute(_MACROS)


def sql_str(value: str) -> str:
    """A SQL string literal."""
    return "'" + value.replace("'", "''") + "'"


def sql_list(values: tuple[str, ...] | list[str]) -> str:
    return "[" + ", ".join(sql_str(v) for v in values) + "]"


def ident(name: str) -> str:
    """A quoted SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


# --------------------------------------------------------------------------------------
# Which contract field is which kind of value, derived from the Arrow schema.
# --------------------------------------------------------------------------------------
COMPUTED = ("extra", "truncated_fields")  # filled by ingest, not read as plain fields


def value_kind(dtype: pa.DataType) -> str:
    """Map an Arrow type of the contract to the validator's notion of a value kind."""
    if pa.types.is_string(dtype):
        return "str"
    if pa.types.is_timestamp(dtype):
        return "ts"
    if pa.types.is_integer(dtype):
        return "int"
    if pa.types.is_floating(dtype):
        return "float"
    if pa.types.is_boolean(dtype):
        return "bool"
    if pa.types.is_list(dtype) and pa.types.is_string(dtype.value_type):
        return "str_list"
    if pa.types.is_list(dtype) and dtype.value_type == contract.MESSAGE_TYPE:
        return "messages"
    if pa.types.is_struct(dtype):
        return "object"
    raise TypeError(f"no validator for contract type {dtype}")


@dataclass(frozen=True)
class Check:
    """A value rule: `predicate` (SQL over the typed column) must hold when the value is set."""

    column: str
    predicate: str
    detail: str


@dataclass(frozen=True)
class KindSpec:
    """Everything ingest needs to know about one record kind."""

    kind: str  # "exchanges" | "accounts": also the store table name
    schema: pa.Schema
    required: tuple[str, ...]
    key: str  # dedupe key
    identity: tuple[str, ...]  # same key + same identity = harmless replay
    checks: tuple[Check, ...] = field(default=())

    @property
    def fields(self) -> list[pa.Field]:
        return [f for f in self.schema if f.name not in COMPUTED]

    @property
    def known_keys(self) -> list[str]:
        return [f.name for f in self.schema]


def _non_negative(*columns: str) -> tuple[Check, ...]:
    return tuple(Check(c, f"{ident(c)} >= 0", f"{c}: must not be negative") for c in columns)


EXCHANGES = KindSpec(
    kind="exchanges",
    schema=contract.EXCHANGE_SCHEMA,
    required=contract.EXCHANGE_REQUIRED,
    key="request_id",
    identity=("ts", "account_id", "model"),
    checks=(
        Check(
            "endpoint",
            f"list_contains({sql_list(contract.ENDPOINTS)}, endpoint)",
            "endpoint: not one of " + ", ".join(contract.ENDPOINTS),
        ),
        Check("ip", "dg_is_ip(ip)", "ip: not an IPv4/IPv6 address"),
        Check("status", "status BETWEEN 100 AND 599", "status: not an HTTP status (100-599)"),
        *_non_negative("input_tokens", "output_tokens", "reasoning_tokens", "latency_ms"),
        Check("params", "coalesce(params.n, 1) >= 1", "params.n: must be at least 1"),
        Check(
            "params",
            "coalesce(params.max_tokens, 0) >= 0 AND coalesce(params.reasoning_budget, 0) >= 0",
            "params: max_tokens / reasoning_budget must not be negative",
        ),
        Check(
            "messages",
            f"list_count(_roles) = len(_roles) AND list_has_all({sql_list(contract.MESSAGE_ROLES)}, _roles)",
            "messages: role not one of " + ", ".join(contract.MESSAGE_ROLES),
        ),
        Check(
            "messages",
            "len(_roles) = 0 OR list_contains(_roles, 'user')",  # empty: missing_field
            "messages: no user message",
        ),
    ),
)

ACCOUNTS = KindSpec(
    kind="accounts",
    schema=contract.ACCOUNT_SCHEMA,
    required=contract.ACCOUNT_REQUIRED,
    key="account_id",
    identity=tuple(f.name for f in contract.ACCOUNT_SCHEMA if f.name not in ("account_id", "extra")),
    checks=(
        Check(
            "verification_path",
            f"list_contains({sql_list(contract.VERIFICATION_PATHS)}, verification_path)",
            "verification_path: not one of " + ", ".join(contract.VERIFICATION_PATHS),
        ),
        Check("signup_ip", "dg_is_ip(signup_ip)", "signup_ip: not an IPv4/IPv6 address"),
    ),
)

SPECS = {spec.kind: spec for spec in (EXCHANGES, ACCOUNTS)}

# Priority prefix so `list_sort(problems)[1]` is the most important problem.
_PRIORITY = {reason: f"{i:02d}" for i, reason in enumerate(contract.QUARANTINE_REASONS)}


def problem(condition: str, reason: str, detail_sql: str) -> str:
    """SQL for one problem entry: 'NN|reason|detail' when `condition` holds, else NULL."""
    return f"CASE WHEN {condition} THEN '{_PRIORITY[reason]}|{reason}|' || {detail_sql} END"


def duck_types(con: duckdb.DuckDBPyConnection, table: str) -> dict[str, str]:
    """Column name -> DuckDB type of a store table (the contract as DuckDB sees it)."""
    return {r[0]: r[1] for r in con.execute(f"DESCRIBE {ident(table)}").fetchall()}


# --------------------------------------------------------------------------------------
# Stage 1a: JSON lines.  Input relation columns: row_number, line, raw, raw_length,
# pre_reason (bad_utf8 / oversize decided while reading bytes).
# --------------------------------------------------------------------------------------
_NUMERIC = "('BIGINT', 'UBIGINT', 'DOUBLE')"
_INTEGER = "('BIGINT', 'UBIGINT')"
_TYPE_NAMES = {
    "str": "string",
    "ts": "RFC 3339 string or epoch milliseconds",
    "int": "integer",
    "float": "number",
    "bool": "boolean",
    "str_list": "list of strings",
    "messages": "list of {role, content}",
    "object": "object",
}


def _json_scalar(kind: str, t: str, v: str, duck_type: str) -> tuple[str, str]:
    """(typed value SQL, SQL condition that the JSON type is wrong) for a scalar kind."""
    if kind == "str":
        return f"CASE WHEN {t} = 'VARCHAR' THEN {v} END", f"{t} <> 'VARCHAR'"
    if kind == "int":
        return (
            f"CASE WHEN {t} IN {_INTEGER} THEN try_cast({v} AS {duck_type}) END",
            f"{t} NOT IN {_INTEGER} OR try_cast({v} AS {duck_type}) IS NULL",
        )
    if kind == "float":
        return f"CASE WHEN {t} IN {_NUMERIC} THEN {v}::DOUBLE END", f"{t} NOT IN {_NUMERIC}"
    if kind == "bool":
        return f"CASE WHEN {t} = 'BOOLEAN' THEN {v} = 'true' END", f"{t} <> 'BOOLEAN'"
    if kind == "ts":
        return (
            f"CASE WHEN {t} = 'VARCHAR' THEN dg_ts({v}) "
            f"WHEN {t} IN {_NUMERIC} THEN dg_epoch_ms({v}::DOUBLE) END",
            f"{t} NOT IN ('VARCHAR', {_NUMERIC[1:-1]})",
        )
    raise TypeError(kind)


def _json_field(f: pa.Field, t: str, v: str, duck_type: str) -> tuple[str, list[str]]:
    """(typed value SQL, problem SQLs) for one top-level JSON field."""
    kind = value_kind(f.type)
    name = f.name
    present = f"{t} IS NOT NULL AND {t} <> 'NULL'"
    got = f"'{name}: expected {_TYPE_NAMES[kind]}, got ' || lower({t})"
    if kind in ("str", "int", "float", "bool", "ts"):
        value, wrong = _json_scalar(kind, t, v, duck_type)
        problems = [problem(f"{present} AND ({wrong})", "bad_type", got)]
        if kind == "ts":
            problems.append(
                problem(
                    f"{t} = 'VARCHAR' AND {v} <> '' AND dg_ts({v}) IS NULL",
                    "bad_timestamp",
                    f"'{name}: not RFC 3339 with a time zone: ' || left({v}, 80)",
                )
            )
        return value, problems
    if kind == "str_list":
        elem_types = f"json_type({v}, '$[*]')"
        value = f"CASE WHEN {t} = 'ARRAY' THEN json_transform({v}, '[\"VARCHAR\"]') END"
        others = sql_list(["BIGINT", "UBIGINT", "DOUBLE", "BOOLEAN", "NULL", "ARRAY", "OBJECT"])
        wrong = f"{t} <> 'ARRAY' OR list_has_any({elem_types}, {others})"
        return value, [problem(f"{present} AND ({wrong})", "bad_type", f"'{name}: expected list of strings'")]
    if kind == "messages":
        # role/content kept as JSON text here; converted in the next layer.
        value = (
            f"CASE WHEN {t} = 'ARRAY' THEN "
            f"json_transform({v}, '[{{\"role\":\"JSON\",\"content\":\"JSON\"}}]') END"
        )
        return value, [problem(f"{present} AND {t} <> 'ARRAY'", "bad_type", got)]
    if kind == "object":
        return _json_object(f, t, v, duck_type, present, got)
    raise TypeError(kind)


def _json_object(
    f: pa.Field, t: str, v: str, duck_type: str, present: str, got: str
) -> tuple[str, list[str]]:
    """A nested object of scalars (params): one parse for all sub-field types and values."""
    subs = list(f.type)
    st, sv = _object_columns(f.name)
    sub_types = _struct_member_types(duck_type)
    parts, problems = [], [problem(f"{present} AND {t} <> 'OBJECT'", "bad_type", got)]
    for i, s in enumerate(subs, start=1):
        sub_t, sub_v = f"({st})[{i}]", f"({sv})[{i}]"
        value, wrong = _json_scalar(value_kind(s.type), sub_t, sub_v, sub_types[s.name])
        parts.append(f"{ident(s.name)} := {value}")
        sub_present = f"{t} = 'OBJECT' AND {sub_t} IS NOT NULL AND {sub_t} <> 'NULL'"
        problems.append(
            problem(
                f"{sub_present} AND ({wrong})",
                "bad_type",
                f"'{f.name}.{s.name}: expected {_TYPE_NAMES[value_kind(s.type)]}, got ' "
                f"|| lower({sub_t})",
            )
        )
    value = f"CASE WHEN {t} = 'OBJECT' THEN struct_pack({', '.join(parts)}) END"
    return value, problems


def _object_columns(name: str) -> tuple[str, str]:
    """Columns holding the sub-field types / values of nested object `name` (one parse)."""
    return f"_ot_{name}", f"_ov_{name}"


def _object_extracts(fields: list[pa.Field]) -> str:
    """SQL select items that parse every nested object field once (see `_object_columns`)."""
    items = []
    for i, f in _object_fields(fields):
        t, v = f"_t[{i + 2}]", f"_v[{i + 1}]"
        paths = sql_list([f'$."{s.name}"' for s in f.type])
        st, sv = _object_columns(f.name)
        items.append(f"CASE WHEN {t} = 'OBJECT' THEN json_type({v}, {paths}) END AS {st}")
        items.append(f"CASE WHEN {t} = 'OBJECT' THEN json_extract_string({v}, {paths}) END AS {sv}")
    return "".join(", " + item for item in items)


def _struct_member_types(duck_type: str) -> dict[str, str]:
    """Member name -> DuckDB type for a flat STRUCT(...) type string."""
    inner = duck_type[duck_type.index("(") + 1 : duck_type.rindex(")")]
    members = {}
    for item in inner.split(","):
        name, typ = item.strip().split(" ", 1)
        members[name.strip('"')] = typ.strip()
    return members


def _unknown_entries(json_sql: str, known: str, prefix: str, values: str = "JSON") -> str:
    """SQL: a MAP of the keys of JSON object `json_sql` not in `known`, values as JSON text
    (or, with values="VARCHAR", strings as themselves). A key repeated in the object keeps
    its first value (a MAP needs unique keys)."""
    entries = f"""map_entries(json_transform({json_sql}, '"MAP(VARCHAR, {values})"'))"""
    first = "lambda e, i: list_position(list_transform(_es, lambda x: x.key), e.key) = i"
    return f"""nullif(map_from_entries(list_transform(list_filter(
                    list_filter({entries}, {first.replace("_es", entries)}),
                    lambda e: NOT list_contains({known}, e.key)),
                    lambda e: {{'key': {sql_str(prefix)} || e.key, 'value': e.value::VARCHAR}})),
                    MAP {{}}::MAP(VARCHAR, VARCHAR))"""


def _object_fields(fields: list[pa.Field]) -> list[tuple[int, pa.Field]]:
    return [(i, f) for i, f in enumerate(fields) if value_kind(f.type) == "object"]


def _object_has_unknown(name: str) -> str:
    """Column: does nested object field `name` hold keys outside the contract?"""
    return f"_ox_{name}"


def _object_unknown_flags(fields: list[pa.Field]) -> str:
    """SQL select items computing `_object_has_unknown` for every nested object field."""
    return "".join(
        f", coalesce(len(json_keys(_v[{i + 1}])) > list_count({_object_columns(f.name)[0]}), "
        f"false) AS {_object_has_unknown(f.name)}"
        for i, f in _object_fields(fields)
    )


def _params_extra(fields: list[pa.Field]) -> str:
    """SQL: unknown keys of every nested object field (params) as "<field>.<key>" entries."""
    parts = [
        f"CASE WHEN {_object_has_unknown(f.name)} THEN "
        f"{_unknown_entries(f'_v[{i + 1}]', sql_list([s.name for s in f.type]), f.name + '.')} END"
        for i, f in _object_fields(fields)
    ]
    return ", ".join(parts) if parts else "NULL::MAP(VARCHAR, VARCHAR)"


#: Route clean JSON lines through the single-parse fast path (False: every row takes the
#: exact per-field path; the tests use it to prove both give identical rows).
FAST_JSON = True

_NUMBER_START = "('-', '0', '1', '2', '3', '4', '5', '6', '7', '8', '9')"


def _fast_scalar(kind: str, x: str, duck_type: str) -> tuple[str, str]:
    """(is-clean SQL, typed value SQL) for a JSON-text value `x` of a scalar kind.

    "Clean" means the value has exactly the JSON type the contract wants, so the exact path
    would report no problem for it and produce the same value (the same text reaches the
    same cast). Anything else (a wrong type, an integer out of range) is not clean and the
    row takes the exact path, which reports it."""
    first = f"left({x}, 1)"
    if kind == "str":
        return f"{first} = '\"'", f"{x} ->> '$'"
    if kind == "int":
        return (
            f"(regexp_full_match({x}, '-?[0-9]+') AND try_cast({x}::VARCHAR AS {duck_type}) "
            "IS NOT NULL)",
            f"try_cast({x}::VARCHAR AS {duck_type})",
        )
    if kind == "float":
        return f"{first} IN {_NUMBER_START}", f"{x}::VARCHAR::DOUBLE"
    if kind == "bool":
        return f"{x}::VARCHAR IN ('true', 'false')", f"{x}::VARCHAR = 'true'"
    if kind == "ts":
        return (
            f"({first} = '\"' OR {first} IN {_NUMBER_START})",
            f"CASE WHEN {first} = '\"' THEN dg_ts({x} ->> '$') "
            f"ELSE dg_epoch_ms({x}::VARCHAR::DOUBLE) END",
        )
    raise TypeError(kind)


def _fast_spec(names: list[str]) -> str:
    """json_transform structure: every top-level key as JSON text (one parse per line)."""
    return sql_str("{" + ", ".join(f'"{n}": "JSON"' for n in names) + "}")


def _fast_stage(spec: KindSpec, types: dict[str, str]) -> tuple[str, dict[str, str], str, str]:
    """The single-parse path for clean lines.

    Returns (clean condition, {field: typed value}, format problems, present-key count), all
    SQL over `_j` (the line as a struct of JSON texts) and `_fp_<object>` (nested objects).
    """
    clean, values = ["_j IS NOT NULL"], {}
    present = []
    problems = []
    for f in spec.fields:
        kind, x = value_kind(f.type), f"_j.{ident(f.name)}"
        present.append(f"({x} IS NOT NULL)::INT")
        if kind in ("str", "int", "float", "bool", "ts"):
            ok, value = _fast_scalar(kind, x, types[f.name])
            if kind == "ts":
                problems.append(
                    problem(
                        f"left({x}, 1) = '\"' AND ({x} ->> '$') <> '' AND {value} IS NULL",
                        "bad_timestamp",
                        f"'{f.name}: not RFC 3339 with a time zone: ' || left({x} ->> '$', 80)",
                    )
                )
        elif kind == "str_list":
            others = sql_list(["BIGINT", "UBIGINT", "DOUBLE", "BOOLEAN", "NULL", "ARRAY", "OBJECT"])
            ok = f"(left({x}, 1) = '[' AND NOT list_has_any(json_type({x}, '$[*]'), {others}))"
            value = f"json_transform({x}, '[\"VARCHAR\"]')"
        elif kind == "messages":
            ok = f"left({x}, 1) = '['"
            value = f"json_transform({x}, '[{{\"role\":\"JSON\",\"content\":\"JSON\"}}]')"
        elif kind == "object":
            sub = f"_fp_{f.name}"
            subs, parts = [], []
            member_types = _struct_member_types(types[f.name])
            for s in f.type:
                sx = f"{sub}.{ident(s.name)}"
                s_ok, s_value = _fast_scalar(value_kind(s.type), sx, member_types[s.name])
                subs.append((sx, s_ok))
                parts.append(f"{ident(s.name)} := CASE WHEN {sx} IS NOT NULL THEN {s_value} END")
            # Every key of the object is a known sub-field with a value (no unknown keys).
            counted = " + ".join(f"({sx} IS NOT NULL)::INT" for sx, _ in subs)
            ok = (
                f"(left({x}, 1) = '{{' AND len(json_keys({x})) = {counted} AND "
                + " AND ".join(f"({sx} IS NULL OR {s_ok})" for sx, s_ok in subs)
                + ")"
            )
            value = f"struct_pack({', '.join(parts)})"
        else:
            raise TypeError(kind)
        clean.append(f"({x} IS NULL OR {ok})")
        values[f.name] = f"CASE WHEN {x} IS NOT NULL THEN {value} END"
    # The input's own `extra` / `truncated_fields` (our export) take the exact path.
    clean.append("_j.\"extra\" IS NULL AND _j.\"truncated_fields\" IS NULL")
    problem_sql = f"concat_ws(chr(31), {', '.join(problems)})" if problems else "''"
    return " AND ".join(clean), values, problem_sql, " + ".join(present)


def json_stage(spec: KindSpec, types: dict[str, str], source: str, fast: bool | None = None) -> str:
    """SQL: JSON line batch `source` -> typed contract columns + format problems.

    Each line is parsed once into a struct of JSON texts (`_j`). A *clean* line (an object
    whose known fields all have the contract's JSON type, no `extra` / `truncated_fields` of
    its own, no unknown keys inside `params`) is typed from that struct directly. Any other
    line (bad JSON, bad UTF-8, a wrong type, ...) takes the exact per-field path: json_type and
    json_extract_string per field, every problem spelled out. DuckDB evaluates each branch of
    a CASE only for the rows that take it, so the exact path costs nothing for clean lines.
    """
    fast = FAST_JSON if fast is None else fast
    fields = spec.fields
    own = [f'$."{f.name}"' for f in fields] + ['$."extra"', '$."truncated_fields"']
    paths, value_paths = sql_list(["$", *own]), sql_list(own)
    known = sql_list(spec.known_keys)
    n_own = len(own)
    cols, problems = [], []
    fast_clean, fast_values, fast_problems, fast_present = _fast_stage(spec, types)
    if not fast:
        fast_clean = "false"
    for i, f in enumerate(fields):
        t, v = f"_t[{i + 2}]", f"_v[{i + 1}]"
        value, probs = _json_field(f, t, v, types[f.name])
        cols.append(
            f"CASE WHEN _clean THEN {fast_values[f.name]} ELSE {value} END AS {ident(f.name)}"
        )
        problems.extend(probs)
    extra_t, extra_v = "_t_extra", "_v_extra"
    # Top-level keys not in the contract -> extra (JSON text per key), unknown keys inside
    # params -> extra as "params.<key>"; an "extra" object in the input (e.g. our own
    # export) is merged in. Cheap test first: more keys than known keys present.
    any_object_unknown = " OR ".join(
        [_object_has_unknown(f.name) for _, f in _object_fields(fields)] or ["false"]
    )
    extra = f"""CASE WHEN len(_keys) > list_count(_t) - 1 OR {extra_t} = 'OBJECT'
             OR {any_object_unknown}
        THEN map_concat(
        CASE WHEN len(_keys) > list_count(_t) - 1 THEN {_unknown_entries("line", known, "")} END,
        {_params_extra(fields)},
        CASE WHEN {extra_t} = 'OBJECT'
             THEN {_unknown_entries(extra_v, "[]::VARCHAR[]", "", "VARCHAR")} END) END"""
    # A clean line can only add unknown top-level keys (more keys than known ones set).
    fast_extra = f"""CASE WHEN len(_keys) > {fast_present}
        THEN {_unknown_entries("line", known, "")} END"""
    truncated_in = (
        "CASE WHEN _t_trunc = 'ARRAY' THEN json_transform(_v_trunc, '[\"VARCHAR\"]') END"
    )
    problem_list = ",\n            ".join(problems)
    objects = "".join(
        f", CASE WHEN left(_j.{ident(f.name)}, 1) = '{{' THEN json_transform(_j.{ident(f.name)}, "
        f"{_fast_spec([s.name for s in f.type])}) END AS _fp_{f.name}"
        for _, f in _object_fields(fields)
    )
    parse = "false"
    if fast:
        parse = "pre_reason IS NULL AND left(line, 1) = '{'"
    return f"""
    WITH _parsed AS (
        SELECT row_number, line, raw, raw_length, pre_reason, pre_detail,
               CASE WHEN {parse} THEN try(json_transform(line,
                   {_fast_spec([f.name for f in fields] + ["extra", "truncated_fields"])})) END
               AS _j
        FROM {source}
    ), _parsed2 AS (
        SELECT * {objects} FROM _parsed
    ), _routed AS (
        SELECT *, coalesce({fast_clean}, false) AS _clean FROM _parsed2
    ), _typed AS (
        SELECT *,
               CASE WHEN NOT _clean AND pre_reason IS NULL
                    THEN try(json_type(line, {paths})) END AS _t
        FROM _routed
    ), _values AS (
        SELECT *,
            CASE WHEN _t[1] = 'OBJECT' THEN json_extract_string(line, {value_paths}) END AS _v,
            CASE WHEN _clean OR _t[1] = 'OBJECT' THEN json_keys(line) END AS _keys,
            _t[{n_own}] AS {extra_t}, _t[{n_own + 1}] AS _t_trunc
        FROM _typed
    ), _values2 AS (
        SELECT *, _v[{len(fields) + 1}] AS {extra_v}, _v[{len(fields) + 2}] AS _v_trunc
            {_object_extracts(fields)}
        FROM _values
    ), _values3 AS (
        SELECT * {_object_unknown_flags(fields)} FROM _values2
    )
    SELECT row_number, _clean AS _fast, coalesce(raw, line) AS raw, raw_length,
        raw_length > {CAP} AS _may_exceed,
        CASE WHEN _clean THEN NULL
             WHEN pre_reason IS NOT NULL THEN pre_reason
             WHEN _t[1] IS DISTINCT FROM 'OBJECT' THEN 'bad_json' END AS pre_reason,
        CASE WHEN _clean THEN NULL
             WHEN pre_reason IS NOT NULL THEN pre_detail
             WHEN _t IS NULL THEN 'not valid JSON'
             WHEN _t[1] <> 'OBJECT' THEN 'a JSON ' || lower(_t[1]) || ', not an object'
             END AS pre_detail,
        {", ".join(cols)},
        CASE WHEN _clean THEN {fast_extra} ELSE {extra} END AS extra,
        CASE WHEN _clean THEN NULL ELSE {truncated_in} END AS _truncated_in,
        CASE WHEN _clean THEN {fast_problems} ELSE concat_ws(chr(31),
            {problem_list},
            {problem(f"{extra_t} NOT IN ('OBJECT', 'NULL')", "bad_type", "'extra: expected object'")},
            {problem("_t_trunc NOT IN ('ARRAY', 'NULL')", "bad_type",
                     "'truncated_fields: expected list of strings'")}
        ) END AS _format_problems
    FROM _values3
    """


# --------------------------------------------------------------------------------------
# Stage 1b: Parquet (already typed; cast what differs, parse string timestamps).
# --------------------------------------------------------------------------------------
_TS_TYPES = ("TIMESTAMP WITH TIME ZONE", "TIMESTAMP", "TIMESTAMP_MS", "TIMESTAMP_S", "TIMESTAMP_NS")


def parquet_stage(
    spec: KindSpec,
    types: dict[str, str],
    source: str,
    source_types: dict[str, str],
    may_exceed: bool = True,
) -> str:
    """SQL: a batch of Parquet rows `source` (plus `_dg_row`) -> typed columns + problems.

    A value that does not cast is a `bad_type` row; a column whose type cannot be cast to the
    contract at all fails the query (one clear error line for the file).
    """
    cols, problems = [], []
    for f in spec.fields:
        target = types[f.name]
        col = ident(f.name)
        have = source_types.get(f.name)
        if have is None:
            cols.append(f"NULL::{target} AS {col}")
        elif have == target:
            cols.append(f"{col}")
        elif value_kind(f.type) == "ts" and have == "VARCHAR":
            cols.append(f"dg_ts({col}) AS {col}")
            problems.append(
                problem(
                    f"{col} <> '' AND dg_ts({col}) IS NULL",
                    "bad_timestamp",
                    f"'{f.name}: not RFC 3339 with a time zone: ' || left({col}, 80)",
                )
            )
        elif value_kind(f.type) == "ts" and have in _TS_TYPES:
            # Naive Parquet timestamps are taken as UTC (Parquet's usual meaning).
            conv = col if have == _TS_TYPES[0] else f"timezone('UTC', {col}::TIMESTAMP)"
            cols.append(f"make_timestamptz(epoch_ms({conv}) * 1000) AS {col}")
        elif value_kind(f.type) == "ts" and have in ("BIGINT", "INTEGER", "UBIGINT", "DOUBLE"):
            cols.append(f"dg_epoch_ms({col}::DOUBLE) AS {col}")
        else:
            cols.append(f"try_cast({col} AS {target}) AS {col}")
            problems.append(
                problem(
                    f"{col} IS NOT NULL AND try_cast({col} AS {target}) IS NULL",
                    "bad_type",
                    f"'{f.name}: {have} value does not fit {target}'",
                )
            )
    known = set(spec.known_keys) | {"_dg_row"}
    unknown = [c for c in source_types if c not in known]
    entries = ", ".join(
        f"{{'key': {sql_str(c)}, 'value': to_json({ident(c)})::VARCHAR}}" for c in unknown
    )
    extra_parts = []
    if entries:
        extra_parts.append(
            f"map_from_entries(list_filter([{entries}], lambda e: e.value <> 'null'))"
        )
    if source_types.get("extra") == "MAP(VARCHAR, VARCHAR)":
        extra_parts.append("extra")
    extra = "NULL::MAP(VARCHAR, VARCHAR)"
    if extra_parts:
        extra = extra_parts[0] if len(extra_parts) == 1 else f"map_concat({', '.join(extra_parts)})"
    truncated_in = "NULL::VARCHAR[]"
    if source_types.get("truncated_fields") == "VARCHAR[]":
        truncated_in = "truncated_fields"
    problem_list = ", ".join(problems) if problems else "NULL"
    return f"""
    SELECT _dg_row AS row_number, NULL::VARCHAR AS raw, NULL::BIGINT AS raw_length,
        {str(may_exceed).lower()} AS _may_exceed,
        NULL::VARCHAR AS pre_reason, NULL::VARCHAR AS pre_detail,
        {", ".join(cols)},
        {extra} AS extra,
        {truncated_in} AS _truncated_in,
        concat_ws(chr(31), {problem_list}) AS _format_problems
    FROM {source}
    """


# --------------------------------------------------------------------------------------
# Stage 2 + 3: common rules and the verdict.
# --------------------------------------------------------------------------------------
def _messages_layer(spec: KindSpec, from_json: bool) -> tuple[str, list[str]]:
    """SQL that converts JSON-text role/content to text (JSON input) + its problems."""
    if not from_json or "messages" not in spec.known_keys:
        return "messages", []
    value = (
        "list_transform(messages, lambda m: {'role': CASE WHEN left(m.role, 1) = '\"' "
        "THEN m.role ->> '$' END, 'content': dg_content(m.content)})"
    )
    bad = problem(
        "len(list_filter(messages, lambda m: left(m.role, 1) IS DISTINCT FROM '\"' "
        "OR NOT dg_content_ok(m.content))) > 0",
        "bad_type",
        "'messages: each message needs a string role and string / list content'",
    )
    return value, [bad]


def _cap_columns(spec: KindSpec) -> tuple[list[str], list[str]]:
    """(select items that cut text to the cap, SQL names of truncated fields or NULL).

    Only rows that may exceed the cap (`_may_exceed`: a JSON line over the cap, or any
    Parquet row) pay for the per-field tests.
    """
    capped, flags = [], []
    for f in spec.fields:
        col, kind = ident(f.name), value_kind(f.type)
        if kind == "str":
            over = f"_may_exceed AND strlen({col}) > {CAP}"
            capped.append(f"CASE WHEN {over} THEN dg_cap({col}, {CAP}) ELSE {col} END AS {col}")
            flags.append(f"CASE WHEN {over} THEN {sql_str(f.name)} END")
        elif kind == "messages":
            over = (
                f"_may_exceed AND list_max(list_transform(messages, "
                f"lambda m: strlen(m.content))) > {CAP}"
            )
            capped.append(
                f"CASE WHEN {over} THEN list_transform(messages, lambda m: "
                f"{{'role': m.role, 'content': dg_cap(m.content, {CAP})}}) "
                "ELSE messages END AS messages"
            )
            flags.append(f"CASE WHEN {over} THEN 'messages' END")
        else:
            capped.append(col)
    return capped, flags


def validation_sql(spec: KindSpec, stage_sql: str, *, from_json: bool) -> str:
    """Wrap a format stage with the common rules; yields contract columns + reason/detail."""
    msg_value, msg_problems = _messages_layer(spec, from_json)
    names = [f.name for f in spec.fields]
    conv = [msg_value + " AS messages" if n == "messages" else ident(n) for n in names]
    conv_problems = "_format_problems"
    if msg_problems:
        conv_problems = f"concat_ws(chr(31), nullif(_format_problems, ''), {', '.join(msg_problems)})"
    roles = "NULL::VARCHAR[]"
    if "messages" in names:
        roles = "list_transform(messages, lambda m: m.role)"

    # Required fields: absent / null / empty, unless already reported as the wrong type.
    problems: list[str] = []
    for name in spec.required:
        kind = value_kind(spec.schema.field(name).type)
        empty = f"{ident(name)} IS NULL"
        if kind == "str":
            empty = f"({ident(name)} IS NULL OR {ident(name)} = '')"
        elif kind == "messages":
            empty = f"({ident(name)} IS NULL OR len({ident(name)}) = 0)"
        typed_wrong = f"contains(_format_problems, '|{name}:')"
        problems.append(
            problem(f"{empty} AND NOT {typed_wrong}", "missing_field", f"'{name}: required'")
        )
    for check in spec.checks:
        cond = f"{ident(check.column)} IS NOT NULL AND NOT coalesce({check.predicate}, false)"
        problems.append(problem(cond, "bad_value", sql_str(check.detail)))

    capped, flags = _cap_columns(spec)
    trunc_sql = ""
    if "truncated_fields" in spec.known_keys:
        computed = f"list_filter([{', '.join(flags)}], lambda x: x IS NOT NULL)" if flags else "[]"
        trunc_sql = f""",
            CASE WHEN _may_exceed OR _truncated_in IS NOT NULL THEN nullif(list_distinct(
                list_concat(coalesce(_truncated_in, []), {computed})), []) END
            AS truncated_fields"""
    out_cols = ", ".join(ident(f.name) for f in spec.schema)
    problem_list = ",\n                ".join(problems)
    sorted_problems = "list_sort(string_split(_problems, chr(31)))"
    return f"""
    WITH _stage AS ({stage_sql}
    ), _conv AS (
        SELECT row_number, raw, raw_length, _may_exceed, pre_reason, pre_detail,
               {conv_problems} AS _format_problems,
               {", ".join(conv)}, extra, _truncated_in
        FROM _stage
    ), _checked AS (
        SELECT *, {roles} AS _roles FROM _conv
    ), _judged AS (
        SELECT *, concat_ws(chr(31), nullif(_format_problems, ''),
                {problem_list}
            ) AS _problems
        FROM _checked
    ), _verdict AS (
        SELECT *,
            CASE WHEN pre_reason IS NOT NULL THEN pre_reason
                 WHEN _problems <> '' THEN split_part({sorted_problems}[1], '|', 2) END AS reason,
            CASE WHEN pre_reason IS NOT NULL THEN pre_detail
                 WHEN _problems <> '' THEN array_to_string(list_transform({sorted_problems},
                    lambda p: regexp_replace(p, '^\\d+\\|\\w+\\|', '')), '; ') END AS detail
        FROM _judged
    ), _final AS (
        SELECT row_number, reason, detail,
            CASE WHEN reason IS NOT NULL
                 THEN dg_cap(rtrim(raw, chr(13) || chr(10)), {RAW_CAP}) END AS raw,
            raw_length,
            {", ".join(capped)},
            CASE WHEN reason IS NULL THEN extra END AS extra{trunc_sql}
        FROM _verdict
    )
    SELECT row_number, reason, detail, raw, raw_length, {out_cols} FROM _final
    """
