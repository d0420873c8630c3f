"""Human-readable campaign reports from the findings: Rich (terminal), Markdown and JSON.

Every report is built from the finding tables alone (contract.FINDING_*_SCHEMA), so it can be
produced from a store or from a findings directory long after the scan.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table


def load_from_store(con: duckdb.DuckDBPyConnection) -> tuple[pa.Table, pa.Table]:
    """(finding_accounts, finding_campaigns) from the store."""
    return (
        con.execute("SELECT * FROM finding_accounts").to_arrow_table(),
        con.execute("SELECT * FROM finding_campaigns").to_arrow_table(),
    )


def load_from_dir(path: str | Path) -> tuple[pa.Table, pa.Table]:
    """(accounts, campaigns) from a findings directory written by `scan --out`."""
    path = Path(path)
    return pq.read_table(path / "accounts.parquet"), pq.read_table(path / "campaigns.parquet")


def _pairs(value) -> list[tuple]:
    """Arrow maps come back as lists of (key, value) tuples; dicts are accepted too."""
    if value is None:
        return []
    return list(value.items()) if isinstance(value, dict) else list(value)


def to_plain(v):
    """A finding row as JSON-ready values: timestamps ISO 8601, Arrow maps as objects."""
    if isinstance(v, datetime):
        return v.isoformat()
    if isinstance(v, list) and v and isinstance(v[0], tuple):
        return {k: to_plain(x) for k, x in v}
    if isinstance(v, list):
        return [to_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: to_plain(x) for k, x in v.items()}
    return v


def _ts(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M UTC") if value else "-"


def _shares(value, top: int = 5) -> str:
    return ", ".join(f"{k} {100 * v:.0f}%" for k, v in _pairs(value)[:top]) or "-"


def campaign_summary_table(campaigns: pa.Table, *, title: str = "Campaigns") -> Table:
    """One line per campaign: size, window, when flagged, what it targeted."""
    t = Table(title=title, show_lines=False)
    for col in ("campaign", "score", "accounts", "exchanges", "first seen", "flagged at",
                "capabilities", "models", "pivots"):
        t.add_column(col, overflow="fold")
    for c in campaigns.to_pylist():
        pivots = ", ".join(f"{p['model']} @ {_ts(p['flagged_at'])}" for p in c["pivots"] or [])
        t.add_row(
            c["campaign_id"], f"{c['score'] or 0:.2f}", str(c["n_accounts"]),
            str(c["n_exchanges"]), _ts(c["first_seen"]), _ts(c["first_flagged_at"]),
            _shares(c["capabilities"], 3), _shares(c["models"], 3), pivots or "-",
        )
    return t


def campaign_panel(campaign: dict, *, max_accounts: int = 10) -> Panel:
    """A full panel for one campaign: reasons, indicators, capabilities, models, accounts."""
    body = Table.grid(padding=(0, 2))
    body.add_column(style="bold")
    body.add_column()
    body.add_row("window", f"{_ts(campaign['first_seen'])} -> {_ts(campaign['last_seen'])}")
    body.add_row("first flagged", _ts(campaign["first_flagged_at"]))
    body.add_row("size", f"{campaign['n_accounts']} accounts, {campaign['n_exchanges']} exchanges")
    body.add_row("capabilities", _shares(campaign["capabilities"], 7))
    body.add_row("models", _shares(campaign["models"], 7))
    for p in campaign["pivots"] or []:
        body.add_row("release pivot", f"to {p['model']}, flagged {_ts(p['flagged_at'])}")
    for name, values in _pairs(campaign["indicators"]):
        body.add_row(name.replace("_", " "), ", ".join(values[:6]))
    body.add_row("evidence", "\n".join(f"- {r}" for r in campaign["reasons"] or []))
    accts = campaign["accounts"] or []
    more = f" (+{len(accts) - max_accounts} more)" if len(accts) > max_accounts else ""
    body.add_row("accounts", ", ".join(accts[:max_accounts]) + more)
    return Panel(body, title=f"campaign {campaign['campaign_id']}", expand=False)


def account_panel(account: dict) -> Panel:
    """Why one account was (or was not) flagged."""
    lines = [
        f"score {account['score']:.3f}; flagged: {account['flagged']}; "
        f"campaign: {account['campaign_id'] or '-'}; first flagged {_ts(account['first_flagged_at'])}"
    ]
    lines += [f"- {r}" for r in account["reasons"] or []] or ["- no evidence above population norms"]
    return Panel("\n".join(lines), title=f"account {account['account_id']}", expand=False)


def render(console: Console, accounts: pa.Table, campaigns: pa.Table, *,
           campaign_id: str | None = None) -> None:
    """Print the summary table and a panel per campaign (or just the one asked for)."""
    rows = campaigns.to_pylist()
    if campaign_id:
        rows = [c for c in rows if c["campaign_id"] == campaign_id]
    n_flagged = sum(1 for f in accounts["flagged"].to_pylist() if f)
    console.print(f"{len(rows)} campaigns; {n_flagged} of {accounts.num_rows} accounts flagged")
    if rows:
        console.print(campaign_summary_table(pa.Table.from_pylist(rows, schema=campaigns.schema)))
        console.print(Group(*[campaign_panel(c) for c in rows]))


def to_markdown(accounts: pa.Table, campaigns: pa.Table) -> str:
    """The same report as Markdown (for tickets and threat-intel write-ups)."""
    n_flagged = sum(1 for f in accounts["flagged"].to_pylist() if f)
    out = [
        "# distillguard campaign report",
        "",
        f"{campaigns.num_rows} campaigns; {n_flagged} of {accounts.num_rows} accounts flagged.",
        "",
        "| campaign | score | accounts | exchanges | first seen | first flagged | capabilities |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = campaigns.to_pylist()
    for c in rows:
        out.append(
            f"| {c['campaign_id']} | {c['score'] or 0:.2f} | {c['n_accounts']} | "
            f"{c['n_exchanges']} | {_ts(c['first_seen'])} | {_ts(c['first_flagged_at'])} | "
            f"{_shares(c['capabilities'], 3)} |"
        )
    for c in rows:
        out += ["", f"## {c['campaign_id']}", ""]
        out.append(f"- window: {_ts(c['first_seen'])} → {_ts(c['last_seen'])}")
        out.append(f"- models: {_shares(c['models'], 7)}")
        for p in c["pivots"] or []:
            out.append(f"- release pivot to **{p['model']}**, flagged {_ts(p['flagged_at'])}")
        for name, values in _pairs(c["indicators"]):
            out.append(f"- {name.replace('_', ' ')}: " + ", ".join(f"`{v}`" for v in values[:6]))
        out += ["", "Evidence:", ""] + [f"- {r}" for r in c["reasons"] or []]
    return "\n".join(out) + "\n"


def to_json(accounts: pa.Table, campaigns: pa.Table) -> str:
    """Campaigns and flagged accounts as JSON (timestamps ISO 8601, maps as objects)."""
    flagged = [a for a in accounts.to_pylist() if a["flagged"]]
    return json.dumps(
        {"campaigns": [to_plain(c) for c in campaigns.to_pylist()],
         "flagged_accounts": [to_plain(a) for a in flagged]},
        indent=2,
    )
