"""Interpolation paths (boss_core/paths.py) and teachers trained on them.

Oracles: the t-derivative of each path by central differences; the closed-form VP schedule;
the exact velocity of a Gaussian mixture on any path (tests/fields.py), checked against the
single-Gaussian field and by integrating it to the mixture; teachers trained on each path
against that exact field.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from fields import GaussianField, MixtureField
from torch import nn

from boss_core.grids import uniform_grid
from boss_core.models import ModelConfig, build_model
from boss_core.paths import PATHS, VP_BETA_MIN, VP_EPS, get_path
from boss_core.sampling import euler_sample
from boss_core.seeds import sample_noise, step_generator
from boss_core.teacher import TeacherConfig, train_teacher

F64 = torch.float64
NAMES = sorted(PATHS)

# A 2-D mixture with well-separated modes (nearest means 3.2 apart, stds <= 0.4): a point is
# assigned to its mode by the nearest mean with error probability < 1e-4.
WEIGHTS, MEANS, STDS = [0.5, 0.3, 0.2], [[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]], [0.3, 0.4, 0.2]


def times(path, n: int = 41, h: float = 0.0) -> torch.Tensor:
    """n times in [h, t_max - h] plus points crowding t_max: (n + 4,) float64."""
    top = path.t_max - h
    near = top - torch.tensor([1e-2, 1e-3, 1e-4, 0.0], dtype=F64) * (1 - h)
    return torch.cat([torch.linspace(h, top, n, dtype=F64), near])


def pairs(n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=gen, dtype=F64), torch.randn(n, 3, generator=gen, dtype=F64)


@pytest.mark.parametrize("name", NAMES)
def test_target_is_the_t_derivative_of_interpolate(name):
    """(x_{t+h} - x_{t-h}) / 2h = target, h = 1e-7: truncation <= |x'''| h^2 / 6 (<= 1e-8 at
    vp's t_max, where sigma''' ~ 4e6) and rounding ~ 1e-16 / h = 1e-9."""
    path, h = get_path(name), 1e-7
    t = times(path, h=h)
    x1, z = pairs(len(t))
    diff = (path.interpolate(x1, z, t + h) - path.interpolate(x1, z, t - h)) / (2 * h)
    torch.testing.assert_close(diff, path.target(x1, z, t), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_endpoints(name):
    path = get_path(name)
    ends = torch.tensor([0.0, 1.0], dtype=F64)
    alpha, sigma = path.alpha(ends), path.sigma(ends)
    assert alpha[1] == 1.0 and sigma[1] == 0.0
    if name == "vp":  # log alpha(s = 1) = -(20 - 0.1) / 4 - 0.1 / 2 = -5.025
        assert alpha[0].item() == pytest.approx(math.exp(-5.025), rel=1e-12)
        assert alpha[0].item() == pytest.approx(0.0066, abs=5e-5)
        assert sigma[0].item() == pytest.approx(math.sqrt(1 - math.exp(-10.05)), rel=1e-12)
        assert path.t_max == 1.0 - VP_EPS
    else:
        assert alpha[0] == 0.0 and sigma[0] == 1.0 and path.t_max == 1.0


def test_vp_is_variance_preserving_and_its_last_euler_step_is_finite():
    """alpha^2 + sigma^2 = 1; near t = 1 (s = 1 - t): (1 - t) sigma' ~ -sqrt(beta_min s) / 2
    -> 0, and one Euler step to t = 1 leaves sigma + s sigma' ~ sigma / 2 of the noise."""
    vp = get_path("vp")
    t = times(vp)
    torch.testing.assert_close(vp.alpha(t) ** 2 + vp.sigma(t) ** 2, torch.ones_like(t),
                               rtol=0, atol=1e-15)
    # 1 - alpha^2 = beta_min s (1 + O(s (beta_max - beta_min) / beta_min)): 2% at s = 1e-4
    s = torch.tensor([1e-4, 1e-5, 1e-6, 1e-8], dtype=F64)
    step = s * vp.d_sigma(1 - s)  # (1 - t) sigma'(t)
    torch.testing.assert_close(step, -(VP_BETA_MIN * s).sqrt() / 2, rtol=0.03, atol=0)
    left = vp.sigma(1 - s) + step  # the noise coefficient after the last Euler step
    torch.testing.assert_close(left, vp.sigma(1 - s) / 2, rtol=0.03, atol=0)
    assert (vp.alpha(1 - s) + s * vp.d_alpha(1 - s) - 1).abs().max() < 2 * (10 * s**2).max()


def test_linear_target_is_x1_minus_z_and_matches_the_teachers_operations_bitwise():
    linear = get_path("linear")
    gen = torch.Generator().manual_seed(1)
    x1, z = torch.randn(256, 2, 3, generator=gen), torch.randn(256, 2, 3, generator=gen)
    t = torch.rand(256, generator=gen)  # float32, as the teacher draws it
    t_b = t.view(-1, 1, 1)
    assert torch.equal(linear.target(x1, z, t), x1 - z)
    assert torch.equal(linear.interpolate(x1, z, t), (1.0 - t_b) * z + t_b * x1)


class Recorder(nn.Module):
    """v = 0; keeps the inputs of its calls."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))
        self.calls = []

    def forward(self, x, t):
        self.calls.append((x.detach().clone(), t.detach().clone()))
        return torch.zeros_like(x) + 0 * self.unused


@pytest.mark.parametrize("name", ["cosine", "vp"])
def test_teacher_trains_on_the_path(name):
    """The first step's inputs are x_t = alpha x1 + sigma z at t = t_max r (r the step's draw),
    and with v = 0 its loss is mean(u^2), u = alpha' x1 + sigma' z: written here from the
    formulas of the module doc, in float64."""
    data = torch.randn(40, 2, generator=torch.Generator().manual_seed(3))
    model = Recorder()
    config = TeacherConfig(iterations=1, batch_size=8, warmup=0, device="cpu", progress=False,
                           log_every=1, seed=4, path=name)
    result = train_teacher(model, data, config)
    gen = step_generator(4, 0)
    index = torch.randint(len(data), (8,), generator=gen)
    z = torch.randn((8, 2), generator=gen).double()
    r = torch.rand(8, generator=gen)
    x1 = data[index].double()
    t = (r * get_path(name).t_max).double()[:, None]  # (8, 1), as trained: in float32
    if name == "cosine":
        a, s = torch.sin(math.pi * t / 2), torch.cos(math.pi * t / 2)
        da, ds = math.pi / 2 * s, -math.pi / 2 * a
    else:
        u = 1 - t
        beta = 0.1 + 19.9 * u
        a = torch.exp(-19.9 * u**2 / 4 - 0.05 * u)
        s = torch.sqrt(1 - a**2)
        da, ds = a * beta / 2, -a**2 * beta / (2 * s)
    x_seen, t_seen = model.calls[0]
    assert t_seen.max() < get_path(name).t_max
    torch.testing.assert_close(t_seen.double(), t[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(x_seen.double(), a * x1 + s * z, rtol=1e-6, atol=1e-6)
    expected = float(((da * x1 + ds * z) ** 2).mean())
    assert result.losses[0, 1] == pytest.approx(expected, rel=1e-5)


def test_a_bad_path_is_refused_by_name():
    with pytest.raises(ValueError, match=r"path must be one of \['cosine', 'linear', 'vp'\]"):
        TeacherConfig(path="ddpm")
    with pytest.raises(ValueError, match="path must be one of"):
        TeacherConfig(path=None)
    with pytest.raises(ValueError, match="path must be one of"):
        get_path("Linear")
    from tasks.runtime.params import ParamsError, build_params

    with pytest.raises(ParamsError, match=r"^teacher\.path must be one of"):
        build_params({"teacher": {"path": "ddpm"}})


def test_a_fine_grid_past_t_max_is_refused():
    """The fine grid's last interior point 1 - 1 / N must be <= t_max (vp: N <= 1000)."""
    from tasks.runtime.params import ParamsError, build_params

    vp = get_path("vp")
    vp.check_grid(uniform_grid(1000))
    with pytest.raises(ValueError, match="t_max"):
        vp.check_grid(uniform_grid(1001))
    get_path("linear").check_grid(uniform_grid(10**6))
    assert build_params({"teacher": {"path": "vp"}}).teacher.path == "vp"
    with pytest.raises(ParamsError, match=r"teacher\.path=vp: sweep\.n_steps: .* t = 0\.9995"):
        build_params({"teacher": {"path": "vp"}, "sweep": {"n_steps": 2000}})


def test_mixture_field_with_one_component_is_the_gaussian_field():
    gauss = GaussianField(torch.tensor([0.7, -1.2], dtype=F64), 0.3)
    mixture = MixtureField([1.0], [[0.7, -1.2]], [0.3], get_path("linear"))
    gen = torch.Generator().manual_seed(2)
    t = torch.rand(300, generator=gen, dtype=F64) * 0.999
    x = 2 * torch.randn(300, 2, generator=gen, dtype=F64)
    torch.testing.assert_close(mixture(x, t), gauss(x, t), rtol=1e-12, atol=1e-12)


def midpoint(field, x, n_steps: int, t_end: float = 1.0):
    """The explicit midpoint rule (2nd order) on a uniform grid; it never evaluates t_end."""
    h = t_end / n_steps
    for k in range(n_steps):
        t = torch.full((x.shape[0],), k * h, dtype=F64)
        x = x + h * field(x + h / 2 * field(x, t), t + h / 2)
    return x


@pytest.mark.parametrize("name", NAMES)
def test_integrating_the_mixture_field_reproduces_the_mixture(name):
    """From x_0 = alpha(0) x1 + sigma(0) z (pure noise but for vp), 200 midpoint steps reach
    the mixture: per-mode mass within 4 binomial std sqrt(pi (1 - pi) / n) = 0.02 (n = 10^4),
    per-mode mean within 4 s_k / sqrt(n_k) per coordinate, per-mode std within 6% (4 std of
    a std estimate, sqrt(1 / (2 n_k D)) <= 1.6% for n_k >= 2000)."""
    path = get_path(name)
    field = MixtureField(WEIGHTS, MEANS, STDS, path)
    gen = torch.Generator().manual_seed(0)
    n = 10_000
    x1, _ = field.sample(n, gen)
    z = torch.randn(n, 2, generator=gen, dtype=F64)
    x = midpoint(field, path.interpolate(x1, z, torch.zeros(n, dtype=F64)), 200)
    assert torch.isfinite(x).all()
    mode = torch.cdist(x, field.mu).argmin(1)  # (n,)
    for k, (pi_k, s_k) in enumerate(zip(WEIGHTS, STDS, strict=True)):
        mine = x[mode == k]
        assert abs(len(mine) / n - pi_k) < 4 * math.sqrt(pi_k * (1 - pi_k) / n)
        assert (mine.mean(0) - field.mu[k]).abs().max() < 4 * s_k / math.sqrt(len(mine))
        assert mine.std(0).max() / s_k - 1 < 0.06 and mine.std(0).min() / s_k - 1 > -0.06


def test_linear_and_cosine_fields_share_their_end_points():
    """With y = x / sigma and rho = alpha / sigma, dy/drho = E[x1 | y] for every path: paths
    with alpha(0) = 0, sigma(0) = 1 and alpha(1) = 1 (linear, cosine) carry each noise to the
    same end point, only at other times. So end points cannot tell these teachers apart; their
    velocities can (test_teacher_trained_on_each_path_matches_the_exact_field)."""
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(1000, 2, generator=gen, dtype=F64)
    ends = {name: midpoint(MixtureField(WEIGHTS, MEANS, STDS, get_path(name)), z, 200)
            for name in ("linear", "cosine")}
    assert (ends["linear"] - ends["cosine"]).norm(dim=1).max() < 1e-3  # measured 4e-4
    # vp starts at rho(0) = alpha(0) / sigma(0) ~ 0.0066, not 0: from pure noise its end points
    # move by ~ alpha(0) (median 0.0017; rms 0.045 from the rare noises near a mode boundary)
    vp_end = midpoint(MixtureField(WEIGHTS, MEANS, STDS, get_path("vp")), z, 200)
    assert (vp_end - ends["linear"]).norm(dim=1).median() < 0.01
    mid = {name: midpoint(MixtureField(WEIGHTS, MEANS, STDS, get_path(name)), z, 100, 0.5)
           for name in ("linear", "cosine")}
    assert (mid["linear"] - mid["cosine"]).norm(dim=1).mean() > 0.1  # other times


@pytest.fixture(scope="module")
def path_teachers():
    """One small 2-D MLP teacher per path on 2,000 points of the mixture (300 Adam steps)."""
    gen = torch.Generator().manual_seed(0)
    data = MixtureField(WEIGHTS, MEANS, STDS, get_path("linear")).sample(2000, gen)[0].float()
    teachers = {}
    for name in NAMES:
        model = build_model(ModelConfig(arch="mlp", hidden=64, depth=2, time_embed_dim=16),
                            (2,), seed=0)
        teachers[name] = train_teacher(model, data, TeacherConfig(
            iterations=300, batch_size=256, lr=3e-3, warmup=50, device="cpu", progress=False,
            path=name)).ema_model
    return teachers


def velocity_rmse(model, field, path) -> float:
    """sqrt(E ||v_model - v_exact||^2) over x_t of the path's own marginal, t ~ U[0, t_max)."""
    gen = torch.Generator().manual_seed(5)
    x1, _ = field.sample(2000, gen)
    z = torch.randn(2000, 2, generator=gen, dtype=F64)
    t = torch.rand(2000, generator=gen, dtype=F64) * path.t_max
    x_t = path.interpolate(x1, z, t)
    with torch.no_grad():
        v = model(x_t.float(), t.float()).double()
    return float((v - field(x_t, t)).pow(2).sum(1).mean().sqrt())


@pytest.mark.parametrize("name", NAMES)
def test_teacher_trained_on_each_path_matches_the_exact_field(path_teachers, name):
    """8 Euler steps from the same 500 noises: the teacher ends within RMSE 0.5 of the exact
    field's 8 steps (the mixture's spread is 2.0; measured 0.26-0.35), an untrained net far off
    (measured 1.39+). On the path's marginal the teacher's velocity errs by < 0.6 (measured
    0.25-0.37); the teachers of the other paths, read as this path's velocity, err by > 1
    (measured 1.12+), though their end points are close (test_linear_and_cosine_fields_...)."""
    path = get_path(name)
    field = MixtureField(WEIGHTS, MEANS, STDS, path)
    noise = sample_noise((2,), 1, 0, 500).double()
    grid = uniform_grid(8)
    exact = euler_sample(field, noise, grid)
    spread = float((exact - exact.mean(0)).pow(2).sum(1).mean().sqrt())
    assert spread > 1.8

    def endpoint_rmse(model) -> float:
        with torch.no_grad():
            x = euler_sample(model, noise.float(), grid).double()
        return float((x - exact).pow(2).sum(1).mean().sqrt())

    untrained = build_model(ModelConfig(arch="mlp", hidden=64, depth=2, time_embed_dim=16),
                            (2,), seed=0)
    assert endpoint_rmse(path_teachers[name]) < 0.5
    assert endpoint_rmse(untrained) > 1.0
    assert velocity_rmse(path_teachers[name], field, path) < 0.6
    for other in NAMES:
        if other != name:
            assert velocity_rmse(path_teachers[other], field, path) > 1.0, other


def test_the_default_teacher_path_is_linear():
    assert TeacherConfig().path == "linear" and TeacherConfig().to_dict()["path"] == "linear"
    assert np.isclose(get_path("linear").t_max, 1.0)
