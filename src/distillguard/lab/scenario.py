"""Scenario files: YAML data describing models, releases, honest populations and campaigns.

A scenario names a preset `kind` per group (honest kinds in `populations.HONEST_KINDS`,
campaign kinds in `campaigns.CAMPAIGN_KINDS`) and overrides any knob of `GROUP_DEFAULTS`.
Loading merges defaults <- preset <- file, validates every key and value (unknown keys and bad
values are errors that name their path), and applies `--scale`. `docs/traffic-lab.md` documents
every knob.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from distillguard.contract import ENDPOINTS, VERIFICATION_PATHS
from distillguard.lab.campaigns import CAMPAIGN_KINDS
from distillguard.lab.infrastructure import USER_AGENTS
from distillguard.lab.populations import HONEST_KINDS
from distillguard.lab.prompts import FAMILIES

SCENARIO_DIR = Path(__file__).with_name("scenarios")

TIMING_MODES = ("diurnal", "uniform", "load_balanced", "diurnal_mimicry")
PROFILES = ("flat", "office", "evening", "student", "night")
IP_STRATEGIES = ("residential", "university_nat", "cgnat", "datacenter_pool",
                 "residential_shared_with_honest", "sticky_per_account")
EMAIL_KINDS = ("consumer", "edu", "corporate", "startup")
SYSTEM_PROMPTS = (None, "agent", "computer")

#: Every knob of a group (honest population or campaign) with its default.
GROUP_DEFAULTS: dict[str, Any] = {
    "kind": None,
    "accounts": 100,
    "exchanges": None,
    "start_day": 0.0,
    "end_day": None,
    "volume": {"median": 5.0, "sigma": 0.8, "cap": None},
    "active_days": 0.5,
    "weekly": [1.0] * 7,
    "timing": {"mode": "diurnal", "profile": "flat", "timezones": {0: 1.0},
               "jitter_minutes": 0.0},
    "release_burst": None,
    "session": {"mean_turns": 1.0, "gap_seconds": 30.0, "max_history": 9},
    "families": {"chat": 1.0},
    "phases": [],
    "models": {"flagship": 1.0},
    "adoption": {"share": 0.3, "ramp_hours": 72.0},
    "pivot": None,
    "params": {"temperature": {"default": 1.0}, "max_tokens": {"default": 1.0}, "stream": 0.5,
               "reasoning": 0.0, "n": {"1": 1.0}, "logprobs": 0.0},
    "endpoint": {"chat.completions": 0.6, "messages": 0.3, "responses": 0.1},
    "user_agents": {"sdk_python": 1.0},
    "ip": {"strategy": "residential", "per_account": 2, "pool_size": None,
           "accounts_per_ip": None, "rotation": "per_account"},
    "payment": {"accounts_per_payment": 1, "none_share": 0.0},
    "verification": {"standard": 1.0},
    "email": {"consumer": 1.0},
    "org": {"accounts_per_org": None},
    "plan": {"free": 1.0},
    "signup": {"days_before": 365.0, "burst_hours": None},
    "system_prompt": None,
    "template_diversity": 1,
    "template_per_account": False,
    "paraphrase_rate": 0.0,
    "honest_share": 0.0,
    "error_rate": 0.004,
}
RELEASE_BURST_KEYS = {"volume": 1000.0, "hours": 24.0, "participation": 0.9}
PIVOT_KEYS = {"share": 0.5, "delay_hours": 6.0, "model": None}
PHASE_KEYS = {"from_fraction": 0.5}

#: Knobs whose value is a weight map with open keys: replaced, never merged, by an override.
WEIGHT_MAPS: dict[str, tuple | None] = {
    "timing.timezones": None, "families": tuple(FAMILIES), "models": None,
    "params.temperature": None, "params.max_tokens": None, "params.n": None,
    "endpoint": ENDPOINTS, "user_agents": tuple(USER_AGENTS),
    "verification": VERIFICATION_PATHS, "email": EMAIL_KINDS, "plan": None,
}
CHOICES: dict[str, tuple] = {
    "timing.mode": TIMING_MODES, "timing.profile": PROFILES, "ip.strategy": IP_STRATEGIES,
    "ip.rotation": ("per_account", "per_request"), "system_prompt": SYSTEM_PROMPTS,
}


class ScenarioError(ValueError):
    """A scenario file that cannot be used; the message names the offending key."""


@dataclass
class Model:
    name: str
    tier: str  # "flagship", "mini", "reasoning", ...: what group `models` weights refer to
    reasoning: bool = False


@dataclass
class Release:
    model: Model
    at_day: float


@dataclass
class Scenario:
    name: str
    description: str
    start: datetime
    days: int
    models: list[Model]
    releases: list[Release]
    populations: dict[str, dict]
    campaigns: dict[str, dict]
    scale: float = 1.0
    raw: dict = field(default_factory=dict)

    @property
    def all_models(self) -> list[Model]:
        return self.models + [r.model for r in self.releases]

    def resolved(self) -> dict:
        """The fully merged, scaled scenario as plain data (written to truth/scenario.yaml)."""
        return {
            "name": self.name, "description": self.description,
            "start": self.start.isoformat(), "days": self.days, "scale": self.scale,
            "models": [vars(m) for m in self.models],
            "releases": [{**vars(r.model), "at_day": r.at_day} for r in self.releases],
            "populations": self.populations, "campaigns": self.campaigns,
        }


def list_scenarios() -> list[str]:
    """Names of the scenarios shipped with distillguard."""
    return sorted(p.stem for p in SCENARIO_DIR.glob("*.yaml"))


def _merge(base: Any, override: Any, where: str, rel: str = "") -> Any:
    """Deep-merge `override` into `base`, validating keys against `base`. `where` prefixes
    error messages; `rel` is the knob path inside the group (how WEIGHT_MAPS names knobs)."""
    if rel in WEIGHT_MAPS:
        return _weights(override, rel, f"{where}.{rel}")
    if rel == "timing.profile":  # a profile name or a weight map of names, per account
        if isinstance(override, dict):
            for key in override:
                if key not in PROFILES:
                    raise ScenarioError(f"{where}.{rel}.{key}: unknown (allowed: "
                                        f"{', '.join(PROFILES)})")
            return _weights(override, "timing.timezones", f"{where}.{rel}")
        return override
    if isinstance(base, dict) and isinstance(override, dict):
        out = copy.deepcopy(base)
        for key, value in override.items():
            sub = f"{rel}.{key}" if rel else str(key)
            if key not in base:
                raise ScenarioError(f"{where}.{sub}: unknown knob "
                                    f"(known: {', '.join(map(str, base))})")
            out[key] = _merge(base[key], value, where, sub)
        return out
    if isinstance(base, dict) and override is not None:
        raise ScenarioError(f"{where}.{rel}: expected a mapping, got {override!r}")
    return copy.deepcopy(override)


def _weights(value: Any, rel: str, path: str) -> dict:
    allowed = WEIGHT_MAPS[rel]
    if not isinstance(value, dict) or not value:
        raise ScenarioError(f"{path}: expected a non-empty mapping of weights, got {value!r}")
    for key, weight in value.items():
        if allowed is not None and key not in allowed:
            raise ScenarioError(f"{path}.{key}: unknown (allowed: {', '.join(allowed)})")
        if not isinstance(weight, int | float) or weight < 0:
            raise ScenarioError(f"{path}.{key}: weight must be a number >= 0, got {weight!r}")
    if sum(value.values()) <= 0:
        raise ScenarioError(f"{path}: weights sum to zero")
    return dict(value)


def _check_group(spec: dict, where: str, tiers: set[str]) -> None:
    for path, allowed in CHOICES.items():
        node: Any = spec
        for part in path.split("."):
            node = node[part]
        if isinstance(node, dict) and path == "timing.profile":
            continue  # a weight map, checked when merged
        if node not in allowed:
            raise ScenarioError(f"{where}.{path}: {node!r} is not one of {allowed}")
    numbers = {"accounts": spec["accounts"], "active_days": spec["active_days"],
               "volume.median": spec["volume"]["median"], "volume.sigma": spec["volume"]["sigma"],
               "session.mean_turns": spec["session"]["mean_turns"],
               "paraphrase_rate": spec["paraphrase_rate"], "honest_share": spec["honest_share"]}
    for key, value in numbers.items():
        if not isinstance(value, int | float) or value < 0:
            raise ScenarioError(f"{where}.{key}: must be a number >= 0, got {value!r}")
    for key in ("active_days", "paraphrase_rate", "honest_share"):
        if spec[key] > 1:
            raise ScenarioError(f"{where}.{key}: must be between 0 and 1, got {spec[key]}")
    if spec["session"]["mean_turns"] < 1:
        raise ScenarioError(f"{where}.session.mean_turns: must be >= 1")
    if len(spec["weekly"]) != 7:
        raise ScenarioError(f"{where}.weekly: needs 7 multipliers (Monday..Sunday)")
    if spec["template_diversity"] < 1:
        raise ScenarioError(f"{where}.template_diversity: must be >= 1")
    if not set(spec["models"]) & tiers:
        raise ScenarioError(f"{where}.models: none of {sorted(spec['models'])} is a model tier "
                            f"of this scenario ({sorted(tiers)})")
    for i, phase in enumerate(spec["phases"]):
        if not isinstance(phase, dict):
            raise ScenarioError(f"{where}.phases[{i}]: expected a mapping")
        rest = {k: v for k, v in phase.items() if k != "families"}
        spec["phases"][i] = _merge(PHASE_KEYS, rest, f"{where}.phases[{i}]", "phase")
        spec["phases"][i]["families"] = _weights(phase.get("families"), "families",
                                                 f"{where}.phases[{i}].families")


def _group(raw: Any, where: str, presets: dict[str, dict], campaign: bool,
           scale: float, tiers: set[str]) -> dict:
    if not isinstance(raw, dict) or "kind" not in raw:
        raise ScenarioError(f"{where}: needs a mapping with a 'kind'")
    kind = raw["kind"]
    if kind not in presets:
        raise ScenarioError(f"{where}.kind: {kind!r} is not one of {', '.join(presets)}")
    spec = _merge(GROUP_DEFAULTS, {**presets[kind], "kind": kind}, f"preset {kind}")
    overrides = {k: v for k, v in raw.items() if k not in ("release_burst", "pivot")}
    spec = _merge(spec, overrides, where)
    for key, keys in (("release_burst", RELEASE_BURST_KEYS), ("pivot", PIVOT_KEYS)):
        value = raw.get(key, spec[key])
        if value is not None:
            value = _merge(_merge(keys, spec[key] or {}, where, key),
                           value if key in raw else {}, where, key)
        spec[key] = value
    if campaign and not spec["exchanges"]:
        raise ScenarioError(f"{where}.exchanges: a campaign needs a total exchange count")
    _check_group(spec, where, tiers)
    spec["accounts"] = max(1, round(spec["accounts"] * scale))
    if spec["exchanges"]:
        spec["exchanges"] = max(1, round(spec["exchanges"] * scale))
    if spec["ip"]["pool_size"]:
        spec["ip"]["pool_size"] = max(1, round(spec["ip"]["pool_size"] * scale))
    return spec


def _models(raw: Any, where: str) -> list[Model]:
    if not isinstance(raw, list) or not raw:
        raise ScenarioError(f"{where}: needs a non-empty list of models")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or "name" not in m or "tier" not in m:
            raise ScenarioError(f"{where}[{i}]: each model needs 'name' and 'tier'")
        out.append(Model(str(m["name"]), str(m["tier"]), bool(m.get("reasoning", False))))
    return out


def load_scenario(scenario: str | Path, scale: float = 1.0) -> Scenario:
    """Load a shipped scenario by name or a YAML file by path, merged, validated and scaled."""
    if scale <= 0:
        raise ScenarioError(f"scale must be > 0, got {scale}")
    path = Path(scenario)
    if not path.suffix and (SCENARIO_DIR / f"{scenario}.yaml").is_file():
        path = SCENARIO_DIR / f"{scenario}.yaml"
    if not path.is_file():
        raise ScenarioError(f"{scenario}: no such scenario file or shipped scenario "
                            f"(shipped: {', '.join(list_scenarios())})")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ScenarioError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ScenarioError(f"{path}: expected a mapping at the top level")
    known = {"name", "description", "start", "days", "models", "releases", "populations",
             "campaigns"}
    unknown = set(raw) - known
    if unknown:
        raise ScenarioError(f"{path}: unknown top-level keys {sorted(unknown)}")
    try:
        start = datetime.fromisoformat(str(raw.get("start", "2026-02-02T00:00:00+00:00"))
                                       .replace("Z", "+00:00"))
    except ValueError as exc:
        raise ScenarioError(f"start: {exc}") from exc
    if start.tzinfo is None:
        raise ScenarioError("start: needs a time zone (e.g. 2026-02-02T00:00:00Z)")
    days = raw.get("days")
    if not isinstance(days, int) or days < 1:
        raise ScenarioError(f"days: must be an integer >= 1, got {days!r}")
    models = _models(raw.get("models"), "models")
    releases = []
    for i, r in enumerate(raw.get("releases") or []):
        (model,) = _models([r], f"releases[{i}]")
        at_day = r.get("at_day")
        if not isinstance(at_day, int | float) or not 0 <= at_day < days:
            raise ScenarioError(f"releases[{i}].at_day: must be within [0, {days}), got {at_day}")
        releases.append(Release(model, float(at_day)))
    names = [m.name for m in models + [r.model for r in releases]]
    if len(set(names)) != len(names):
        raise ScenarioError("models/releases: model names must be unique")
    tiers = {m.tier for m in models}
    populations = {str(k): _group(v, f"populations.{k}", HONEST_KINDS, False, scale, tiers)
                   for k, v in (raw.get("populations") or {}).items()}
    campaigns = {str(k): _group(v, f"campaigns.{k}", CAMPAIGN_KINDS, True, scale, tiers)
                 for k, v in (raw.get("campaigns") or {}).items()}
    if not populations and not campaigns:
        raise ScenarioError(f"{path}: no populations and no campaigns")
    if set(populations) & set(campaigns) or "attacker" in populations:
        raise ScenarioError("population names must differ from campaign ids and 'attacker'")
    return Scenario(str(raw.get("name", path.stem)), str(raw.get("description", "")),
                    start.astimezone(UTC), days, models, releases, populations, campaigns,
                    scale, raw)
