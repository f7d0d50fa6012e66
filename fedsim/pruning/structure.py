"""What structured pruning can remove from a Llama-family decoder layer, and what it kept.

Two kinds of structure per layer, each removed as a whole so the layer stays a valid
grouped-query attention + gated MLP (d hidden, h head_dim, G query heads per KV head):

- a **KV group**: one key/value head with the G query heads that share it. Its weights are G·h
  rows of q_proj, h rows of k_proj and of v_proj, and the matching G·h input columns of o_proj:
  d·h·(2G + 2) parameters. Query head i reads KV head i // G (transformers' `repeat_kv`), so the
  query rows of group g are the contiguous block [g·G·h, (g+1)·G·h). Removing whole groups keeps G,
  hence `num_key_value_groups`, unchanged.
- an **MLP channel**: one row of gate_proj and of up_proj and one input column of down_proj: 3·d
  parameters.

The prunable parameters are these seven weights of every decoder layer (biases, norms and
embeddings are not counted). A `Keep` records, per layer, the indices kept out of the model it was
applied to, plus the geometry that turns them into row/column indices, so it needs no model config
to slice a LoRA adapter and serialises to a small JSON document.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import cast

import torch
from torch import Tensor

from fedsim.config.names import ATTENTION, MLP

FAMILIES = ("llama", "mistral", "qwen2")  # same layout, tested with tiny random configs
# the axis of each weight (out, in) that pruning shrinks: 0 = output rows, 1 = input columns
AXIS = {"q_proj": 0, "k_proj": 0, "v_proj": 0, "o_proj": 1, "gate_proj": 0, "up_proj": 0, "down_proj": 1}


@dataclass(frozen=True)
class LayerGeometry:
    """Prunable structures of one decoder layer, as its weights are now."""

    hidden: int  # d
    head_dim: int  # h
    group_size: int  # G: query heads per KV head
    groups: int  # KV heads
    channels: int  # MLP intermediate channels

    @property
    def group_params(self) -> int:
        return self.hidden * self.head_dim * (2 * self.group_size + 2)

    @property
    def channel_params(self) -> int:
        return 3 * self.hidden

    @property
    def params(self) -> int:
        return self.groups * self.group_params + self.channels * self.channel_params

    @property
    def max_removable(self) -> int:
        """Every layer keeps at least one KV group and one channel."""
        return self.params - self.group_params - self.channel_params


@dataclass(frozen=True)
class Scores:
    """Importance per layer: one score per KV group (groups,) and per MLP channel (channels,)."""

    groups: tuple[Tensor, ...]
    channels: tuple[Tensor, ...]

    def scatter(self, keep: Keep, fill: float) -> Scores:
        """Scores of a model pruned with `keep`, placed at the unpruned model's indices; `fill`
        for the structures `keep` removed."""

        def place(values: Tensor, kept: tuple[int, ...], total: int) -> Tensor:
            return torch.full((total,), fill, dtype=values.dtype).index_copy(
                0, torch.tensor(kept, dtype=torch.long), values
            )

        return Scores(
            tuple(place(s, k, n) for s, k, n in zip(self.groups, keep.groups, keep.num_groups, strict=True)),
            tuple(place(s, k, n) for s, k, n in zip(self.channels, keep.channels, keep.num_channels, strict=True)),
        )

    def select(self, keep: Keep) -> Scores:
        """The scores of the structures `keep` kept, in the pruned model's order."""
        return Scores(
            tuple(s[list(k)] for s, k in zip(self.groups, keep.groups, strict=True)),
            tuple(s[list(k)] for s, k in zip(self.channels, keep.channels, strict=True)),
        )


@dataclass(frozen=True)
class Keep:
    """Kept KV-group and channel indices per layer, into the model the keep was made for."""

    groups: tuple[tuple[int, ...], ...]  # per layer, sorted kept KV-group indices
    channels: tuple[tuple[int, ...], ...]  # per layer, sorted kept MLP channel indices
    num_groups: tuple[int, ...]  # per layer, KV groups before pruning
    num_channels: tuple[int, ...]  # per layer, channels before pruning
    group_size: int  # G
    head_dim: int  # h

    def __post_init__(self) -> None:
        lengths = {len(self.groups), len(self.channels), len(self.num_groups), len(self.num_channels)}
        if len(lengths) != 1:
            raise ValueError(f"`Keep` fields must all have one entry per layer, got lengths {sorted(lengths)}")
        problems = []
        for i, (g, c, ng, nc) in enumerate(zip(self.groups, self.channels, self.num_groups, self.num_channels)):
            problems += _check_indices(f"layer {i} KV groups", g, ng) + _check_indices(f"layer {i} channels", c, nc)
        if problems:
            raise ValueError("; ".join(problems))

    def _width(self, proj: str) -> int:
        """Entries along `AXIS[proj]` one structure owns: G·h (q, o), h (k, v), 1 (an MLP channel)."""
        return 1 if proj in MLP else self.head_dim * (self.group_size if proj in ("q_proj", "o_proj") else 1)

    def full_length(self, layer: int, proj: str) -> int:
        """Length along `AXIS[proj]` of that projection's weight in the unpruned model."""
        return (self.num_channels if proj in MLP else self.num_groups)[layer] * self._width(proj)

    def indices(self, layer: int, proj: str) -> Tensor:
        """Kept indices along `AXIS[proj]` of that projection's weight, as a LongTensor."""
        if proj in MLP:
            return torch.tensor(self.channels[layer], dtype=torch.long)
        width = self._width(proj)
        offsets = torch.arange(width)
        return (torch.tensor(self.groups[layer], dtype=torch.long)[:, None] * width + offsets).flatten()

    def to_json(self) -> str:
        """A compact document: per layer, a base85 bit mask of the kept groups and channels
        (SmolLM2's 46,080 channels: about 8 kB, small enough to travel in every message)."""
        return json.dumps(
            {
                "groups": [_bits(g, n) for g, n in zip(self.groups, self.num_groups)],
                "channels": [_bits(c, n) for c, n in zip(self.channels, self.num_channels)],
                "num_groups": self.num_groups,
                "num_channels": self.num_channels,
                "group_size": self.group_size,
                "head_dim": self.head_dim,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> Keep:
        """The keep `to_json` wrote; ValueError naming what is wrong with any other document."""
        try:
            raw = json.loads(text)
            num_groups, num_channels = (
                tuple(int(n) for n in raw["num_groups"]),
                tuple(int(n) for n in raw["num_channels"]),
            )
            return cls(
                groups=tuple(_indices(b, n) for b, n in zip(raw["groups"], num_groups, strict=True)),
                channels=tuple(_indices(b, n) for b, n in zip(raw["channels"], num_channels, strict=True)),
                num_groups=num_groups,
                num_channels=num_channels,
                group_size=int(raw["group_size"]),
                head_dim=int(raw["head_dim"]),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"not a pruning keep document: {err!r}") from None

    def removed_per_layer(self, layers: Sequence[LayerGeometry]) -> list[int]:
        """Per layer, the prunable parameters this keep removes from the model `layers` describes (unpruned)."""
        return [
            (g.groups - len(kg)) * g.group_params + (g.channels - len(kc)) * g.channel_params
            for g, kg, kc in zip(layers, self.groups, self.channels, strict=True)
        ]

    def removed_params(self, layers: Sequence[LayerGeometry]) -> int:
        """Prunable parameters this keep removes from the model `layers` describes (unpruned)."""
        return sum(self.removed_per_layer(layers))

    def ratio(self, layers: Sequence[LayerGeometry]) -> float:
        """Share of the prunable parameters of the model `layers` describes (unpruned) that this keep removed."""
        return self.removed_params(layers) / sum(g.params for g in layers)

    def geometry(self, hidden: int) -> list[LayerGeometry]:
        """The unpruned model's geometry, as far as the keep records it (plus the hidden size)."""
        return [
            LayerGeometry(hidden, self.head_dim, self.group_size, g, c)
            for g, c in zip(self.num_groups, self.num_channels)
        ]

    def then(self, inner: Keep) -> Keep:
        """The keep of pruning with `self`, then pruning the result with `inner` (made for it)."""
        if inner.num_groups != tuple(map(len, self.groups)) or inner.num_channels != tuple(map(len, self.channels)):
            raise ValueError("the inner keep is not for the model this keep leaves")
        return replace(
            self,
            groups=tuple(tuple(o[i] for i in k) for o, k in zip(self.groups, inner.groups)),
            channels=tuple(tuple(o[i] for i in k) for o, k in zip(self.channels, inner.channels)),
        )

    def within(self, outer: Keep) -> Keep:
        """This keep (a subset of `outer`, both of the unpruned model) as a keep of the model
        `outer` leaves: `outer.then(self.within(outer)) == self`."""

        def positions(kept: tuple[int, ...], held: tuple[int, ...], what: str) -> tuple[int, ...]:
            where = {v: i for i, v in enumerate(held)}
            if any(v not in where for v in kept):
                raise ValueError(f"{what}: the keep brings back structures the outer keep removed")
            return tuple(where[v] for v in kept)

        return Keep(
            groups=tuple(
                positions(k, o, f"layer {i} KV groups") for i, (k, o) in enumerate(zip(self.groups, outer.groups))
            ),
            channels=tuple(
                positions(k, o, f"layer {i} channels") for i, (k, o) in enumerate(zip(self.channels, outer.channels))
            ),
            num_groups=tuple(map(len, outer.groups)),
            num_channels=tuple(map(len, outer.channels)),
            group_size=self.group_size,
            head_dim=self.head_dim,
        )

    @classmethod
    def everything(cls, layers: Sequence[LayerGeometry]) -> Keep:
        """The keep that removes nothing."""
        return cls(
            groups=tuple(tuple(range(g.groups)) for g in layers),
            channels=tuple(tuple(range(g.channels)) for g in layers),
            num_groups=tuple(g.groups for g in layers),
            num_channels=tuple(g.channels for g in layers),
            group_size=layers[0].group_size,
            head_dim=layers[0].head_dim,
        )


def _bits(kept: Sequence[int], total: int) -> str:
    """A bit mask of `kept` out of `total`, as base85 text (JSON-safe: no quote or backslash)."""
    value = sum(1 << i for i in kept)
    return base64.b85encode(value.to_bytes((total + 7) // 8, "little")).decode()


def _indices(bits: str, total: int) -> tuple[int, ...]:
    value = int.from_bytes(base64.b85decode(bits), "little")
    if value >> total:
        raise ValueError(f"bit mask {bits[:16]}... sets bits beyond {total}")
    return tuple(i for i in range(total) if value >> i & 1)


def _check_indices(what: str, kept: Sequence[int], total: int) -> list[str]:
    if len(kept) == 0:
        return [f"{what}: keeps none of {total}; each layer must keep at least 1 KV group and 1 MLP channel"]
    if list(kept) != sorted(set(kept)) or kept[0] < 0 or kept[-1] >= total:
        return [f"{what}: indices must be sorted, distinct and in [0, {total}), got {_short(kept)}"]
    return []


def _short(values: Sequence[int]) -> str:
    return str(list(values)) if len(values) <= 8 else f"[{', '.join(map(str, values[:8]))}, ...]"


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model a PEFT wrapper wraps (`get_base_model()`), else `model` itself."""
    if hasattr(model, "get_base_model"):
        # nn.Module.__getattr__ is typed Tensor | Module; PEFT's get_base_model is a method returning nn.Module
        return cast(Callable[[], torch.nn.Module], model.get_base_model)()
    return model


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """`model.model.layers` of a (PEFT-wrapped) Llama-family causal LM; ValueError for others."""
    base = base_model(model)
    kind = getattr(getattr(base, "config", None), "model_type", None)
    layers = getattr(getattr(base, "model", None), "layers", None)
    if kind not in FAMILIES or layers is None:
        raise ValueError(
            f"structured pruning does not know {type(base).__name__} (model_type {kind!r}); it works on the "
            "Llama-family layout, model.model.layers[i].self_attn.{q,k,v,o}_proj and .mlp.{gate,up,down}_proj, "
            f"of model types {', '.join(FAMILIES)}"
        )
    return layers


def weight(module: torch.nn.Module) -> Tensor:
    """The frozen (out, in) weight of an nn.Linear, or of the one a PEFT layer wraps."""
    # nn.Module.__getattr__ is typed Tensor | Module; an nn.Linear's weight is a Parameter (a Tensor)
    return cast(Tensor, getattr(module, "base_layer", module).weight)


def geometry(model: torch.nn.Module) -> list[LayerGeometry]:
    """Per decoder layer, its prunable structures as the weights are now."""
    out = []
    for i, layer in enumerate(decoder_layers(model)):
        # nn.Module.__getattr__ is typed Tensor | Module: these are HF's attention and MLP modules, their
        # int fields and their projection layers
        attn, mlp = cast(torch.nn.Module, layer.self_attn), cast(torch.nn.Module, layer.mlp)
        h, g = cast(int, attn.head_dim), cast(int, attn.num_key_value_groups)
        k_proj, gate_proj = cast(torch.nn.Module, attn.k_proj), cast(torch.nn.Module, mlp.gate_proj)
        d, kv, m = weight(k_proj).shape[1], weight(k_proj).shape[0], weight(gate_proj).shape[0]
        expected = {"q_proj": (g * kv, d), "k_proj": (kv, d), "v_proj": (kv, d), "o_proj": (d, g * kv)}
        expected |= {"gate_proj": (m, d), "up_proj": (m, d), "down_proj": (d, m)}
        found = {n: tuple(weight(getattr(attn if n in ATTENTION else mlp, n)).shape) for n in expected}
        if found != expected or kv % h:
            raise ValueError(
                f"layer {i}: linear shapes {found} do not form grouped-query attention "
                f"with head_dim {h} and {g} query heads per KV head"
            )
        out.append(LayerGeometry(d, h, g, kv // h, m))
    return out


def prunable_params(model: torch.nn.Module) -> int:
    """Parameters of q,k,v,o,gate,up,down weights over all decoder layers (what a ratio counts)."""
    return sum(
        weight(getattr(sub, name)).numel()
        for layer in decoder_layers(model)
        for sub, names in ((layer.self_attn, ATTENTION), (layer.mlp, MLP))
        for name in names
    )
