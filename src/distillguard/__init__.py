"""distillguard: detect, attribute and stop distillation attacks on LLM APIs.

Pipeline, one module (or package) per stage:
ingest -> signals -> fingerprints -> linking -> clustering -> scoring -> campaigns
-> reports / gateway (enforcement) / sharing.
"""

__version__ = "0.1.0"
