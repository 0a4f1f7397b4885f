"""The weighted BCE + Dice + Tversky loss against the same formulas written out by hand."""
import pytest
import torch

from lib.losses import LOSS_DEFAULTS, build_loss

LOGITS = torch.tensor([[[[2.0, -1.0, 0.5], [-3.0, 1.5, 0.0]]], [[[-0.5, 4.0, -2.0], [1.0, -1.0, 3.0]]]])
TARGET = torch.tensor([[[[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]], [[[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]]])


def hand_terms(logits, target, alpha, beta):
    p = torch.sigmoid(logits)
    bce = -(target * torch.log(p) + (1 - target) * torch.log(1 - p)).mean()
    tp, fp, fn = (p * target).sum(), (p * (1 - target)).sum(), ((1 - p) * target).sum()
    dice = 1 - 2 * tp / (2 * tp + fp + fn)
    tversky = 1 - tp / (tp + alpha * fp + beta * fn)
    return bce, dice, tversky


def test_defaults_favour_precision():
    assert LOSS_DEFAULTS["tversky_alpha"] > LOSS_DEFAULTS["tversky_beta"]
    assert set(build_loss().terms) == {"bce", "dice", "tversky"}


def test_weighted_sum_matches_hand_computation():
    loss = build_loss(bce=0.2, dice=0.3, tversky=0.5, tversky_alpha=0.8, tversky_beta=0.2)
    bce, dice, tversky = hand_terms(LOGITS, TARGET, 0.8, 0.2)
    expected = 0.2 * bce + 0.3 * dice + 0.5 * tversky
    assert loss(LOGITS, TARGET).item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("name, index", [("bce", 0), ("dice", 1), ("tversky", 2)])
def test_each_term_alone(name, index):
    weights = {"bce": 0.0, "dice": 0.0, "tversky": 0.0, name: 2.0}
    loss = build_loss(**weights, tversky_alpha=0.7, tversky_beta=0.3)
    assert list(loss.terms) == [name]  # weight-0 terms are not built
    expected = 2.0 * hand_terms(LOGITS, TARGET, 0.7, 0.3)[index]
    assert loss(LOGITS, TARGET).item() == pytest.approx(expected.item(), rel=1e-5)


def test_tversky_alpha_punishes_false_positives():
    target = torch.zeros(1, 1, 4, 4)
    target[..., :2, :] = 1
    logits = torch.full((1, 1, 4, 4), 5.0)  # everything predicted ink: half are false positives
    fp_heavy = build_loss(bce=0, dice=0, tversky=1, tversky_alpha=0.7, tversky_beta=0.3)
    fn_heavy = build_loss(bce=0, dice=0, tversky=1, tversky_alpha=0.3, tversky_beta=0.7)
    p = torch.sigmoid(torch.tensor(5.0)).item()  # tp = fp = 8p, fn = 8(1 - p)
    assert fp_heavy(logits, target).item() == pytest.approx(1 - p / (p + 0.7 * p + 0.3 * (1 - p)), rel=1e-5)
    assert fp_heavy(logits, target) > 1.7 * fn_heavy(logits, target)


def test_all_zero_weights_rejected():
    with pytest.raises(ValueError):
        build_loss(bce=0, dice=0, tversky=0)


def test_confident_correct_prediction_has_near_zero_loss():
    logits = (TARGET * 2 - 1) * 30
    assert build_loss()(logits, TARGET).item() < 1e-6


def test_gradient_flows_to_every_logit():
    logits = LOGITS.clone().requires_grad_(True)
    build_loss()(logits, TARGET).backward()
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad != 0).all()
    # gradient descent direction: raise logits of ink pixels, lower the others
    assert (torch.sign(logits.grad) == torch.where(TARGET > 0, -1.0, 1.0)).all()
