"""The arithmetic of `dpo-dist plan`: the per-GPU memory of one training step, item by item, each with its formula.

The model is one set of documented constants applied to every case (docs/planner.md lists them and compares the
result with published measurements); nothing here is fitted to a particular figure. Memory is split into what
stays for the whole step (weights, adapters, gradients, optimizer states, checkpointed activations) and what
comes and goes; the transient part counts its largest phase only: the logits at the end of the forward pass, or
one decoder layer recomputed and differentiated during the backward pass. Units: GiB = 2^30 bytes.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from dpo_dist.config.schema import ConfigError
from dpo_dist.planner.arch import Arch, fmt_count
from dpo_dist.planner.constants import (
    GIB, METHODS, STAGES, PAIRED_STAGES, REFERENCE_STAGES, PRECISIONS, LAYOUTS, NF4_BYTES, QUANT_STATE_BYTES,
    CUDA_CONTEXT_GIB, NCCL_GIB,
    ALLOCATOR_OVERHEAD, FSDP_UNITS_IN_FLIGHT, ZERO3_MAX_LIVE_ELEMENTS, LOGIT_FP32_COPIES, OPTIMIZERS)


@dataclass(frozen=True)
class PlanInput:
    arch: Arch
    method: str = "qlora"
    stage: str = "sft"
    gpus: int = 1
    gpu_mem_gib: float = 80.0
    seq: int = 2048
    micro_batch: int = 1
    lora_r: int = 8
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] | None = None
    optim: str = "adamw_torch"
    precision: str = "bf16"
    gradient_checkpointing: bool = True
    layout: str = "single"
    # peft's prepare_model_for_kbit_training (not used by dpo-dist) upcasts every non-quantized weight to fp32, so
    # the residual stream runs in fp32 too; planning a run that calls it needs this.
    upcast_unquantized: bool = False
    # peft's get_peft_model(autocast_adapter_dtype=True), its default, upcasts bf16/fp16 adapter weights to fp32;
    # dpo-dist casts them back to the base's dtype. Planning a run that keeps peft's default needs this.
    fp32_adapters: bool = False
    # Micro-batches per optimizer step. Only FSDP's memory depends on it: see _trainable.
    grad_accum: int = 1
    # Sequence parallelism (a profile's sequence_parallel; DeepSpeed Ulysses under ZeRO-3): each GPU holds 1/sp of
    # every sequence's positions, so activations and logits are planned for tokens / sp.
    sp: int = 1

    def check(self) -> None:
        for flag, value, options in (("--method", self.method, METHODS), ("--stage", self.stage, STAGES),
                                     ("--precision", self.precision, PRECISIONS), ("--layout", self.layout, LAYOUTS),
                                     ("--optim (or the recipe's train.optim)", self.optim, OPTIMIZERS)):
            if value not in options:
                raise ConfigError(f"{flag}: {value!r} is not one of {', '.join(options)}")
        for flag, value in (("--gpus", self.gpus), ("--seq", self.seq), ("--micro-batch", self.micro_batch),
                            ("--lora-r", self.lora_r), ("--grad-accum", self.grad_accum), ("--sp", self.sp)):
            if value < 1:
                raise ConfigError(f"{flag}: must be a positive integer, got {value}")
        if self.gpu_mem_gib <= 0:
            raise ConfigError(f"--gpu-mem: must be positive (GiB per GPU), got {self.gpu_mem_gib}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"--lora-dropout: must be in [0, 1), got {self.lora_dropout}")
        if self.layout == "single" and self.gpus != 1:
            raise ConfigError(f"--layout single: uses one GPU, but --gpus is {self.gpus}")
        if self.layout == "ddp" and self.gpus < 2:
            raise ConfigError("--layout ddp: needs --gpus 2 or more (one GPU is --layout single)")
        refusal = refusal_of(self)
        if refusal:
            raise ConfigError(f"--layout {self.layout}: {refusal}")

    @property
    def sharded(self) -> bool:
        return self.layout.startswith(("fsdp", "zero3"))

    @property
    def offload(self) -> bool:
        return self.layout.endswith("-offload")

    @property
    def shards(self) -> int:
        return self.gpus if self.sharded else 1

    @property
    def tokens(self) -> int:
        """Tokens in one micro-batch on one GPU: DPO, ORPO and CPO run chosen and rejected, twice the sequences
        (KTO's KL sequences go through a forward without gradients, whose activations are not kept)."""
        return self.micro_batch * self.seq * (2 if self.stage in PAIRED_STAGES else 1)

    @property
    def local_tokens(self) -> int:
        """The part of `tokens` one GPU holds: all of them, or 1/sp of each sequence (padded to a multiple of sp)
        under sequence parallelism."""
        return self.tokens // self.seq * -(-self.seq // self.sp)


def refusal_of(inp: PlanInput) -> str | None:
    """Combinations dpo-dist itself refuses (docs/profiles.md), so the planner never recommends them."""
    if inp.sp > 1 and not inp.layout.startswith("zero3"):
        return (f"sequence parallelism runs under DeepSpeed ZeRO-3 only (Ulysses); --sp {inp.sp} needs --layout zero3 "
                "or zero3-offload")
    if inp.sp > 1 and inp.gpus % inp.sp:
        return f"--sp {inp.sp} must divide --gpus {inp.gpus}"
    if inp.precision == "fp16" and inp.layout.startswith("fsdp") and inp.method != "full":
        return ("dpo-dist refuses fp16 LoRA/QLoRA under FSDP (fp32 adapters beside an fp16 base in one FSDP unit); "
                "use bf16, a zero3 layout, or one GPU")
    return None


@dataclass(frozen=True)
class Item:
    key: str
    label: str
    bytes: float
    formula: str
    where: str = "gpu"  # gpu | cpu (offloaded; not in the per-GPU total)

    @property
    def gib(self) -> float:
        return self.bytes / GIB


@dataclass
class Plan:
    inp: PlanInput
    items: list[Item] = field(default_factory=list)

    @property
    def per_gpu_gib(self) -> float:
        return sum(i.bytes for i in self.items if i.where == "gpu") / GIB

    @property
    def cpu_gib(self) -> float:
        return sum(i.bytes for i in self.items if i.where == "cpu") / GIB

    @property
    def fits(self) -> bool:
        return self.per_gpu_gib <= self.inp.gpu_mem_gib

    def gib(self, key: str) -> float:
        return sum(i.bytes for i in self.items if i.key == key) / GIB


@dataclass(frozen=True)
class TrainBytes:
    """Bytes per trainable parameter: weight, gradient, fp32 master copy, and one optimizer state's dtype."""
    param: int
    grad: int
    master: int
    state: int


def half_precision(inp: PlanInput) -> bool:
    return inp.precision in ("bf16", "fp16")


def train_bytes(inp: PlanInput) -> TrainBytes:
    half = half_precision(inp)
    if inp.layout.startswith("zero3") and half:
        return TrainBytes(2, 2, 4, 4)  # DeepSpeed: 16-bit weights and gradients, fp32 master and optimizer states
    if inp.method == "full":
        # fp32 master weights on every profile (dpo_dist.models.loading.model_dtype): unsharded runs load fp32 weights and
        # autocast computes in 16-bit; FSDP2 keeps the fp32 weights it is given and computes in 16-bit.
        return TrainBytes(4, 4, 0, 4)
    # Adapters: one dtype with the base in bf16 (dpo-dist casts them); fp32 under fp16 (the scaler needs fp32), under
    # FSDP with a 16-bit base (accelerate upcasts trainable weights) and where peft's default fp32 adapters are kept.
    fsdp_upcast = inp.layout.startswith("fsdp") and inp.method == "lora"
    if inp.precision == "bf16" and not inp.upcast_unquantized and not fsdp_upcast and not inp.fp32_adapters:
        return TrainBytes(2, 2, 0, 2)
    return TrainBytes(4, 4, 0, 4)


def _share(inp: PlanInput) -> str:
    return f" / {inp.shards} gpus" if inp.shards > 1 else ""


def plan(inp: PlanInput) -> Plan:
    """Every item of the per-GPU memory for `inp`; offloaded items are listed with where='cpu'."""
    inp.check()
    p = Plan(inp)
    _weights(inp, p)
    _trainable(inp, p)
    _reference(inp, p)
    _sharding_buffers(inp, p)
    _activations(inp, p)
    _overhead(inp, p)
    return p


def _add(p: Plan, key: str, label: str, nbytes: float, formula: str, where: str = "gpu") -> None:
    p.items.append(Item(key, label, nbytes, formula, where))


def _weights(inp: PlanInput, p: Plan) -> None:
    """Frozen base weights (LoRA/QLoRA). Full fine-tuning's weights are trainable: see _trainable."""
    if inp.method == "full":
        return
    c, a = inp.arch.counts(), PRECISIONS[inp.precision]
    where = "cpu" if inp.offload else "gpu"
    share = _share(inp)
    other = c["embedding"] + c["lm_head"] + c["norms"] + c["biases"] + c["router"]
    if inp.method == "qlora":
        n = c["linear"]
        _add(p, "weights_nf4", "weights: 4-bit NF4", n * NF4_BYTES / inp.shards,
             f"{fmt_count(n)} linear params × 0.5 B{share}", where)
        _add(p, "weights_quant_state", "weights: quantization constants", n * QUANT_STATE_BYTES,
             f"{fmt_count(n)} × (1/64 + 4/16384) B (double quant), on every GPU")
        other += c["experts"]  # fused MoE experts are not nn.Linear: bitsandbytes leaves them 16-bit
        b = 4 if inp.upcast_unquantized else a
        what = "embeddings, lm_head, norms, biases" + (", MoE experts" if c["experts"] else "")
        _add(p, "weights_16bit" if b == 2 else "weights_32bit", f"weights: {8 * b}-bit ({what})",
             other * b / inp.shards, f"{fmt_count(other)} × {b} B{share}"
             + (" (prepare_model_for_kbit_training upcast)" if inp.upcast_unquantized else ""), where)
    else:
        n = inp.arch.total_params()
        _add(p, f"weights_{8 * a}bit", f"weights: {8 * a}-bit (frozen base)", n * a / inp.shards,
             f"{fmt_count(n)} × {a} B{share}", where)


def trainable_count(inp: PlanInput) -> int:
    if inp.method == "full":
        return inp.arch.total_params()
    return inp.arch.lora_params(inp.lora_r, list(inp.target_modules) if inp.target_modules else None)


def _trainable(inp: PlanInput, p: Plan) -> None:
    tb = train_bytes(inp)
    states, state_b = OPTIMIZERS[inp.optim]
    state_b = tb.state if state_b is None else state_b
    n, what = trainable_count(inp), "full" if inp.method == "full" else "LoRA"
    where = "cpu" if inp.offload else "gpu"
    share = _share(inp)
    if what == "LoRA":
        _add(p, "lora_params", f"LoRA parameters (r {inp.lora_r})", n * tb.param / inp.shards,
             f"{fmt_count(n)} × {tb.param} B{share}", where)
    else:
        _add(p, "weights_trainable", f"weights: {8 * tb.param}-bit (trained)", n * tb.param / inp.shards,
             f"{fmt_count(n)} × {tb.param} B{share}", where)
    _add(p, "grads", f"{what} gradients", n * tb.grad / inp.shards, f"{fmt_count(n)} × {tb.grad} B{share}", where)
    if tb.master:
        _add(p, "master", "fp32 master weights (mixed precision)", n * tb.master / inp.shards,
             f"{fmt_count(n)} × 4 B{share}", where)
    _add(p, "optimizer", f"optimizer states ({inp.optim})", n * states * state_b / inp.shards,
         f"{fmt_count(n)} × {states} states × {state_b} B{share}", where)
    if inp.layout.startswith("fsdp") and inp.grad_accum > 1:
        # The Trainer runs every micro-batch but the last under accelerate's no_sync, which for FSDP (torch's
        # FullyShardedDataParallel.no_sync; FSDP2's set_requires_gradient_sync(False)) accumulates the full,
        # unsharded gradients on each GPU until the syncing micro-batch, and with CPU offload keeps them on the GPU
        # ("will only be offloaded right after the eventual sync"). They are alive through that last backward.
        _add(p, "nosync_grads", "unsharded gradients (no_sync accumulation)", n * tb.grad,
             f"{fmt_count(n)} × {tb.grad} B, on every GPU: FSDP no_sync keeps full gradients between micro-batches")
    if inp.layout == "ddp":
        _add(p, "ddp_buckets", "DDP gradient buckets", n * tb.grad,
             f"{fmt_count(n)} × {tb.grad} B: DDP reduces through flat buckets as large as all gradients")
    if inp.method == "full" and half_precision(inp) and not inp.sharded:
        _add(p, "autocast_cache", f"{inp.precision} weight copies (autocast cache)", n * 2,
             f"{fmt_count(n)} × 2 B: autocast keeps a {inp.precision} copy of each fp32 trainable weight during the "
             "step")


def _reference(inp: PlanInput, p: Plan) -> None:
    if inp.stage not in REFERENCE_STAGES:
        return
    what = inp.stage.upper()
    if inp.method != "full":
        _add(p, "reference", f"{what} reference model", 0, "0: the policy's own base with the adapter disabled")
        return
    # trl's DPOTrainer (and KTOTrainer, with a copy of the policy) loads the reference in the policy's dtype (fp32
    # for full fine-tuning, whatever the precision: model_dtype), and shards or offloads it with the policy; only
    # ZeRO-3's zero.Init stores it in 16-bit.
    b = 2 if half_precision(inp) and inp.layout.startswith("zero3") else 4
    n = inp.arch.total_params()
    _add(p, "reference", f"{what} reference model (frozen full copy)", n * b / inp.shards,
         f"{fmt_count(n)} × {b} B{_share(inp)}", "cpu" if inp.offload else "gpu")


def _sharding_buffers(inp: PlanInput, p: Plan) -> None:
    """Parameters gathered for compute under FSDP/ZeRO-3, and their gradient buffers."""
    if not inp.sharded:
        return
    arch, c, a = inp.arch, inp.arch.counts(), PRECISIONS[inp.precision]
    L, h = arch.num_layers, arch.hidden_size
    quantized = c["linear"] if inp.method == "qlora" else 0
    other = arch.total_params() - quantized
    embed_b = 4 if inp.upcast_unquantized else a
    if inp.layout.startswith("fsdp"):
        unit = quantized / L * NF4_BYTES + (other - c["embedding"] - c["lm_head"] - h) / L * a
        _add(p, "gathered_layers", "gathered decoder layers (FSDP)", FSDP_UNITS_IN_FLIGHT * unit,
             f"{FSDP_UNITS_IN_FLIGHT} layers in flight × {unit / GIB:.3f} GiB (one layer at compute storage)")
        root = c["embedding"] + c["lm_head"]
        _add(p, "gathered_root", "gathered embeddings + lm_head (FSDP root)", root * embed_b,
             f"{fmt_count(root)} × {embed_b} B: the root unit stays gathered through forward and backward")
        if inp.offload:
            staged = (FSDP_UNITS_IN_FLIGHT * unit + root * embed_b) / inp.gpus
            _add(p, "offload_staging", "offloaded shards copied in for the all-gather", staged,
                 f"({FSDP_UNITS_IN_FLIGHT} layers + root) / {inp.gpus} gpus: each all-gather reads a GPU copy "
                 "of the local CPU shard")
        if inp.method == "full":
            n = arch.layer_params() + root
            _add(p, "unsharded_grads", "unsharded gradients before reduce-scatter", n * a,
                 f"({fmt_count(arch.layer_params())} layer + {fmt_count(root)} root) × {a} B")
    else:
        elements = quantized * NF4_BYTES / a + other  # 4-bit payload packed into compute-dtype elements
        live = min(ZERO3_MAX_LIVE_ELEMENTS, elements)
        _add(p, "gathered_live", "gathered parameters (ZeRO-3 live)", live * a,
             f"min(stage3_max_live_parameters 1e9, {fmt_count(elements)} elements) × {a} B")
        if inp.offload:
            _add(p, "offload_staging", "offloaded partitions copied in for the all-gather", live * a / inp.gpus,
                 f"live parameters / {inp.gpus} gpus: each all-gather reads a GPU copy of the local CPU partition")
        bucket = min(h * h, trainable_count(inp))
        _add(p, "reduce_bucket", "gradient reduce bucket (ZeRO-3)", bucket * a,
             f"min(reduce_bucket_size hidden² = {fmt_count(h * h)}, trainable) × {a} B")


def stream_bytes(inp: PlanInput) -> int:
    """Bytes of one residual-stream value. fp32 where the embeddings and norms hold fp32 weights, which autocast
    leaves in fp32 (it casts only the matmuls' inputs): full fine-tuning on one GPU or under DDP, whose weights are the
    fp32 masters, and --upcast-unquantized. Otherwise the compute dtype."""
    if inp.upcast_unquantized or (inp.method == "full" and not inp.sharded):
        return 4
    return PRECISIONS[inp.precision]


def layer_bytes_per_token(inp: PlanInput) -> tuple[float, str]:
    """Bytes one decoder layer saves for its backward pass, per token, with the formula."""
    arch, a = inp.arch, PRECISIONS[inp.precision]
    ah = stream_bytes(inp)
    h, i = arch.hidden_size, arch.intermediate_size
    norms = 2 * (4 + ah) * h  # each RMSNorm: its input upcast to fp32, and its output that the next matmul reads
    attn = a * (2 * arch.q_dim + 2 * arch.kv_dim)  # q, k, v and the attention output (flash/sdpa: no s² scores)
    if arch.num_experts:
        k = arch.experts_per_token
        mlp = k * (4 * i + 2 * h) * a  # per routed expert: gate, up, act, product, and the dispatched input/output
        mlp_text = f"{k} experts × (4×{i} + 2×{h}) × {a}"
    else:
        mlp = 4 * i * a  # gate out, act(gate), up out, product
        mlp_text = f"4×{i} × {a}"
    text = f"2×(4+{ah})×{h} norms + {a}×(2×{arch.q_dim} + 2×{arch.kv_dim}) attention + {mlp_text} MLP"
    dropout = 0.0
    if inp.method != "full" and inp.lora_dropout > 0:
        # peft applies each adapter's dropout to its own copy of the input (plus a 1-byte mask), which lora_A keeps.
        reads_stream = {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "gate"}
        for name in arch.lora_targets(list(inp.target_modules) if inp.target_modules else None):
            if name == "experts":
                dropout += arch.experts_per_token * (a + 1) * (h + i)
            elif name in reads_stream:
                dropout += (ah + 1) * h
            else:
                dropout += (a + 1) * arch.linears()[name][0]
        text += f" + {dropout:.0f} LoRA-dropout copies"
    return norms + attn + mlp + dropout, text


def sp_traffic_bytes(inp: PlanInput) -> float:
    """Bytes one GPU sends per decoder layer in one forward under Ulysses: q, k, v are swapped from positions to
    heads before attention and the output back after it, each all-to-all keeping 1/sp of its part local. The backward
    pass sends as much again."""
    arch, a = inp.arch, PRECISIONS[inp.precision]
    return inp.local_tokens * (2 * arch.q_dim + 2 * arch.kv_dim) * a * (inp.sp - 1) / inp.sp


def _activations(inp: PlanInput, p: Plan) -> None:
    arch, a, T = inp.arch, PRECISIONS[inp.precision], inp.local_tokens
    ah = stream_bytes(inp)
    h, i, L, V = arch.hidden_size, arch.intermediate_size, arch.num_layers, arch.vocab_size
    seqs = f"{inp.micro_batch} × {inp.seq}" + (" × 2 (chosen + rejected)" if inp.stage in PAIRED_STAGES else "")
    if inp.sp > 1:
        seqs += f" / sp {inp.sp}"
    per_token, per_token_text = layer_bytes_per_token(inp)
    i_eff = i * (arch.experts_per_token or 1)
    backward = T * (3 * i_eff + 2 * h) * a  # gradients alive while one layer differentiates
    dequant = max(x * y for x, y in arch.linears().values()) * a if inp.method == "qlora" else 0
    if inp.gradient_checkpointing:
        _add(p, "act_checkpoints", "activations: layer inputs kept (checkpointing)", L * T * h * ah,
             f"{L} layers × {T} tokens ({seqs}) × {h} × {ah} B")
        layer = T * per_token + backward + dequant
        layer_text = f"one layer recomputed: {T} × ({per_token_text}) B + backward grads"
    else:
        _add(p, "act_layers", "activations: every layer (no checkpointing)", L * T * per_token,
             f"{L} layers × {T} tokens ({seqs}) × ({per_token_text}) B")
        layer = backward + dequant
        layer_text = f"backward grads {T} × (3×{i_eff} + 2×{h}) × {a} B"
    if dequant:
        layer_text += " + one weight dequantized to 16-bit"
    lm_copy = V * h * a if inp.upcast_unquantized and a == 2 else 0  # autocast's half copy of the fp32 lm_head
    logits = T * V * (a + 4 * LOGIT_FP32_COPIES) + T * h * (4 + ah) + lm_copy
    logits_text = f"{T} × {V} vocab × ({a} + 4 + 4) B (fp32 upcast, log-softmax)"
    if lm_copy:
        logits_text += f" + {fmt_count(V * h)} × 2 B lm_head half copy"
    if logits >= layer:
        _add(p, "logits", "logits (largest transient: end of forward)", logits, logits_text)
        _add(p, "act_layer", "one layer's backward (not at the same time)", 0, f"{layer / GIB:.2f} GiB: {layer_text}")
    else:
        _add(p, "act_layer", "activations: one layer's backward (largest transient)", layer, layer_text)
        _add(p, "logits", "logits (not at the same time)", 0, f"{logits / GIB:.2f} GiB: {logits_text}")


def _overhead(inp: PlanInput, p: Plan) -> None:
    allocated = sum(i.bytes for i in p.items if i.where == "gpu")
    _add(p, "allocator", "allocator overhead", allocated * ALLOCATOR_OVERHEAD,
         f"{ALLOCATOR_OVERHEAD:.0%} of the {allocated / GIB:.2f} GiB allocated above")
    context = CUDA_CONTEXT_GIB + (NCCL_GIB if inp.gpus > 1 else 0)
    _add(p, "cuda_context", "CUDA context" + (" + NCCL buffers" if inp.gpus > 1 else ""), context * GIB,
         f"{CUDA_CONTEXT_GIB} GiB" + (f" + {NCCL_GIB} GiB" if inp.gpus > 1 else ""))


def largest_micro_batch(inp: PlanInput, cap: int = 256) -> int:
    """The largest micro-batch (up to `cap`) whose plan fits in gpu_mem_gib; 0 when even 1 does not fit."""
    if not plan(replace(inp, micro_batch=1)).fits:
        return 0
    lo, hi = 1, cap
    while lo < hi:  # memory grows with the micro-batch, so bisect
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if plan(replace(inp, micro_batch=mid)).fits else (lo, mid - 1)
    return lo


def longest_seq(inp: PlanInput, cap: int = 1 << 22) -> int:
    """The longest sequence (a multiple of 256 tokens, up to `cap`) whose plan fits in gpu_mem_gib at the input's
    micro-batch and layout; 0 when 256 does not fit."""
    step = 256
    if not plan(replace(inp, seq=step)).fits:
        return 0
    lo, hi = 1, cap // step
    while lo < hi:  # memory grows with the sequence, so bisect
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if plan(replace(inp, seq=mid * step)).fits else (lo, mid - 1)
    return lo * step


def candidate_layouts(inp: PlanInput) -> list[str]:
    """Layouts in order of preference: replicated is fastest, sharding before offload, FSDP before ZeRO-3 (the
    choice docs/profiles.md makes), leaving out what dpo-dist refuses."""
    order = ["single", "fsdp-offload", "zero3-offload"] if inp.gpus == 1 else \
        ["ddp", "fsdp", "zero3", "fsdp-offload", "zero3-offload"]
    if inp.sp > 1:
        order = ["zero3", "zero3-offload"]
    return [lay for lay in order if refusal_of(replace(inp, layout=lay)) is None]
