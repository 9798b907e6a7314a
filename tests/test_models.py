"""Velocity networks: they fit data, use their conditioning, and keep the shape contract."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from boss_core.grids import uniform_grid
from boss_core.models import (
    ModelConfig,
    VelocityMLP,
    VelocityUNet,
    build_model,
    fourier_time_features,
)
from boss_core.sampling import euler_sample
from boss_core.teacher import TeacherConfig, train_teacher

SMALL = {
    "mlp": ModelConfig(arch="mlp", hidden=64, depth=2, time_embed_dim=32),
    "unet": ModelConfig(arch="unet", base_channels=16, channel_mults=(1, 2), time_embed_dim=32),
}
# Adam steps per architecture: the U-Net halves the loss in under 100 steps (loss ratio 0.18 at
# 100, 0.15 at 300) and picks the class well before 100 (means within 0.04 of +-1), at 27 ms a
# step against 3 ms for the MLP, which needs 150-300 (ratio 0.47 at 150, 0.33 at 300)
FIT_STEPS = {"mlp": 300, "unet": 120}
CONDITION_STEPS = {"mlp": 250, "unet": 120}


def fm_loss(model, x1, z, t, **extras) -> float:
    """The flow-matching loss on a fixed batch: mean ||v(x_t, t) - (x1 - z)||^2 / D."""
    t_b = t.view(-1, *([1] * (x1.dim() - 1)))
    with torch.no_grad():
        pred = model((1 - t_b) * z + t_b * x1, t, **extras)
    return float(((pred - (x1 - z)) ** 2).mean())


@pytest.mark.parametrize("arch", ["mlp", "unet"])
def test_each_architecture_fits_a_tiny_dataset(arch):
    gen = torch.Generator().manual_seed(1)
    data = torch.rand((4, 1, 8, 8), generator=gen) * 2 - 1  # 4 fixed "images"
    model = build_model(SMALL[arch], (1, 8, 8), seed=0)
    x1 = data[torch.randint(4, (512,), generator=gen)]
    z = torch.randn(x1.shape, generator=gen)
    t = torch.rand(512, generator=gen)
    before = fm_loss(model, x1, z, t)
    config = TeacherConfig(iterations=FIT_STEPS[arch], batch_size=64, lr=2e-3, warmup=20,
                           device="cpu", progress=False)
    result = train_teacher(model, data, config)
    after = fm_loss(result.model, x1, z, t)
    assert before > 1.0  # E||x1 - z||^2 / D >= 1 for an untrained net
    assert after < 0.5 * before, (before, after)


@pytest.mark.parametrize("arch", ["mlp", "unet"])
def test_class_conditioning_steers_the_samples(arch):
    """Class 0 is the all -1 image, class 1 the all +1 image: y alone must pick the output."""
    data = torch.cat([-torch.ones(8, 1, 8, 8), torch.ones(8, 1, 8, 8)])
    labels = torch.tensor([0] * 8 + [1] * 8)
    config_model = ModelConfig(**{**SMALL[arch].to_dict(), "num_classes": 2})
    model = build_model(config_model, (1, 8, 8), seed=0)
    config = TeacherConfig(iterations=CONDITION_STEPS[arch], batch_size=32, lr=2e-3, warmup=20,
                           device="cpu", progress=False)
    result = train_teacher(model, data, config, labels=labels)
    noise = torch.randn(16, 1, 8, 8)
    for label, target in ((0, -1.0), (1, 1.0)):
        y = torch.full((16,), label)
        out = euler_sample(result.ema_model, noise, uniform_grid(20), extras={"y": y})
        assert abs(float(out.mean()) - target) < 0.2, (label, float(out.mean()))


def test_unconditional_model_rejects_labels_and_conditional_accepts_none():
    x, t = torch.randn(3, 2), torch.rand(3)
    plain = VelocityMLP((2,), hidden=16, depth=1, time_embed_dim=8)
    with pytest.raises(ValueError, match="num_classes"):
        plain(x, t, y=torch.zeros(3, dtype=torch.long))
    cond = VelocityMLP((2,), hidden=16, depth=1, time_embed_dim=8, num_classes=3)
    null = cond(x, t)  # y=None uses the "no label" row
    assert not torch.allclose(null, cond(x, t, y=torch.zeros(3, dtype=torch.long)))


def _randomise_output(model: nn.Module) -> nn.Module:
    """The U-Net's last conv starts at zero (v = 0); give it weights so outputs vary."""
    if isinstance(model, VelocityUNet):
        nn.init.normal_(model.conv_out.weight, std=0.05)
    return model


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
@pytest.mark.parametrize(
    "config",
    [SMALL["mlp"], SMALL["unet"], ModelConfig(arch="unet", base_channels=8,
                                              channel_mults=(1, 2, 2, 2), time_embed_dim=16)],
    ids=["mlp", "unet2", "unet4-padded"],
)
def test_shape_contract_and_samples_do_not_interact(shape, config):
    model = _randomise_output(build_model(config, shape, seed=0)).eval().requires_grad_(False)
    x, t = torch.randn(3, *shape), torch.tensor([0.0, 0.5, 1.0])
    out = model(x, t)
    assert out.shape == x.shape and out.dtype == x.dtype
    # Each sample's velocity depends on that sample only (GroupNorm/LayerNorm are per sample).
    for i in range(3):
        torch.testing.assert_close(model(x[i:i + 1], t[i:i + 1])[0], out[i], rtol=1e-4,
                                   atol=1e-5)
    # ... and on its time: same x at another t gives a clearly different velocity.
    moved = model(x, torch.full((3,), 0.25))
    assert float((moved - out).abs().mean()) > 1e-3 * float(out.abs().mean())


def test_fourier_features_are_sin_cos_of_geometric_frequencies():
    t = torch.tensor([0.0, 0.3, 1.0])
    e = fourier_time_features(t, 8, max_freq=1000.0)
    freqs = torch.tensor([1.0, 10.0, 100.0, 1000.0])
    expected = torch.cat([torch.sin(t[:, None] * freqs), torch.cos(t[:, None] * freqs)], dim=1)
    torch.testing.assert_close(e, expected, rtol=1e-5, atol=1e-4)


def test_model_config_from_dict_and_errors():
    config = ModelConfig.from_dict({"arch": "unet", "channel_mults": [1, 2, 2]})
    assert config.channel_mults == (1, 2, 2)
    assert ModelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="hidden_size"):
        ModelConfig.from_dict({"hidden_size": 3})
    with pytest.raises(ValueError, match="'mlp', 'unet'|mlp, unet"):
        ModelConfig(arch="transformer")
    with pytest.raises(ValueError, match="depth"):
        ModelConfig(depth=0)
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        build_model(ModelConfig(arch="unet"), (2,))


def test_build_model_seed_fixes_weights_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = build_model(SMALL["unet"], (1, 8, 8), seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    b = build_model(SMALL["unet"], (1, 8, 8), seed=5)
    c = build_model(SMALL["unet"], (1, 8, 8), seed=6)
    pa, pb, pc = (torch.cat([p.flatten() for p in m.parameters()]) for m in (a, b, c))
    assert torch.equal(pa, pb)
    assert not torch.equal(pa, pc)
