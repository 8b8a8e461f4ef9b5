"""Edit evaluation shared by every editing method, in both published protocols.

Users are confused when tools mix the two protocols, so every result names its own:

- ``counterfact_scores`` (ROME/MEMIT's CounterFact protocol): P = exp(-mean token NLL);
  efficacy = share of cases with P(new) > P(true) on the rewrite prompt; paraphrase =
  the same comparison averaged over a case's paraphrases, then over cases; neighbourhood =
  share of neighbour prompts where the neighbour's own true object beats ``target_new``
  (averaged per case, then over cases).
- ``token_accuracy_scores`` (zsRE / MEND / EasyEdit): teacher-forced top-1 accuracy over
  the target tokens for efficacy and paraphrase; locality = share of the locality
  prompts' answer tokens whose top-1 prediction is unchanged by the edit, which needs
  the pre-edit predictions (``locality_reference`` on the unedited model).

A neighbour's true object is ``request.neighborhood_targets[i]`` when the request carries
that list, else ``target_true`` (CounterFact's neighbours share the subject's true object).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from lethe import lm
from lethe.records import EditRequest

COUNTERFACT = "counterfact"
TOKEN_ACCURACY = "token_accuracy"


def neighbor_pairs(req: EditRequest) -> list[tuple[str, str]]:
    """(prompt, true object) for each neighbourhood prompt of a request."""
    targets = getattr(req, "neighborhood_targets", None) or []
    if targets and len(targets) != len(req.neighborhood_prompts):
        raise ValueError(f"case {req.case_id}: {len(targets)} neighborhood_targets for "
                         f"{len(req.neighborhood_prompts)} neighborhood_prompts")
    out = []
    for i, p in enumerate(req.neighborhood_prompts):
        true = targets[i] if targets else req.target_true
        if true is None:
            raise ValueError(f"case {req.case_id}: neighbourhood prompts need target_true or neighborhood_targets")
        out.append((p, true))
    return out


def locality_pairs(req: EditRequest) -> list[tuple[str, str]]:
    """(prompt, answer) pairs the edit must leave alone: loc pairs, else the neighbourhood."""
    if req.loc_prompts:
        return list(zip(req.loc_prompts, req.loc_answers))
    return neighbor_pairs(req)


def with_neighbours(req: EditRequest, keep: Sequence[int]) -> EditRequest:
    """A copy of ``req`` with only the neighbourhood prompts (and their targets) at the indices ``keep``."""
    targets = getattr(req, "neighborhood_targets", None) or []
    return dataclasses.replace(req, neighborhood_prompts=[req.neighborhood_prompts[i] for i in keep],
                               **({"neighborhood_targets": [targets[i] for i in keep]} if targets else {}))


def without_edited_neighbours(requests: Sequence[EditRequest], edited_with: Sequence[EditRequest] | None = None
                              ) -> tuple[list[EditRequest], int]:
    """Copies of the requests without the neighbourhood prompts about another EDITED subject (same
    relation): those are meant to change when edits are applied together, so they cannot measure
    bleed. ``edited_with``: every request applied to the model (the whole call or the stream so far;
    default ``requests`` themselves). Returns (requests, number of prompts left out)."""
    edited: dict[str | None, list[str]] = {}
    for r in (requests if edited_with is None else edited_with):
        edited.setdefault(r.relation, []).append(r.subject)
    out, dropped = [], 0
    for r in requests:
        pairs = neighbor_pairs(r)
        keep = [i for i, (p, _) in enumerate(pairs)
                if not any(s != r.subject and s in p for s in edited.get(r.relation, []))]
        dropped += len(pairs) - len(keep)
        out.append(with_neighbours(r, keep))
    return out, dropped


@torch.no_grad()
def known_neighbours_only(model, tok, family: str, requests: Sequence[EditRequest],
                          batch_size: int = 64) -> tuple[list[EditRequest], int]:
    """Copies of the requests keeping only the neighbourhood prompts where the UNEDITED ``model`` prefers
    the neighbour's true object to the request's new target (the CounterFact test, per prompt): a prompt
    the model already gets wrong holds no knowledge an edit could damage. Returns (requests, number of
    prompts left out)."""
    pairs = [(i, j, p, true) for i, r in enumerate(requests) for j, (p, true) in enumerate(neighbor_pairs(r))]
    p_true = _probs(model, tok, family, [(p, t) for _, _, p, t in pairs], batch_size)
    p_new = _probs(model, tok, family, [(p, requests[i].target_new) for i, _, p, _ in pairs], batch_size)
    keep: dict[int, list[int]] = {i: [] for i in range(len(requests))}
    for (i, j, _, _), a, b in zip(pairs, p_true, p_new):
        if a > b:
            keep[i].append(j)
    out = [with_neighbours(r, keep[i]) for i, r in enumerate(requests)]
    return out, len(pairs) - sum(len(v) for v in keep.values())


def _probs(model, tok, family: str, pairs: list[tuple[str, str]], batch_size: int) -> list[float]:
    if not pairs:
        return []
    p = lm.target_probability(model, tok, family, [a for a, _ in pairs], [b for _, b in pairs],
                              batch_size=batch_size)
    return p.tolist()


def _mean(xs: Sequence[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return float(sum(xs) / len(xs)) if xs else None


@torch.no_grad()
def counterfact_scores(model, tok, family: str, requests: Sequence[EditRequest], batch_size: int = 64) -> dict:
    """CounterFact efficacy / paraphrase / neighbourhood of ``model`` on ``requests`` (see module doc)."""
    was_training = model.training
    model.eval()
    pairs: list[tuple[str, str]] = []
    layout: list[dict[str, list[int]]] = []
    for req in requests:
        if req.target_true is None:
            raise ValueError(f"case {req.case_id}: the CounterFact protocol needs target_true")
        idx: dict[str, list[int]] = {"rw": [], "para": [], "nb": []}
        for prompt in [req.rewrite_prompt]:
            idx["rw"] += [len(pairs), len(pairs) + 1]
            pairs += [(prompt, req.target_new), (prompt, req.target_true)]
        for prompt in req.paraphrase_prompts:
            idx["para"] += [len(pairs), len(pairs) + 1]
            pairs += [(prompt, req.target_new), (prompt, req.target_true)]
        for prompt, true in neighbor_pairs(req):
            idx["nb"] += [len(pairs), len(pairs) + 1]
            pairs += [(prompt, req.target_new), (prompt, true)]
        layout.append(idx)
    probs = _probs(model, tok, family, pairs, batch_size)
    eff, para, nb, p_new, p_true = [], [], [], [], []
    for idx in layout:
        a, b = idx["rw"]
        eff.append(float(probs[a] > probs[b]))
        p_new.append(probs[a])
        p_true.append(probs[b])
        wins = [float(probs[i] > probs[j]) for i, j in zip(idx["para"][::2], idx["para"][1::2])]
        para.append(_mean(wins))
        keeps = [float(probs[j] > probs[i]) for i, j in zip(idx["nb"][::2], idx["nb"][1::2])]
        nb.append(_mean(keeps))
    model.train(was_training)
    return {
        "protocol": COUNTERFACT,
        "n": len(requests),
        "efficacy": _mean(eff),
        "paraphrase": _mean(para),
        "neighborhood": _mean(nb),
        "p_new": _mean(p_new),
        "p_true": _mean(p_true),
        "efficacy_per_case": eff,
        "paraphrase_per_case": para,
        "neighborhood_per_case": nb,
    }


@torch.no_grad()
def teacher_forced_predictions(model, tok, family: str, pairs: Sequence[tuple[str, str]],
                               batch_size: int = 64) -> list[tuple[list[int], list[int]]]:
    """For each (prompt, target): (top-1 prediction at each target token, the target token ids)."""
    device = next(model.parameters()).device
    out: list[tuple[list[int], list[int]]] = []
    for s in range(0, len(pairs), batch_size):
        chunk = pairs[s:s + batch_size]
        batch = lm.to_device(lm.encode_pairs(tok, family, [p for p, _ in chunk], [t for _, t in chunk]), device)
        logits = lm.forward_logits(model, batch, family)
        lg, lb = lm.aligned(logits, batch["labels"], family)
        pred = lg.argmax(-1)
        mask = lb != lm.IGNORE
        for i in range(len(chunk)):
            out.append((pred[i][mask[i]].tolist(), lb[i][mask[i]].tolist()))
    return out


def locality_reference(model, tok, family: str, requests: Sequence[EditRequest],
                       batch_size: int = 64) -> list[list[list[int]]]:
    """Pre-edit top-1 predictions on each request's locality pairs; pass to ``token_accuracy_scores``."""
    out = []
    for req in requests:
        pairs = locality_pairs(req)
        out.append([p for p, _ in teacher_forced_predictions(model, tok, family, pairs, batch_size)])
    return out


def token_accuracy(preds: list[tuple[list[int], list[int]]]) -> float | None:
    """Share of target tokens predicted top-1 over ``teacher_forced_predictions`` output (None: no tokens)."""
    total = sum(len(t) for _, t in preds)
    if not total:
        return None
    return sum(sum(int(a == b) for a, b in zip(p, t)) for p, t in preds) / total


def token_accuracy_scores(model, tok, family: str, requests: Sequence[EditRequest],
                          pre_predictions: list[list[list[int]]] | None = None, batch_size: int = 64) -> dict:
    """zsRE-style token accuracy: efficacy_acc, paraphrase_acc and (given pre-edit predictions) locality."""
    was_training = model.training
    model.eval()
    eff, para, loc = [], [], []
    for k, req in enumerate(requests):
        eff.append(token_accuracy(teacher_forced_predictions(
            model, tok, family, [(req.rewrite_prompt, req.target_new)], batch_size)))
        if req.paraphrase_prompts:
            para.append(token_accuracy(teacher_forced_predictions(
                model, tok, family, [(p, req.target_new) for p in req.paraphrase_prompts], batch_size)))
        if pre_predictions is not None:
            pairs = locality_pairs(req)
            now = teacher_forced_predictions(model, tok, family, pairs, batch_size)
            ref = pre_predictions[k]
            if len(ref) != len(now):
                raise ValueError(f"case {req.case_id}: pre-edit predictions cover {len(ref)} locality pairs, "
                                 f"the request has {len(now)}")
            loc.append(token_accuracy([(p, r) for (p, _), r in zip(now, ref)]))
    model.train(was_training)
    return {
        "protocol": TOKEN_ACCURACY,
        "n": len(requests),
        "efficacy_acc": _mean(eff),
        "paraphrase_acc": _mean(para),
        "locality": _mean(loc) if pre_predictions is not None else None,
        "efficacy_acc_per_case": eff,
        "paraphrase_acc_per_case": para,
        "locality_per_case": loc,
    }


def summary(scores: dict) -> dict:
    """The scalar part of a score dict, keys prefixed by the protocol (for loggers)."""
    proto = scores["protocol"]
    return {f"{proto}/{k}": v for k, v in scores.items()
            if k not in ("protocol",) and isinstance(v, (int, float)) and v is not None}


# --------------------------------------------------------------------------- portability (two-hop probes)

# An edit whose object is a country should carry over to what follows from the country: after "Lyon is a city
# in Germany", "The official currency of the country where Lyon is located is the" should say euro -> euro, and
# "The capital of the country where Lyon is located is" Paris -> Berlin. First hop: the edited relation as a phrase
# naming the subject; second hop: another relation of the knowledge base, asked with its own prompt of that phrase.
TWO_HOP_FIRST = {"city_country": "the country where {} is located",
                 "headquarters_country": "the country where {} is headquartered"}
TWO_HOP_SECOND = ("capital", "official_language", "currency")


@dataclasses.dataclass(frozen=True)
class PortabilityProbe:
    """A two-hop question about an edited fact: before the edit its answer is ``old``, after it ``new``."""

    case: int  # index of the request it probes
    hop: str  # the second relation
    prompt: str
    old: str
    new: str


def portability_probes(requests: Sequence[EditRequest], knowledge: Sequence[EditRequest]) -> list[PortabilityProbe]:
    """Two-hop probes of each request whose relation is in ``TWO_HOP_FIRST``, for every relation of
    ``TWO_HOP_SECOND`` that ``knowledge`` (requests whose ``target_true`` are facts: the fact bank) answers for both
    the old and the new object, with different answers. The prompt is the second relation's own prompt (the first
    of its requests in ``knowledge``) asked of the first hop's phrase."""
    facts: dict[tuple[str | None, str], str] = {}
    prompts: dict[str | None, str] = {}
    for k in knowledge:
        if k.target_true is not None:
            facts.setdefault((k.relation, k.subject), k.target_true)
            prompts.setdefault(k.relation, k.prompt)
    out = []
    for i, req in enumerate(requests):
        phrase = TWO_HOP_FIRST.get(req.relation or "")
        if phrase is None or req.target_true is None:
            continue
        for hop in TWO_HOP_SECOND:
            old, new = facts.get((hop, req.target_true)), facts.get((hop, req.target_new))
            if old is None or new is None or old == new or hop not in prompts:
                continue
            prompt = prompts[hop].replace("{}", phrase.replace("{}", req.subject), 1)
            out.append(PortabilityProbe(i, hop, prompt[:1].upper() + prompt[1:], old, new))
    return out


@torch.no_grad()
def portability_scores(model, tok, family: str, probes: Sequence[PortabilityProbe], batch_size: int = 64) -> list[float]:
    """Per probe, 1.0 when the model prefers its ``new`` answer to its ``old`` one (the CounterFact comparison)."""
    was_training = model.training
    model.eval()
    probs = _probs(model, tok, family, [pair for p in probes for pair in ((p.prompt, p.new), (p.prompt, p.old))],
                   batch_size)
    model.train(was_training)
    return [float(a > b) for a, b in zip(probs[::2], probs[1::2])]


def known_portability_probes(model, tok, family: str, probes: Sequence[PortabilityProbe]
                             ) -> tuple[list[PortabilityProbe], int]:
    """The probes the UNEDITED ``model`` answers with the old fact's consequence (a probe it already gets wrong
    cannot show the edit carrying over), and how many were left out."""
    kept = [p for p, moved in zip(probes, portability_scores(model, tok, family, probes)) if moved == 0.0]
    return kept, len(probes) - len(kept)
