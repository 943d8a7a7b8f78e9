"""The planner's constants: byte sizes, the layouts and optimizers it knows, and the framework allowances.

One set for every plan and every validation row (docs/planner.md lists them); none is set to match a published figure.
"""
from __future__ import annotations

GIB = 2 ** 30
METHODS = ("full", "lora", "qlora")
STAGES = ("sft", "dpo", "kto", "orpo", "cpo", "pretrain")
PAIRED_STAGES = ("dpo", "orpo", "cpo")  # one forward holds chosen and rejected: twice the sequences
REFERENCE_STAGES = ("dpo", "kto")  # a reference model scores the rows (orpo and cpo are reference-free)
PRECISIONS = {"bf16": 2, "fp16": 2, "fp32": 4}  # bytes of a value in the compute dtype
LAYOUTS = ("single", "ddp", "fsdp", "fsdp-offload", "zero3", "zero3-offload")
LAYOUT_TEXT = {
    "single": "one GPU", "ddp": "DDP, everything replicated", "fsdp": "FSDP full shard",
    "fsdp-offload": "FSDP full shard, parameters offloaded to CPU", "zero3": "DeepSpeed ZeRO-3",
    "zero3-offload": "DeepSpeed ZeRO-3, parameters and optimizer offloaded to CPU",
}

NF4_BYTES = 0.5  # 4 bits per quantized weight
# dpo-dist always sets bnb_4bit_use_double_quant: one 8-bit absmax per block of 64 weights, plus one fp32 scale per
# 256 such blocks. These quantization constants are module state, not parameters, so FSDP and ZeRO-3 leave them
# whole on every GPU.
QUANT_STATE_BYTES = 1 / 64 + 4 / (64 * 256)
# The CUDA context, the kernel images PyTorch and its libraries load (lazily), and the cuBLAS workspaces: what
# nvidia-smi shows for a process before its first tensor, typically 0.5-1 GiB.
CUDA_CONTEXT_GIB = 0.75
NCCL_GIB = 0.25  # NCCL's communicator buffers, allocated outside PyTorch's allocator, with more than one GPU
# PyTorch's caching allocator holds more than the tensors it serves: sizes are rounded up, cached blocks are split,
# and blocks freed in one phase are not always the right size for the next. Counted as this fraction of everything
# allocated through it; published figures (nvidia-smi, W&B) include it.
ALLOCATOR_OVERHEAD = 0.10
FSDP_UNITS_IN_FLIGHT = 2  # the decoder layer being computed and the one prefetched
# ZeRO-3 keeps a gathered parameter while it will be reused within stage3_max_reuse_distance, up to
# stage3_max_live_parameters: both 1e9 elements in configs/deepspeed/zero3.json (DeepSpeed's defaults). At the turn
# from forward to backward that keeps the last layers gathered, up to the cap.
ZERO3_MAX_LIVE_ELEMENTS = 1e9
# Logits: the compute-dtype output of lm_head, its fp32 upcast for the loss, and the fp32 log-softmax kept for the
# backward pass (whose gradient then reuses the freed upcast).
LOGIT_FP32_COPIES = 2

# Optimizer: (states per trainable parameter, bytes per state; None = the dtype of the weights it updates, as torch's
# AdamW allocates its moments like the parameter). bitsandbytes' 8-bit states add one fp32 absmax per 2048-value
# block (0.2%), left out. Paged variants are counted as resident: they move to CPU only under memory pressure.
OPTIMIZERS = {
    "adamw_torch": (2, None), "adamw_torch_fused": (2, None), "adamw_hf": (2, None), "adamw_apex_fused": (2, None),
    "adamw_8bit": (2, 1), "adamw_bnb_8bit": (2, 1), "paged_adamw_8bit": (2, 1), "paged_adamw_32bit": (2, 4),
    "lion_8bit": (1, 1), "lion_32bit": (1, 4), "paged_lion_8bit": (1, 1), "paged_lion_32bit": (1, 4),
    "adagrad": (1, None), "rmsprop": (1, None),
    "sgd": (0, 0),  # the Trainer's SGD has no momentum: no state
    "adafactor": (0, 0),  # factored second moment, O(rows + cols) per matrix: negligible, counted as 0
}
# Published per-GPU figures run up to about 25% above the plan (docs/planner.md, Validation): a plan above this
# fraction of the card is reported as tight rather than as a comfortable fit.
TIGHT_FRACTION = 0.85
