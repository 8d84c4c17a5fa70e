# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Dialect prejudice, from a notebook
#
# The story of the notebook this project started from (ARENA's IOI tutorial adapted to African
# American English), told through `pipeline.api`: the baseline logit difference, direct logit
# attribution, one activation-patching sweep, and a figure restyled for a paper. Every step is a
# pipeline run, the same as `dialect-circuits ...` on the command line: it writes a run directory
# under `outputs/` that `dialect-circuits rerun` can repeat, and the model stays loaded between
# steps.
#
# Open it with jupytext (`jupytext --to notebook docs/notebook.py`, or Jupyter with the jupytext
# extension), or run it as a script: `python docs/notebook.py`. It uses the embedded
# SmolLM2-135M-Instruct model and needs no network; on a CPU it takes a few minutes.

# %% tags=["parameters"]
import os

MODEL = os.environ.get("DIALECT_CIRCUITS_NOTEBOOK_MODEL", "smollm2-135m")  # the tests use `tiny`
PROMPTS = int(os.environ.get("DIALECT_CIRCUITS_NOTEBOOK_PROMPTS", "48"))   # pairs in the dataset
PATCHED = 4                                                                  # prompts in the exact sweep

# %%
from pathlib import Path

from pipeline import api

# One set of overrides for the whole study. Each step below adds `stage=...` and runs into the same
# directory: a finished stage is not redone, and `stage` is the one key that may change in a run.
STUDY = [f"model={MODEL}", f"dataset.max_prompts={PROMPTS}",
         "patching.sweeps=[head_out]", f"patching.max_prompts={PATCHED}"]

# %% [markdown]
# ## 1. The dataset and the baseline
#
# The data stage builds the matched-guise dataset with this model (each pair's most AAE- and most
# SAE-associated attributes); the cache stage runs the clean (AAE) and corrupted (SAE) prompts and
# records the logit difference logit(correct) - logit(incorrect) at each prompt's real last token.

# %%
run = api.run(STUDY + ["stage=cache"])
run

# %%
run.dataset[["prompt_aae", "prompt_sae", "best_attr_aae", "best_attr_sae", "feature"]].head()

# %% [markdown]
# The notebook's `test_prompt` view of the first prompt, clean (AAE) and corrupted (SAE): where the
# two answers rank among the next tokens.

# %%
for side, view in run.json("test_prompt").items():
    print(f"{side}: {view['prompt']}")
    for answer in view["answers"]:
        print(f"  {answer['role']:>9} {answer['token']!r}: rank {answer['rank']}, p = {answer['prob']:.3%}")

# %%
baseline = run.json("baseline")
print(f"mean logit difference: clean {baseline['clean_mean_logit_diff']:+.3f}, "
      f"corrupted {baseline['corrupted_mean_logit_diff']:+.3f} over {baseline['n_prompts']} prompts")
run.tables["logit_diff"].groupby("feature")[["clean_logit_diff", "corrupted_logit_diff"]].mean()

# %% [markdown]
# ## 2. Direct logit attribution
#
# Logit lens, layer attribution and head attribution on each prompt's own answer pair. The run
# already holds the dataset and the baseline, so only the attribution stage runs (with the model
# still loaded).

# %%
run = api.run(STUDY + ["stage=attribution"], run_dir=run.dir)
run.stages_done

# %%
lens = run.tables["logit_lens"]
lens[lens.side == "clean"][["component", "mean", "ci_low", "ci_high"]].tail()

# %%
heads = run.tables["head_attribution"]
heads.reindex(heads["mean"].abs().sort_values(ascending=False).index)[["name", "mean", "ci_low", "ci_high"]].head(8)

# %%
run.figure("head_attribution")

# %% [markdown]
# ## 3. Activation patching: each head's output
#
# Denoising: run the corrupted prompts and patch in one head's clean output at every position.
# 0 means corrupted behaviour, 1 clean behaviour restored. The exact sweep runs on the first
# `PATCHED` prompts; attribution patching estimates every head on every prompt and is scored
# against it.

# %%
run = api.run(STUDY + ["stage=patching"], run_dir=run.dir)
patched = run.tensors("patch_output")      # read from safetensors when a tensor is asked for
normalized = patched["normalized"]         # [layer, head, prompt]
print(patched.metadata["axes"], tuple(normalized.shape))
per_head = normalized.mean(-1)
layer, head = divmod(int(per_head.abs().argmax()), per_head.shape[1])
print(f"largest mean effect: L{layer}H{head} restores {float(per_head[layer, head]):+.3f} of the clean behaviour")

# %%
run.tables["attrpatch_agreement"]

# %% [markdown]
# ## 4. A figure restyled for a paper
#
# Every figure of a run is a plotly Figure: change what you like and save it (as HTML here; a PNG
# or PDF needs plotly's `kaleido` package).

# %%
fig = run.figure("patch_head_out")
fig.update_layout(template="simple_white", font=dict(family="serif", size=14), width=560, height=420,
                  title=f"Head output patching ({MODEL}, {PATCHED} prompts)")
fig.update_traces(colorscale="PuOr", selector=dict(type="heatmap"))
Path("paper").mkdir(exist_ok=True)
fig.write_html("paper/patch_head_out.html")
fig

# %% [markdown]
# ## 5. The other direction, side by side
#
# With SAE as the clean side the answers swap; a symmetric mechanism shows the same heads. The
# comparison is the one `dialect-circuits compare` writes, as DataFrames.

# %%
mirror = api.run(STUDY + ["direction=sae_clean", "stage=attribution"])
comparison = api.compare([run, mirror])
list(comparison.tables)

# %%
comparison.tables["head_attribution"].head(8)

# %% [markdown]
# The model stays loaded for the next run in this kernel; release it when done.

# %%
api.clear_models()
