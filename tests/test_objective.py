"""The CPPO objective against values worked out by hand, and its properties (hypothesis)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.objective import (
    ALGORITHMS,
    Algorithm,
    ObjectiveConfig,
    ObjectiveInputs,
    clipped_policy_loss,
    contrastive_perception_loss,
    double_entropy_loss,
    gate_by_advantage,
    grpo_advantages,
    implicit_perception_loss,
    k3_divergence,
    logprobs_and_entropy,
    masked_mean,
    metric_names,
    perception_token_mask,
    perception_tokens,
    policy_objective,
    reference_kl,
    response_means,
)

LOG2 = math.log(2.0)
LN = math.log


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# --- k3 divergence -------------------------------------------------------------------------------


def test_k3_divergence_by_hand():
    # ℓ = 0, ℓ' = ln 2:      δ = ln 2 = 0.693147, D = 2 − 0.693147 − 1 = 0.306853
    # ℓ = ln .5, ℓ' = ln .25: δ = ln .5 = −0.693147, D = 0.5 + 0.693147 − 1 = 0.193147
    # ℓ = ℓ':                 δ = 0, D = 1 − 0 − 1 = 0
    logp = t([0.0, LN(0.5), -1.3])
    other = t([LN(2.0), LN(0.25), -1.3])
    expected = t([0.306853, 0.193147, 0.0])
    torch.testing.assert_close(k3_divergence(logp, other), expected, atol=1e-6, rtol=0)


def test_k3_divergence_clamps():
    # δ = +50 → clamped to 20: e^20 − 21 ≈ 4.85e8 → D clamped to 10.
    # δ = −50 → clamped to −20: e^−20 + 20 − 1 ≈ 19.0 → D clamped to 10.
    # δ = −5: e^−5 + 5 − 1 = 4.006738 (inside both clamps).
    logp = t([0.0, 0.0, 0.0])
    other = t([50.0, -50.0, -5.0])
    torch.testing.assert_close(k3_divergence(logp, other), t([10.0, 10.0, 4.006738]), atol=1e-5, rtol=0)


@given(st.lists(st.floats(-30, 30), min_size=1, max_size=20), st.lists(st.floats(-30, 30), min_size=1))
def test_k3_divergence_is_non_negative(a, b):
    n = min(len(a), len(b))
    d = k3_divergence(t(a[:n]), t(b[:n]))
    # ≥ 0 in exact arithmetic; float32 rounding of e^δ − δ − 1 near δ = 0 may dip by ~1e-7.
    assert torch.all(d >= -1e-6) and torch.all(d <= 10)


# --- GRPO advantages -----------------------------------------------------------------------------


def test_grpo_advantages_by_hand():
    # Group 1: r = [1, 0, 0, 1]: mean 0.5, unbiased var = 4·0.25/3 = 1/3, std = 0.577350
    #          Â = ±0.5 / (0.577350 + 1e-6) = ±0.866024
    # Group 2: r = [0, 0, 1, 0]: mean 0.25, var = (3·0.0625 + 0.5625)/3 = 0.25, std = 0.5
    #          Â = [−0.25, −0.25, 0.75, −0.25] / 0.500001 = [−0.499999, …, 1.499997, …]
    # Group 3: all equal → Â = 0 exactly.
    rewards = t([[1, 0, 0, 1], [0, 0, 1, 0], [0.7, 0.7, 0.7, 0.7]])
    expected = t(
        [[0.866024, -0.866024, -0.866024, 0.866024], [-0.499999, -0.499999, 1.499997, -0.499999], [0] * 4]
    )
    advantages = grpo_advantages(rewards)
    torch.testing.assert_close(advantages, expected, atol=1e-6, rtol=0)
    assert torch.all(advantages[2] == 0)


def test_grpo_advantages_eps_and_shape_errors():
    # ε enters the denominator: for r = [0, 0, 1, 0] and ε = 0.5, Â_2 = 0.75 / (0.5 + 0.5) = 0.75
    advantages = grpo_advantages(t([[0, 0, 1, 0]]), eps=0.5)
    assert advantages[0, 2].item() == pytest.approx(0.75)
    with pytest.raises(ValueError, match="num_groups, group_size"):
        grpo_advantages(t([1.0, 0.0]))
    with pytest.raises(ValueError, match="at least 2"):
        grpo_advantages(t([[1.0], [0.0]]))


# --- clipped policy loss -------------------------------------------------------------------------


def _policy_case():
    # Row 0 (Â = +1): ρ = 1.5 → −min(1.5, 1.2) = −1.2 (clipped); ρ = 0.5 → −min(0.5, 0.8) = −0.5.
    # Row 1 (Â = −1): ρ = 1.1 → −min(−1.1, −1.1) = 1.1;  ρ = 5 → −min(−5, −1.2) = 5.0 (unclipped).
    # A third, padded column holds garbage (inf) that must not leak in.
    logp_old = t([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    logp = t([[LN(1.5), LN(0.5), math.inf], [LN(1.1), LN(5.0), math.inf]])
    mask = torch.tensor([[True, True, False], [True, True, False]])
    advantages = t([1.0, -1.0])
    return logp, logp_old, advantages, mask


def test_clipped_policy_loss_by_hand():
    logp, logp_old, advantages, mask = _policy_case()
    loss, clip_fraction = clipped_policy_loss(logp, logp_old, advantages, mask)
    # (−1.2 − 0.5 + 1.1 + 5.0) / 4 = 1.1; one of four tokens is clipped.
    assert loss.item() == pytest.approx(1.1, abs=1e-5)
    assert clip_fraction.item() == pytest.approx(0.25)


def test_clipped_policy_loss_dual_clip_and_asymmetric_eps():
    logp, logp_old, advantages, mask = _policy_case()
    loss, _ = clipped_policy_loss(logp, logp_old, advantages, mask, dual_clip=3.0)
    # The ρ = 5 token with Â = −1 is capped at −c·Â = 3: (−1.2 − 0.5 + 1.1 + 3) / 4 = 0.6
    assert loss.item() == pytest.approx(0.6, abs=1e-5)
    # DAPO-style ε_high = 0.28: ρ = 1.5 → −1.28, so (−1.28 − 0.5 + 1.1 + 5) / 4 = 1.08
    loss, _ = clipped_policy_loss(logp, logp_old, advantages, mask, eps_high=0.28)
    assert loss.item() == pytest.approx(1.08, abs=1e-5)
    with pytest.raises(ValueError, match="dual_clip"):
        clipped_policy_loss(logp, logp_old, advantages, mask, dual_clip=0.5)


def test_clipped_policy_loss_gradient_is_the_policy_gradient_at_ratio_one():
    # At ρ = 1 nothing is clipped: ∂L/∂ℓ_t = −Â_i / (number of valid tokens).
    logp = torch.zeros(2, 3, requires_grad=True)
    mask = torch.tensor([[True, True, True], [True, False, False]])
    loss, _ = clipped_policy_loss(logp, torch.zeros(2, 3), t([2.0, -1.0]), mask)
    loss.backward()
    expected = t([[-0.5, -0.5, -0.5], [0.25, 0.0, 0.0]])
    torch.testing.assert_close(logp.grad, expected)


def test_reference_kl_by_hand():
    # k3 values 0.306853 and 0.193147 on the two valid tokens; mean 0.25.
    logp = t([[0.0, LN(0.5), 0.0]])
    logp_ref = t([[LN(2.0), LN(0.25), 99.0]])
    mask = torch.tensor([[True, True, False]])
    assert reference_kl(logp, logp_ref, mask).item() == pytest.approx(0.25, abs=1e-6)


# --- perception-token mask -----------------------------------------------------------------------


def test_perception_token_mask_by_hand():
    # Row 0:  H   = [1.0, 1.0, 2.0, 0.1, 1.0 | pad]
    #         H⁻  = [5.0, 1.5, 1.0, 1.0, 1.0 | 9.0]
    #         ΔH  = [4.0, 0.5, −1.0, 0.9, 0.0]; candidates: 0, 1, 3 → c = 3, k = max(1, ⌊1.5⌋) = 1
    #         s   = [4/5 = 0.8, 0.5/1.5 = 0.333, —, 0.9/1.0 = 0.9, —]
    #         → only token 3 is selected, although token 0 has the larger ΔH (s normalises by H⁻).
    # Row 1:  H = 2 and H⁻ = 4 on four tokens: s = 2/4.000001 on each, a four-way tie; k = 2,
    #         the 2nd largest score equals all of them → all 4 selected (ties are kept, not broken).
    # Row 2:  H⁻ ≤ H everywhere → no candidates → empty.
    # Row 3:  ΔH = [0.1, 0.2, 0.3, 0.4, 0.5] with H⁻ = 1: s = ΔH; c = 5, k = 2 → tokens 3 and 4.
    h_clean = t(
        [
            [1.0, 1.0, 2.0, 0.1, 1.0, 0.0],
            [2.0, 2.0, 2.0, 2.0, 0.0, 0.0],
            [3.0, 3.0, 3.0, 0.0, 0.0, 0.0],
            [0.9, 0.8, 0.7, 0.6, 0.5, 0.0],
        ]
    )
    h_removed = t(
        [
            [5.0, 1.5, 1.0, 1.0, 1.0, 9.0],
            [4.0, 4.0, 4.0, 4.0, 9.0, 9.0],
            [1.0, 2.0, 3.0, 9.0, 9.0, 9.0],
            [1.0, 1.0, 1.0, 1.0, 1.0, 9.0],
        ]
    )
    mask = torch.tensor(
        [
            [1, 1, 1, 1, 1, 0],
            [1, 1, 1, 1, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 1, 0],
        ],
        dtype=torch.bool,
    )
    expected = torch.tensor(
        [
            [0, 0, 0, 1, 0, 0],
            [1, 1, 1, 1, 0, 0],
            [0, 0, 0, 0, 0, 0],
            [0, 0, 0, 1, 1, 0],
        ],
        dtype=torch.bool,
    )
    selected = perception_token_mask(h_clean, h_removed, mask, top_fraction=0.5)
    assert selected.dtype == torch.bool
    assert torch.equal(selected, expected)


def test_perception_token_mask_has_no_gradient_and_checks_fraction():
    h = torch.rand(2, 4, requires_grad=True)
    selected = perception_token_mask(h, h + 1, torch.ones(2, 4, dtype=torch.bool))
    assert not selected.requires_grad
    with pytest.raises(ValueError, match="top_fraction"):
        perception_token_mask(h, h, torch.ones(2, 4, dtype=torch.bool), top_fraction=0.0)


@st.composite
def entropy_rows(draw):
    length = draw(st.integers(1, 12))
    clean = draw(st.lists(st.floats(0, 5), min_size=length, max_size=length))
    # Distinct removed-view entropies keep the scores distinct almost surely; ties are checked by hand.
    removed = draw(st.lists(st.floats(0, 8), min_size=length, max_size=length, unique=True))
    valid = draw(st.lists(st.booleans(), min_size=length, max_size=length))
    fraction = draw(st.sampled_from([0.1, 0.25, 0.5, 0.75, 1.0]))
    return t([clean]), t([removed]), torch.tensor([valid]), fraction


@given(entropy_rows())
@settings(max_examples=200)
def test_perception_token_mask_properties(row):
    h_clean, h_removed, valid, fraction = row
    selected = perception_token_mask(h_clean, h_removed, valid, top_fraction=fraction)
    delta = h_removed - h_clean
    # Never padding, never a token whose entropy did not rise.
    assert not torch.any(selected & ~valid)
    assert not torch.any(selected & (delta <= 0))
    candidates = valid & (delta > 0)
    count = int(candidates.sum())
    scores = (torch.relu(delta) / (h_removed + 1e-6))[candidates]
    if count == 0:
        assert not selected.any()
    elif len(set(scores.tolist())) == count:
        assert int(selected.sum()) == max(1, math.floor(fraction * count))
        # and they are the highest-scoring candidates
        chosen = (torch.relu(delta) / (h_removed + 1e-6))[selected]
        assert chosen.min() >= scores.sort(descending=True).values[int(selected.sum()) - 1]


def test_gate_by_advantage():
    mask = torch.ones(4, 3, dtype=torch.bool)
    gated = gate_by_advantage(mask, t([0.5, 0.0, -1.0, 1e-9]))
    assert gated.tolist() == [[True] * 3, [False] * 3, [False] * 3, [True] * 3]
    # per-token advantages [B, T] work too
    gated = gate_by_advantage(mask[:1], t([[1.0, -1.0, 0.0]]))
    assert gated.tolist() == [[True, False, False]]


@given(st.lists(st.floats(-3, 3, width=32), min_size=1, max_size=16))
def test_gating_drops_every_response_without_positive_advantage(advantages):
    mask = torch.ones(len(advantages), 5, dtype=torch.bool)
    gated = gate_by_advantage(mask, t(advantages))
    for row, advantage in zip(gated, advantages, strict=True):
        assert bool(row.any()) == (advantage > 0)


# --- contrastive perception loss -----------------------------------------------------------------


def test_cpl_by_hand():
    # Token 0: ℓ = ln .5, ℓ⁺ = ln .5 → D⁺ = 0; ℓ⁻ = ln .25 → D⁻ = 0.193147.
    #          CPL = softplus((0 − 0.193147) / 0.1) = ln(1 + e^−1.931472) = ln(1.144938) = 0.135348
    # Token 1: ℓ = 0, ℓ⁺ = ln 2 → D⁺ = 0.306853; ℓ⁻ = ℓ → D⁻ = 0.
    #          CPL = softplus(3.068528) = ln(1 + 21.510945) = 3.113971
    # Token 2: not in the mask.   L = (0.135348 + 3.113971) / 2 = 1.624659
    anchor = t([[LN(0.5), 0.0, -1.0]])
    positive = t([[LN(0.5), LN(2.0), -5.0]])
    negative = t([[LN(0.25), 0.0, 3.0]])
    mask = torch.tensor([[True, True, False]])
    loss = contrastive_perception_loss(anchor, positive, negative, mask, tau=0.1)
    assert loss.item() == pytest.approx(1.624659, abs=1e-5)
    # τ = 1: softplus(−0.193147) = 0.601230, softplus(0.306853) = 0.858298 → mean 0.729764
    loss = contrastive_perception_loss(anchor, positive, negative, mask, tau=1.0)
    assert loss.item() == pytest.approx(0.729764, abs=1e-5)


def test_cpl_of_identical_views_is_log2_per_selected_token():
    logp = torch.randn(3, 7)
    mask = torch.rand(3, 7) > 0.5
    mask[0, 0] = True
    per_token_mask = torch.zeros_like(mask)
    for i, j in mask.nonzero().tolist():
        per_token_mask.zero_()
        per_token_mask[i, j] = True
        assert contrastive_perception_loss(logp, logp, logp, per_token_mask).item() == pytest.approx(LOG2)
    assert contrastive_perception_loss(logp, logp, logp, mask).item() == pytest.approx(LOG2)


def test_cpl_of_an_empty_mask_is_exactly_zero():
    logp = torch.randn(2, 5, requires_grad=True)
    loss = contrastive_perception_loss(logp, logp * 2, logp * 3, torch.zeros(2, 5, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(logp.grad == 0)


def test_cpl_gradients_reach_all_three_views_on_selected_tokens_only():
    anchor = t([[LN(0.5), 0.0, -1.0]]).requires_grad_()
    positive = t([[LN(0.4), LN(2.0), -5.0]]).requires_grad_()
    negative = t([[LN(0.25), -0.3, 3.0]]).requires_grad_()
    mask = torch.tensor([[True, True, False]])
    contrastive_perception_loss(anchor, positive, negative, mask).backward()
    for view in (anchor, positive, negative):
        assert torch.all(view.grad[0, :2] != 0), view
        assert view.grad[0, 2] == 0
    # Token 0: ℓ⁺ = ln .4 < ℓ = ln .5, so ∂D⁺/∂ℓ⁺ = e^δ⁺ − 1 = 0.8 − 1 < 0 and ∂L/∂ℓ⁺ < 0: raising ℓ⁺
    # towards the anchor lowers the loss. ℓ⁻ = ln .25 < ℓ: ∂D⁻/∂ℓ⁻ = 0.5 − 1 < 0 and ∂L/∂D⁻ < 0, so
    # ∂L/∂ℓ⁻ > 0: pushing ℓ⁻ further from the anchor lowers the loss.
    assert positive.grad[0, 0] < 0
    assert negative.grad[0, 0] > 0


def test_cpl_rejects_a_bad_temperature():
    logp = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="tau"):
        contrastive_perception_loss(logp, logp, logp, torch.ones(1, 2, dtype=torch.bool), tau=0)


# --- PAPO baseline -------------------------------------------------------------------------------


def test_papo_terms_by_hand():
    # KL_prcp: k3(0, ln 2) = 0.306853 and k3(ln .5, ln .25) = 0.193147 → mean 0.25.
    # Ĥ(I) = mean(−ℓ) = (0 + 0.693147)/2 = 0.346574; Ĥ(I_mask) = (−0.693147 + 1.386294)/2 = 0.346574
    # η₁·Ĥ(I) + η₂·Ĥ(I_mask) with η = (0.1, 0.2): 0.1·0.346574 + 0.2·0.346574 = 0.103972
    logp = t([[0.0, LN(0.5), 7.0]])
    masked = t([[LN(2.0), LN(0.25), -7.0]])
    mask = torch.tensor([[True, True, False]])
    assert implicit_perception_loss(logp, masked, mask).item() == pytest.approx(0.25, abs=1e-6)
    entropy = double_entropy_loss(logp, masked, mask, eta_clean=0.1, eta_masked=0.2)
    assert entropy.item() == pytest.approx(0.103972, abs=1e-6)


# --- the combined objective ----------------------------------------------------------------------


def _batch(requires_grad: bool = True) -> ObjectiveInputs:
    logp, logp_old, advantages, mask = _policy_case()
    logp = torch.where(mask, logp, torch.zeros_like(logp)).requires_grad_(requires_grad)
    return ObjectiveInputs(
        logp={
            "clean": logp,
            "positive": (logp.detach() - 0.1).requires_grad_(requires_grad),
            "negative": (logp.detach() - 0.7).requires_grad_(requires_grad),
            "masked": (logp.detach() - 0.3).requires_grad_(requires_grad),
        },
        # Row 0 tokens: ΔH = [1, 2] → s = [1/3, 2/3]; c = 2, k = 1 → token 1. Row 1 has Â < 0: gated out.
        entropy={
            "clean": t([[2.0, 1.0, 0.0], [1.0, 1.0, 0.0]]),
            "positive": t([[2.0, 1.0, 0.0], [1.0, 1.0, 0.0]]),
            "negative": t([[3.0, 3.0, 0.0], [2.0, 3.0, 0.0]]),
            "masked": t([[2.5, 1.5, 0.0], [1.5, 1.5, 0.0]]),
        },
        logp_old=logp_old,
        advantages=advantages,
        response_mask=mask,
        logp_ref=logp.detach() + 0.2,
    )


def test_grpo_objective_is_the_policy_loss():
    loss, metrics = policy_objective(_batch(), ObjectiveConfig(algorithm="grpo"))
    assert loss.item() == pytest.approx(1.1, abs=1e-5)
    assert metrics["clip_fraction"].item() == pytest.approx(0.25)
    assert set(metrics) == {"pg_loss", "clip_fraction", "loss"}


def test_cppo_objective_by_hand():
    batch = _batch()
    loss, metrics = policy_objective(batch, ObjectiveConfig(algorithm="cppo", cpl_coef=0.5))
    # Only token (0, 1) is selected. There ℓ⁺ = ℓ − 0.1 and ℓ⁻ = ℓ − 0.7:
    #   D⁺ = e^−0.1 + 0.1 − 1 = 0.004837, D⁻ = e^−0.7 + 0.7 − 1 = 0.196585
    #   CPL = softplus((0.004837 − 0.196585) / 0.1) = softplus(−1.917479) = ln(1.146982) = 0.137130
    # L = 1.1 + 0.5 · 0.137130 = 1.168565; 1 of 4 valid tokens selected.
    assert metrics["cpl_loss"].item() == pytest.approx(0.137130, abs=1e-5)
    assert loss.item() == pytest.approx(1.168565, abs=1e-5)
    # Per response: row 0 has 1 of its 2 valid tokens selected, row 1 none (gated by Â < 0).
    assert metrics["perception_token_fraction"].tolist() == pytest.approx([0.5, 0.0])
    # mean ΔH over the valid tokens: (1 + 2 + 1 + 2) / 4 = 1.5
    assert metrics["entropy_shift_mean"].item() == pytest.approx(1.5)
    loss.backward()
    for name in ("clean", "positive", "negative"):
        assert batch.logp[name].grad[0, 1] != 0


def test_perception_tokens_are_what_the_cppo_loss_averages():
    batch = _batch()
    config = ObjectiveConfig(algorithm="cppo")
    tokens = perception_tokens(batch, config)
    # Both rows select token 1 (row 1: ΔH = [1, 2], s = [1/2, 2/3]); row 1 has Â < 0, so only row 0 trains.
    assert tokens.selected.tolist() == [[False, True, False], [False, True, False]]
    assert tokens.trained.tolist() == [[False, True, False], [False, False, False]]
    assert tokens.entropy_shift[0, :2].tolist() == [1.0, 2.0]
    # ℓ⁺ = ℓ − 0.1 and ℓ⁻ = ℓ − 0.7 on every token: the values worked out in test_cppo_objective_by_hand.
    assert tokens.d_positive[0, 1].item() == pytest.approx(0.004837, abs=1e-6)
    assert tokens.d_negative[0, 1].item() == pytest.approx(0.196585, abs=1e-6)
    assert tokens.contrastive[0, 1].item() == pytest.approx(0.137130, abs=1e-5)
    _, metrics = policy_objective(batch, config)
    assert metrics["cpl_loss"].item() == pytest.approx(masked_mean(tokens.contrastive, tokens.trained).item())


def test_papo_objective_by_hand():
    batch = _batch()
    config = ObjectiveConfig(algorithm="papo", papo_gamma=0.5, papo_eta_clean=0.0, papo_eta_masked=0.0)
    loss, metrics = policy_objective(batch, config)
    # ℓ_mask = ℓ − 0.3 everywhere: k3 = e^−0.3 + 0.3 − 1 = 0.040818 → L = 1.1 − 0.5 · 0.040818 = 1.079591
    assert metrics["perception_kl"].item() == pytest.approx(0.040818, abs=1e-5)
    assert loss.item() == pytest.approx(1.079591, abs=1e-5)
    # PAPO's default: the masked-image log-probs get no gradient.
    loss.backward()
    assert batch.logp["masked"].grad is None and batch.logp["clean"].grad is not None


def test_papo_masked_gradient_when_asked():
    batch = _batch()
    config = ObjectiveConfig(algorithm="papo", papo_gamma=0.5, papo_masked_grad=True)
    loss, _ = policy_objective(batch, config)
    loss.backward()
    # ∂(−γ · mean k3)/∂ℓ_mask = −γ · (e^δ − 1) / 4 valid tokens, δ = −0.3: −0.5 · (−0.259182) / 4 = 0.032398
    grad = batch.logp["masked"].grad
    assert grad[batch.response_mask] == pytest.approx([0.032398] * 4, abs=1e-6)
    assert (grad[~batch.response_mask] == 0).all()


def test_reference_kl_enters_with_beta():
    # ℓ_ref = ℓ + 0.2: k3 = e^0.2 − 0.2 − 1 = 0.021403 → L = 1.1 + 0.1 · 0.021403
    loss, metrics = policy_objective(_batch(), ObjectiveConfig(algorithm="grpo", beta=0.1))
    assert metrics["kl_loss"].item() == pytest.approx(0.021403, abs=1e-5)
    assert loss.item() == pytest.approx(1.1 + 0.0021403, abs=1e-5)


def test_missing_inputs_are_named():
    batch = _batch()
    batch.logp_ref = None
    with pytest.raises(ValueError, match="logp_ref"):
        policy_objective(batch, ObjectiveConfig(algorithm="grpo", beta=0.1))
    del batch.entropy["negative"]
    with pytest.raises(ValueError, match="negative"):
        policy_objective(batch, ObjectiveConfig(algorithm="cppo"))
    with pytest.raises(ValueError, match="algorithm must be one of grpo, papo, cppo"):
        policy_objective(_batch(), ObjectiveConfig(algorithm="ppo"))


def test_the_algorithm_table_says_what_each_algorithm_needs_and_reports():
    assert ALGORITHMS["grpo"].passes == ("clean",)
    assert ALGORITHMS["papo"].passes == ("clean", "masked")
    assert ALGORITHMS["cppo"].passes == ("clean", "positive", "negative")
    for name, algorithm in ALGORITHMS.items():
        batch = _batch()
        # Only the passes the table names: a term that reads another one fails here.
        batch.logp = {p: batch.logp[p] for p in algorithm.passes}
        batch.entropy = {p: batch.entropy[p] for p in algorithm.passes}
        _, metrics = policy_objective(batch, ObjectiveConfig(algorithm=name))
        assert set(metrics) == {"pg_loss", "clip_fraction", "loss", *algorithm.metrics}
        assert set(metrics) <= set(metric_names())


def test_a_term_must_report_the_metrics_the_table_names(monkeypatch):
    def term(inputs, config):
        return torch.zeros(()), {"something_else": torch.zeros(())}

    monkeypatch.setitem(ALGORITHMS, "toy", Algorithm(passes=("clean",), term=term, metrics=("toy_metric",)))
    with pytest.raises(ValueError, match="toy_metric"):
        policy_objective(_batch(), ObjectiveConfig(algorithm="toy"))


# --- helpers -------------------------------------------------------------------------------------


def test_masked_mean_ignores_padding_and_handles_empty_masks():
    values = t([[1.0, 3.0, math.nan], [5.0, math.inf, 0.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert masked_mean(values, mask).item() == pytest.approx(3.0)
    assert masked_mean(values, torch.zeros_like(mask)).item() == 0.0


def test_response_means_are_each_responses_token_mean():
    values = t([[1.0, 3.0, math.nan], [5.0, math.inf, 0.0], [2.0, 2.0, 2.0]])
    mask = torch.tensor([[True, True, False], [True, False, False], [False, False, False]])
    assert response_means(values, mask).tolist() == [2.0, 5.0, 0.0]


def test_logprobs_and_entropy_by_hand():
    # Logits [0, ln 3] at T = 1: p = [1/4, 3/4]; ℓ(token 1) = ln .75;
    # H = −(.25 ln .25 + .75 ln .75) = 0.562335
    # At T = 2 the logits halve: p ∝ [1, √3] → p = [0.366025, 0.633975]; ℓ(token 0) = ln 0.366025
    logits = t([[[0.0, LN(3.0)], [0.0, LN(3.0)]]])
    logp, entropy = logprobs_and_entropy(logits, torch.tensor([[1, 0]]))
    torch.testing.assert_close(logp, t([[LN(0.75), LN(0.25)]]))
    torch.testing.assert_close(entropy, t([[0.562335, 0.562335]]), atol=1e-6, rtol=0)
    logp, _ = logprobs_and_entropy(logits, torch.tensor([[1, 0]]), temperature=2.0)
    assert logp[0, 1].item() == pytest.approx(LN(0.366025), abs=1e-5)
    with pytest.raises(ValueError, match="temperature"):
        logprobs_and_entropy(logits, torch.tensor([[1, 0]]), temperature=0.0)


def test_logprobs_and_entropy_exclude_suppressed_ids():
    # Suppressing id 2 (logit 5) leaves softmax over [0, ln 3]: p = [1/4, 3/4], as in the case above,
    # and the suppressed id adds 0 to the entropy rather than NaN.
    logits = t([[[0.0, LN(3.0), 5.0]]])
    logp, entropy = logprobs_and_entropy(logits, torch.tensor([[1]]), suppressed_ids=[2])
    assert logp.item() == pytest.approx(LN(0.75), abs=1e-6)
    assert entropy.item() == pytest.approx(0.562335, abs=1e-6)
