"""The deployable result of a pruned run: one device's pruned model with the adapter merged in.

`fedsim export RUN_DIR --device PROFILE` takes the final global adapter (unpruned shape) and the
keep of that profile's most trained client (`keeps.json`, `fedsim.keeps`), cuts base model and
adapter to it (`surgery.apply_keep`), merges the adapter (PEFT's `merge_and_unload`) and saves a
plain transformers model: `AutoModelForCausalLM.from_pretrained(OUT)` loads it, no fedsim needed.

A transformers config has one head count and one MLP width for all layers. A uniform keep (every
layer kept as many KV groups and channels) is saved as it is, with the config updated. A per-layer
keep is widened to the largest layer with zero structures: a KV group whose q, k, v rows and o_proj
columns are zero adds exactly 0 to the output (its values are 0 and o_proj ignores them), and so
does a channel whose gate, up rows and down column are zero (SiLU(0)·0 = 0). Outputs are
identical to the pruned model's; `fedsim-export.json` records the padding's share of parameters.

At the end of a pruned run the server scores the final adapter on each target ratio's pruned
model (`export_rows`, rows of kind `eval_export`), and `fedsim report` prints them per ratio.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedsim.adapter import AdapterState, attach_lora, set_state
from fedsim.keeps import PruneBook, most_trained
from fedsim.models import load_model
from fedsim.pruning.structure import Keep, decoder_layers, geometry, prunable_params, weight
from fedsim.pruning.surgery import apply_keep, pruned_copy
from fedsim.scenario import Scenario
from fedsim.training import evaluate

MANIFEST = "fedsim-export.json"


@dataclass(frozen=True)
class Exported:
    model: PreTrainedModel  # pruned, adapter merged, uniform layers
    tokenizer: PreTrainedTokenizerBase
    ratio: float  # share of prunable parameters the keep removed
    padding: float  # share of the saved prunable parameters that are zero padding


def device_keep(keeps_json: str, device: list[str], profile: str) -> Keep | None:
    """The keep of the client of `profile` that trained most (None: none of them is pruned).
    `device[cid]` is each client's profile; ValueError if no client has that profile."""
    book = json.loads(keeps_json) if keeps_json else {"steps": [0] * len(device), "keeps": {}}
    ids = [c for c, d in enumerate(device) if d == profile]
    if not ids:
        raise ValueError(f"no client of the run has device profile {profile!r}; profiles: {', '.join(sorted(set(device)))}")
    pruned = [c for c in ids if str(c) in book["keeps"]]
    if not pruned:
        return None
    return Keep.from_json(book["keeps"][str(most_trained(pruned, book["steps"]))])


def pruned_merged(scenario: Scenario, adapter: AdapterState, keep: Keep | None) -> Exported:
    """The base model with `adapter` (and any base deltas) merged, cut to `keep`, widened to uniform layers."""
    base, tokenizer = load_model(scenario.model.name, dtype=scenario.model.dtype)
    model = attach_lora(base, scenario.lora, seed=0)
    set_state(model, adapter)
    layers = geometry(model)
    if keep is not None:
        apply_keep(model, keep)
    merged = model.merge_and_unload()
    ratio = 0.0 if keep is None else keep.ratio(layers)
    padding = _widen(merged, keep) if keep is not None else 0.0
    return Exported(merged, tokenizer, ratio, padding)


def _widen(model: PreTrainedModel, keep: Keep) -> float:
    """Pad every layer with zero KV groups / channels to the widest layer; set the config; returns
    the padding's share of the prunable parameters."""
    groups, channels = max(map(len, keep.groups)), max(map(len, keep.channels))
    G, h = keep.group_size, keep.head_dim
    added = 0
    for layer, kept_g, kept_c in zip(decoder_layers(model), keep.groups, keep.channels, strict=True):
        attn, mlp = layer.self_attn, layer.mlp
        extra_g, extra_c = groups - len(kept_g), channels - len(kept_c)
        for parent, name, axis, count in (
            (attn, "q_proj", 0, extra_g * G * h), (attn, "k_proj", 0, extra_g * h), (attn, "v_proj", 0, extra_g * h),
            (attn, "o_proj", 1, extra_g * G * h), (mlp, "gate_proj", 0, extra_c), (mlp, "up_proj", 0, extra_c), (mlp, "down_proj", 1, extra_c),
        ):  # fmt: skip
            if count:
                setattr(parent, name, _padded(getattr(parent, name), axis, count))
                added += count * weight(getattr(parent, name)).shape[1 - axis]
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = channels
    config = model.config
    config.head_dim, config.num_key_value_heads = h, groups
    config.num_attention_heads, config.intermediate_size = groups * G, channels
    return added / prunable_params(model)


def _padded(linear: torch.nn.Linear, axis: int, count: int) -> torch.nn.Linear:
    w = linear.weight.detach()
    pad = torch.zeros((count, w.shape[1]) if axis == 0 else (w.shape[0], count), dtype=w.dtype, device=w.device)
    new_w = torch.cat([w, pad], dim=axis)
    bias = linear.bias is not None
    new = torch.nn.Linear(new_w.shape[1], new_w.shape[0], bias=bias, device="meta")
    new.weight = torch.nn.Parameter(new_w, requires_grad=False)
    if bias:
        b = linear.bias.detach()
        new.bias = torch.nn.Parameter(torch.cat([b, b.new_zeros(count)]) if axis == 0 else b.clone(), requires_grad=False)
    return new


def per_ratio_keeps(book: PruneBook) -> dict[float, Keep | None]:
    """Target ratio → the keep of its most trained client, over the targets of clients that hold
    a keep, and 0 → None (the unpruned model) if some client's target is 0: the models
    `eval_export` rows score."""
    held = [c for c in range(len(book.targets)) if book.held(c) is not None]
    out: dict[float, Keep | None] = {0.0: None} if (book.targets == 0).any() else {}
    for target in sorted({float(book.targets[c]) for c in held}):
        ids = [c for c in held if book.targets[c] == target]
        out[target] = book.held(most_trained(ids, book.steps))
    return out


def export_rows(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, examples: list[dict[str, str]], book: PruneBook, scenario: Scenario, server_round: int) -> list[dict[str, object]]:
    """`eval_export` rows: `model` (the final global adapter loaded) cut to each target ratio's
    keep, scored on the central test set, as its devices would deploy it."""
    rows: list[dict[str, object]] = []
    e, t = scenario.eval, scenario.train
    for target, keep in per_ratio_keeps(book).items():
        pruned = pruned_copy(model, keep) if keep is not None else model
        res = evaluate(pruned, tokenizer, examples, max_new_tokens=e.max_new_tokens, batch_size=e.batch_size, max_len=t.max_seq_len)
        rows.append({
            "round": server_round, "client_id": -1, "kind": "eval_export", "num_examples": res.num_examples, "loss": res.loss,
            "accuracy": res.accuracy, "wall_time_s": res.wall_time_s, "prune_target": target, "prune_ratio": book.ratio(keep),
        })  # fmt: skip
    return rows


def export(run_dir: Path, profile: str, out: Path) -> Exported:
    """Write `profile`'s deployable model for run `run_dir` to `out` (module docstring)."""
    from fedsim.adapter import load_adapter_state
    from fedsim.fleet import build_fleet
    from fedsim.scenario import load_scenario

    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose another --out")
    scenario = load_scenario(run_dir / "scenario.toml")
    adapter = load_adapter_state(run_dir / "adapter")
    keeps = (run_dir / "keeps.json").read_text() if (run_dir / "keeps.json").is_file() else ""
    keep = device_keep(keeps, [str(d) for d in build_fleet(scenario).device], profile)
    exported = pruned_merged(scenario, adapter, keep)
    out.mkdir(parents=True, exist_ok=True)
    exported.model.save_pretrained(out)
    exported.tokenizer.save_pretrained(out)
    manifest = {"run": str(run_dir), "device": profile, "ratio": exported.ratio, "padding": exported.padding, "keep": keep.to_json() if keep else None}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return exported
