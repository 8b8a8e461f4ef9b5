"""MA, EL_n and perplexity: hand-computed values, batched == one-by-one, 1 process == 2 processes."""

from __future__ import annotations

import json
import math

import lightning as L
import pytest
import torch

from lethe import lm
from lethe.metrics import (
    ExtractionLikelihood,
    MemorizationAccuracy,
    Perplexity,
    el_from_continuations,
    extraction_likelihood,
    extraction_prefixes,
    memorisation_scores,
    ngram_overlap,
)
from lethe.testing import save_tiny, tiny_model

IG = lm.IGNORE


def test_ngram_overlap_by_hand():
    assert ngram_overlap([1, 2, 3, 4], [1, 2, 3, 4], 2) == 1.0
    # bigrams of gen: (1,2),(2,9),(9,4) ; true bigrams: (1,2),(2,3),(3,4) -> 1/3
    assert ngram_overlap([1, 2, 9, 4], [1, 2, 3, 4], 2) == pytest.approx(1 / 3)
    assert ngram_overlap([5, 6], [1, 2], 1) == 0.0
    assert ngram_overlap([1], [1, 2], 2) == 0.0  # no n-gram to score


def test_extraction_prefixes_follow_jang_and_short_rule():
    ids = torch.tensor([[0, 11, 12, 13, 14, 15, 99]])  # BOS + 5 target tokens + pad
    att = torch.tensor([[1, 1, 1, 1, 1, 1, 0]])
    lab = torch.tensor([[IG, 11, 12, 13, 14, 15, IG]])
    rows = extraction_prefixes(ids, att, lab, n=2)[0]
    # prefixes x_<t for t with |suffix| >= 2: [BOS], [BOS,11], [BOS,11,12], [BOS,11,12,13]
    assert [p for p, _, _ in rows] == [[0], [0, 11], [0, 11, 12], [0, 11, 12, 13]]
    assert [s for _, s, _ in rows] == [[11, 12, 13, 14, 15], [12, 13, 14, 15], [13, 14, 15], [14, 15]]
    assert {k for _, _, k in rows} == {2}
    short = extraction_prefixes(ids, att, lab, n=10)[0]  # too short for a 10-gram: n_eff = |suffix|
    assert [k for _, _, k in short] == [5, 4, 3, 2, 1]
    # QA: the question is context, prefixes start at the answer
    qa = extraction_prefixes(torch.tensor([[7, 8, 21, 22, 23]]), torch.ones(1, 5, dtype=torch.long),
                             torch.tensor([[IG, IG, 21, 22, 23]]), n=2)[0]
    assert [p for p, _, _ in qa] == [[7, 8], [7, 8, 21]]
    assert len(extraction_prefixes(ids, att, lab, n=1, max_prefixes=2)[0]) == 2


def test_el_by_hand():
    ids = torch.tensor([[0, 11, 12, 13, 14]])
    rows = extraction_prefixes(ids, torch.ones_like(ids), torch.tensor([[IG, 11, 12, 13, 14]]), n=2)
    # continuations for prefixes [0] | [0,11] | [0,11,12]; true suffixes 11 12 13 14 | 12 13 14 | 13 14
    conts = [[11, 12, 13, 99], [12, 13, 14], [5, 6]]
    el = el_from_continuations(rows, conts)
    assert el.tolist() == pytest.approx([(2 / 3 + 1.0 + 0.0) / 3])
    assert math.isnan(el_from_continuations([[]], []).item())


def test_ma_and_perplexity_by_hand():
    vocab = 5
    labels = torch.tensor([[IG, 1, 2, 3], [IG, 4, 4, IG]])
    logits = torch.zeros(2, 4, vocab)
    # decoder: logits at position i predict labels[i+1]
    logits[0, 0, 1] = 5  # right
    logits[0, 1, 0] = 5  # wrong (2)
    logits[0, 2, 3] = 5  # right
    logits[1, 0, 4] = 5  # right
    logits[1, 1, 1] = 5  # wrong
    ma = MemorizationAccuracy()
    ma.update(logits, labels, "decoder")
    assert ma.compute().item() == pytest.approx((2 / 3 + 1 / 2) / 2)
    ppl = Perplexity()
    ppl.update(torch.zeros(2, 4, vocab), labels, "decoder")  # uniform -> perplexity = vocab size
    assert ppl.compute().item() == pytest.approx(vocab)


def _greedy_one(model, prefix: list[int], k: int) -> list[int]:
    ids = torch.tensor([prefix])
    for _ in range(k):
        nxt = model(input_ids=ids).logits[0, -1].argmax()
        ids = torch.cat([ids, nxt.view(1, 1)], 1)
    return ids[0, len(prefix):].tolist()


def test_batched_generate_matches_one_by_one():
    """One left-padded generate for all prefixes == greedy decoding of each prefix alone, unpadded."""
    model = tiny_model("gpt2")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 90, (3, 9), generator=g)
    att = torch.ones_like(ids)
    att[1, 6:] = 0
    att[2, 4:] = 0
    labels = ids.masked_fill(att == 0, IG)
    batch = {"input_ids": ids, "attention_mask": att, "labels": labels}
    got = extraction_likelihood(model, batch, n=2, pad_id=0)
    rows = extraction_prefixes(ids, att, labels, n=2)
    with torch.no_grad():
        conts = [_greedy_one(model, p, len(s)) for seq in rows for p, s, _ in seq]
    want = el_from_continuations(rows, conts)
    assert torch.allclose(got, want)


# ---------------------------------------------------------------------- 1 vs 2 processes


def _texts(k: int, seed: int) -> list[str]:
    import random

    rng = random.Random(seed)
    return [" ".join(f"w{rng.randrange(40)}" for _ in range(rng.randrange(5, 9))) for _ in range(k)]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(save_tiny("gpt2", tmp_path_factory.mktemp("m") / "gpt2"))


def test_metrics_same_on_one_and_two_processes(tiny_dir, tmp_path):
    from callbacks.forgetting import ForgettingTracker
    from callbacks.process_group import CleanDistributedExit
    from datamodules.forget_retain import ForgetRetainDataModule
    from lightning_modules.unlearning import UnlearningModule

    data = {"forget_texts": _texts(5, 0), "retain_texts": _texts(7, 1), "unseen_texts": _texts(3, 2),
            "batch_size": 2, "eval_batch_size": 2}
    # one process, no trainer: the whole of each set
    module = UnlearningModule(tiny_dir, method="ga", lr=0.0)
    dm = ForgetRetainDataModule(**data)
    dm.tokenizer, dm.family = module.tokenizer, "decoder"
    dm.setup()
    single = {name: memorisation_scores(module.model, dm.eval_batches(name), "decoder", 3, 0)
              for name in ("forget", "retain", "unseen")}
    # two processes (gloo, ddp_spawn): each scores its shard, torchmetrics reduces
    tracker = ForgettingTracker(every_n_steps=100, n=3, stop=False, report_dir=str(tmp_path))
    trainer = L.Trainer(strategy="ddp_spawn", devices=2, accelerator="cpu", max_steps=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[tracker, CleanDistributedExit()])
    trainer.fit(UnlearningModule(tiny_dir, method="ga", lr=0.0), ForgetRetainDataModule(**data))
    first = json.loads((tmp_path / "forgetting.json").read_text())["history"][0]
    for name, scores in single.items():
        for key, value in scores.items():
            assert first[f"{name}/{key}"] == pytest.approx(value, rel=1e-5), (name, key)


def test_extraction_metric_rejects_non_decoders():
    with pytest.raises(ValueError, match="decoder"):
        extraction_likelihood(None, {}, 2, 0, family="mlm")
    el = ExtractionLikelihood(2)
    el.update(torch.tensor([0.5, float("nan"), 1.0]))
    assert el.compute().item() == pytest.approx(0.75)


def _token_plus_one_model(vocab: int = 8, eos: int = 7):
    """A GPT-2 whose greedy next token is always (token + 1) mod vocab: one-hot embeddings, no attention or
    MLP contribution, and an LM head that shifts the one-hot by one. Its EOS (vocab - 1) follows token 6."""
    import transformers as tf

    cfg = tf.GPT2Config(vocab_size=vocab, n_embd=vocab, n_layer=1, n_head=1, n_positions=32,
                        tie_word_embeddings=False, eos_token_id=eos, bos_token_id=eos, pad_token_id=0,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = tf.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.transformer.wte.weight.copy_(torch.eye(vocab) * 10)
        for ln in (model.transformer.ln_f, *[b.ln_1 for b in model.transformer.h], *[b.ln_2 for b in model.transformer.h]):
            ln.weight.fill_(1.0)
        model.lm_head.weight.copy_(torch.roll(torch.eye(vocab), 1, dims=0))  # logit j reads coordinate j - 1
    return model


def test_el_on_crafted_models_equals_hand_values_eos_included():
    model = _token_plus_one_model()
    # the token+1 model reproduces 1 2 3 4 5 6 <eos> from any prefix: every n-gram matches, EOS included
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7]])
    labels = torch.tensor([[IG, 2, 3, 4, 5, 6, 7]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    assert extraction_likelihood(model, batch, n=2, pad_id=0).item() == pytest.approx(1.0, abs=1e-6)
    # the EOS-target case: the only target token is EOS and the greedy continuation is EOS
    eos_case = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3, dtype=torch.long),
                "labels": torch.tensor([[IG, IG, 7]])}
    assert extraction_likelihood(model, eos_case, n=2, pad_id=0).item() == pytest.approx(1.0, abs=1e-6)
    # a target the model does not follow: 1 2 4 4 <eos>; by hand with n = 2 over the prefixes whose suffix
    # holds a 2-gram: [1] -> 2 3 4 5 vs 2 4 4 7 (0 of 3), [1 2] -> 3 4 5 vs 4 4 7 (0/2), [1 2 4] -> 5 6 vs 4 7 (0)
    # and the continuation after EOS wraps to token 0: [1 2 4 4] -> 5 vs <eos> is a 1-token suffix (not counted)
    off = {"input_ids": torch.tensor([[1, 2, 4, 4, 7]]), "attention_mask": torch.ones(1, 5, dtype=torch.long),
           "labels": torch.tensor([[IG, 2, 4, 4, 7]])}
    assert extraction_likelihood(model, off, n=2, pad_id=0).item() == pytest.approx(0.0, abs=1e-6)
    # and with n = 1 (unigrams): [1] -> 2 3 4 5 vs {2, 4, 4, 7}: 2 and 4 hit = 2/4; [1 2] -> 3 4 5 vs {4, 4, 7}: 1/3;
    # [1 2 4] -> 5 6 vs {4, 7}: 0; [1 2 4 4] -> 5 vs {7}: 0
    assert extraction_likelihood(model, off, n=1, pad_id=0).item() == pytest.approx((2 / 4 + 1 / 3) / 4, abs=1e-6)


def test_el_prefix_conventions_code_and_paper_on_the_token_plus_one_model():
    """'code' (default) continues every prefix whose suffix holds >= n tokens (Jang et al.'s implementation);
    'paper' takes t = 1..T-n of the paper's sum, suffixes of >= n+1 tokens. Hand values on 1 2 4 4 <eos>."""
    model = _token_plus_one_model()
    off = {"input_ids": torch.tensor([[1, 2, 4, 4, 7]]), "attention_mask": torch.ones(1, 5, dtype=torch.long),
           "labels": torch.tensor([[IG, 2, 4, 4, 7]])}
    # n = 1: code keeps the 1-token suffix ([1 2 4 4] -> 5 vs {7}: 0), paper drops it
    code = extraction_likelihood(model, off, n=1, pad_id=0, convention="code").item()
    paper = extraction_likelihood(model, off, n=1, pad_id=0, convention="paper").item()
    assert code == pytest.approx((2 / 4 + 1 / 3 + 0 + 0) / 4, abs=1e-6)
    assert paper == pytest.approx((2 / 4 + 1 / 3 + 0) / 3, abs=1e-6)
    rows = extraction_prefixes(off["input_ids"], off["attention_mask"], off["labels"], n=2, convention="paper")[0]
    assert [len(s) for _, s, _ in rows] == [4, 3]  # T = 4 target tokens, t = 1..T-n = 1..2
    metric = ExtractionLikelihood(1, convention="paper")
    metric.update(extraction_likelihood(model, off, n=1, pad_id=0, convention="paper"))
    assert metric.compute().item() == pytest.approx(paper, abs=1e-6)
    with pytest.raises(ValueError, match="convention 'jang'"):
        ExtractionLikelihood(2, convention="jang")


@pytest.mark.parametrize("family", ["decoder", "mlm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lm_loss_equals_cross_entropy_in_value_gradient_and_accuracy(family, dtype):
    """lm_loss's chunked cross-entropy (no full float32 copy) == F.cross_entropy on float32 logits: value,
    gradient (chunk boundaries inside the batch, ignored targets) and the teacher-forced top-1 accuracy."""
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(3, 7, 50, generator=g)).to(dtype).requires_grad_(True)
    labels = torch.randint(0, 50, (3, 7), generator=g)
    labels[0, :3] = lm.IGNORE
    labels[2, 5:] = lm.IGNORE
    labels[1, 2] = int(logits[1, 1 if family == "decoder" else 2].argmax())  # at least one correct prediction
    loss, acc = lm.lm_loss(logits, labels, family, with_accuracy=True, chunk=4)
    (grad,) = torch.autograd.grad(loss, logits)
    ref_in = logits.detach().float().requires_grad_(True)
    lg, lb = lm.aligned(ref_in, labels, family)
    ref = torch.nn.functional.cross_entropy(lg.reshape(-1, 50), lb.reshape(-1), ignore_index=lm.IGNORE)
    (ref_grad,) = torch.autograd.grad(ref, ref_in)
    mask = lb != lm.IGNORE
    ref_acc = ((lg.argmax(-1) == lb) & mask).sum() / mask.sum()
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(grad.float(), ref_grad, rtol=tol, atol=tol * float(ref_grad.abs().max()))
    assert float(acc) == pytest.approx(float(ref_acc)) and float(acc) > 0


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_target_logits_skip_the_prompt_columns_without_changing_loss_or_gradient(model_type):
    """forward_target_logits runs the output head from the column before the first target on: the same loss
    and the same parameter gradients as the full logits (prompts of different lengths, right padding)."""
    from lethe.testing import tiny_tokenizer

    model, tok = tiny_model(model_type), tiny_tokenizer(model_type)
    batch = lm.encode_pairs(tok, "decoder", ["w1 w2 w3 w4 w5", "w6 w7", "w8 w9 w10"],
                            [" w11 w12", " w13 w14 w15 w16", " w17"])
    logits, labels = lm.forward_target_logits(model, batch, "decoder")
    assert logits.shape[1] < batch["input_ids"].shape[1]  # the shortest prompt's columns before its answer are cut
    loss = lm.lm_loss(logits, labels, "decoder")
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    ref = lm.lm_loss(lm.forward_logits(model, batch, "decoder"), batch["labels"], "decoder")
    ref_grads = torch.autograd.grad(ref, list(model.parameters()), allow_unused=True)
    torch.testing.assert_close(loss, ref)
    for g, r in zip(grads, ref_grads):
        if r is not None:
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
