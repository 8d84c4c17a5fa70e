"""The metric at each prompt's real last token (conf/metric/): logit(correct) - logit(incorrect)
(`logit_diff`), p(correct) - p(incorrect) (`prob_diff`), or the KL divergence of the run's next-token
distribution from the clean run's (`kl_div`); and the normalized patching metric built on the logit
difference (0 = corrupted performance, 1 = clean)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.errors import PipelineError

METRICS = ("logit_diff", "prob_diff", "kl_div")
# Linear in the final-normed residual stream: the fast patching engine projects on a direction.
LINEAR_METRICS = ("logit_diff",)


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


def prob_diff(last_logits: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    """[batch, vocab], [batch, 2] -> [batch] of p(correct) - p(incorrect)."""
    probs = last_logits.float().softmax(-1).gather(-1, answers.to(last_logits.device))
    return probs[:, 0] - probs[:, 1]


def kl_div(last_logits: torch.Tensor, clean_last_logits: torch.Tensor) -> torch.Tensor:
    """[batch] KL(p_clean || p_run) of the next-token distributions: 0 on the clean run, larger
    the further a run moves away from it."""
    logp = last_logits.float().log_softmax(-1)
    logq = clean_last_logits.float().log_softmax(-1).to(logp.device)
    return (logq.exp() * (logq - logp)).sum(-1)


def check_metric(name: str, allowed=METRICS, where: str = "") -> str:
    """`name` if it is a known metric that `where` can use, else one clear error line."""
    if name not in METRICS:
        raise PipelineError(f"metric={name!r} is not one of {', '.join(METRICS)}")
    if name not in allowed:
        raise PipelineError(f"metric={name}: {where} supports only {', '.join(allowed)}")
    return name


def metric_values(name: str, last_logits: torch.Tensor, answers: torch.Tensor,
                  clean_last_logits: torch.Tensor | None = None) -> torch.Tensor:
    """[batch] value of the named metric (conf/metric/) from last-token logits."""
    if name == "logit_diff":
        return logit_diff(last_logits.float(), answers)
    if name == "prob_diff":
        return prob_diff(last_logits, answers)
    if name == "kl_div":
        if clean_last_logits is None:
            raise ValueError("kl_div needs the clean run's last-token logits")
        return kl_div(last_logits, clean_last_logits)
    raise PipelineError(f"metric={name!r} is not one of {', '.join(METRICS)}")
