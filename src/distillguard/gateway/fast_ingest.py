"""The store worker's fast path: WAL segments of clean gateway records -> the store.

`distillguard.ingest.ingest_paths` validates any input in one large DuckDB query per batch
(JSON parsed field by field, every rule of the log contract, caps, quarantine). On the
gateway's own WAL that cost ~0.6 ms of CPU per exchange (about half a fixed cost per segment,
half per row), as much as the gateway's event loop spends on the request. But nearly every
record in the WAL is one the gateway built itself, so it is known to be well formed.

Here a segment is parsed with orjson and each record is checked in Python against the same
rules the validator applies (types, required fields, allowed values, caps); a segment whose
every record passes (`clean_table`) becomes one Arrow table of the contract's schema, and the
tables of consecutive clean segments are appended in one transaction, in input order, after a
check that none of their request ids is stored already or repeated (`store_clean`). Anything
else goes through `ingest_paths` unchanged, a whole segment at a time:

* a segment holding any record the checks do not accept as clean (a record from
  `/v1/exchanges` with a timestamp in another format, a line over the text cap that would be
  truncated, an invalid IP from a proxy header, a line the validator would quarantine, ...);
* a group of segments with any request id already stored or repeated (a segment replayed
  after a crash between ingest and delete): the validator counts the replays and quarantines
  conflicts exactly as before;
* everything, if the contract or the validator's rules change (`FAST_PATH_OK` compares them
  with what the checks here were written against), until this module is updated.

So the rows stored are the ones `ingest_paths` would store (`tests/test_gateway_store_worker.py`
ingests a variety of gateway records both ways and compares the stores), and the durability
semantics (exactly once, replay idempotent) do not change.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from pathlib import Path

import orjson
import pyarrow as pa

from distillguard import contract, store
from distillguard.ingest import validate

log = logging.getLogger("distillguard.gateway")

SCHEMA = contract.EXCHANGE_SCHEMA
CAP = contract.TEXT_FIELD_CAP_BYTES
#: The timestamp format the gateway writes (`exchange.iso`); any other goes the validator's way.
TS_RE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}\+00:00", re.ASCII)
IP_RES = (re.compile(validate.IPV4, re.ASCII), re.compile(validate.IPV6, re.ASCII))
ROLES = frozenset(contract.MESSAGE_ROLES)
ENDPOINTS = frozenset(contract.ENDPOINTS)
INT64 = (-(1 << 63), (1 << 63) - 1)
INT32 = (-(1 << 31), (1 << 31) - 1)

#: (name, kind) of the fields read from a record, in schema order (extra, truncated_fields
#: are computed).
FIELDS = [(f.name, validate.value_kind(f.type)) for f in validate.EXCHANGES.fields]
KNOWN = frozenset(f.name for f in SCHEMA)
PARAMS = [(f.name, validate.value_kind(f.type)) for f in contract.PARAMS_TYPE]
PARAM_NAMES = frozenset(name for name, _ in PARAMS)
NON_NEGATIVE = frozenset(("input_tokens", "output_tokens", "reasoning_tokens", "latency_ms"))
INT_RANGE = {f.name: INT32 if f.type == pa.int32() else INT64
             for f in SCHEMA if pa.types.is_integer(f.type)}

# What the checks below were written against: the contract's exchange schema and the
# validator's required fields, dedupe key and identity, rules (their SQL), caps, roles and
# endpoints. Any change disables the fast path (every segment goes through `ingest_paths`)
# until this module is reviewed and EXPECTED_SIGNATURE updated.
EXPECTED_SIGNATURE = "1f8b2b37e7ccccf1"


def signature() -> str:
    spec = validate.EXCHANGES
    parts = [",".join(f"{f.name}:{f.type}{'' if f.nullable else '!'}" for f in SCHEMA),
             ",".join(spec.required), spec.key, ",".join(spec.identity),
             *(f"{c.column}:{c.predicate}" for c in spec.checks), str(CAP),
             ",".join(contract.MESSAGE_ROLES), ",".join(contract.ENDPOINTS), validate.IPV4,
             validate.IPV6, str(contract.LINE_CAP_BYTES)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


FAST_PATH_OK = signature() == EXPECTED_SIGNATURE
if not FAST_PATH_OK:
    log.warning("store worker: the log contract changed; every WAL segment takes the "
                "validating ingest path until gateway/fast_ingest.py is reviewed")


class NotClean(Exception):
    """The record (so its segment) goes through the validating ingest path."""


def _str(value: object) -> str | None:
    if value is None or type(value) is str:
        return value
    raise NotClean


def _int(value: object, lo_hi: tuple[int, int]) -> int | None:
    if value is None:
        return None
    if type(value) is not int or not lo_hi[0] <= value <= lo_hi[1]:
        raise NotClean
    return value


def _float(value: object) -> float | None:
    if value is None:
        return None
    if type(value) is int:
        value = float(value)  # OverflowError for a huge integer: not clean
    if type(value) is not float or not math.isfinite(value):
        raise NotClean
    return value


def _bool(value: object) -> bool | None:
    if value is None or type(value) is bool:
        return value
    raise NotClean


def _str_list(value: object) -> list[str] | None:
    if value is None:
        return None
    if type(value) is not list or any(type(v) is not str for v in value):
        raise NotClean
    return value


def _messages(value: object) -> list[dict]:
    """Non-empty, string roles among the allowed ones, string content, a user message."""
    if type(value) is not list or not value:
        raise NotClean
    user = False
    for m in value:
        if type(m) is not dict or len(m) != 2 or type(m.get("content")) is not str:
            raise NotClean
        role = m.get("role")
        if type(role) is not str or role not in ROLES:
            raise NotClean
        user = user or role == "user"
    if not user:
        raise NotClean
    return value


def _params(value: object) -> dict | None:
    if value is None:
        return None
    if type(value) is not dict or not value.keys() <= PARAM_NAMES:
        raise NotClean  # an unknown key would become extra "params.<key>"
    for name, kind in PARAMS:
        v = value.get(name)
        if v is None:
            continue
        if kind == "float":
            _float(v)
        elif kind == "int":
            _int(v, INT64)
            if v < (1 if name == "n" else 0):
                raise NotClean
        elif kind == "bool":
            _bool(v)
        else:
            _str(v)
    return value


def _extra_value(value: object) -> str:
    """An unknown top-level key's value as the validator stores it (JSON text). Only the
    shapes the gateway writes (strings, booleans, integers, lists of strings) are taken;
    control characters and backslashes (escaping details) go the validator's way."""
    if type(value) is str:
        if not value.isprintable() or "\\" in value:
            raise NotClean
    elif type(value) is list:
        for v in value:
            if type(v) is not str or not v.isprintable() or "\\" in v:
                raise NotClean
    elif type(value) is int:
        _int(value, INT64)
    elif type(value) is not bool:
        raise NotClean
    return orjson.dumps(value).decode()


def clean_row(rec: object, columns: dict[str, list]) -> None:
    """Append a clean record's values to `columns`; raise NotClean for any other."""
    if type(rec) is not dict:
        raise NotClean
    extra = None
    for key in rec:
        if key not in KNOWN:
            if extra is None:
                extra = []
            extra.append((key, _extra_value(rec[key])))
        elif key in ("extra", "truncated_fields"):
            raise NotClean
    values = []
    for name, kind in FIELDS:
        v = rec.get(name)
        if kind == "str":
            v = _str(v)
        elif kind == "ts":
            if type(v) is not str or not TS_RE.fullmatch(v):
                raise NotClean
        elif kind == "int":
            v = _int(v, INT_RANGE[name])
            if v is not None and name in NON_NEGATIVE and v < 0:
                raise NotClean
        elif kind == "float":
            v = _float(v)
            if v is not None and name in NON_NEGATIVE and v < 0:
                raise NotClean
        elif kind == "bool":
            v = _bool(v)
        elif kind == "str_list":
            v = _str_list(v)
        elif kind == "messages":
            v = _messages(v)
        elif kind == "object":
            v = _params(v)
        else:
            raise NotClean
        values.append(v)
    if not rec.get("request_id") or not rec.get("account_id") or not rec.get("model"):
        raise NotClean  # required (ts and messages are checked above)
    endpoint, ip, status = rec.get("endpoint"), rec.get("ip"), rec.get("status")
    if endpoint is not None and endpoint not in ENDPOINTS:
        raise NotClean
    if ip is not None and not (IP_RES[0].fullmatch(ip) or IP_RES[1].fullmatch(ip)):
        raise NotClean
    if status is not None and not 100 <= status <= 599:
        raise NotClean
    for (name, _), v in zip(FIELDS, values, strict=True):
        columns[name].append(v)
    columns["extra"].append(extra)
    columns["truncated_fields"].append(None)


def clean_table(path: Path) -> pa.Table | None:
    """The segment as a table of the contract's schema, or None if any record is not clean
    (or the file cannot be read whole: the validating path reports that)."""
    if not FAST_PATH_OK:
        return None
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if b"\\u0000" in data:
        return None  # NUL characters: the validator's business
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    columns: dict[str, list] = {f.name: [] for f in SCHEMA}
    try:
        for line in lines:
            if len(line) > CAP:  # a field could be over the text cap: truncation
                return None
            clean_row(orjson.loads(line), columns)
    except (NotClean, orjson.JSONDecodeError, OverflowError, ValueError, TypeError):
        return None
    try:
        arrays = []
        for f in SCHEMA:
            if f.name == "ts":
                arrays.append(pa.array(columns["ts"], pa.string()).cast(f.type))
            else:
                arrays.append(pa.array(columns[f.name], f.type))
        return pa.Table.from_arrays(arrays, schema=SCHEMA)
    except (pa.ArrowException, ValueError, TypeError, OverflowError):
        return None


def store_clean(con, tables: list[pa.Table]) -> bool:
    """Append `tables` (in order) to the store in one transaction, unless a request id among
    them repeats or is stored already: then nothing is written and False is returned (the
    caller hands those segments to the validating path, which counts replays)."""
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    ids = table.column("request_id")
    if len(ids.unique()) != len(ids):
        return False
    columns = ", ".join(validate.ident(f.name) for f in SCHEMA)
    con.register("_dg_fast", table)
    try:
        with store.transaction(con):
            stored = con.execute(
                "SELECT count(*) FROM exchanges WHERE request_id IN "
                "(SELECT request_id FROM _dg_fast)").fetchone()[0]
            if not stored:
                con.execute(f"INSERT INTO exchanges ({columns}) SELECT {columns} FROM _dg_fast")
    finally:
        con.unregister("_dg_fast")
    return not stored
