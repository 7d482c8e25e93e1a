"""The membership-inference attacks on constructed scores (AUC, TPR at 1 % FPR, offline LiRA) and on a toy model
that memorised its training points (the attacks find them) or never saw them (chance), without Flower."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from radfed.federation.learning import membership
from radfed.federation.learning.membership import (
    LOW_FPR,
    METRICS,
    MembershipAudit,
    attack_auc,
    card_section,
    evaluate_attack,
    lira_offline_scores,
    logit_confidence,
    loss_scores,
    reference_partitions,
    site_audits,
    tpr_at_fpr,
)
from radfed.federation.learning.messages import ALLOWED_METRICS, allowed_metrics


def pairwise_auc(members: list[float], others: list[float]) -> float:
    wins = [1.0 if m > o else 0.5 if m == o else 0.0 for m, o in itertools.product(members, others)]
    return sum(wins) / len(wins)


@pytest.mark.parametrize("seed", range(5))
def test_auc_is_the_chance_a_member_outscores_a_non_member(seed: int) -> None:
    rng = np.random.default_rng(seed)
    members = rng.integers(0, 6, size=17).astype(float).tolist()  # coarse scores: many ties
    others = rng.integers(0, 5, size=11).astype(float).tolist()
    assert attack_auc(members, others) == pytest.approx(pairwise_auc(members, others))


def test_auc_of_separated_reversed_and_tied_scores() -> None:
    assert attack_auc([3.0, 4.0], [1.0, 2.0]) == 1.0
    assert attack_auc([1.0, 2.0], [3.0, 4.0]) == 0.0
    assert attack_auc([2.0, 2.0, 2.0], [2.0, 2.0]) == 0.5


def test_tpr_at_one_percent_fpr_admits_at_most_one_false_positive_in_a_hundred() -> None:
    others = np.arange(200.0)  # non-members score 0..199: at FPR <= 1 %, at most 2 of them above the threshold
    members = np.concatenate([np.full(30, 1000.0), np.full(20, 198.5), np.full(50, 50.0)])
    # threshold 198: 2 false positives (198, 199), the 30 + 20 members above it
    assert tpr_at_fpr(members, others) == pytest.approx(0.5)
    assert tpr_at_fpr(members, others, fpr_limit=0.0) == pytest.approx(0.3)  # above every non-member
    result = evaluate_attack(members, others)
    assert (result.members, result.non_members) == (100, 200)
    assert result.tpr_at_low_fpr == pytest.approx(0.5) and LOW_FPR == 0.01


def test_tpr_at_low_fpr_with_few_non_members_counts_only_members_above_all_of_them() -> None:
    assert tpr_at_fpr([5.0, 4.0, 1.0, 0.0], [2.0, 3.0]) == 0.5
    assert tpr_at_fpr([3.0, 1.0], [3.0, 0.0]) == 0.0  # a tie with a non-member is a false positive


def test_scores_must_be_finite_and_present() -> None:
    with pytest.raises(ValueError, match="finite"):
        attack_auc([1.0, float("nan")], [0.0])
    with pytest.raises(ValueError, match="no scores"):
        attack_auc([], [0.0])


def test_logit_confidence_falls_as_the_loss_rises() -> None:
    phi = logit_confidence([1e-9, 0.01, 0.69314718, 2.0, 30.0])
    assert np.all(np.diff(phi) < 0) and np.isfinite(phi).all()
    assert phi[2] == pytest.approx(0.0, abs=1e-6)  # loss ln 2: confidence 1/2


def test_every_study_is_left_out_of_half_the_reference_models() -> None:
    trained = reference_partitions(studies=11, references=6, seed=3)
    assert trained.shape == (6, 11)
    assert (trained.sum(axis=0) == 3).all()  # complementary pairs
    assert set(trained.sum(axis=1).tolist()) <= {5, 6}
    assert (reference_partitions(11, 3, seed=3).sum(axis=0) >= 1).all()
    with pytest.raises(ValueError, match="at least 2 reference"):
        reference_partitions(11, 1, seed=0)


def test_lira_calibrates_each_studys_difficulty_where_the_loss_threshold_cannot() -> None:
    rng = np.random.default_rng(0)
    studies, references = 200, 8
    difficulty = rng.normal(0.0, 5.0, studies)  # some studies are easy for any model, some hard
    is_member = np.arange(studies) < studies // 2
    trained = reference_partitions(studies, references, seed=1)
    reference = difficulty + rng.normal(0.0, 0.3, (references, studies)) + 1.0 * trained  # IN models gain 1
    target = difficulty + rng.normal(0.0, 0.3, studies) + 1.0 * is_member
    lira = lira_offline_scores(target, reference, trained)
    assert attack_auc(lira[is_member], lira[~is_member]) > 0.95
    # the same gain read as a global threshold drowns in the studies' spread of difficulty
    assert attack_auc(target[is_member], target[~is_member]) < 0.65


def test_lira_needs_an_out_reference_for_every_study() -> None:
    with pytest.raises(ValueError, match="no reference model trained without"):
        lira_offline_scores([0.0, 1.0], [[0.0, 0.0], [1.0, 1.0]], [[True, False], [True, False]])
    with pytest.raises(ValueError, match="must be"):
        lira_offline_scores([0.0, 1.0, 2.0], [[0.0, 0.0]], [[False, False]])


# ---------------------------------------------------------------------------------------------- a toy model


def toy_data(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random points with random labels: nothing to learn but the points themselves."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, 16, generator=generator), torch.randint(0, 2, (count,), generator=generator).float()


def toy_model(x: torch.Tensor, y: torch.Tensor, steps: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.binary_cross_entropy_with_logits(model(x)[:, 0], y).backward()
        optimizer.step()
    return model


@torch.no_grad()
def toy_losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    return nn.functional.binary_cross_entropy_with_logits(model(x)[:, 0], y, reduction="none").numpy()


def toy_audit(steps: int) -> tuple[float, float]:
    """(loss AUC, LiRA AUC) of a model trained ``steps`` steps on the first half of 160 points."""
    x, y = toy_data(160, seed=0)
    members = np.arange(160) < 80
    target = toy_model(x[:80], y[:80], steps, seed=1)
    losses = toy_losses(target, x, y)
    scores = loss_scores(losses)
    trained = reference_partitions(160, 4, seed=2)
    reference = np.stack(
        [
            logit_confidence(toy_losses(toy_model(x[half], y[half], steps, seed=3 + i), x, y))
            for i, half in enumerate(trained)
        ]
    )
    lira = lira_offline_scores(logit_confidence(losses), reference, trained)
    return attack_auc(scores[members], scores[~members]), attack_auc(lira[members], lira[~members])


def test_a_model_that_memorised_its_training_points_is_caught() -> None:
    loss_auc, lira_auc = toy_audit(steps=400)
    # measured 0.89 and 0.79: with 2 OUT references a point, LiRA's Gaussians are coarse; random labels make
    # every non-member's loss alike, the loss threshold's best case
    assert loss_auc > 0.8 and lira_auc > 0.7, (loss_auc, lira_auc)


def test_a_model_that_never_trained_is_at_chance() -> None:
    loss_auc, lira_auc = toy_audit(steps=0)
    assert abs(loss_auc - 0.5) < 0.12 and abs(lira_auc - 0.5) < 0.12, (loss_auc, lira_auc)


# ---------------------------------------------------------------------------------------------- what leaves


def test_what_a_site_sends_is_on_the_allow_list_and_holds_no_score() -> None:
    assert set(METRICS) <= ALLOWED_METRICS
    result = evaluate_attack([0.9, 0.8, 0.1], [0.2, 0.3])
    sent = allowed_metrics(result.as_metrics(membership.Attack.LIRA) | {"membership_references": 4})
    assert sent == {
        "membership_lira_auc": pytest.approx(4 / 6),
        "membership_lira_tpr_at_1pct_fpr": pytest.approx(2 / 3),
        "membership_members": 3,
        "membership_non_members": 2,
        "membership_references": 4,
    }
    with pytest.raises(ValueError, match="allow-list"):
        allowed_metrics({"membership_loss_scores": 0.3})  # anything per study is refused by name


def test_the_coordinators_view_and_the_model_card() -> None:
    sent = {
        "hospital-1": {"membership_loss_auc": 0.61, "membership_loss_tpr_at_1pct_fpr": 0.0, "membership_members": 9}
        | {"membership_non_members": 3, "dice": 0.7},
        "hospital-2": {"dice": 0.5},  # no audit (e.g. no held-out study)
    }
    audits = site_audits(sent)
    assert audits == {"hospital-1": {"members": 9, "non_members": 3, "loss_auc": 0.61, "loss_tpr_at_1pct_fpr": 0.0}}
    card = card_section(audits, MembershipAudit.LOSS, epsilon=8.0)
    assert "| hospital-1 | 9 | 3 | 0.610 | 0.000 | n/a | n/a |" in card and "epsilon 8" in card
    assert "Not run" in card_section({}, MembershipAudit.OFF, 8.0)
