"""The segmentation model: an smp U-Net with one output channel of ink logits.

Weights are random by default (nothing can be downloaded offline); "imagenet" asks smp
to download them; a path loads a local state dict of the encoder or of the whole U-Net.
"""
import os
from pathlib import Path

import torch
import segmentation_models_pytorch as smp
from safetensors.torch import load_file
from segmentation_models_pytorch.encoders._utils import patch_first_conv

from lib.data import INPUT_VERSION

# encoder name -> why it is here; every name builds with smp 0.6 and timm 1.0
BACKBONES = {
    "mit_b2": "original ensemble (SegFormer encoder)",
    "mit_b3": "original ensemble (SegFormer encoder)",
    "mit_b4": "original ensemble (SegFormer encoder)",
    "mit_b5": "original ensemble (SegFormer encoder)",
    "vgg19": "original ensemble",
    "resnet34": "original ensemble",
    "resnet50": "original ensemble",
    "efficientnet-b3": "original ensemble",
    "tu-resnest50d": "original ensemble (timm ResNeSt; smp's timm-resnest names are deprecated)",
    "tu-regnety_016": "original ensemble (timm RegNetY-1.6GF)",
    "resnet18": "small, for CPU runs",
    "tu-mobilenetv3_small_050": "tiny, for CPU runs and tests",
}
WHOLE_MODEL_PREFIXES = ("encoder.", "decoder.", "segmentation_head.")


DEFAULT_DECODER = (256, 128, 64, 32, 16)  # smp's; the demo preset's slimmer decoder is for CPUs


def unet(backbone: str, in_channels: int, encoder_weights, decoder_channels=DEFAULT_DECODER) -> smp.Unet:
    return smp.Unet(
        encoder_name=backbone,
        encoder_weights=encoder_weights,
        in_channels=in_channels,
        classes=1,
        activation=None,
        decoder_channels=tuple(decoder_channels),
    )


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        return load_file(str(path), device="cpu")
    return torch.load(path, map_location="cpu", weights_only=True)


def stem_in_channels(encoder_state: dict[str, torch.Tensor]) -> int:
    """Input channels of the first conv: the first 4-D weight in the state dict."""
    return next(t.shape[1] for t in encoder_state.values() if t.ndim == 4)


def widen_first_conv(encoder: torch.nn.Module, in_channels: int) -> None:
    """Give a 3-channel encoder `in_channels` inputs, reusing its RGB filters cyclically (smp's scheme)."""
    if hasattr(encoder, "set_in_channels"):
        encoder.set_in_channels(in_channels, pretrained=True)
    else:  # timm ("tu-") encoders take in_chans at build time and have no set_in_channels
        patch_first_conv(encoder, new_in_channels=in_channels, pretrained=True)


def load_local(backbone: str, in_channels: int, path: Path, decoder_channels=DEFAULT_DECODER) -> smp.Unet:
    state = read_state_dict(path)
    if all(key.startswith(WHOLE_MODEL_PREFIXES) for key in state):
        model = unet(backbone, in_channels, None, decoder_channels)
        model.load_state_dict(state)
        return model
    stem = stem_in_channels(state)
    if stem not in (3, in_channels):
        raise ValueError(f"{path}: encoder has {stem} input channels, cannot adapt it to {in_channels}")
    model = unet(backbone, stem, None, decoder_channels)
    model.encoder.load_state_dict(state)
    if stem != in_channels:
        widen_first_conv(model.encoder, in_channels)
    return model


def build_model(backbone: str, in_channels: int = 3, weights: str | Path | None = None,
                decoder_channels=DEFAULT_DECODER) -> smp.Unet:
    """U-Net returning logits (N,1,H,W). weights: None, "imagenet" or a local state-dict file."""
    if weights is None or weights == "none":
        return unet(backbone, in_channels, None, decoder_channels)
    if weights == "imagenet":
        # timm ("tu-") encoders name their pretrained tag in the encoder name and take True here
        return unet(backbone, in_channels, True if backbone.startswith("tu-") else "imagenet", decoder_channels)
    return load_local(backbone, in_channels, Path(weights), decoder_channels)


def model_config(backbone: str, in_channels: int, decoder_channels=DEFAULT_DECODER) -> dict:
    """Everything needed to rebuild the architecture; the weights travel in the state dict."""
    return {"backbone": backbone, "in_channels": int(in_channels), "decoder_channels": [int(c) for c in decoder_channels]}


def build_from_config(cfg: dict) -> smp.Unet:
    """Random-initialised U-Net matching `cfg`, ready for load_state_dict."""
    return build_model(cfg["backbone"], int(cfg["in_channels"]), weights=None,
                       decoder_channels=cfg.get("decoder_channels", DEFAULT_DECODER))


def save_model_file(path, model, **entries):
    """Write a fold model file: its config, weights, `entries` (fold, tile_size, stride, scores) and the version of
    the inputs it was trained on (lib.data.INPUT_VERSION: this code's), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({**entries, "inputs": INPUT_VERSION, "state_dict": model.state_dict()}, tmp)
    os.replace(tmp, path)


def load_model_file(path, device="cpu"):
    """A fold model file of train.py -> (the model in eval mode on `device`, the file's other entries:
    config, fold, tile_size, stride, scores).

    The weights are made channels_last: convolutions then run channels_last on CPU too (oneDNN), which is faster
    for the conv encoders (measured: bench/README.md, "## submit"); on GPU predict_fragment feeds channels_last
    inputs anyway."""
    export = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain data only: no code
    model = build_from_config(export["config"])
    model.load_state_dict(export.pop("state_dict"))
    return model.to(device, memory_format=torch.channels_last).eval(), export
