"""`dpo-dist bench`: peak memory of the logits → per-token log-probs path, one path per fresh process.

`python -m dpo_dist.bench.logits PATH OUT.json --vocab V --hidden H --seq S --micro-batch M [--seed S]`

The workload is what a DPO step asks of the LM head: hidden states for chosen + rejected (N = 2 × micro-batch ×
sequence tokens), a frozen head weight [V, H] (LoRA leaves it frozen), labels with the prompt part masked (-100),
then the summed completion log-probs and their backward to the hidden states.

Paths (each computes the fields DPOTrainer's policy head computes: log-probs, entropy, mean logit, top-1):
- `trl`: TRL 1.16's DPOTrainer head. `_compute_loss` calls `model(..., labels=labels, fused_lm_head=True)`; the forward
  that `trl.trainer.utils.add_fused_lm_head` installs projects through the head with
  `trl.kernels.ChunkedLogProbFunction` in [4096 tokens × 32768 vocab] tiles with an online logsumexp, and recomputes
  the tiles in the backward. Off CUDA/XPU it scores every position (labels clamped to 0, then masked), which is what
  is run here, with the same arguments.
- `dpo_dist`: what dpo-dist's DPO stage runs by default (`train.compact_logps`):
  `dpo_dist.training.dpo.logps.completion_logps`, the same kernel on the completion positions only, on every device, in
  vocabulary tiles of `train.logps_vocab_chunk` (8,192).
- `materialized`: the textbook path (full [N, V] fp32 logits, log_softmax, gather), what TRL did before the fused
  head and what the issue's -60% figures are quoted against. Reported for context only.

Peak memory is measured without tracemalloc (which does not see torch's allocations): on Linux the process's RSS
high-water mark (VmHWM) is reset to the current RSS through /proc/self/clear_refs just before the measured call, and
the peak is VmHWM afterwards minus VmRSS before. The inputs are allocated in place (no temporaries) and a small
warm-up call runs first, so one-time allocations (thread pools, kernels' workspaces) are not counted. Where
clear_refs is refused, ru_maxrss is used instead (recorded in `method`). On CUDA, torch.cuda.max_memory_allocated
after reset_peak_memory_stats.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

TRL_CHUNK_SIZE = 32768  # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE, the vocabulary width of a tile
POLICY_OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")  # what DPOTrainer asks of the policy's head


def _trl_logps(hidden, weight, labels):
    """Exactly the CPU branch of the forward installed by trl.trainer.utils.add_fused_lm_head (trl 1.16)."""
    from trl.kernels import ChunkedLogProbFunction

    try:
        # compat: trl-bench-chunk-width
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE as chunk
    except ImportError:
        chunk = TRL_CHUNK_SIZE
    hidden, labels = hidden[:, :-1], labels[:, 1:]
    mask = labels != -100
    per_token = ChunkedLogProbFunction.apply(
        hidden.reshape(-1, hidden.size(-1)), weight, None, labels.clamp(min=0).reshape(-1), 1.0, chunk, None, 1.0,
        POLICY_OUTPUTS)
    return per_token[0].view(mask.shape).masked_fill(~mask, 0)


def _dpo_dist_logps(hidden, weight, labels):
    from dpo_dist.training.dpo.logps import DEFAULT_VOCAB_CHUNK, completion_logps

    return completion_logps(hidden[:, :-1], weight, None, labels[:, 1:], DEFAULT_VOCAB_CHUNK, POLICY_OUTPUTS)[0]


def _materialized_logps(hidden, weight, labels):
    hidden, labels = hidden[:, :-1], labels[:, 1:]
    mask = labels != -100
    logits = hidden @ weight.t()
    logps = logits.float().log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return logps.masked_fill(~mask, 0)


PATHS = {
    "trl": _trl_logps,
    "dpo_dist": _dpo_dist_logps,
    "materialized": _materialized_logps,
}
IMPLEMENTATION = {
    "trl": "trl.kernels.ChunkedLogProbFunction via add_fused_lm_head (TRL 1.16 DPOTrainer)",
    "dpo_dist": "dpo_dist.training.dpo.logps.completion_logps: the same kernel on completion tokens only, 8192-wide tiles",
    "materialized": "full [N, V] logits + log_softmax + gather",
}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> str:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS to the current RSS (Linux >= 4.0)
        return "VmHWM after /proc/self/clear_refs reset, minus VmRSS before"
    except OSError:
        return "ru_maxrss after, minus VmRSS before (clear_refs refused: a lower bound)"


def _inputs(vocab: int, hidden_size: int, seq: int, rows: int, seed: int, device):
    import torch

    gen = torch.Generator().manual_seed(seed)
    weight = torch.empty(vocab, hidden_size).normal_(0, 0.02, generator=gen).to(device)
    hidden = torch.empty(rows, seq, hidden_size).normal_(0, 1, generator=gen).to(device).requires_grad_(True)
    labels = torch.randint(0, vocab, (rows, seq), generator=gen).to(device)
    labels[:, : seq // 3] = -100  # the prompt: no label, as in DPO's completion mask
    return hidden, weight, labels


def measure(path: str, vocab: int, hidden_size: int, seq: int, micro_batch: int, seed: int = 0) -> dict:
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    fn = PATHS[path]
    rows = 2 * micro_batch  # chosen + rejected
    hidden, weight, labels = _inputs(vocab, hidden_size, seq, rows, seed, device)
    # Warm-up on two rows: first-call allocations are not the path's memory.
    small = hidden[:2].detach().requires_grad_(True)
    fn(small, weight, labels[:2]).sum().backward()
    del small
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    rss_before = _status_kib("VmRSS")
    method = _reset_peak()
    started = time.perf_counter()
    logps = fn(hidden, weight, labels)
    logps.sum().backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    peak = (_status_kib("VmHWM") if method.startswith("VmHWM")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    out = {
        "path": path,
        "implementation": IMPLEMENTATION[path],
        "vocab": vocab,
        "hidden": hidden_size,
        "seq": seq,
        "micro_batch": micro_batch,
        "tokens": rows * seq,
        "device": device.type,
        "peak_mib": (peak - rss_before) / 1024,
        "method": method,
        "seconds": elapsed,
        "logps_sum": float(logps.detach().sum()),
        "grad_norm": float(hidden.grad.norm()),
    }
    if device.type == "cuda":
        out["peak_mib"] = (torch.cuda.max_memory_allocated() - base_cuda) / 2**20
        out["method"] = "torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus the inputs"
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dpo_dist.bench.logits")
    parser.add_argument("path", choices=sorted(PATHS))
    parser.add_argument("out")
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--hidden", type=int, default=896)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    result = measure(args.path, args.vocab, args.hidden, args.seq, args.micro_batch, args.seed)
    Path(args.out).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
