"""Config loading, precedence, NNI config_list mapping and clear errors for bad configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import deployprune as dp
from deployprune.errors import ConfigError
from deployprune.pruning import ModuleConfig, PolynomialDecayScheduler, PrunerConfig

from .conftest import cnn_batches


def targets_of(pruner: dp.Pruner) -> dict[str, tuple[str, float]]:
    pruner.prepare()
    return {t.name: (t.config.granularity, t.final_sparsity) for t in pruner.targets}


def test_coremltools_style_per_type_config(cnn) -> None:
    config = PrunerConfig(module_type_configs={"Conv2d": {"target_sparsity": 0.7}, "Linear": {"target_sparsity": 0.8}})
    got = targets_of(dp.Pruner(cnn, config))
    assert got == {"conv1.weight": ("element", 0.7), "conv2.weight": ("element", 0.7), "fc.weight": ("element", 0.8)}


def test_builder_methods_like_coremltools(cnn) -> None:
    config = PrunerConfig(global_config={"target_sparsity": 0.3})
    config = config.set_module_type(torch.nn.Conv2d, ModuleConfig(target_sparsity=0.7))
    config = config.set_module_name("fc", None)
    got = targets_of(dp.Pruner(cnn, config))
    assert got == {"conv1.weight": ("element", 0.7), "conv2.weight": ("element", 0.7)}


def test_builder_starts_from_a_schedule_alone(cnn) -> None:
    """docs/pruning.md's coremltools-style recipe: PrunerConfig(schedule=...) first, layers added after
    (the empty config was refused with 'nothing to prune' before set_module_type could run)."""
    config = (PrunerConfig(schedule=PolynomialDecayScheduler(update_steps=list(range(0, 900, 100))))
              .set_module_type(torch.nn.Conv2d, ModuleConfig(target_sparsity=0.7))
              .set_module_type(torch.nn.Linear, ModuleConfig(target_sparsity=0.8)))
    got = targets_of(dp.Pruner(cnn, config))
    assert got == {"conv1.weight": ("element", 0.7), "conv2.weight": ("element", 0.7), "fc.weight": ("element", 0.8)}
    with pytest.raises(ConfigError, match="config: nothing to prune"):  # still refused when it is used
        dp.Pruner(cnn, PrunerConfig(schedule=PolynomialDecayScheduler(update_steps=[0, 100])))


def test_precedence_name_over_type_over_global(cnn) -> None:
    config = {
        "global_config": {"target_sparsity": 0.2},
        "module_type_configs": {"Conv2d": {"target_sparsity": 0.4}},
        "module_name_configs": {"conv[2]": {"target_sparsity": 0.6, "criterion": "l2"}},
    }
    got = targets_of(dp.Pruner(cnn, config))
    assert got == {"conv1.weight": ("element", 0.4), "conv2.weight": ("element", 0.6), "fc.weight": ("element", 0.2)}


def test_top_level_shorthand_and_exclude(cnn) -> None:
    got = targets_of(dp.Pruner(cnn, {"target_sparsity": 0.5, "exclude": ["conv1"]}))
    assert set(got) == {"conv2.weight", "fc.weight"}


def test_nni_config_list(cnn) -> None:
    config_list = [
        {"op_types": ["Conv2d", "Linear"], "sparse_ratio": 0.5},
        {"op_names": ["conv2"], "sparsity_per_layer": 0.25},
        {"op_names": ["fc"], "exclude": True},
    ]
    got = targets_of(dp.Pruner(cnn, config_list))
    assert got == {"conv1.weight": ("element", 0.5), "conv2.weight": ("element", 0.25)}


def test_nni_exclude_wins_regardless_of_order(cnn) -> None:
    config_list = [{"op_names": ["fc"], "exclude": True}, {"op_types": ["Linear"], "sparsity": 0.5}]
    with pytest.raises(ConfigError, match="selects no layer"):
        dp.Pruner(cnn, config_list)


def test_nni_v3_keys(cnn) -> None:
    config_list = [{"op_names_re": ["conv.*"], "exclude_op_names": ["conv1"], "sparse_ratio": 0.4,
                    "target_names": ["weight", "bias"]}]
    got = targets_of(dp.Pruner(cnn, config_list))
    assert got == {"conv2.weight": ("element", 0.4), "conv2.bias": ("element", 0.4)}


def test_nni_total_sparsity_is_a_global_group(cnn) -> None:
    pruner = dp.Pruner(cnn, [{"op_types": ["Conv2d"], "total_sparsity": 0.5, "max_sparsity_per_layer": 0.9}])
    pruner.prepare()
    assert {t.config.global_group for t in pruner.targets} == {"config_list[0]"}
    assert {t.config.max_sparsity for t in pruner.targets} == {0.9}
    zeros = sum(int((~m["weight"]).sum()) for m in pruner.masks().values())
    total = cnn.conv1.weight.numel() + cnn.conv2.weight.numel()
    assert zeros == round(0.5 * total)


def test_nni_granularity_list_is_a_block(mlp) -> None:
    pruner = dp.Pruner(mlp, [{"op_types": ["Linear"], "sparse_ratio": 0.5, "granularity": [2, 4]}])
    pruner.prepare()
    assert {t.config.granularity for t in pruner.targets} == {"block"}
    assert {t.config.block_size for t in pruner.targets} == {(2, 4)}


def test_json_and_yaml_files(tmp_path: Path, cnn) -> None:
    cfg = {"module_type_configs": {"Conv2d": {"target_sparsity": 0.7, "granularity": "element"}},
           "schedule": {"type": "polynomial", "begin_step": 0, "end_step": 100, "frequency": 10}}
    j = tmp_path / "prune.json"
    j.write_text(json.dumps(cfg))
    y = tmp_path / "prune.yaml"
    y.write_text("module_type_configs:\n  Conv2d:\n    target_sparsity: 0.7\n    granularity: element\n"
                 "schedule:\n  type: polynomial\n  begin_step: 0\n  end_step: 100\n  frequency: 10\n")
    for path in (j, str(y)):
        pc = PrunerConfig.coerce(path)
        assert isinstance(pc.schedule, PolynomialDecayScheduler) and pc.schedule.end_step == 100
        assert pc.module_type_configs["Conv2d"].target_sparsity == 0.7
    nni = tmp_path / "list.json"
    nni.write_text(json.dumps([{"op_types": ["Conv2d"], "sparse_ratio": 0.5}]))
    assert targets_of(dp.Pruner(cnn, nni)) == {"conv1.weight": ("element", 0.5), "conv2.weight": ("element", 0.5)}


def test_granularity_spellings() -> None:
    assert ModuleConfig(granularity="out_channel").granularity == "channel"
    assert ModuleConfig(granularity="per_scalar").granularity == "element"
    c = ModuleConfig(granularity="2:4")
    assert (c.granularity, c.n_m_ratio, c.target_sparsity) == ("n:m", (2, 4), 0.5)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"target_sparsity": 0.5, "sparsity_mode": "global"},
         "unknown key 'sparsity_mode'.*allowed keys: global_config"),
        ({"global_config": {"target_sparsity": 0.5, "granularty": "channel"}},
         "global_config: unknown key 'granularty' \\(did you mean 'granularity'\\?\\)"),
        ({"target_sparsity": 1.0}, r"target_sparsity: 1.0 is outside \[0, 1\)"),
        ({"target_sparsity": -0.1}, r"outside \[0, 1\)"),
        ({"target_sparsity": "half"}, "expected a number"),
        ({"granularity": "n:m", "n_m_ratio": [4, 4]}, "n must be smaller than m"),
        ({"granularity": "6:4"}, "n must be smaller than m"),
        ({"granularity": "n:m"}, "needs n_m_ratio"),
        ({"granularity": "block"}, "needs block_size"),
        ({"granularity": "diagonal"}, "unknown granularity 'diagonal'"),
        ({"granularity": "in_channel"}, "'in_channel' granularity is not supported"),
        ({"criterion": "l7"}, "unknown criterion 'l7'"),
        ({"criterion": "fpgm", "granularity": "element"}, "criterion 'fpgm' does not support granularity 'element'"),
        ({"criterion": "apoz", "granularity": "channel", "criterion_args": {"act": "relu"}},
         r"criterion_args \(apoz\): unknown key .act."),
        ({"round_to": 8}, "round_to only applies to channel/head"),
        ({"granularity": "2:4", "target_sparsity": 0.7}, "contradicts n:m"),
        ({"target_sparsity": 0.5, "schedule": {"type": "polynomial"}}, "end_step is required"),
        ({"target_sparsity": 0.5, "allocator": "greedy"}, "unknown sparsity allocator 'greedy'"),
        ({"schedule": {"type": "constant"}}, "nothing to prune"),
        ({"module_name_configs": {"conv[": {}}}, "invalid regular expression 'conv\\['"),
    ],
)
def test_bad_configs_fail_clearly(config, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        PrunerConfig.coerce(config)
    assert info.value.exit_code == 2
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("config_list", "message"),
    [
        ([{"op_types": ["Conv2d"], "sparse_ratio": 0.5, "quant_bits": 8}],
         r"config_list\[0\]: unknown key 'quant_bits'"),
        ([{"op_names": ["fc"], "exclude": True, "sparse_ratio": 0.5}], "an 'exclude' entry only selects layers"),
        ([{"op_types": ["Linear"], "sparse_ratio": 0.5, "total_sparsity": 0.5}], "give only one of"),
        ([{"op_types": ["Linear"], "sparse_ratio": 1.2}], r"config_list\[0\].target_sparsity: 1.2 is outside"),
        ([{"op_types": ["Linear"], "sparse_ratio": 0.5, "target_names": ["_output_"]}], "only parameters"),
    ],
)
def test_bad_nni_entries(config_list, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        PrunerConfig.coerce(config_list)


def test_name_regex_matching_nothing(cnn) -> None:
    pattern = r"module_name_configs\['layer1\\\\\.\.\*'\]: name pattern .* matches no module"
    with pytest.raises(ConfigError, match=pattern):
        dp.Pruner(cnn, {"module_name_configs": {r"layer1\..*": {"target_sparsity": 0.5}}})
    with pytest.raises(ConfigError, match="exclude: name pattern 'conv3' matches no module.*did you mean"):
        dp.Pruner(cnn, {"target_sparsity": 0.5, "exclude": ["conv3"]})
    with pytest.raises(ConfigError, match=r"config_list\[0\].op_names: module 'fc2' does not exist.*did you mean 'fc'"):
        dp.Pruner(cnn, [{"op_names": ["fc2"], "sparse_ratio": 0.5}])


def test_name_config_on_module_without_the_parameter(cnn) -> None:
    with pytest.raises(ConfigError, match=r"matches \['conv1'\] but none has parameter\(s\) \['kernel'\]"):
        dp.Pruner(cnn, {"module_name_configs": {"conv1": {"params": ["kernel"]}}})


def test_criterion_needing_data_without_data(cnn, cnn_inputs) -> None:
    cfg = {"global_config": {"granularity": "channel", "criterion": "apoz"}}
    with pytest.raises(ConfigError, match="criterion 'apoz' needs data .*pass data=") as info:
        dp.Pruner(cnn, cfg, cnn_inputs)
    assert info.value.exit_code == 2
    dp.Pruner(cnn, cfg, cnn_inputs, data=[b[0] for b in cnn_batches()])  # accepted with data


def test_taylor_one_shot_needs_gradients(cnn) -> None:
    with pytest.raises(ConfigError, match="criterion 'taylor' needs gradients.*data= and loss_fn="):
        dp.Pruner(cnn, {"criterion": "taylor", "target_sparsity": 0.5})
    # gradual pruning that starts later can take the gradients from training
    dp.Pruner(cnn, {"criterion": "taylor", "schedule": {"type": "polynomial", "begin_step": 5, "end_step": 10}})


def test_structured_without_example_inputs(cnn) -> None:
    with pytest.raises(ConfigError, match="granularity 'channel' needs example_inputs"):
        dp.Pruner(cnn, {"granularity": "channel"})


def test_unknown_type_selects_nothing(cnn) -> None:
    with pytest.raises(ConfigError, match="config selects no layer of SmallCNN"):
        dp.Pruner(cnn, {"module_type_configs": {"Conv3d": {"target_sparsity": 0.5}}})


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        PrunerConfig.coerce(tmp_path / "nope.json")
    bad = tmp_path / "bad.yaml"
    bad.write_text("global_config: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: cannot parse config"):
        PrunerConfig.coerce(bad)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"global_config": {"sparsity": 0.5}}))
    with pytest.raises(ConfigError, match="wrong.json: global_config: unknown key 'sparsity'"):
        PrunerConfig.coerce(wrong)
    other = tmp_path / "c.toml"
    other.write_text("x = 1")
    with pytest.raises(ConfigError, match="unknown config format '.toml'"):
        PrunerConfig.coerce(other)
