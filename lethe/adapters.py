"""Architecture adapters: one table that says where things live in each model family.

Every method asks the adapter for module names instead of hard-coding
``transformer.h.{}.mlp.c_proj``; whether a weight is stored transposed (GPT-2's
Conv1D) comes from this table, never from guessing by shape (square matrices
make that guess ambiguous, a trap of the reference ROME code).

Registering a new architecture takes a few lines::

    from lethe.adapters import ArchAdapter, StackSpec, register_adapter
    register_adapter(ArchAdapter(
        model_type="my_model", family="decoder",
        stacks={"decoder": StackSpec(blocks="model.layers", mlp_in="mlp.fc1",
                                     mlp_out="mlp.fc2", attn="self_attn")},
        embed="model.embed_tokens", final_norm="model.norm", lm_head="lm_head"))
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

FAMILIES = ("decoder", "mlm", "seq2seq")


class UnknownArchitectureError(ValueError):
    pass


class LayerIndexError(IndexError):
    pass


@dataclass(frozen=True)
class StackSpec:
    """One stack of transformer blocks; module paths inside a block are relative to it."""

    blocks: str
    mlp_in: str
    mlp_out: str
    attn: str
    mlp_gate: str | None = None
    final_norm: str | None = None


@dataclass(frozen=True)
class ArchAdapter:
    model_type: str
    family: str
    stacks: dict[str, StackSpec]
    embed: str
    lm_head: str
    final_norm: str | None = None
    pos_embed: str | None = None
    transposed: bool = False  # MLP weights stored (in, out), as in GPT-2's Conv1D
    aliases: tuple[str, ...] = field(default=())

    # ----- stacks and layers -------------------------------------------------
    @property
    def default_stack(self) -> str:
        """The stack edited by default: the decoder of a decoder-only model, else the encoder."""
        return next(iter(self.stacks))

    def stack(self, stack: str | None = None) -> StackSpec:
        name = stack or self.default_stack
        if name not in self.stacks:
            raise ValueError(
                f"{self.model_type} has no stack {name!r}; its stacks are {sorted(self.stacks)}"
            )
        return self.stacks[name]

    def num_layers(self, model: nn.Module, stack: str | None = None) -> int:
        return len(unwrap(model).get_submodule(self.stack(stack).blocks))

    def check_layer(self, model: nn.Module, layer: int, stack: str | None = None) -> int:
        """The layer as an index 0..n-1; negative indices count from the last block (-1 is the last), as in
        Python and in MEND's published layer choice ("the last three blocks": [-3, -2, -1])."""
        n = self.num_layers(model, stack)
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise LayerIndexError(f"layer index must be an int, got {layer!r}")
        if not -n <= layer < n:
            raise LayerIndexError(
                f"layer {layer} is out of range: this {self.model_type} model's "
                f"{stack or self.default_stack} stack has {n} blocks (valid: 0..{n - 1}, or -{n}..-1 counting "
                "from the last block, as in Python)"
            )
        return layer % n

    def block_name(self, layer: int, stack: str | None = None, model: nn.Module | None = None) -> str:
        if model is not None:
            layer = self.check_layer(model, layer, stack)
        return f"{self.stack(stack).blocks}.{layer}"

    def _in_block(self, rel: str | None, layer: int, stack: str | None, model: nn.Module | None) -> str:
        if rel is None:
            raise ValueError(f"{self.model_type} has no such module in its blocks")
        return f"{self.block_name(layer, stack, model)}.{rel}"

    def mlp_in_name(self, layer: int, stack: str | None = None, model: nn.Module | None = None) -> str:
        return self._in_block(self.stack(stack).mlp_in, layer, stack, model)

    def mlp_out_name(self, layer: int, stack: str | None = None, model: nn.Module | None = None) -> str:
        return self._in_block(self.stack(stack).mlp_out, layer, stack, model)

    def attn_name(self, layer: int, stack: str | None = None, model: nn.Module | None = None) -> str:
        return self._in_block(self.stack(stack).attn, layer, stack, model)

    def mlp_gate_name(self, layer: int, stack: str | None = None, model: nn.Module | None = None) -> str:
        return self._in_block(self.stack(stack).mlp_gate, layer, stack, model)

    def layer_names(self, kind: str, stack: str | None = None, model: nn.Module | None = None) -> list[str]:
        """All names of one kind ("block", "mlp_in", "mlp_out", "attn") over a stack."""
        if model is None:
            raise ValueError("layer_names needs the model to count its blocks")
        fn = {
            "block": self.block_name,
            "mlp_in": self.mlp_in_name,
            "mlp_out": self.mlp_out_name,
            "attn": self.attn_name,
        }[kind]
        return [fn(i, stack) for i in range(self.num_layers(model, stack))]

    # ----- modules and weights ----------------------------------------------
    def module(self, model: nn.Module, name: str) -> nn.Module:
        return unwrap(model).get_submodule(name)

    def embeddings(self, model: nn.Module) -> nn.Module:
        return self.module(model, self.embed)

    def lm_head_module(self, model: nn.Module) -> nn.Module:
        return self.module(model, self.lm_head)

    def weight_out_in(self, module: nn.Module) -> torch.Tensor:
        """The projection's weight as an (out_features, in_features) view, whatever its storage."""
        w = module.weight
        return w.T if self.transposed else w

    def ffn_width(self, model: nn.Module, layer: int = 0, stack: str | None = None) -> int:
        """Number of FFN intermediate neurons (the input width of the output projection)."""
        w = self.weight_out_in(self.module(model, self.mlp_out_name(layer, stack)))
        return w.shape[1]


_REGISTRY: dict[str, ArchAdapter] = {}


def register_adapter(adapter: ArchAdapter, overwrite: bool = False) -> ArchAdapter:
    if adapter.family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {adapter.family!r}")
    for key in (adapter.model_type, *adapter.aliases):
        if key in _REGISTRY and not overwrite:
            raise ValueError(f"an adapter for model_type {key!r} is already registered")
        _REGISTRY[key] = adapter
    return adapter


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain Hugging Face model under PEFT / compile / DDP wrappers."""
    seen = 0
    while seen < 8:
        seen += 1
        if hasattr(model, "get_base_model") and callable(model.get_base_model):
            model = model.get_base_model()
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            break
    return model


def get_adapter(model_or_type: nn.Module | str) -> ArchAdapter:
    if isinstance(model_or_type, str):
        model_type = model_or_type
    else:
        config = getattr(unwrap(model_or_type), "config", None)
        model_type = getattr(config, "model_type", None) or type(model_or_type).__name__
    try:
        return _REGISTRY[model_type]
    except KeyError:
        raise UnknownArchitectureError(
            f"unknown architecture {model_type!r}: lethe has adapters for "
            f"{', '.join(supported_model_types())}. Register a new one in a few lines with "
            "lethe.adapters.register_adapter(ArchAdapter(model_type=..., family='decoder'|'mlm'|'seq2seq', "
            "stacks={'decoder': StackSpec(blocks=..., mlp_in=..., mlp_out=..., attn=...)}, embed=..., "
            "lm_head=...)); see lethe/adapters.py's docstring."
        ) from None


def family_of(model: nn.Module) -> str:
    return get_adapter(model).family


# ---------------------------------------------------------------------------
# The table. Paths follow transformers 5.x module names.
# ---------------------------------------------------------------------------
register_adapter(ArchAdapter(
    model_type="gpt2", family="decoder",
    stacks={"decoder": StackSpec(blocks="transformer.h", mlp_in="mlp.c_fc", mlp_out="mlp.c_proj", attn="attn")},
    embed="transformer.wte", pos_embed="transformer.wpe", final_norm="transformer.ln_f", lm_head="lm_head",
    transposed=True,
))
register_adapter(ArchAdapter(
    model_type="gptj", family="decoder",
    stacks={"decoder": StackSpec(blocks="transformer.h", mlp_in="mlp.fc_in", mlp_out="mlp.fc_out", attn="attn")},
    embed="transformer.wte", final_norm="transformer.ln_f", lm_head="lm_head",
))
register_adapter(ArchAdapter(
    model_type="gpt_neox", family="decoder",
    stacks={"decoder": StackSpec(blocks="gpt_neox.layers", mlp_in="mlp.dense_h_to_4h",
                                 mlp_out="mlp.dense_4h_to_h", attn="attention")},
    embed="gpt_neox.embed_in", final_norm="gpt_neox.final_layer_norm", lm_head="lm_head",
))
register_adapter(ArchAdapter(
    model_type="opt", family="decoder",
    stacks={"decoder": StackSpec(blocks="model.decoder.layers", mlp_in="fc1", mlp_out="fc2", attn="self_attn")},
    embed="model.decoder.embed_tokens", pos_embed="model.decoder.embed_positions",
    final_norm="model.decoder.final_layer_norm", lm_head="lm_head",
))
register_adapter(ArchAdapter(
    model_type="llama", family="decoder",
    stacks={"decoder": StackSpec(blocks="model.layers", mlp_in="mlp.up_proj", mlp_out="mlp.down_proj",
                                 attn="self_attn", mlp_gate="mlp.gate_proj")},
    embed="model.embed_tokens", final_norm="model.norm", lm_head="lm_head",
    aliases=("mistral", "qwen2", "qwen3"),
))
register_adapter(ArchAdapter(
    model_type="bert", family="mlm",
    stacks={"encoder": StackSpec(blocks="bert.encoder.layer", mlp_in="intermediate.dense",
                                 mlp_out="output.dense", attn="attention")},
    embed="bert.embeddings.word_embeddings", pos_embed="bert.embeddings.position_embeddings",
    lm_head="cls.predictions.decoder",
))
register_adapter(ArchAdapter(
    model_type="roberta", family="mlm",
    stacks={"encoder": StackSpec(blocks="roberta.encoder.layer", mlp_in="intermediate.dense",
                                 mlp_out="output.dense", attn="attention")},
    embed="roberta.embeddings.word_embeddings", pos_embed="roberta.embeddings.position_embeddings",
    lm_head="lm_head.decoder",
))
register_adapter(ArchAdapter(
    model_type="distilbert", family="mlm",
    stacks={"encoder": StackSpec(blocks="distilbert.transformer.layer", mlp_in="ffn.lin1",
                                 mlp_out="ffn.lin2", attn="attention")},
    embed="distilbert.embeddings.word_embeddings", pos_embed="distilbert.embeddings.position_embeddings",
    lm_head="vocab_projector",
))
register_adapter(ArchAdapter(
    model_type="t5", family="seq2seq",
    stacks={
        "encoder": StackSpec(blocks="encoder.block", mlp_in="layer.1.DenseReluDense.wi",
                             mlp_out="layer.1.DenseReluDense.wo", attn="layer.0.SelfAttention",
                             final_norm="encoder.final_layer_norm"),
        "decoder": StackSpec(blocks="decoder.block", mlp_in="layer.2.DenseReluDense.wi",
                             mlp_out="layer.2.DenseReluDense.wo", attn="layer.0.SelfAttention",
                             final_norm="decoder.final_layer_norm"),
    },
    embed="shared", final_norm="decoder.final_layer_norm", lm_head="lm_head",
))
register_adapter(ArchAdapter(
    model_type="bart", family="seq2seq",
    stacks={
        "encoder": StackSpec(blocks="model.encoder.layers", mlp_in="fc1", mlp_out="fc2", attn="self_attn"),
        "decoder": StackSpec(blocks="model.decoder.layers", mlp_in="fc1", mlp_out="fc2", attn="self_attn"),
    },
    embed="model.shared", final_norm=None, lm_head="lm_head",
))
