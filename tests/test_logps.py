"""The DPO stage's compact logits → log-probs path (dpo_dist.training.dpo.logps) against the textbook computation and
against TRL's own fused head, which it replaces."""
from __future__ import annotations

import pytest
import torch

from dpo_dist.config.recipe import ConfigError, TrainConfig
from dpo_dist.training.dpo import logps as logps_mod
from tests.helpers import KernelSpy, dpo_trainer, perturb, train_step

ALL = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def _inputs(seed=0, rows=3, seq=9, hidden=16, vocab=50):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, seq, hidden, generator=gen, dtype=torch.float64).float().requires_grad_(True)
    w = (torch.randn(vocab, hidden, generator=gen) * 0.5).requires_grad_(True)
    b = torch.randn(vocab, generator=gen) * 0.1
    labels = torch.randint(0, vocab, (rows, seq), generator=gen)
    labels[:, :3] = -100  # the prompt
    labels[1, 6:] = -100  # padding
    labels[2, :] = -100  # a row with nothing to score
    return h, w, b, labels


@pytest.mark.parametrize("chunk", [7, 50, 8192])  # ragged tiles, one exact tile, one wider than the vocabulary
def test_completion_logps_equal_the_materialized_logits(chunk):
    h, w, b, labels = _inputs()
    got = logps_mod.completion_logps(h, w, b, labels, vocab_chunk=chunk, outputs=ALL)
    log_probs, entropy, log_sum_sq, mean_logits, is_top1, mask = got
    (log_probs.sum() + 0.3 * entropy.sum()).backward()
    grad_h, grad_w = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None

    logits = h @ w.t() + b
    logp_all = logits.log_softmax(-1)
    target = logp_all.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    want_mask = labels != -100
    want_logp = target.masked_fill(~want_mask, 0)
    want_entropy = -(logp_all.exp() * logp_all).sum(-1).masked_fill(~want_mask, 0)
    (want_logp.sum() + 0.3 * want_entropy.sum()).backward()

    assert torch.equal(mask, want_mask)
    torch.testing.assert_close(log_probs, want_logp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, want_entropy, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mean_logits, logits.mean(-1).masked_fill(~want_mask, 0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(log_sum_sq, (2 * logp_all).logsumexp(-1).masked_fill(~want_mask, 0),
                               atol=1e-5, rtol=1e-5)
    top1 = (logits.argmax(-1) == labels) & want_mask
    assert torch.equal(is_top1, top1)
    torch.testing.assert_close(grad_h, h.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_w, w.grad, atol=1e-5, rtol=1e-5)
    assert log_probs[2].abs().sum() == 0 and grad_h[2].abs().sum() == 0  # the empty row: zeros, no gradient


def test_only_completion_positions_reach_the_kernel(monkeypatch):
    h, w, b, labels = _inputs()
    spy = KernelSpy(monkeypatch)
    logps_mod.completion_logps(h, w, b, labels)
    assert spy.calls == [int((labels != -100).sum())] and spy.calls[0] < labels.numel() // 2


# ---- in the DPO trainer ----------------------------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize("method", ["lora", "full"])
def test_compact_head_gives_trls_loss_metrics_and_gradients(tiny_base, tmp_path, method, monkeypatch):
    spy = KernelSpy(monkeypatch)
    results = {}
    for compact in (True, False):
        spy.calls.clear()
        trainer = dpo_trainer(tiny_base, tmp_path, compact, method)
        perturb(trainer)
        loss, grads, metrics, batch = train_step(trainer)
        results[compact] = (loss, grads, metrics)
        completion = int(batch["completion_mask"][:, 1:].sum())
        # policy, then reference (adapter disabled or the frozen copy): completion tokens only, or not ours at all
        assert spy.calls == ([completion, completion] if compact else []), spy.calls
    (loss_c, grads_c, metrics_c), (loss_t, grads_t, metrics_t) = results[True], results[False]
    assert abs(loss_c - loss_t) < 1e-5
    assert grads_c.keys() == grads_t.keys() and grads_c
    for name in grads_c:
        torch.testing.assert_close(grads_c[name], grads_t[name], atol=1e-5, rtol=1e-4, msg=name)
    assert metrics_c.keys() == metrics_t.keys()
    for key in metrics_c:  # rewards, log-probs, entropy, mean logits, token accuracy
        assert metrics_c[key] == pytest.approx(metrics_t[key], abs=1e-5), key
    assert metrics_c["rewards/margins"] != 0.0


@pytest.mark.e2e
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_padding_free_rows_give_the_padded_loss_metrics_and_gradients(tiny_base, tmp_path, attn):
    results = {}
    for packed in (True, False):
        trainer = dpo_trainer(tiny_base, tmp_path, True, padding_free=packed, attn=attn)
        backbone = trainer.model.get_base_model().model
        shapes, bounds = [], []
        hook = backbone.register_forward_pre_hook(lambda _m, _a, kw: shapes.append(tuple(kw["input_ids"].shape)),
                                                  with_kwargs=True)
        # what the attention layers receive: the packed row's sequence boundaries, so flash-attention's varlen path
        # need not derive them from the position ids (a host sync per layer)
        attention = backbone.layers[-1].self_attn.register_forward_pre_hook(
            lambda _m, _a, kw: bounds.append({k: kw.get(k) for k in ("cu_seq_lens_q", "cu_seq_lens_k",
                                                                      "max_length_q", "max_length_k")}),
            with_kwargs=True)
        perturb(trainer)
        results[packed] = (*train_step(trainer), shapes, bounds)
        hook.remove()
        attention.remove()
    (loss_p, grads_p, metrics_p, batch, shapes_p, bounds_p), (loss_d, grads_d, metrics_d, _, shapes_d, bounds_d) = (
        results[True], results[False])
    real, padded = int(batch["attention_mask"].sum()), tuple(batch["input_ids"].shape)
    assert real < 0.9 * padded[0] * padded[1]  # the batch really has padding to remove
    assert shapes_p == [(1, real)] * 2 and shapes_d == [padded] * 2  # policy and reference: one packed row
    lengths = batch["attention_mask"].sum(1).tolist()
    cumulative = [sum(lengths[:i]) for i in range(len(lengths) + 1)]
    assert len(bounds_p) >= 2 and all(b["max_length_q"] == b["max_length_k"] == max(lengths) for b in bounds_p)
    for b in bounds_p:
        assert b["cu_seq_lens_q"].dtype == torch.int32 and b["cu_seq_lens_q"].tolist() == cumulative
        assert b["cu_seq_lens_k"].tolist() == cumulative
    assert all(v is None for b in bounds_d for v in b.values())  # padded rows keep their attention mask only
    assert abs(loss_p - loss_d) < 1e-5
    for name in grads_d:
        torch.testing.assert_close(grads_p[name], grads_d[name], atol=1e-5, rtol=1e-4, msg=name)
    for key in metrics_d:
        assert metrics_p[key] == pytest.approx(metrics_d[key], abs=1e-5), key


def test_pack_keeps_real_tokens_with_restarting_positions():
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    packed, positions, index = logps_mod.pack(ids, mask)
    assert packed.tolist() == [[5, 6, 7, 8, 9]] and positions.tolist() == [[0, 1, 2, 0, 1]]
    assert index.tolist() == [[0, 1, 2, -1], [3, 4, -1, -1]]


def test_padding_free_auto_only_with_varlen_attention():
    assert logps_mod.padding_free_for("auto", "flash_attention_2") is True
    assert logps_mod.padding_free_for("auto", "sdpa") is False and logps_mod.padding_free_for("auto", "eager") is False
    assert logps_mod.padding_free_for(True, "sdpa") is True and logps_mod.padding_free_for(False, "flash_attention_2") is False


def test_recipe_keys_are_checked():
    with pytest.raises(ConfigError, match=r"logps_vocab_chunk: must be positive, got 0"):
        TrainConfig(logps_vocab_chunk=0).check("stages[0].train")
    with pytest.raises(ConfigError, match=r"padding_free: true needs compact_logps: true"):
        TrainConfig(padding_free=True, compact_logps=False).check("stages[0].train")
    with pytest.raises(ConfigError, match=r"padding_free: must be true, false or auto"):
        TrainConfig(padding_free="always").check("stages[0].train")


def test_triton_kernels_run_only_where_the_gpu_can_run_them(tiny_base, monkeypatch):
    # TRL chooses its Triton kernels on any CUDA device; below compute capability 8.0 (V100, T4) they cannot run,
    # and the kernel's PyTorch tiles must be used. Device facts patched: this machine has no GPU.
    from transformers import AutoModelForCausalLM
    from trl.kernels import chunked_logprob

    monkeypatch.setattr(chunked_logprob, "_use_triton", chunked_logprob._use_triton)  # restored afterwards
    monkeypatch.setattr(chunked_logprob, "_TRITON_AVAILABLE", True)
    monkeypatch.setattr(logps_mod, "_TRITON_BY_DEVICE", {})
    capability = {0: (7, 0), 1: (9, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: capability[torch.device(d).index])
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    logps_mod.install_compact_head(model, ("log_probs",))
    assert chunked_logprob._use_triton is logps_mod.triton_runs_on  # what TRL's kernel asks at every call
    assert chunked_logprob._use_triton(torch.device("cuda", 0)) is False  # Volta: PyTorch tiles
    assert chunked_logprob._use_triton(torch.device("cuda", 1)) is True  # Hopper: Triton
    assert chunked_logprob._use_triton(torch.device("cpu")) is False
    monkeypatch.setattr(chunked_logprob, "_TRITON_AVAILABLE", False)
    monkeypatch.setattr(logps_mod, "_TRITON_BY_DEVICE", {})
    assert chunked_logprob._use_triton(torch.device("cuda", 1)) is False  # no Triton installed
