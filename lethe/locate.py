"""Where a subject sits in a prompt: the one locator that ROME, MEMIT, causal tracing and the tests share.

A prompt names its subject with one ``{}`` (CounterFact's convention), or, for causal tracing of free
text, holds it literally. ``fill`` gives the filled text and the subject's character span;
``subject_tokens`` turns that span into token indices with the tokenizer's own offsets, so a BPE
token that straddles the subject's edge (" Paris," or "Franc"+"e") is still found.
"""

from __future__ import annotations


class SubjectNotFoundError(ValueError):
    """A subject that is empty, missing from its prompt, or not covered by any token."""


def fill(prompt: str, subject: str, prefix: str = "", case: object = None) -> tuple[str, int, int]:
    """``prefix`` + the prompt with the subject filled in, and the subject's character span in that text.

    A prompt without ``{}`` must contain the subject literally (its first occurrence is used).
    """
    where = f"case {case}: " if case is not None else ""
    if not subject or not subject.strip():
        raise SubjectNotFoundError(f"{where}the subject is empty")
    if "{}" in prompt:
        if prompt.count("{}") != 1:
            raise SubjectNotFoundError(f"{where}prompt {prompt!r} must hold exactly one '{{}}' for the subject")
        at = prompt.index("{}")
        text = prefix + prompt[:at] + subject + prompt[at + 2:]
    else:
        at = prompt.find(subject)
        if at < 0:
            raise SubjectNotFoundError(
                f"{where}subject {subject!r} does not occur in prompt {prompt!r} (and the prompt has no '{{}}')")
        text = prefix + prompt
    return text, len(prefix) + at, len(prefix) + at + len(subject)


def subject_tokens(tok, text: str, start: int, end: int, lead: int = 0, case: object = None) -> tuple[int, int]:
    """[first, last+1) indices of the tokens covering characters [start, end) of ``text``, offset by ``lead``
    (the special tokens the tokenizer puts in front: BOS / CLS)."""
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    hits = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < end and b > start and b > a]
    if not hits:
        where = f"case {case}: " if case is not None else ""
        raise SubjectNotFoundError(f"{where}subject {text[start:end]!r} is not found in the tokens of prompt {text!r}")
    return lead + hits[0], lead + hits[-1] + 1


def subject_last_index(tok, text: str, start: int, end: int, case: object = None) -> int:
    """Index (among the text's tokens, no specials) of the token holding the subject's last character."""
    return subject_tokens(tok, text, start, end, 0, case)[1] - 1
