"""params.yaml loading: every bad key or value is refused before compute, naming section.key."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from boss_core.methods import REGISTRY, MethodOptions
from tasks.cli.profile import main as profile_main
from tasks.cli.profile import read_profile
from tasks.runtime.params import SECTIONS, ParamsError, apply_overrides, load_params, parse_override

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params.yaml"


def test_params_yaml_spells_out_every_key_of_every_config():
    """dvc.yaml lists keys individually, so params.yaml holds them all (except the ones filled
    from run: device, progress; and fidelity.n_seeds, filled from sweep)."""
    raw = yaml.safe_load(PARAMS.read_text())
    for section, cls in SECTIONS.items():
        if cls is MethodOptions:  # each method's options, under its name
            expected = {name: set(m.options) for name, m in REGISTRY.items() if m.options}
            assert {name: set(v) for name, v in raw[section].items()} == expected
            continue
        expected = {f.name for f in dataclasses.fields(cls)}
        if section != "run":
            expected -= {"device", "progress"}
        if section == "fidelity":
            expected -= {"n_seeds"}
        assert expected == set(raw[section]), (section, expected ^ set(raw[section]))


def test_dvc_stage_params_exist_in_params_yaml():
    raw = yaml.safe_load(PARAMS.read_text())
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    listed = []
    for stage in stages.values():
        listed += (stage.get("do") or stage).get("params", [])
    assert listed
    for key in listed:
        node = raw
        for part in key.split("."):
            assert part in node, key
            node = node[part]


def test_defaults_load_and_fill_device_from_run():
    p = load_params(PARAMS, {"run.device": "cpu"})
    assert p.teacher.device == p.straighten.device == p.features.device == "cpu"
    assert p.fidelity.n_seeds == p.sweep.n_seeds
    assert p.flat()["straighten.iterations"] == p.straighten.iterations


@pytest.mark.parametrize(("override", "named"), [
    ({"teacher.iterations": 0}, "teacher.iterations"),
    ({"teacher.iterations": "many"}, "teacher.iterations"),
    ({"straighten.lr": -1.0}, "straighten.lr"),
    ({"sweep.batch_size": 0}, "sweep.batch_size"),
    ({"sweep.nfes": [2, 500]}, "sweep.nfes"),
    ({"sweep.methods": ["boss", "magic"]}, "sweep.unknown method"),
    ({"run.device": "tpu"}, "run.device"),
    ({"model.arch": "transformer"}, "model.arch"),
    ({"data.name": "imagenet"}, "data.name"),
    ({"fidelity.kid_subset_size": 5000}, "fidelity.kid_subset_size"),
])
def test_bad_values_name_the_key(override, named):
    with pytest.raises(ParamsError) as err:
        load_params(PARAMS, override)
    section, _, key = named.partition(".")
    assert str(err.value).startswith(section + ".") or named in str(err.value), str(err.value)
    assert key.split()[0] in str(err.value)


def test_unknown_keys_and_sections_are_named(tmp_path):
    with pytest.raises(ParamsError, match=r"teacher\.itertions"):
        load_params(PARAMS, {"teacher.itertions": 5})
    bad = yaml.safe_load(PARAMS.read_text())
    bad["straighten"]["learning_rate"] = 1e-3
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ParamsError, match=r"straighten\.learning_rate"):
        load_params(path)
    bad.pop("straighten")
    bad["straightening"] = {}
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ParamsError, match="straightening"):
        load_params(path)


def test_override_parsing_is_yaml():
    assert parse_override("sweep.nfes=[1, 2]") == ("sweep.nfes", [1, 2])
    assert parse_override("model.weights=null") == ("model.weights", None)
    merged = apply_overrides({"teacher": {"lr": 1.0}}, {"teacher.lr": 0.5})
    assert merged == {"teacher": {"lr": 0.5}}
    with pytest.raises(ParamsError):
        parse_override("no-equals-sign")


def test_profiles_merge_and_validate(tmp_path, capsys):
    out = tmp_path / "params.yaml"
    assert profile_main([str(ROOT / "tests/profiles/tiny.yaml"), "--params", str(PARAMS),
                         "--write", str(out)]) == 0
    tiny = load_params(out)
    assert tiny.sweep.n_steps == 20 and tiny.straighten.iterations == 60
    assert profile_main([str(ROOT / "params.paper.yaml"), "--params", str(PARAMS),
                         "--dvc-args"]) == 0
    args = capsys.readouterr().out
    assert "-S straighten.iterations=2000" in args
    bad = tmp_path / "bad.yaml"
    bad.write_text("straighten.iterations: 0\n")
    assert profile_main([str(bad), "--params", str(PARAMS), "--write", str(out)]) == 2
    assert load_params(out).straighten.iterations == 60  # the earlier file is intact


def test_curved_profile_is_the_choice_its_header_names(tmp_path):
    """params.curved.yaml merges and validates; its path and guidance are the ones its header
    says bench/curved_choice.py chose (a non-linear path, w in [1, 4]) on a class-conditional
    teacher with label drop-out, and every key it does not name is the default's."""
    profile = ROOT / "params.curved.yaml"
    out = tmp_path / "params.yaml"
    assert profile_main([str(profile), "--params", str(PARAMS), "--write", str(out)]) == 0
    curved, default = load_params(out), load_params(PARAMS)
    chosen = re.search(r"^# chosen: teacher\.path=(\w+) sweep\.guidance=(\S+)$",
                       profile.read_text(), re.MULTILINE)
    assert chosen is not None, "the header names the chosen teacher.path and sweep.guidance"
    assert curved.teacher.path == chosen[1] != "linear"
    assert curved.sweep.guidance == float(chosen[2]) and 1 <= curved.sweep.guidance <= 4
    assert curved.model.num_classes is not None and curved.teacher.label_dropout > 0
    assert curved.run.experiment != default.run.experiment
    base, mine = default.flat(), curved.flat()
    assert {key for key in mine if mine[key] != base[key]} == set(read_profile(profile))
