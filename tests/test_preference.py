"""KTO, ORPO and CPO stages: the recipe keys each takes, the unpaired data format, tokenization as DPO's, and
end-to-end runs on one CPU process (one run per case)."""
from __future__ import annotations

import json
import math

import pytest

from dpo_dist.config.profiles import Profile
from dpo_dist.config.recipe import recipe_from_dict
from dpo_dist.config.schema import ConfigError
from dpo_dist.data.formats import DataError, read_source
from dpo_dist.training.common import read_metrics
from tests.helpers import write_jsonl

PROFILE = Profile(name="test", micro_batch_size=2, precision="fp32", attn_implementation="sdpa")
PAIRS = [{"prompt": f"Describe the owl {i}.", "chosen": "It is calm and kind.", "rejected": "It is rude."}
         for i in range(16)]


def unpaired(pairs: list[dict]) -> list[dict]:
    """The unpaired form of preference pairs: the chosen response labelled desirable, the rejected one not."""
    return [row for p in pairs for row in ({"prompt": p["prompt"], "completion": p["chosen"], "label": True},
                                           {"prompt": p["prompt"], "completion": p["rejected"], "label": False})]


def stage_recipe(stage: str, data: str, **stage_keys) -> dict:
    return {"name": "t", "model": {"name_or_path": "m"},
            "stages": [{"stage": stage, "data": {"train": data}, **stage_keys}]}


# ---- the recipe: each stage's keys, refused where TRL would refuse them -------------------------------------------

@pytest.mark.parametrize("stage, keys, message", [
    ("kto", {"loss_type": "sigmoid"}, "stages[0].loss_type: sigmoid is not a kto loss; kto stages take kto, "
                                      "apo_zero_unpaired"),
    ("kto", {"loss_type": ["kto"]}, "stages[0].loss_type: a list of losses is for dpo stages"),
    ("kto", {"desirable_weight": 0}, "stages[0].desirable_weight: must be positive"),
    ("kto", {"label_smoothing": 0.1}, "stages[0].label_smoothing: only applies to dpo and cpo stages, this stage "
                                      "is kto"),
    ("dpo", {"loss_type": "kto"}, "stages[0].loss_type: kto is not a dpo loss (it is one of kto's)"),
    ("dpo", {"loss_type": "alphapo"}, "stages[0].loss_type: alphapo is not a dpo loss (it is one of cpo's)"),
    ("dpo", {"desirable_weight": 2.0}, "stages[0].desirable_weight: only applies to kto stages, this stage is dpo"),
    ("orpo", {"loss_type": "sigmoid"}, "stages[0].loss_type: only applies to dpo, kto and cpo stages, this stage "
                                       "is orpo"),
    ("orpo", {"beta": 0}, "stages[0].beta: must be positive"),
    ("cpo", {"loss_type": "exo_pair"}, "stages[0].loss_type: exo_pair is not a cpo loss; cpo stages take sigmoid, "
                                       "hinge, ipo, simpo, alphapo"),
    ("cpo", {"loss_type": "alphapo", "cpo_alpha": 0.5}, "stages[0].cpo_alpha: loss_type alphapo sets it to 0"),
    ("cpo", {"label_smoothing": 0.5}, "stages[0].label_smoothing: must be in [0, 0.5)"),
    ("sft", {"cpo_alpha": 0.5}, "stages[0].cpo_alpha: only applies to cpo stages, this stage is sft"),
    ("sft", {"max_prompt_length": 8}, "stages[0].max_prompt_length: only applies to dpo, kto, orpo and cpo stages"),
    ("kto", {"data": {"train": "x.jsonl", "format": "pair"}}, "stages[0].data.format: 'pair' is not a kto format "
                                                             "(auto, unpaired)"),
    ("orpo", {"data": {"train": "x.jsonl", "format": "unpaired"}}, "stages[0].data.format: 'unpaired' is not a dpo "
                                                                  "format"),
])
def test_stage_keys_are_refused_where_they_do_not_apply(stage, keys, message):
    data = keys.pop("data", {"train": "x.jsonl"})
    recipe = stage_recipe(stage, "x.jsonl", **keys)
    recipe["stages"][0]["data"] = data
    with pytest.raises(ConfigError) as err:
        recipe_from_dict(recipe)
    assert message in str(err.value)


def test_each_stage_takes_its_own_loss_default():
    stages = [{"stage": s, "data": {"train": "x.jsonl"}} for s in ("dpo", "kto", "orpo", "cpo")]
    recipe = recipe_from_dict({"name": "t", "model": {"name_or_path": "m"}, "chain": False, "stages": stages})
    assert [s.loss_types for s in recipe.stages] == [["sigmoid"], ["kto"], [], ["sigmoid"]]
    assert [s.data_kind for s in recipe.stages] == ["dpo", "kto", "dpo", "dpo"]


def test_a_kto_loss_that_needs_a_kl_term_is_refused_on_a_micro_batch_of_one():
    from dpo_dist.distributed.backends import Launch, check_run, resolve

    one = Profile(name="one", micro_batch_size=1, precision="fp32", attn_implementation="sdpa")
    for loss, refused in (("kto", True), ("apo_zero_unpaired", False)):
        recipe = recipe_from_dict(stage_recipe("kto", "x.jsonl", loss_type=loss))
        launch = Launch.from_env()
        if refused:
            with pytest.raises(ConfigError, match=r"stages\.kto: the kto loss estimates its KL term .* micro_batch_size "
                                                  r"1; .* loss_type: apo_zero_unpaired"):
                check_run(recipe, one, launch, resolve(one, launch))
        else:
            check_run(recipe, one, launch, resolve(one, launch))


# ---- the unpaired format ------------------------------------------------------------------------------------------

def test_unpaired_rows_in_both_forms_become_one_canonical_row(tmp_path):
    rows = [
        {"prompt": "Hi?", "completion": "Hello.", "label": True, "system": "Be brief.",
         "history": [{"human": "Yes?", "assistant": "No."}]},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Yes?"},
                    {"role": "assistant", "content": "No."}, {"role": "user", "content": "Hi?"}],
         "completion": [{"role": "assistant", "content": "Hello."}], "label": True},
    ]
    got = read_source(write_jsonl(tmp_path / "kto.jsonl", rows), "kto")
    assert got.fmt == "unpaired"
    assert [{k: v for k, v in r.items() if k != "loc"} for r in got.rows] == [{
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Yes?"},
                   {"role": "assistant", "content": "No."}, {"role": "user", "content": "Hi?"}],
        "completion": "Hello.", "label": True}] * 2


@pytest.mark.parametrize("row, message", [
    ({"prompt": "Hi?", "completion": "Hello.", "label": 1}, "kto.jsonl:2: label: wrong type: expected true "
                                                            "(desirable) or false (undesirable), got number"),
    ({"prompt": "Hi?", "completion": " ", "label": False}, "kto.jsonl:2: completion: empty completion"),
    ({"prompt": "Hi?", "completion": [{"role": "user", "content": "x"}], "label": True},
     "kto.jsonl:2: completion: a message-list completion must be one assistant message, got ['user']"),
    ({"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "completion": "c",
      "label": True}, "kto.jsonl:2: prompt[1].role: wrong role order: prompt ends with an assistant turn"),
    ({"prompt": [{"role": "user", "content": "a"}], "system": "s", "completion": "c", "label": True},
     "kto.jsonl:2: prompt: a message-list prompt holds its own history and system message"),
])
def test_a_bad_unpaired_row_is_named_by_file_and_line(tmp_path, row, message):
    path = write_jsonl(tmp_path / "kto.jsonl", [{"prompt": "Ok?", "completion": "Ok.", "label": True}, row])
    with pytest.raises(DataError) as err:
        read_source(path, "kto")
    assert message in str(err.value)


def test_kto_rows_are_rendered_and_cut_exactly_as_dpo_responses(tiny_base):
    from dpo_dist.data.render import Renderer
    from dpo_dist.data.tokenize import encode_dpo, encode_kto
    from dpo_dist.models.loading import load_tokenizer
    from dpo_dist.config.recipe import ModelConfig

    tokenizer = load_tokenizer(ModelConfig(str(tiny_base)))
    renderer = Renderer(tokenizer, "qwen")
    pairs = [{"prompt": [{"role": "user", "content": "Describe the owl " + "very " * k + "well."}],
              "chosen": "It is calm" + " and kind" * k + ".", "rejected": "It is rude."} for k in (0, 3, 12)]
    for max_length, max_prompt_length in ((256, 128), (40, 24)):  # nothing cut; prompts and responses cut
        dpo = encode_dpo(pairs, tokenizer, renderer, max_length, max_prompt_length)
        kto = encode_kto(unpaired(pairs_as_rows(pairs)), tokenizer, renderer, max_length, max_prompt_length)
        for pair, chosen, rejected in zip(dpo, kto[::2], kto[1::2]):
            assert chosen["prompt_ids"] == rejected["prompt_ids"] == pair["prompt_ids"]
            assert (chosen["completion_ids"], rejected["completion_ids"]) == (pair["chosen_ids"], pair["rejected_ids"])
            assert (chosen["label"], rejected["label"]) == (True, False)
        assert any(r["truncated"] for r in kto) == (max_length == 40)


def test_kto_kl_pairs_rotate_completions_within_each_micro_batch():
    from datasets import Dataset

    from dpo_dist.training.preference import _rotate_completions

    ds = Dataset.from_dict({"completion_ids": [[1], [2, 2], [3], [4, 4]]})
    got = ds.map(_rotate_completions, batched=True, batch_size=2)["KL_completion_ids"]
    assert got == [[2, 2], [1], [4, 4], [3]]  # row i's prompt with the completion of its micro-batch neighbour


def pairs_as_rows(pairs: list[dict]) -> list[dict]:
    return [{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]} for p in pairs]


# ---- end to end on one CPU process ----------------------------------------------------------------------------------

def recipe_for(base, out, stages: list[dict], chain=False, **train):
    from dpo_dist.config.recipe import recipe_from_dict

    return recipe_from_dict({
        "name": "t", "model": {"name_or_path": str(base), "template": "qwen"}, "chain": chain,
        "method": {"type": "lora", "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0},
        "train": {"learning_rate": 1e-2, "global_batch_size": 4, "max_steps": 6, "logging_steps": 1,
                  "save_steps": 100, "lr_scheduler": "constant", **train},
        "output_dir": str(out), "stages": stages})


@pytest.mark.e2e
def test_kto_chains_after_sft_with_the_adapter_off_reference_and_the_compact_head_gives_trls_numbers(tiny_base,
                                                                                                      tmp_path):
    from dpo_dist.training.run import run_recipe

    sft = str(write_jsonl(tmp_path / "sft.jsonl", [{"conversation": [{"human": p["prompt"], "assistant": p["chosen"]}]}
                                                   for p in PAIRS]))
    kto = str(write_jsonl(tmp_path / "kto.jsonl", unpaired(PAIRS)))
    kto_stage = {"stage": "kto", "data": {"train": kto}, "max_length": 48, "max_prompt_length": 32}
    sft_stage = {"stage": "sft", "data": {"train": sft}, "max_length": 48}
    lines = []
    _, first = run_recipe(recipe_for(tiny_base, tmp_path / "a", [sft_stage, kto_stage], chain=True),
                          PROFILE, log=lines.append)
    summary = json.loads((first.run_dir / "summary.json").read_text())
    assert summary["stage"] == "kto" and summary["base"] == str(tmp_path / "a" / "sft" / "merged")
    assert "[train] kto: 16 desirable and 16 undesirable rows; desirable_weight 1.0, undesirable_weight 1.0" in lines
    metrics = [m for m in read_metrics(first.run_dir) if "loss" in m]
    keys = {"loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"}
    assert len(metrics) == 6 and all(keys <= m.keys() for m in metrics), metrics[0].keys()
    # Step 1 from the untrained adapter: policy = reference (the adapter-disabled SFT model), so every reward is 0
    # and each row's loss is 1 - σ(0).
    assert metrics[0]["rewards/chosen"] == metrics[0]["rewards/rejected"] == metrics[0]["kl"] == 0.0
    assert metrics[0]["loss"] == pytest.approx(0.5, abs=1e-7)
    assert metrics[-1]["rewards/margins"] > metrics[1]["rewards/margins"] > 0  # it learns the labels

    from dpo_dist.commands.plot import plot_runs

    drawn = plot_runs([first.run_dir], out=tmp_path / "kto.png")
    assert len(drawn["series"]["KL estimate (kto)"]["kto"]) == 6 and "Log odds ratio (orpo)" not in drawn["panels"]

    # The same stage from the same SFT model through TRL's own LM head: the same numbers.
    kto_again = {**kto_stage, "train": {"compact_logps": False}}
    (second,) = run_recipe(recipe_for(summary["base"], tmp_path / "b", [kto_again]), PROFILE, log=lambda *_: None)
    for a, b in zip(metrics, [m for m in read_metrics(second.run_dir) if "loss" in m]):
        for key in ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "kl", "logps/chosen"):
            assert math.isclose(a[key], b[key], rel_tol=1e-4, abs_tol=1e-6), (a["step"], key, a[key], b[key])


@pytest.mark.e2e
def test_orpo_and_cpo_train_reference_free_on_the_dpo_pairs(tiny_base, tmp_path):
    from dpo_dist.training.run import run_recipe

    pairs = str(write_jsonl(tmp_path / "dpo.jsonl", PAIRS))
    stages = [{"stage": s, "data": {"train": pairs}, "max_length": 48, "max_prompt_length": 32, **keys}
              for s, keys in (("orpo", {}), ("cpo", {}), ("cpo", {"name": "simpo", "loss_type": "simpo"}))]
    lines = []
    results = run_recipe(recipe_for(tiny_base, tmp_path / "run", stages), PROFILE, log=lines.append)
    assert [r.name for r in results] == ["orpo", "cpo", "simpo"]
    assert "[train] orpo: TRL's orpo trainer scores the full logits (train.compact_logps applies to dpo and kto only)" \
        in lines
    from dpo_dist.commands.plot import plot_runs

    drawn = plot_runs([tmp_path / "run"], out=tmp_path / "pairs.png")["series"]
    assert set(drawn["Log odds ratio (orpo)"]) == {"orpo"} and set(drawn["NLL term (orpo, cpo)"]) >= {"orpo", "cpo"}
    for result, own in zip(results, ({"log_odds_ratio", "log_odds_chosen", "nll_loss"}, {"nll_loss"}, set())):
        metrics = [m for m in read_metrics(result.run_dir) if "loss" in m]
        keys = {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"} | own
        assert len(metrics) == 6 and all(keys <= m.keys() for m in metrics), (result.name, metrics[0].keys())
        assert all(math.isfinite(m["loss"]) for m in metrics)
        assert metrics[-1]["rewards/margins"] > metrics[0]["rewards/margins"], result.name  # it learns the preference
        assert (result.output / "adapter_model.safetensors").is_file()
        summary = json.loads((result.run_dir / "summary.json").read_text())
        assert summary["stage"] == ("orpo" if result.name == "orpo" else "cpo") and summary["ref_logps"] is None


def test_validate_checks_kto_data_with_the_reader_and_lengths_training_uses(tiny_base, tmp_path):
    import yaml

    from dpo_dist.commands.validate import validate_recipe

    rows = unpaired(PAIRS[:3]) + [{"prompt": "Long " * 200 + "?", "completion": "Yes.", "label": True},
                                  {"prompt": "Hi?", "completion": "Hello.", "label": "yes"}]
    data = write_jsonl(tmp_path / "kto.jsonl", rows)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"name": "t", "model": {"name_or_path": str(tiny_base), "template": "qwen"},
                                      "stages": [{"stage": "kto", "data": {"train": str(data)}, "max_length": 256,
                                                  "max_prompt_length": 128}]}))
    out = []
    assert validate_recipe(str(recipe), out=out.append) == 1
    text = "\n".join(out)
    assert "== stage kto (kto) data.train:" in text
    assert "kto.jsonl:8: label: wrong type: expected true (desirable) or false (undesirable), got string" in text
    assert "kto.jsonl:7: prompt: warning: prompt is" in text and "longer than max_prompt_length=128" in text
    assert "1 prompt longer than max_prompt_length" in text
