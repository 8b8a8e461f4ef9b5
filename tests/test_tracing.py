"""Causal tracing: exact restoration when nothing is corrupted, a (layers × tokens) grid per kind in all
three families, the causal structure of a decoder's grid, averaging, pictures, the CLI and bad input."""

from __future__ import annotations

import json

import pytest
import torch

from lethe.adapters import get_adapter
from lethe.testing import save_tiny, tiny_model, tiny_tokenizer
from lethe.tracing import (
    CATEGORIES,
    TracingError,
    average_effects,
    embedding_noise_level,
    plot_average,
    plot_trace,
    suggest_layers,
    token_categories,
    trace_fact,
    window_layers,
)

PROMPT, SUBJECT, TARGET = "w1 w2 {} w5 w6", "w3 w4", "w7"


def tiny(model_type: str):
    torch.manual_seed(0)
    return tiny_model(model_type), tiny_tokenizer(model_type)


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "bert", "t5"])
def test_no_corruption_restores_clean_output_exactly(model_type):
    model, tok = tiny(model_type)
    res = trace_fact(model, tok, PROMPT, SUBJECT, TARGET, noise=0.0, samples=2)
    n_layers = get_adapter(model).num_layers(model)
    assert res.low_score == pytest.approx(res.high_score, abs=1e-6)
    for kind in ("block", "mlp", "attn"):
        grid = res.scores[kind]
        assert grid.shape == (n_layers, len(res.tokens))
        assert torch.allclose(grid, torch.full_like(grid, res.high_score), atol=1e-6)
    # the grid's tokens: the prompt (decoder) / the whole input with the mask (mlm) / the source (seq2seq)
    assert "".join(t.strip() for t in res.tokens[res.subject_range[0]:res.subject_range[1]]) == "w3w4"


def test_decoder_grid_has_the_causal_structure():
    model, tok = tiny("gpt2")
    res = trace_fact(model, tok, PROMPT, SUBJECT, TARGET, noise=10.0, samples=4, kinds=("block",))
    grid = res.scores["block"]
    assert abs(res.high_score - res.low_score) > 1e-6  # the noise does change the output
    s0, _ = res.subject_range
    # tokens before the subject never see the noise: restoring them changes nothing
    assert torch.allclose(grid[:, :s0], torch.full_like(grid[:, :s0], res.low_score), atol=1e-8)
    # restoring the last block's output at the prediction position restores the clean output exactly
    assert grid[-1, res.answer_position].item() == pytest.approx(res.high_score, abs=1e-8)
    # restoring the subject's corrupted states somewhere matters (the grid is not constant)
    assert float((grid - res.low_score).abs().max()) > 1e-6
    cats = token_categories(res)
    assert cats["last subject token"] == [res.subject_range[1] - 1]
    assert cats["prediction position"] == [len(res.tokens) - 1]


def test_seq2seq_noise_hits_the_encoder_only():
    model, tok = tiny("t5")
    res = trace_fact(model, tok, PROMPT, SUBJECT, TARGET, noise=10.0, samples=2, kinds=("block",))
    assert res.stack == "encoder"
    grid = res.scores["block"]
    s0, _ = res.subject_range
    assert grid.shape == (2, len(res.tokens))
    assert res.low_score != pytest.approx(res.high_score, abs=1e-8)
    with pytest.raises(TracingError, match="encoder"):
        trace_fact(model, tok, PROMPT, SUBJECT, TARGET, stack="decoder", samples=1)
    assert s0 == 2


def test_average_suggest_and_pictures(tmp_path):
    model, tok = tiny("gpt2")
    results = [trace_fact(model, tok, PROMPT, s, TARGET, noise=1.0, samples=2, seed=i)
               for i, s in enumerate(["w3 w4", "w9 w10 w11", "w12"])]
    avg = average_effects(results, normalise=False)
    assert set(avg) == {"block", "mlp", "attn"}
    assert avg["mlp"].shape == (2, len(CATEGORIES))
    # the single-token subject has no middle; the 3-token one does, so the column is defined
    assert not torch.isnan(avg["mlp"][:, CATEGORIES.index("middle subject tokens")]).any()
    sug = suggest_layers(avg, "mlp")
    assert sug["rome_layer"] in (0, 1) and sug["memit_layers"][-1] == sug["rome_layer"]
    for path in (plot_trace(results[0], tmp_path / "one.png"), plot_average(avg, tmp_path / "avg.png")):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert window_layers(0, 3, 10) == [0, 1] and window_layers(5, 3, 10) == [4, 5, 6]


def test_suggestion_skips_the_embedding_like_first_mlp_only_in_deep_models():
    last = CATEGORIES.index("last subject token")

    def avg_with(effects):
        g = torch.zeros(len(effects), len(CATEGORIES))
        g[:, last] = torch.tensor(effects)
        return {"mlp": g}

    # 30 layers, window 6: cells 0-3 hold MLP 0 and restore everything; the real peak is at 5
    deep = [1.0, 1.0, 1.0, 1.0, 0.2, 0.25, 0.15, 0.2, 0.1] + [0.02] * 21
    sug = suggest_layers(avg_with(deep), "mlp", window=6)
    assert sug["skipped_layers"] == [0, 1, 2, 3]
    assert sug["rome_layer"] == 5 and sug["memit_layers"] == [4, 5]
    assert suggest_layers(avg_with(deep), "mlp", span=3, window=6)["memit_layers"] == [4, 5]
    # a 4-layer model keeps layer 0 as a candidate
    small = suggest_layers(avg_with([0.9, 0.4, 0.1, 0.0]), "mlp", window=1)
    assert small["skipped_layers"] == [] and small["rome_layer"] == 0


def test_noise_level_is_three_sigma_of_subject_embeddings():
    model, tok = tiny("gpt2")
    ids = tok(" w3 w4", add_special_tokens=False)["input_ids"]
    expect = 3 * float(model.get_input_embeddings().weight[ids].std())
    assert embedding_noise_level(model, tok, ["w3 w4"]) == pytest.approx(expect, rel=1e-5)


def test_bad_input():
    model, tok = tiny("gpt2")
    with pytest.raises(TracingError, match="does not occur"):
        trace_fact(model, tok, "w1 w2 w5", "w3", TARGET)
    with pytest.raises(TracingError, match="unknown kind"):
        trace_fact(model, tok, PROMPT, SUBJECT, TARGET, kinds=("ffn",))
    with pytest.raises(TracingError, match="empty"):
        trace_fact(model, tok, PROMPT, " ", TARGET)
    with pytest.raises(TracingError, match="samples"):
        trace_fact(model, tok, PROMPT, SUBJECT, TARGET, samples=0)


def test_cli_writes_heatmaps_and_json(tmp_path):
    from lethe.trace_cli import main

    save_tiny("gpt2", tmp_path / "m")
    out = tmp_path / "out"
    main(["--model", str(tmp_path / "m"), "--prompt", PROMPT, "--subject", SUBJECT, "--target", TARGET,
          "--out", str(out), "--samples", "2"])
    data = json.loads((out / "trace.json").read_text())
    trace = data["traces"][0]
    assert len(trace["indirect_effect"]["mlp"]) == 2 and len(trace["indirect_effect"]["mlp"][0]) == len(
        trace["tokens"])
    assert (out / "trace_0.png").is_file()
    assert data["summary"]["suggested"]["kind"] == "mlp"
    with pytest.raises(SystemExit, match="kinds"):
        main(["--model", str(tmp_path / "m"), "--prompt", PROMPT, "--subject", SUBJECT, "--out", str(out),
              "--kinds", "ffn"])
