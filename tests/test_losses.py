"""Every TRL DPO loss type, loss mixtures (loss_weights), ld_alpha and the f-divergences: refused in the recipe where
TRL would refuse them (some TRL only refuses at its first step), and each accepted one trained through dpo-dist's
compact log-prob head with the same loss and gradients as through TRL's own."""
from __future__ import annotations

import math
import typing
from pathlib import Path

import pytest

from dpo_dist.config.recipe import CPO_LOSSES, DPO_LOSSES, F_DIVERGENCE_LOSSES, KTO_LOSSES, LossType, recipe_from_dict
from dpo_dist.config.schema import ConfigError
from tests.helpers import dpo_trainer, perturb, train_step

TRL_LOSSES = [x for x in DPO_LOSSES if x != "simpo"]  # simpo is dpo-dist's own


def _recipe(**stage):
    return recipe_from_dict({"name": "t", "model": {"name_or_path": "m"},
                             "stages": [{"stage": "dpo", "data": {"train": "d.jsonl"}, **stage}]})


REFUSED = [
    ({"loss_type": "sigmod"}, "stages[0].loss_type: 'sigmod' is not one of", "did you mean 'sigmoid'?"),
    ({"loss_type": ["sigmoid", "bco_paer"]}, "stages[0].loss_type[1]: 'bco_paer'", "did you mean 'bco_pair'?"),
    ({"loss_type": []}, "stages[0].loss_type: an empty list", ""),
    ({"loss_type": ["sigmoid", "sigmoid"]}, "names a loss twice", ""),
    ({"loss_type": ["simpo", "sft"]}, "simpo is reference-free and runs on its own", ""),
    ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}, "stages[0].loss_weights: 1 weights for 2", ""),
    ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, -1.0]}, "stages[0].loss_weights: weights must be >= 0", ""),
    ({"loss_type": "sft", "sft_weight": 0.5}, "stages[0].sft_weight: loss_type already lists sft", ""),
    ({"loss_type": "exo_pair"}, "stages[0].label_smoothing: the exo_pair loss needs a value in (0, 1)", ""),
    ({"loss_type": "robust", "label_smoothing": 0.6}, "the robust loss needs a value in [0, 0.5)", ""),
    ({"ld_alpha": 1.5}, "stages[0].ld_alpha: must be in [0, 1]", ""),
    ({"loss_type": "aot", "f_divergence_type": "js_divergence"}, "stages[0].f_divergence_type: js_divergence works "
     "only with", "loss_type has aot"),
    ({"f_divergence_type": "kl"}, "stages[0].f_divergence_type: 'kl' is not one of", ""),
    ({"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.0}, "f_alpha_divergence_coef: must be "
     "above 0", ""),
    ({"loss_type": "discopop", "discopop_tau": 0.0}, "stages[0].discopop_tau: must be above 0", ""),
]


@pytest.mark.parametrize("stage,message,hint", REFUSED, ids=[m[:40] for _, m, _ in REFUSED])
def test_what_trl_would_refuse_is_refused_in_the_recipe_naming_the_key(stage, message, hint):
    with pytest.raises(ConfigError) as err:
        _recipe(**stage)
    assert message in str(err.value) and hint in str(err.value), str(err.value)
    assert "\n" not in str(err.value)


def test_the_keys_are_refused_outside_dpo_stages():
    for key, value in (("loss_weights", [1.0]), ("ld_alpha", 0.5), ("f_divergence_type", "forward_kl"),
                       ("discopop_tau", 0.1)):
        with pytest.raises(ConfigError, match=rf"stages\[0\]\.{key}: only applies to dpo stages"):
            recipe_from_dict({"name": "t", "model": {"name_or_path": "m"},
                              "stages": [{"stage": "sft", "data": {"train": "d.jsonl"}, key: value}]})


def test_the_trainer_arguments_carry_the_mixture():
    from dpo_dist.config.profiles import Profile
    from dpo_dist.training.dpo.trainer import dpo_args

    stage = _recipe(loss_type=["sigmoid", "robust"], loss_weights=[0.8, 0.2], sft_weight=1.0, ld_alpha=0.5,
                    f_divergence_type="js_divergence").stages[0]
    args = dpo_args(stage, Profile(name="t", micro_batch_size=2, precision="fp32"), Path("/tmp/x"),
                    0, 1)
    assert (args.loss_type, args.loss_weights) == (["sigmoid", "robust", "sft"], [0.8, 0.2, 1.0])
    assert (args.ld_alpha, args.f_divergence_type) == (0.5, "js_divergence")
    assert dpo_args(_recipe(sft_weight=0.5).stages[0], Profile(name="t", micro_batch_size=2, precision="fp32"),
                    Path("/tmp/x"), 0, 1).loss_weights == [1.0, 0.5]


def test_a_loss_that_sorts_within_a_micro_batch_says_so_in_the_train_log(tiny_base, tmp_path):
    logs = {}
    for losses in ("sigmoid", ["sigmoid", "aot"]):
        lines = logs[str(losses)] = []
        dpo_trainer(tiny_base, tmp_path, True, loss_type=losses, log=lines.append,
                    **({"loss_weights": [0.5, 0.5]} if isinstance(losses, list) else {}))
    assert not [ln for ln in logs["sigmoid"] if "micro_batch_size" in ln]
    assert ("[train] dpo: loss aot sorts the log-ratios within each micro-batch, so its numbers depend on the "
            "profile's micro_batch_size (4 here); profiles with the same micro-batch size agree") in logs["['sigmoid', 'aot']"]


CASES = [{"loss_type": x, **({"label_smoothing": 0.01} if x == "exo_pair" else {})} for x in TRL_LOSSES] + [
    {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]},
    {"loss_type": "sigmoid", "ld_alpha": 0.5},
    *({"loss_type": "sigmoid", "f_divergence_type": f} for f in ("forward_kl", "js_divergence", "alpha_divergence")),
]


@pytest.mark.slow
@pytest.mark.parametrize("keys", CASES, ids=lambda k: "-".join(str(v) for v in k.values()).replace(" ", ""))
def test_every_loss_trains_through_the_compact_head_as_through_trls(keys, tiny_base, tmp_path):
    # One step on the same rows and weights: TRL's own LM head, then dpo-dist's compact one; the loss must be the
    # same and finite, with gradients, and the policy off the reference so that the loss is not its trivial value.
    got = {}
    for compact in (False, True):
        trainer = dpo_trainer(tiny_base, tmp_path, compact, sft_weight=0.0, **keys)
        assert trainer.loss_types == (keys["loss_type"] if isinstance(keys["loss_type"], list) else [keys["loss_type"]])
        perturb(trainer)
        loss, grads, metrics, _ = train_step(trainer)
        assert math.isfinite(loss) and grads and all(g.abs().sum() > 0 for g in grads.values()), keys
        got[compact] = loss, grads, metrics["rewards/margins"]
    (l0, g0, m0), (l1, g1, m1) = got[False], got[True]
    assert l1 == pytest.approx(l0, rel=1e-4, abs=1e-6) and m1 == pytest.approx(m0, rel=1e-4, abs=1e-6)
    for name in g0:
        assert (g1[name] - g0[name]).abs().max() <= 1e-4 * max(1.0, g0[name].abs().max().item()), name


def test_the_loss_lists_are_trls_own():
    # When a TRL release adds or drops a loss, or changes which take an f-divergence, this fails: update LossType and
    # F_DIVERGENCE_LOSSES (TRL itself checks loss names only at the first step, and f-divergences in __init__).
    import ast
    import inspect
    import re

    from trl import DPOTrainer

    message = inspect.getsource(DPOTrainer._compute_loss).split("Unknown loss type")[1].split("]")[0]
    assert re.findall(r"'(\w+)'", message) == TRL_LOSSES
    init = inspect.getsource(DPOTrainer.__init__)
    assert ast.literal_eval(re.search(r"f_divergence_loss_types = (\{[^}]*\})", init)[1]) == set(F_DIVERGENCE_LOSSES)
    # ... and KTO's and CPO's, from their configs' own lists of choices; LossType holds all of them
    import dataclasses
    import warnings

    from trl import KTOConfig
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.experimental.cpo import CPOConfig
    for config, ours in ((KTOConfig, KTO_LOSSES), (CPOConfig, CPO_LOSSES)):
        field = next(f for f in dataclasses.fields(config) if f.name == "loss_type")
        assert field.metadata["choices"] == list(ours), config.__name__
    assert set(typing.get_args(LossType)) == set(DPO_LOSSES) | set(KTO_LOSSES) | set(CPO_LOSSES)
