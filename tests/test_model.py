"""Every backbone builds offline and runs; local weight files and exported configs reload exactly."""
import pytest
import torch
from safetensors.torch import save_file

from lib.inputs import InputSpec
from lib.model import BACKBONES, build_from_config, build_model, model_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def logits_of(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_backbone_builds_and_runs(backbone):
    torch.manual_seed(0)
    y = logits_of(build_model(backbone), torch.randn(1, 3, 64, 64))
    assert y.shape == (1, 1, 64, 64)
    assert torch.isfinite(y).all()
    assert y.std() > 0  # a real, input-dependent output, not a constant


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_whole_model_file_round_trips(tmp_path, suffix):
    torch.manual_seed(1)
    source = build_model("resnet18", in_channels=4)
    path = tmp_path / f"unet{suffix}"
    if suffix == ".pt":
        torch.save(source.state_dict(), path)
    else:
        save_file(source.state_dict(), str(path))
    loaded = build_model("resnet18", in_channels=4, weights=path)
    x = torch.randn(2, 4, 64, 64)
    assert torch.equal(logits_of(loaded, x), logits_of(source, x))


@pytest.mark.parametrize("backbone", ["resnet18", "tu-mobilenetv3_small_050"])
def test_rgb_encoder_file_loads_into_five_channels(tmp_path, backbone):
    torch.manual_seed(2)
    encoder_state = build_model(backbone).encoder.state_dict()
    path = tmp_path / "encoder.pth"
    torch.save(encoder_state, path)
    model = build_model(backbone, in_channels=5, weights=str(path))

    loaded = model.encoder.state_dict()
    (stem_key, rgb_filters), *_ = ((k, v) for k, v in encoder_state.items() if v.ndim == 4)
    # smp's scheme: channel i reuses RGB filter i % 3, scaled by 3/5 to keep the activation size
    expected = rgb_filters[:, [0, 1, 2, 0, 1]] * 3 / 5
    torch.testing.assert_close(loaded[stem_key], expected)
    assert all(torch.equal(loaded[k], v) for k, v in encoder_state.items() if k != stem_key)
    y = logits_of(model, torch.randn(1, 5, 64, 64))
    assert y.shape == (1, 1, 64, 64) and torch.isfinite(y).all()


def test_missing_weights_file_names_it(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        build_model("resnet18", weights=missing)


def test_encoder_with_wrong_channel_count_is_rejected(tmp_path):
    path = tmp_path / "encoder4.pt"
    torch.save(build_model("resnet18", in_channels=4).encoder.state_dict(), path)
    with pytest.raises(ValueError, match="4 input channels"):
        build_model("resnet18", in_channels=5, weights=path)


@pytest.mark.parametrize("decoder_channels", [(256, 128, 64, 32, 16), (64, 32, 16, 16, 8)])
def test_config_rebuilds_exported_model(decoder_channels):
    torch.manual_seed(3)
    source = build_model("tu-mobilenetv3_small_050", in_channels=6, decoder_channels=decoder_channels, family="stack")
    cfg = model_config("tu-mobilenetv3_small_050", InputSpec("stack", depth=6), decoder_channels)
    assert cfg["decoder_channels"] == list(decoder_channels)
    assert all(isinstance(v, (str, int)) or all(isinstance(c, int) for c in v) for v in cfg.values())
    rebuilt = build_from_config(cfg)
    rebuilt.load_state_dict(source.state_dict())
    x = torch.randn(1, 6, 64, 64)
    assert torch.equal(logits_of(rebuilt, x), logits_of(source, x))


def test_the_3d_stem_family_reads_any_depth_and_rebuilds_from_its_config():
    torch.manual_seed(4)
    spec = InputSpec("stem3d", depth=10)
    source = build_model("tu-mobilenetv3_small_050", spec.channels, decoder_channels=(64, 32, 16, 16, 8),
                         family="stem3d")
    rebuilt = build_from_config(model_config("tu-mobilenetv3_small_050", spec, (64, 32, 16, 16, 8)))
    rebuilt.load_state_dict(source.state_dict())
    x = torch.randn(2, 10, 64, 64)
    assert torch.equal(logits_of(rebuilt, x), logits_of(source, x)) and logits_of(source, x).shape == (2, 1, 64, 64)
    # the stem pools over depth: moving the ink to another slice moves nothing the U-Net sees by much
    assert sum(p.numel() for p in source.stem.parameters()) < 2000


@pytest.mark.parametrize("family", ["stack", "stem3d", "triplets"])
def test_every_family_loads_from_its_model_file_and_predicts_the_same(family, tmp_path):
    """A model file of each family loads (weights made channels_last where they are 2-D: a stem3d model's Conv3d
    weights are 5-D) and gives the logits of the model that was saved."""
    from lib.model import load_model_file, save_model_file

    torch.manual_seed(5)
    spec = InputSpec(family, depth=8)
    decoder = (16, 8, 8, 8, 8)
    model = build_model("tu-mobilenetv3_small_050", spec.channels, decoder_channels=decoder, family=family).eval()
    path = tmp_path / "fold-1.pt"
    save_model_file(path, model, spec, config=model_config("tu-mobilenetv3_small_050", spec, decoder), tile_size=64)
    loaded, export = load_model_file(path)
    x = torch.randn(2, spec.channels, 64, 64)
    assert export["tile_size"] == 64 and torch.allclose(logits_of(loaded, x), logits_of(model, x), atol=1e-5)
