"""Held-out evaluation: preference accuracy from policy log-probs, and generations (greedy or sampled)."""
from __future__ import annotations

import torch

from dpo_dist.data.render import Renderer
from dpo_dist.data.tokenize import prompt_budget, tokenize_dpo


@torch.no_grad()
def sequence_logps(model, tokenizer, renderer: Renderer, rows: list[dict], max_length: int = 512,
                   batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of each row's chosen and rejected response given its prompt (DPO tokenization)."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    model.eval()
    collate = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)  # the training batch layout
    chosen, rejected = [], []
    encoded = [tokenize_dpo(r, tokenizer, renderer, max_length, prompt_budget(max_length, None)) for r in rows]
    for start in range(0, len(encoded), batch_size):
        batch = {k: v.to(model.device) for k, v in collate(encoded[start : start + batch_size]).items()}
        c, r = summed_logps(model, batch).cpu().chunk(2)  # the batch is [chosen..., rejected...]
        chosen.append(c)
        rejected.append(r)
    return torch.cat(chosen), torch.cat(rejected)


def summed_logps(model, batch):
    """Per sequence, the summed log-prob of its completion tokens (the DPO trainer's sequence score)."""
    ids, completion = batch["input_ids"], batch["completion_mask"]
    logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits
    sums = []
    for row_logits, row_ids, row_completion in zip(logits, ids, completion):  # fp32 for a whole batch over a
        # 150k-token vocabulary would take gigabytes; one row at a time takes one row's worth
        logp = torch.log_softmax(row_logits[:-1].float(), dim=-1).gather(-1, row_ids[1:, None]).squeeze(-1)
        sums.append((logp * row_completion[1:]).sum())
    return torch.stack(sums)


def preference_accuracy(model, tokenizer, renderer: Renderer, rows: list[dict]) -> dict:
    """How often the policy gives the chosen response a higher log-prob than the rejected one."""
    c, r = sequence_logps(model, tokenizer, renderer, rows)
    return {"preference_accuracy": (c > r).float().mean().item(), "mean_logp_margin": (c - r).mean().item()}


@torch.no_grad()
def generate(model, tokenizer, renderer: Renderer, prompts: list[list[dict]], max_new_tokens: int = 24,
             batch_size: int = 16, *, temperature: float = 0.0, top_p: float = 1.0, repetition_penalty: float = 1.0,
             streamer=None, synced_gpus: bool | None = None, stopping_criteria=None) -> list[str]:
    """Completions of chat prompts, each stopped at the template's end-of-turn token or eos. Temperature 0 is greedy;
    above 0 it samples (seed torch beforehand for repeatable output). A `streamer` (batch size 1 only) receives the
    token ids as they are generated, as in transformers' generate. `synced_gpus`: every rank of a sharded model keeps
    running forwards until all ranks are done (None: transformers decides). `stopping_criteria` (a transformers
    StoppingCriteriaList) may end a completion earlier: the server's stop strings and its client-gone check."""
    model.eval()
    stops = stop_token_ids(tokenizer, renderer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    if temperature > 0:
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p)
    else:  # explicit, so a model's generation_config that samples by default does not
        sampling = dict(do_sample=False)
    texts = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the right edge
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = [renderer.generation_prompt(p) for p in prompts[start : start + batch_size]]
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, eos_token_id=stops, pad_token_id=pad,
                                 repetition_penalty=repetition_penalty, streamer=streamer, synced_gpus=synced_gpus,
                                 stopping_criteria=stopping_criteria, **sampling)
            texts += [reply_text(tokenizer, ids, stops) for ids in out[:, enc["input_ids"].shape[1]:].tolist()]
    finally:
        tokenizer.padding_side = side
    return texts


def stop_token_ids(tokenizer, renderer: Renderer) -> list[int]:
    """The ids that end a reply: the template's end-of-turn token and eos."""
    return sorted({tokenizer.convert_tokens_to_ids(renderer.eot_token), tokenizer.eos_token_id} - {None})


def reply_text(tokenizer, ids: list[int], stops: list[int]) -> str:
    """The reply in generated `ids`, as `generate` returns it (the server decodes a reply it streams the same way)."""
    # Cut at the first stop: an end-of-turn marker that is not a special token would survive decoding.
    end = next((i for i, t in enumerate(ids) if t in stops), len(ids))
    return tokenizer.decode(ids[:end], skip_special_tokens=True).strip()
