"""Gateway building blocks without HTTP: policy validation, degrade, WAL, decisions with the
batch engine's real request signals."""

from __future__ import annotations

import asyncio
import os
import time

import orjson
import pytest

from distillguard.gateway.config import ConfigError, KeyInfo, config_from_dict
from distillguard.gateway.decide import Decider
from distillguard.gateway.degrade import StreamDegrader, degrade_request, summarize
from distillguard.gateway.policy import DegradeSpec, PolicyError, PolicyHolder, policy_from_dict
from distillguard.gateway.state import EnforcementList, LocalState
from distillguard.gateway.wal import WriteAheadLog, claim_segments


@pytest.mark.parametrize(("policy", "message"), [
    ({"mode": "audit"}, "mode"),
    ({"rules": [{"id": "a", "action": "explode"}]}, "action"),
    ({"rules": [{"id": "a", "action": "throttle"}]}, "limits"),
    ({"rules": [{"id": "a", "action": "block", "when": {"secret.x": 1}}]}, "unknown fact"),
    ({"rules": [{"id": "a", "action": "block", "when": {"signal.cot": {"gte": "x"}}}]},
     "number"),
    ({"rules": [{"id": "a", "action": "block"}, {"id": "a", "action": "allow"}]}, "duplicate"),
    ({"limits": [{"id": "l", "rate_per_s": 0}]}, "rate_per_s"),
    ({"limits": [{"id": "l", "rate_per_s": 1, "when": {"live.requests": {"gt": 1}}}]},
     "live facts"),
    ({"rules": [{"id": "a", "action": "degrade", "degrade": {"reasoning": "hide"}}]},
     "strip or summary"),
])
def test_invalid_policies_are_rejected_with_the_offending_key(policy, message):
    with pytest.raises(PolicyError, match=message):
        policy_from_dict(policy)


def test_conditions_operators_and_combinators():
    policy = policy_from_dict({"rules": [{
        "id": "r", "action": "block",
        "when": {"any": [{"signal.rule_hits": {"contains": "cot.x"}},
                         {"account.score": {"gte": 0.5, "lt": 0.9}}],
                 "not": {"request.model": {"in": ["safe-model"]}}}}]})
    rule = policy.rules[0]
    assert rule.when({"signal.rule_hits": ["cot.x"], "request.model": "m"})
    assert rule.when({"account.score": 0.7, "request.model": "m"})
    assert not rule.when({"account.score": 0.95, "request.model": "m"})
    assert not rule.when({"signal.rule_hits": ["cot.x"], "request.model": "safe-model"})
    assert not rule.when({"account.score": None})  # absent facts never compare


def test_policy_holder_keeps_previous_policy_on_bad_reload(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("rules: [{id: a, action: block}]\n")
    holder = PolicyHolder(path)
    path.write_text("rules: [{id: a, action: nope}]\n")
    assert holder.reload(force=True) is False
    assert holder.policy.rules[0].action == "block" and "nope" in holder.last_error
    path.write_text("mode: monitor\n")
    assert holder.reload(force=True) and holder.policy.mode == "monitor" and holder.version == 1


def test_config_refuses_plaintext_keys_and_bad_values(monkeypatch):
    with pytest.raises(ConfigError, match="plaintext"):
        config_from_dict({"keys": [{"key": "sk-1", "account_id": "a"}]})
    with pytest.raises(ConfigError, match="not set"):
        config_from_dict({"keys": [{"key_env": "DG_UNSET_VAR_X", "account_id": "a"}]})
    with pytest.raises(ConfigError, match="on_failure"):
        config_from_dict({"state": {"on_failure": "maybe"}})
    monkeypatch.setenv("DG_KEY_X", "sk-secret")
    cfg = config_from_dict({"keys": [{"key_env": "DG_KEY_X", "account_id": "a"}],
                            "trusted_proxies": ["10.0.0.0/8"]})
    assert cfg.lookup_key("sk-secret").account_id == "a" and cfg.lookup_key("other") is None
    assert cfg.is_trusted_proxy("10.2.3.4") and not cfg.is_trusted_proxy("11.0.0.1")


def test_summary_keeps_the_conclusion_within_budget():
    text = "First we set up. Then we compute a lot of steps. So the result is 12."
    summary = summarize(text, 40)
    assert len(summary) <= 40 and summary.endswith("So the result is 12.")
    assert "set up" not in summary


def test_degrade_request_caps():
    spec = DegradeSpec(drop_logprobs=True, max_n=1, max_tokens=100, reasoning_effort="low")
    out = degrade_request({"n": 5, "max_tokens": 900, "logprobs": True, "top_logprobs": 3,
                           "reasoning_effort": "high", "thinking": {"budget_tokens": 5000}},
                          spec, "chat.completions")
    assert out == {"n": 1, "max_tokens": 100, "logprobs": False, "reasoning_effort": "low",
                   "thinking": {"budget_tokens": 100}}
    assert degrade_request({"prompt": "x", "logprobs": 5}, spec, "completions") == {
        "prompt": "x", "max_tokens": 100}


def test_stream_degrader_handles_events_split_across_chunks():
    events = [{"choices": [{"index": 0, "delta": {"reasoning_content": "Step one. "}}]},
              {"choices": [{"index": 0, "delta": {"reasoning_content": "Answer is 4."}}]},
              {"choices": [{"index": 0, "delta": {"content": "4"}}]}]
    raw = b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events) + b"data: [DONE]\n\n"
    degrader = StreamDegrader(DegradeSpec(reasoning="summary", summary_chars=40),
                              "chat.completions")
    out = b"".join(degrader.feed(raw[i:i + 7]) for i in range(0, len(raw), 7)) + degrader.finish()
    parsed = [orjson.loads(e[6:]) for e in out.split(b"\n\n") if e and e != b"data: [DONE]"]
    deltas = [p["choices"][0]["delta"] for p in parsed]
    assert deltas == [{"reasoning_content": "[reasoning summary] Answer is 4."},
                      {"content": "4"}]
    assert out.endswith(b"data: [DONE]\n\n")


def test_wal_segments_rotate_and_abandoned_ones_are_claimed(tmp_path):
    wal = WriteAheadLog(tmp_path, segment_max_records=3, fsync_interval_ms=1)
    for i in range(7):
        wal.append({"request_id": f"r{i}"})
    sealed = sorted(tmp_path.glob("*.jsonl"))
    assert len(sealed) == 2 and len(list(tmp_path.glob("*.open"))) == 1
    assert claim_segments(tmp_path) == sealed  # the live writer's open segment is locked
    wal.close()
    lines = [orjson.loads(x) for p in sorted(tmp_path.glob("*.jsonl"))
             for x in p.read_bytes().splitlines()]
    assert [r["request_id"] for r in lines] == [f"r{i}" for i in range(7)]
    # a segment left open by a dead writer (no flock held) is claimed for replay
    orphan = tmp_path / "seg-1-999-000001.open"
    orphan.write_bytes(b'{"request_id": "x"}\n')
    assert tmp_path / "seg-1-999-000001.jsonl" in claim_segments(tmp_path)
    assert not orphan.exists() and os.path.exists(tmp_path / "seg-1-999-000001.jsonl")


def test_wal_age_rotation_keeps_every_record_once_in_order(tmp_path):
    """Rotation by age swaps in a segment created outside the lock while records keep
    coming; nothing is lost, duplicated or reordered, and empty segments are not kept."""
    wal = WriteAheadLog(tmp_path, segment_max_age_s=0.01, fsync_interval_ms=1)
    for i in range(2000):
        wal.append({"request_id": f"r{i}"})
        if i % 100 == 0:
            time.sleep(0.02)  # let the background thread rotate
    wal.close()
    segments = sorted(tmp_path.glob("*.jsonl"))
    assert len(segments) > 5 and not list(tmp_path.glob("*.open"))
    ids = [orjson.loads(x)["request_id"] for p in segments for x in p.read_bytes().splitlines()]
    assert ids == [f"r{i}" for i in range(2000)]


def test_decisions_with_the_batch_engines_request_signals():
    """The gateway's decision runs on distillguard.signals.annotate_request, unmodified."""
    from distillguard.signals import annotate_request

    policy = policy_from_dict({"rules": [
        {"id": "cot", "action": "challenge", "reason": "cot_prompt",
         "when": {"signal.cot": True, "signal.rule_hits": {"contains": "cot.step_by_step"}}},
        {"id": "extract", "action": "degrade", "reason": "extraction_params",
         "when": {"signal.extraction_params": True}}]})
    decider = Decider(PolicyHolder(None, policy), LocalState(), EnforcementList(),
                      annotate=annotate_request)

    def decide(text: str, **params) -> tuple[str, list[str]]:
        exchange = {"request_id": "r", "ts": "2026-01-01T00:00:00+00:00", "account_id": "a",
                    "model": "m", "endpoint": "chat.completions",
                    "messages": [{"role": "user", "content": text}], "params": params}
        d = asyncio.run(decider.decide(exchange, KeyInfo("a")))
        return d.action, d.reasons

    assert decide("Solve this step by step: what is 17*23?") == ("challenge", ["cot_prompt"])
    assert decide("hello, how are you?") == ("allow", [])
    assert decide("hello again", n=8, logprobs=True) == ("degrade", ["extraction_params"])


def test_signals_process_answers_a_burst_in_order():
    """Frames of one event-loop tick go to the child in one write and come back batched:
    every caller still gets the signals of its own exchange."""
    from conftest_gateway import controlled_signals
    from distillguard.gateway.signals_proc import SignalsProcess

    exchanges = [{"messages": [{"role": "user", "content": f"t{i}: " + (
        "step by step" if i % 3 == 0 else "plain")}], "params": {"n": i % 4}}
        for i in range(300)]

    async def main():
        proc = SignalsProcess("conftest_gateway:controlled_signals", exchanges[0])
        await proc.start()
        try:
            return await asyncio.gather(*(proc.annotate(e) for e in exchanges))
        finally:
            await proc.close()

    assert asyncio.run(main()) == [controlled_signals(e) for e in exchanges]


def test_signals_process_prewarm_keeps_answers_identical(monkeypatch):
    """The signals process analyses the prompts of one batch of frames in one call; the
    answers (from annotate_request itself) are those of annotate_request alone, and after the
    prewarm annotate_request analyses nothing new (if it did, the prewarm would be wasted)."""
    from distillguard import signals
    from distillguard.gateway.signals_proc import SignalsProcess, batch_prewarm
    from distillguard.signals.annotate import SignalAnnotator, default_annotator

    assert batch_prewarm(lambda e: {}) is None  # only for the built-in function
    exchanges = [{"request_id": f"r{i}", "ts": "2026-01-01T00:00:00+00:00", "account_id": "a",
                  "model": "m", "endpoint": "chat.completions", "system": "be brief" if i % 5
                  else None, "tools": ["calc"] if i % 7 == 0 else None,
                  "messages": [{"role": "user", "content": text}],
                  "params": {"n": i % 3 + 1, "logprobs": i % 2 == 0}}
                 for i, text in enumerate(
                     [f"Solve step by step: what is {i} * 17?" for i in range(20)]
                     + [f"Translate to French: the {i} cats sleep." for i in range(20)]
                     + ["", "日本語で答えてください", "grade this essay: " + "x " * 500])]
    reference = SignalAnnotator()
    expected = [reference.annotate_request(e) for e in exchanges]
    prewarm = batch_prewarm(signals.annotate_request)
    annotator = default_annotator()
    for start in range(0, len(exchanges), 6):
        batch = exchanges[start:start + 6]
        prewarm(batch)
        computed = []
        real = annotator._analyse_uncached
        monkeypatch.setattr(annotator, "_analyse_uncached",
                            lambda texts, real=real, seen=computed: seen.append(texts) or real(texts))
        assert [signals.annotate_request(e) for e in batch] == expected[start:start + 6]
        assert computed == []
        monkeypatch.undo()

    async def main():  # and through the process, a burst at once
        proc = SignalsProcess("distillguard.signals:annotate_request", exchanges[0])
        await proc.start()
        try:
            return await asyncio.gather(*(proc.annotate(e) for e in exchanges))
        finally:
            await proc.close()

    assert asyncio.run(main()) == expected


def test_conditions_are_three_valued_while_signals_are_pending():
    """With the signals pending a condition is decided only when no signal could change it."""
    from distillguard.gateway.policy import PENDING, compile_condition, reads_signals

    gated = compile_condition({"signal.cot": True, "live.requests": {"gte": 100}})
    assert gated({PENDING: {}, "live.requests": 5}) is False
    assert gated({PENDING: {}, "live.requests": 500}) is None
    assert gated({"signal.cot": True, "live.requests": 500}) is True
    either = compile_condition({"any": [{"signal.cot": True}, {"account.flagged": True}]})
    assert either({PENDING: {}, "account.flagged": True}) is True
    assert either({PENDING: {}, "account.flagged": False}) is None
    assert either({"signal.cot": False, "account.flagged": False}) is False
    assert compile_condition({"not": {"live.cot_share": {"gte": .5}}})({PENDING: {}}) is None
    share = compile_condition({"live.template_repeat_share": {"gte": .5}})
    assert share({PENDING: {}, "live.template_repeat_share": 1.0}) is None
    assert compile_condition({"live.requests": {"gte": 1}})({PENDING: {},
                                                             "live.requests": 3}) is True
    # bounded shares: a threshold decided at both ends is decided
    bounded = compile_condition({"live.cot_share": {"gte": 0.9}, "signal.cot": True})
    assert bounded({PENDING: {"live.cot_share": (0.1, 0.12)}}) is False
    assert bounded({PENDING: {"live.cot_share": (0.85, 0.95)}}) is None
    assert compile_condition({"live.cot_share": {"gte": 0.2, "lte": 0.6}})(
        {PENDING: {"live.cot_share": (0.1, 0.9)}}) is None  # not monotone as a pair
    assert compile_condition({"live.cot_share": {"gte": 0.2, "lte": 0.6}})(
        {PENDING: {"live.cot_share": (0.3, 0.4)}}) is True
    assert compile_condition({"live.cot_share": 0.5})(
        {PENDING: {"live.cot_share": (0.5, 0.5)}}) is None  # equality: not a threshold
    assert reads_signals({"all": [{"request.n": 2}, {"not": {"live.cot_share": 1}}]})
    assert not reads_signals({"live.requests": {"gte": 1}, "account.flagged": True})


def _decision_sequence(signals_wait: str, seed: int = 7, n: int = 400):
    """Decide a random but fixed sequence of requests one after the other; returns the
    decisions and the decider."""
    import random

    from conftest_gateway import controlled_signals

    policy = policy_from_dict({
        "window_s": 60,
        "limits": [
            {"id": "acct", "scope": "account", "rate_per_s": 1, "burst": 12},
            {"id": "cot-x", "scope": "account", "rate_per_s": 0.2, "burst": 3,
             "when": {"signal.cot": True, "account.org_id": "org-x"}},
        ],
        "rules": [
            {"id": "allow-lab", "action": "allow", "when": {"account.org_id": "org-lab"}},
            {"id": "farm", "action": "challenge",
             "when": {"signal.cot": True, "live.cot_share": {"gte": 0.6},
                      "live.requests": {"gte": 6}}},
            {"id": "repeat", "action": "degrade",
             "when": {"live.template_repeat_share": {"gte": 0.5}, "request.n": {"gte": 2}}},
            {"id": "trial", "action": "block", "mode": "monitor",
             "when": {"any": [{"signal.rubric": True}, {"request.model": "m-secret"}]}},
        ]})
    decider = Decider(PolicyHolder(None, policy), LocalState(), EnforcementList(),
                      annotate=controlled_signals, signals_wait=signals_wait)
    rng = random.Random(seed)
    orgs = {"a0": "org-x", "a1": "org-x", "a2": "org-lab", "a3": None, "a4": None}
    requests = []
    for i in range(n):
        account = rng.choice(sorted(orgs))
        text = rng.choice(["tpl1", "tpl2", f"new{i}"]) + ": " + rng.choice(
            ["step by step please", "grade this", "plain question", "step by step, grade this"])
        requests.append((KeyInfo(account, org_id=orgs[account]), {
            "request_id": f"r{i}", "account_id": account, "endpoint": "chat.completions",
            "model": rng.choice(["m", "m", "m-secret"]),
            "messages": [{"role": "user", "content": text}],
            "params": {"n": rng.choice([1, 1, 2])}}, 1_000_000.0 + i * 0.4))

    async def main():
        out = [await decider.decide(ex, key, now=now) for key, ex, now in requests]
        await asyncio.sleep(0.01)  # signals counted after their decision
        return out

    return asyncio.run(main()), decider


def test_deciding_without_waiting_for_signals_decides_like_waiting():
    """signals_wait=needed takes exactly the decisions of signals_wait=always (rules and
    limits on signals, live shares, an allow rule, a monitor rule), most of them without
    waiting, and the live state ends up with the same counts."""
    early, needed = _decision_sequence("needed")
    waited, always = _decision_sequence("always")

    def summary(d):
        return (d.action, d.would_action, d.reasons, d.rules, d.monitored, d.degrade,
                round(d.retry_after_s, 6))

    assert [summary(d) for d in early] == [summary(d) for d in waited]
    assert {d.action for d in waited} >= {"allow", "challenge", "degrade", "throttle"}
    assert needed.decided_early > 50 and needed.decided_with_signals > 50
    assert always.decided_early == 0
    for account, win in always.state.accounts.items():
        other = needed.state.accounts[account]
        assert (other.cur, other.prev) == (win.cur, win.prev)


def test_signals_failing_after_an_early_decision_are_counted_not_raised():
    def broken(exchange: dict) -> dict:
        raise RuntimeError("signals broke")

    policy = policy_from_dict({"rules": [{"id": "r", "action": "block",
                                          "when": {"signal.cot": True,
                                                   "live.requests": {"gte": 1000}}}]})
    decider = Decider(PolicyHolder(None, policy), LocalState(), EnforcementList(),
                      annotate=broken)
    exchange = {"messages": [{"role": "user", "content": "x"}], "params": {}}

    async def main():
        d = await decider.decide(exchange, KeyInfo("a"), now=1000.0)
        await asyncio.sleep(0.01)
        return d

    assert asyncio.run(main()).action == "allow"
    assert decider.signal_errors == 1 and decider.decided_early == 1
    decider.signals_wait = "always"
    with pytest.raises(RuntimeError, match="signals broke"):
        asyncio.run(decider.decide(exchange, KeyInfo("a"), now=1001.0))
