"""Direct logit attribution of the run's metric (pipeline/metrics.py: a weighted sum of answer
logits, the logit difference or a rated metric), along each prompt's own metric direction
W_U[:, tokens] @ weights, read at each prompt's real last token with the final norm's scale of
that prompt applied.

TransformerLens's `ActivationCache.accumulated_resid` / `decompose_resid` give the residual
stacks; its `apply_ln_to_stack(pos_slice=...)` takes one position for the whole batch, which is
wrong for right-padded prompts of different lengths, so the scale is gathered per prompt here.

Two ways to get the same numbers:
- `attribute`: a pass of its own over the prompts with a (filtered) ActivationCache, for known
  answers; the attribution stage uses it for a dataset given as a CSV, and it is the reference
  the other is tested against;
- `LastTokenRecord`: hooks riding on a pass run for another purpose (the data stage's probing of
  both guises, pipeline/data/scoring.py), which keep only what attribution reads at each
  prompt's real last token, projected through the final norm onto the unembedding column of
  every one-token attribute. The answers are chosen only after every prompt has been probed, and
  every linear metric is a weighted sum of those columns, so the run's metric's attributions
  follow afterwards without another pass over the prompts (`record_attributions`).
  TransformerLens's cache has no "keep one position per prompt" filter, hence the hooks.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from pipeline.architecture import head_writes, parallel, post_norm_gains
from pipeline.forward import model_device
from pipeline.metrics import AnswerWeights, gather_last
from pipeline.prompts import PromptBatch, micro_batches

CACHED_HOOKS = ("hook_embed", "hook_pos_embed", "hook_resid_pre", "hook_resid_mid", "hook_resid_post",
                "hook_attn_out", "hook_mlp_out", "attn.hook_z", "attn.hook_pattern", "ln_final.hook_scale",
                "ln1_post.hook_scale")


def apply_final_ln_scale(model, stack: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """stack [..., batch, d_model] at the last token, scale [batch, 1] of the final norm."""
    if model.cfg.normalization_type in ("LN", "LNPre"):
        stack = stack - stack.mean(-1, keepdim=True)
    return stack / scale


def attribute(model, batch: PromptBatch, answers: AnswerWeights, batch_size: int, desc: str | None = None) -> dict:
    """Per-prompt attributions [components, n]: `logit_lens` (accumulated residual, incl_mid),
    `layer` (decompose_resid terms plus the unembedding bias, summing to the model's metric),
    `head` [n_layers, n_heads, n], and `model_metric` [n], the model's own metric; plus
    `last_attention`, each prompt's last-token attention over its real positions
    [n_layers, n_heads, n_tokens], kept from the same pass for the attention figures."""
    device = model_device(model)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    W_O = model.W_O  # [layers, heads, d_head, d_model]
    gains = post_norm_gains(model)  # norms after the attention (Gemma 2, OLMo 2): pipeline/architecture.py
    out = {"logit_lens": [], "layer": [], "head": [], "model_metric": []}
    labels, last_attention = {}, []
    with torch.no_grad():
        for rows in tqdm(list(micro_batches(len(batch), batch_size)), desc=desc, disable=desc is None, leave=False):
            mb = batch.slice(rows).to(device)
            logits, cache = model.run_with_cache(mb.tokens, attention_mask=mb.attention_mask,
                                                 names_filter=lambda name: name.endswith(CACHED_HOOKS))
            direction, bias = (t.float() for t in answers[rows].directions(model))
            ar = torch.arange(len(mb), device=device)
            scale = cache["ln_final.hook_scale"][ar, mb.last].float()  # [b, 1]

            def project(stack):  # [c, b, pos, d] -> [c, b] metric at each prompt's last token
                last = stack[:, ar, mb.last].float()  # accumulate in float32 whatever the model's dtype
                return (apply_final_ln_scale(model, last, scale) * direction).sum(-1)

            # a parallel block (GPT-NeoX, GPT-J) has no residual stream between attention and MLP
            acc, labels["logit_lens"] = cache.accumulated_resid(layer=-1, incl_mid=not parallel(model), pos_slice=None,
                                                                return_labels=True)
            out["logit_lens"].append(project(acc) + bias)
            dec, dec_labels = cache.decompose_resid(layer=-1, pos_slice=None, return_labels=True)
            labels["layer"] = dec_labels + ["unembed_bias"]
            out["layer"].append(torch.cat([project(dec), bias[None]]))
            heads = []
            for layer in range(n_layers):
                z_last = cache[f"blocks.{layer}.attn.hook_z"][ar, mb.last]  # [b, heads, d_head]
                post = cache[f"blocks.{layer}.ln1_post.hook_scale"][ar, mb.last] if gains[layer] is not None else None
                per_head = head_writes(z_last, W_O[layer], gains[layer], post).transpose(0, 1)  # each head's write, no bias
                heads.append((apply_final_ln_scale(model, per_head, scale) * direction).sum(-1))
            out["head"].append(torch.stack(heads))
            out["model_metric"].append(answers[rows].values(gather_last(logits, mb.last)))
            patterns = torch.stack([cache[f"blocks.{l}.attn.hook_pattern"][ar, :, mb.last] for l in range(n_layers)], 1)
            last_attention += [patterns[i, :, :, : int(mb.last[i]) + 1].float().cpu() for i in range(len(mb))]
    result = {k: torch.cat(v, dim=-1).float().cpu() for k, v in out.items()}
    assert result["head"].shape[:2] == (n_layers, n_heads)
    result["labels"] = labels
    result["last_attention"] = last_attention
    return result


class LastTokenRecord:
    """Hooks for one forward pass that keep, at each prompt's real last token: the residual stream
    before and after each half-layer (logit lens), every component's write to it (layer
    attribution: embeddings, attention and MLP outputs; head attribution: each head's z times
    its W_O), each projected through that prompt's final-norm scale onto the unembedding columns
    of `token_ids`; and the last token's attention over the positions. Use `hooks(last)` for a
    forward, then `collect(index)`; `result()` puts the micro-batches together in prompt order."""

    def __init__(self, model, token_ids: list[int]):
        self.model = model
        n_layers = model.cfg.n_layers
        self.columns = model.W_U[:, token_ids].detach().float()  # [d_model, A]
        self.W_O = model.W_O.detach().float()  # [layers, heads, d_head, d_model]; the bridge stacks it anew on each access
        self.gains = post_norm_gains(model)  # norms after the attention (Gemma 2, OLMo 2): pipeline/architecture.py
        b_U = getattr(model, "b_U", None)
        self.bias = (b_U[token_ids].detach().float().cpu() if b_U is not None else torch.zeros(len(token_ids)))
        # Labels and order of TransformerLens's accumulated_resid(incl_mid=True) and decompose_resid.
        halves = ("pre",) if parallel(model) else ("pre", "mid")  # a parallel block has no resid_mid
        self.lens_hooks = {f"{l}_{half}": f"blocks.{l}.hook_resid_{half}" for l in range(n_layers) for half in halves}
        self.lens_hooks["final_post"] = f"blocks.{n_layers - 1}.hook_resid_post"
        self.layer_hooks = {"embed": "hook_embed", "pos_embed": "hook_pos_embed"}
        self.layer_hooks.update({f"{l}_{kind}": f"blocks.{l}.hook_{kind}" for l in range(n_layers) for kind in ("attn_out", "mlp_out")})
        self.batches: list[dict] = []
        self.seen: dict[str, torch.Tensor] = {}

    def hooks(self, last: torch.Tensor) -> list:
        """Forward hooks that keep one micro-batch's last-token values (`last`: [b] positions)."""
        self.seen, self.last = {}, last.cpu()
        n_layers = self.model.cfg.n_layers

        def keep(name, what):
            def hook(x, hook):
                rows = torch.arange(x.shape[0], device=x.device)
                self.seen[name] = (x[rows, :, last.to(x.device)] if what == "pattern" else x[rows, last.to(x.device)]).detach()
                return x
            return hook

        names = {**self.lens_hooks, **self.layer_hooks}
        out = [(h, keep(h, "vector")) for h in dict.fromkeys(names.values()) if h in self.model.hook_dict]
        out += [(f"blocks.{l}.attn.hook_z", keep(f"z{l}", "vector")) for l in range(n_layers)]
        out += [(f"blocks.{l}.attn.hook_pattern", keep(f"pattern{l}", "pattern")) for l in range(n_layers)]
        out += [(f"blocks.{l}.ln1_post.hook_scale", keep(f"post{l}", "vector")) for l in range(n_layers) if self.gains[l] is not None]
        out.append(("ln_final.hook_scale", keep("scale", "vector")))
        return out

    def collect(self, index: torch.Tensor) -> None:
        """Project the micro-batch just run, whose rows are the prompts `index`: [b, components, A]
        per kind, and its attention."""
        seen, model = self.seen, self.model
        scale = seen["scale"].float()  # [b, 1]
        columns = self.columns.to(scale.device)

        def project(vectors):  # list of [b, d] -> [b, len, A]
            stack = torch.stack([v.float() for v in vectors])
            return torch.einsum("cbd,da->bca", apply_final_ln_scale(model, stack, scale), columns).cpu()

        layer_labels = [k for k, h in self.layer_hooks.items() if h in seen]  # embeddings a model has
        heads = [head_writes(seen[f"z{l}"], self.W_O[l], self.gains[l], seen.get(f"post{l}")).transpose(0, 1)
                 for l in range(model.cfg.n_layers)]  # each head's write, no bias
        self.batches.append({
            "index": index.cpu(),
            "logit_lens": project([seen[h] for h in self.lens_hooks.values()]),
            "layer": project([seen[self.layer_hooks[k]] for k in layer_labels]),
            "head": torch.stack([torch.einsum("hbd,da->bha", apply_final_ln_scale(model, h, scale), columns)
                                 for h in heads], 1).cpu(),  # [b, layers, heads, A]
            "attention": [torch.stack([seen[f"pattern{l}"][i, :, : int(self.last[i]) + 1] for l in range(model.cfg.n_layers)])
                          .float().cpu() for i in range(scale.shape[0])],  # per prompt [layers, heads, its positions]
        })
        self.layer_labels = layer_labels
        self.seen = {}

    def result(self) -> dict:
        """{"logit_lens": [n, C, A], "layer": [n, C, A], "head": [n, layers, heads, A],
        "attention": list of [layers, heads, positions], "labels", "bias": [A]}."""
        order = torch.argsort(torch.cat([b["index"] for b in self.batches]))  # back to prompt order
        out = {k: torch.cat([b[k] for b in self.batches])[order] for k in ("logit_lens", "layer", "head")}
        attention = [a for b in self.batches for a in b["attention"]]
        out["attention"] = [attention[i] for i in order.tolist()]
        out["labels"] = {"logit_lens": list(self.lens_hooks), "layer": self.layer_labels + ["unembed_bias"]}
        out["bias"] = self.bias
        return out


def record_attributions(record: dict, weights: torch.Tensor) -> dict:
    """`attribute`'s outputs (without `model_metric`) for a metric given as weights over the
    record's columns, [n, A] (the logit difference: +1 and -1 at the two answers' columns)."""
    w = weights.float()

    def reduce(t):  # [n, ..., A] -> [..., n]
        shape = (t.shape[0],) + (1,) * (t.dim() - 2) + (t.shape[-1],)
        return (t * w.reshape(shape)).sum(-1).movedim(0, -1)

    bias = (w @ record["bias"])[None]  # [1, n]
    return {"logit_lens": reduce(record["logit_lens"]) + bias, "layer": torch.cat([reduce(record["layer"]), bias]),
            "head": reduce(record["head"]), "labels": record["labels"],
            "last_attention": list(record["attention"])}


def full_attention(model, batch: PromptBatch, index: int, heads: list[tuple[int, int]]) -> torch.Tensor:
    """[len(heads), n_tokens, n_tokens] attention patterns of one prompt (no padding)."""
    one = batch.slice(slice(index, index + 1)).to(model_device(model))
    names = {f"blocks.{l}.attn.hook_pattern" for l, _ in heads}
    with torch.no_grad():
        _, cache = model.run_with_cache(one.tokens, attention_mask=one.attention_mask, names_filter=lambda n: n in names)
    return torch.stack([cache[f"blocks.{l}.attn.hook_pattern"][0, h] for l, h in heads]).float().cpu()
