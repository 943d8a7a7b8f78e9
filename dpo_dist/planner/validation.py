"""Published per-GPU memory figures beside the planner's predictions.

The validation table in docs/planner.md is rendered from ROWS by `render_table()`; tests/test_plan.py checks that
the doc shows exactly what the code computes and that every row not marked `known_miss` is within 15%.
Regenerate the table with `python -m dpo_dist.planner.validation`.

Each row's inputs restate the published run's own settings (model, GPUs, sequence length, batch, LoRA rank and
dropout, optimizer, precision, layout); none of the planner's constants is set per row.
"""
from __future__ import annotations

from dpo_dist.planner.arch import preset_arch
from dpo_dist.planner.model import GIB, Plan, PlanInput, plan

TOLERANCE = 0.15
PEFT_FSDP = "https://huggingface.co/docs/peft/accelerate/fsdp"
PEFT_DEEPSPEED = "https://huggingface.co/docs/peft/accelerate/deepspeed"
FIREFLY = "https://github.com/yangjianxin1/Firefly"
# The PEFT runs: peft's examples/sft/train.py on Llama-2-70b-hf, packed 2048-token sequences, 2 per GPU, LoRA r 8 on
# all linear layers with dropout 0.1, NF4 with nested (double) quantization stored as bf16, bf16, flash-attention 2,
# reentrant gradient checkpointing, gradient accumulation 2, and the Trainer's default optimizer (adamw_torch).
PEFT_70B = dict(method="qlora", stage="sft", gpus=2, seq=2048, micro_batch=2, lora_r=8, lora_dropout=0.1,
                optim="adamw_torch", precision="bf16", gradient_checkpointing=True, grad_accum=2)
# Under FSDP the adapters stay fp32: trl's SFTTrainer calls get_peft_model, whose autocast_adapter_dtype (default
# True) upcasts them, and skips peft_module_casting_to_bf16 for sharded QLoRA; peft's fsdp_auto_wrap_policy gives each
# adapter its own FSDP unit, so FSDP1 keeps them fp32 beside the bf16 base.
PEFT_FSDP_ADAPTERS = dict(fp32_adapters=True)

ROWS = [
    dict(run="PEFT docs, FSDP + QLoRA, 2×24 GB, parameters offloaded to CPU", url=PEFT_FSDP, published_gb=19.6,
         model="Llama-2-70B", inputs=dict(PEFT_70B, **PEFT_FSDP_ADAPTERS, gpu_mem_gib=24, layout="fsdp-offload"),
         sibling=1,  # the same run without offload
         known_miss="The plan puts {gib:.1f} GiB on each GPU, the published run {published} GB. About {short:.1f} "
         "GiB of the gap is the shortfall the non-offloaded run shows too; the rest is offload saving less than "
         "planned: {published_delta:.1f} GB published between the two runs against {plan_delta:.1f} GiB in the plan. "
         "What FSDP1's CPU offload documents keeping on the GPU is modelled (the root unit and the GPU copies of the "
         "shards being gathered, and the no_sync gradients); what else the measured process held is not known, and "
         "PEFT's page lists the GPU memory saving of CPU offloading as untested. No constant was changed to close it."),
    dict(run="PEFT docs, FSDP + QLoRA, 2×24 GB, no offload", url=PEFT_FSDP, published_gb=35.6,
         model="Llama-2-70B", inputs=dict(PEFT_70B, **PEFT_FSDP_ADAPTERS, gpu_mem_gib=24, layout="fsdp")),
    dict(run="PEFT docs, DeepSpeed ZeRO-3 + QLoRA, 2×40 GB", url=PEFT_DEEPSPEED, published_gb=36.6,
         model="Llama-2-70B", inputs=dict(PEFT_70B, gpu_mem_gib=40, layout="zero3")),
    # Firefly's Qwen1.5-7B QLoRA SFT settings (train_args/sft/qlora/qwen1.5-7b-sft-qlora.json) with the rank of the
    # README's Unsloth comparison: fp16 on one V100, max_seq_length 1024, batch 1, LoRA r 8 on all linear layers with
    # dropout 0.05, paged_adamw_32bit, gradient checkpointing, sdpa attention. Its train.py calls peft's
    # prepare_model_for_kbit_training, which upcasts the non-quantized weights to fp32.
    dict(run="Firefly README, Qwen1.5-7B QLoRA without Unsloth, one V100", url=FIREFLY, published_gb=13.72,
         model="Qwen1.5-7B", inputs=dict(method="qlora", stage="sft", gpus=1, gpu_mem_gib=32, seq=1024, micro_batch=1,
                                         lora_r=8, lora_dropout=0.05, optim="paged_adamw_32bit", precision="fp16",
                                         gradient_checkpointing=True, layout="single", upcast_unquantized=True)),
]


def predict(row: dict) -> Plan:
    return plan(PlanInput(arch=preset_arch(row["model"]), **row["inputs"]))


def errors(row: dict) -> tuple[float, float]:
    """Relative error of the prediction, reading the published GB as GiB and as 10^9 bytes."""
    gib = predict(row).per_gpu_gib
    return gib / row["published_gb"] - 1, gib * GIB / 1e9 / row["published_gb"] - 1


def _setting(row: dict) -> str:
    i = row["inputs"]
    parts = [row["model"], f"{i['gpus']} GPU" + ("s" if i["gpus"] > 1 else ""), i["layout"], i["method"],
             f"seq {i['seq']}", f"micro-batch {i['micro_batch']}", f"r {i['lora_r']}", f"dropout {i['lora_dropout']}",
             i["precision"], i["optim"], "checkpointing" if i["gradient_checkpointing"] else "no checkpointing"]
    if i.get("grad_accum", 1) > 1:
        parts.append(f"gradient accumulation {i['grad_accum']}")
    if i.get("fp32_adapters"):
        parts.append("fp32 adapters (peft's default)")
    if i.get("upcast_unquantized"):
        parts.append("fp32 non-quantized weights (prepare_model_for_kbit_training)")
    return ", ".join(parts)


def render_notes() -> str:
    """One paragraph per row outside the tolerance, its numbers computed like the table's."""
    notes = []
    for row in ROWS:
        if "known_miss" not in row:
            continue
        sibling = ROWS[row["sibling"]]
        gib, sib_gib = predict(row).per_gpu_gib, predict(sibling).per_gpu_gib
        short = sibling["published_gb"] - sib_gib
        notes.append(f"- **{row['run']}**: " + row["known_miss"].format(
            gib=gib, published=row["published_gb"], short=short, plan_delta=sib_gib - gib,
            published_delta=sibling["published_gb"] - row["published_gb"]))
    return "\n".join(notes)


def render_table() -> str:
    lines = ["| Published run | Planner inputs | Published | Predicted | Error (GB read as GiB) | "
             "Error (GB = 10⁹ B) |", "|---|---|---|---|---|---|"]
    for row in ROWS:
        err, err_decimal = errors(row)
        verdict = "" if abs(err) <= TOLERANCE else " (miss, see below)"
        lines.append(f"| [{row['run']}]({row['url']}) | {_setting(row)} | {row['published_gb']} GB | "
                     f"{predict(row).per_gpu_gib:.2f} GiB | {err:+.1%}{verdict} | {err_decimal:+.1%} |")
    return "\n".join(lines)


def render() -> str:
    """The block between the validation markers of docs/planner.md."""
    return render_table() + "\n\nRows outside ±15%:\n\n" + render_notes()


if __name__ == "__main__":
    print(render())
