"""The deployable result of a pruned run: one device's pruned model with the adapter merged in.

`fedsim export RUN_DIR --device PROFILE` (or `--client ID`, one device) takes the final global
adapter (unpruned shape) and the keep the device deploys (`shipped_keep`): with deploy ratios
(`pruning.deploy_ratios`) the model `fedsim.server.deployed` scored, i.e. the keep a device trained at
its profile's ratio, else the server's cut of the final adapter to that ratio; without them, the
keep it trained on (`keeps.json`, `fedsim.fleet.keeps`). For a profile, the most trained client stands
for it. It cuts base model and adapter to the keep (`surgery.apply_keep`), merges the adapter
(PEFT's `merge_and_unload`) and saves a plain transformers model:
`AutoModelForCausalLM.from_pretrained(OUT)` loads it, no fedsim needed. `--client` ships exactly
the model a device was scored on; `--device` ships one of them, as a profile's devices differ
when each cut its own keep from its own data.

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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import peft
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedsim.config.scenario import Scenario, load_scenario
from fedsim.fleet.fleet import build_fleet
from fedsim.fleet.keeps import PruneBook, most_trained
from fedsim.model.adapter import load_adapter_state, set_state
from fedsim.model.training import evaluate
from fedsim.pruning.select import select_keep
from fedsim.pruning.structure import Keep, decoder_layers, geometry, prunable_params, weight
from fedsim.pruning.surgery import apply_keep, pruned_copy
from fedsim.server.central import CentralEvaluator

MANIFEST = "fedsim-export.json"


@dataclass(frozen=True)
class Exported:
    model: PreTrainedModel  # pruned, adapter merged, uniform layers
    tokenizer: PreTrainedTokenizerBase
    ratio: float  # share of prunable parameters the keep removed
    padding: float  # share of the saved prunable parameters that are zero padding


def export_clients(
    device: Sequence[str], profile: str | None = None, client: int | None = None
) -> tuple[str, list[int]]:
    """The profile and client ids an export stands for: every client of `profile`, or `client`
    alone (exactly one of them given). ValueError naming the known profiles or the id range."""
    if (profile is None) == (client is None):
        raise ValueError("give a device profile or a client id, not both and not neither")
    if client is not None:
        if not 0 <= client < len(device):
            raise ValueError(f"client {client}: the run has clients 0-{len(device) - 1}")
        return str(device[client]), [client]
    ids = [c for c, d in enumerate(device) if d == profile]
    if not ids:
        raise ValueError(
            f"no client of the run has device profile {profile!r}; profiles: {', '.join(sorted(set(device)))}"
        )
    return str(profile), ids


def shipped_keep(
    book: PruneBook, profile: str, ids: Sequence[int], deploy_ratios: Mapping[str, float], cut: Callable[[float], Keep]
) -> Keep | None:
    """The keep clients `ids` of `profile` deploy (the most trained one's; None: the unpruned model).

    With deploy ratios (`pruning.deploy_ratios`) it is the model `fedsim.server.deployed` scored: at
    the profile's ratio ρ > 0, a keep trained at ρ (`PruneBook.trained_at`), else the server's cut
    of the final adapter to ρ (`cut(ρ)`); a profile without a ratio deploys whole. Without deploy
    ratios, a device deploys the keep it trained on, if it holds one."""
    ratios = {p: r for p, r in deploy_ratios.items() if r > 0}
    if ratios:
        rho = ratios.get(profile, 0.0)
        if rho == 0:
            return None
        trained = [c for c in ids if book.trained_at(c, rho) is not None]
        return book.held(most_trained(trained, book.steps)) if trained else cut(rho)
    held = [c for c in ids if book.held(c) is not None]
    return book.held(most_trained(held, book.steps)) if held else None


def merged(model: peft.PeftModel, tokenizer: PreTrainedTokenizerBase, keep: Keep | None) -> Exported:
    """`model` (base + LoRA, the adapter loaded) cut to `keep`, the adapter (and any base deltas)
    merged, widened to uniform layers. It consumes `model`."""
    layers = geometry(model)
    if keep is not None:
        apply_keep(model, keep)
    out = model.merge_and_unload()
    ratio = 0.0 if keep is None else keep.ratio(layers)
    padding = _widen(out, keep) if keep is not None else 0.0
    return Exported(out, tokenizer, ratio, padding)


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
            (attn, "o_proj", 1, extra_g * G * h), (mlp, "gate_proj", 0, extra_c), (mlp, "up_proj", 0, extra_c),
            (mlp, "down_proj", 1, extra_c),
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
        new.bias = torch.nn.Parameter(
            torch.cat([b, b.new_zeros(count)]) if axis == 0 else b.clone(), requires_grad=False
        )
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


def export_rows(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[dict[str, str]],
    book: PruneBook,
    scenario: Scenario,
    server_round: int,
) -> list[dict[str, object]]:
    """`eval_export` rows: `model` (the final global adapter loaded) cut to each target ratio's
    keep, scored on the central test set, as its devices would deploy it."""
    rows: list[dict[str, object]] = []
    e, t = scenario.eval, scenario.train
    for target, keep in per_ratio_keeps(book).items():
        pruned = pruned_copy(model, keep) if keep is not None else model
        res = evaluate(
            pruned, tokenizer, examples, max_new_tokens=e.max_new_tokens, batch_size=e.batch_size, max_len=t.max_seq_len
        )
        rows.append({
            "round": server_round, "client_id": -1, "kind": "eval_export", "num_examples": res.num_examples,
            "loss": res.loss, "accuracy": res.accuracy, "wall_time_s": res.wall_time_s, "prune_target": target,
            "prune_ratio": book.ratio(keep),
        })  # fmt: skip
    return rows


def export(run_dir: Path, out: Path, profile: str | None = None, client: int | None = None) -> Exported:
    """Write the deployable model of device `profile` (its most trained client's) or of `client`
    for run `run_dir` to `out` (module docstring)."""
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose another --out")
    scenario = load_scenario(run_dir / "scenario.toml")
    device = [str(d) for d in build_fleet(scenario).device]
    profile, ids = export_clients(device, profile, client)
    adapter = load_adapter_state(run_dir / "adapter")
    central = CentralEvaluator(scenario)  # the server's model, and its calibration examples for a cut
    set_state(central.model, adapter)
    layers = geometry(central.model)
    book = PruneBook(scenario, layers, np.zeros(len(device)))
    if (run_dir / "keeps.json").is_file():
        book.load((run_dir / "keeps.json").read_text())
    mode = scenario.pruning.mode
    keep = shipped_keep(
        book,
        profile,
        ids,
        scenario.pruning.deploy_ratios,
        lambda rho: select_keep(central.deploy_importance(adapter), layers, rho, mode),
    )
    exported = merged(central.model, central.tokenizer, keep)
    out.mkdir(parents=True, exist_ok=True)
    exported.model.save_pretrained(out)
    exported.tokenizer.save_pretrained(out)
    manifest = {
        "run": str(run_dir),
        "device": profile,
        "client": client,
        "ratio": exported.ratio,
        "padding": exported.padding,
        "keep": keep.to_json() if keep else None,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return exported
