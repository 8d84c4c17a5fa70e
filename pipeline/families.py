"""The model families the pipeline runs on, as tiny random models built offline.

Each family is a Hugging Face architecture that TransformerLens 4.3's TransformerBridge loads,
with the configuration class a real checkpoint of it uses and the settings that make a tiny
random model of it exercise what is special about the family (grouped-query attention, partial
rotary, parallel attention and MLP, norms after the sublayers, q/k/v biases, a fused q/k/v
projection). `model=tiny model.family=<family>` builds one into a local directory with the
embedded model's tokenizer and loads it like any local Hugging Face directory; the tests run
every stage's exactness checks on each (tests/test_families.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Family:
    config_class: str  # transformers configuration class
    what: str  # what the family brings, for the docs and the log
    settings: dict = field(default_factory=dict)  # beyond the shared shape below


# Shape keys each configuration class calls by its own name.
GPT2_NAMES = {"layers": "n_layer", "heads": "n_head", "width": "n_embd", "positions": "n_positions"}
LLAMA_NAMES = {"layers": "num_hidden_layers", "heads": "num_attention_heads", "width": "hidden_size",
               "positions": "max_position_embeddings"}

FAMILIES = {
    "gpt2": Family("GPT2Config", "learned positions, LayerNorm, sequential blocks"),
    "neox": Family("GPTNeoXConfig", "Pythia: parallel attention and MLP with their own norms, partial rotary (a quarter)",
                   {"rotary_pct": 0.25, "use_parallel_residual": True}),
    "gptj": Family("GPTJConfig", "parallel attention and MLP sharing one norm, interleaved partial rotary",
                   {"rotary_dim": 8}),
    "llama": Family("LlamaConfig", "rotary, RMSNorm, gated MLP, grouped-query attention", {"kv": True}),
    "mistral": Family("MistralConfig", "Llama's layout with a sliding attention window", {"kv": True}),
    "qwen2": Family("Qwen2Config", "Llama's layout with q/k/v biases", {"kv": True}),
    "gemma2": Family("Gemma2Config", "norms before and after each sublayer, logit and attention soft-capping, "
                     "alternating sliding-window layers", {"kv": True, "head_dim": 16, "query_pre_attn_scalar": 16}),
    "phi3": Family("Phi3Config", "fused q/k/v and gate/up projections", {}),
    "olmo2": Family("Olmo2Config", "norms after the sublayers only, q/k norms", {"kv": True}),
}

# Real checkpoints of Mistral and Gemma 2 attend within 4096 tokens; prompts are far shorter, so
# a tiny model keeps a window no probing row reaches (docs/reference/families.md on shorter windows).
SLIDING_WINDOW = 4096


def names_of(config_class: str) -> dict[str, str]:
    return GPT2_NAMES if config_class in ("GPT2Config", "GPTJConfig") else LLAMA_NAMES


def tiny_config(family: str, vocab_size: int, bos: int, eos: int, n_layer: int, n_head: int, n_embd: int):
    """The transformers configuration of a tiny random model of `family`."""
    import transformers

    spec = FAMILIES[family]
    names = names_of(spec.config_class)
    settings = dict(spec.settings)
    kwargs = {names["layers"]: n_layer, names["heads"]: n_head, names["width"]: n_embd, names["positions"]: 128,
              "vocab_size": vocab_size, "bos_token_id": bos, "eos_token_id": eos,
              # larger than the usual 0.02 so that random prompts give distinct logits
              "initializer_range": 0.2}
    if settings.pop("kv", False):
        kwargs["num_key_value_heads"] = max(1, n_head // 2)
    if spec.config_class != "GPT2Config":
        kwargs["intermediate_size" if names is LLAMA_NAMES else "n_inner"] = 2 * n_embd
    if spec.config_class in ("MistralConfig", "Gemma2Config"):
        kwargs["sliding_window"] = SLIDING_WINDOW
    kwargs.update(settings)
    return getattr(transformers, spec.config_class)(**kwargs)
