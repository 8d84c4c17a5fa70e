"""The metric at each prompt's real last token (conf/metric/), and the normalized patching metric
built on it (0 = corrupted performance, 1 = clean).

Every metric reads a set of answer tokens with weights per prompt (`AnswerWeights`):

    m(x) = sum_k w_k * logit_{t_k}(x)

- `logit_diff`: the prompt's answer pair, weights (+1, -1): logit(correct) - logit(incorrect);
- `favorability`, `prestige` (rated metrics, pipeline/data/ratings.py): every one-token attribute
  of the task with a human rating, weighted by how far below the mean rating it is, so the weights
  sum to 0: m is the weighted mean logit of the low-rated (unfavorable) attributes minus that of
  the high-rated ones; higher means the next token leans unfavorable.
Weights that sum to 0 make m equal sum_k w_k * log p(t_k | x) (the log-sum-exp cancels), and m is
linear in the final-normed residual stream along the direction W_U[:, t] @ w (plus the
unembedding bias): direct logit attribution, the fast patching engine's last-token projection,
attribution patching and the circuit stage read it as that direction. Two metrics that are not
linear read the same tokens and weights: `prob_diff` (sum_k w_k p(t_k)) and `kl_div` (the KL
divergence of the run's next-token distribution from the clean run's, which ignores them).

Direction: the weights are oriented to the AAE side (the logit difference's AAE-side answer has
+1; a rated metric's unfavorable attributes have positive weights); `direction=sae_clean` negates
them, so clean - corrupted is the same number, m(AAE) - m(SAE), in both directions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.errors import PipelineError

# Metrics that are a weighted sum of answer logits (linear in the final-normed residual stream).
LINEAR_METRICS = ("logit_diff", "favorability", "prestige")
# Linear metrics whose weights come from human ratings of the task's attributes (pipeline/data/ratings.py).
RATED_METRICS = ("favorability", "prestige")
METRICS = LINEAR_METRICS + ("prob_diff", "kl_div")


def gather_last(logits: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """[batch, pos, vocab] -> [batch, vocab] at each prompt's real last token (never a pad)."""
    return logits[torch.arange(logits.shape[0], device=logits.device), last.to(logits.device)]


@dataclass(frozen=True)
class AnswerWeights:
    """Each prompt's answer tokens and their weights, [prompts, K] each: the metric of prompt i is
    sum_k weights[i, k] * logit(tokens[i, k]). Rows select prompts (`answers[rows]`), and `repeat`
    stacks copies for runs that evaluate several patches of the same prompts at once."""

    tokens: torch.Tensor  # [n, K] long
    weights: torch.Tensor  # [n, K] float32

    @classmethod
    def pair(cls, tokens: torch.Tensor, sign: float = 1.0) -> "AnswerWeights":
        """The logit difference: tokens [n, 2] (first minus second), times `sign`."""
        tokens = torch.as_tensor(tokens, dtype=torch.long)
        weights = torch.tensor([sign, -sign], dtype=torch.float32).expand(len(tokens), 2).clone()
        return cls(tokens, weights)

    @classmethod
    def shared(cls, tokens, weights, n: int) -> "AnswerWeights":
        """The same tokens and weights for n prompts (a rated metric)."""
        tokens = torch.as_tensor(tokens, dtype=torch.long)[None].expand(n, -1)
        weights = torch.as_tensor(weights, dtype=torch.float32)[None].expand(n, -1)
        return cls(tokens, weights)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, rows) -> "AnswerWeights":
        tokens, weights = self.tokens[rows], self.weights[rows]
        return AnswerWeights(tokens, weights) if tokens.dim() == 2 else AnswerWeights(tokens[None], weights[None])

    def to(self, device) -> "AnswerWeights":
        return AnswerWeights(self.tokens.to(device), self.weights.to(device))

    def repeat(self, copies: int) -> "AnswerWeights":
        """copies x the prompts, copy-major (row c * n + i is prompt i)."""
        return AnswerWeights(self.tokens.repeat(copies, 1), self.weights.repeat(copies, 1))

    def negated(self) -> "AnswerWeights":
        return AnswerWeights(self.tokens, -self.weights)

    def values(self, last_logits: torch.Tensor) -> torch.Tensor:
        """[batch, vocab] logits at each prompt's last token -> [batch] metric, in float32."""
        picked = last_logits.float().gather(-1, self.tokens.to(last_logits.device))
        return (picked * self.weights.to(picked.device)).sum(-1)

    def directions(self, model) -> tuple[torch.Tensor, torch.Tensor]:
        """Residual directions W_U[:, tokens] @ weights [batch, d_model] and the matching
        unembedding-bias term [batch]: the metric of a final-normed residual x is x @ direction + bias."""
        W_U = model.W_U.detach()
        tokens, weights = self.tokens.to(W_U.device), self.weights.to(W_U.device, W_U.dtype)
        direction = torch.einsum("bkd,bk->bd", W_U.T[tokens], weights)
        b_U = getattr(model, "b_U", None)
        bias = (b_U.detach()[tokens] * weights).sum(-1) if b_U is not None else torch.zeros(len(tokens), device=W_U.device)
        return direction, bias.to(direction.dtype)

    def sums_to_zero(self, atol: float = 1e-5) -> bool:
        return bool((self.weights.sum(-1).abs() <= atol).all())


@dataclass(frozen=True)
class Anchors:
    """Mean clean and corrupted metric (the two ends of the patching metric) and each prompt's own
    corrupted metric."""

    clean: float
    corrupted: float
    corrupted_per_prompt: torch.Tensor  # [n_prompts]

    @classmethod
    def from_values(cls, clean: torch.Tensor, corrupted: torch.Tensor) -> "Anchors":
        return cls(float(clean.mean()), float(corrupted.mean()), corrupted.float())

    @property
    def gap(self) -> float:
        return self.clean - self.corrupted

    def effect(self, values: torch.Tensor) -> torch.Tensor:
        """[..., n_prompts] patched metric values -> the change each patch makes, in metric units:
        the value minus that prompt's corrupted value (0 when the patch changes nothing)."""
        return values - self.corrupted_per_prompt

    def normalize(self, ld: torch.Tensor) -> torch.Tensor:
        """[..., n_prompts] patched metric values -> (m - that prompt's corrupted value) /
        (clean mean - corrupted mean). Over all prompts the mean equals the notebook's metric,
        (mean m - corrupted mean) / (clean mean - corrupted mean); over the prompts that have a
        role it is still 0 when the patch changes nothing, whichever prompts those are."""
        return (ld - self.corrupted_per_prompt) / (self.clean - self.corrupted)


def prob_diff(last_logits: torch.Tensor, answers: AnswerWeights) -> torch.Tensor:
    """[batch] sum_k w_k p(t_k): p(correct) - p(incorrect) for an answer pair."""
    probs = last_logits.float().softmax(-1).gather(-1, answers.tokens.to(last_logits.device))
    return (probs * answers.weights.to(probs.device)).sum(-1)


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


def metric_values(name: str, last_logits: torch.Tensor, answers: AnswerWeights,
                  clean_last_logits: torch.Tensor | None = None) -> torch.Tensor:
    """[batch] value of the named metric (conf/metric/) from last-token logits."""
    if name in LINEAR_METRICS:
        return answers.values(last_logits)
    if name == "prob_diff":
        return prob_diff(last_logits, answers)
    if name == "kl_div":
        if clean_last_logits is None:
            raise ValueError("kl_div needs the clean run's last-token logits")
        return kl_div(last_logits, clean_last_logits)
    raise PipelineError(f"metric={name!r} is not one of {', '.join(METRICS)}")
