"""The value optimisation's fast paths change the work, not the answer: the cached-prefix forward gives the
full forward's δ in every decoder family, a model where the two disagree falls back to the full forward with a
warning, and bf16 autocast keeps the unedited pass (v₀, keys) in float32 while δ stays close to float32's."""

from __future__ import annotations

import random
import warnings

import pytest
import torch

from lethe import locate_edit
from lethe.adapters import get_adapter
from lethe.locate_edit import optimise_values
from lethe.memit import MEMITEditor
from lethe.models import LoadedModel
from lethe.precision import autocast
from lethe.records import EditRequest
from lethe.rome import ROMEEditor
from lethe.testing import tiny_model, tiny_tokenizer

RNG = random.Random(0)
TEXTS = [" ".join(f"w{RNG.randrange(80)}" for _ in range(16)) for _ in range(96)]
DECODERS = ["gpt2", "llama", "gpt_neox", "gptj", "opt", "mistral", "qwen2"]


def loaded(model_type: str) -> LoadedModel:
    torch.manual_seed(0)
    model = tiny_model(model_type)
    adapter = get_adapter(model)
    return LoadedModel(model, tiny_tokenizer(model_type), adapter, adapter.family, f"tiny-{model_type}")


def requests(n: int) -> list[EditRequest]:
    return [EditRequest(prompt="w1 w2 {} w3 w4", subject=f"w{5 + i} w{40 + i}", target_new=f"w{10 + i} w{20 + i}",
                        target_true="w11", case_id=i) for i in range(n)]


def hparams(**over) -> dict:
    hp = {"layers": [0, 1], "mom2_corpus": TEXTS, "mom2_n_samples": 96, "context_templates": [[3, 6]],
          "context_source": "corpus", "v_steps": 6, "mom2_update_weight": 3.0, "early_stop_loss": 0.0}
    hp.update(over)
    return hp


def run(lm_, reqs, **over):
    ed = MEMITEditor(hparams(**over), progress=False)
    prefixes = ed.prefixes(lm_)
    return optimise_values(lm_.model, lm_.tokenizer, lm_.family, reqs, lm_.adapter.block_name(0), ed.hp, prefixes)


@pytest.mark.parametrize("model_type", DECODERS)
def test_cached_prefix_gives_the_full_forwards_delta(model_type):
    lm_ = loaded(model_type)
    reqs = requests(3)
    full = run(lm_, reqs, reuse_prefix=False)
    fast = run(lm_, reqs, reuse_prefix=True)
    assert fast["reused_prefix"] and not full["reused_prefix"]
    assert float(full["delta"].norm()) > 0
    assert torch.allclose(fast["v_init"], full["v_init"], atol=1e-5)
    assert torch.allclose(fast["delta"], full["delta"], atol=1e-4), (fast["delta"] - full["delta"]).abs().max()
    assert fast["steps"] == full["steps"]
    assert torch.allclose(torch.tensor(fast["history"]), torch.tensor(full["history"]), atol=1e-4)


def test_a_model_whose_cached_forward_disagrees_falls_back_to_the_full_one(monkeypatch):
    lm_ = loaded("llama")
    reqs = requests(2)
    full = run(lm_, reqs, reuse_prefix=False)
    rows = locate_edit._SuffixRows.rows

    def blind(self, sel):  # a model whose cache the new tokens would not see
        inputs, targets, pos = rows(self, sel)
        mask = inputs["attention_mask"].clone()
        mask[:, :self.P] = 0
        return {**inputs, "attention_mask": mask}, targets, pos

    monkeypatch.setattr(locate_edit._SuffixRows, "rows", blind)
    monkeypatch.setattr(locate_edit, "_PREFIX_CHECKED", locate_edit.weakref.WeakSet())
    with pytest.warns(UserWarning, match="every step runs the whole prompt"):
        out = run(lm_, reqs, reuse_prefix=True)
    assert not out["reused_prefix"]
    assert torch.allclose(out["delta"], full["delta"], atol=1e-6)


def test_bf16_autocast_keeps_the_unedited_pass_in_float32_and_delta_close():
    lm_ = loaded("llama")
    reqs = requests(2)
    ref = run(lm_, reqs)
    with autocast("bf16-mixed"):
        low = run(lm_, reqs)
    assert torch.equal(low["v_init"], ref["v_init"])  # computed in full precision whatever surrounds it
    assert low["delta"].dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(low["delta"], ref["delta"], dim=-1)
    assert bool((cos > 0.97).all()), cos


def test_rome_under_bf16_autocast_writes_its_float32_key_exactly():
    """ROME's ΔW k* = δ holds in the float32 weights after an edit made under bf16 autocast: the key and the
    solve stay in full precision."""
    lm_ = loaded("llama")
    ed = ROMEEditor({**{k: v for k, v in hparams().items() if k not in ("layers", "mom2_update_weight")},
                     "layer": 1}, progress=False)
    req = requests(1)[0]
    name = lm_.adapter.mlp_out_name(1)
    w0 = lm_.adapter.weight_out_in(lm_.adapter.module(lm_.model, name)).detach().clone()
    with warnings.catch_warnings(), autocast("bf16-mixed"):
        ed.edit(lm_, [req])
    w1 = lm_.adapter.weight_out_in(lm_.adapter.module(lm_.model, name)).detach()
    assert w1.dtype == torch.float32
    vec = ed.last_vectors[0]
    assert torch.allclose((w1 - w0) @ vec["k_star"], vec["delta"], atol=1e-4 * float(vec["delta"].norm()) + 1e-6)
