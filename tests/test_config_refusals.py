"""Bad recipes and profiles are refused before any weights load, by the commands users run (`dpo-dist train` /
`python -m dpo_dist.train`, `dpo-dist launch`), each with one message naming the key and the fix.

Every case runs the real entry point in-process with model, tokenizer and training loading replaced by functions
that fail the test: a case passes only if it was refused before any of them ran, with exit code 2.
"""
from __future__ import annotations

import copy

import pytest
import yaml

from dpo_dist import cli
from dpo_dist.training import run as train
from tests.helpers import write_jsonl

SFT_ROW = {"conversation": [{"human": "Hi", "assistant": "Hello there."}]}
DPO_ROW = {"prompt": "Hi", "chosen": "Hello there.", "rejected": "Go away."}


@pytest.fixture
def base(tmp_path):
    sft = write_jsonl(tmp_path / "sft.jsonl", [SFT_ROW] * 8)
    dpo = write_jsonl(tmp_path / "dpo.jsonl", [DPO_ROW] * 8)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")  # a model directory, as the preflight expects; no weights are loaded
    return {
        "name": "refusals", "seed": 1, "output_dir": str(tmp_path / "runs"),
        "model": {"name_or_path": str(model), "template": "qwen"},
        "method": {"type": "lora", "lora_r": 4},
        "train": {"learning_rate": 1e-4, "global_batch_size": 8, "max_steps": 2},
        "stages": [{"stage": "sft", "data": {"train": str(sft)}},
                   {"stage": "dpo", "data": {"train": str(dpo)}, "max_length": 64, "max_prompt_length": 32}],
    }


def _bad_sample_prompts(recipe, tmp_path):
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Hi"}, "{not json"])
    recipe["stages"][1]["train"] = {"sample_prompts": str(path)}


def _set(path: str, value):
    def mutate(recipe, tmp_path):
        node = recipe
        parts = path.split(".")
        for part in parts[:-1]:
            node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
        node[int(parts[-1]) if parts[-1].isdigit() else parts[-1]] = value
    return mutate


def _profile(**changes):
    """A profile file: cpu-fsdp-2 with `changes` (None removes a key)."""
    def write(tmp_path):
        from dpo_dist.config.profiles import LAUNCH_DIR

        data = yaml.safe_load((LAUNCH_DIR / "cpu-fsdp-2.yaml").read_text())
        for key, value in changes.items():
            if value is None:
                data.pop(key, None)
            else:
                data[key] = value
        path = tmp_path / "custom-profile.yaml"
        path.write_text(yaml.safe_dump(data))
        return str(path)
    return write


def _sp_profile(zero_stage: int | None = None, **changes):
    """A profile file: cpu-zero3-sp-2 with `changes`; `zero_stage` writes it a ZeRO file of that stage."""
    def write(tmp_path):
        import json

        from dpo_dist.config.profiles import LAUNCH_DIR

        data = {**yaml.safe_load((LAUNCH_DIR / "cpu-zero3-sp-2.yaml").read_text()), **changes}
        if zero_stage is not None:
            zero = tmp_path / f"zero{zero_stage}.json"
            zero.write_text(json.dumps({"zero_optimization": {"stage": zero_stage}, "train_batch_size": "auto",
                                        "train_micro_batch_size_per_gpu": "auto"}))
            data["deepspeed_config"] = str(zero)
        path = tmp_path / "custom-sp-profile.yaml"
        path.write_text(yaml.safe_dump(data))
        return str(path)
    return write


def _heads(query: int, kv: int):
    def mutate(recipe, tmp_path):
        import json
        import pathlib

        config = pathlib.Path(recipe["model"]["name_or_path"]) / "config.json"
        config.write_text(json.dumps({"num_attention_heads": query, "num_key_value_heads": kv}))
    return mutate


def _both(*mutations):
    def mutate(recipe, tmp_path):
        for m in mutations:
            m(recipe, tmp_path)
    return mutate


def _chain_wrong_order(recipe, tmp_path):
    recipe["stages"].reverse()


def _no_stages(recipe, tmp_path):
    recipe["stages"] = []


def _duplicate_names(recipe, tmp_path):
    recipe["stages"][1]["name"] = "sft"


def _missing_data(recipe, tmp_path):
    recipe["stages"][0]["data"]["train"] = str(tmp_path / "nowhere" / "sft.jsonl")


def _start_from_adapter(recipe, tmp_path):
    adapter = tmp_path / "sft-adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    recipe["stages"][1]["start_from"] = str(adapter)


def _missing_model(recipe, tmp_path):
    recipe["model"]["name_or_path"] = str(tmp_path / "no-such-model")


# (id, recipe mutation, command: "train", "launch" (--dry-run) or "launch-run", profile (name or writer), extra args,
#  [substrings])
CASES = [
    ("unknown top-level key", _set("sede", 3), "train", None, [], ["sede: unknown key", "did you mean 'seed'"]),
    ("unknown nested key", _set("train.learning_rat", 1e-4), "train", None, [],
     ["train.learning_rat: unknown key", "did you mean 'train.learning_rate'"]),
    ("wrong type", _set("train.global_batch_size", "eight"), "train", None, [],
     ["train.global_batch_size: expected an integer, got 'eight'"]),
    ("negative learning rate", _set("train.learning_rate", -1e-4), "train", None, [],
     ["train.learning_rate: must be positive, got -0.0001"]),
    ("zero global batch", _set("train.global_batch_size", 0), "train", None, [],
     ["global_batch_size: must be positive"]),
    ("global batch not divisible", _set("train.global_batch_size", 6), "launch", "cpu-fsdp-2", [],
     ["stages.sft.train.global_batch_size: 6 is not divisible by micro-batch 2 × 2 process(es) = 4",
      "pick a global batch that is a multiple of 4"]),
    ("fp16 and bf16 together", _both(_set("train.fp16", True), _set("train.bf16", True)), "train", None, [],
     ["fp16 and bf16 are both true; choose one"]),
    ("fp16 LoRA on an FSDP (bf16-only) profile", _set("train.fp16", True), "launch", _profile(precision=None), [],
     ["stages.sft: FSDP2 shards each layer as one dtype", "use bf16 (A100/H100), a ZeRO-3 profile"]),
    ("qlora on a profile that cannot take it", _set("method.type", "qlora"), "launch", "cpu-fsdp-2", [],
     ["stages.sft: method qlora is not supported by profile cpu-fsdp-2", "profiles for qlora: "]),
    ("skip non-finite loss under DeepSpeed", _set("train.on_nonfinite_loss", "skip"), "launch", "cpu-zero3-2", [],
     ["stages.sft.train.on_nonfinite_loss: skip is not available under DeepSpeed", "use stop (the default)"]),
    ("missing data file", _missing_data, "train", None, [],
     ["stages.sft.data.train:", "no such file or directory"]),
    ("missing data file, through launch", _missing_data, "launch-run", "cpu", [],
     ["stages.sft.data.train:", "no such file or directory"]),
    ("missing model directory", _missing_model, "train", None, [],
     ["model.name_or_path:", "does not exist; give an existing model directory"]),
    ("start_from that does not exist", _set("stages.1.start_from", "/nowhere/sft/merged"), "launch-run", "cpu", [],
     ["stages.dpo.start_from: /nowhere/sft/merged does not exist", "<stage>/model or <stage>/merged"]),
    ("start_from an adapter", _start_from_adapter, "train", None, [],
     ["stages.dpo.start_from:", "holds a LoRA adapter, not a model", "`dpo-dist merge` makes one"]),
    ("stop_at_step zero", _set("train.stop_at_step", 0), "train", None, [],
     ["train.stop_at_step: must be positive (or null to train to the end), got 0"]),
    ("unknown template", _set("model.template", "qwen9"), "train", None, [], ["model.template:", "qwen9"]),
    ("dpo before sft with chain on", _chain_wrong_order, "train", None, [],
     ["stages: sft after dpo with chain: true", "set chain: false"]),
    ("no stages", _no_stages, "train", None, [], ["stages: at least one stage is required"]),
    ("duplicate stage names", _duplicate_names, "train", None, [],
     ["two stages share the name 'sft'", "distinct `name:` keys"]),
    ("unknown stage type", _set("stages.0.stage", "sfft"), "train", None, [],
     ["stages[0].stage: 'sfft' is not one of", "did you mean 'sft'"]),
    ("format of another stage kind", _set("stages.0.data.format", "pair"), "train", None, [],
     ["stages[0].data.format: 'pair' is not a sft format"]),
    ("unknown on_bad_row", _set("stages.0.data.on_bad_row", "ignore"), "train", None, [],
     ["stages[0].data.on_bad_row: 'ignore' is not one of 'error' | 'skip'"]),
    ("unknown on_nonfinite_loss", _set("train.on_nonfinite_loss", "ignore"), "train", None, [],
     ["train.on_nonfinite_loss: 'ignore' is not one of 'stop' | 'skip'"]),
    ("zero lora_r", _set("method.lora_r", 0), "train", None, [], ["method.lora_r: must be positive, got 0"]),
    ("lora_dropout out of range", _set("method.lora_dropout", 1.5), "train", None, [],
     ["method.lora_dropout: must be in [0, 1), got 1.5"]),
    ("max_prompt_length not below max_length", _set("stages.1.max_prompt_length", 64), "train", None, [],
     ["stages[1].max_prompt_length: must be between 1 and max_length-1 (63), got 64"]),
    ("non-positive beta", _set("stages.1.beta", 0), "train", None, [], ["stages[1].beta: must be positive"]),
    ("a DPO key on an SFT stage", _set("stages.0.max_prompt_length", 32), "train", None, [],
     ["stages[0].max_prompt_length: only applies to dpo, kto, orpo and cpo stages"]),
    ("unknown scheduler", _set("train.lr_scheduler", "cosin"), "train", None, [],
     ["lr_scheduler: 'cosin' is not one of linear, cosine"]),
    ("warmup ratio of 1 or more", _set("train.warmup_ratio", 1.5), "train", None, [],
     ["warmup_steps/warmup_ratio: must be >= 0 and ratio < 1"]),
    ("no epochs and no steps", _both(_set("train.num_epochs", 0), _set("train.max_steps", -1)), "train", None, [],
     ["num_epochs: must be positive unless max_steps is set"]),
    ("zero save_total_limit", _set("train.save_total_limit", 0), "train", None, [],
     ["train.save_total_limit: must be positive", "or null to keep all"]),
    ("unknown profile", None, "train", "cpu-fsdp-3", [], ["profile 'cpu-fsdp-3' not found", "available: "]),
    ("profile with a bad timeout", None, "launch", _profile(collective_timeout_s=0), [],
     ["collective_timeout_s: must be positive, got 0"]),
    ("override of an unknown key", None, "train", None, ["train.learning_rat=1e-4"],
     ["train.learning_rat: unknown key", "did you mean 'train.learning_rate'"]),
    ("unknown --stage", None, "train", None, ["--stage", "rm"], ["--stage rm: no such stage; stages are"]),
    ("unknown tracker", _set("train.report_to", ["tensorbord"]), "train", None, [],
     ["train.report_to[0]: 'tensorbord' is not one of", "did you mean 'tensorboard'"]),
    ("tracker listed twice", _set("train.report_to", ["tensorboard", "tensorboard"]), "train", None, [],
     ["train.report_to: tensorboard is listed twice"]),
    ("sample_every without prompts", _set("train.sample_every", 5), "train", None, [],
     ["train.sample_every: set, but there is no train.sample_prompts to answer"]),
    ("bad line in the sample prompts", _bad_sample_prompts, "train", None, [],
     ["stages.dpo.train.sample_prompts: ", "prompts.jsonl:2: invalid JSON"]),
    ("sample prompts file missing", _set("train.sample_prompts", "nowhere.jsonl"), "train", None, [],
     ["train.sample_prompts: nowhere.jsonl: no such file"]),
    ("sequence parallel under ZeRO-2", None, "launch", _sp_profile(zero_stage=2), [],
     ["sequence_parallel: 2 needs DeepSpeed ZeRO-3", "has ZeRO stage 2", "2× too large"]),
    ("sequence parallel under FSDP", None, "launch", _profile(sequence_parallel=2), [],
     ["sequence_parallel: 2 needs DeepSpeed ZeRO-3", "the fsdp backend"]),
    ("torch context parallel on CPU", None, "launch", _sp_profile(sequence_parallel_backend="torch"), [],
     ["sequence_parallel_backend: torch is not available", "GPU kernels", "use sequence_parallel_backend: deepspeed"]),
    ("sequence parallel not dividing the processes", None, "launch", _sp_profile(sequence_parallel=3), [],
     ["sequence_parallel: 3 does not divide the 2 processes"]),
    ("sequence parallel with eager attention", None, "launch", _sp_profile(attn_implementation="eager"), [],
     ["attn_implementation: eager cannot be split along the sequence", "use sdpa or flash_attention_2"]),
    ("sequence parallel with padding-free rows", _set("train.padding_free", True), "launch", _sp_profile(), [],
     ["stages.sft.train.padding_free: true packs a batch into one row", "set it to auto or false"]),
    ("sequence parallel with TRL's DPO head", _set("stages.1.train.compact_logps", False), "launch", _sp_profile(), [],
     ["stages.dpo.train.compact_logps: false uses TRL's head", "keep compact_logps: true"]),
    ("sequence parallel with indivisible heads", _heads(3, 3), "launch", _sp_profile(), [],
     ["sequence_parallel 2 splits the attention heads", "has 3 query and 3 key/value heads"]),
]


@pytest.fixture
def no_loading(monkeypatch):
    def fail(*args, **kwargs):
        pytest.fail("weights, tokenizer or training were reached: the bad config was not refused up front")

    import dpo_dist.launch.command
    import dpo_dist.models.loading

    monkeypatch.setattr(dpo_dist.models.loading, "load_model", fail)
    monkeypatch.setattr(dpo_dist.models.loading, "load_tokenizer", fail)
    monkeypatch.setattr(train, "run_recipe", fail)
    monkeypatch.setattr(dpo_dist.launch.command, "_run", fail)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_config_is_refused_before_weights_load(case, base, tmp_path, capsys, no_loading):
    name, mutate, command, profile, extra, expected = case
    recipe = copy.deepcopy(base)
    if mutate:
        mutate(recipe, tmp_path)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    profile = profile(tmp_path) if callable(profile) else profile
    if command == "train":
        argv = [str(path), *extra] + (["--profile", profile] if profile else [])
        code = train.main(argv)
    else:  # launch-run: a real launch (it must be refused before the launcher starts)
        dry = ["--dry-run"] if command == "launch" else []
        code = cli.main(["launch", str(path), "--profile", profile, *dry, *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("error: ")
    for text in expected:
        assert text in err[0], f"{text!r} not in {err[0]!r}"


@pytest.mark.parametrize("command", ["train", "validate"])
def test_a_tracker_that_is_not_installed_is_refused_naming_its_extra(command, base, tmp_path, capsys, no_loading,
                                                                     monkeypatch):
    # A module mapped to None in sys.modules is one Python cannot import (importlib.util.find_spec returns None):
    # mlflow is not installed here, whatever this machine has.
    monkeypatch.setitem(__import__("sys").modules, "mlflow", None)
    recipe = copy.deepcopy(base)
    recipe["stages"][1]["train"] = {"report_to": ["tensorboard", "mlflow"]}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    code = train.main([str(path)]) if command == "train" else cli.main(["validate", str(path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1] == (f"error: {path}: stages[1].train.report_to: mlflow is not installed; pip "
                                     "install 'dpo-dist[mlflow]', or take it off the list"), err


def test_report_to_reaches_the_trainer_and_defaults_to_tensorboard():
    from pathlib import Path

    from dpo_dist.config.profiles import Profile
    from dpo_dist.config.recipe import recipe_from_dict
    from dpo_dist.training.common import training_kwargs

    def report_to(train_keys: dict) -> list:
        stage = recipe_from_dict({"name": "t", "model": {"name_or_path": "m"}, "train": train_keys,
                                  "stages": [{"stage": "sft", "data": {"train": "x.jsonl"}}]}).stages[0]
        return training_kwargs(stage, Profile(name="p", micro_batch_size=1), Path("/tmp/r"), 0, 1)["report_to"]

    assert report_to({}) == ["tensorboard"]  # installed with the test extras
    assert report_to({"report_to": []}) == []
    assert report_to({"report_to": ["tensorboard"]}) == ["tensorboard"]


def test_the_table_has_at_least_twenty_distinct_cases():
    assert len({c[0] for c in CASES}) == len(CASES) >= 20


def test_invalid_yaml_names_file_and_line(base, tmp_path, capsys, no_loading):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(base) + "stages: [\n  - oops: : :\n")
    assert train.main([str(path)]) == 2
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert err.startswith(f"error: {path}:") and "invalid YAML" in err
