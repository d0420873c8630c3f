"""Request signals: per-exchange, explainable evidence computed from the request alone.

`annotate` (Arrow batches: the DuckDB and Spark engines) and `annotate_request` (one live request:
the gateway) run the same code. Detection rules are data (`rules/*.yaml`), compiled into one
Hyperscan database; see docs/signals.md.
"""

from distillguard.signals.annotate import (
    CAPABILITY_PRIORITY,
    SignalAnnotator,
    TextSignals,
    annotate,
    annotate_request,
    default_annotator,
)
from distillguard.signals.rules import Rule, RuleError, RulePack, load_rule_packs

__all__ = [
    "CAPABILITY_PRIORITY",
    "Rule",
    "RuleError",
    "RulePack",
    "SignalAnnotator",
    "TextSignals",
    "annotate",
    "annotate_request",
    "default_annotator",
    "load_rule_packs",
]
