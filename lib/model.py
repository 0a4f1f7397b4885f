"""The segmentation models: an smp U-Net with one output channel of ink logits, fed by a model family's input
(lib/inputs.py): "triplets" (3 slices as the encoder's channels), "stack" (`depth` slices as its channels, smp's
in_channels) or "stem3d" (`depth` slices through a small 3-D convolutional stem, max-pooled over depth, as the
1st-place Kaggle team did, into the U-Net). A member of an ensemble is named FAMILY:BACKBONE.

Weights are random by default (nothing can be downloaded offline); "imagenet" asks smp
to download them; a path loads a local state dict of the encoder or of the whole U-Net.
"""
from pathlib import Path

import torch
import segmentation_models_pytorch as smp
from safetensors.torch import load_file
from segmentation_models_pytorch.encoders._utils import patch_first_conv

from lib.inputs import FAMILIES, InputSpec
from lib.outputs import torch_save_atomically

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


STEM_CHANNELS = (4, 8)  # the 3-D stem's widths: small, since it runs at full resolution over every slice


class DepthStem(torch.nn.Module):
    """(B, D, H, W) slices -> (B, STEM_CHANNELS[-1], H, W): 3x3x3 convolutions over depth and plane, then the max
    over depth, so that the ink's depth is found by the model rather than assumed."""

    def __init__(self, widths=STEM_CHANNELS):
        super().__init__()
        layers, previous = [], 1
        for width in widths:
            layers += [torch.nn.Conv3d(previous, width, 3, padding=1, bias=False), torch.nn.BatchNorm3d(width),
                       torch.nn.ReLU(inplace=True)]
            previous = width
        self.layers = torch.nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x.unsqueeze(1)).amax(dim=2)


class StemUnet(torch.nn.Module):
    """The "stem3d" family: DepthStem into a U-Net whose encoder reads the stem's channels."""

    def __init__(self, unet):
        super().__init__()
        self.stem, self.unet = DepthStem(), unet

    def forward(self, x):
        return self.unet(self.stem(x))


def parse_member(name, default_family):
    """"FAMILY:BACKBONE" or "BACKBONE" (of `default_family`) -> (family, backbone); ValueError for an unknown family."""
    family, _, backbone = name.rpartition(":")
    family = family or default_family
    if family not in FAMILIES:
        raise ValueError(f"{name}: unknown model family {family!r} (one of {', '.join(FAMILIES)})")
    return family, backbone


def build_model(backbone: str, in_channels: int = 3, weights: str | Path | None = None,
                decoder_channels=DEFAULT_DECODER, family: str = "triplets") -> torch.nn.Module:
    """A model of `family` returning logits (N,1,H,W) from `in_channels` slices. weights: None, "imagenet" or a
    local state-dict file (for the U-Net's encoder, or the whole U-Net)."""
    encoder_channels = STEM_CHANNELS[-1] if family == "stem3d" else in_channels
    if weights is None or weights == "none":
        model = unet(backbone, encoder_channels, None, decoder_channels)
    elif weights == "imagenet":
        # timm ("tu-") encoders name their pretrained tag in the encoder name and take True here
        model = unet(backbone, encoder_channels, True if backbone.startswith("tu-") else "imagenet", decoder_channels)
    else:
        model = load_local(backbone, encoder_channels, Path(weights), decoder_channels)
    return StemUnet(model) if family == "stem3d" else model


def model_config(backbone: str, spec: InputSpec, decoder_channels=DEFAULT_DECODER) -> dict:
    """Everything needed to rebuild the architecture; the weights travel in the state dict."""
    return {"backbone": backbone, "family": spec.family, "in_channels": spec.channels,
            "decoder_channels": [int(c) for c in decoder_channels]}


def build_from_config(cfg: dict) -> torch.nn.Module:
    """Random-initialised model matching `cfg`, ready for load_state_dict."""
    return build_model(cfg["backbone"], int(cfg["in_channels"]), weights=None,
                       decoder_channels=cfg.get("decoder_channels", DEFAULT_DECODER), family=cfg["family"])


def save_model_file(path, model, spec, **entries):
    """Write a fold model file: its config, weights, `entries` (fold, tile_size, stride, scores) and its input
    (`spec`, with the version of this code's inputs: lib.inputs.INPUT_VERSION), atomically."""
    torch_save_atomically(path, {**entries, "inputs": spec.as_dict(), "state_dict": model.state_dict()})


def load_model_file(path, device="cpu"):
    """A fold model file of train.py -> (the model in eval mode on `device`, the file's other entries:
    config, inputs, fold, tile_size, stride, scores).

    The weights are made channels_last: convolutions then run channels_last on CPU too (oneDNN), which is faster
    for the conv encoders (measured: bench/README.md, "## submit"); on GPU predict_fragment feeds channels_last
    inputs anyway."""
    export = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain data only: no code
    model = build_from_config(export["config"])
    model.load_state_dict(export.pop("state_dict"))
    return channels_last(model.to(device)).eval(), export


def channels_last(model):
    """`model` with its 2-D convolutions' weights channels_last (in place). Not Module.to(memory_format=...): that
    fails on the 5-D weights of a stem3d model's Conv3d, which keep their layout."""
    for parameter in model.parameters():
        if parameter.dim() == 4:
            parameter.data = parameter.data.contiguous(memory_format=torch.channels_last)
    return model
