"""Family-agnostic language-model plumbing: encode (prompt, target) pairs and score targets.

One convention for all three families, so every method and metric shares it:
a batch has ``input_ids``, ``attention_mask`` and ``labels`` where ``labels``
is -100 everywhere except on the target tokens.

- decoder: ``input_ids = prompt + target`` (right-padded); labels are aligned
  with input_ids (Hugging Face convention; shifting happens in scoring).
- mlm: ``[CLS] prompt [MASK]*n [SEP]``; labels hold the target ids at the masks.
- seq2seq: ``input_ids`` is the prompt (encoder side); ``labels`` the target
  ids (the model builds decoder inputs from labels by shifting right).

Tokenisation traps handled here: a leading space belongs to the target (BPE),
the target never includes BOS, and padding side never changes a score.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

IGNORE = -100


def target_text(target: str, prompt: str = "") -> str:
    """Targets are stored without a leading space; BPE tokenizers need it in front -- unless the (formatted)
    prompt already ends in white space (a chat template's ``assistant\\n``, ``Answer: ``)."""
    return target.strip() if prompt[-1:].isspace() else " " + target.strip()


PROMPT_FORMATS = "'chat' (the tokenizer's chat template, one user turn) or a string holding {prompt}"


def format_prompt(tokenizer, prompt: str, prompt_format: str | None = None) -> str:
    """``prompt`` as the model is asked it: unchanged (``None``), in the tokenizer's chat template as one user
    turn with the assistant's turn opened (``"chat"``), or through a format string holding ``{prompt}``
    (TOFU's own ``"Question: {prompt}\\nAnswer:"``)."""
    if not prompt_format:
        return prompt
    if prompt_format == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise EncodingError("prompt_format 'chat': this tokenizer has no chat template; give a format string "
                                "such as 'Question: {prompt}\\nAnswer:'")
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    if "{prompt}" not in prompt_format:
        raise EncodingError(f"prompt_format={prompt_format!r}: use {PROMPT_FORMATS}")
    return prompt_format.replace("{prompt}", prompt)


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def _bos_prefix(tokenizer) -> list[int]:
    """What the tokenizer puts in front of a text (BOS / CLS), or nothing."""
    with_special = _ids(tokenizer, "a", True)
    plain = _ids(tokenizer, "a", False)
    if not plain:
        return []
    idx = with_special.index(plain[0]) if plain[0] in with_special else 0
    return with_special[:idx]


def _suffix(tokenizer) -> list[int]:
    with_special = _ids(tokenizer, "a", True)
    plain = _ids(tokenizer, "a", False)
    if not plain or plain[-1] not in with_special:
        return []
    idx = len(with_special) - 1 - with_special[::-1].index(plain[-1])
    return with_special[idx + 1:]


class EncodingError(ValueError):
    pass


def encode_pairs(
    tokenizer,
    family: str,
    prompts: Sequence[str],
    targets: Sequence[str],
    max_length: int | None = None,
    add_eos: bool = False,
    prompt_format: str | None = None,
) -> dict[str, torch.Tensor]:
    """Encode prompt/target pairs for scoring or training (see the module docstring); ``prompt_format``
    (:func:`format_prompt`) wraps each prompt, e.g. in the model's chat template."""
    if len(prompts) != len(targets):
        raise EncodingError(f"{len(prompts)} prompts but {len(targets)} targets")
    if not prompts:
        raise EncodingError("no prompts to encode")
    rows_in, rows_lab = [], []
    prefix, suffix = _bos_prefix(tokenizer), _suffix(tokenizer)
    for i, (prompt, target) in enumerate(zip(prompts, targets)):
        prompt = format_prompt(tokenizer, prompt, prompt_format) if prompt else prompt
        tgt = _ids(tokenizer, target_text(target, prompt), False)
        if not tgt:
            raise EncodingError(f"target {target!r} (pair {i}) tokenises to nothing")
        if add_eos and tokenizer.eos_token_id is not None and family != "mlm":
            tgt = tgt + [tokenizer.eos_token_id]
        p = _ids(tokenizer, prompt, False) if prompt else []
        if family == "decoder":
            ids = prefix + p + tgt
            lab = [IGNORE] * (len(prefix) + len(p)) + tgt
        elif family == "mlm":
            mask_id = tokenizer.mask_token_id
            if mask_id is None:
                raise EncodingError("this tokenizer has no mask token; it cannot serve a masked LM")
            ids = prefix + p + [mask_id] * len(tgt) + suffix
            lab = [IGNORE] * (len(prefix) + len(p)) + tgt + [IGNORE] * len(suffix)
        elif family == "seq2seq":
            ids = prefix + p + suffix
            lab = tgt
        else:
            raise EncodingError(f"unknown family {family!r}")
        if max_length is not None and len(ids) > max_length:
            cut = len(ids) - max_length
            if family == "seq2seq" or cut > len(p):
                raise EncodingError(f"pair {i} is {len(ids)} tokens, longer than max_length={max_length}")
            # drop the oldest prompt tokens, keep BOS and the target
            ids = ids[:len(prefix)] + ids[len(prefix) + cut:]
            lab = lab[:len(prefix)] + lab[len(prefix) + cut:]
        rows_in.append(ids)
        rows_lab.append(lab)
    return collate(rows_in, rows_lab, tokenizer.pad_token_id)


def collate(rows_in: list[list[int]], rows_lab: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad rows into a batch; labels are padded with -100 (lengths may differ for seq2seq)."""
    n = max(len(r) for r in rows_in)
    m = max(len(r) for r in rows_lab)
    ids = torch.full((len(rows_in), n), pad_id, dtype=torch.long)
    att = torch.zeros((len(rows_in), n), dtype=torch.long)
    lab = torch.full((len(rows_in), m), IGNORE, dtype=torch.long)
    for i, (a, b) in enumerate(zip(rows_in, rows_lab)):
        ids[i, : len(a)] = torch.tensor(a)
        att[i, : len(a)] = 1
        lab[i, : len(b)] = torch.tensor(b)
    return {"input_ids": ids, "attention_mask": att, "labels": lab}


def encode_texts(
    tokenizer,
    family: str,
    texts: Sequence[str],
    max_length: int | None = None,
    mlm_probability: float = 0.15,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Encode plain documents for language-model training/unlearning in each family.

    decoder: every token is a target. mlm: ``mlm_probability`` of the tokens are
    masked (at least one), deterministically from ``seed``. seq2seq: the first
    half of the words is the source, the second half the target.
    """
    if not texts:
        raise EncodingError("no texts to encode")
    if family == "seq2seq":
        prompts, targets = [], []
        for t in texts:
            words = t.split()
            cut = max(1, len(words) // 2)
            prompts.append(" ".join(words[:cut]))
            targets.append(" ".join(words[cut:]) or words[-1])
        return encode_pairs(tokenizer, family, prompts, targets, max_length=max_length, add_eos=True)
    prefix, suffix = _bos_prefix(tokenizer), _suffix(tokenizer)
    rows_in, rows_lab = [], []
    rng = random.Random(seed)
    for t in texts:
        body = _ids(tokenizer, t, False)
        if max_length is not None:
            body = body[: max(1, max_length - len(prefix) - len(suffix))]
        if family == "decoder":
            ids = prefix + body
            lab = [IGNORE] * len(prefix) + body
        elif family == "mlm":
            k = max(1, round(mlm_probability * len(body)))
            pos = set(rng.sample(range(len(body)), k))
            masked = [tokenizer.mask_token_id if j in pos else tok for j, tok in enumerate(body)]
            ids = prefix + masked + suffix
            lab = [IGNORE] * len(prefix) + [tok if j in pos else IGNORE for j, tok in enumerate(body)] + [
                IGNORE] * len(suffix)
        else:
            raise EncodingError(f"unknown family {family!r}")
        rows_in.append(ids)
        rows_lab.append(lab)
    return collate(rows_in, rows_lab, tokenizer.pad_token_id)


def model_inputs(batch: dict[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    """The keys a Hugging Face forward takes (labels only as decoder inputs for seq2seq)."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if family == "seq2seq":
        if "decoder_input_ids" in batch:
            inputs["decoder_input_ids"] = batch["decoder_input_ids"]
        else:
            inputs["labels"] = batch["labels"]
    return inputs


def aligned(logits: torch.Tensor, labels: torch.Tensor, family: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels aligned position by position (decoders predict the next token)."""
    if family == "decoder":
        return logits[:, :-1], labels[:, 1:]
    return logits, labels


def column_targets(labels: torch.Tensor, family: str) -> torch.Tensor:
    """Per logit column, the label it is scored on (IGNORE where none): decoders predict the next token."""
    if family != "decoder":
        return labels
    return torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE)], 1)


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, family: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-target-token log-probabilities and the mask of target positions."""
    return target_logprobs(*aligned(logits, labels, family))


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``token_logprobs`` for logits already aligned with their targets (IGNORE where a column scores none)."""
    mask = targets != IGNORE
    # normalise at the target positions only: a full-vocabulary fp32 log-softmax over every position of a batch
    # (32 x 100 x 49k for SmolLM2: 630 MB) costs more than the scores need
    sel = logits[mask].float()
    picked = sel.gather(-1, targets[mask].unsqueeze(-1)).squeeze(-1) - torch.logsumexp(sel, dim=-1)
    tok = torch.zeros(mask.shape, dtype=picked.dtype, device=logits.device).masked_scatter(mask, picked)
    return tok, mask


def forward_logits(model, batch: dict[str, torch.Tensor], family: str) -> torch.Tensor:
    return model(**model_inputs(batch, family)).logits


def forward_target_logits(model, batch: dict[str, torch.Tensor], family: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, labels)`` for ``lm_loss``, with a decoder's output head run only from the column before the
    batch's first target token on (``logits_to_keep``): the prompt's columns predict nothing that is scored. For a
    TOFU question and answer on SmolLM2 that is half the head's work, and a bf16 training step ran 15-20% faster.
    Other families, and decoders whose forward lacks ``logits_to_keep``, get every column."""
    labels = batch["labels"]
    if family != "decoder" or not forward_accepts(model, "logits_to_keep"):
        return forward_logits(model, batch, family), labels
    scored = (labels != IGNORE).any(0).nonzero()
    keep = labels.shape[1] - max(int(scored[0]) - 1, 0) if len(scored) else labels.shape[1]
    logits = model(**model_inputs(batch, family), logits_to_keep=keep).logits
    return logits, labels[:, -keep:]


def forward_accepts(model, name: str) -> bool:
    """Whether the (unwrapped) model's forward takes the keyword ``name`` (False where its signature cannot be
    read)."""
    import inspect

    from lethe.adapters import unwrap

    try:
        return name in inspect.signature(unwrap(model).forward).parameters
    except (TypeError, ValueError):
        return False


class PrefixCache:
    """A decoder's keys and values at every layer for the first ``P`` positions of a batch, computed once.

    When a computation changes a decoder only from position ``P`` on (δ added at an edit position, an FFN
    activation scaled at the prediction position), the tokens before ``P`` never see it: attention is causal.
    Their keys and values are computed here once, and each later forward runs only the tokens from ``P`` on.
    A forward appends to the cache it is given, so :meth:`build` makes a fresh one each time;
    ``select(layer, tensor)`` picks or widens each layer's rows (several rows of a batch, or one row repeated).
    """

    def __init__(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 position_ids: torch.Tensor | None, P: int) -> None:
        from transformers import DynamicCache

        from lethe.adapters import unwrap

        self._cache_class, self.config = DynamicCache, unwrap(model).config
        self.arg = self.argument(model)
        self.head_slice = forward_accepts(model, "logits_to_keep")
        extra = {"logits_to_keep": 1} if self.head_slice else {}  # only the cache is wanted, not P × vocabulary
        if position_ids is not None:
            extra["position_ids"] = position_ids[:, :P]
        with torch.no_grad():
            out = model(input_ids=input_ids[:, :P], attention_mask=attention_mask[:, :P], use_cache=True, **extra)
        cache = getattr(out, "cache", None) or out.past_key_values
        self.kv = [(layer.keys, layer.values) for layer in cache.layers]

    @staticmethod
    def argument(model) -> str | None:
        """The keyword the model's forward takes a cache by (None: it takes none)."""
        for name in ("cache", "past_key_values"):
            if forward_accepts(model, name):
                return name
        return None

    def build(self, select=None):
        """A fresh cache object holding ``select(layer, t)`` of each layer's keys and values (all rows: None)."""
        select = select or (lambda _layer, t: t)
        return self._cache_class([(select(i, k), select(i, v)) for i, (k, v) in enumerate(self.kv)],
                                 config=self.config)


def sequence_nll(model, batch: dict[str, torch.Tensor], family: str, reduction: str = "mean") -> torch.Tensor:
    """Per-example NLL of the target tokens: summed ("sum") or averaged over tokens ("mean")."""
    tok, mask = token_logprobs(forward_logits(model, batch, family), batch["labels"], family)
    total = -tok.sum(-1)
    if reduction == "sum":
        return total
    return total / mask.sum(-1).clamp(min=1)


class _TokenCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of rows of logits (N × V, any float dtype) against targets (N; IGNORE: none), with
    the share of targets that are the row's top logit, ``chunk`` rows at a time.

    The value of ``F.cross_entropy(logits.float(), targets)`` (log-softmax in float32), and its gradient in
    the logits' own dtype, without the full-size float32 copies autocast makes (the cast, the stored
    log-softmax, its float32 gradient; on SmolLM2 a batch of 8 × 256 tokens has 100 M logits). The gradient
    softmax(x) - onehot is formed in the logits' dtype except at the target, where p - 1 is taken in float32
    (in bfloat16 a confident p ≈ 1 would cancel to 0)."""

    @staticmethod
    def forward(ctx, logits, targets, chunk: int):
        mask = targets != IGNORE
        safe = targets.clamp(min=0)
        n = mask.sum().clamp(min=1)
        picked_lp = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        correct = torch.zeros((), dtype=torch.float64, device=logits.device)
        for a in range(0, logits.shape[0], chunk):
            x = logits[a:a + chunk]
            t = safe[a:a + chunk, None]
            picked_lp[a:a + chunk] = torch.log_softmax(x, -1, dtype=torch.float32).gather(-1, t).squeeze(-1)
            correct += ((x.gather(-1, t).squeeze(-1) >= x.max(-1).values) & mask[a:a + chunk]).sum(dtype=torch.float64)
        loss = -(picked_lp * mask).sum(dtype=torch.float64) / n
        ctx.save_for_backward(logits, safe, mask, picked_lp)
        ctx.chunk, ctx.n = chunk, n
        acc = (correct / n).float()
        ctx.mark_non_differentiable(acc)
        return loss.float(), acc

    @staticmethod
    def backward(ctx, grad_loss, _grad_acc):
        logits, safe, mask, picked_lp = ctx.saved_tensors
        grad = torch.empty_like(logits)
        scale = mask.float() * (grad_loss.float() / ctx.n)  # per row
        for a in range(0, logits.shape[0], ctx.chunk):
            g = grad[a:a + ctx.chunk]
            torch.softmax(logits[a:a + ctx.chunk], -1, out=g)
            s = scale[a:a + ctx.chunk]
            g.mul_(s[:, None].to(g.dtype))
            rows = torch.arange(g.shape[0], device=g.device)
            g[rows, safe[a:a + ctx.chunk]] = ((picked_lp[a:a + ctx.chunk].exp() - 1.0) * s).to(g.dtype)
        return grad, None, None


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, family: str, with_accuracy: bool = False,
            chunk: int = 64):
    """Mean token cross-entropy over all target tokens in the batch (float32); with ``with_accuracy`` also the
    share of target tokens that are the top prediction (teacher-forced token accuracy), from the same pass.
    ``chunk`` rows at a time: 64 rows of a 49k vocabulary make a 12.6 MB float32 buffer that the C heap reuses
    (above ~32 MB glibc maps fresh pages for every chunk; 512 rows ran the SmolLM2 loss in 0.50-0.58 s, 64 in
    0.26-0.31 s)."""
    labels = column_targets(labels, family)  # decoders: shift the labels, not the (large) logits
    loss, acc = _TokenCrossEntropy.apply(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), chunk)
    return (loss, acc) if with_accuracy else loss


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def target_probability(model, tokenizer, family: str, prompts: Sequence[str], targets: Sequence[str],
                       batch_size: int = 64) -> torch.Tensor:
    """P(target | prompt) = exp(-mean token NLL), CounterFact's probability, for each pair."""
    device = next(model.parameters()).device
    out = []
    for s in range(0, len(prompts), batch_size):
        batch = to_device(encode_pairs(tokenizer, family, prompts[s:s + batch_size], targets[s:s + batch_size]),
                          device)
        out.append(torch.exp(-sequence_nll(model, batch, family)).cpu())
    return torch.cat(out)


@torch.no_grad()
def greedy_match(model, tokenizer, family: str, prompts: Sequence[str], targets: Sequence[str],
                 batch_size: int = 128) -> torch.Tensor:
    """Whether greedy decoding after each prompt reproduces the target's tokens (teacher-forced argmax).

    Teacher-forced argmax equals greedy generation up to the first miss, so "all target tokens
    are the argmax" is exactly "greedy decoding yields the target".
    """
    device = next(model.parameters()).device
    out = []
    for s in range(0, len(prompts), batch_size):
        batch = to_device(encode_pairs(tokenizer, family, prompts[s:s + batch_size], targets[s:s + batch_size]),
                          device)
        lg, lb = aligned(forward_logits(model, batch, family), batch["labels"], family)
        mask = lb != IGNORE
        hit = (lg.argmax(-1) == lb) | ~mask
        out.append(hit.all(-1).cpu())
    return torch.cat(out)
