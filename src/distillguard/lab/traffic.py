"""The behaviour engine shared by honest populations and campaigns.

A `Group` owns one population's or campaign's accounts and turns its knobs into traffic, one
simulated day and one bounded block of accounts at a time:

1. per-account counts for the day (heavy-tailed per-account rates x weekly shape x activity,
   capped; campaigns solve the rate from their total exchange target; eval harnesses add
   release bursts);
2. sessions (conversations / tool loops) with start times from the timing mode and short gaps
   inside a session;
3. per session: family, wrapper variant (template diversity, paraphrase), model (release
   adoption or pivot), reasoning; per account: client configuration, user agent, addresses;
4. one vectorised assembly into `contract.EXCHANGE_SCHEMA` and the truth rows.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from distillguard import contract
from distillguard.lab import prompts
from distillguard.lab._arrow import (
    TextBank,
    compact,
    dictionary_take,
    hex_ids,
    list_array,
    positions_within,
    small_dictionary,
)
from distillguard.lab.campaigns import HONEST_MIX
from distillguard.lab.infrastructure import (
    COUNTRIES,
    EMAIL_DOMAINS,
    Infrastructure,
    pick_per_kind,
)
from distillguard.lab.prompts import FAMILIES, PromptLibrary
from distillguard.lab.scenario import Scenario

DAY_MS = 86_400_000
HOUR_MS = 3_600_000
ROLES = pa.array(["user", "assistant", "tool"])
EFFORTS = pa.array(["low", "medium", "high"])
COT_FAMILIES = {"cot", "reasoning_reconstruction", "eval_math", "trace_reconstruction"}
FAMILY_NAMES = list(FAMILIES)
TOOLSETS = ["", "agent", "computer", "bfcl"]
STOP_REASONS = pa.array(["stop", "tool_calls"])
ERRORS = pa.array(["rate_limit_exceeded", "internal_error"])

#: Local-hour activity shapes (24 weights, hour 0 = local midnight).
PROFILES: dict[str, np.ndarray] = {
    "flat": np.ones(24),
    "office": np.array([1, .5, .3, .3, .3, .5, 1, 3, 7, 10, 10, 9, 7, 9, 10, 10, 9, 7, 4, 3, 3,
                        2.5, 2, 1.5]),
    "evening": np.array([4, 2.5, 1.2, .6, .4, .4, .8, 2, 3, 3.5, 4, 4.5, 5, 5, 4.5, 4.5, 5, 6,
                         7.5, 9, 10, 9.5, 8, 6]),
    "student": np.array([6, 4, 2, 1, .5, .3, .4, 1, 3, 5, 6, 6, 5, 6, 7, 7, 6, 5, 6, 7, 8, 9,
                         9, 8]),
    "night": np.array([8, 10, 10, 10, 9, 6, 2, .5, .3, .3, .3, .3, .3, .3, .3, .3, .3, .3, .3,
                       .3, .5, 1, 3, 6]),
}

PROFILE_NAMES = list(PROFILES)

#: Scheduler tick for diurnal_mimicry: an operator dispatches work in waves.
MIMICRY_TICK_S = 900.0


def _weights(mapping: dict) -> tuple[list, np.ndarray]:
    keys = list(mapping)
    w = np.array([float(mapping[k]) for k in keys])
    return keys, w / w.sum()


def _choose(rng: np.random.Generator, mapping: dict, size: int) -> np.ndarray:
    keys, p = _weights(mapping)
    return np.asarray(keys, dtype=object)[rng.choice(len(keys), size=size, p=p)]


def _choose_family(rng: np.random.Generator, mapping: dict, size: int) -> np.ndarray:
    """Family codes (indices into FAMILY_NAMES) drawn by the weights of `mapping`."""
    keys, p = _weights(mapping)
    codes = np.array([FAMILY_NAMES.index(k) for k in keys])
    return codes[rng.choice(len(keys), size=size, p=p)]


def _as_number(key: str | float | int) -> float:
    return np.nan if key in ("default", None) else float(key)


@dataclass
class AccountSet:
    """Per-account arrays of one group (index = position in the group)."""

    ids: pa.Array
    counters: np.ndarray  # global account counters (for api keys)
    tz: np.ndarray  # UTC offset, hours
    profile: np.ndarray  # index into PROFILE_NAMES: the account's daily rhythm
    rate: np.ndarray  # mean exchanges per active day
    ua: np.ndarray  # index into the user-agent array
    ip_base: np.ndarray
    ip_span: np.ndarray
    template: np.ndarray  # wrapper variant if template_per_account
    temperature: np.ndarray  # nan = provider default
    max_tokens: np.ndarray  # -1 = default
    stream: np.ndarray
    endpoint: np.ndarray  # index into contract.ENDPOINTS
    n: np.ndarray
    logprobs: np.ndarray
    org: pa.Array
    org_code: np.ndarray  # index into org_values (org is null for every account if it is empty)
    org_values: pa.Array  # the distinct organisations
    api_keys: pa.Array  # the two API keys of account i at 2i (main) and 2i+1
    table: pa.Table  # contract.ACCOUNT_SCHEMA rows


@dataclass
class Block:
    """One block's exchanges, to be merged with the rest of its day by `day_table`.

    Messages stay numpy arrays and the bank text columns index all the bank's texts (none is
    copied), so the day sorts and compacts them once instead of once per block.
    """

    exchanges: pa.Table  # BLOCK_SCHEMA
    n_messages: np.ndarray  # per exchange
    role: np.ndarray  # per message: index into ROLES
    content: np.ndarray  # per message: bank index, or -1-j for prompts[j]
    prompts: pa.Array  # the block's wrapped opening prompts
    campaign: pa.DictionaryArray  # per exchange: the campaign it is attack traffic of, or null


def day_table(blocks: list[Block], bank: TextBank, seed: int, day: int
              ) -> tuple[pa.Table, pa.Table]:
    """The day's exchanges (`WRITE_SCHEMA`) sorted by time (ties in block order), each text
    column's dictionary holding just the distinct texts the day uses, and their truth rows
    (`TRUTH_WRITE_SCHEMA`)."""
    exchanges = pa.concat_tables([b.exchanges for b in blocks])
    order = pc.sort_indices(exchanges["ts"]).to_numpy()
    # Request ids number the day's rows in time order: unique, and independent of other days.
    columns = {"request_id": hex_ids("req_", (np.uint64(day) << np.uint64(32)) + np.arange(
        len(order), dtype=np.uint64), salt=seed * 104729 + 5)}
    # Columns with per-group dictionaries (accounts, addresses, small pools) are unified;
    # the bank text columns share one dictionary, so concatenating them copies no text.
    rest = exchanges.drop_columns(BANK_TEXT).unify_dictionaries().combine_chunks().take(order)
    columns |= {name: compact(exchanges[name].combine_chunks().take(order))
                for name in BANK_TEXT}
    # Messages: gather each exchange's run of messages in time order.
    n_messages = np.concatenate([b.n_messages for b in blocks])
    starts = np.cumsum(n_messages) - n_messages
    exchange, position = positions_within(n_messages[order])
    source = starts[order][exchange] + position
    # Wrapped prompts are numbered across the day and deduplicated (Parquet needs each
    # dictionary value once).
    first_prompt = np.cumsum([0] + [len(b.prompts) for b in blocks[:-1]])
    canon, distinct = bank.distinct
    content = np.concatenate([np.where(b.content >= 0, canon[np.maximum(b.content, 0)],
                                       b.content - first)
                              for b, first in zip(blocks, first_prompt, strict=True)])[source]
    prompts_ = pa.concat_arrays([b.prompts for b in blocks]).dictionary_encode()
    wrapped = content < 0
    content[wrapped] = -1 - prompts_.indices.to_numpy()[-1 - content[wrapped]]
    role = np.concatenate([b.role for b in blocks])[source]
    structs = pa.StructArray.from_arrays(
        [small_dictionary(role, ROLES),
         dictionary_take(distinct, content, extra=prompts_.dictionary)],
        fields=list(WRITE_MESSAGE_TYPE))
    columns["messages"] = list_array(n_messages[order], structs)
    table = pa.Table.from_arrays([columns[f.name] if f.name in columns else rest[f.name]
                                  for f in WRITE_SCHEMA], schema=WRITE_SCHEMA)
    campaign = pa.chunked_array([b.campaign for b in blocks]).unify_dictionaries()
    truth = pa.Table.from_arrays(
        [table["request_id"], table["account_id"], campaign.combine_chunks().take(order),
         table["ts"]], schema=TRUTH_WRITE_SCHEMA)
    return table, truth


class Group:
    """One honest population or one campaign of a scenario."""

    def __init__(self, name: str, spec: dict, campaign_id: str | None, index: int,
                 scenario: Scenario, lib: PromptLibrary, infra: Infrastructure,
                 user_agents: tuple[pa.Array, dict[str, tuple[int, int]]], seed: int,
                 first_account: int) -> None:
        self.name, self.spec, self.campaign_id, self.index = name, spec, campaign_id, index
        self.scenario, self.lib, self.seed = scenario, lib, seed
        self.is_attack = campaign_id is not None
        self.start_day = float(spec["start_day"])
        self.end_day = float(min(spec["end_day"] or scenario.days, scenario.days))
        self.models = scenario.all_models
        self.model_names = pa.array([m.name for m in self.models])
        self.model_reasoning = np.array([m.reasoning for m in self.models])
        self._wrappers = self._build_wrappers()
        self._family_table = self._family_attributes()
        self.ua_values = user_agents[0]
        self.ip_pool: pa.Array = pa.array([], pa.string())  # set with the accounts
        self.accounts = self._build_accounts(infra, user_agents[1], first_account)
        self.pivot_model, self.pivot_ms = self._pivot()

    # ------------------------------------------------------------------ set-up
    def rng(self, *keys: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, 1000 + self.index, *keys])

    def _families_used(self) -> set[str]:
        used = set(self.spec["families"])
        for phase in self.spec["phases"]:
            used |= set(phase["families"])
        if self.spec["honest_share"] > 0:
            used |= set(HONEST_MIX)
        return used

    def _build_wrappers(self) -> tuple[pa.Table, dict[str, int], dict[str, int]]:
        """All wrapper variants this group uses, concatenated: (table, offset, count)."""
        rng = self.rng(1)
        names = sorted({FAMILIES[f].wrapper for f in self._families_used()})
        tables, offset, count = [], {}, {}
        extra = prompts.WRAPPER_VARIANTS if self.spec["paraphrase_rate"] > 0 else 0
        total = 0
        for name in names:
            n = 1 if name == "plain" else max(self.spec["template_diversity"],
                                              len(prompts.WRAPPERS[name])) + extra
            tables.append(self.lib.wrappers(name, n, rng))
            offset[name], count[name] = total, n
            total += n
        return pa.concat_tables(tables), offset, count

    def _family_attributes(self) -> dict[str, np.ndarray]:
        """Per family code: where its text lives in the bank and how it is wrapped."""
        bank = self.lib.bank
        _, wrap_off, wrap_count = self._wrappers
        fams = [FAMILIES[name] for name in FAMILY_NAMES]
        seconds = [_second_pool(f) for f in fams]
        return {
            "base_off": np.array([bank.offset[f.base] for f in fams]),
            "base_size": np.array([bank.size[f.base] for f in fams]),
            "has_second": np.array([sp is not None for sp in seconds]),
            "sec_off": np.array([bank.offset[sp] if sp else 0 for sp in seconds]),
            "sec_size": np.array([bank.size[sp] if sp else 1 for sp in seconds]),
            "aligned": np.array([sp == f"{f.base}_answer" for sp, f in
                                 zip(seconds, fams, strict=True)]),
            "wrap_off": np.array([wrap_off.get(f.wrapper, 0) for f in fams]),
            "wrap_count": np.array([wrap_count.get(f.wrapper, 1) for f in fams]),
            "loop": np.array([f.loop for f in fams]),
            "resp_off": np.array([bank.offset[f"resp:{f.response}"] for f in fams]),
            "toolset": np.array([TOOLSETS.index(f.toolset or "") for f in fams]),
            "cot": np.array([name in COT_FAMILIES for name in FAMILY_NAMES]),
            "plain": np.array([f.wrapper == "plain" for f in fams]),
        }

    def _build_accounts(self, infra: Infrastructure, ua_spans: dict[str, tuple[int, int]],
                        first: int) -> AccountSet:
        spec, rng = self.spec, self.rng(2)
        n = spec["accounts"]
        counters = np.arange(first, first + n, dtype=np.uint64)
        ids = hex_ids("acct_", counters, salt=self.seed * 7919 + 11)
        tz_keys, tz_p = _weights(spec["timing"]["timezones"])
        tz = np.asarray(tz_keys, dtype=np.float64)[rng.choice(len(tz_keys), size=n, p=tz_p)]
        profile_spec = spec["timing"]["profile"]
        profiles = _choose(rng, profile_spec if isinstance(profile_spec, dict)
                           else {profile_spec: 1.0}, n)
        profile = np.array([PROFILE_NAMES.index(p) for p in profiles.tolist()], dtype=np.int64)
        sigma = float(spec["volume"]["sigma"])
        z = rng.standard_normal(n)
        if self.is_attack:
            days = max(self.end_day - self.start_day, 1e-9)
            # Normalised so the campaign's accounts together send its target of attack
            # exchanges, plus the honest share mixed in on top.
            weight = np.exp(sigma * z)
            total = spec["exchanges"] / max(1.0 - spec["honest_share"], 1e-9)
            rate = total * weight / weight.sum() / (days * max(spec["active_days"], 1e-9))
        else:
            rate = float(spec["volume"]["median"]) * np.exp(sigma * z)
        ua = np.empty(n, dtype=np.int64)
        families = _choose(rng, spec["user_agents"], n)
        for fam in sorted(set(families.tolist())):  # sorted: set order varies by process
            start, size = ua_spans[fam]
            mask = families == fam
            ua[mask] = start + rng.integers(0, size, mask.sum())
        ip_pool, ip_base, ip_span = self._addresses(infra, n, rng)
        self.ip_pool = pa.array(ip_pool)
        params = spec["params"]
        temperature = np.array([_as_number(k) for k in _choose(rng, params["temperature"], n)])
        max_tokens = np.nan_to_num(
            np.array([_as_number(k) for k in _choose(rng, params["max_tokens"], n)]), nan=-1
        ).astype(np.int64)
        n_choices = np.array([int(_as_number(k)) for k in _choose(rng, params["n"], n)])
        endpoint = np.array([contract.ENDPOINTS.index(e) for e in _choose(rng, spec["endpoint"],
                                                                           n)])
        # Organisation and payment sharing: consecutive accounts share them.
        org = self._shared_ids("org_", spec["org"]["accounts_per_org"], first, n, 13)
        pay_per = spec["payment"]["accounts_per_payment"] or 1
        payment = self._shared_ids("pm_", pay_per, first, n, 17)
        if spec["payment"]["none_share"] > 0:
            payment = pc.if_else(pa.array(rng.random(n) < spec["payment"]["none_share"]),
                                 pa.nulls(n, pa.string()), payment)
        start = _ms(self.scenario.start) + int(self.start_day * DAY_MS)
        signup = spec["signup"]
        if signup["burst_hours"]:
            created = (start - int(signup["days_before"] * DAY_MS)
                       + (rng.random(n) * signup["burst_hours"] * HOUR_MS).astype(np.int64))
        else:
            created = start - (DAY_MS * (1 + rng.random(n) * signup["days_before"])).astype(
                np.int64)
        country_keys = np.array(sorted(COUNTRIES))
        nearest = country_keys[np.abs(tz[:, None] - country_keys[None, :]).argmin(axis=1)]
        countries = pick_per_kind(nearest, COUNTRIES, rng)
        signup_ip = self.ip_pool.take(pa.array(ip_base % len(ip_pool)))
        table = pa.table({
            "account_id": ids,
            "created_at": pa.array(created, contract.UTC_TS),
            "email_domain": pick_per_kind(_choose(rng, spec["email"], n), EMAIL_DOMAINS, rng),
            "payment_fingerprint": payment,
            "billing_country": countries,
            "verification_path": pa.array(_choose(rng, spec["verification"], n).tolist()),
            "org_id": org,
            "signup_ip": signup_ip,
            "plan": pa.array(_choose(rng, spec["plan"], n).tolist()),
        })
        org_encoded = org.dictionary_encode()
        return AccountSet(
            ids=ids, counters=counters, tz=tz, profile=profile, rate=rate, ua=ua,
            ip_base=ip_base,
            ip_span=ip_span, template=rng.integers(0, 1 << 30, n), temperature=temperature,
            max_tokens=max_tokens, stream=rng.random(n) < params["stream"],
            endpoint=endpoint, n=n_choices, logprobs=rng.random(n) < params["logprobs"],
            org=org, org_code=org_encoded.indices.to_numpy(zero_copy_only=False),
            org_values=org_encoded.dictionary.drop_null(),
            api_keys=hex_ids("key_", (counters[:, None] * np.uint64(4) + np.arange(
                2, dtype=np.uint64)).ravel(), salt=self.seed * 53 + 3),
            table=contract.conform(table, contract.ACCOUNT_SCHEMA),
        )

    def _shared_ids(self, prefix: str, per: int | None, first: int, n: int,
                    salt: int) -> pa.Array:
        """Identifiers shared by `per` randomly chosen accounts each (null if `per` is None).
        Owners are numbered from the group's first account counter, so groups never share."""
        if not per:
            return pa.nulls(n, pa.string())
        owner = first + self.rng(3, salt).permutation(n) // int(per)
        return hex_ids(prefix, owner.astype(np.uint64), salt=self.seed * 31 + salt)

    def _addresses(self, infra: Infrastructure, n: int, rng: np.random.Generator
                   ) -> tuple[list[str], np.ndarray, np.ndarray]:
        """(address pool, per-account first index, per-account span) for the IP strategy."""
        ip = self.spec["ip"]
        strategy, per = ip["strategy"], max(1, int(ip["per_account"]))
        pool_size = ip["pool_size"] or (-(-n // int(ip["accounts_per_ip"]))
                                        if ip["accounts_per_ip"] else n * per)
        per_request = ip["rotation"] == "per_request"
        if strategy == "residential":
            pool = infra.residential_pool
            return pool, rng.integers(0, len(pool), n), np.full(n, per)
        if strategy == "residential_shared_with_honest":
            subset = rng.choice(len(infra.residential_pool), size=min(pool_size,
                                len(infra.residential_pool)), replace=False)
            pool = [infra.residential_pool[i] for i in subset]
        elif strategy == "sticky_per_account":
            pool = infra.pool("residential", n * per, rng)
            return pool, np.arange(n) * per, np.full(n, per)
        else:
            kind = {"university_nat": "university", "cgnat": "cgnat",
                    "datacenter_pool": "datacenter"}[strategy]
            pool = infra.pool(kind, pool_size, rng)
        if per_request:
            # A NAT / carrier / proxy block: the account's traffic leaves from any address of
            # the block its network (university, carrier region, proxy pool) owns.
            span = {"university_nat": 4, "cgnat": 16}.get(strategy, len(pool))
            span = min(span, len(pool))
            blocks = max(1, len(pool) // span)
            return pool, rng.integers(0, blocks, n) * span, np.full(n, span)
        return pool, rng.integers(0, len(pool), n), np.full(n, min(per, len(pool)))

    def _pivot(self) -> tuple[int | None, int | None]:
        pivot = self.spec["pivot"]
        if not pivot:
            return None, None
        releases = self.scenario.releases
        if pivot["model"]:
            chosen = [r for r in releases if r.model.name == pivot["model"]]
        else:
            chosen = [r for r in releases if self.start_day <= r.at_day < self.end_day] or \
                     [r for r in releases if r.at_day >= self.start_day]
        if not chosen:
            return None, None
        release = chosen[0]
        at = _ms(self.scenario.start) + int((release.at_day * 24 + pivot["delay_hours"])
                                            * HOUR_MS)
        return [m.name for m in self.models].index(release.model.name), at

    # ------------------------------------------------------------------ per day
    def day_blocks(self, day: int, chunk_rows: int) -> Iterator[dict]:
        """The day's activity as plans of at most about `chunk_rows` exchanges."""
        lo, hi = max(day, self.start_day), min(day + 1, self.end_day)
        if hi <= lo:
            return
        spec, rng = self.spec, self.rng(4, day)
        n = spec["accounts"]
        day_ms = _ms(self.scenario.start) + day * DAY_MS
        dow = (self.scenario.start + timedelta(days=day)).weekday()
        window = ((lo - day) * 86400.0, (hi - day) * 86400.0)
        active = rng.random(n) < spec["active_days"]
        mean = self.accounts.rate * spec["weekly"][dow] * (hi - lo) * active
        counts = rng.poisson(mean)
        if spec["volume"]["cap"]:
            counts = np.minimum(counts, int(spec["volume"]["cap"]))
        parts = [(counts, window, None)]
        if spec["release_burst"]:
            parts += self._bursts(day, lo, hi, rng)
        for p, (part_counts, part_window, forced) in enumerate(parts):
            cum = np.cumsum(part_counts)
            edges = np.searchsorted(cum, np.arange(chunk_rows, int(cum[-1]) if n else 0,
                                                   chunk_rows), side="left")
            bounds = [0, *sorted(set((edges + 1).tolist())), n]
            for b, (a0, a1) in enumerate(itertools.pairwise(bounds)):
                if a1 <= a0 or part_counts[a0:a1].sum() == 0:
                    continue
                block_rng = self.rng(5, day, p, b)
                yield self._plan(np.arange(a0, a1), part_counts[a0:a1], part_window, forced,
                                 day, day_ms, block_rng)

    def _bursts(self, day: int, lo: float, hi: float, rng: np.random.Generator) -> list:
        burst, out = self.spec["release_burst"], []
        for r_index, release in enumerate(self.scenario.releases):
            b0, b1 = release.at_day, release.at_day + burst["hours"] / 24
            o0, o1 = max(lo, b0), min(hi, b1)
            if o1 <= o0:
                continue
            joins = self.rng(6, r_index).random(self.spec["accounts"]) < burst["participation"]
            share = (o1 - o0) / (b1 - b0)
            counts = rng.poisson(burst["volume"] * share * joins)
            model = [m.name for m in self.models].index(release.model.name)
            out.append((counts, ((o0 - day) * 86400.0, (o1 - day) * 86400.0), model))
        return out

    def _plan(self, accts: np.ndarray, counts: np.ndarray, window: tuple[float, float],
              forced_model: int | None, day: int, day_ms: int, rng: np.random.Generator) -> dict:
        spec = self.spec
        mean_turns = float(spec["session"]["mean_turns"])
        # Exchanges of each account, cut into sessions with geometric lengths.
        ex_acct_local, ex_rank = positions_within(counts)
        new_session = (ex_rank == 0) | (rng.random(len(ex_rank)) < 1.0 / mean_turns)
        sess_of_ex = np.cumsum(new_session) - 1
        sess_first = np.flatnonzero(new_session)
        n_sess = len(sess_first)
        sess_len = np.diff(np.append(sess_first, len(ex_rank)))
        pos = np.arange(len(ex_rank)) - sess_first[sess_of_ex]
        sess_acct = accts[ex_acct_local[sess_first]]
        start = self._session_starts(sess_acct, accts, counts, ex_acct_local, sess_first,
                                     window, rng)
        gaps = rng.exponential(float(spec["session"]["gap_seconds"]), len(ex_rank))
        gaps[new_session] = 0.0
        offset = np.cumsum(gaps)
        offset -= offset[sess_first][sess_of_ex]
        # A session that would run past the window starts earlier instead (no pile-up of
        # exchanges at the window's last millisecond).
        duration = np.maximum.reduceat(offset, sess_first) if n_sess else np.zeros(0)
        start = np.maximum(np.minimum(start, window[1] - 0.001 - duration), window[0])
        t = np.minimum(start[sess_of_ex] + offset, window[1] - 0.001)
        ts = day_ms + (t * 1000).astype(np.int64)
        sess_ts = ts[sess_first]
        # Session attributes.
        honest_mix = rng.random(n_sess) < spec["honest_share"]
        family_map = self._family_weights(day)
        family = _choose_family(rng, family_map, n_sess)
        if honest_mix.any():
            family[honest_mix] = _choose_family(rng, HONEST_MIX, int(honest_mix.sum()))
        model = self._models(sess_ts, honest_mix, forced_model, rng)
        return {
            "acct": accts[ex_acct_local], "ts": ts, "sess": sess_of_ex, "pos": pos,
            "last": pos == sess_len[sess_of_ex] - 1, "sess_acct": sess_acct,
            "family": family, "model": model, "honest_mix": honest_mix,
            "key": rng.integers(0, 1 << 40, n_sess), "rng": rng,
        }

    def _family_weights(self, day: int) -> dict:
        progress = (day + 0.5 - self.start_day) / max(self.end_day - self.start_day, 1e-9)
        weights = self.spec["families"]
        for phase in self.spec["phases"]:
            if progress >= phase["from_fraction"]:
                weights = phase["families"]
        return weights

    def _session_starts(self, sess_acct: np.ndarray, accts: np.ndarray, counts: np.ndarray,
                        ex_acct_local: np.ndarray, sess_first: np.ndarray,
                        window: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
        """Start time of each session, seconds after the day's midnight UTC."""
        timing = self.spec["timing"]
        mode, (w0, w1) = timing["mode"], window
        n, width = len(sess_acct), w1 - w0
        jitter = float(timing["jitter_minutes"]) * 60.0
        if mode == "uniform":
            start = w0 + rng.random(n) * width
        elif mode == "load_balanced":
            # A scheduler hands work to accounts round-robin: slots evenly spaced over the
            # window, each account's sessions spread evenly across it.
            local = ex_acct_local[sess_first]
            per_acct = np.bincount(local, minlength=len(counts))
            rank = positions_within(per_acct)[1]
            key = (rank + rng.random(len(counts))[local]) / per_acct[local]
            order = np.argsort(key, kind="stable")
            start = np.empty(n)
            start[order] = w0 + (np.arange(n) + 0.5) * width / n
        else:
            hour = np.empty(n, dtype=np.int64)
            profile_of = self.accounts.profile[sess_acct]
            for code in np.unique(profile_of):
                rows = np.flatnonzero(profile_of == code)
                weights = PROFILES[PROFILE_NAMES[code]]
                hour[rows] = rng.choice(24, size=len(rows), p=weights / weights.sum())
            start = (hour - self.accounts.tz[sess_acct]) * 3600.0 + rng.random(n) * 3600.0
            if mode == "diurnal_mimicry":
                start = np.round(start / MIMICRY_TICK_S) * MIMICRY_TICK_S
        if jitter:
            start = start + rng.normal(0.0, jitter, n)
        # Wrap into the window (around midnight for a whole day): clipping would pile
        # sessions up at the window's edges.
        return w0 + np.mod(start - w0, width)

    def _models(self, sess_ts: np.ndarray, honest_mix: np.ndarray, forced: int | None,
                rng: np.random.Generator) -> np.ndarray:
        n = len(sess_ts)
        if forced is not None:
            return np.full(n, forced)
        names = [m.name for m in self.models]
        base_models = self.scenario.models
        tier_weights = self.spec["models"]
        weights = np.array([tier_weights.get(m.tier, 0.0) /
                            sum(1 for b in base_models if b.tier == m.tier) for m in base_models])
        model = rng.choice(len(base_models), size=n, p=weights / weights.sum())
        adopt = self.spec["adoption"]
        start_ms = _ms(self.scenario.start)
        adopters = honest_mix if self.is_attack else np.ones(n, dtype=bool)
        for release in self.scenario.releases:
            at = start_ms + int(release.at_day * DAY_MS)
            ramp = np.clip((sess_ts - at) / (adopt["ramp_hours"] * HOUR_MS), 0.0, 1.0)
            move = adopters & (sess_ts >= at) & (rng.random(n) < adopt["share"] * ramp)
            model[move] = names.index(release.model.name)
        if self.pivot_model is not None:
            move = ~honest_mix & (sess_ts >= self.pivot_ms) & (
                rng.random(n) < self.spec["pivot"]["share"])
            model[move] = self.pivot_model
        return model

    # ------------------------------------------------------------------ assembly
    def _session_prompts(self, plan: dict, rng: np.random.Generator
                         ) -> tuple[np.ndarray, pa.Array, np.ndarray]:
        """Opening prompt of each session: (bank index or -1-j for the j-th wrapped prompt,
        the wrapped prompts, the base prompt's index within its pool)."""
        spec, bank, ft = self.spec, self.lib.bank, self._family_table
        fam_code, n_sess = plan["family"], len(plan["key"])
        base_local = rng.integers(0, 1 << 40, n_sess) % ft["base_size"][fam_code]
        base_idx = ft["base_off"][fam_code] + base_local
        sec_local = np.where(ft["aligned"][fam_code], base_local,
                             rng.integers(0, 1 << 40, n_sess)) % ft["sec_size"][fam_code]
        w_off, w_cnt = ft["wrap_off"][fam_code], ft["wrap_count"][fam_code]
        diversity = np.minimum(spec["template_diversity"], w_cnt)
        variant = rng.integers(0, 1 << 40, n_sess) % diversity
        if spec["template_per_account"]:
            variant = self.accounts.template[plan["sess_acct"]] % diversity
        paraphrase = (rng.random(n_sess) < spec["paraphrase_rate"]) & (w_cnt > diversity)
        variant = np.where(paraphrase, diversity + rng.integers(0, 1 << 40, n_sess)
                           % np.maximum(w_cnt - diversity, 1), variant)
        wrapped = np.flatnonzero(~ft["plain"][fam_code])
        text = bank.array
        wrap = self._wrappers[0].take(pa.array((w_off + variant)[wrapped]))
        second = pc.if_else(pa.array(ft["has_second"][fam_code][wrapped]),
                            text.take(pa.array((ft["sec_off"][fam_code] + sec_local)[wrapped])),
                            pa.scalar("", pa.string()))
        joined = pc.binary_join_element_wise(
            wrap["prefix"], text.take(pa.array(base_idx[wrapped])), wrap["middle"], second,
            wrap["suffix"], "")
        joined = joined.combine_chunks() if isinstance(joined, pa.ChunkedArray) else joined
        opening = base_idx.copy()
        opening[wrapped] = -1 - np.arange(len(wrapped))
        return opening, joined, base_local

    def _messages(self, plan: dict, opening: np.ndarray, wrapped: pa.Array
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The request history of every exchange (user/assistant turns for chat, assistant
        tool calls and tool results for loops), capped at `session.max_history` messages with
        the opening prompt always kept. Returns (messages per exchange, role code and text
        (as in `Block.content`) per message, per-exchange input bytes, loop)."""
        bank, ft = self.lib.bank, self._family_table
        sess, pos, key, fam_code = plan["sess"], plan["pos"], plan["key"], plan["family"]
        loop = ft["loop"][fam_code][sess]
        max_hist = int(self.spec["session"]["max_history"]) | 1
        full = 2 * pos + 1
        m = np.minimum(full, max_hist)
        msg_ex, j = positions_within(m)
        k = np.where(j == 0, 0, full[msg_ex] - m[msg_ex] + j)
        msg_sess, msg_loop = sess[msg_ex], loop[msg_ex]
        turn = (k - 1) // 2
        assistant = ft["resp_off"][fam_code][msg_sess] + (key[msg_sess] + turn * 7919) \
            % prompts.RESPONSES_PER_KIND
        filler_off = np.where(msg_loop, bank.offset["resp:tool_result"], bank.offset["followup"])
        filler_size = np.where(msg_loop, bank.size["resp:tool_result"], bank.size["followup"])
        filler = filler_off + (key[msg_sess] * 3 + k * 104729) % filler_size
        content = np.where(k == 0, opening[msg_sess], np.where(k % 2 == 1, assistant, filler))
        role = np.where(k == 0, 0, np.where(k % 2 == 1, 1, np.where(msg_loop, 2, 0)))
        lengths = np.where(content >= 0, bank.byte_lengths[np.maximum(content, 0)], 0)
        from_wrapped = content < 0
        lengths[from_wrapped] = pc.binary_length(wrapped).to_numpy()[-1 - content[from_wrapped]]
        input_bytes = np.add.reduceat(lengths, np.cumsum(m) - m) if len(m) else np.zeros(0)
        return m, role.astype(np.int8), content, input_bytes + 16 * m, loop

    def _tools(self, plan: dict, base_local: np.ndarray, error: np.ndarray
               ) -> tuple[pa.Array, pa.Array, np.ndarray, np.ndarray]:
        """(declared tools, tool calls, has-call flag, system-prompt bank index or -1)."""
        lib, bank, ft = self.lib, self.lib.bank, self._family_table
        sess, pos, key = plan["sess"], plan["pos"], plan["key"]
        toolset = ft["toolset"][plan["family"]][sess]  # index into TOOLSETS
        tool_bank = pa.concat_arrays([pa.array([lib.toolsets["agent"], lib.toolsets["computer"]],
                                               pa.list_(pa.string())), lib.bfcl_tools])
        tool_idx = np.where(toolset == 3, 2 + base_local[sess] % len(lib.bfcl_tools),
                            toolset - 1)
        tools = tool_bank.take(pa.array(tool_idx, mask=toolset == 0))
        has_call = (((toolset == 1) | (toolset == 2)) & ~plan["last"] | (toolset == 3)) & ~error
        call_pools = [lib.tool_call_pool[t] for t in TOOLSETS[1:]]
        call_base = np.cumsum([0] + [len(p) for p in call_pools[:-1]])
        call_size = np.array([len(p) for p in call_pools])
        call_kind = np.maximum(toolset - 1, 0)
        call_idx = call_base[call_kind] + (key[sess] + pos) % call_size[call_kind]
        calls = list_array(has_call.astype(np.int32),
                           pa.concat_arrays(call_pools).take(pa.array(call_idx[has_call])),
                           valid=has_call)
        # System prompt: the agent harness's (shared by all its users, honest or not) or the
        # computer-use one; none for plain chat.
        agent_harness = self.spec["system_prompt"] == "agent"
        system = np.where(toolset == 2, bank.offset["system:computer"],
                          np.where((toolset == 1) & agent_harness, bank.offset["system:agent"],
                                   -1))
        return tools, calls, has_call, system

    def assemble(self, plan: dict) -> Block:
        """One plan's exchanges, with what their truth rows need."""
        bank, spec, rng, ft = self.lib.bank, self.spec, plan["rng"], self._family_table
        lengths = bank.byte_lengths
        n, sess, pos, key = len(plan["ts"]), plan["sess"], plan["pos"], plan["key"]
        opening, wrapped, base_local = self._session_prompts(plan, rng)
        n_messages, role, content, input_bytes, loop = self._messages(plan, opening, wrapped)
        error = rng.random(n) < spec["error_rate"]
        # This exchange's answer (the same formula as the history, so later turns line up).
        last = plan["last"]
        own = np.where(loop & ~last, bank.offset["resp:tool_step"],
                       np.where(loop, bank.offset["resp:final_step"],
                                ft["resp_off"][plan["family"]][sess]))
        resp_idx = own + (key[sess] + pos * 7919) % prompts.RESPONSES_PER_KIND
        # Reasoning: requested by params, or CoT prompts on reasoning models.
        model = plan["model"][sess]
        asked = (rng.random(len(key)) < spec["params"]["reasoning"])[sess]
        reasoning_model = self.model_reasoning[model]
        has_reasoning = asked | (ft["cot"][plan["family"]][sess] & reasoning_model)
        effort = np.where(asked & reasoning_model, rng.integers(0, 3, n), -1)
        budget = np.where(asked & ~reasoning_model, 4096, -1)
        reasoning_idx = bank.offset["resp:reasoning"] + (key[sess] * 5 + pos) \
            % prompts.RESPONSES_PER_KIND
        tools, calls, has_call, system = self._tools(plan, base_local, error)
        output_tokens = np.where(error, 0, lengths[resp_idx] // 4 + 1)
        reasoning_tokens = np.where(has_reasoning & ~error, lengths[reasoning_idx] // 4, 0)
        input_tokens = (input_bytes + np.where(system >= 0, lengths[system], 0)) // 4
        status = np.where(error, np.where(rng.random(n) < 0.7, 429, 500), 200).astype(np.int32)
        latency = (250 + output_tokens * 12.0 + reasoning_tokens * 8.0) * rng.lognormal(0, .25, n)
        a, acct = self.accounts, plan["acct"]
        canon, distinct = bank.distinct
        ip_idx = (a.ip_base[acct] + rng.integers(0, 1 << 40, n) % a.ip_span[acct]) \
            % len(self.ip_pool)
        # Most requests use the account's main key; a fifth use a second key.
        api_key = 2 * acct + (rng.random(n) < 0.2)
        temperature, max_tokens = a.temperature[acct], a.max_tokens[acct]
        params = pa.StructArray.from_arrays([
            pa.array(temperature, mask=np.isnan(temperature)),
            pa.nulls(n, pa.float64()),
            pa.array(max_tokens, mask=max_tokens < 0),
            pa.array(a.n[acct]),
            pa.array(a.logprobs[acct]),
            pa.array(a.stream[acct]),
            small_dictionary(effort, EFFORTS, null=effort < 0),
            pa.array(budget, mask=budget < 0),
        ], fields=list(WRITE_PARAMS_TYPE))
        ts = pa.array(plan["ts"], contract.UTC_TS)
        columns = {
            "ts": ts,
            "account_id": dictionary_take(a.ids, acct),
            "api_key_id": dictionary_take(a.api_keys, api_key),
            "org_id": dictionary_take(a.org_values, a.org_code[acct]) if len(a.org_values)
            else pa.nulls(n, WRITE_SCHEMA.field("org_id").type),
            "ip": dictionary_take(self.ip_pool, ip_idx),
            "user_agent": small_dictionary(a.ua[acct], self.ua_values),
            "model": small_dictionary(model, self.model_names),
            "endpoint": small_dictionary(a.endpoint[acct], _ENDPOINTS),
            "system": small_dictionary(canon[np.maximum(system, 0)], distinct, null=system < 0),
            "tools": tools,
            "params": params,
            "response_text": small_dictionary(canon[resp_idx], distinct, null=error),
            "reasoning_text": small_dictionary(canon[reasoning_idx], distinct,
                                               null=~has_reasoning | error),
            "tool_calls": calls,
            "input_tokens": pa.array(input_tokens.astype(np.int64)),
            "output_tokens": pa.array(output_tokens.astype(np.int64)),
            "reasoning_tokens": pa.array(reasoning_tokens.astype(np.int64)),
            "status": pa.array(status),
            "error": small_dictionary(status == 500, ERRORS, null=status == 200),
            "latency_ms": pa.array(np.round(latency, 1)),
            "stop_reason": small_dictionary(has_call, STOP_REASONS, null=error),
        }
        exchanges = pa.Table.from_arrays(
            [columns.get(f.name, pa.nulls(n, f.type)) for f in BLOCK_SCHEMA], schema=BLOCK_SCHEMA)
        attack = np.full(n, self.is_attack) & ~plan["honest_mix"][sess]
        campaign = small_dictionary(np.zeros(n, dtype=np.int32),
                                    pa.array([self.campaign_id or ""]), null=~attack)
        plan["stats"] = {"attack": attack, "model": model}
        return Block(exchanges, n_messages, role, content, wrapped, campaign)


def _second_pool(family: prompts.Family) -> str | None:
    if family.second is None:
        return None
    return family.second if family.second.endswith("_answer") else f"resp:{family.second}"


def _ms(when: datetime) -> int:
    return int(when.timestamp() * 1000)


_ENDPOINTS = pa.array(list(contract.ENDPOINTS))


def _dictionary_encoded(field: pa.Field) -> pa.Field:
    return field.with_type(pa.dictionary(pa.int32(), pa.string()))


#: contract.EXCHANGE_SCHEMA with repeated text as dictionaries: what the simulator hands its
#: Parquet writer. Written without the Arrow schema, every reader sees the contract types.
DICTIONARY_TEXT = {"account_id", "api_key_id", "org_id", "ip", "user_agent", "model",
                   "endpoint", "system", "response_text", "reasoning_text", "error",
                   "stop_reason"}
WRITE_MESSAGE_TYPE = pa.struct([_dictionary_encoded(f) for f in contract.MESSAGE_TYPE])
WRITE_PARAMS_TYPE = pa.struct([_dictionary_encoded(f) if f.name == "reasoning_effort" else f
                               for f in contract.PARAMS_TYPE])
WRITE_SCHEMA = pa.schema([
    _dictionary_encoded(f) if f.name in DICTIONARY_TEXT
    else f.with_type(pa.list_(WRITE_MESSAGE_TYPE)) if f.name == "messages"
    else f.with_type(WRITE_PARAMS_TYPE) if f.name == "params" else f
    for f in contract.EXCHANGE_SCHEMA
])
#: Text columns whose dictionary, block by block, is the whole text bank (see `day_table`).
BANK_TEXT = ["system", "response_text", "reasoning_text"]
#: What a `Block` holds as a table: `WRITE_SCHEMA` but the messages and request ids.
BLOCK_SCHEMA = pa.schema([f for f in WRITE_SCHEMA if f.name not in ("messages", "request_id")])
#: contract.TRUTH_EXCHANGE_SCHEMA as written (repeated ids as dictionaries).
TRUTH_WRITE_SCHEMA = pa.schema([
    _dictionary_encoded(f) if f.name in ("account_id", "campaign_id") else f
    for f in contract.TRUTH_EXCHANGE_SCHEMA])
