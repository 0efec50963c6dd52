"""The CPPO objective, one equation per function (Rezaei et al., arXiv 2601.00501).

Every tensor is ``[batch, response_len]`` unless its docstring says otherwise; ``batch`` counts
responses. ``response_mask`` is True on the valid response tokens (False on padding). Log-probs
are of the *sampled* tokens, from logits divided by the rollout temperature. The three images are
I (clean), I⁺ (information-preserving view) and I⁻ (information-removing view).

Pure tensor functions only: no model, no I/O. ``ALGORITHMS`` says what each algorithm (``grpo``,
``papo``, ``cppo``) adds to the policy loss and which passes it needs; ``policy_objective`` combines them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor

LOG_RATIO_LIMIT = 20.0
K3_LIMIT = 10.0


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Σ M·x / max(Σ M, 1): the token-mean over valid tokens; 0 when there are none.

    ``torch.where`` rather than a product, so that non-finite values on padding never leak in.
    """
    mask = mask.bool()
    total = torch.where(mask, values, torch.zeros_like(values)).sum()
    return total / mask.sum().clamp(min=1)


def response_means(values: Tensor, mask: Tensor) -> Tensor:
    """Σ_t M·x / max(Σ_t M, 1) per response, ``[B]``: each response's mean over its valid tokens."""
    mask = mask.bool()
    total = torch.where(mask, values, torch.zeros_like(values)).sum(-1)
    return total / mask.sum(-1).clamp(min=1)


def logprobs_and_entropy(
    logits: Tensor, token_ids: Tensor, temperature: float = 1.0, suppressed_ids: Sequence[int] = ()
) -> tuple[Tensor, Tensor]:
    """ℓ_t = log softmax(z_t / T)[o_t] and H_t = −Σ_v p_v log p_v, for ``logits`` ``[B, L, V]``.

    ``logits[:, t]`` must be the distribution the token ``token_ids[:, t]`` was drawn from.
    ``suppressed_ids`` are excluded from the softmax, as the rollout backends exclude them when
    sampling (``shared.vlm.suppressed_token_ids``).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    scaled = logits.float() / temperature
    if len(suppressed_ids):
        scaled[..., list(suppressed_ids)] = -math.inf
    log_p = torch.log_softmax(scaled, dim=-1)
    logp = log_p.gather(-1, token_ids.long().unsqueeze(-1)).squeeze(-1)
    p = log_p.exp()
    # 0 · log 0 is 0 for the suppressed ids, not NaN.
    entropy = -torch.where(p > 0, p * log_p, torch.zeros_like(p)).sum(-1)
    return logp, entropy


def grpo_advantages(rewards: Tensor, eps: float = 1e-6) -> Tensor:
    """Â_i = (r_i − mean_group r) / (std_group r + ε), for ``rewards`` ``[num_groups, group_size]``.

    std is the sample standard deviation (unbiased, as ``torch.std``), as in verl and OpenRLHF.
    A group whose rewards are all equal gets advantages of exactly 0.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [num_groups, group_size], got shape {tuple(rewards.shape)}")
    if rewards.shape[1] < 2:
        raise ValueError("GRPO needs at least 2 responses per group (the std of one reward is undefined)")
    rewards = rewards.float()
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True)
    return (rewards - mean) / (std + eps)


def _per_token(advantages: Tensor, like: Tensor) -> Tensor:
    """Broadcast per-response advantages ``[B]`` to tokens ``[B, T]``; ``[B, T]`` passes through."""
    return advantages.unsqueeze(-1).expand_as(like) if advantages.dim() == 1 else advantages


def clipped_policy_loss(
    logp: Tensor,
    logp_old: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip: float | None = None,
) -> tuple[Tensor, Tensor]:
    """L_policy = token-mean of −min(ρ_t Â, clip(ρ_t, 1−ε_low, 1+ε_high) Â), ρ_t = exp(ℓ_t − ℓ_old,t).

    With ``dual_clip`` = c (> 1), a token with Â < 0 loses at most −c·Â (Ye et al., 2020).
    The log-ratio is clamped to ±20 so that one wild token cannot overflow exp.
    ``advantages`` is ``[B]`` (broadcast to tokens) or ``[B, T]``.
    Returns (loss, clip fraction: the share of valid tokens where the clipped term is the active one).
    """
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    adv = _per_token(advantages, logp)
    ratio = torch.exp(torch.clamp(logp - logp_old, -LOG_RATIO_LIMIT, LOG_RATIO_LIMIT))
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    loss = torch.maximum(unclipped, clipped)
    if dual_clip is not None:
        loss = torch.where(adv < 0, torch.minimum(loss, -adv * dual_clip), loss)
    clip_fraction = masked_mean((clipped > unclipped).float(), response_mask)
    return masked_mean(loss, response_mask), clip_fraction.detach()


def k3_divergence(logp: Tensor, logp_other: Tensor) -> Tensor:
    """D = clamp(e^δ − δ − 1, −10, 10), δ = clamp(ℓ' − ℓ, −20, 20); ℓ the anchor, ℓ' the other view.

    Elementwise. The k3 estimator of KL(anchor ‖ other) on tokens sampled from the anchor: ≥ 0,
    and 0 exactly where the two log-probs agree.
    """
    delta = torch.clamp(logp_other - logp, -LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    return torch.clamp(torch.exp(delta) - delta - 1.0, -K3_LIMIT, K3_LIMIT)


def reference_kl(logp: Tensor, logp_ref: Tensor, response_mask: Tensor) -> Tensor:
    """L_KL = token-mean of k3(ℓ_t, ℓ_ref,t): the k3 estimate of KL(π_θ ‖ π_ref)."""
    return masked_mean(k3_divergence(logp, logp_ref), response_mask)


@torch.no_grad()
def perception_token_mask(
    entropy_clean: Tensor,
    entropy_removed: Tensor,
    response_mask: Tensor,
    top_fraction: float = 0.5,
) -> Tensor:
    """M_t: the tokens whose entropy rises most when the image loses its information.

    ΔH_t = H_t(I⁻) − H_t(I);  s_t = ReLU(ΔH_t) / (H_t(I⁻) + 1e-6).
    Candidates: valid tokens with ΔH_t > 0, c_i of them in response i; k_i = max(1, ⌊p·c_i⌋).
    Selected: the candidates whose score is ≥ the k_i-th largest candidate score of their response.
    No candidates → an empty row. Padding is never selected. No gradient.
    """
    if not 0.0 < top_fraction <= 1.0:
        raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}")
    delta_h = entropy_removed.float() - entropy_clean.float()
    score = torch.relu(delta_h) / (entropy_removed.float() + 1e-6)
    candidates = response_mask.bool() & (delta_h > 0)
    count = candidates.sum(dim=-1, keepdim=True)
    k = torch.clamp(torch.floor(top_fraction * count.float()).long(), min=1)
    ranked = torch.where(candidates, score, torch.full_like(score, -math.inf))
    ranked = ranked.sort(dim=-1, descending=True).values
    kth_largest = ranked.gather(-1, k - 1)
    return candidates & (score >= kth_largest)


def gate_by_advantage(mask: Tensor, advantages: Tensor) -> Tensor:
    """M_t ← M_t · 1[Â_i > 0]: only responses that did better than their group keep perception tokens."""
    return mask.bool() & (_per_token(advantages, mask.float()) > 0)


def contrastive_term(
    logp_anchor: Tensor, logp_positive: Tensor, logp_negative: Tensor, tau: float = 0.1
) -> Tensor:
    """CPL_t = softplus((D⁺_t − D⁻_t) / τ), D⁺_t = k3(ℓ_t(I), ℓ_t(I⁺)), D⁻_t = k3(ℓ_t(I), ℓ_t(I⁻)).

    Elementwise. This is InfoNCE with one positive and one negative and similarity −D:
    −log(e^{−D⁺/τ} / (e^{−D⁺/τ} + e^{−D⁻/τ})). Identical views give log 2.
    """
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    d_positive = k3_divergence(logp_anchor, logp_positive)
    d_negative = k3_divergence(logp_anchor, logp_negative)
    return F.softplus((d_positive - d_negative) / tau)


def contrastive_perception_loss(
    logp_anchor: Tensor,
    logp_positive: Tensor,
    logp_negative: Tensor,
    mask: Tensor,
    tau: float = 0.1,
) -> Tensor:
    """L_CPL = Σ M·CPL_t / max(Σ M, 1), CPL_t the ``contrastive_term``.

    It pulls the anchor towards the preserving view and away from the removing one; gradients flow
    through all three log-probs. Identical views give log 2 per selected token; an empty mask gives
    exactly 0.
    """
    return masked_mean(contrastive_term(logp_anchor, logp_positive, logp_negative, tau), mask)


def implicit_perception_loss(logp_clean: Tensor, logp_masked: Tensor, response_mask: Tensor) -> Tensor:
    """PAPO's KL_prcp = token-mean of k3(ℓ_t(I), ℓ_t(I_mask)) (Wang et al., arXiv 2507.06448).

    PAPO *maximises* it, so ``policy_objective`` subtracts γ·KL_prcp from the loss.
    """
    return masked_mean(k3_divergence(logp_clean, logp_masked), response_mask)


def double_entropy_loss(
    logp_clean: Tensor,
    logp_masked: Tensor,
    response_mask: Tensor,
    eta_clean: float = 0.03,
    eta_masked: float = 0.03,
) -> Tensor:
    """PAPO's regulariser η₁·Ĥ(I) + η₂·Ĥ(I_mask), Ĥ = token-mean of −ℓ_t (the sampled-token estimate).

    Minimised, it keeps the policy from "hacking" KL_prcp by making its masked-image outputs
    arbitrarily flat.
    """
    entropy_clean = masked_mean(-logp_clean, response_mask)
    entropy_masked = masked_mean(-logp_masked, response_mask)
    return eta_clean * entropy_clean + eta_masked * entropy_masked


class ObjectiveConfig(BaseModel):
    """Which objective, and its coefficients; the defaults are the CPPO paper's."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    algorithm: str = Field(
        default="cppo", description="grpo, papo (PAPO) or cppo: a name in trainer.objective.ALGORITHMS."
    )
    eps_low: float = Field(default=0.2, ge=0, lt=1, description="Lower PPO clip range ε_low.")
    eps_high: float = Field(default=0.2, ge=0, description="Upper PPO clip range ε_high.")
    dual_clip: float | None = Field(
        default=None, gt=1, description="Dual-clip bound c on negative-advantage ratios; null is off."
    )
    beta: float = Field(default=0.0, ge=0, description="Reference KL coefficient β; 0 loads no reference.")
    cpl_coef: float = Field(
        default=0.01, ge=0, description="CPPO: weight λ of the contrastive perception loss."
    )
    tau: float = Field(default=0.1, gt=0, description="CPPO: temperature τ of the contrastive loss.")
    top_fraction: float = Field(
        default=0.5, gt=0, le=1, description="CPPO: fraction p of response tokens taken as perception tokens."
    )
    papo_gamma: float = Field(
        default=0.02,
        ge=0,
        description="PAPO: weight γ of the implicit perception loss (PAPO's GRPO scripts).",
    )
    papo_eta_clean: float = Field(
        default=0.0,
        ge=0,
        description="PAPO: entropy weight η₁ on the clean image; off as in PAPO's 3B scripts (0.05 for 7B).",
    )
    papo_eta_masked: float = Field(
        default=0.0,
        ge=0,
        description="PAPO: entropy weight η₂ on the masked image; off as in PAPO's 3B scripts (0.05 for 7B).",
    )
    papo_masked_grad: bool = Field(
        default=False,
        description="PAPO: let gradients flow through the masked-image log-probs (by default they do not).",
    )

    @field_validator("algorithm")
    @classmethod
    def _known(cls, algorithm: str) -> str:
        # Checked against the table at validation time, so that an algorithm added to it is accepted.
        if algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {', '.join(ALGORITHMS)}; got {algorithm!r}")
        return algorithm


@dataclass
class ObjectiveInputs:
    """One micro-batch, teacher-forced on the same token ids under each pass's images.

    ``logp[p]`` is ℓ_t and ``entropy[p]`` is H_t under pass ``p``'s images: ``clean`` (I) always, and the
    passes ``ALGORITHMS`` names for the algorithm (``positive`` I⁺, ``negative`` I⁻, ``masked`` I_mask).
    ``logp_old`` is the behaviour policy's (no gradient), ``advantages`` ``[B]`` or ``[B, T]``, and
    ``logp_ref`` the reference policy's, needed when β > 0.
    """

    logp: dict[str, Tensor]
    entropy: dict[str, Tensor]
    logp_old: Tensor
    advantages: Tensor
    response_mask: Tensor
    logp_ref: Tensor | None = None


Term = Callable[[ObjectiveInputs, ObjectiveConfig], tuple[Tensor, dict[str, Tensor]]]
"""What an algorithm adds to L_policy + β·L_KL, and the metrics it reports, detached: scalars, or ``[B]``
per-response means that the trainer averages over the step's tokens, overall and per group."""


def no_term(inputs: ObjectiveInputs, config: ObjectiveConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO: L = L_policy + β·L_KL, nothing more."""
    return torch.zeros((), device=inputs.logp["clean"].device), {}


def papo_term(inputs: ObjectiveInputs, config: ObjectiveConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """PAPO: −γ·KL_prcp + η₁·Ĥ(I) + η₂·Ĥ(I_mask); ℓ(I_mask) without gradient unless ``papo_masked_grad``."""
    logp, logp_masked, mask = inputs.logp["clean"], inputs.logp["masked"], inputs.response_mask
    if not config.papo_masked_grad:
        logp_masked = logp_masked.detach()
    kl_prcp = implicit_perception_loss(logp, logp_masked, mask)
    entropy_reg = double_entropy_loss(logp, logp_masked, mask, config.papo_eta_clean, config.papo_eta_masked)
    term = -config.papo_gamma * kl_prcp + entropy_reg
    return term, {"perception_kl": kl_prcp.detach(), "entropy_loss": entropy_reg.detach()}


@dataclass
class PerceptionTokens:
    """CPPO's quantities per response token, ``[B, T]`` each (no gradient): what ``cppo_term`` trains on,
    and what ``cppo inspect`` shows."""

    entropy_shift: Tensor
    """ΔH_t = H_t(I⁻) − H_t(I)."""
    selected: Tensor
    """M_t, the ``perception_token_mask``."""
    trained: Tensor
    """M_t · 1[Â > 0] (``gate_by_advantage``): the tokens L_CPL averages over."""
    d_positive: Tensor
    """D⁺_t = k3(ℓ_t(I), ℓ_t(I⁺))."""
    d_negative: Tensor
    """D⁻_t = k3(ℓ_t(I), ℓ_t(I⁻))."""
    contrastive: Tensor
    """CPL_t, the ``contrastive_term``."""


def perception_masks(inputs: ObjectiveInputs, config: ObjectiveConfig) -> tuple[Tensor, Tensor]:
    """M_t (``perception_token_mask`` on H(I) and H(I⁻)), and M_t · 1[Â > 0] (``gate_by_advantage``)."""
    entropy, entropy_negative = inputs.entropy["clean"], inputs.entropy["negative"]
    selected = perception_token_mask(entropy, entropy_negative, inputs.response_mask, config.top_fraction)
    return selected, gate_by_advantage(selected, inputs.advantages)


def perception_tokens(inputs: ObjectiveInputs, config: ObjectiveConfig) -> PerceptionTokens:
    """The per-token view of CPPO, from the same functions as its loss."""
    logp = {name: value.detach() for name, value in inputs.logp.items()}
    selected, trained = perception_masks(inputs, config)
    return PerceptionTokens(
        entropy_shift=(inputs.entropy["negative"] - inputs.entropy["clean"]).detach(),
        selected=selected,
        trained=trained,
        d_positive=k3_divergence(logp["clean"], logp["positive"]),
        d_negative=k3_divergence(logp["clean"], logp["negative"]),
        contrastive=contrastive_term(logp["clean"], logp["positive"], logp["negative"], config.tau),
    )


def cppo_term(inputs: ObjectiveInputs, config: ObjectiveConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """CPPO: λ·L_CPL, on the perception tokens of the responses with Â > 0."""
    mask, logp = inputs.response_mask, inputs.logp
    _, perception = perception_masks(inputs, config)
    cpl = contrastive_perception_loss(
        logp["clean"], logp["positive"], logp["negative"], perception, config.tau
    )
    entropy_shift = inputs.entropy["negative"] - inputs.entropy["clean"]
    return config.cpl_coef * cpl, {
        "cpl_loss": cpl.detach(),
        "perception_token_fraction": response_means(perception.float(), mask).detach(),
        "entropy_shift_mean": masked_mean(entropy_shift, mask).detach(),
    }


@dataclass(frozen=True)
class Algorithm:
    """What an algorithm is to the trainer: the images its teacher-forced passes run on (the inputs its
    term reads: ``ObjectiveInputs.logp`` and ``.entropy`` of each), its term, and the metrics it reports.

    Passes: ``clean`` (I) first; ``positive`` (I⁺) and ``negative`` (I⁻) are made by the rollout server,
    ``masked`` (PAPO's I_mask) by the trainer.
    """

    passes: tuple[str, ...]
    term: Term
    metrics: tuple[str, ...]


ALGORITHMS: dict[str, Algorithm] = {
    "grpo": Algorithm(passes=("clean",), term=no_term, metrics=()),
    "papo": Algorithm(passes=("clean", "masked"), term=papo_term, metrics=("perception_kl", "entropy_loss")),
    "cppo": Algorithm(
        passes=("clean", "positive", "negative"),
        term=cppo_term,
        metrics=("cpl_loss", "perception_token_fraction", "entropy_shift_mean"),
    ),
}
"""Every algorithm the trainer runs, by the name ``objective.algorithm`` takes. A new one is an entry here
and its term."""

COMMON_METRICS = ("pg_loss", "clip_fraction", "kl_loss", "loss")
"""What ``policy_objective`` reports for every algorithm (``kl_loss`` when β > 0)."""


def metric_names() -> tuple[str, ...]:
    """Every metric some algorithm reports: each run logs all of them, null where its algorithm has none."""
    return tuple(dict.fromkeys([*COMMON_METRICS, *(m for a in ALGORITHMS.values() for m in a.metrics)]))


def policy_objective(inputs: ObjectiveInputs, config: ObjectiveConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """L = L_policy + β·L_KL + the algorithm's term, and its parts:

    grpo:  L = L_policy + β·L_KL
    papo:  L = L_policy + β·L_KL − γ·KL_prcp + η₁·Ĥ(I) + η₂·Ĥ(I_mask)
    cppo:  L = L_policy + β·L_KL + λ·L_CPL, on the advantage-gated perception tokens

    The metrics are detached scalars, except the per-response ``[B]`` ones a term reports (``Term``).
    """
    algorithm = ALGORITHMS[config.algorithm]
    missing = [p for p in algorithm.passes if p not in inputs.logp or p not in inputs.entropy]
    if missing:
        raise ValueError(f"algorithm {config.algorithm!r} needs the passes {', '.join(missing)}")
    mask = inputs.response_mask.bool()
    logp = inputs.logp["clean"]
    policy_loss, clip_fraction = clipped_policy_loss(
        logp,
        inputs.logp_old,
        inputs.advantages,
        mask,
        eps_low=config.eps_low,
        eps_high=config.eps_high,
        dual_clip=config.dual_clip,
    )
    loss = policy_loss
    metrics = {"pg_loss": policy_loss.detach(), "clip_fraction": clip_fraction}
    if config.beta > 0:
        if inputs.logp_ref is None:
            raise ValueError("beta > 0 needs logp_ref, the reference policy's log-probs")
        kl = reference_kl(logp, inputs.logp_ref, mask)
        loss = loss + config.beta * kl
        metrics["kl_loss"] = kl.detach()
    term, term_metrics = algorithm.term(inputs, config)
    if set(term_metrics) != set(algorithm.metrics):
        raise ValueError(
            f"algorithm {config.algorithm!r} reported {sorted(term_metrics)}, not the metrics "
            f"ALGORITHMS names: {sorted(algorithm.metrics)}"
        )
    loss = loss + term
    metrics |= term_metrics
    metrics["loss"] = loss.detach()
    return loss, metrics
