"""Membership-inference attacks, as a site runs them against a job's final model to measure what it leaks about
its own training studies (run-config key ``membership-audit``); the model code is in
``federation/site/membership_audit.py``.

Two attacks, written from their published descriptions:

- **loss threshold** (Yeom et al., "Privacy Risk in Machine Learning: Analyzing the Connection to Overfitting",
  CSF 2018): a study is called a member when the model's loss on it is below a threshold; the score is the
  negated per-study loss, and sweeping the threshold gives the ROC curve.
- **LiRA, offline** (Carlini et al., "Membership Inference Attacks From First Principles", IEEE S&P 2022): reference
  models are trained on data drawn like the target's; for each study, only those trained *without* it ("OUT") are
  used. Its confidence ``c`` is logit-scaled, ``phi = log(c / (1 - c))``, a Gaussian is fitted to the OUT
  references' ``phi`` for that study (per-study mean, one variance pooled over studies: the paper finds a global
  variance better with few reference models), and the score is the one-sided test of the target model's ``phi``
  against it: ``Pr[Z < phi_target]``, ``Z ~ N(mu_out, sigma_out^2)``. The z-score is returned instead of that
  probability: the same order, without the CDF saturating at 1 for large z (AUC and TPR depend on order only).

What a site sends is the attack's AUC and its TPR at 1 % FPR (and the two study counts): never a score. Pure
numpy: no torch, no flwr."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import numpy.typing as npt

Scores = npt.ArrayLike
LOW_FPR = 0.01  # Carlini et al. report TPR at low FPR: an attack is useful if it is confident about a few members
_MIN_SIGMA = 1e-6  # references that agree exactly would make every z infinite


class MembershipAudit(StrEnum):
    """Run-config ``membership-audit``: which attack each site runs at the end of the job."""

    OFF = "off"
    LOSS = "loss"  # per-study losses of the final model: one inference pass over the site's studies
    LIRA = "lira"  # the loss attack and offline LiRA (reference models trained at the site)


class Attack(StrEnum):
    LOSS = "loss"
    LIRA = "lira"


def metric_names(attack: Attack | str) -> tuple[str, str]:
    """The allow-listed metric names of an attack's (AUC, TPR at 1 % FPR)."""
    return f"membership_{attack}_auc", f"membership_{attack}_tpr_at_1pct_fpr"


MEMBERS, NON_MEMBERS = "membership_members", "membership_non_members"
METRICS = (
    MEMBERS,
    NON_MEMBERS,
    "membership_references",
    "membership_seconds",
    *metric_names(Attack.LOSS),
    *metric_names(Attack.LIRA),
)


@dataclass(frozen=True)
class AttackResult:
    """How well an attack tells a site's training studies (members) from its held-out ones."""

    auc: float
    tpr_at_low_fpr: float  # at FPR <= LOW_FPR
    members: int
    non_members: int

    def as_metrics(self, attack: Attack | str) -> dict[str, float | int]:
        auc, tpr = metric_names(attack)
        return {auc: self.auc, tpr: self.tpr_at_low_fpr, MEMBERS: self.members, NON_MEMBERS: self.non_members}


def _scores(values: Scores, name: str) -> npt.NDArray[np.float64]:
    array = np.asarray(values, dtype=np.float64).ravel()
    if array.size == 0:
        raise ValueError(f"{name}: no scores")
    if not np.isfinite(array).all():
        raise ValueError(f"{name}: scores must be finite")
    return array


def roc_curve(member_scores: Scores, non_member_scores: Scores) -> tuple[npt.NDArray[np.float64], ...]:
    """(FPR, TPR) at every distinct threshold, from (0, 0) to (1, 1); a study is called a member when its score
    is at or above the threshold (a higher score: more likely a member)."""
    members = _scores(member_scores, "member_scores")
    others = _scores(non_member_scores, "non_member_scores")
    scores = np.concatenate([members, others])
    is_member = np.concatenate([np.ones(members.size), np.zeros(others.size)])
    order = np.argsort(-scores, kind="stable")
    scores, is_member = scores[order], is_member[order]
    last_of_tie = np.flatnonzero(np.diff(scores) != 0)  # a threshold takes a tied group whole
    cut = np.concatenate([last_of_tie, [scores.size - 1]])
    tps = np.cumsum(is_member)[cut]
    fps = (cut + 1) - tps
    tpr = np.concatenate([[0.0], tps / members.size])
    fpr = np.concatenate([[0.0], fps / others.size])
    return fpr, tpr


def attack_auc(member_scores: Scores, non_member_scores: Scores) -> float:
    """Area under the ROC curve: the chance that a random member scores above a random non-member (ties half)."""
    fpr, tpr = roc_curve(member_scores, non_member_scores)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def tpr_at_fpr(member_scores: Scores, non_member_scores: Scores, fpr_limit: float = LOW_FPR) -> float:
    """The highest TPR of any threshold whose FPR is at most ``fpr_limit``. With fewer than 1 / ``fpr_limit``
    non-members that threshold admits no false positive at all."""
    fpr, tpr = roc_curve(member_scores, non_member_scores)
    return float(tpr[fpr <= fpr_limit + 1e-12].max())


def evaluate_attack(member_scores: Scores, non_member_scores: Scores) -> AttackResult:
    members = _scores(member_scores, "member_scores")
    others = _scores(non_member_scores, "non_member_scores")
    return AttackResult(attack_auc(members, others), tpr_at_fpr(members, others), members.size, others.size)


def loss_scores(losses: Scores) -> npt.NDArray[np.float64]:
    """The loss attack's scores: a lower loss, more likely a member."""
    return -_scores(losses, "losses")


def logit_confidence(losses: Scores) -> npt.NDArray[np.float64]:
    """LiRA's logit-scaled confidence of a loss: ``c = exp(-loss)`` (the probability the model gives the truth,
    for a cross-entropy), ``phi = log(c / (1 - c)) = -loss - log(1 - exp(-loss))``."""
    loss = np.maximum(_scores(losses, "losses"), 1e-12)
    return np.asarray(-loss - np.log(-np.expm1(-loss)), dtype=np.float64)


def reference_partitions(studies: int, references: int, seed: int) -> npt.NDArray[np.bool_]:
    """Which studies each reference model trains on, (references, studies): random halves in complementary pairs,
    so each study is OUT of at least one reference (exactly half of them when ``references`` is even)."""
    if references < 2:
        raise ValueError(f"LiRA needs at least 2 reference models, got {references}")
    if studies < 2:
        raise ValueError(f"LiRA needs at least 2 studies to split, got {studies}")
    rng = np.random.default_rng(seed)
    masks = np.zeros((references, studies), dtype=bool)
    for pair in range(0, references, 2):
        half = np.zeros(studies, dtype=bool)
        half[rng.permutation(studies)[: studies // 2]] = True
        masks[pair] = half
        if pair + 1 < references:
            masks[pair + 1] = ~half
    return masks


def lira_offline_scores(
    target_confidence: Scores, reference_confidence: Sequence[Scores] | npt.ArrayLike, reference_in: npt.ArrayLike
) -> npt.NDArray[np.float64]:
    """Offline LiRA's score per study: the z-score of the target model's logit-scaled confidence against the
    Gaussian of the references that did not train on the study. ``reference_confidence`` and ``reference_in``
    are (references, studies); a study needs at least one OUT reference."""
    target = _scores(target_confidence, "target_confidence")
    confidence = np.asarray(reference_confidence, dtype=np.float64)
    trained = np.asarray(reference_in, dtype=bool)
    if confidence.ndim != 2 or confidence.shape[1] != target.size or trained.shape != confidence.shape:
        raise ValueError(
            f"reference confidences {confidence.shape} and memberships {trained.shape} must be "
            f"(references, {target.size})"
        )
    out = ~trained
    counts = out.sum(axis=0)
    if (counts == 0).any():
        raise ValueError(f"{int((counts == 0).sum())} study(ies) have no reference model trained without them")
    mean = np.where(out, confidence, 0.0).sum(axis=0) / counts
    residuals = np.where(out, confidence - mean, 0.0)
    dof = int(counts.sum() - counts.size)  # one mean fitted per study
    # one OUT reference per study leaves no spread to pool: then only the differences from the means rank studies
    sigma = max(float(np.sqrt((residuals**2).sum() / dof)), _MIN_SIGMA) if dof > 0 else 1.0
    return np.asarray((target - mean) / sigma, dtype=np.float64)


SiteAudit = dict[str, float | int]
_SUMMARY = {
    "members": MEMBERS,
    "non_members": NON_MEMBERS,
    "loss_auc": metric_names(Attack.LOSS)[0],
    "loss_tpr_at_1pct_fpr": metric_names(Attack.LOSS)[1],
    "lira_auc": metric_names(Attack.LIRA)[0],
    "lira_tpr_at_1pct_fpr": metric_names(Attack.LIRA)[1],
    "references": "membership_references",
}
_COUNTS = frozenset({"members", "non_members", "references"})


def site_audits(site_metrics: dict[str, dict[str, object]]) -> dict[str, SiteAudit]:
    """Per site, what its audit sent (the coordinator's view, for the job's metrics, provenance and card)."""
    audits: dict[str, SiteAudit] = {}
    for site, metrics in sorted(site_metrics.items()):
        found = {key: metrics[name] for key, name in _SUMMARY.items() if name in metrics}
        numbers = {k: v for k, v in found.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        if numbers:  # counts arrive as floats through Flower's metric records
            audits[site] = {k: int(v) if k in _COUNTS else float(v) for k, v in numbers.items()}
    return audits


def card_section(audits: dict[str, SiteAudit], audit: MembershipAudit, epsilon: float) -> str:
    """The model card's section on the audit (Markdown)."""
    lines = ["## Membership-inference audit", ""]
    if audit is MembershipAudit.OFF:
        return "\n".join([*lines, "Not run (run-config `membership-audit = off`)."])
    if not audits:
        return "\n".join([*lines, "No site sent an audit (a site needs training and held-out studies)."])
    privacy = f"DP-SGD at epsilon {epsilon:g}" if epsilon > 0 else "no differential privacy"
    lines += [
        f"Each site attacked the final model ({privacy}) on its own training studies (members) vs its held-out"
        " studies (non-members) and sent only each attack's AUC and TPR at 1 % FPR: 0.5 and 0.01 are chance."
        " Loss: a threshold on the study's loss (Yeom et al. 2018); LiRA: offline likelihood ratio against"
        " reference models trained at the site without the study, from the same starting weights as the job's"
        " model (its base model when it fine-tuned one; Carlini et al. 2022). With few held-out"
        " studies the figures are coarse: at fewer than 100 non-members, TPR at 1 % FPR admits no false positive."
        " The figures come from the sites' studies and are not covered by the DP accounting (two numbers per"
        " attack and site).",
        "",
        "| site | members | non-members | loss AUC | loss TPR @ 1 % FPR | LiRA AUC | LiRA TPR @ 1 % FPR |",
        "|---|---|---|---|---|---|---|",
    ]
    for site, found in audits.items():
        cells = [found.get(k) for k in ("members", "non_members")]
        rates = [found.get(k) for k in ("loss_auc", "loss_tpr_at_1pct_fpr", "lira_auc", "lira_tpr_at_1pct_fpr")]
        lines.append(
            f"| {site} | "
            + " | ".join("n/a" if v is None else str(int(v)) for v in cells)
            + " | "
            + " | ".join("n/a" if v is None else f"{float(v):.3f}" for v in rates)
            + " |"
        )
    return "\n".join(lines)
