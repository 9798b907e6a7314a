import pytest
import torch

from boss_core.bellman import bellman_schedule
from boss_core.cost import cost_matrix
from boss_core.data import make_gaussian_mixture
from boss_core.grids import uniform_grid
from boss_core.lora import (
    add_lora,
    load_lora_adapter,
    merge_lora,
    save_lora_adapter,
    trainable_fraction,
)
from boss_core.metrics import endpoint_rmse
from boss_core.models import ModelConfig, build_model
from boss_core.pairs import chord_pairs, holdout_mask
from boss_core.sampling import euler_sample
from boss_core.seeds import sample_noise
from boss_core.straighten import (
    CHECKPOINT_NAME,
    StraightenConfig,
    straighten,
    trainable_copy,
)
from boss_core.teacher import TeacherConfig, train_teacher

N, K = 32, 2


@pytest.fixture(scope="module")
def setup():
    """A small 2-D teacher on an 8-mode mixture (curved paths), its K-step Bellman schedule
    and chord pairs from 600 noises, 10% held out."""
    data = make_gaussian_mixture(2000, seed=0)
    teacher = build_model(ModelConfig(arch="mlp", hidden=64, depth=2, time_embed_dim=16),
                          (2,), seed=0)
    teacher = train_teacher(teacher, data.x, TeacherConfig(
        iterations=600, batch_size=256, lr=3e-3, device="cpu", progress=False)).ema_model
    cost = cost_matrix(teacher, sample_noise((2,), 1, 0, 300), N)
    sched = bellman_schedule(cost, K)
    pairs = chord_pairs(teacher, [sched], N, (2,), seed=2, start=0, count=600)[K]
    held = holdout_mask(pairs.sample, seed=2, fraction=0.1)
    return teacher, sched, pairs.subset(~held), pairs.subset(held)


def config(**kw):
    base = dict(iterations=300, batch_size=64, lr=2e-3, warmup=20, eval_every=50,
                checkpoint_every=0, device="cpu", progress=False, ema_decay=0.99)
    return StraightenConfig(**{**base, **kw})


def endpoint_error(model, sched, teacher):
    z = sample_noise((2,), 9, 0, 500)  # fresh noises
    reference = euler_sample(teacher, z, uniform_grid(N))
    return endpoint_rmse(euler_sample(model, z, sched.times), reference)



def test_fine_tuning_lowers_endpoint_error_at_target_k(setup):
    teacher, sched, train, val = setup
    before = endpoint_error(teacher, sched, teacher)
    result = straighten(trainable_copy(teacher), train, config(), val=val)
    after = endpoint_error(result.ema_model, sched, teacher)
    assert after < 0.6 * before, (before, after)
    assert result.val_losses[-1, 1] < result.val_losses[0, 1]
    assert result.trainable_params == result.total_params


def test_lora_trains_only_the_adapter(setup, tmp_path):
    teacher, sched, train, val = setup
    peft_model = add_lora(teacher, rank=2)
    base_before = {n: p.clone() for n, p in peft_model.named_parameters() if "lora_" not in n}
    lora_before = {n: p.clone() for n, p in peft_model.named_parameters() if "lora_" in n}
    result = straighten(peft_model, train, config(), val=val)
    params = dict(result.model.named_parameters())
    for name, value in base_before.items():
        assert torch.equal(params[name], value), name
        assert not params[name].requires_grad
    changed = [not torch.equal(params[n], v) for n, v in lora_before.items()]
    assert sum(changed) == len(changed)  # every adapter matrix moved
    assert 0 < result.trainable_params < 0.5 * result.total_params
    assert trainable_fraction(result.model) == (
        result.trainable_params, result.total_params,
        result.trainable_params / result.total_params)
    twin = add_lora(teacher, rank=2)  # same seed: the same adapter init, whatever the RNG
    torch.manual_seed(123)
    assert all(torch.equal(a, b) for a, b in zip(
        twin.parameters(), add_lora(teacher, rank=2).parameters(), strict=True))
    assert endpoint_error(result.ema_model, sched, teacher) < endpoint_error(teacher, sched,
                                                                            teacher)
    # The adapter and the merged model both load back to the same velocity.
    save_lora_adapter(result.model, tmp_path / "adapter")
    loaded = load_lora_adapter(teacher, tmp_path / "adapter")
    merged = merge_lora(result.model)
    x, t = torch.randn(16, 2), torch.rand(16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t), result.model(x, t))
        torch.testing.assert_close(merged(x, t), result.model(x, t), rtol=1e-5, atol=1e-6)


class Interrupt(Exception):
    pass


def test_resume_after_interruption_is_bit_identical(setup, tmp_path):
    teacher, _, train, val = setup
    cfg = config(iterations=120, checkpoint_every=40, eval_every=20)
    full = straighten(trainable_copy(teacher), train, cfg, val=val, checkpoint_dir=tmp_path / "a")

    def stop_at_100(step, loss, val_loss):
        if step == 100:
            raise Interrupt

    with pytest.raises(Interrupt):
        straighten(trainable_copy(teacher), train, cfg, val=val, checkpoint_dir=tmp_path / "b",
                   callback=stop_at_100)
    state = torch.load(tmp_path / "b" / CHECKPOINT_NAME, weights_only=True)
    assert state["step"] == 80
    resumed = straighten(trainable_copy(teacher), train, cfg, val=val,
                         checkpoint_dir=tmp_path / "b")
    for a, b in zip(full.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(full.ema_model.parameters(), resumed.ema_model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert (full.losses == resumed.losses).all()
    assert list(tmp_path.joinpath("b").iterdir()) == [tmp_path / "b" / CHECKPOINT_NAME]


def test_on_checkpoint_follows_each_durable_save_and_resume_reports_its_start(setup, tmp_path):
    """on_checkpoint(step) runs once the checkpoint of that step is on disk; a resumed run
    reports where it started and carries the earlier wall time."""
    teacher, _, train, _ = setup
    cfg = config(iterations=50, checkpoint_every=20, eval_every=10)
    seen = []

    def stop_after_first(step):
        seen.append(step)
        state = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
        assert state["step"] == step and state["wall_seconds"] > 0
        raise Interrupt

    with pytest.raises(Interrupt):
        straighten(trainable_copy(teacher), train, cfg, checkpoint_dir=tmp_path,
                   on_checkpoint=stop_after_first)
    assert seen == [20]
    earlier = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)["wall_seconds"]
    resumed = straighten(trainable_copy(teacher), train, cfg, checkpoint_dir=tmp_path,
                         on_checkpoint=seen.append)
    assert seen == [20, 40, 50]
    assert resumed.resumed_from == 20 and resumed.wall_time_s > earlier
    fresh = straighten(trainable_copy(teacher), train, config(iterations=5))
    assert fresh.resumed_from == 0


def test_bad_checkpoint_and_config_errors(setup, tmp_path):
    teacher, _, train, _ = setup
    straighten(trainable_copy(teacher), train, config(iterations=5), checkpoint_dir=tmp_path)
    other = build_model(ModelConfig(arch="mlp", hidden=32, depth=2, time_embed_dim=16), (2,))
    with pytest.raises(ValueError, match=f"{CHECKPOINT_NAME}.*does not match"):
        straighten(other, train, config(iterations=10), checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="other settings.*lr"):
        straighten(trainable_copy(teacher), train, config(iterations=10, lr=1e-2),
                   checkpoint_dir=tmp_path)
    (tmp_path / CHECKPOINT_NAME).write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt"):
        straighten(trainable_copy(teacher), train, config(iterations=10), checkpoint_dir=tmp_path)
    for bad in ({"iterations": 0}, {"lr": -1.0}, {"batch_size": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            config(**bad)
    with pytest.raises(ValueError, match="unknown StraightenConfig key"):
        StraightenConfig.from_dict({"iterations": 3, "lr_decay": 0.5})
    for rank in (0, -1):
        with pytest.raises(ValueError, match="LoRA rank"):
            add_lora(teacher, rank=rank)
    with pytest.raises(ValueError, match="exceeds"):
        add_lora(teacher, rank=10_000)


def test_a_non_finite_loss_stops_with_the_step_named(setup, tmp_path):
    from boss_core.pairs import ChordPairs

    teacher, _, train, _ = setup
    poisoned = ChordPairs(train.x, train.t, torch.full_like(train.target, float("nan")),
                          train.sample)
    with pytest.raises(FloatingPointError, match=r"straightening loss is nan at step 0"):
        straighten(trainable_copy(teacher), poisoned, config(iterations=5),
                   checkpoint_dir=tmp_path)
    assert not (tmp_path / "straighten.pt").exists()
