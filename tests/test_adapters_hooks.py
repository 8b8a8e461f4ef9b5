"""Every supported family: adapter finds each block's MLP projections; hooks capture, overwrite, restore."""

import pytest
import torch

from lethe.adapters import (
    ArchAdapter,
    LayerIndexError,
    StackSpec,
    UnknownArchitectureError,
    get_adapter,
    register_adapter,
    supported_model_types,
)
from lethe.hooks import Trace, TraceDict, restore_weights
from lethe.testing import TINY_MODEL_TYPES, tiny_inputs, tiny_model

REQUIRED = {"gpt2", "gptj", "gpt_neox", "opt", "llama", "mistral", "qwen2", "bert", "roberta", "distilbert",
            "t5", "bart"}


def test_every_required_family_has_an_adapter_and_a_tiny_model():
    assert REQUIRED <= set(supported_model_types())
    assert REQUIRED <= set(TINY_MODEL_TYPES)


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_adapter_hooks_capture_overwrite_and_restore(model_type):
    model = tiny_model(model_type)
    adapter = get_adapter(model)
    inputs = tiny_inputs(model)
    with torch.no_grad():
        before = model(**inputs).logits.clone()
    for stack in adapter.stacks:
        n = adapter.num_layers(model, stack)
        assert n == 2
        names_in = [adapter.mlp_in_name(i, stack) for i in range(n)]
        names_out = [adapter.mlp_out_name(i, stack) for i in range(n)]
        ffn = adapter.ffn_width(model, 0, stack)
        # capture inputs and outputs of every MLP projection
        with TraceDict(model, names_in + names_out, retain_input=True, retain_output=True) as td, torch.no_grad():
            model(**inputs)
        for name in names_in:
            w = adapter.weight_out_in(adapter.module(model, name))
            assert w.shape[0] == ffn
            assert td[name].input.shape[-1] == w.shape[1] and td[name].output.shape[-1] == ffn
        for name in names_out:
            w = adapter.weight_out_in(adapter.module(model, name))
            assert td[name].input.shape[-1] == ffn == w.shape[1]
            assert td[name].output.shape[-1] == w.shape[0]
            # the captured output is what the weight computes from the captured input
            x = td[name].input
            bias = getattr(adapter.module(model, name), "bias", None)
            expect = x @ w.T + (0 if bias is None else bias)
            torch.testing.assert_close(td[name].output, expect, rtol=1e-4, atol=1e-5)

        # overwrite one output (scaled, since a constant shift would vanish in a post-LN block): logits change
        with Trace(model, names_out[-1], edit_output=lambda out, layer: out * 3.0 + 0.5), torch.no_grad():
            edited = model(**inputs).logits
        assert not torch.allclose(edited, before)
        # and return bit-identical once the context has exited
        with torch.no_grad():
            after = model(**inputs).logits
        assert torch.equal(after, before)


def test_edit_input_and_stop():
    model = tiny_model("gpt2")
    adapter = get_adapter(model)
    inputs = tiny_inputs(model)
    name = adapter.mlp_out_name(1)
    with Trace(model, name, retain_input=True, edit_input=lambda x, layer: torch.zeros_like(x)) as tr:
        model(**inputs)
    assert torch.count_nonzero(tr.input) == 0
    with Trace(model, adapter.block_name(0), stop=True) as tr:
        model(**inputs)  # StopForward is swallowed by the context
    assert tr.output.shape[:2] == inputs["input_ids"].shape


def test_restore_weights_is_bit_exact():
    model = tiny_model("llama")
    adapter = get_adapter(model)
    name = adapter.mlp_out_name(0) + ".weight"
    original = dict(model.named_parameters())[name].detach().clone()
    with restore_weights(model, [name]):
        with torch.no_grad():
            dict(model.named_parameters())[name].add_(torch.randn_like(original))
        assert not torch.equal(dict(model.named_parameters())[name], original)
    assert torch.equal(dict(model.named_parameters())[name], original)


def test_unknown_architecture_lists_supported_and_how_to_register():
    with pytest.raises(UnknownArchitectureError) as err:
        get_adapter("mamba")
    msg = str(err.value)
    assert "mamba" in msg and "gpt2" in msg and "t5" in msg and "register_adapter" in msg


def test_layer_index_out_of_range():
    model = tiny_model("gpt2")
    adapter = get_adapter(model)
    with pytest.raises(LayerIndexError, match="layer 5 is out of range.*2 blocks"):
        adapter.mlp_out_name(5, model=model)
    assert adapter.check_layer(model, -1) == 1
    with pytest.raises(ValueError, match="no stack 'decoder'"):
        get_adapter(tiny_model("bert")).stack("decoder")


def test_register_new_architecture_in_a_few_lines():
    adapter = register_adapter(ArchAdapter(
        model_type="my_gpt2_clone", family="decoder",
        stacks={"decoder": StackSpec(blocks="transformer.h", mlp_in="mlp.c_fc", mlp_out="mlp.c_proj", attn="attn")},
        embed="transformer.wte", lm_head="lm_head", transposed=True), overwrite=True)
    assert get_adapter("my_gpt2_clone") is adapter
