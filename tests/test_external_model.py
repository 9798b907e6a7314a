"""Bring your own model: import paths, state_dict files, adapters and the ModelConfig fields."""

from __future__ import annotations

import json
from pathlib import Path

import byo_models
import pytest
import torch
import yaml
from safetensors.torch import save_file
from torch import nn

from boss_core.models import (
    ModelConfig,
    VelocityMLP,
    build_model,
    build_pretrained,
    import_object,
    inner_network,
    load_state_dict_file,
    load_weights,
    wrap_adapter,
)
from boss_core.velocity import DiffusersFlowAdapter, RectifiedFlowAdapter, evaluate_velocity

TINY = {"arch": "import", "import_path": "byo_models:TinyVelocity",
        "init_kwargs": {"dim": 4, "hidden": 8}}


def tiny_config(**changes) -> ModelConfig:
    return ModelConfig(**{**TINY, **changes})


def save_state(state: dict, path: Path) -> Path:
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


def inputs(dim: int = 4, batch: int = 5):
    gen = torch.Generator().manual_seed(3)
    return torch.randn(batch, dim, generator=gen), torch.rand(batch, generator=gen)


# --- import paths -------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["byo_models:TinyVelocity", "byo_models.TinyVelocity"])
def test_import_object_resolves_both_spellings(path):
    assert import_object(path) is byo_models.TinyVelocity


def test_import_object_resolves_nested_attributes_and_library_classes():
    assert import_object("torch.nn:Linear") is nn.Linear
    assert import_object("torch:nn.Linear") is nn.Linear


@pytest.mark.parametrize("path, named", [
    ("no_such_module_xyz:Net", "no_such_module_xyz"),
    ("byo_models:NoSuchClass", "NoSuchClass"),
    ("byo_models:NOT_CALLABLE", "NOT_CALLABLE"),
    ("TinyVelocity", "TinyVelocity"),          # no module part
    ("byo models:Tiny", "byo models"),         # not identifiers
])
def test_import_object_errors_name_the_path(path, named):
    with pytest.raises(ValueError, match="import_path") as info:
        import_object(path)
    assert named in str(info.value)


def test_build_model_refuses_a_factory_that_returns_no_module():
    config = ModelConfig(arch="import", import_path="byo_models:make_not_a_module")
    with pytest.raises(ValueError, match=r"make_not_a_module.*not a torch\.nn\.Module"):
        build_model(config, (4,))


def test_build_model_reports_bad_init_kwargs():
    with pytest.raises(ValueError, match="init_kwargs.*widht"):
        build_model(tiny_config(init_kwargs={"widht": 3}), (4,))


def test_import_arch_builds_the_class_with_init_kwargs_under_the_seed():
    model = build_model(tiny_config(), (4,), seed=0)
    assert type(model) is byo_models.TinyVelocity
    assert model.body[0].in_features == 5 and model.body[0].out_features == 8
    # the same seed gives the same weights whatever the global RNG; the global RNG is untouched
    torch.manual_seed(123)
    before = torch.get_rng_state()
    again = build_model(tiny_config(), (4,), seed=0)
    assert torch.equal(torch.get_rng_state(), before)
    other = build_model(tiny_config(), (4,), seed=1)
    for (k, a), b, c in zip(model.state_dict().items(), again.state_dict().values(),
                            other.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
        if k.endswith("weight"):
            assert not torch.equal(a, c), k
    # the caller's dict cannot change the frozen config afterwards
    kwargs = {"dim": 4, "hidden": 8}
    config = tiny_config(init_kwargs=kwargs)
    kwargs["hidden"] = 99
    assert config.init_kwargs == {"dim": 4, "hidden": 8}


# --- ModelConfig fields -------------------------------------------------------------------


def test_model_config_round_trips_with_arch_import():
    config = tiny_config(init_kwargs={"dim": 4, "hidden": 8, "extra": {"a": [1, 2]}},
                         adapter="rectified_flow", weights="teacher.safetensors")
    values = config.to_dict()
    assert isinstance(values["init_kwargs"], dict)
    assert values["init_kwargs"] == {"dim": 4, "hidden": 8, "extra": {"a": [1, 2]}}
    assert ModelConfig.from_dict(values) == config
    # through JSON and YAML (params.yaml) too, and equal configs hash equally
    assert ModelConfig.from_dict(json.loads(json.dumps(values))) == config
    again = ModelConfig.from_dict(yaml.safe_load(yaml.safe_dump(values)))
    assert again == config and hash(again) == hash(config)
    assert config != tiny_config(init_kwargs={"dim": 4, "hidden": 9})


def test_model_config_defaults_are_unchanged():
    config = ModelConfig()
    assert (config.arch, config.adapter, config.import_path, config.init_kwargs,
            config.weights) == ("unet", "plain", None, None, None)
    assert ModelConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("values, field", [
    ({"arch": "import"}, "import_path"),
    ({"arch": "import", "import_path": "not a path"}, "import_path"),
    ({"arch": "import", "import_path": 3}, "import_path"),
    ({"arch": "mlp", "import_path": "byo_models:TinyVelocity"}, "import_path"),
    ({"arch": "mlp", "init_kwargs": {"dim": 2}}, "init_kwargs"),
    ({**TINY, "init_kwargs": [1, 2]}, "init_kwargs"),
    ({**TINY, "init_kwargs": {"not an identifier": 1}}, "init_kwargs"),
    ({"adapter": "bogus"}, "adapter"),
    ({**TINY, "adapter": "Diffusers"}, "adapter"),
    ({"weights": ""}, "weights"),
    ({"weights": 3}, "weights"),
    ({"arch": "transformer"}, "arch"),
])
def test_model_config_errors_start_with_the_field(values, field):
    with pytest.raises(ValueError, match=f"^{field} "):
        ModelConfig.from_dict(values)


def test_weights_accepts_a_path_object(tmp_path):
    config = ModelConfig(arch="mlp", weights=tmp_path / "w.pt")
    assert config.weights == str(tmp_path / "w.pt")


# --- state_dict files ---------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".pth"])
@pytest.mark.parametrize("adapter", ["plain", "rectified_flow"])
def test_saved_weights_load_back_bit_identically(tmp_path, suffix, adapter):
    original = build_model(tiny_config(), (4,), seed=0)
    with torch.no_grad():
        original.scale.mul_(1.5)  # a buffer must travel too
    path = save_state(original.state_dict(), tmp_path / f"teacher{suffix}")
    config = tiny_config(adapter=adapter, weights=str(path))
    x, t = inputs()

    fresh = build_model(config, (4,), seed=1)  # the oracle can fail: other init, other output
    assert not torch.equal(inner_network(fresh)(x, t), original(x, t))

    loaded = build_pretrained(config, (4,), seed=1)
    assert not loaded.training
    net = inner_network(loaded)
    assert type(net) is byo_models.TinyVelocity
    for key, value in original.state_dict().items():
        assert torch.equal(net.state_dict()[key], value), key
    assert torch.equal(net(x, t), original(x, t))
    if adapter == "plain":
        assert loaded is net
    else:
        assert isinstance(loaded, RectifiedFlowAdapter)
        assert torch.equal(loaded(x, t), original(x, (1e-3 + (1 - 1e-3) * t) * 999.0))


@pytest.mark.parametrize("key", ["state_dict", "model"])
def test_checkpoint_dicts_are_unwrapped(tmp_path, key):
    original = build_model(tiny_config(), (4,), seed=0)
    path = tmp_path / "ckpt.pt"
    torch.save({key: original.state_dict(), "step": 10, "optimizer": {"lr": 1e-3}}, path)
    loaded = build_pretrained(tiny_config(weights=str(path)), (4,))
    x, t = inputs()
    assert torch.equal(loaded(x, t), original(x, t))


def test_builtin_arch_takes_weights_too(tmp_path):
    config = ModelConfig(arch="mlp", hidden=32, depth=1, time_embed_dim=8)
    original = build_model(config, (2,), seed=0)
    path = save_state(original.state_dict(), tmp_path / "mlp.safetensors")
    loaded = build_pretrained(ModelConfig(**{**config.to_dict(), "weights": str(path)}), (2,),
                              seed=5)
    x, t = inputs(dim=2)
    assert isinstance(loaded, VelocityMLP)
    assert torch.equal(loaded(x, t), original(x, t))


def test_missing_file_names_the_file(tmp_path):
    path = tmp_path / "absent.safetensors"
    with pytest.raises(ValueError, match="absent.safetensors"):
        load_state_dict_file(path)
    with pytest.raises(ValueError, match="absent.safetensors"):
        build_pretrained(tiny_config(weights=str(path)), (4,))


@pytest.mark.parametrize("name", ["corrupt.safetensors", "corrupt.pt"])
def test_corrupt_file_names_the_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\x00\x01 definitely not a checkpoint " * 10)
    with pytest.raises(ValueError, match=name):
        load_state_dict_file(path)


def test_truncated_file_names_the_file(tmp_path):
    path = save_state(build_model(tiny_config(), (4,)).state_dict(), tmp_path / "cut.pt")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.pt"):
        load_state_dict_file(path)


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "pickled.pt"
    torch.save({"body.0.weight": torch.zeros(2), "extra": byo_models.Opaque("boom")}, path)
    # the file is intact: a full unpickle reads it, so the refusal is weights_only's doing
    byo_models.UNPICKLED.clear()
    full = torch.load(path, weights_only=False)
    assert isinstance(full["extra"], byo_models.Opaque)
    assert byo_models.UNPICKLED == ["boom"]
    byo_models.UNPICKLED.clear()
    with pytest.raises(ValueError, match="pickled.pt.*weights_only"):
        load_state_dict_file(path)
    assert byo_models.UNPICKLED == []  # no code from the file ran


@pytest.mark.parametrize("content", [[1, 2, 3], {"lr": 0.1}, {}])
def test_not_a_state_dict_names_the_file(tmp_path, content):
    path = tmp_path / "odd.pt"
    torch.save(content, path)
    with pytest.raises(ValueError, match="odd.pt.*state_dict"):
        load_state_dict_file(path)


def test_wrong_keys_name_the_file_and_the_keys(tmp_path):
    state = build_model(tiny_config(), (4,)).state_dict()
    state["body.9.weight"] = state.pop("body.2.weight")
    path = save_state(state, tmp_path / "renamed.safetensors")
    with pytest.raises(ValueError, match="renamed.safetensors") as info:
        build_pretrained(tiny_config(weights=str(path)), (4,))
    message = str(info.value)
    assert "TinyVelocity" in message
    assert "missing keys ['body.2.weight']" in message
    assert "unexpected keys ['body.9.weight']" in message


def test_wrong_shapes_name_the_file(tmp_path):
    other = build_model(tiny_config(init_kwargs={"dim": 4, "hidden": 16}), (4,))
    path = save_state(other.state_dict(), tmp_path / "wide.pt")
    with pytest.raises(ValueError, match="wide.pt.*TinyVelocity"):
        build_pretrained(tiny_config(weights=str(path)), (4,))


def test_adapter_wrapped_state_dicts_get_a_hint(tmp_path):
    wrapped = build_model(tiny_config(adapter="rectified_flow"), (4,))
    assert all(k.startswith("net.") for k in wrapped.state_dict())
    path = save_state(wrapped.state_dict(), tmp_path / "wrapped.pt")
    with pytest.raises(ValueError, match="inner_network"):
        build_pretrained(tiny_config(adapter="rectified_flow", weights=str(path)), (4,))
    # saving the inner network is the documented way, and it loads
    path = save_state(inner_network(wrapped).state_dict(), tmp_path / "inner.pt")
    loaded = build_pretrained(tiny_config(adapter="rectified_flow", weights=str(path)), (4,))
    x, t = inputs()
    assert torch.equal(loaded(x, t), wrapped(x, t))


def test_load_weights_without_a_source_names_the_model():
    model = byo_models.TinyVelocity(dim=4, hidden=8)
    with pytest.raises(ValueError, match="TinyVelocity.*missing keys"):
        load_weights(model, {})


def test_build_pretrained_needs_weights():
    with pytest.raises(ValueError, match="^weights "):
        build_pretrained(tiny_config(), (4,))


# --- adapters -----------------------------------------------------------------------------


def probe(adapter: str) -> nn.Module:
    return build_model(ModelConfig(arch="import", import_path="byo_models:TimeProbe",
                                   adapter=adapter), (3,))


@pytest.mark.parametrize("t, label", [(0.0, 0.999), (0.5, 0.5005 * 999), (1.0, 999.0)])
def test_rectified_flow_adapter_feeds_the_eps_shifted_label(t, label):
    """The net sees (eps + (1 - eps) t) * 999 with eps = 1e-3; its output is v unchanged."""
    model = probe("rectified_flow")
    x = torch.randn(4, 3, dtype=torch.float64)
    out = evaluate_velocity(model.double(), x, t, step=0)
    assert torch.allclose(out, torch.full_like(x, label), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("t, timestep", [(0.0, 1000.0), (0.25, 750.0), (1.0, 0.0)])
def test_diffusers_adapter_feeds_sigma_timesteps_and_negates(t, timestep):
    """The net sees timestep = (1 - t) * 1000 and predicts noise - data, so v = -output."""
    model = probe("diffusers")
    x = torch.randn(4, 3, dtype=torch.float64)
    out = evaluate_velocity(model.double(), x, t, step=0)
    assert torch.allclose(out, torch.full_like(x, -timestep), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("return_tuple", [False, True])
def test_diffusers_adapter_unwraps_outputs(return_tuple):
    config = ModelConfig(arch="import", import_path="byo_models:TinyDiffusersNet",
                         init_kwargs={"dim": 4, "return_tuple": return_tuple},
                         adapter="diffusers")
    model = build_model(config, (4,), seed=0)
    assert isinstance(model, DiffusersFlowAdapter)
    x, t = inputs()
    raw = model.net(x, (1.0 - t) * 1000.0)
    raw = raw[0] if return_tuple else raw.sample
    assert torch.equal(model(x, t), -raw)


def test_adapters_apply_to_builtin_arches():
    config = ModelConfig(arch="mlp", hidden=16, depth=1, time_embed_dim=8,
                         adapter="rectified_flow")
    model = build_model(config, (2,), seed=0)
    assert isinstance(model, RectifiedFlowAdapter) and isinstance(model.net, VelocityMLP)
    assert all(k.startswith("net.") for k in model.state_dict())
    x, t = inputs(dim=2)
    assert torch.equal(model(x, t), model.net(x, (1e-3 + (1 - 1e-3) * t) * 999.0))


def test_wrap_adapter_names_the_field():
    net = byo_models.TinyVelocity()
    assert wrap_adapter(net, "plain") is net
    assert inner_network(net) is net
    with pytest.raises(ValueError, match="^adapter .*bogus"):
        wrap_adapter(net, "bogus")
