"""The computational graph of a transformer as the circuit stage sees it.

Upstream nodes (things that write into the residual stream): the input embedding (`input`, the
residual stream entering block 0, positional embedding included), every attention head
(`a{layer}.h{head}`) and every MLP (`m{layer}`).
Downstream inputs (things that read from it): every head's query, key and value input
(`a{l}.h{h}.q`, and for grouped-query attention `a{l}.kv{g}.k` / `a{l}.kv{g}.v` per key/value head),
every MLP's input (`m{l}`) and the logits (`logits`, the final residual stream).
An edge runs from every upstream node to every downstream input that comes after it.

TransformerLens's bridge exposes all of these as hooks once three flags are set (checked on GPT-2
and on SmolLM2's rotary grouped-query attention): `hook_result` per head output, `hook_q_input` /
`hook_k_input` / `hook_v_input` per head input before the layer norm ([batch, pos, heads or
kv heads, d_model]), and `hook_mlp_in` for the MLP branch's input (editing `ln2.hook_in` would edit
the residual stream itself: it is an alias of `hook_resid_mid`).

The graph follows the architecture (pipeline/architecture.py; tests/test_families.py checks each
family against finite differences and a naive rebuild):
- parallel blocks (GPT-NeoX/Pythia, GPT-J): the MLP reads the block's input, so no edge runs from
  a layer's heads to its own MLP;
- where the bridge has no per-head hooks (GPT-J) a head's output is its z times its W_O, and its
  attention and MLP read one input per layer (`b{l}`, the input of the norm they share): the
  graph merges q/k/v and MLP inputs there and says so;
- a norm after the attention (Gemma 2, OLMo 2): a head's output is its share of the normalised
  attention output, its result times the norm's gain over the norm's scale in that run, so that
  the heads' outputs still sum to what the attention writes.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property

import torch

from pipeline.architecture import head_writes, norm_gain, parallel, post_attention_norm, shared_norm
from pipeline.errors import PipelineError


FLAGS = ("use_split_qkv_input", "use_attn_result", "use_hook_mlp_in")


@contextmanager
def edge_hooks(model):
    """The flags of enable_edge_hooks for the duration of a block, then as they were."""
    was = {f: bool(getattr(model.cfg, f, False)) for f in FLAGS}
    enable_edge_hooks(model)
    try:
        yield
    finally:
        for f, value in was.items():
            if not value and getattr(model.cfg, f, False):
                getattr(model, f"set_{f}")(False)


def enable_edge_hooks(model) -> None:
    """Turn on the bridge's per-head output and input hooks and the MLP input hook where the model
    has them (idempotent; the logits are unchanged, only more hooks fire)."""
    if not per_head_hooks(model):
        if not shared_norm(model):
            raise PipelineError("the circuit stage: the bridge gives this model's attention no per-head hooks, and its "
                                "MLP reads a norm of its own, an input the graph cannot patch apart")
        return  # GPT-J: head outputs from hook_z, one input per layer (module docstring)
    if not getattr(model.cfg, "use_split_qkv_input", False):
        model.set_use_split_qkv_input(True)
    if not getattr(model.cfg, "use_attn_result", False):
        model.set_use_attn_result(True)
    if not getattr(model.cfg, "use_hook_mlp_in", False):
        model.set_use_hook_mlp_in(True)


def per_head_hooks(model) -> bool:
    """Whether the bridge gives per-head outputs and q/k/v inputs (`set_use_attn_result` raises
    NotImplementedError for attention bridges that cannot, such as GPT-J's)."""
    if getattr(model.cfg, "use_attn_result", False):
        return True
    try:
        model.set_use_attn_result(True)
    except NotImplementedError:
        return False
    model.set_use_attn_result(False)
    return True


@dataclass(frozen=True)
class Graph:
    n_layers: int
    n_heads: int
    n_kv_heads: int
    parallel: bool = False  # the MLP reads the block's input, not its attention's output
    inputs: str = "qkv"  # "qkv": per-head q, k, v inputs and the MLP's; "block": one input per layer
    head_output: str = "result"  # "result" (hook_result), "z" (hook_z times W_O) or "post_norm" (module docstring)

    @classmethod
    def of(cls, model) -> "Graph":
        n_heads = int(model.cfg.n_heads)
        n_kv = int(getattr(model.cfg, "n_key_value_heads", None) or n_heads)
        fine = per_head_hooks(model)
        head_output = "z" if not fine else "post_norm" if post_attention_norm(model, 0) is not None else "result"
        return cls(int(model.cfg.n_layers), n_heads, n_kv, parallel(model), "qkv" if fine else "block", head_output)

    @property
    def shape(self) -> list:
        """What rebuilds this graph (tables/circuit_summary.json `graph_shape`)."""
        return [self.n_layers, self.n_heads, self.n_kv_heads, self.parallel, self.inputs, self.head_output]

    @property
    def input_kinds(self) -> tuple[str, ...]:
        return ("q", "k", "v", "mlp") if self.inputs == "qkv" else ("in",)

    # ---- upstream nodes: input, then per layer its heads then its MLP
    @property
    def n_up(self) -> int:
        return 1 + self.n_layers * (self.n_heads + 1)

    def up_head(self, layer: int, head: int) -> int:
        return 1 + layer * (self.n_heads + 1) + head

    def up_mlp(self, layer: int) -> int:
        return 1 + layer * (self.n_heads + 1) + self.n_heads

    @cached_property
    def up_names(self) -> list[str]:
        names = ["input"]
        for l in range(self.n_layers):
            names += [f"a{l}.h{h}" for h in range(self.n_heads)] + [f"m{l}"]
        return names

    # ---- downstream inputs: per layer q (per head), k, v (per kv head), MLP (or one input); then logits
    @property
    def per_layer(self) -> int:
        return self.n_heads + 2 * self.n_kv_heads + 1 if self.inputs == "qkv" else 1

    @property
    def n_down(self) -> int:
        return self.n_layers * self.per_layer + 1

    def down_slice(self, layer: int, kind: str) -> slice:
        """Downstream indices of one layer's q, k, v or mlp inputs."""
        base = layer * self.per_layer
        if self.inputs == "block":
            return {"in": slice(base, base + 1)}[kind]
        H, G = self.n_heads, self.n_kv_heads
        return {"q": slice(base, base + H), "k": slice(base + H, base + H + G),
                "v": slice(base + H + G, base + H + 2 * G), "mlp": slice(base + H + 2 * G, base + H + 2 * G + 1)}[kind]

    @property
    def down_logits(self) -> int:
        return self.n_layers * self.per_layer

    @cached_property
    def down_names(self) -> list[str]:
        names = []
        for l in range(self.n_layers):
            if self.inputs == "block":
                names.append(f"b{l}")
                continue
            names += [f"a{l}.h{h}.q" for h in range(self.n_heads)]
            kv = "h" if self.n_kv_heads == self.n_heads else "kv"
            names += [f"a{l}.{kv}{g}.k" for g in range(self.n_kv_heads)]
            names += [f"a{l}.{kv}{g}.v" for g in range(self.n_kv_heads)]
            names.append(f"m{l}")
        return names + ["logits"]

    def n_up_before(self, layer: int, kind: str) -> int:
        """How many upstream nodes (a prefix of the upstream order) feed a downstream input."""
        if kind == "logits":
            return self.n_up
        own_heads = kind == "mlp" and not self.parallel  # a sequential MLP reads its own layer's heads
        return 1 + layer * (self.n_heads + 1) + (self.n_heads if own_heads else 0)

    @cached_property
    def down_prefix(self) -> torch.Tensor:
        """[n_down] number of upstream nodes feeding each downstream input."""
        out = []
        for l in range(self.n_layers):
            for kind in self.input_kinds:
                out += [self.n_up_before(l, kind)] * (self.down_slice(l, kind).stop - self.down_slice(l, kind).start)
        return torch.tensor(out + [self.n_up], dtype=torch.long)

    # ---- edges, ordered by downstream input then upstream node
    @cached_property
    def edges(self) -> tuple[torch.Tensor, torch.Tensor]:
        ups, downs = [], []
        for v, k in enumerate(self.down_prefix.tolist()):
            ups.append(torch.arange(k))
            downs.append(torch.full((k,), v))
        return torch.cat(ups), torch.cat(downs)

    @property
    def n_edges(self) -> int:
        return int(self.down_prefix.sum())

    @property
    def n_nodes(self) -> int:
        """Nodes as the issue counts them: input, heads, MLPs, logits."""
        return self.n_up + 1

    def edge_names(self) -> list[str]:
        up, down = self.edges
        return [f"{self.up_names[u]}->{self.down_names[v]}" for u, v in zip(up.tolist(), down.tolist())]

    def dense(self, values: torch.Tensor, fill=0) -> torch.Tensor:
        """[..., n_edges] -> [..., n_up, n_down] (`fill` where there is no edge)."""
        up, down = self.edges
        out = torch.full((*values.shape[:-1], self.n_up, self.n_down), fill, dtype=values.dtype)
        out[..., up, down] = values
        return out

    def from_dense(self, dense: torch.Tensor) -> torch.Tensor:
        up, down = self.edges
        return dense[..., up.to(dense.device), down.to(dense.device)]

    # ---- hook names
    @staticmethod
    def input_hook() -> str:
        return "blocks.0.hook_resid_pre"

    def head_out_hook(self, layer: int) -> str:
        """Where each head's output can be read and replaced: [batch, pos, heads, d_model], or
        [batch, pos, heads, d_head] (z) where the bridge has no per-head result."""
        return f"blocks.{layer}.attn.hook_z" if self.head_output == "z" else f"blocks.{layer}.attn.hook_result"

    def head_writers(self, model, layer: int, write) -> list:
        """Hooks that call write(x, hook) with x [batch, pos, heads, d_model], each head's output
        as an upstream node of this graph (module docstring), and leave the run unchanged."""
        if self.head_output == "result":
            return [(self.head_out_hook(layer), write)]
        W_O = model.W_O[layer].detach()
        if self.head_output == "z":
            return [(self.head_out_hook(layer), lambda z, hook: (write(head_writes(z, W_O), hook), z)[1])]
        b_O = getattr(model.blocks[layer].attn, "b_O", None)
        if b_O is not None and float(b_O.detach().abs().max()) > 0:
            raise PipelineError("the circuit stage: an attention output bias before a post-attention norm has no constant "
                                "share of the residual stream")
        gain, kept = norm_gain(post_attention_norm(model, layer)).float(), {}

        def keep(result, hook):
            kept["result"] = result
            return result

        def share(scale, hook):  # the norm's scale [batch, pos, 1] of this run
            write(kept.pop("result").float() * gain / scale.float()[..., None, :], hook)
            return scale

        return [(f"blocks.{layer}.attn.hook_result", keep), (f"blocks.{layer}.ln1_post.hook_scale", share)]

    @staticmethod
    def mlp_out_hook(layer: int) -> str:
        return f"blocks.{layer}.hook_mlp_out"

    @staticmethod
    def in_hook(layer: int, kind: str) -> str:
        if kind == "in":  # the input of the norm a parallel block's attention and MLP share (GPT-J)
            return f"blocks.{layer}.ln1.hook_in"
        return f"blocks.{layer}.hook_mlp_in" if kind == "mlp" else f"blocks.{layer}.attn.hook_{kind}_input"

    @staticmethod
    def logits_hook() -> str:
        return "ln_final.hook_in"

    def summary(self) -> str:
        text = (f"{self.n_nodes} nodes (input, {self.n_layers * self.n_heads} heads, {self.n_layers} MLPs, logits), "
                f"{self.n_edges} edges")
        if self.inputs == "qkv":
            text += f" ({self.n_heads} query heads, {self.n_kv_heads} key/value heads per layer)"
        else:
            text += (" (q/k/v and MLP inputs merged: one input per layer, b<layer>, since the bridge has no per-head "
                     "input hooks for this attention and its attention and MLP share one norm)")
        if self.parallel:
            text += "; parallel blocks: no edge from a layer's heads to its own MLP"
        if self.head_output == "post_norm":
            text += "; a head's output is its share of the normalised attention output"
        return text
