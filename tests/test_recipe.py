"""Recipe validation: every bad config fails with one error that names the key; good ones build."""
from __future__ import annotations

import copy

import pytest

from dpo_dist.config.profiles import gradient_accumulation
from dpo_dist.config.recipe import recipe_from_dict
from dpo_dist.config.schema import ConfigError, load_yaml


@pytest.fixture
def raw() -> dict:
    return {
        "name": "unit",
        "model": {"name_or_path": "some/model", "template": "qwen"},
        "method": {"type": "lora", "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.05},
        "train": {"learning_rate": 1e-3, "global_batch_size": 16, "warmup_steps": 10, "logging_steps": 5},
        "stages": [
            {"stage": "sft", "data": {"train": "sft.jsonl"}, "max_length": 256,
             "train": {"learning_rate": 3e-4}},
            {"stage": "dpo", "data": {"train": "dpo.jsonl"}, "max_length": 256, "max_prompt_length": 128,
             "beta": 0.1, "loss_type": "sigmoid"},
        ],
    }


def error(data: dict, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        recipe_from_dict(data, overrides)
    return str(info.value)


# ---- valid recipes --------------------------------------------------------------------------------------------

def test_valid_recipe_builds(raw):
    recipe = recipe_from_dict(raw)
    assert [s.stage for s in recipe.stages] == ["sft", "dpo"]
    assert recipe.model.name_or_path == "some/model"
    assert recipe.method.lora_r == 8
    assert recipe.stages[1].max_prompt_length == 128


def test_stage_train_merges_over_recipe_defaults(raw):
    sft, dpo = recipe_from_dict(raw).stages
    assert sft.train.learning_rate == pytest.approx(3e-4)  # stage value wins
    assert dpo.train.learning_rate == pytest.approx(1e-3)  # recipe default
    for stage in (sft, dpo):  # untouched defaults reach both stages
        assert stage.train.global_batch_size == 16
        assert stage.train.warmup_steps == 10
        assert stage.train.logging_steps == 5
        assert stage.train.save_steps == 500  # dataclass default


def test_input_dict_is_not_mutated(raw):
    before = copy.deepcopy(raw)
    recipe_from_dict(raw, ["seed=3"])
    assert raw == before


def test_name_and_output_dir_defaults(raw):
    recipe = recipe_from_dict(raw)
    assert [s.name for s in recipe.stages] == ["sft", "dpo"]
    assert recipe.output_dir == "runs/unit"
    raw["output_dir"] = "elsewhere"
    raw["stages"][0]["name"] = "warmup-sft"
    recipe = recipe_from_dict(raw)
    assert recipe.output_dir == "elsewhere"
    assert recipe.stages[0].name == "warmup-sft"


def test_stage_method_overrides_recipe_method(raw):
    raw["stages"][0]["method"] = {"type": "full"}
    recipe = recipe_from_dict(raw)
    assert recipe.method_of(recipe.stages[0]).type == "full"
    assert recipe.method_of(recipe.stages[1]).type == "lora"


# ---- unknown keys ---------------------------------------------------------------------------------------------

def test_unknown_top_level_key(raw):
    raw["sead"] = 1
    msg = error(raw)
    assert "sead: unknown key" in msg and "'seed'" in msg


def test_unknown_model_key(raw):
    raw["model"]["name_or_pth"] = "x"
    msg = error(raw)
    assert "model.name_or_pth: unknown key" in msg and "model.name_or_path" in msg


def test_unknown_stage_train_key(raw):
    raw["stages"][1]["train"] = {"learning_rat": 1e-4}
    msg = error(raw)
    assert "stages[1].train.learning_rat: unknown key" in msg
    assert "stages[1].train.learning_rate" in msg


def test_unknown_recipe_train_key(raw):
    raw["train"]["learning_rat"] = 1e-4
    msg = error(raw)
    assert "train.learning_rat: unknown key" in msg
    assert "stages[" not in msg  # the error points at the recipe-level block, not a stage it was merged into
    assert "train.learning_rate" in msg


def test_unknown_stage_method_key(raw):
    raw["stages"][0]["method"] = {"type": "lora", "lora_rr": 4}
    msg = error(raw)
    assert "stages[0].method.lora_rr: unknown key" in msg and "lora_r" in msg


def test_unknown_key_without_close_match_lists_valid_keys(raw):
    raw["model"]["zzzzzz"] = 1
    msg = error(raw)
    assert "model.zzzzzz: unknown key" in msg and "valid keys" in msg and "name_or_path" in msg


def test_missing_required_key(raw):
    del raw["stages"][0]["data"]
    assert "stages[0].data: required key is missing" in error(raw)


# ---- wrong types ----------------------------------------------------------------------------------------------

def test_wrong_type_names_key(raw):
    raw["stages"][0]["train"]["global_batch_size"] = "lots"
    msg = error(raw)
    assert "stages[0].train.global_batch_size: expected an integer" in msg
    assert msg.count("expected") == 1


def test_bool_is_not_an_integer(raw):
    raw["seed"] = True
    assert "seed: expected an integer" in error(raw)


def test_float_given_as_string_is_accepted(raw):
    raw["stages"][0]["train"]["learning_rate"] = "2e-4"  # YAML reads 2e-4 (no dot) as a string
    assert recipe_from_dict(raw).stages[0].train.learning_rate == pytest.approx(2e-4)


def test_non_numeric_string_for_float_is_refused(raw):
    raw["stages"][1]["beta"] = "big"
    assert "stages[1].beta: expected a number" in error(raw)


def test_stage_shorthand_string_is_refused(raw):
    raw["stages"] = ["sft", "dpo"]
    assert "stages[0]: expected a mapping" in error(raw)


def test_train_defaults_must_be_a_mapping(raw):
    raw["train"] = [1, 2]
    assert "train: expected a mapping" in error(raw)


# ---- wrong values ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mutate, key", [
    (lambda r: r["stages"][0]["train"].update(learning_rate=-1e-4), "stages[0].train.learning_rate"),
    (lambda r: r["train"].update(learning_rate=-1e-4), "train.learning_rate"),
    (lambda r: r["method"].update(lora_r=0), "method.lora_r"),
    (lambda r: r["method"].update(lora_dropout=1.0), "method.lora_dropout"),
    (lambda r: r["stages"][1].update(beta=0), "stages[1].beta"),
    (lambda r: r["stages"][1].update(max_prompt_length=256), "stages[1].max_prompt_length"),
    (lambda r: r["stages"][1].update(max_prompt_length=300), "stages[1].max_prompt_length"),
    (lambda r: r["stages"][0].update(max_length=1), "stages[0].max_length"),
    (lambda r: r["train"].update(lr_scheduler="cosin"), "train.lr_scheduler"),
    (lambda r: r["train"].update(global_batch_size=0), "train.global_batch_size"),
])
def test_bad_values_name_the_key(raw, mutate, key):
    mutate(raw)
    assert f"{key}:" in error(raw)


def test_bad_value_in_stage_method_names_the_key(raw):
    raw["stages"][0]["method"] = {"type": "lora", "lora_r": 0}
    assert "stages[0].method.lora_r: must be positive" in error(raw)


def test_unknown_loss_type_suggests_closest(raw):
    raw["stages"][1]["loss_type"] = "sigmod"
    msg = error(raw)
    assert "stages[1].loss_type" in msg and "did you mean 'sigmoid'" in msg


def test_unknown_method_type(raw):
    raw["method"]["type"] = "qlor"
    msg = error(raw)
    assert "method.type" in msg and "did you mean 'qlora'" in msg


def test_fp16_and_bf16_refused(raw):
    raw["train"].update(fp16=True, bf16=True)
    msg = error(raw)
    assert "fp16" in msg and "bf16" in msg


def test_fp16_and_bf16_split_across_levels_refused(raw):
    raw["train"]["fp16"] = True
    raw["stages"][1]["train"] = {"bf16": True}
    msg = error(raw)
    assert "stages[1].train" in msg and "fp16" in msg and "bf16" in msg


@pytest.mark.parametrize("key, value", [("max_prompt_length", 64), ("loss_type", "ipo"), ("sft_weight", 1.0)])
def test_dpo_only_keys_on_sft_stage_refused(raw, key, value):
    raw["stages"][0][key] = value
    msg = error(raw)
    assert f"stages[0].{key}" in msg and "only applies to dpo" in msg


def test_chain_order(raw):
    raw["stages"].reverse()
    msg = error(raw)
    assert "chain" in msg and "sft after dpo" in msg
    raw["chain"] = False
    recipe = recipe_from_dict(raw)
    assert [s.stage for s in recipe.stages] == ["dpo", "sft"]


def test_duplicate_stage_names_refused(raw):
    raw["stages"].append(copy.deepcopy(raw["stages"][1]))
    msg = error(raw)
    assert "'dpo'" in msg and "name" in msg
    raw["stages"][2]["name"] = "dpo-round2"
    assert [s.name for s in recipe_from_dict(raw).stages] == ["sft", "dpo", "dpo-round2"]


def test_no_stages_refused(raw):
    raw["stages"] = []
    assert "at least one stage" in error(raw)


def test_unknown_template_suggests_closest(raw):
    raw["model"]["template"] = "llama33"
    msg = error(raw)
    assert "model.template" in msg and "'llama3'" in msg


# ---- overrides ------------------------------------------------------------------------------------------------

def test_overrides_by_name_index_and_top_level(raw):
    recipe = recipe_from_dict(raw, ["stages.sft.train.learning_rate=1e-4", "stages.0.max_length=512", "seed=7"])
    sft, dpo = recipe.stages
    assert sft.train.learning_rate == pytest.approx(1e-4)  # beats the file's 3e-4
    assert sft.max_length == 512
    assert recipe.seed == 7
    assert dpo.train.learning_rate == pytest.approx(1e-3)  # untouched


def test_override_recipe_train_default_reaches_stages(raw):
    recipe = recipe_from_dict(raw, ["train.global_batch_size=64"])
    assert [s.train.global_batch_size for s in recipe.stages] == [64, 64]


def test_override_by_custom_stage_name(raw):
    raw["stages"][1]["name"] = "pref"
    recipe = recipe_from_dict(raw, ["stages.pref.beta=0.2"])
    assert recipe.stage("pref").beta == pytest.approx(0.2)


def test_override_values_are_validated(raw):
    msg = error(raw, ["stages.dpo.beta=-1"])
    assert "stages[1].beta" in msg


@pytest.mark.parametrize("assignment, needle", [
    ("seed", "expected key=value"),
    ("stages.rm.beta=0.2", "rm"),
    ("stages.5.beta=0.2", "5"),
    ("stages..beta=0.2", "empty key"),
])
def test_bad_overrides(raw, assignment, needle):
    msg = error(raw, [assignment])
    assert "override" in msg and needle in msg


# ---- gradient accumulation and YAML errors ----------------------------------------------------------------------

def test_gradient_accumulation():
    assert gradient_accumulation(32, 4, 2) == 4
    assert gradient_accumulation(32, 1, 1) == 32
    with pytest.raises(ConfigError) as info:
        gradient_accumulation(30, 4, 2)
    assert "global_batch_size" in str(info.value) and "8" in str(info.value)


def test_broken_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nmodel:\n  name_or_path: a\n  template: [qwen\nstages: []\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_yaml(path)
    msg = str(info.value)
    assert str(path) in msg and "invalid YAML" in msg
    assert f"{path}:" in msg and msg.split(f"{path}:")[1].split(":")[0].isdigit()


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_yaml(tmp_path / "nope.yaml")
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="mapping"):
        load_yaml(path)
