"""LoRA adapter state: build it with PEFT, move it in and out of Flower records, save it.

The global model of a federation is only the LoRA adapter: a dict of tensors keyed by PEFT's own
state-dict names (`get_peft_model_state_dict`, e.g.
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``). Keeping PEFT's names means a
checkpoint saved with `save_pretrained` loads with `PeftModel.from_pretrained(base, path)`.
"""

from __future__ import annotations

from pathlib import Path

import peft
import torch
from flwr.app import ArrayRecord
from transformers import PreTrainedModel

from fedsim.scenario import LoraConfig

AdapterState = dict[str, torch.Tensor]


def peft_config(lora: LoraConfig) -> peft.LoraConfig:
    return peft.LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
    )


def attach_lora(base: PreTrainedModel, lora: LoraConfig, seed: int) -> peft.PeftModel:
    """Wrap `base` (in place, as PEFT does) with a LoRA adapter initialised from `seed`."""
    missing = [m for m in lora.target_modules if not _has_module(base, m)]
    if missing:
        raise ValueError(
            f"`lora.target_modules` {missing} not found in model "
            f"{base.config.model_type!r}; linear modules: {', '.join(linear_module_names(base))}"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return peft.get_peft_model(base, peft_config(lora))


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Distinct short names of the model's nn.Linear modules (what `target_modules` may name)."""
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    return sorted(names)


def _has_module(model: torch.nn.Module, short: str) -> bool:
    return any(n.rsplit(".", 1)[-1] == short for n, _ in model.named_modules())


def get_state(model: peft.PeftModel) -> AdapterState:
    """A detached float32 copy of the adapter's tensors (ArrayRecord refuses bfloat16)."""
    state = peft.get_peft_model_state_dict(model)
    return {k: v.detach().to("cpu", torch.float32).clone() for k, v in state.items()}


def set_state(model: peft.PeftModel, state: AdapterState) -> None:
    """Load adapter tensors into `model`; every key must match (no silent partial loads)."""
    expected = peft.get_peft_model_state_dict(model).keys()
    if set(expected) != set(state):
        raise ValueError(
            f"adapter keys do not match the model: missing {sorted(set(expected) - set(state))[:3]}, "
            f"unexpected {sorted(set(state) - set(expected))[:3]}"
        )
    peft.set_peft_model_state_dict(model, state)


def to_record(state: AdapterState) -> ArrayRecord:
    return ArrayRecord(state)


def from_record(record: ArrayRecord) -> AdapterState:
    return {k: v.to(torch.float32) for k, v in record.to_torch_state_dict().items()}


def save_adapter(model: peft.PeftModel, state: AdapterState, path: Path) -> None:
    """Write `state` in PEFT's own format at `path` (atomically: a killed write leaves no half folder)."""
    set_state(model, state)
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp)
    tmp.rename(path)
