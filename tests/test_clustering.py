"""Stage 4: Leiden communities and the FRAUDAR dense-block check."""

from __future__ import annotations

import igraph as ig
import leidenalg
import numpy as np
import pyarrow as pa

from distillguard import clustering, linking


def clique_graph() -> linking.AccountGraph:
    """Two 6-cliques joined by one weak edge, plus two isolated accounts."""
    names = [f"a{i}" for i in range(6)] + [f"b{i}" for i in range(6)] + ["x", "y"]
    src, dst, w = [], [], []
    for base in (0, 6):
        for i in range(base, base + 6):
            for j in range(i + 1, base + 6):
                src.append(i)
                dst.append(j)
                w.append(5.0)
    src.append(5)
    dst.append(6)
    w.append(1.0)
    return linking.AccountGraph(names, np.array(src), np.array(dst), np.array(w))


def test_leiden_separates_cliques_and_leaves_isolated_accounts_out():
    label = clustering.leiden_clusters(clique_graph(), resolution=0.05)
    assert len(set(label[:6])) == 1 and len(set(label[6:12])) == 1
    assert label[0] != label[6]
    assert label[12] == -1 and label[13] == -1


def test_leiden_is_deterministic():
    g = clique_graph()
    assert np.array_equal(clustering.leiden_clusters(g), clustering.leiden_clusters(g))


def test_empty_graph_has_no_clusters():
    g = linking.AccountGraph(["a", "b"], np.zeros(0, int), np.zeros(0, int), np.zeros(0))
    assert (clustering.leiden_clusters(g) == -1).all()


def test_leiden_per_component_keeps_the_whole_graph_objective():
    """A small component is clustered at the resolution of the whole graph: beside a heavy
    component, two triangles joined by one edge are one community (the whole graph's weight
    makes the configuration model's penalty small), as leidenalg on the whole graph finds.
    Alone at resolution 1, leidenalg splits them, so an unscaled per-component run fails."""
    names = [f"h{i:02d}" for i in range(40)] + [f"t{i}" for i in range(6)]
    heavy = [(i, j, 10.0) for i in range(40) for j in range(i + 1, 40)]  # a 40-clique
    triangles = [(0, 1), (1, 2), (0, 2), (3, 4), (4, 5), (3, 5), (2, 3)]
    edges = heavy + [(40 + a, 40 + b, 1.0) for a, b in triangles]
    src, dst, w = (np.array(col) for col in zip(*edges, strict=True))
    label = clustering.leiden_clusters(linking.AccountGraph(names, src, dst, w))
    assert len(set(label[40:])) == 1 and label[40] >= 0 and label[40] != label[0]
    alone = leidenalg.find_partition(ig.Graph(n=6, edges=triangles),
                                     leidenalg.RBConfigurationVertexPartition,
                                     weights=[1.0] * len(triangles), seed=0, n_iterations=-1)
    assert len(alone) == 2


def ev(rows):
    return pa.table(
        {"account_id": [r[0] for r in rows], "kind": [r[1] for r in rows],
         "key": [r[2] for r in rows]},
        schema=linking.EVIDENCE_SCHEMA,
    )


def test_fraudar_finds_the_block_despite_camouflage():
    rng = np.random.default_rng(1)
    rows = []
    attackers = [f"atk{i}" for i in range(10)]
    honest = [f"hon{i}" for i in range(300)]
    for a in attackers:  # each attacker uses most of 15 rare pool keys ...
        rows += [(a, "ip", f"pool-{k}") for k in range(15) if rng.random() < 0.8]
        # ... and camouflage: popular keys the honest use too
        rows += [(a, "template", f"popular-{k}") for k in range(5)]
    for h in honest:
        rows += [(h, "template", f"popular-{int(k)}") for k in rng.integers(0, 5, size=3)]
        rows += [(h, "ip", f"home-{int(rng.integers(0, 200))}")]
    names = sorted(attackers + honest)
    block, density = clustering.fraudar(ev(rows), names)
    found = {names[i] for i in np.flatnonzero(block == 0)}
    assert found == set(attackers)
    assert density[0] > 0


def test_fraudar_without_structure_returns_no_block():
    rows = [(f"u{i}", "ip", f"ip-{i}") for i in range(50)]
    block, density = clustering.fraudar(ev(rows), sorted(f"u{i}" for i in range(50)))
    assert (block == -1).all() and density == {}
