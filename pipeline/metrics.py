"""The metric: logit(correct) - logit(incorrect) at each prompt's real last token, and the
normalized patching metric built on it (0 = corrupted performance, 1 = clean)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def gather_last(logits: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """[batch, pos, vocab] -> [batch, vocab] at each prompt's real last token (never a pad)."""
    return logits[torch.arange(logits.shape[0], device=logits.device), last.to(logits.device)]


def logit_diff(last_logits: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    """[batch, vocab], [batch, 2] -> [batch] of correct minus incorrect logit."""
    picked = last_logits.gather(-1, answers.to(last_logits.device))
    return picked[:, 0] - picked[:, 1]


def logit_diff_directions(model, answers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual directions (W_U[:, correct] - W_U[:, incorrect]) [batch, d_model] and the
    matching unembedding-bias difference [batch]: the logit difference of a final-normed
    residual x is x @ direction + bias."""
    W_U = model.W_U
    b_U = model.b_U if getattr(model, "b_U", None) is not None else torch.zeros(W_U.shape[1], device=W_U.device)
    a = answers.to(W_U.device)
    return (W_U[:, a[:, 0]].T - W_U[:, a[:, 1]].T).detach(), (b_U[a[:, 0]] - b_U[a[:, 1]]).detach()


@dataclass(frozen=True)
class Anchors:
    """Mean clean and corrupted logit differences (the two ends of the patching metric) and each
    prompt's own corrupted logit difference."""

    clean: float
    corrupted: float
    corrupted_per_prompt: torch.Tensor  # [n_prompts]

    @classmethod
    def from_logit_diffs(cls, clean: torch.Tensor, corrupted: torch.Tensor) -> "Anchors":
        return cls(float(clean.mean()), float(corrupted.mean()), corrupted.float())

    def normalize(self, ld: torch.Tensor) -> torch.Tensor:
        """[..., n_prompts] patched logit differences -> (ld - that prompt's corrupted value) /
        (clean mean - corrupted mean). Over all prompts the mean equals the notebook's metric,
        (mean ld - corrupted mean) / (clean mean - corrupted mean); over the prompts that have a
        role it is still 0 when the patch changes nothing, whichever prompts those are."""
        return (ld - self.corrupted_per_prompt) / (self.clean - self.corrupted)
