"""The unlearning objectives, each a small function over ``{input_ids, attention_mask, labels}`` batches.

Every function takes already-computed logits / log-likelihoods / activations, so each
can be tested on its own and the LightningModule only decides which forward passes to
run. Conventions follow :mod:`lethe.lm` (labels = -100 outside the target tokens), so
the same loss serves decoders (causal LM), masked LMs (masked positions) and
encoder-decoders (target sequence); for QA records the targets are the answer tokens.

Signs: every function returns a quantity to MINIMISE.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lethe import lm


def gradient_ascent(forget_logits: torch.Tensor, forget_labels: torch.Tensor, family: str) -> torch.Tensor:
    """Jang et al. (2022): maximise the LM loss on the forget sequences, i.e. minimise its negative."""
    return -lm.lm_loss(forget_logits, forget_labels, family)


def retain_nll(retain_logits: torch.Tensor, retain_labels: torch.Tensor, family: str) -> torch.Tensor:
    """Ordinary LM loss on retain data: the descent half of GradDiff."""
    return lm.lm_loss(retain_logits, retain_labels, family)


def grad_diff(forget_logits: torch.Tensor, forget_labels: torch.Tensor, retain_logits: torch.Tensor,
              retain_labels: torch.Tensor, family: str, retain_weight: float = 1.0) -> torch.Tensor:
    """GradDiff: ascent on forget + ``retain_weight`` x descent on retain."""
    return gradient_ascent(forget_logits, forget_labels, family) + retain_weight * retain_nll(
        retain_logits, retain_labels, family)


def kl_to_reference(logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor,
                    family: str) -> torch.Tensor:
    """KL(p_ref || p_theta) averaged over the target positions (what the frozen model would predict there).

    Why forward KL from the reference: it penalises the trained model for dropping
    probability mass the original model put on retain continuations.
    """
    lg, lb = lm.aligned(logits, labels, family)
    rlg, _ = lm.aligned(ref_logits, labels, family)
    mask = lb != lm.IGNORE
    logp = torch.log_softmax(lg[mask].float(), -1)
    ref_logp = torch.log_softmax(rlg[mask].float(), -1)
    if logp.numel() == 0:
        return logits.sum() * 0.0
    return F.kl_div(logp, ref_logp, log_target=True, reduction="batchmean")


def sequence_logprob(logits: torch.Tensor, labels: torch.Tensor, family: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed target-token log-likelihood per example, and the number of target tokens."""
    tok, mask = lm.token_logprobs(logits, labels, family)
    return tok.sum(-1), mask.sum(-1)


def npo(logp: torch.Tensor, ref_logp: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """NPO (Zhang et al. 2024): -(2/beta) E log sigmoid(-beta (log pi_theta(y|x) - log pi_ref(y|x))).

    ``logp``/``ref_logp`` are per-example summed log-likelihoods. At theta = ref the loss
    is (2/beta) log 2 and its gradient is half gradient ascent's; it flattens as the
    forget likelihood falls below the reference's, which is what keeps NPO from collapsing.
    """
    return -(2.0 / beta) * F.logsigmoid(-beta * (logp - ref_logp)).mean()


def simnpo(logp: torch.Tensor, n_tokens: torch.Tensor, beta: float = 2.5, gamma: float = 0.0) -> torch.Tensor:
    """SimNPO (Fan et al. 2024): NPO without a reference, length-normalised, with a margin gamma.

    -(2/beta) E log sigmoid(-(beta/|y|) log pi_theta(y|x) - gamma).
    """
    norm = logp / n_tokens.clamp(min=1).to(logp.dtype)
    return -(2.0 / beta) * F.logsigmoid(-beta * norm - gamma).mean()


def masked_mean_sq(diff: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the masked positions of the mean squared entry (RMU's MSE over tokens)."""
    m = mask.to(diff.dtype).unsqueeze(-1)
    return ((diff.float() ** 2) * m).sum() / (m.sum().clamp(min=1) * diff.shape[-1])


def rmu_forget(hidden: torch.Tensor, mask: torch.Tensor, control: torch.Tensor) -> torch.Tensor:
    """RMU forget term: push the layer's activations on forget tokens to the scaled random vector c*u."""
    return masked_mean_sq(hidden - control.to(hidden.dtype), mask)


def rmu_retain(hidden: torch.Tensor, ref_hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """RMU retain term: keep the layer's activations on retain tokens equal to the frozen model's."""
    return masked_mean_sq(hidden - ref_hidden.to(hidden.dtype), mask)


def random_unit_vector(dim: int, seed: int) -> torch.Tensor:
    """RMU's fixed direction u: uniform in [0,1)^d, normalised (as in Li et al. 2024), reproducible by seed."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(dim, generator=g)
    return u / u.norm()
