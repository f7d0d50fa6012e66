"""`fedsim.model.loader.empty_model`, what a ClientApp of a pack knows of the base model
(`clients.packing.meta_model`): `load_model`'s model on the meta device, from its config alone."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub
import pytest
import torch

from fedsim.model.loader import ModelError, empty_model, load_model


def layout(model: torch.nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {name: (tuple(p.shape), p.dtype) for name, p in model.named_parameters()}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_the_empty_model_is_the_loaded_one_without_weights(dtype: str) -> None:
    empty, loaded = empty_model("tiny-llama", dtype), load_model("tiny-llama", dtype)[0]
    assert type(empty) is type(loaded) and layout(empty) == layout(loaded)
    assert {p.device.type for p in empty.parameters()} == {"meta"}


def test_a_saved_folder_is_read_from_its_config(tmp_path: Path) -> None:
    model, tokenizer = load_model("tiny-llama")
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert layout(empty_model(str(tmp_path))) == layout(model)


@pytest.mark.parametrize(
    ("name", "dtype", "words"),
    [
        ("no-such-model", "float32", "unknown model 'no-such-model'"),
        ("tiny-llama", "float64", "dtype must be one of float32, bfloat16, float16, got 'float64'"),
        ("nobody/not-in-the-cache", "float32", "cannot read its config"),
    ],
)
def test_what_cannot_be_built_is_named(name: str, dtype: str, words: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail fast, no retries
    with pytest.raises(ModelError, match=words.replace("(", r"\(")):
        empty_model(name, dtype)


def test_an_empty_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=f"model '{tmp_path}': cannot read its config"):
        empty_model(str(tmp_path))
