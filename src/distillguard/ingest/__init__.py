"""Ingest: logs (native JSONL / Parquet, OpenAI and Anthropic gateway pairs) -> the store.

Every row is either stored in the contract tables, counted as a harmless replay of a row
already stored, or quarantined with a reason code; nothing is silently dropped.
"""

from distillguard.ingest.load import KINDS, Progress, ingest_paths
from distillguard.ingest.quarantine import list_quarantine, quarantine_counts
from distillguard.ingest.readers import FORMATS, IngestFileError
from distillguard.ingest.report import FileReport, IngestReport, stats

__all__ = [
    "FORMATS",
    "KINDS",
    "FileReport",
    "IngestFileError",
    "IngestReport",
    "Progress",
    "ingest_paths",
    "list_quarantine",
    "quarantine_counts",
    "stats",
]
