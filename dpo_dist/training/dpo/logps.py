"""The LM head → per-token log-probs path of the DPO stage (`train.compact_logps`, on by default).

TRL's DPOTrainer installs a fused head (`trl.trainer.utils.add_fused_lm_head`): `model(..., labels=labels,
fused_lm_head=True)` runs the backbone and folds `hidden @ head.T` into per-token log-probs tile by tile with
`trl.kernels.ChunkedLogProbFunction`, never holding the `[tokens, vocab]` logits. Its kernel is kept here; two of
its call's choices are changed:

- **Only completion tokens are scored, on every device.** TRL scores the valid positions only where Triton runs
  (CUDA/XPU); elsewhere it projects every position (prompt and padding included, about half of a DPO batch) and
  masks afterwards, so that compiled backends see fixed shapes. Here the positions whose label is not -100 are
  gathered first, everywhere. Their number varies per batch, as the padded length already does; with
  `train.torch_compile` each new shape recompiles (measured in docs/benchmarks.md).
- **Narrower vocabulary tiles** (`train.logps_vocab_chunk`, default 8,192 columns; TRL's is 32,768). A tile is
  `tokens × width` in the compute dtype, and the kernel's backward keeps a few tile-sized temporaries, so the width
  sets the path's peak memory; the GEMMs stay large enough to run at full speed.

- **Padding-free** (`train.padding_free`, auto: on with flash-attention's varlen kernels): the backbone runs on the
  batch's real tokens packed into one row, and no compute is spent on padding (TRL 1.16 disables its own
  padding-free DPO). With SDPA or eager attention it still works, through a block-diagonal mask, but that mask is
  dense over the packed row, so auto leaves it off there.

The result is the same tensors TRL's head returns (`FusedCausalLMOutput`: zero at unscored positions), so the rest
of DPOTrainer, and SimPO, run unchanged. Under sequence parallelism each rank scores its part of the sequence and the
parts are gathered (`_sequence_parallel_forward`). Calls this path does not cover (pre-shifted `shift_labels`, MoE
router logits) go to TRL's forward untouched.
"""
from __future__ import annotations

import functools
import types

import torch

from dpo_dist import compat
from dpo_dist.distributed import sequence

DEFAULT_VOCAB_CHUNK = 8192


def _backbone_and_head(model):
    import transformers
    from packaging.version import Version

    text_config = model.config.get_text_config()
    backbone_attr = "base_model"
    if text_config is not model.config and Version(transformers.__version__) < Version("5.0.0"):
        backbone_attr = "model"
    return text_config, backbone_attr


def _logit_scale(text_config) -> float:
    """The factor the head's logits are multiplied by (the same config fields TRL's fused head reads)."""
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        value = getattr(text_config, name, None)
        if value is not None:
            return value
    scaling = getattr(text_config, "logits_scaling", None)
    if scaling is not None:
        return scaling if text_config.model_type == "hyperclovax" else 1 / scaling
    return 1.0


def _score(rows: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, weight, bias, vocab_chunk, outputs,
           softcap, logit_scale, temperature):
    """The kernel on `rows` [M, H] (the hidden states of the M positions where `mask` [B, T] is true), scattered
    back to [B, T] with zeros elsewhere."""
    from trl.kernels import ChunkedLogProbFunction

    per_token = ChunkedLogProbFunction.apply(
        rows, weight, bias, labels[mask], temperature, vocab_chunk, softcap, logit_scale, outputs)
    # masked_scatter keeps an all-masked micro-batch connected to the graph (a differentiable zero).
    return tuple(None if x is None else x.new_zeros(mask.shape).masked_scatter(mask, x) for x in per_token)


def completion_logps(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                     vocab_chunk: int = DEFAULT_VOCAB_CHUNK, outputs: tuple[str, ...] = ("log_probs",),
                     softcap: float | None = None, logit_scale: float = 1.0, temperature: float = 1.0):
    """Per-token log-probs of `labels` under `hidden @ weight.T`, for already shifted `hidden` [B, T, H] and `labels`
    [B, T]. Positions labelled -100 are not projected at all; they come back as 0.

    Returns (log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1, mask), each [B, T] (None where not in
    `outputs`), like TRL's fused head.
    """
    mask = labels != -100
    scored = _score(hidden[mask], mask, labels, weight, bias, vocab_chunk, outputs, softcap, logit_scale, temperature)
    return (*scored, mask)


_TRITON_BY_DEVICE: dict[tuple[str, int | None], bool] = {}


def triton_runs_on(device: torch.device) -> bool:
    """Whether TRL's Triton kernels can run on `device`. TRL picks them on any CUDA device where Triton imports; they
    need compute capability 8.0 or newer (Ampere), so on a V100 or T4 the first DPO step would fail to compile. Below
    8.0 (and on CPUs, or without Triton) the kernel's PyTorch tiles compute the same folds. Decided once per device."""
    from trl.kernels import chunked_logprob

    device = torch.device(device)
    key = (device.type, device.index)
    if key not in _TRITON_BY_DEVICE:
        if not chunked_logprob._TRITON_AVAILABLE or device.type not in ("cuda", "xpu"):
            runs = False
        elif device.type == "xpu":
            runs = True
        else:
            runs = torch.cuda.get_device_capability(device)[0] >= 8
        _TRITON_BY_DEVICE[key] = runs
    return _TRITON_BY_DEVICE[key]


def use_triton_only_where_it_runs() -> None:
    """Make TRL's log-prob kernel (compact head and TRL's own fused head alike) ask triton_runs_on: TRL's chunked
    kernel reads its module-level `_use_triton` at every call (trl 1.16), so this is the one place to decide."""
    from trl.kernels import chunked_logprob

    compat.patch("trl-triton-capability")
    chunked_logprob._use_triton = triton_runs_on


VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3", "kernels-community/flash-attn",
                    "kernels-community/flash-attn3", "kernels-community/vllm-flash-attn3")


def padding_free_for(setting: str | bool, attn_implementation: str | None) -> bool:
    """`train.padding_free`: auto packs only where attention runs on variable-length sequences natively (flash
    varlen); with SDPA or eager attention a packed row gets a dense block-diagonal mask over all its tokens, which is
    correct (true forces it) but usually costs more than the padding it removes."""
    if setting == "auto":
        return attn_implementation in VARLEN_ATTENTION
    return bool(setting)


def pack(input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """The real tokens of a padded batch as one row: (ids [1, N], position_ids [1, N] restarting at 0 for each
    sequence, index [B, T] of each padded position in the row (-1 for padding))."""
    keep = attention_mask.bool()
    index = keep.flatten().cumsum(0).view(keep.shape) - 1
    positions = attention_mask.long().cumsum(1) - 1
    return input_ids[keep][None], positions[keep][None], index.masked_fill(~keep, -1)


def varlen_kwargs(attention_mask: torch.Tensor) -> dict:
    """Where each sequence of the packed row starts, for flash-attention's varlen kernels: `cu_seq_lens_q/k`
    (int32 [B + 1], from 0 to N) and `max_length_q/k` (a Python int). Given, transformers' flash path uses them as
    they are; without them it derives them from the position ids in every layer, with a host sync each time. Here
    the sync happens once per forward (the max length must be an int). Other attention implementations ignore them."""
    lengths = attention_mask.sum(1, dtype=torch.int32)
    cu = torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    longest = int(lengths.max()) if lengths.numel() else 0
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def install_compact_head(model, outputs: tuple[str, ...], vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
                         padding_free: bool = False) -> None:
    """Replace the fused forward TRL installed on `model` (the HF model under any PEFT wrapper) with the compact one,
    computing the per-token fields in `outputs` (those the trainer asked TRL's head for).

    With `padding_free`, the backbone runs on the batch's real tokens packed into one row (position ids restarting
    per sequence, no attention mask, and the sequence boundaries as varlen_kwargs: transformers then keeps the
    sequences apart, with varlen kernels under flash attention), and each scored position reads its hidden state
    from the packed row."""
    from torch.distributed.tensor import DTensor
    from trl.trainer.utils import maybe_gather_lm_head_ctx

    use_triton_only_where_it_runs()
    triton_runs_on(model.get_output_embeddings().weight.device)  # decided now, not inside a compiled step
    trl_forward = model.forward
    text_config, backbone_attr = _backbone_and_head(model)
    softcap = getattr(text_config, "final_logit_softcapping", None)
    scale = _logit_scale(text_config)

    @functools.wraps(type(model).forward)
    def _compact_forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None,
                         **kwargs):
        router = kwargs.get("output_router_logits") or getattr(text_config, "output_router_logits", False)
        if not fused_lm_head or shift_labels is not None or router:
            return trl_forward(*args, fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels,
                               num_items_in_batch=num_items_in_batch, **kwargs)
        kwargs["use_cache"] = False
        backbone = getattr(self, backbone_attr)
        head = self.get_output_embeddings()
        sp_group = sequence.group() if self.training and not args and "input_ids" in kwargs else None
        if sp_group is not None:
            return _sequence_parallel_forward(backbone, head, kwargs, labels, sp_group, vocab_chunk, outputs, softcap,
                                              scale, num_items_in_batch)
        labels = labels[:, 1:].to(head.weight.device)
        mask = labels != -100
        packed = padding_free and not args and kwargs.get("attention_mask") is not None and "input_ids" in kwargs
        if packed:
            attention_mask = kwargs.pop("attention_mask")
            ids, positions, index = pack(kwargs.pop("input_ids"), attention_mask)
            kwargs.pop("position_ids", None)
            hidden = backbone(input_ids=ids, position_ids=positions, **varlen_kwargs(attention_mask),
                              **kwargs).last_hidden_state[0]
            # the hidden state at position t predicts token t + 1: row index[:, :-1] of the packed output
            rows = hidden.to(head.weight.device)[index[:, :-1].to(head.weight.device)[mask]]
        else:
            hidden = backbone(*args, **kwargs).last_hidden_state[:, :-1]
            rows = hidden.to(head.weight.device)[mask]
        weight, bias = head.weight, head.bias
        if isinstance(weight, DTensor):  # FSDP2 shards the head: gather it once for every tile
            weight = weight.full_tensor()
            bias = bias.full_tensor() if bias is not None else None
        with maybe_gather_lm_head_ctx(weight, bias):  # ZeRO-3: gather the partitioned head
            scored = _score(rows, mask, labels, weight, bias, vocab_chunk, outputs, softcap, scale, 1.0)
        return _output(scored, mask, num_items_in_batch)

    compat.patch("trl-compact-lm-head")
    model.forward = types.MethodType(_compact_forward, model)


def _output(scored, mask, num_items_in_batch):
    from trl.trainer.utils import FusedCausalLMOutput

    log_probs, entropy, log_sum_sq, mean_logits, is_top1 = scored
    loss = -log_probs.sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
    return FusedCausalLMOutput(loss=loss, log_probs=log_probs, entropy=entropy, log_sum_sq_probs=log_sum_sq,
                               mean_logits=mean_logits, is_top1=is_top1, label_mask=mask, aux_loss=None)


def _sequence_parallel_forward(backbone, head, kwargs, labels, sp_group, vocab_chunk, outputs, softcap, scale,
                               num_items_in_batch):
    """The compact head under sequence parallelism (dpo_dist.distributed.sequence): this rank runs the backbone on its
    part of every sequence (Ulysses attention sees the whole sequence), scores its part's completion tokens, and the
    group's parts are gathered back into whole rows, so every rank returns the same [B, T − 1] tensors as one
    process would. The batch is right-padded (TRL's collator), so with causal attention the padding, including the
    extra padding to a multiple of the group size, never changes a real position."""
    from trl.trainer.utils import maybe_gather_lm_head_ctx

    input_ids = kwargs.pop("input_ids")
    attention_mask = kwargs.pop("attention_mask", None)  # Ulysses attends causally by position; padding is at the end
    kwargs.pop("position_ids", None)
    t = input_ids.size(1)
    ids, positions, targets, _ = sequence.split_by_position(input_ids, labels, attention_mask, 0, sp_group)
    hidden = backbone(input_ids=ids, position_ids=positions, **kwargs).last_hidden_state
    targets = targets.to(head.weight.device)
    mask = targets != -100
    with maybe_gather_lm_head_ctx(head.weight, head.bias):  # ZeRO-3: gather the partitioned head
        scored = _score(hidden.to(head.weight.device)[mask], mask, targets, head.weight, head.bias, vocab_chunk,
                        outputs, softcap, scale, 1.0)
    whole = tuple(None if x is None else sequence.gather_positions(x, sp_group)[:, :t - 1] for x in scored)
    return _output(whole, labels[:, 1:].to(head.weight.device) != -100, num_items_in_batch)
