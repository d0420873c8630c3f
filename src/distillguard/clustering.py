"""Stage 4: communities of the account graph, plus a camouflage-resistant dense-block check.

* `leiden_clusters(graph)`: Leiden (leidenalg, RB configuration model on the evidence weights),
  deterministic for a seed; singletons and tiny groups get no cluster.
* `fraudar(evidence)`: FRAUDAR's greedy peeling (Hooi et al., KDD 2016) on the bipartite
  account x evidence-key graph. A key's column weight is 1/log(df + 5), so attackers who add
  honest-looking traffic (edges to popular keys, "camouflage") cannot dilute the block: those
  edges weigh almost nothing, and peeling keeps the accounts that share many rare keys.
  Blocks are found one after another, removing each before looking for the next.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import igraph as ig
import leidenalg
import numpy as np
import pyarrow as pa

from distillguard.linking import AccountGraph


@dataclass
class Clusters:
    """Cluster label per vertex of the graph (-1: no cluster) and dense-block label per vertex."""

    accounts: list[str]
    label: np.ndarray
    block: np.ndarray
    block_density: dict[int, float]

    def members(self) -> dict[int, np.ndarray]:
        """Vertex indices of every cluster."""
        order = np.argsort(self.label, kind="stable")
        labels = self.label[order]
        out = {}
        for lab in np.unique(labels):
            if lab >= 0:
                out[int(lab)] = order[labels == lab]
        return out


def leiden_clusters(
    graph: AccountGraph, *, resolution: float = 0.05, min_size: int = 3, seed: int = 0
) -> np.ndarray:
    """Leiden community label per vertex; communities smaller than `min_size` get -1.

    Labels are renumbered by (descending size, smallest member) so they are stable across
    engines and runs.
    """
    n = len(graph.accounts)
    label = np.full(n, -1, dtype=np.int64)
    if graph.n_edges == 0:
        return label
    g = ig.Graph(n=n, edges=np.column_stack([graph.src, graph.dst]).tolist(), directed=False)
    g.es["weight"] = graph.weight.tolist()
    part = leidenalg.find_partition(
        g,
        leidenalg.RBConfigurationVertexPartition,
        weights="weight",
        resolution_parameter=resolution,
        seed=seed,
        n_iterations=-1,
    )
    groups = [sorted(c) for c in part if len(c) >= min_size]
    groups.sort(key=lambda c: (-len(c), c[0]))
    for lab, members in enumerate(groups):
        label[members] = lab
    return label


def fraudar(
    ev: pa.Table,
    accounts: list[str],
    *,
    max_blocks: int = 10,
    min_block: int = 3,
    max_df: int = 2000,
) -> tuple[np.ndarray, dict[int, float]]:
    """Dense blocks of accounts sharing many rare evidence keys; returns (block per account,
    density per block). Block -1 means none. A block is kept only if its density is at least
    twice the density of the whole remaining graph (otherwise there is nothing dense left)."""
    index = {a: i for i, a in enumerate(accounts)}
    acct = np.array([index.get(a, -1) for a in ev["account_id"].to_pylist()], dtype=np.int64)
    keys = np.char.add(
        np.asarray(ev["kind"].to_pylist(), dtype=str), np.asarray(ev["key"].to_pylist(), dtype=str)
    )
    ok = acct >= 0
    _, key_idx = np.unique(keys[ok], return_inverse=True)
    acct = acct[ok]
    pairs = np.unique(key_idx.astype(np.int64) * len(accounts) + acct)
    key_idx, acct = pairs // len(accounts), pairs % len(accounts)
    df = np.bincount(key_idx)
    usable = (df[key_idx] >= 2) & (df[key_idx] <= max_df)
    key_idx, acct = key_idx[usable], acct[usable]
    w = 1.0 / np.log(df[key_idx] + 5.0)
    block = np.full(len(accounts), -1, dtype=np.int64)
    density: dict[int, float] = {}
    alive = np.ones(key_idx.size, dtype=bool)
    for b in range(max_blocks):
        if not alive.any():
            break
        rows, cols, wts = acct[alive], key_idx[alive], w[alive]
        total = wts.sum()
        n_nodes = np.unique(rows).size + np.unique(cols).size
        chosen, dens = _peel(rows, cols, wts)
        if chosen.size < min_block or dens < 2.0 * total / max(n_nodes, 1):
            break
        block[chosen] = b
        density[b] = float(dens)
        alive &= ~np.isin(acct, chosen)
    return block, density


def _peel(rows: np.ndarray, cols: np.ndarray, wts: np.ndarray) -> tuple[np.ndarray, float]:
    """Greedy peeling: repeatedly drop the node with the least weighted degree, remember the
    subset with the highest average weight per node; return its account rows and density."""
    urow, r = np.unique(rows, return_inverse=True)
    ucol, c = np.unique(cols, return_inverse=True)
    nr = urow.size
    node_a = r
    node_b = nr + c
    n = nr + ucol.size
    deg = np.bincount(node_a, weights=wts, minlength=n) + np.bincount(node_b, weights=wts, minlength=n)
    adj_order = np.argsort(np.concatenate([node_a, node_b]), kind="stable")
    ends_nodes = np.concatenate([node_a, node_b])[adj_order]
    other = np.concatenate([node_b, node_a])[adj_order]
    ew = np.concatenate([wts, wts])[adj_order]
    edge_id = np.concatenate([np.arange(wts.size), np.arange(wts.size)])[adj_order]
    starts = np.searchsorted(ends_nodes, np.arange(n))
    stops = np.searchsorted(ends_nodes, np.arange(n), side="right")
    edge_alive = np.ones(wts.size, dtype=bool)
    removed = np.zeros(n, dtype=bool)
    heap = [(float(deg[i]), i) for i in range(n)]
    heapq.heapify(heap)
    total = float(wts.sum())
    size = n
    best = total / size
    best_step = 0
    order = []
    while heap:
        d, i = heapq.heappop(heap)
        if removed[i] or d != deg[i]:
            continue
        removed[i] = True
        order.append(i)
        for e in range(starts[i], stops[i]):
            if edge_alive[edge_id[e]]:
                edge_alive[edge_id[e]] = False
                j = other[e]
                deg[j] -= ew[e]
                total -= ew[e]
                heapq.heappush(heap, (float(deg[j]), j))
        size -= 1
        if size > 0 and total / size > best:
            best = total / size
            best_step = len(order)
    kept = np.ones(n, dtype=bool)
    kept[np.array(order[:best_step], dtype=np.int64)] = False
    acct_nodes = np.flatnonzero(kept[:nr])
    return urow[acct_nodes], best
