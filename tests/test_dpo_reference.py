"""With LoRA the DPO reference is the policy's own base with the adapter disabled: no second copy."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dpo_dist.data.render import Renderer
from dpo_dist.data.tokenize import prepare_dataset
from dpo_dist.models.loading import load_model, lora_config
from dpo_dist.config.profiles import Profile
from dpo_dist.config.recipe import DataConfig, MethodConfig, ModelConfig, StageConfig, TrainConfig
from dpo_dist.training.dpo.trainer import build_dpo_trainer, dpo_args
from tests.helpers import write_jsonl

pytestmark = pytest.mark.e2e


def summed_logps(model, batch) -> torch.Tensor:
    ids, mask = batch["input_ids"], batch["completion_mask"]
    logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits.float()
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (logp * mask[:, 1:]).sum(-1)


def make_trainer(tiny_base, tmp_path, method="lora"):
    src = write_jsonl(tmp_path / "dpo.jsonl", [
        {"prompt": f"Describe the owl {i}.", "chosen": "It is calm.", "rejected": "It is rude."} for i in range(16)])
    tok = AutoTokenizer.from_pretrained(tiny_base)
    ds = prepare_dataset("dpo", str(src), tok, Renderer(tok, "qwen"), max_length=48, log=lambda *_: None).dataset
    stage = StageConfig(stage="dpo", data=DataConfig(train=str(src)), max_length=48,
                        train=TrainConfig(learning_rate=1e-2, global_batch_size=4, max_steps=3, logging_steps=1,
                                          save_steps=100, lr_scheduler="constant"))
    stage.check("stages[0]")
    model = load_model(ModelConfig(name_or_path=str(tiny_base)), method, "fp32", "sdpa")
    peft = lora_config(MethodConfig(lora_r=4, lora_alpha=8, lora_dropout=0.0)) if method != "full" else None
    profile = Profile(name="t", micro_batch_size=4, precision="fp32", attn_implementation="sdpa")
    args = dpo_args(stage, profile, tmp_path / "run", 0, 1)
    return build_dpo_trainer(stage, args, model, tok, ds, None, peft, [])


@pytest.fixture
def trainer(tiny_base, tmp_path):
    return make_trainer(tiny_base, tmp_path)


def test_reference_is_the_adapter_disabled_base(trainer, tiny_base):
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])

    # Step 0: policy == reference, so rewards are exactly 0 and the loss is ln 2.
    loss = trainer.compute_loss(trainer.model, batch)
    metrics = trainer._metrics["train"]
    assert metrics["rewards/chosen"][-1] == 0.0 and metrics["rewards/rejected"][-1] == 0.0
    assert math.isclose(loss.item(), math.log(2), abs_tol=1e-6)

    trainer.train()  # the adapter moves away from zero

    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = summed_logps(base, batch)
        ref_chosen, ref_rejected = trainer.compute_ref_log_probs(trainer.model, batch)
        policy = summed_logps(trainer.model, batch)
    torch.testing.assert_close(torch.cat([ref_chosen, ref_rejected]), expected, rtol=1e-5, atol=1e-5)
    assert (policy - expected).abs().max() > 1e-3  # the policy itself did change: the check above can fail


def test_trainer_holds_one_copy_of_the_base_weights(trainer, tiny_base):
    assert trainer.ref_model is None
    base = AutoModelForCausalLM.from_pretrained(tiny_base)
    base_numel = sum(p.numel() for p in base.parameters())
    frozen = {p.data_ptr(): p.numel() for p in trainer.model.parameters() if not p.requires_grad}
    assert sum(frozen.values()) == base_numel
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # No other module anywhere in the trainer holds base-sized weights.
    seen = {id(m) for m in trainer.model.modules()}
    others = [v for v in vars(trainer).values() if isinstance(v, torch.nn.Module) and id(v) not in seen]
    assert not others


def test_full_parameter_dpo_loads_a_frozen_reference(tiny_base, tmp_path):
    trainer = make_trainer(tiny_base, tmp_path, method="full")
    ref = trainer.ref_model
    assert ref is not None and not any(p.requires_grad for p in ref.parameters())
    policy_ptrs = {p.data_ptr() for p in trainer.model.parameters()}
    assert not policy_ptrs & {p.data_ptr() for p in ref.parameters()}  # a separate copy, as full DPO needs
    before = {n: p.detach().clone() for n, p in ref.named_parameters()}
    trainer.train()
    assert all(torch.equal(before[n], p) for n, p in ref.named_parameters())
