"""Model presets and model sources: every preset in conf/model/ composes and validates, a revision
reaches the loader (a hub revision, or a checkpoint subfolder of a local directory) with its
training step, the recorded parameter count is the model's, and a model the bridge cannot load
is refused in one line."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.model import load_model, parameter_count, pretrained_source, training_step
from pipeline.validation import check_config, check_overrides
from conftest import REPO, make_cfg

PRESETS = sorted(p.stem for p in (REPO / "conf" / "model").glob("*.yaml"))
HUB = [p for p in PRESETS if p not in ("smollm2-135m", "tiny")]


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_composes_and_validates(preset):
    cfg = make_cfg([f"model={preset}", "device=cpu"])
    check_config(cfg)
    flags = cfg.model.processing
    assert set(flags) == {"fold_ln", "center_writing_weights", "center_unembed", "refactor_factored_attn_matrices"}
    text = (REPO / "conf" / "model" / f"{preset}.yaml").read_text()
    if preset != "tiny":  # each preset says its parameter count and the dtype it runs in
        assert "parameters" in text and "dtype" in text
    if preset in HUB:
        assert cfg.model.source == "pretrained" and cfg.model.revision is None and cfg.model.step is None
        rotary = not preset.startswith("gpt2")
        assert flags.refactor_factored_attn_matrices == (not rotary)  # TransformerLens refuses it under rotary attention
        check_overrides([f"model={preset}", "model.revision=step1000", "model.step=1000"], [])
    assert cfg.model.prepend_bos == (not preset.startswith("qwen"))  # Qwen2.5 has no BOS token


def test_the_embedded_models_parameter_count_is_its_presets(embedded_model):
    assert parameter_count(embedded_model) == 134_515_008
    assert "134,515,008 parameters" in (REPO / "conf" / "model" / "smollm2-135m.yaml").read_text()


def test_revision_and_step_of_hub_names_and_local_checkpoints(tmp_path):
    hub = make_cfg(["model=pythia-70m-deduped", "model.revision=step1000"]).model
    assert pretrained_source(hub) == ("EleutherAI/pythia-70m-deduped", {"revision": "step1000"})
    assert training_step(hub) == 1000
    assert training_step(make_cfg(["model=pythia-70m-deduped"]).model) is None
    (tmp_path / "checkpoint-500").mkdir()
    local = make_cfg(["model=gpt2-small", f"model.name={tmp_path}", "model.revision=checkpoint-500"]).model
    assert pretrained_source(local) == (str(tmp_path / "checkpoint-500"), {})
    assert training_step(local) == 500
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "trainer_state.json").write_text(json.dumps({"global_step": 7000}))
    final = make_cfg(["model=gpt2-small", f"model.name={tmp_path}", "model.revision=final"]).model
    assert training_step(final) == 7000  # a Trainer's own record of its step
    assert training_step(make_cfg(["model=gpt2-small", f"model.name={tmp_path}", "model.revision=final",
                                   "model.step=42"]).model) == 42  # said outright, it wins
    missing = make_cfg(["model=gpt2-small", f"model.name={tmp_path}", "model.revision=checkpoint-9"]).model
    with pytest.raises(PipelineError, match="without a subfolder 'checkpoint-9'"):
        pretrained_source(missing)


def test_models_the_bridge_cannot_load_or_process_are_refused_in_one_line(tmp_path):
    from transformers import AutoTokenizer, HeliumConfig, HeliumForCausalLM

    from pipeline.model import build_tiny_model

    tok = AutoTokenizer.from_pretrained(build_tiny_model(make_cfg(["model=tiny"]).model))
    config = HeliumConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
    HeliumForCausalLM(config).save_pretrained(tmp_path / "helium")
    cfg = make_cfg(["model=gpt2-small", f"model.name={tmp_path / 'helium'}"])
    with pytest.raises(PipelineError, match="HeliumForCausalLM, an architecture TransformerLens .* cannot load") as err:
        load_model(cfg.model, "cpu", torch.float32)
    assert "\n" not in str(err.value)
    rotary = make_cfg(["model=tiny", "model.family=llama"])  # the tiny preset refactors QK, as GPT-2 allows
    with pytest.raises(PipelineError, match="refactor_factored_attn_matrices=false"):
        load_model(rotary.model, "cpu", torch.float32)
