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
# American English), told through `pipeline.api` on the prejudice itself: the covert prejudice
# score (how far the next token leans toward unfavorable traits after AAE than after SAE), direct
# logit attribution of it, one activation-patching sweep, and a figure restyled for a paper. Every step is a
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
# The data stage probes every prompt in both guises with this model; the cache stage reads the
# favorability metric (the weighted mean logit of unfavorable traits minus that of favorable ones)
# at each prompt's real last token for the clean (AAE) and corrupted (SAE) prompts. Its AAE - SAE
# gap is the covert prejudice score.

# %%
run = api.run(STUDY + ["stage=cache"])
run

# %%
run.dataset[["prompt_aae", "prompt_sae", "feature", "template"]].head()

# %% [markdown]
# The notebook's `test_prompt` view of the first prompt, clean (AAE) and corrupted (SAE): the metric,
# and where the most unfavorable (largest weight) and most favorable traits rank among the next tokens.

# %%
for side, view in run.json("test_prompt").items():
    print(f"{side}: {view['prompt']}  metric {view['metric']:+.3f}")
    for answer in view["answers"]:
        print(f"  weight {answer['weight']:+.3f} {answer['token']!r}: rank {answer['rank']}, p = {answer['prob']:.3%}")

# %%
baseline = run.json("baseline")
score = run.tables["baseline_null"].iloc[0]
print(f"{baseline['headline']}: {score.gap:+.3f} [{score.ci_low:+.3f}, {score.ci_high:+.3f}], "
      f"guise-swap null [{score.null_low:+.3f}, {score.null_high:+.3f}], p = {score.p_perm:.3f}")
run.tables["metric"].groupby("feature")[["clean_metric", "corrupted_metric"]].mean()

# %% [markdown]
# ## 2. Direct logit attribution
#
# Logit lens, layer attribution and head attribution of the favorability metric, clean (AAE),
# corrupted (SAE) and their difference: what the dialect changes in each head's direct write. The
# run already holds the dataset and the baseline, so only the attribution stage runs (with the
# model still loaded).

# %%
run = api.run(STUDY + ["stage=attribution"], run_dir=run.dir)
run.stages_done

# %%
lens = run.tables["logit_lens"]
lens[lens.side == "clean"][["component", "mean", "ci_low", "ci_high"]].tail()

# %%
heads = run.tables["head_attribution_both_sides"]
heads = heads[heads.side == "difference"]
heads.reindex(heads["mean"].abs().sort_values(ascending=False).index)[["name", "mean", "ci_low", "ci_high", "detectable"]].head(8)

# %%
run.figure("head_attribution")

# %% [markdown]
# ## 3. Activation patching: each head's output
#
# Denoising: run the corrupted prompts and patch in one head's clean output at every position.
# The effect is in metric units (patched - corrupted); the normalized value divides it by the
# clean - corrupted gap (0 = corrupted, 1 = clean restored), which is noisy when the gap is small.
# The exact sweep runs on the first `PATCHED` prompts; attribution patching estimates every head
# on every prompt and is scored against it.

# %%
run = api.run(STUDY + ["stage=patching"], run_dir=run.dir)
patched = run.tensors("patch_output")      # read from safetensors when a tensor is asked for
effect = patched["effect"]                 # [layer, head, prompt], metric units
print(patched.metadata["axes"], tuple(effect.shape))
per_head = effect.mean(-1)
layer, head = divmod(int(per_head.abs().argmax()), per_head.shape[1])
print(f"largest mean effect: L{layer}H{head} moves the metric by {float(per_head[layer, head]):+.4f} "
      f"({float(patched['normalized'].mean(-1)[layer, head]):+.2f} of the clean - corrupted gap)")

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
# With SAE as the clean side the sides swap and the metric's sign flips, so clean - corrupted is the
# same AAE - SAE difference; a symmetric mechanism shows the same heads. The comparison is the one
# `dialect-circuits compare` writes, as DataFrames.

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
