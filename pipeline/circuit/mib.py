"""The MIB circuit track's yardstick on this project's graph: its JSON graph format, its edge
fractions, its pruning and its areas (CPR, CMD).

What this matches (read in hannamw/MIB-circuit-track `MIB_circuit_track/evaluation.py`,
`print_results.py` and hannamw/EAP-IG `eap/graph.py`; written here, not copied):

- Fractions: 0.1%, 0.2%, 0.5%, 1%, 2%, 5%, 10%, 20%, 50%, 100% of all edges; the circuit at a
  fraction f is the int(f x n_edges) edges of largest score (EAP-IG `apply_topn`: by |score| when
  `absolute`, else by the signed score), then pruned (EAP-IG `Graph.prune`): an edge stays only
  if it lies on a path from the input to the logits (a node stays while it has an edge in and an
  edge out, the input needs none in; repeated until nothing changes, which leaves exactly the
  edges on such paths).
- Faithfulness f = (m(C) - m(empty)) / (m(full) - m(empty)), each m the mean over prompts; m(empty)
  is the circuit with no edge under the same ablation, m(full) the unablated model.
- CPR = sum over neighbouring fractions of (x2 - x1) (f1 + f2) / 2, CMD the same with |1 - f|:
  trapezoids over the ten fractions themselves (from 0.001 to 1, no point at 0, linear x). The
  project's own CPR/CMD (pipeline/circuit/faithfulness.py) start at an empty circuit at 0 and
  use log-spaced sizes, so the two are not interchangeable.
- MIB's leaderboard (`print_results.py`) quotes CPR from circuits ranked by the signed score and
  CMD from circuits ranked by |score| where both were run; `circuit.mib.rankings` chooses which.

Scores keep MIB's sign: its attribution runs EAP-IG on the loss -logit_diff with (corrupted - clean)
activations, i.e. (clean - corrupted) . grad(metric), this project's convention (positive: the edge
carries the clean behaviour), so `signed` ranks alike. Scales differ (MIB sums batch means; this
writes the mean over the scored prompts), which no ranking sees.

The format (EAP-IG `Graph.to_json` / `from_json`): {"cfg": {n_layers, n_heads, parallel_attn_mlp,
d_model}, "nodes": {name: {"in_graph": bool}}, "edges": {name: {"score": float, "in_graph": bool}}}.
Upstream names are this project's (`input`, `a3.h1`, `m5`); an edge into a head's query, key or
value input is `<up>->a{l}.h{h}<q>` (`<k>`, `<v>`), into an MLP `<up>->m{l}`, into the logits
`<up>->logits`; `Graph.from_model` builds one edge from every earlier node into every input
(no edge from a parallel block's heads to its own MLP).

Grouped key/value heads (SmolLM2, Llama, Qwen). MIB runs these models with TransformerLens's
`ungroup_grouped_query_attention`, so its graph has a key and a value input per *query* head. This
project's graph has one per key/value head (TransformerLens 4's bridge has no ungrouping), whose
input is shared by the query heads h with h // (n_heads / n_kv_heads) = g (Hugging Face's
`repeat_kv`). The mapping chosen, both ways:
- export: the edge u -> a{l}.kv{g}.k becomes u -> a{l}.h{h}<k> for each query head h of group g,
  each with the group's score divided by the group size (the per-head scores of an ungrouped run
  sum to the grouped score; the split is even because a grouped run cannot tell them apart) and
  the group edge's in_graph;
- import: the group edge takes the sum of its query heads' scores and is in the circuit when any
  of them is, so a MIB circuit that keeps some but not all of a group's key edges is evaluated
  here with all of them (`merged` counts those).
The x-axis of this project's MIB evaluation is a fraction of this graph's edges; for grouped
models MIB's graph has more (every k/v edge once per query head).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.circuit.graph import Graph
from pipeline.validation import refuse

FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
RANKINGS = ("absolute", "signed")
ACCEPTED = ("an EAP-IG / MIB circuit JSON of this model's shape: {\"cfg\": {n_layers, n_heads, parallel_attn_mlp, "
            "d_model}, \"nodes\": {name: {in_graph}}, \"edges\": {\"input->a0.h0<q>\": {score, in_graph}, ...}}")


# ---------------------------------------------------------------- sizes, ranking, pruning, areas

def counts(n_edges: int) -> list[int]:
    """Edges kept at each fraction: int(f x n), as MIB's evaluation truncates."""
    return [int(f * n_edges) for f in FRACTIONS]


def top_n(scores: torch.Tensor, n: int, ranking: str) -> torch.Tensor:
    """bool [n_edges]: the n edges of largest |score| (absolute) or largest score (signed)."""
    key = scores.abs() if ranking == "absolute" else scores
    out = torch.zeros(len(scores), dtype=torch.bool)
    out[torch.argsort(key, descending=True, stable=True)[:n]] = True
    return out


def down_node(graph: Graph) -> torch.Tensor:
    """[n_down] the upstream index of the node each downstream input belongs to (-1: logits). A
    key/value head's input belongs to the first query head of its group; `prune` spreads it."""
    out = torch.full((graph.n_down,), -1, dtype=torch.long)
    for l in range(graph.n_layers):
        for kind in graph.input_kinds:
            sl = graph.down_slice(l, kind)
            if kind == "q":
                out[sl] = torch.arange(graph.up_head(l, 0), graph.up_head(l, 0) + graph.n_heads)
            elif kind in ("k", "v"):
                out[sl] = graph.up_head(l, 0) + torch.arange(graph.n_kv_heads) * (graph.n_heads // graph.n_kv_heads)
            elif kind == "mlp":
                out[sl] = graph.up_mlp(l)
            else:  # one input per layer: it feeds every head and the MLP of its layer
                out[sl] = graph.up_head(l, 0)
    return out


def readers(graph: Graph) -> torch.Tensor:
    """bool [n_down, n_up + 1]: the nodes that read each downstream input (a shared key/value
    input is read by every query head of its group, a merged block input by its whole layer; the
    last column is the logits)."""
    out = torch.zeros(graph.n_down, graph.n_up + 1, dtype=torch.bool)
    per = graph.n_heads // graph.n_kv_heads
    for v, u in enumerate(down_node(graph).tolist()):
        if u < 0:
            out[v, -1] = True
        elif ".kv" in graph.down_names[v]:
            out[v, u:u + per] = True
        elif graph.inputs == "block":
            out[v, u:u + graph.n_heads + 1] = True
        else:
            out[v, u] = True
    return out


def prune(graph: Graph, circuit: torch.Tensor) -> torch.Tensor:
    """bool [..., n_edges]: the circuit's edges that lie on a path from the input to the logits
    (EAP-IG `Graph.prune`'s fixed point; module docstring)."""
    if circuit.dim() > 1:
        return torch.stack([prune(graph, c) for c in circuit]) if len(circuit) else circuit.clone()
    reads = readers(graph).float()
    dense = graph.dense(circuit.float())  # [n_up, n_down]
    # forwards, in node order: the nodes the input reaches along circuit edges
    reached = torch.zeros(graph.n_up + 1)
    reached[0] = 1
    for u in range(graph.n_up):
        if reached[u]:
            reached = torch.maximum(reached, ((dense[u] @ reads) > 0).float())
    # backwards: the nodes that reach the logits (every reader of an input comes after its writers)
    live = torch.zeros(graph.n_up + 1)
    live[-1] = 1
    for u in range(graph.n_up - 1, -1, -1):
        live[u] = float((dense[u] * (reads @ live)).sum() > 0)
    up, down = graph.edges
    return circuit & (reached[up] > 0) & ((reads @ live)[down] > 0)


def areas(faith):
    """(CPR, CMD) of faithfulness at the ten FRACTIONS, as MIB's evaluate_area_under_curve; floats
    for one curve [10], arrays for curves [..., 10]."""
    f = np.asarray(faith, dtype=float)
    dx = np.diff(np.asarray(FRACTIONS))
    cpr = (dx * (f[..., :-1] + f[..., 1:]) / 2).sum(-1)
    cmd = (dx * (np.abs(1 - f[..., :-1]) + np.abs(1 - f[..., 1:])) / 2).sum(-1)
    return (float(cpr), float(cmd)) if f.ndim == 1 else (cpr, cmd)


def circuits(graph: Graph, scores: torch.Tensor, ranking: str) -> torch.Tensor:
    """bool [10, n_edges]: the pruned circuit at each fraction."""
    return prune(graph, torch.stack([top_n(scores, n, ranking) for n in counts(graph.n_edges)]))


def random_circuits(graph: Graph, seed: int) -> torch.Tensor:
    """bool [10, n_edges]: random edges of each fraction's count, pruned like the others (the null)."""
    g = torch.Generator().manual_seed(int(seed))
    out = torch.zeros(len(FRACTIONS), graph.n_edges, dtype=torch.bool)
    for i, n in enumerate(counts(graph.n_edges)):
        out[i, torch.randperm(graph.n_edges, generator=g)[:n]] = True
    return prune(graph, out)


# ---------------------------------------------------------------- the JSON format

@dataclass(frozen=True)
class Format:
    """This graph's edges as the EAP-IG / MIB format names them: MIB edge i is `names[i]`, made
    of this graph's edge `ours[i]` with `share[i]` of its score (module docstring)."""

    names: list[str]
    ours: torch.Tensor
    share: torch.Tensor
    cfg: dict

    @classmethod
    def of(cls, graph: Graph, d_model: int) -> "Format":
        if graph.inputs != "qkv":
            raise ValueError("the EAP-IG / MIB format has no merged block inputs (GPT-J's bridge gives no per-head inputs)")
        per = graph.n_heads // graph.n_kv_heads
        down = []  # per downstream input: [(MIB name of the input, share)]
        for l in range(graph.n_layers):
            down += [[(f"a{l}.h{h}<q>", 1.0)] for h in range(graph.n_heads)]
            for letter in "kv":
                down += [[(f"a{l}.h{h}<{letter}>", 1.0 / per) for h in range(g * per, (g + 1) * per)]
                         for g in range(graph.n_kv_heads)]
            down.append([(f"m{l}", 1.0)])
        down.append([("logits", 1.0)])
        names, ours, share = [], [], []
        up, dn = graph.edges
        for e, (u, v) in enumerate(zip(up.tolist(), dn.tolist())):
            for name, s in down[v]:
                names.append(f"{graph.up_names[u]}->{name}")
                ours.append(e)
                share.append(s)
        cfg = {"n_layers": graph.n_layers, "n_heads": graph.n_heads, "parallel_attn_mlp": bool(graph.parallel),
               "d_model": int(d_model)}
        return cls(names, torch.tensor(ours), torch.tensor(share, dtype=torch.float64), cfg)

    def to_json(self, graph: Graph, scores: torch.Tensor, in_graph: torch.Tensor) -> dict:
        """The format's dict of one scored graph with one circuit marked (nodes: in the graph when
        an edge of the circuit starts or ends there; the logits always, as EAP-IG writes them)."""
        up, down = graph.edges
        node_in = torch.zeros(graph.n_up, dtype=torch.bool)
        node_in[up[in_graph]] = True
        node_in |= readers(graph)[down[in_graph]].any(0)[:-1]
        nodes = {name: {"in_graph": bool(node_in[i])} for i, name in enumerate(graph.up_names)}
        nodes["logits"] = {"in_graph": True}
        s = (scores.double()[self.ours] * self.share).tolist()
        flags = in_graph[self.ours].tolist()
        return {"cfg": dict(self.cfg), "nodes": nodes,
                "edges": {n: {"score": float(x), "in_graph": bool(f)} for n, x, f in zip(self.names, s, flags)}}

    def from_json(self, graph: Graph, d: dict, where: str) -> "Loaded":
        """This graph's scores and circuit from the format's dict; refuses (one line) what does not fit."""
        if not isinstance(d, dict) or not all(k in d for k in ("cfg", "nodes", "edges")):
            refuse(where, "lacks one of the keys cfg, nodes, edges", ACCEPTED)
        cfg = d["cfg"]
        if not isinstance(cfg, dict):
            refuse(where, "its cfg is not an object", ACCEPTED)
        for key in ("n_layers", "n_heads", "parallel_attn_mlp"):
            if key not in cfg:
                refuse(where, f"its cfg lacks {key}", ACCEPTED)
            same = bool(cfg[key]) == self.cfg[key] if key == "parallel_attn_mlp" else cfg[key] == self.cfg[key]
            if not same:
                refuse(where, f"is a graph of a model with {key}={cfg[key]!r}; this run's model has {self.cfg[key]!r}",
                       "a circuit of this run's model (the same n_layers, n_heads, parallel_attn_mlp)")
        edges = d["edges"]
        if not isinstance(edges, dict) or not edges:
            refuse(where, "has no edges", ACCEPTED)
        index = {n: i for i, n in enumerate(self.names)}
        unknown = [n for n in edges if n not in index]
        if unknown:
            refuse(where, f"names {len(unknown)} edge(s) this model's graph does not have, e.g. {unknown[0]!r}",
                   f"the {len(self.names)} edges EAP-IG's Graph.from_model builds for this model")
        score = torch.zeros(graph.n_edges, dtype=torch.float64)
        member = torch.zeros(graph.n_edges, dtype=torch.long)
        members = torch.zeros(graph.n_edges, dtype=torch.long)
        for name, info in edges.items():
            ok = (isinstance(info, dict) and isinstance(info.get("in_graph"), bool)
                  and isinstance(info.get("score"), (int, float)) and not isinstance(info.get("score"), bool)
                  and np.isfinite(info["score"]))
            if not ok:
                refuse(where, f"edge {name!r} is {json.dumps(info)[:80]}", "each edge {\"score\": <finite number>, \"in_graph\": true|false}")
            i = index[name]
            e = int(self.ours[i])
            score[e] += float(info["score"])
            member[e] += int(info["in_graph"])
            members[e] += 1
        in_graph = member > 0
        merged = int(((member > 0) & (member < members)).sum())
        if not bool(in_graph.any()) and not bool((score != 0).any()):
            refuse(where, "has neither a score nor an edge in_graph", "a circuit with scores, in_graph edges or both")
        return Loaded(score.float(), in_graph, merged, len(self.names) - len(edges))


@dataclass
class Loaded:
    scores: torch.Tensor  # [n_edges] of this graph
    in_graph: torch.Tensor  # bool [n_edges]
    merged: int  # grouped key/value edges taken whole because some of their query heads' edges were in
    missing: int  # format edges the file does not list (taken as score 0, not in the circuit, as EAP-IG does)


def write(path: Path, graph: Graph, d_model: int, scores: torch.Tensor, in_graph: torch.Tensor) -> bool:
    """One line of JSON, as EAP-IG's to_json writes it (a graph of 10^5 edges, a few MB); False
    (nothing written) for a graph the format cannot express."""
    from pipeline.artifacts import write_atomic

    if graph.inputs != "qkv":
        return False
    return bool(write_atomic(path, json.dumps(Format.of(graph, d_model).to_json(graph, scores, in_graph))))


def load(path: str, graph: Graph, d_model: int) -> Loaded:
    """A circuit file for `circuit.load`, refused in one line (pipeline/validation.py) when it is
    missing, not JSON, or not a graph of this model."""
    p = Path(path).expanduser()
    where = f"circuit.load={path}"
    if not p.is_file():
        refuse(where, "no such file", ACCEPTED)
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        refuse(where, f"is not JSON ({str(err).splitlines()[0]})", ACCEPTED)
    try:
        fmt = Format.of(graph, d_model)
    except ValueError as err:
        refuse(where, str(err), "a model whose bridge gives per-head q/k/v inputs")
    return fmt.from_json(graph, d, where)
