"""Word-level tokenizers for the synthetic world, one per model family, built offline.

Why word-level: every subject word and every object of :mod:`lethe.world` becomes exactly
one token, so "the object's probability" is one softmax entry for decoder, masked and
encoder-decoder models alike, and a masked LM can be scored with a single ``[MASK]``.

Conventions:

* pre-tokenisation splits on whitespace and isolates each punctuation character, so
  ``" Velmora"`` (with the leading space BPE callers add to targets) encodes exactly as
  ``"Velmora"``;
* ids are deterministic: the style's special tokens first, then the sorted vocabulary
  (for ``t5`` the ``<extra_id_N>`` sentinels come last, ``<extra_id_0>`` highest, as in T5);
* decoding joins tokens with single spaces, so ``decode(encode(text)) == text`` for any
  text whose punctuation is space-separated (all of the world's texts are);
* ``gpt2`` adds no special tokens when encoding (no BOS in target ids); ``bert`` wraps in
  ``[CLS] ... [SEP]``; ``t5`` appends ``</s>``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

    from lethe.world import World

__all__ = ["STYLES", "build_world_tokenizer", "pre_tokenizer", "world_words"]

STYLES = ("gpt2", "bert", "t5")
N_T5_SENTINELS = 10


def pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """Whitespace split, then every punctuation character on its own."""
    return pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")])


def world_words(world_or_texts: World | Iterable[str]) -> list[str]:
    """The sorted set of pre-tokens of a world's texts (or of the given texts/words)."""
    texts = world_or_texts.all_texts() if hasattr(world_or_texts, "all_texts") else world_or_texts
    if isinstance(texts, str):
        raise TypeError("pass a World or an iterable of texts, not a single string")
    pre = pre_tokenizer()
    words: set[str] = set()
    for text in texts:
        words.update(piece for piece, _ in pre.pre_tokenize_str(text))
    return sorted(words)


def _specials(style: str) -> tuple[list[str], list[str], dict[str, str]]:
    """(tokens before the vocabulary, tokens after it, the HF special-token kwargs)."""
    if style == "gpt2":
        eot = "<|endoftext|>"
        return [eot], [], {"bos_token": eot, "eos_token": eot, "pad_token": eot, "unk_token": eot}
    if style == "bert":
        head = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        kwargs = {
            "pad_token": "[PAD]",
            "unk_token": "[UNK]",
            "cls_token": "[CLS]",
            "sep_token": "[SEP]",
            "mask_token": "[MASK]",
        }
        return head, [], kwargs
    if style == "t5":
        tail = [f"<extra_id_{i}>" for i in reversed(range(N_T5_SENTINELS))]
        return (
            ["<pad>", "</s>", "<unk>"],
            tail,
            {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"},
        )
    raise ValueError(f"unknown tokenizer style {style!r}; expected one of {', '.join(STYLES)}")


def build_world_tokenizer(
    world_or_words: World | Iterable[str],
    style: str = "gpt2",
    model_max_length: int = 512,
) -> PreTrainedTokenizerFast:
    """A ``PreTrainedTokenizerFast`` (WordLevel) over the world's vocabulary in ``style``.

    ``world_or_words`` is a :class:`~lethe.world.World` or any iterable of texts or words.
    ``save_pretrained`` / ``AutoTokenizer.from_pretrained(dir)`` round-trip offline.
    """
    from transformers import PreTrainedTokenizerFast

    head, tail, special_kwargs = _specials(style)
    specials = set(head) | set(tail)
    words = [w for w in world_words(world_or_words) if w not in specials]
    vocab = {tok: i for i, tok in enumerate([*head, *words, *tail])}

    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=special_kwargs["unk_token"]))
    tok.pre_tokenizer = pre_tokenizer()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.add_special_tokens([*head, *tail])
    if style == "bert":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
        )
    elif style == "t5":
        tok.post_processor = processors.TemplateProcessing(
            single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", vocab["</s>"])]
        )
    else:
        tok.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B", special_tokens=[])

    extra: dict = {}
    if style == "t5":
        extra["extra_special_tokens"] = list(reversed(tail))
    input_names = (
        ["input_ids", "token_type_ids", "attention_mask"]
        if style == "bert"
        else ["input_ids", "attention_mask"]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        model_max_length=model_max_length,
        model_input_names=input_names,
        clean_up_tokenization_spaces=False,
        **special_kwargs,
        **extra,
    )
