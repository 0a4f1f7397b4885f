"""Training loss: a weighted sum of BCE, Dice and Tversky on logits, built from smp's losses.

The competition scores F0.5, which values precision twice as much as recall, so the
defaults lean towards penalising false positives (Tversky alpha > beta).
Note: smp's Dice and Tversky are 0 for a batch without any ink, so BCE carries those batches.
"""
import torch
from torch import nn
from segmentation_models_pytorch.losses import DiceLoss, SoftBCEWithLogitsLoss, TverskyLoss

LOSS_DEFAULTS = {
    "bce": 0.5,
    "dice": 0.25,
    "tversky": 0.25,
    # in smp 0.6 soft_tversky_score is TP / (TP + alpha*FP + beta*FN): alpha weights false positives
    "tversky_alpha": 0.7,
    "tversky_beta": 0.3,
    # label smoothing epsilon of the BCE term: targets become eps/2 and 1 - eps/2 (0: off)
    "label_smoothing": 0.0,
}


class WeightedLoss(nn.Module):
    """sum(weight * loss(logits, target)) over named terms."""

    def __init__(self, terms: dict[str, nn.Module], weights: dict[str, float]):
        super().__init__()
        self.terms = nn.ModuleDict(terms)
        self.weights = weights

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return sum(self.weights[name] * term(logits, target) for name, term in self.terms.items())


def build_loss(
    bce: float = LOSS_DEFAULTS["bce"],
    dice: float = LOSS_DEFAULTS["dice"],
    tversky: float = LOSS_DEFAULTS["tversky"],
    tversky_alpha: float = LOSS_DEFAULTS["tversky_alpha"],
    tversky_beta: float = LOSS_DEFAULTS["tversky_beta"],
    label_smoothing: float = LOSS_DEFAULTS["label_smoothing"],
) -> WeightedLoss:
    """Loss on logits (N,1,H,W) and float targets (N,1,H,W); terms with weight 0 are left out."""
    makers = {
        "bce": lambda: SoftBCEWithLogitsLoss(smooth_factor=label_smoothing / 2 or None),
        "dice": lambda: DiceLoss("binary", from_logits=True),
        "tversky": lambda: TverskyLoss("binary", from_logits=True, alpha=tversky_alpha, beta=tversky_beta),
    }
    weights = {name: w for name, w in {"bce": bce, "dice": dice, "tversky": tversky}.items() if w != 0}
    if not weights:
        raise ValueError("at least one of bce, dice, tversky needs a nonzero weight")
    return WeightedLoss({name: makers[name]() for name in weights}, weights)
