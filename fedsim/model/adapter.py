"""LoRA adapter state: build it with PEFT, move it in and out of Flower records, save it.

The global model of a federation is only the LoRA adapter: a dict of tensors keyed by PEFT's own
state-dict names (`get_peft_model_state_dict`, e.g.
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``). Keeping PEFT's names means a
checkpoint saved with `save_pretrained` loads with `PeftModel.from_pretrained(base, path)`.

Strategies that merge updates into the frozen base weights (FLoRA, FedEx-LoRA) add one more
tensor per adapted layer, ``<layer prefix>.base_delta`` (out, in): the sum of what was merged
into that layer's weight so far. It travels with the adapter and is applied to the base layer
(`apply_base_delta`); checkpoints keep it in `base_delta.safetensors` beside the adapter.

A client trains at its own rank: one PEFT model per process carries one adapter per rank
(`use_rank`), all on the same frozen base, and state moves in and out of the active one.
"""

from __future__ import annotations

from pathlib import Path

import peft
import torch
from flwr.app import ArrayRecord
from transformers import PreTrainedModel

from fedsim.config.scenario import LoraConfig

AdapterState = dict[str, torch.Tensor]
BASE_DELTA = ".base_delta"  # key suffix of a layer's merged base-weight delta
BASE_DELTA_FILE = "base_delta.safetensors"


def split_state(state: AdapterState) -> tuple[AdapterState, AdapterState]:
    """(LoRA tensors, base deltas keyed by layer prefix) of a global state."""
    adapter = {k: v for k, v in state.items() if not k.endswith(BASE_DELTA)}
    deltas = {k[: -len(BASE_DELTA)]: v for k, v in state.items() if k.endswith(BASE_DELTA)}
    return adapter, deltas


def peft_config(lora: LoraConfig) -> peft.LoraConfig:
    return peft.LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,  # type: ignore[arg-type]  # PEFT types it int but only divides by it (scaling = alpha / r)
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


def use_rank(model: peft.PeftModel, lora: LoraConfig, rank: int) -> None:
    """Make the rank-`rank` adapter the active (and only trainable) one, adding it on first use.
    The adapter built by `attach_lora` (rank `lora.rank`) is PEFT's "default"."""
    name = "default" if rank == lora.rank else f"rank-{rank}"
    if name not in model.peft_config:
        model.add_adapter(name, peft_config(lora.model_copy(update={"rank": rank})))
    model.set_adapter(name)


def factors(state: AdapterState, which: str) -> AdapterState:
    """The tensors of `state` that belong to the LoRA factors named in `which` ("A", "B", "AB")."""
    return {k: v for k, v in state.items() if any(f".lora_{f}" in k for f in which)}


def active_pairs(model: peft.PeftModel) -> list[tuple[torch.nn.Module, torch.nn.Module]]:
    """(lora_A, lora_B) modules of the active adapter, one pair per adapted layer."""
    name = model.active_adapter
    dicts = [(getattr(m, "lora_A", None), getattr(m, "lora_B", None)) for m in model.modules()]
    return [
        (A[name], B[name])
        for A, B in dicts
        if isinstance(A, torch.nn.ModuleDict) and isinstance(B, torch.nn.ModuleDict) and name in A
    ]


def set_trainable(model: peft.PeftModel, freeze: str = "") -> None:
    """Train the active adapter's factors except those named in `freeze` ("A": FFA-LoRA)."""
    for A, B in active_pairs(model):
        A.requires_grad_("A" not in freeze)
        B.requires_grad_("B" not in freeze)


def get_state(model: peft.PeftModel) -> AdapterState:
    """A detached float32 copy of the active adapter's tensors (ArrayRecord refuses bfloat16)."""
    state = peft.get_peft_model_state_dict(model, adapter_name=model.active_adapter)
    return {k: v.detach().to("cpu", torch.float32).clone() for k, v in state.items()}


def set_state(model: peft.PeftModel, state: AdapterState) -> None:
    """Load LoRA tensors into the active adapter, and base deltas (if any) into the base layers;
    every LoRA key must match (no silent partial loads)."""
    adapter, deltas = split_state(state)
    name = model.active_adapter
    expected = peft.get_peft_model_state_dict(model, adapter_name=name).keys()
    if set(expected) != set(adapter):
        raise ValueError(
            f"adapter keys do not match the model: missing {sorted(set(expected) - set(adapter))[:3]}, "
            f"unexpected {sorted(set(adapter) - set(expected))[:3]}"
        )
    peft.set_peft_model_state_dict(model, adapter, adapter_name=name)
    apply_base_delta(model, deltas)


def apply_base_delta(model: peft.PeftModel, deltas: AdapterState) -> None:
    """Set each adapted layer's frozen weight to original + delta (original where no delta is
    given). The originals are kept on the model the first time, so states can be swapped freely.

    The sum is formed and held in float32 whatever the model's dtype: a bf16/fp16 layer that
    carries a delta gets a float32 weight and computes in float32 (`_in_float32`), so a delta far
    below the half-precision step of the weight (FedEx-LoRA's residuals) is applied with float32
    error, not rounded away. Without a delta the layer returns to its original tensor and dtype.
    """
    originals: dict[str, torch.Tensor] = model.__dict__.setdefault("_fedsim_base_originals", {})
    for prefix in sorted(set(deltas) | set(originals)):
        try:
            layer = model.get_submodule(prefix).base_layer
        except AttributeError:
            raise ValueError(f"base delta for `{prefix}`, which is not a LoRA-adapted layer of this model") from None
        if not isinstance(layer, torch.nn.Linear):
            raise ValueError(
                f"base delta for `{prefix}`, whose base layer is a {type(layer).__name__}, not an nn.Linear"
            )
        if prefix not in originals:
            originals[prefix] = layer.weight.detach().clone()
        original, delta = originals[prefix], deltas.get(prefix)
        if delta is not None and tuple(delta.shape) != tuple(original.shape):
            raise ValueError(
                f"base delta for `{prefix}` has shape {tuple(delta.shape)}, the weight {tuple(original.shape)}"
            )
        if delta is None:
            _set_weight(layer, original)
        else:
            _set_weight(layer, original.to(torch.float32) + delta.to(original.device, torch.float32))


def _set_weight(layer: torch.nn.Linear, value: torch.Tensor) -> None:
    """Give `layer` the frozen weight `value`, in `value`'s dtype (in place when the dtype is the weight's)."""
    if value.dtype == layer.weight.dtype:
        with torch.no_grad():
            layer.weight.copy_(value)
        return
    layer.weight = torch.nn.Parameter(value.clone(), requires_grad=False)
    if layer.bias is not None:
        layer.bias = torch.nn.Parameter(layer.bias.detach().to(value.dtype), requires_grad=False)
    _in_float32(layer, value.dtype == torch.float32)


def _in_float32(layer: torch.nn.Linear, on: bool) -> None:
    """Run `layer` on float32 inputs and return its input's dtype (on), or drop those hooks (off)."""
    for handle in layer.__dict__.pop("_fedsim_float32_hooks", ()):
        handle.remove()
    if not on:
        return
    dtypes: list[torch.dtype] = []

    def cast_in(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        dtypes.append(args[0].dtype)
        return (args[0].to(torch.float32), *args[1:])

    def cast_out(module: torch.nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        return output.to(dtypes.pop())

    layer.__dict__["_fedsim_float32_hooks"] = (
        layer.register_forward_pre_hook(cast_in),
        layer.register_forward_hook(cast_out),
    )


def to_record(state: AdapterState) -> ArrayRecord:
    return ArrayRecord(state)


def from_record(record: ArrayRecord) -> AdapterState:
    return {k: v.to(torch.float32) for k, v in record.to_torch_state_dict().items()}


def save_adapter(model: peft.PeftModel, state: AdapterState, path: Path) -> None:
    """Write `state` in PEFT's own format at `path`, base deltas (if any) in `BASE_DELTA_FILE`
    beside it (atomically: a killed write leaves no half folder)."""
    from safetensors.torch import save_file

    set_state(model, state)
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(str(tmp))
    deltas = split_state(state)[1]
    if deltas:
        save_file({k: v.contiguous() for k, v in deltas.items()}, str(tmp / BASE_DELTA_FILE))
    tmp.rename(path)


def load_adapter_state(path: Path) -> AdapterState:
    """The state `save_adapter` wrote at `path` (adapter and base deltas), float32."""
    from safetensors.torch import load_file

    file = Path(path) / "adapter_model.safetensors"
    if not file.is_file():
        raise FileNotFoundError(f"{path} holds no saved adapter ({file.name} missing)")
    state = {k: v.float() for k, v in load_file(str(file)).items()}
    if (Path(path) / BASE_DELTA_FILE).is_file():
        state |= {f"{k}{BASE_DELTA}": v.float() for k, v in load_file(str(Path(path) / BASE_DELTA_FILE)).items()}
    return state
