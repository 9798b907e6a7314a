"""Diffusion denoisers as velocity models: closed-form Gaussian oracles for every noise schedule
and prediction type, diffusers' own DDIM and Euler loops on a tiny random UNet2DModel, the
schedule export, the config keys and the bring-your-own-model path."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from fields import GaussianField

from boss_core.denoisers import DenoiserAdapter, DenoiserConfig
from boss_core.models import ModelConfig, build_model, build_pretrained, inner_network
from boss_core.noise_schedules import vp_alphas_cumprod
from boss_core.sampling import euler_sample
from boss_core.schedule import Schedule
from tasks.runtime.params import ParamsError, load_params

diffusers = pytest.importorskip("diffusers")
PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"

UNET_KWARGS = {"sample_size": 8, "in_channels": 1, "out_channels": 1,
               "block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4,
               "down_block_types": ["DownBlock2D", "DownBlock2D"],
               "up_block_types": ["UpBlock2D", "UpBlock2D"]}
DDPM = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
        "beta_schedule": "linear"}


def tiny_unet(seed: int = 0):
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(**UNET_KWARGS).eval()


def col(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


# --- the closed-form oracle ---------------------------------------------------------------


class GaussianDenoiser(torch.nn.Module):
    """The exact eps / x0 / v of data N(mu, s^2 I) under x = alpha x0 + sigma eps.

    With r = x - alpha mu and q = alpha^2 s^2 + sigma^2 (the variance of x):
    E[x0 | x] = mu + alpha s^2 r / q, E[eps | x] = sigma r / q, v = alpha eps - sigma x0.
    (alpha, sigma) come from the time input by the oracle's own decoding ``decode``.
    """

    def __init__(self, mu, s, prediction, decode):
        super().__init__()
        self.mu, self.s, self.prediction, self.decode = mu, s, prediction, decode

    def forward(self, x, timestep):
        alpha, sigma = (col(v, x) for v in self.decode(timestep.double()))
        x = x.double()
        r = x - alpha * self.mu
        q = alpha**2 * self.s**2 + sigma**2
        x0, eps = self.mu + alpha * self.s**2 * r / q, sigma * r / q
        return {"epsilon": eps, "sample": x0, "v_prediction": alpha * eps - sigma * x0}[
            self.prediction]


def vp_decoder(acp: np.ndarray):
    """timestep (fractional) -> (alpha, sigma), log-SNR linear between table entries."""
    lam = np.log(acp) - np.log1p(-acp)

    def decode(timestep):
        snr = np.interp(timestep.numpy(), np.arange(len(acp)), lam)
        alpha2 = torch.from_numpy(1.0 / (1.0 + np.exp(-snr)))
        return alpha2.sqrt(), (1.0 - alpha2).sqrt()
    return decode


def ve_decoder(kind: str):
    def decode(timestep):
        sigma = timestep if kind == "sigma" else torch.exp(4.0 * timestep)
        return torch.ones_like(sigma), sigma
    return decode


CASES = {  # name: (config keys, the oracle's decoder)
    "vp-linear": ({}, vp_decoder(vp_alphas_cumprod())),
    "vp-cosine": ({"beta_schedule": "squaredcos_cap_v2"},
                  vp_decoder(vp_alphas_cumprod(beta_schedule="squaredcos_cap_v2"))),
    "ve-sigma": ({"noise_schedule": "ve"}, ve_decoder("sigma")),
    "ve-c_noise": ({"noise_schedule": "ve", "ve_timestep": "c_noise", "sigma_max": 20.0},
                   ve_decoder("c_noise")),
}


@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("case", list(CASES))
def test_exact_predictions_give_the_exact_linear_path_velocity(case, prediction):
    keys, decode = CASES[case]
    mu = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    s = 0.3
    config = DenoiserConfig(prediction=prediction, **keys)
    adapter = DenoiserAdapter(GaussianDenoiser(mu, s, prediction, decode), config)
    noise = adapter.noise
    gen = torch.Generator().manual_seed(0)
    t = noise.t_min + (noise.t_max - noise.t_min) * torch.rand(64, generator=gen,
                                                              dtype=torch.float64)
    if hasattr(noise, "times_of"):  # table points too
        t[:8] = torch.from_numpy(noise.times_of([0, 1, 7, 100, 500, 998, 999, 3]))
    t[-2:] = torch.tensor([noise.t_min, noise.t_max], dtype=torch.float64)
    x = torch.randn(64, 3, generator=gen, dtype=torch.float64) * 2.0
    torch.testing.assert_close(adapter(x, t), GaussianField(mu, s)(x, t), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("prediction", ["sample", "v_prediction"])
def test_zero_terminal_snr_is_exact_at_t_0(prediction):
    acp = vp_alphas_cumprod(rescale_zero_snr=True)
    assert acp[-1] == 0.0
    mu, s = torch.tensor([1.0, -0.5], dtype=torch.float64), 0.5
    config = DenoiserConfig(prediction=prediction, rescale_betas_zero_snr=True)
    adapter = DenoiserAdapter(GaussianDenoiser(mu, s, prediction, vp_decoder(acp[:-1])), config)
    x = torch.randn(5, 2, dtype=torch.float64)
    # at t = 0 (SNR 0) x~ is the noise itself: v = E[x0] - x~
    adapter.net.decode = lambda ts: (torch.zeros_like(ts), torch.ones_like(ts))
    torch.testing.assert_close(adapter(x, torch.zeros(5, dtype=torch.float64)), mu - x,
                               rtol=0, atol=1e-15)


def test_outside_the_range_the_ends_hold_x0_and_the_noise_of_x():
    """t = 0 evaluates the net at t_min and uses eps_hat = x~ (pure noise); the last Euler
    jump from any t < 1 lands exactly on x0_hat, inside the range or above t_max."""
    mu, s = torch.tensor([0.5, -1.0], dtype=torch.float64), 0.3
    config = DenoiserConfig(prediction="epsilon")
    seen = []

    def probe(x, timestep):
        seen.append((x.clone(), timestep.clone()))
        return GaussianDenoiser(mu, s, "epsilon", vp_decoder(vp_alphas_cumprod()))(x, timestep)

    adapter = DenoiserAdapter(probe, config)
    noise = adapter.noise
    z = torch.randn(4, 2, dtype=torch.float64)
    v = adapter(z, torch.zeros(4, dtype=torch.float64))
    x_in, timestep = seen[-1]
    assert torch.equal(timestep, torch.full((4,), 999.0, dtype=torch.float64))
    a_T, s_T = noise.alphas[-1], noise.sigmas[-1]
    torch.testing.assert_close(x_in, z * (a_T + s_T), rtol=1e-15, atol=0)
    eps = probe(x_in, timestep)
    x0 = (x_in - s_T * eps) / a_T
    torch.testing.assert_close(v, x0 - z, rtol=1e-12, atol=1e-12)
    for t_last in (0.3, noise.t_max, 0.995, 0.9999):  # inside and above t_max = 0.990
        t = torch.full((4,), t_last, dtype=torch.float64)
        x1 = euler_sample(adapter, z, [0.0, t_last, 1.0])
        x_t = z + t_last * adapter(z, torch.zeros_like(t))
        adapter(x_t, t)
        x_in, timestep = seen[-1]
        alpha, sigma, _ = noise.at(t)
        x0 = (x_in - col(sigma, x_in) * probe(x_in, timestep)) / col(alpha, x_in)
        torch.testing.assert_close(x1, x0, rtol=1e-12, atol=1e-12)


def test_table_times_are_exact_in_float32_and_between_them_match_diffusers():
    config = DenoiserConfig()
    noise = config.noise()
    taus = np.array([999, 749, 500, 1, 0])
    t32 = torch.from_numpy(noise.times_of(taus)).float()  # as the samplers hand it over
    alpha, sigma, timestep = noise.at(t32)
    assert torch.equal(timestep, torch.from_numpy(taus).double())
    assert torch.equal(alpha, torch.from_numpy(np.sqrt(noise.alphas_cumprod[taus])))
    assert torch.equal(sigma, torch.from_numpy(np.sqrt(1.0 - noise.alphas_cumprod[taus])))
    times = np.array([0.05, 0.2, 0.55, 0.9, 0.98])
    euler = diffusers.EulerDiscreteScheduler(**DDPM)
    euler.set_timesteps(sigmas=[*((1 - times) / times), 0.0])
    _, _, timestep = noise.at(torch.from_numpy(times))
    assert (timestep.numpy() % 1 > 0.01).any()  # some really lie between table points
    np.testing.assert_allclose(timestep.numpy(), euler.timesteps.numpy(), rtol=0, atol=2e-3)


@pytest.mark.parametrize("keys", [
    {"beta_schedule": "linear"},
    {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    {"beta_schedule": "squaredcos_cap_v2"},
    {"beta_schedule": "linear", "rescale_betas_zero_snr": True},
])
def test_vp_tables_equal_diffusers(keys):
    ours = DenoiserConfig(prediction="v_prediction", **keys).vp_table()
    theirs = diffusers.DDPMScheduler(num_train_timesteps=1000, **keys).alphas_cumprod
    assert np.array_equal(ours, theirs.double().numpy())


# --- diffusers' own samplers --------------------------------------------------------------


def ddim(unet, prediction: str, nfe: int, **keys):
    scheduler = diffusers.DDIMScheduler(**{**DDPM, **keys}, prediction_type=prediction,
                                        clip_sample=False, set_alpha_to_one=True,
                                        timestep_spacing="trailing")
    scheduler.set_timesteps(nfe)
    return scheduler


@torch.no_grad()
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_euler_equals_diffusers_ddim_loop(prediction):
    """Ours on t(tau_1), ..., t(tau_{K-1}), 1 from t = 0; diffusers' DDIM on tau_0 .. tau_{K-1}
    from x_T = (alpha_T + sigma_T) z. The first step differs only as documented: ours re-noises
    with the noise z itself (t = 0 is pure noise) where DDIM uses its eps_hat."""
    unet, nfe = tiny_unet(), 4
    adapter = DenoiserAdapter(unet, DenoiserConfig(prediction=prediction))
    noise = adapter.noise
    scheduler = ddim(unet, prediction, nfe)
    taus = scheduler.timesteps.numpy()  # 999, 749, 499, 249: DDIM steps tau -> tau - T // K
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    ours = euler_sample(adapter, z, [0.0, *noise.times_of(taus[1:]), 1.0])

    x = z * float(noise.alphas[taus[0]] + noise.sigmas[taus[0]])
    for k, tau in enumerate(scheduler.timesteps):
        out = scheduler.step(unet(x, tau).sample, tau, x)
        x = out.prev_sample
        if k == 0:  # t = 0 is pure noise: eps_hat = z
            x = float(noise.alphas[taus[1]]) * out.pred_original_sample + float(
                noise.sigmas[taus[1]]) * z
    scale = float(x.abs().max())  # an epsilon model's random x0_hat is large at tau = 999
    torch.testing.assert_close(ours, x, rtol=0, atol=4e-6 * max(scale, 1.0))
    assert not torch.allclose(ours, z, atol=0.1)


@torch.no_grad()
@pytest.mark.parametrize("prediction", ["v_prediction", "sample"])
def test_euler_equals_the_unmodified_ddim_loop_at_zero_terminal_snr(prediction):
    """With acp_{T-1} = 0 the first timestep is t = 0 itself: nothing is clamped."""
    unet = tiny_unet(1)
    adapter = DenoiserAdapter(unet, DenoiserConfig(prediction=prediction,
                                                   rescale_betas_zero_snr=True))
    scheduler = ddim(unet, prediction, 5, rescale_betas_zero_snr=True)
    grid = [*adapter.noise.times_of(scheduler.timesteps.numpy()), 1.0]
    assert grid[0] == 0.0
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    ours = euler_sample(adapter, z, grid)
    x = z
    for tau in scheduler.timesteps:
        x = scheduler.step(unet(x, tau).sample, tau, x).prev_sample
    torch.testing.assert_close(ours, x, rtol=0, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_diffusers_euler_fed_our_schedule_export_gives_our_samples(prediction):
    unet = tiny_unet(2)
    adapter = DenoiserAdapter(unet, DenoiserConfig(prediction=prediction))
    schedule = Schedule(times=[0.0, 0.2, 0.55, 0.9, 1.0], name="bellman")  # off the table
    sigmas = schedule.to_denoiser_sigmas(adapter.noise.sigma_ratio_max)
    assert sigmas[-1] == 0.0 and sigmas.shape == (schedule.nfe + 1,)
    scheduler = diffusers.EulerDiscreteScheduler(**DDPM, prediction_type=prediction)
    scheduler.set_timesteps(sigmas=sigmas)
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    ours = euler_sample(adapter, z, schedule.times)

    x = (1.0 + sigmas[0]) * z  # diffusers' Euler state is x / alpha = x~ (1 + sigma / alpha)
    for k, tau in enumerate(scheduler.timesteps):
        out = unet(scheduler.scale_model_input(x, tau), tau).sample
        step = scheduler.step(out, tau, x)
        x = step.prev_sample
        if k == 0:  # t = 0 is pure noise: eps_hat = z
            x = step.pred_original_sample + float(sigmas[1]) * z
    scale = float(x.abs().max())
    torch.testing.assert_close(ours, x, rtol=0, atol=4e-6 * max(scale, 1.0))


def test_schedule_export_refuses_an_infinite_sigma_max():
    with pytest.raises(ValueError, match="sigma_max"):
        Schedule(times=[0.0, 0.5, 1.0]).to_denoiser_sigmas(math.inf)


# --- checkpoint quirks --------------------------------------------------------------------


class VarianceNet(torch.nn.Module):
    """Outputs (eps, variance) on 2C channels and takes labels as ``class_labels``."""

    def forward(self, x, timestep, class_labels=None):
        eps = 0.5 * x + class_labels.view(-1, 1, 1, 1).to(x.dtype)
        return (torch.cat([eps, torch.full_like(x, 7.0)], dim=1),)


def test_learned_variance_and_label_key_stay_inside_the_adapter():
    x, y = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.tensor([1, 2])
    t = torch.full((2,), 0.5, dtype=torch.float64)
    config = DenoiserConfig(learned_variance=True, label_key="class_labels")
    v = DenoiserAdapter(VarianceNet(), config)(x, t, y=y)
    alpha, sigma, _ = config.noise().at(t)
    x_net = x * col(alpha + sigma, x)
    eps = 0.5 * x_net + col(y.double(), x)
    torch.testing.assert_close(v, (x_net - col(sigma, x) * eps) / col(alpha, x) - eps)
    with pytest.raises(ValueError, match="model.denoiser.learned_variance"):
        DenoiserAdapter(VarianceNet(), DenoiserConfig(label_key="class_labels"))(x, t, y=y)


# --- config -------------------------------------------------------------------------------


@pytest.mark.parametrize(("denoiser", "named"), [
    ({"prediction": "noise"}, "model.denoiser.prediction"),
    ({"noise_schedule": "edm"}, "model.denoiser.noise_schedule"),
    ({"beta_schedule": "cosine"}, "model.denoiser.beta_schedule"),
    ({"num_train_timesteps": 1}, "model.denoiser.num_train_timesteps"),
    ({"beta_start": 0.5, "beta_end": 0.1}, "model.denoiser.beta_end"),
    ({"sigma_min": 0.0}, "model.denoiser.sigma_min"),
    ({"ve_timestep": "log"}, "model.denoiser.ve_timestep"),
    ({"alphas_cumprod": [0.5, 0.9]}, "model.denoiser.alphas_cumprod"),
    ({"rescale_betas_zero_snr": True}, "model.denoiser.prediction"),  # epsilon at SNR 0
    ({"learned_variance": "yes"}, "model.denoiser.learned_variance"),
    ({"label_key": "class labels"}, "model.denoiser.label_key"),
    ({"predicton": "epsilon"}, "model.denoiser.predicton"),
])
def test_bad_denoiser_keys_fail_before_compute_naming_the_key(denoiser, named):
    with pytest.raises(ParamsError) as err:
        load_params(PARAMS, {"model.adapter": "denoiser", "model.denoiser": denoiser})
    assert str(err.value).startswith(named), str(err.value)


def test_denoiser_keys_need_the_denoiser_adapter_and_defaults_stay_plain():
    params = load_params(PARAMS)
    assert params.model.adapter == "plain" and params.model.denoiser == DenoiserConfig()
    with pytest.raises(ParamsError, match=r"^model\.denoiser keys only apply"):
        load_params(PARAMS, {"model.denoiser": {"prediction": "v_prediction"}})
    ok = load_params(PARAMS, {"model.adapter": "denoiser",
                              "model.denoiser": {"prediction": "v_prediction"}})
    assert ok.model.denoiser.prediction == "v_prediction"
    assert ok.flat()["model.denoiser.prediction"] == "v_prediction"


# --- bring your own diffusers model -------------------------------------------------------


def test_a_diffusers_unet_through_the_model_config(tmp_path):
    """params.yaml's way in: arch import of diffusers:UNet2DModel with init_kwargs, a weights
    file, adapter denoiser; the pipeline's model file round-trips it."""
    import yaml
    from safetensors.torch import save_file

    from tasks.runtime.artifacts import model_builder
    from tasks.runtime.io import load_model, save_model

    unet = tiny_unet(3)
    save_file(unet.state_dict(), str(tmp_path / "unet.safetensors"))
    values = {"arch": "import", "import_path": "diffusers:UNet2DModel",
              "init_kwargs": UNET_KWARGS, "adapter": "denoiser",
              "denoiser": {"prediction": "v_prediction", "beta_schedule": "scaled_linear",
                           "beta_start": 0.00085, "beta_end": 0.012},
              "weights": str(tmp_path / "unet.safetensors")}
    config = ModelConfig.from_dict(yaml.safe_load(yaml.safe_dump(values)))  # as params.yaml
    model = build_pretrained(config, (1, 8, 8), seed=0)
    assert isinstance(model, DenoiserAdapter) and inner_network(model).__class__.__name__ == (
        "UNet2DModel")
    z = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    expected = DenoiserAdapter(unet, config.denoiser)
    grid = [0.0, 0.3, 0.7, 1.0]
    torch.testing.assert_close(euler_sample(model, z, grid), euler_sample(expected, z, grid),
                               rtol=0, atol=0)

    save_model(tmp_path / "model.safetensors", model, config.to_dict(), (1, 8, 8))
    loaded, meta = load_model(tmp_path / "model.safetensors",
                              model_builder("diffusers:UNet2DModel"))
    assert ModelConfig.from_dict(meta["model_config"]).denoiser == config.denoiser
    torch.testing.assert_close(euler_sample(loaded, z, grid), euler_sample(expected, z, grid),
                               rtol=0, atol=0)
    fresh = build_model(ModelConfig.from_dict({**config.to_dict(), "weights": None}), (1, 8, 8),
                        seed=1)
    assert not torch.allclose(euler_sample(fresh, z, grid), euler_sample(expected, z, grid))


@pytest.mark.e2e
@pytest.mark.slow
def test_a_diffusers_unet_runs_through_the_stages(tmp_path, monkeypatch):
    """The teacher stage loads the UNet with the denoiser adapter; cost and schedules search it.
    The stages run in this process (``tasks.runtime.step.main``, as ``python -m tasks.<step>``
    does), logging to the copy's own MLflow store."""
    import json

    import yaml
    from pipeline_helpers import copy_repo, run_steps_in_process
    from safetensors.torch import save_file

    from tasks.runtime.artifacts import load_teacher
    from tasks.runtime.workspace import Workspace

    repo = copy_repo(tmp_path / "repo")
    unet = tiny_unet(5)
    save_file(unet.state_dict(), str(repo / "data" / "unet.safetensors"))
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["model"].update(arch="import", import_path="diffusers:UNet2DModel",
                           init_kwargs=UNET_KWARGS, adapter="denoiser",
                           denoiser={**params["model"]["denoiser"], "prediction": "v_prediction"},
                           weights="data/unet.safetensors")
    params["sweep"].update(methods=["teacher", "uniform", "bellman"], nfes=[2])
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run_steps_in_process(repo, ("prepare", "teacher", "cost", "schedules"), monkeypatch)

    teacher = load_teacher(Workspace.at(repo), "cpu", "diffusers:UNet2DModel")
    expected = DenoiserAdapter(unet, DenoiserConfig(prediction="v_prediction"))
    z = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(6))
    grid = [0.0, 0.4, 1.0]
    torch.testing.assert_close(euler_sample(teacher, z, grid), euler_sample(expected, z, grid),
                               rtol=0, atol=0)
    bellman = json.loads((repo / "outputs/schedules/schedules.json").read_text())[
        "schedules"]["bellman"]["nfe_2"]
    assert bellman["times"][0] == 0.0 and bellman["times"][-1] == 1.0 and len(bellman["times"]) == 3
    assert bellman["cost"] is not None and bellman["cost"] > 0  # searched on the denoiser's paths
