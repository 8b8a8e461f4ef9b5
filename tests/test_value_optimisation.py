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


def test_bf16_autocast_gives_a_delta_close_to_float32s_and_memit_writes_float32_targets():
    lm_ = loaded("llama")
    reqs = requests(2)
    ref = run(lm_, reqs)
    with autocast("bf16-mixed"):
        low = run(lm_, reqs)
    assert low["delta"].dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(low["delta"], ref["delta"], dim=-1)
    assert bool((cos > 0.97).all()), cos
    # MEMIT under bf16: z is the float32 unedited output plus δ, so the first layer's residual is δ exactly
    ed = MEMITEditor(hparams(layers=[0]), progress=False)
    with autocast("bf16-mixed"):
        art = ed.edit(lm_, reqs)
    u = art.factors[lm_.adapter.mlp_out_name(0) + ".weight"]["u"]
    cos = torch.nn.functional.cosine_similarity(u.float(), ref["delta"], dim=-1)
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


def reference_value_loop(model, tok, req, module_name: str, hp, prefixes) -> tuple[int, torch.Tensor]:
    """The reference code's v* loop (kmeng01/rome compute_v), written here independently of lethe's: a full forward
    every step, δ added at every row's edit position, the KL read at the KL prompts' edit position, the loss
    NLL + KL + weight decay, ``break`` once that loss is below 0.05 or on the last iteration before stepping.
    Returns (loss evaluations, δ)."""
    from lethe import lm
    from lethe.hooks import Trace
    from lethe.locate_edit import edit_positions, encode_at_subject

    rows = [(p, req.prompt, req.subject, req.target_new) for p in prefixes]
    rows += [("", kp, req.subject, req.target_new) for kp in hp.kl_prompts]
    batch, pos = encode_at_subject(tok, "decoder", rows)
    pos = torch.tensor(edit_positions(batch, pos, "decoder", hp.position))
    n_kl, idx = len(hp.kl_prompts), torch.arange(len(rows))
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.no_grad(), Trace(model, module_name) as tr:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    v0 = tr.output[idx[:-n_kl], pos[:-n_kl]].mean(0)
    kl_init = torch.log_softmax(logits[idx[-n_kl:], pos[-n_kl:]], -1)
    delta = torch.zeros_like(v0, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hp.v_lr)

    def add(x, _):
        x = x.clone()
        x[idx, pos] = x[idx, pos] + delta
        return x

    for it in range(hp.v_steps):
        with Trace(model, module_name, retain_output=False, edit_output=add):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        lp = torch.log_softmax(logits[:-n_kl, :-1], -1)
        lab = batch["labels"][:-n_kl, 1:]
        m = lab != lm.IGNORE
        tok_lp = lp.gather(-1, lab.clamp(min=0).unsqueeze(-1)).squeeze(-1) * m
        nll = (-tok_lp.sum(1) / m.sum(1)).mean()
        new = torch.log_softmax(logits[idx[-n_kl:], pos[-n_kl:]], -1)
        kl = hp.kl_factor * (new.exp() * (new - kl_init)).sum(-1).mean()
        loss = nll + kl + hp.v_weight_decay * delta.norm() / v0.norm() ** 2
        if loss < hp.early_stop_loss or it == hp.v_steps - 1:
            return it + 1, delta.detach()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            max_norm = hp.clamp_norm_factor * v0.norm()
            if delta.norm() > max_norm:
                delta.mul_(max_norm / delta.norm())
    raise AssertionError("unreachable")


def test_protocol_reference_stops_where_the_reference_rule_does():
    """ROME with ``protocol: reference`` on the world decoder (its preset, three world facts): the same number of
    loss evaluations as the reference's stopping rule, and the same δ; lethe's own rule stops elsewhere."""
    from lethe.models import load_model
    from lethe.presets import editor_preset
    from lethe.sources import load_requests

    world = load_model("lethe:world-decoder")
    _, hp = editor_preset("rome", "lethe:world-decoder", None)
    reqs = load_requests("world:train")[:3]
    name = world.adapter.mlp_out_name(hp["layer"])
    differs = False
    for req in reqs:
        ed = ROMEEditor(hp, progress=False, overrides={"protocol": "reference", "v_steps": 25})
        assert (ed.hp.kl_position, ed.hp.stop_on) == ("edit_position", "total")
        prefixes = ed.prefixes(world)
        out = optimise_values(world.model, world.tokenizer, "decoder", [req], name, ed.hp, prefixes)
        steps, delta = reference_value_loop(world.model, world.tokenizer, req, name, ed.hp, prefixes)
        assert out["steps"][0] == steps
        assert torch.allclose(out["delta"][0], delta, atol=1e-3 * float(delta.norm())), (out["delta"][0] - delta).norm()
        own = ROMEEditor(hp, progress=False, overrides={"v_steps": 25})
        differs |= optimise_values(world.model, world.tokenizer, "decoder", [req], name, own.hp, prefixes)["steps"][0] != steps
    assert differs  # the two rules are not the same rule in disguise


def test_bad_protocol_settings_name_the_field():
    for field, value in (("protocol", "paper"), ("stop_on", "loss"), ("kl_position", "subject")):
        with pytest.raises(ValueError, match=f"hparams.{field}"):
            ROMEEditor({field: value}, progress=False)


def test_weights_changed_in_place_are_read_afresh_under_lethes_autocast():
    """torch's autocast caches each weight's bf16 copy for the rest of its region: an in-place edit would be read
    stale by every later pass. lethe's autocast and ``fresh_weights`` (inside Lightning's region) turn it off."""
    from lethe.precision import fresh_weights

    lin = torch.nn.Linear(8, 8)
    x = torch.randn(2, 8)

    def changes_after_edit() -> bool:
        before = lin(x).detach().clone()
        with torch.no_grad():
            lin.weight.add_(1.0)
        after = lin(x).detach()
        with torch.no_grad():
            lin.weight.sub_(1.0)
        return not torch.allclose(before, after)

    with torch.autocast("cpu", dtype=torch.bfloat16):  # torch's default: the hazard is real
        assert not changes_after_edit()
    with autocast("bf16-mixed"):
        assert changes_after_edit()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # Lightning's step region around an edit
        lin(x)
        with fresh_weights():
            assert changes_after_edit()


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_weights_cast_once_give_bit_identical_bf16_steps_and_are_restored(model_type, monkeypatch):
    """Under bf16 autocast the value optimisation casts each frozen matrix weight once (``cast_frozen_weights``)
    instead of at every matmul: the same bf16 values, so δ and the loss history are identical to the per-use
    casts, and afterwards every module holds its own float32 Parameter again (tied weights still tied)."""
    import contextlib

    lm_ = loaded(model_type)
    params = {n: p for n, p in lm_.model.named_parameters(remove_duplicate=False)}
    reqs = requests(2)
    with autocast("bf16-mixed"):
        once = run(lm_, reqs)
    monkeypatch.setattr(locate_edit, "cast_frozen_weights", lambda _m: contextlib.nullcontext())
    with autocast("bf16-mixed"):
        per_use = run(lm_, reqs)
    assert float(once["delta"].norm()) > 0
    assert torch.equal(once["delta"], per_use["delta"])
    assert once["history"] == per_use["history"]
    after = dict(lm_.model.named_parameters(remove_duplicate=False))
    assert all(after[n] is p and p.dtype == torch.float32 for n, p in params.items())
