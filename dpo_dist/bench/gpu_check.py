"""The first-GPU-run check (`scripts/gpu-check.sh`): one function per step, each writing one JSON result.

    python -m dpo_dist.bench.gpu_check STEP [--device cuda|cpu] --out FILE      # one step
    python -m dpo_dist.bench.gpu_check plan [--shell] --out DIR                  # the plan (and its dry-run checks)
    python -m dpo_dist.bench.gpu_check report --out DIR                          # report.json + report.md

The shell script runs the plan's steps in order, each under its own `timeout`, and then the report. A result is
{name, status: pass|fail|skip, seconds, summary, details, logs}. `--device cpu` runs a step on tiny sizes on the CPU
(gloo for the 1-rank process groups), so the harness itself is tested where no GPU is.

Only the standard library is imported at module level: `STEP --help` must answer fast, and the memory hook below is
imported by every Python process of a training run under the check.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

from dpo_dist.config.resources import PACKAGE_PARENT, RECIPES, find
from dpo_dist.distributed.ranks import is_main_process, local_rank

DEFAULT_RECIPE = RECIPES / "demo.yaml"
BUDGET_S = 540  # the whole check: under 9 minutes of step timeouts
MEMLOG_ENV = "DPO_DIST_GPU_CHECK_MEMLOG"
# Relative tolerance of the DPO loss series between two runs that should train alike: `dpo-dist parity`'s series
# tolerance in bf16/fp16 (dpo_dist.cli: 1e-2 for series in half precision).
LOSS_RTOL = 1e-2
QWEN25_05B = {"hidden": 896, "vocab": 151936}  # Qwen/Qwen2.5-0.5B config.json: hidden_size, vocab_size
CHAIN_PROFILE = "1gpu-bf16"
V100_PROFILE = "v100-qlora"
SHARDED_PROFILES = {"fsdp2-qlora": "8xh100-fsdp-qlora", "zero3-qlora": "8xh100-zero3-qlora"}
TRAIN_STEPS = 4  # optimizer steps per training stage
GLOBAL_BATCH = 8


# ---- the plan -------------------------------------------------------------------------------------------------------
# (report name, subcommand, timeout in seconds, title). Timeouts cover a cold start of each process on a fresh machine.
STEPS = [
    ("doctor", "doctor", 30, "dpo-dist doctor --json"),
    ("bnb-fsdp2", "bnb-fsdp2", 35, "paged_adamw_32bit stepping FSDP2 parameters (1-rank NCCL group)"),
    ("compact-head", "compact-head", 60, "compact LM head vs float64 log_softmax, bf16 and fp16, fwd + bwd"),
    ("nf4-fsdp2", "nf4-fsdp2", 40, "NF4 (storage bf16) packed bytes and logits before/after fully_shard"),
    ("qlora-chain", "chain", 120, f"QLoRA SFT→DPO, {CHAIN_PROFILE}, padding_free true vs false"),
    ("qlora-chain-v100", "chain", 60, f"the same SFT→DPO under {V100_PROFILE} (fp16, GradScaler, paged optimizer)"),
    ("fsdp2-qlora", "sharded", 60, "accelerate launch, 1-process FSDP2 QLoRA DPO, 4 steps, save"),
    ("zero3-qlora", "sharded", 60, "deepspeed --num_gpus 1, ZeRO-3 QLoRA DPO, 4 steps, save"),
    ("bench", "bench", 70, "dpo-dist bench vs TRL, logits at the Qwen2.5-0.5B head shape"),
]
SUBCOMMANDS = sorted({s[1] for s in STEPS} | {"plan", "report"})


def step_command(name: str, py: str, out: Path, recipe: Path) -> list[str]:
    """The command line the shell script runs for step `name` (under `timeout`)."""
    bin_dir = Path(py).parent
    sub, timeout = next((s[1], s[2]) for s in STEPS if s[0] == name)
    result = ["--out", str(out / "steps" / f"{name}.json")]
    work = ["--work", str(out / "work")]
    budget = ["--budget", str(timeout - 5)]  # the step's own subprocess timeouts end before the shell's
    module = ["-m", "dpo_dist.bench.gpu_check", sub, "--device", "cuda"]
    if name in ("bnb-fsdp2", "nf4-fsdp2"):  # a real 1-rank process group, as a launcher starts it
        port = {"bnb-fsdp2": 29531, "nf4-fsdp2": 29532}[name]
        return [str(bin_dir / "torchrun"), "--nproc_per_node=1", "--nnodes=1", "--master_addr=127.0.0.1",
                f"--master_port={port}", *module, *result, *(work if name == "nf4-fsdp2" else [])]
    cmd = [py, *module, *result]
    if name == "doctor":
        return cmd + ["--bin", str(bin_dir)] + budget
    if name == "qlora-chain":
        return cmd + work + budget + ["--bin", str(bin_dir), "--recipe", str(recipe), "--profile", CHAIN_PROFILE,
                                      "--padding-free", "true,false"]
    if name == "qlora-chain-v100":
        return cmd + work + budget + ["--bin", str(bin_dir), "--recipe", str(recipe), "--profile", V100_PROFILE,
                                      "--padding-free", "false", "--compare", str(out / "steps" / "qlora-chain.json")]
    if name in SHARDED_PROFILES:
        return cmd + work + budget + ["--bin", str(bin_dir), "--recipe", str(recipe),
                                      "--profile", SHARDED_PROFILES[name]]
    if name == "bench":
        return cmd + work + budget + ["--bin", str(bin_dir)]
    return cmd  # compact-head


def launches() -> list[tuple[str, str, list[str]]]:
    """(step, profile, overrides) of every `dpo-dist launch` the plan makes, for the dry run's preflight."""
    chain = [f"stages.sft.train.padding_free={v}" for v in ("true", "false")]
    out = [("qlora-chain", CHAIN_PROFILE, [o, o.replace("sft", "dpo")]) for o in chain]
    out.append(("qlora-chain-v100", V100_PROFILE, ["stages.sft.train.padding_free=false",
                                                    "stages.dpo.train.padding_free=false"]))
    out += [(name, profile, []) for name, profile in SHARDED_PROFILES.items()]
    return out


# ---- shared helpers -------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _device(args) -> str:
    return args.device


def _profile_precision(profile: str) -> str | None:
    from dpo_dist.config.profiles import load_profile

    return load_profile(profile).precision


def _skip_without_bf16(profile: str) -> dict | None:
    from dpo_dist.distributed.devices import bf16_native

    if _profile_precision(profile) == "bf16" and not bf16_native():
        return {"status": "skip", "summary": f"{profile} trains in bf16, which this GPU does not compute natively "
                                             "(dpo-dist refuses it there)", "details": {"profile": profile}}
    return None


def _process_group(device: str):
    """A 1-rank process group: the one torchrun set up (RANK/WORLD_SIZE), else one started here on a free port.
    NCCL on cuda, gloo on cpu. Returns True when this call started it."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    if "WORLD_SIZE" not in os.environ:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0")
    if device == "cuda":
        torch.cuda.set_device(local_rank())
        dist.init_process_group("nccl", device_id=torch.device("cuda", torch.cuda.current_device()))
    else:
        dist.init_process_group("gloo")
    return True


def _close_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _run(cmd: list[str], log: Path, timeout: float, env: dict | None = None, cwd: Path | None = None) -> dict:
    """Run `cmd` in its own session with output to `log`; on timeout kill its whole process group (launchers start
    ranks). Returns {cmd, rc, seconds, timed_out, log}."""
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with open(log, "w") as fh:
        fh.write(f"$ {shlex.join(cmd)}\n")
        fh.flush()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                cwd=str(cwd) if cwd else None, start_new_session=True)
        timed_out = False
        try:
            rc = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                rc = proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                rc = proc.wait()
    return {"cmd": shlex.join(cmd), "rc": rc, "seconds": round(time.time() - started, 1), "timed_out": timed_out,
            "log": str(log)}


def _tail(path: str | Path, lines: int = 15) -> str:
    try:
        return "".join(Path(path).read_text(errors="replace").splitlines(keepends=True)[-lines:])
    except OSError:
        return ""


class Deadline:
    """The step's budget, shared out among its subprocesses: each gets an equal part of what is left."""

    def __init__(self, budget_s: float):
        self.end = time.time() + budget_s

    def share(self, runs_left: int) -> float:
        return max(1.0, (self.end - time.time()) / max(1, runs_left))


# ---- step 1: dpo-dist doctor ----------------------------------------------------------------------------------------


def step_doctor(args) -> dict:
    log = Path(args.out).with_suffix(".doctor.log")
    cmd = [str(Path(args.bin) / "dpo-dist"), "doctor", "--json"]
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.budget)
    except subprocess.TimeoutExpired:
        return {"status": "fail", "summary": f"dpo-dist doctor did not answer in {args.budget} s", "details": {}}
    except OSError as err:
        return {"status": "fail", "summary": f"cannot run {cmd[0]}: {err}", "details": {}}
    log.write_text(f"$ {shlex.join(cmd)}\n{proc.stdout}\n--- stderr ---\n{proc.stderr}")
    details = {"cmd": shlex.join(cmd), "rc": proc.returncode, "seconds": round(time.time() - started, 1)}
    try:
        details["doctor"] = json.loads(proc.stdout)
    except ValueError:
        details["stderr_tail"] = proc.stderr[-2000:]
        return {"status": "fail", "details": details, "logs": [str(log)],
                "summary": f"no JSON from `dpo-dist doctor --json` (exit {proc.returncode}): "
                           f"{(proc.stderr.strip().splitlines() or ['no output'])[-1][:200]}"}
    ok = proc.returncode == 0
    doctor = details["doctor"] if isinstance(details["doctor"], dict) else {}
    gpus = (doctor.get("cuda") or {}).get("gpus") or []
    missing = [m.get("missing", str(m)) if isinstance(m, dict) else str(m) for m in doctor.get("missing_here") or []]
    summary = f"exit {proc.returncode}; {len(gpus)} GPU(s)" + (f"; missing here: {'; '.join(missing)}" if missing else "")
    return {"status": "pass" if ok else "fail", "details": details, "logs": [str(log)], "summary": summary[:400]}


# ---- step 2: a bitsandbytes optimizer on FSDP2 parameters -----------------------------------------------------------

KNOWN_BNB_ERROR = ("optimizer_update_32bit", "sharding strategy")


def step_bnb_fsdp2(args) -> dict:
    """transformers' `paged_adamw_32bit` (bitsandbytes AdamW, optim_bits=32, is_paged=True) stepping the parameters of
    a model sharded with fully_shard in a 1-rank group. The harness failing is a fail; the optimizer failing is the
    answer "refusal still needed"."""
    import torch
    from torch.distributed.fsdp import fully_shard

    device = _device(args)
    started_group = _process_group(device)
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 16)).to(device)
        for layer in (model[0], model[2]):
            fully_shard(layer)
        fully_shard(model)
        optimizer_cls, kwargs, how = _paged_adamw_32bit(device)
        before = {n: p.detach().full_tensor().clone() for n, p in model.named_parameters()}
        loss = model(torch.randn(8, 64, device=device)).square().mean()
        loss.backward()
        details = {"optimizer": f"{optimizer_cls.__module__}.{optimizer_cls.__name__}", "kwargs": _jsonable(kwargs),
                   "resolved_by": how, "param_type": type(next(model.parameters())).__name__,
                   "torch": torch.__version__}
        try:
            import bitsandbytes

            details["bitsandbytes"] = bitsandbytes.__version__
        except ImportError:
            pass
        optimizer = optimizer_cls(model.parameters(), **kwargs)
        try:
            optimizer.step()
            if device == "cuda":
                torch.cuda.synchronize()
        except Exception as err:  # the answer to the question, not a harness failure
            message = f"{type(err).__name__}: {err}"
            known = all(k in str(err) for k in KNOWN_BNB_ERROR)
            details.update(error=message[:1000], known_error=known)
            return {"status": "pass", "verdict": "refusal still needed", "details": details,
                    "summary": "refusal still needed: the optimizer step raises "
                               + ("the known " if known else "a different ") + message.splitlines()[0][:160]}
        changed = {n: bool((p.detach().full_tensor() != before[n]).any()) for n, p in model.named_parameters()}
        finite = all(bool(torch.isfinite(p.detach().full_tensor()).all()) for p in model.parameters())
        details.update(params_changed=changed, finite=finite)
        if all(changed.values()) and finite:
            return {"status": "pass", "verdict": "refusal can be lifted", "details": details,
                    "summary": "refusal can be lifted: the step ran and updated every sharded parameter"}
        return {"status": "pass", "verdict": "refusal still needed", "details": details,
                "summary": "refusal still needed: the step ran but left parameters unchanged or non-finite"}
    finally:
        if started_group or "TORCHELASTIC_RUN_ID" in os.environ:
            _close_group()


def _paged_adamw_32bit(device: str):
    """What `optim: paged_adamw_32bit` gives a Trainer, asked of transformers itself."""
    try:
        from transformers import Trainer, TrainingArguments

        args = TrainingArguments(output_dir=os.devnull, optim="paged_adamw_32bit", use_cpu=device == "cpu",
                                 report_to=[], learning_rate=1e-3)
        cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
        return cls, kwargs, "transformers.Trainer.get_optimizer_cls_and_kwargs(optim='paged_adamw_32bit')"
    except Exception:
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW32bit, {"lr": 1e-3}, "bitsandbytes.optim.PagedAdamW32bit"


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


# ---- step 3: the compact head against float64 -----------------------------------------------------------------------

# GPU: a Qwen2.5-0.5B-wide hidden state, more tokens than trl's 4,096-token tile and a vocabulary of two full 8,192
# tiles plus a partial one (3,653 columns, also not a multiple of the kernel's 1,024 block). CPU: the same structure,
# tiny (tiles of 256: 3 full + 232).
HEAD_SIZES = {"cuda": {"batch": 2, "seq": 2600, "hidden": 896, "vocab": 2 * 8192 + 3653, "vocab_chunk": 8192},
              "cpu": {"batch": 2, "seq": 40, "hidden": 32, "vocab": 3 * 256 + 232, "vocab_chunk": 256}}
HEAD_DTYPES = {"cuda": ("bf16", "fp16"), "cpu": ("fp32", "bf16")}


def step_compact_head(args) -> dict:
    """completion_logps (trl's ChunkedLogProbFunction on completion tokens) against float64 log_softmax(hidden @ W.T).

    Tolerances, per dtype (u = its unit roundoff: 2^-8 bf16, 2^-11 fp16, 2^-24 fp32):
    - log-probs: the kernel rounds each logit to the compute dtype (|dz| <= u|z|) and works in fp32 after that, so
      |d log p| <= |dz_target| + max|dz| <= 2u·max|z| (+1e-4 for fp32 arithmetic);
    - log-probs and both gradients: at most twice the error of the plain path in the same dtype (logits = hidden @ W.T
      in the dtype, log_softmax in fp32, autograd), which rounds the same logits and the same logit gradients; plus
      8·eps32·max|ref| for fp32 accumulation order.
    The upstream gradient is N(0, 1) per token (a scaled loss), so fp16 logit gradients are not all underflow."""
    import torch

    from dpo_dist.distributed.devices import bf16_native
    from dpo_dist.training.dpo.logps import completion_logps

    device = _device(args)
    size = HEAD_SIZES[device]
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    eps32 = torch.finfo(torch.float32).eps
    gen = torch.Generator().manual_seed(0)
    B, T, H, V = size["batch"], size["seq"], size["hidden"], size["vocab"]
    hidden64 = torch.randn(B, T, H, generator=gen, dtype=torch.float64)
    weight64 = torch.randn(V, H, generator=gen, dtype=torch.float64) * (3.0 / H ** 0.5)  # logits of std ~3
    labels = torch.randint(0, V, (B, T), generator=gen)
    labels[torch.rand(B, T, generator=gen) < 0.15] = -100  # prompt/padding positions: never projected
    upstream = torch.randn(B, T, generator=gen, dtype=torch.float64)
    mask = labels != -100
    results, ok = {}, True
    skipped = []
    for name in HEAD_DTYPES[device]:
        if device == "cuda" and name == "bf16" and not bf16_native():
            skipped.append("bf16 (no native bf16 on this GPU)")
            continue
        dtype = dtypes[name]
        u = torch.finfo(dtype).eps / 2  # unit roundoff
        h0 = hidden64.to(dtype).to(device)  # the inputs all three paths see, so input rounding is not counted
        w0 = weight64.to(dtype).to(device)
        lab, g, m = labels.to(device), upstream.to(device), mask.to(device)

        def grads(fn, h_in, w_in):
            h, w = h_in.detach().clone().requires_grad_(), w_in.detach().clone().requires_grad_()
            out = fn(h, w)
            (out.double() * g * m).sum().backward()
            return out.detach().double(), h.grad.double(), w.grad.double()

        def compact(h, w):
            return completion_logps(h, w, None, lab, vocab_chunk=size["vocab_chunk"])[0]

        def gathered(logp):
            return logp.gather(-1, lab.clamp(min=0).unsqueeze(-1)).squeeze(-1) * m

        def reference(h, w):
            return gathered(torch.log_softmax(h @ w.T, dim=-1))

        def plain(h, w):
            return gathered(torch.log_softmax((h @ w.T).float(), dim=-1))

        ref = grads(reference, h0.double(), w0.double())
        got = grads(compact, h0, w0)
        base = grads(plain, h0, w0)
        max_logit = float((h0.double() @ w0.double().T)[m].abs().max())
        entry = {"max_abs_logit": max_logit, "unit_roundoff": u}
        for key, r, x, b in zip(("logps", "grad_hidden", "grad_weight"), ref, got, base):
            sel = (lambda t: t[m]) if key == "logps" else (lambda t: t)
            err = float((sel(x) - sel(r)).abs().max())
            base_err = float((sel(b) - sel(r)).abs().max())
            tol = 2 * base_err + 8 * eps32 * float(sel(r).abs().max())
            entry[key] = {"max_abs_err": err, "plain_path_max_abs_err": base_err, "tolerance": tol,
                          "ok": err <= tol and bool(torch.isfinite(x).all())}
            if key == "logps":
                bound = 2 * u * max_logit + 1e-4
                entry[key]["analytic_bound"] = bound
                entry[key]["ok"] = entry[key]["ok"] and err <= bound
            ok = ok and entry[key]["ok"]
        results[name] = entry
    tiles = -(-V // size["vocab_chunk"])
    last = V - (tiles - 1) * size["vocab_chunk"]
    summary = "; ".join(f"{n}: logps {r['logps']['max_abs_err']:.2e}, d_hidden {r['grad_hidden']['max_abs_err']:.2e}, "
                        f"d_weight {r['grad_weight']['max_abs_err']:.2e}" for n, r in results.items())
    return {"status": "pass" if ok else "fail",
            "summary": ("within tolerance: " if ok else "OUT OF TOLERANCE: ") + summary,
            "details": {"shape": {**size, "scored_tokens": int(mask.sum()), "vocab_tiles": tiles,
                                  "last_tile_width": last}, "device": device, "dtypes": results,
                        "skipped": skipped}}


# ---- step 4: NF4 weights through fully_shard ------------------------------------------------------------------------


def step_nf4_fsdp2(args) -> dict:
    """A tiny Qwen2 loaded in 4-bit with dpo-dist's BitsAndBytesConfig (NF4, double quant, storage = bf16): the packed
    bytes and the logits of a fixed input, then fully_shard (1-rank group), gather, compare."""
    import hashlib

    import torch
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from dpo_dist.distributed.devices import bf16_native
    from dpo_dist.models.loading import quantization_config

    device = _device(args)
    started_group = _process_group(device)
    try:
        base = Path(args.work) / "nf4-base"
        torch.manual_seed(0)
        config = Qwen2Config(vocab_size=384, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                             tie_word_embeddings=False)
        Qwen2ForCausalLM(config).save_pretrained(base)
        kwargs = {"device_map": {"": torch.cuda.current_device()}} if device == "cuda" else {}
        # dpo-dist stores 4-bit weights in the training dtype: bf16, or fp16 where bf16 is not native (V100)
        precision = "bf16" if device == "cpu" or bf16_native() else "fp16"
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]

        def load():
            model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype,
                                                         quantization_config=quantization_config(precision), **kwargs)
            model.eval()
            return model

        ids = torch.randint(0, config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1)).to(device)

        def packed(model) -> dict:
            out = {}
            for name, p in model.named_parameters():
                if type(p).__name__ == "Params4bit" or name in names:
                    t = p.detach().full_tensor() if isinstance(p, DTensor) else p.detach()
                    raw = t.contiguous().view(torch.uint8).cpu().numpy().tobytes()
                    out[name] = {"dtype": str(t.dtype).replace("torch.", ""), "shape": list(t.shape),
                                 "bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
            return out

        # The reference logits come from a second, unsharded copy: bitsandbytes' CPU backend repacks the weights in
        # place at the first forward, after which they can no longer be sharded as loaded.
        names: set[str] = set()
        reference = load()
        ref_bytes = packed(reference)
        names.update(ref_bytes)
        with torch.no_grad():
            logits_before = reference(input_ids=ids).logits.float()
        del reference
        model = load()
        before = packed(model)
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        sharded_types = sorted({type(p).__name__ for p in model.parameters()})
        after = packed(model)
        with torch.no_grad():
            logits_after = model(input_ids=ids).logits.float()
        after_forward = packed(model)
        at_load = before
        diff = float((logits_after - logits_before).abs().max())
        u = torch.finfo(dtype).eps / 2  # the logits come out of matmuls in the storage dtype
        tol = 2 * u * float(logits_before.abs().max())
        equal = bool(before) and before == after == ref_bytes
        storage = sorted({v["dtype"] for v in at_load.values()})
        ok = equal and diff <= tol and bool(torch.isfinite(logits_after).all()) and storage == [str(dtype).replace("torch.", "")]
        details = {
            "device": device, "quantized_params": len(at_load), "storage_dtype": storage,
            "packed_bytes": sum(v["bytes"] for v in before.values()),
            "bytes_equal_after_gather": before == after, "bytes_equal_after_sharded_forward": before == after_forward,
            "bytes_equal_across_loads": before == ref_bytes, "param_types_after_fully_shard": sharded_types,
            "logits_max_abs_diff": diff, "logits_tolerance": tol, "logits_max_abs": float(logits_before.abs().max()),
            "mismatched": sorted(k for k in before if before.get(k) != after.get(k))[:10],
        }
        summary = (f"{len(at_load)} NF4 weights, {details['packed_bytes']} packed bytes "
                   f"{'equal' if equal else 'NOT equal'} after gather; logits max diff {diff:.3g} (tol {tol:.3g})")
        return {"status": "pass" if ok else "fail", "summary": summary, "details": details}
    finally:
        if started_group or "TORCHELASTIC_RUN_ID" in os.environ:
            _close_group()


# ---- steps 5-7: training runs through `dpo-dist launch` -------------------------------------------------------------


def derive_recipes(template: Path, base: Path, out_dir: Path) -> dict[str, Path]:
    """From the demo recipe: `chain` (its SFT and DPO stages, QLoRA) and `dpo` (its DPO stage alone, from the base),
    each stage TRAIN_STEPS optimizer steps of GLOBAL_BATCH rows, every step logged."""
    import copy

    from dpo_dist.config.schema import load_yaml

    data = load_yaml(template)
    by_type = {s["stage"]: s for s in data["stages"]}
    stages = []
    for kind in ("sft", "dpo"):
        stage = copy.deepcopy(by_type[kind])
        stage.pop("method", None)
        source = Path(stage["data"]["train"])
        stage["data"]["train"] = str(find(source))
        stage["data"]["max_rows"] = TRAIN_STEPS * GLOBAL_BATCH  # the rows the steps train on, no more to tokenize
        stage["train"] = {**stage.get("train", {}), "max_steps": TRAIN_STEPS, "global_batch_size": GLOBAL_BATCH}
        stages.append(stage)
    common = {"seed": data.get("seed", 42), "model": {**data["model"], "name_or_path": str(base)},
              "method": {**data.get("method", {}), "type": "qlora"},
              "train": {**(data.get("train") or {}), "logging_steps": 1, "save_steps": 1000, "warmup_ratio": 0.0}}
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"chain": out_dir / "gpu-check-chain.yaml", "dpo": out_dir / "gpu-check-dpo.yaml"}
    import yaml

    paths["chain"].write_text(yaml.safe_dump({"name": "gpu-check-chain", **common, "stages": stages}, sort_keys=False))
    paths["dpo"].write_text(yaml.safe_dump({"name": "gpu-check-dpo", **common, "stages": stages[1:]}, sort_keys=False))
    return paths


def one_process_profile(name: str, out_dir: Path) -> Path:
    """A copy of profile `name` for one process. `dpo-dist launch --nproc-per-node 1` is refused for a multi-process
    profile (check_run: the profile's world size differs from the launch's), so the check launches this copy, whose
    launcher, backend file and settings are otherwise the profile's own."""
    import yaml

    from dpo_dist.config.profiles import LAUNCH_DIR, load_profile
    from dpo_dist.config.schema import load_yaml

    source = LAUNCH_DIR / f"{name}.yaml"
    data = load_yaml(source)
    out_dir.mkdir(parents=True, exist_ok=True)
    data.update(num_processes=1, num_nodes=1, description=f"{data.get('description', name)} (1 process: gpu-check)")
    if data.get("accelerate_config"):
        acc_path = load_profile(name).path_of("accelerate_config")
        acc = load_yaml(acc_path)
        acc["num_processes"] = 1
        ds = (acc.get("deepspeed_config") or {}).get("deepspeed_config_file")
        if ds and not Path(ds).is_absolute():
            acc["deepspeed_config"]["deepspeed_config_file"] = str(find(ds, acc_path.resolve().parents[2]))
        copy_path = out_dir / f"{name}-1proc.accelerate.yaml"
        copy_path.write_text(yaml.safe_dump(acc, sort_keys=False))
        data["accelerate_config"] = str(copy_path)
    if data.get("deepspeed_config"):
        data["deepspeed_config"] = str(load_profile(name).path_of("deepspeed_config"))
    path = out_dir / f"{name}-1proc.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    load_profile(str(path))  # refused here, not in the launch, if the copy is not a valid profile
    return path


def ensure_base(work: Path) -> Path:
    """The demo's tiny Qwen2 (its own tokenizer, random weights), built once per check."""
    base = work / "base"
    if not (base / "config.json").is_file():
        from dpo_dist.demo.build import build_base

        build_base(base)
    return base


HOOK = f"""# Written by dpo_dist.bench.gpu_check: records GPU memory around each model load of a run under the check.
import os
if os.environ.get({MEMLOG_ENV!r}):
    from dpo_dist.bench.gpu_check import install_memory_hook
    install_memory_hook(os.environ[{MEMLOG_ENV!r}])
"""


def install_memory_hook(path: str) -> None:
    """In a training process: wrap dpo_dist.models.loading.load_model (read by run_stage at call time) to append, before and
    after each load, torch.cuda.memory_allocated to `path`; and wrap the DPO trainer's build to record the optimizer
    and the gradient scaler after each step. Only the check's processes carry it (PYTHONPATH + env)."""
    import importlib.abc
    import importlib.machinery

    def record(**row) -> None:
        with open(path, "a") as fh:
            fh.write(json.dumps({"pid": os.getpid(), "rank": os.environ.get("RANK", "0"), **row}) + "\n")

    def cuda_mem() -> dict:
        import torch

        if not torch.cuda.is_available():
            return {"cuda": False}
        return {"allocated_mib": torch.cuda.memory_allocated() / 2 ** 20,
                "reserved_mib": torch.cuda.memory_reserved() / 2 ** 20,
                "max_allocated_mib": torch.cuda.max_memory_allocated() / 2 ** 20}

    def patch_models(module) -> None:
        original = module.load_model

        def load_model(cfg, *a, **k):
            record(event="before_load", model=str(cfg.name_or_path), **cuda_mem())
            model = original(cfg, *a, **k)
            record(event="after_load", model=str(cfg.name_or_path), **cuda_mem())
            return model

        module.load_model = load_model

    def patch_dpo(module) -> None:
        original = module.build_dpo_trainer

        def build_dpo_trainer(*a, **k):
            from transformers import TrainerCallback

            trainer = original(*a, **k)

            class Probe(TrainerCallback):
                def on_step_end(self, args, state, control, optimizer=None, **kw):
                    scaler = getattr(trainer.accelerator, "scaler", None)
                    inner = getattr(optimizer, "optimizer", optimizer)
                    record(event="dpo_step", step=state.global_step, optimizer=type(inner).__name__,
                           optimizer_module=type(inner).__module__, scaler=type(scaler).__name__ if scaler else None,
                           scale=float(scaler.get_scale()) if scaler is not None else None, **cuda_mem())

            trainer.add_callback(Probe())
            return trainer

        module.build_dpo_trainer = build_dpo_trainer

    patches = {"dpo_dist.models.loading": patch_models, "dpo_dist.training.dpo.trainer": patch_dpo}

    class Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, search_path, target=None):
            if name not in patches:
                return None
            spec = importlib.machinery.PathFinder.find_spec(name, search_path)
            if spec is None or spec.loader is None:
                return spec
            loader, patch = spec.loader, patches[name]

            class Loader(importlib.abc.Loader):
                def create_module(self, spec):
                    return loader.create_module(spec)

                def exec_module(self, module):
                    loader.exec_module(module)
                    patch(module)

            spec.loader = Loader()
            return spec

    sys.meta_path.insert(0, Finder())


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _train_run(tag: str, recipe: Path, profile: str, overrides: list[str], work: Path, bin_dir: Path,
               timeout: float, memlog: bool = False) -> dict:
    """One `dpo-dist launch` in its own output and cache directory (no run reuses another's reference log-probs)."""
    run_dir = work / "runs" / tag
    env = {"DPO_DIST_CACHE": str(run_dir / "cache"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    if memlog:
        hook_dir = work / "hook"
        hook_dir.mkdir(parents=True, exist_ok=True)
        (hook_dir / "sitecustomize.py").write_text(HOOK)
        env[MEMLOG_ENV] = str(run_dir / "memory.jsonl")
        env["PYTHONPATH"] = os.pathsep.join([str(hook_dir), str(PACKAGE_PARENT), os.environ.get("PYTHONPATH", "")]).rstrip(
            os.pathsep)
        Path(env[MEMLOG_ENV]).unlink(missing_ok=True)
    cmd = [str(bin_dir / "dpo-dist"), "launch", str(recipe), "--profile", profile,
           "--master-port", str(_free_port()), f"output_dir={run_dir / 'out'}", *overrides]
    run = _run(cmd, work / "logs" / f"{tag}.log", timeout, env=env, cwd=work)
    out = run_dir / "out"
    run["stages"] = {}
    for stage in ("sft", "dpo"):
        metrics = _read_jsonl(out / stage / "metrics.jsonl")
        summary_path = out / stage / "summary.json"
        if not metrics and not summary_path.is_file():
            continue
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        adapter = out / stage / "adapter"
        run["stages"][stage] = {
            "losses": [m["loss"] for m in metrics if "loss" in m],
            "global_step": summary.get("global_step"), "train_loss": summary.get("train_loss"),
            "adapter_saved": (adapter / "adapter_config.json").is_file()
                             and any(adapter.glob("adapter_model.*")),
            "adapter": str(adapter), "backend": summary.get("backend"), "precision": summary.get("precision"),
        }
    if memlog:
        rows = _read_jsonl(Path(env[MEMLOG_ENV]))
        loads = [r for r in rows if r["event"] == "before_load"]
        run["memory"] = {"loads": [r for r in rows if r["event"] in ("before_load", "after_load")],
                         "before_stage2_load_mib": loads[1].get("allocated_mib") if len(loads) > 1 else None,
                         "dpo_steps": [r for r in rows if r["event"] == "dpo_step"]}
    if run["rc"] != 0:
        run["log_tail"] = _tail(run["log"])
    return run


def _finite(values: list) -> bool:
    import math

    return bool(values) and all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def _max_rel_diff(a: list[float], b: list[float]) -> float | None:
    if not a or len(a) != len(b):
        return None
    return max(abs(x - y) / max(abs(x), abs(y), 1e-8) for x, y in zip(a, b))


def _run_ok(run: dict, stages: tuple[str, ...]) -> bool:
    return run["rc"] == 0 and all(s in run["stages"] and _finite(run["stages"][s]["losses"])
                                  and run["stages"][s]["adapter_saved"] for s in stages)


def step_chain(args) -> dict:
    """Step 5 (padding_free true and false, compared) or 6 (one run, compared with step 5's): the QLoRA SFT→DPO chain
    under `--profile`, with GPU memory recorded before each stage's model load."""
    if args.device == "cuda" and (skip := _skip_without_bf16(args.profile)):
        return skip
    work, deadline = Path(args.work), Deadline(args.budget)
    base = ensure_base(work)
    recipe = derive_recipes(Path(args.recipe), base, work / "recipes")["chain"]
    values = [v for v in args.padding_free.split(",") if v]
    runs = {}
    for i, value in enumerate(values):
        overrides = [f"stages.sft.train.padding_free={value}", f"stages.dpo.train.padding_free={value}"]
        runs[value] = _train_run(f"chain-{args.profile}-pf-{value}", recipe, args.profile, overrides, work,
                                 Path(args.bin), deadline.share(len(values) - i), memlog=True)
    details = {"profile": args.profile, "recipe": str(recipe), "runs": runs, "loss_rtol": LOSS_RTOL}
    ok = all(_run_ok(r, ("sft", "dpo")) for r in runs.values())
    notes = []
    if len(values) == 2:
        a, b = (runs[v]["stages"].get("dpo", {}).get("losses", []) for v in values)
        diff = _max_rel_diff(a, b)
        details["dpo_loss_max_rel_diff"] = diff
        ok = ok and diff is not None and diff <= LOSS_RTOL
        notes.append(f"DPO losses padding_free {values[0]} vs {values[1]}: max rel diff "
                     f"{'n/a' if diff is None else f'{diff:.2e}'} (tol {LOSS_RTOL})")
    if args.compare and Path(args.compare).is_file():
        other = json.loads(Path(args.compare).read_text()).get("details", {}).get("runs", {}).get("false", {})
        mine = runs[values[0]]["stages"].get("dpo", {}).get("losses", [])
        diff = _max_rel_diff(mine, other.get("stages", {}).get("dpo", {}).get("losses", []))
        details["dpo_loss_max_rel_diff_vs_compare"] = diff  # another precision and micro-batch: recorded, not judged
        notes.append(f"vs {Path(args.compare).stem} (other precision, informational): "
                     f"{'n/a' if diff is None else f'{diff:.2e}'}")
    for value, run in runs.items():
        mem = run.get("memory", {})
        steps = mem.get("dpo_steps") or []
        if steps:
            details.setdefault("dpo_optimizer", {})[value] = {k: steps[-1].get(k) for k in ("optimizer", "scaler",
                                                                                              "scale")}
        notes.append(f"pf={value}: GPU memory before stage 2 load "
                     f"{_mib(mem.get('before_stage2_load_mib'))}")
    if args.profile == V100_PROFILE:
        for value, info in details.get("dpo_optimizer", {}).items():
            notes.append(f"optimizer {info['optimizer']}, scaler {info['scaler']} (scale {info['scale']})")
    failed = [f"{v}: exit {r['rc']}{' (timed out)' if r['timed_out'] else ''}" for v, r in runs.items()
              if not _run_ok(r, ("sft", "dpo"))]
    if failed:
        notes.insert(0, "run failed: " + ", ".join(failed))
    return {"status": "pass" if ok else "fail", "summary": "; ".join(notes), "details": details,
            "logs": [r["log"] for r in runs.values()]}


def _mib(value) -> str:
    return "n/a" if value is None else f"{value:.1f} MiB"


def step_sharded(args) -> dict:
    """Step 7: the DPO stage alone, QLoRA, under a one-process copy of a sharded profile (accelerate FSDP2 or the
    deepspeed launcher with ZeRO-3), TRAIN_STEPS steps, then its saved adapter."""
    if args.device == "cuda" and (skip := _skip_without_bf16(args.profile)):
        return skip
    work, deadline = Path(args.work), Deadline(args.budget)
    base = ensure_base(work)
    recipe = derive_recipes(Path(args.recipe), base, work / "recipes")["dpo"]
    profile = one_process_profile(args.profile, work / "profiles")
    run = _train_run(f"sharded-{args.profile}", recipe, str(profile), [], work, Path(args.bin), deadline.share(1))
    dpo = run["stages"].get("dpo", {})
    ok = _run_ok(run, ("dpo",)) and dpo.get("global_step") == TRAIN_STEPS
    summary = (f"{args.profile} (1 process): exit {run['rc']}{' (timed out)' if run['timed_out'] else ''}, "
               f"steps {dpo.get('global_step')}, losses {[round(x, 4) for x in dpo.get('losses', [])]}, "
               f"backend {dpo.get('backend')}, adapter {'saved' if dpo.get('adapter_saved') else 'MISSING'}")
    return {"status": "pass" if ok else "fail", "summary": summary, "logs": [run["log"]],
            "details": {"profile": args.profile, "profile_copy": str(profile), "recipe": str(recipe), "run": run}}


# ---- step 8: dpo-dist bench -----------------------------------------------------------------------------------------


def bench_command(bin_dir: Path, json_out: Path, work_dir: Path, profile: str = CHAIN_PROFILE) -> list[str]:
    """bench trains its own `small` random Qwen2 (it has no larger model shape); the logits micro-benchmark runs at
    Qwen2.5-0.5B's head shape (hidden 896, vocabulary 151,936), where the head's memory matters."""
    return [str(bin_dir / "dpo-dist"), "bench", "--workload", "dpo", "--lengths", "realistic", "--profile",
            profile, "--model-size", "small", "--steps", "6", "--repeats", "1",
            "--logits-vocab", str(QWEN25_05B["vocab"]), "--logits-hidden", str(QWEN25_05B["hidden"]),
            "--logits-seq", "256", "--json", str(json_out), "--work-dir", str(work_dir)]


def step_bench(args) -> dict:
    from dpo_dist.distributed.devices import bf16_native

    work = Path(args.work)
    json_out = work / "bench" / "bench.json"
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.unlink(missing_ok=True)
    profile = CHAIN_PROFILE if args.device == "cpu" or bf16_native() else V100_PROFILE
    run = _run(bench_command(Path(args.bin), json_out, work / "bench" / "work", profile), work / "logs" / "bench.log",
               args.budget, env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}, cwd=work)
    details = {"run": run, "note": "bench offers model sizes tiny and small only; the 0.5B shape applies to the "
                                   "logits micro-benchmark (Qwen2.5-0.5B hidden and vocabulary)"}
    if not json_out.is_file():
        run["log_tail"] = _tail(run["log"])
        return {"status": "fail", "summary": f"bench wrote no JSON (exit {run['rc']}"
                                             f"{', timed out' if run['timed_out'] else ''})", "details": details,
                "logs": [run["log"]]}
    report = json.loads(json_out.read_text())
    ratios = {k: v for k, v in report.items() if k.startswith("ratio_")}
    details.update(ratios=ratios, targets=report.get("targets"), same_work=report.get("same_work", {}).get("equal"),
                   machine=report.get("machine"), command=report.get("command"))
    ok = run["rc"] == 0 and details["same_work"] is True
    summary = ", ".join(f"{k[6:]} {v:.3f}" for k, v in ratios.items() if isinstance(v, (int, float)))
    return {"status": "pass" if ok else "fail", "summary": f"B/A: {summary}", "details": details,
            "logs": [run["log"]]}


# ---- the plan and the dry run ---------------------------------------------------------------------------------------


def plan(args) -> int:
    """Print the plan; with --shell, one `name<TAB>timeout<TAB>command` line per step for the shell script. Without
    --shell, also check that every profile, config, recipe and data file the plan uses exists and that every launch
    passes dpo-dist's own preflight; exit 1 naming each missing item."""
    out = Path(args.out).resolve()
    recipe = Path(args.recipe).resolve()
    py = args.python
    if args.shell:
        for name, _sub, timeout, _title in STEPS:
            print(f"{name}\t{timeout}\t{shlex.join(step_command(name, py, out, recipe))}")
        return 0
    missing: list[str] = []
    total = sum(s[2] for s in STEPS)
    print(f"gpu-check plan: {len(STEPS)} steps, timeouts sum to {total} s ({total / 60:.1f} min; budget "
          f"{BUDGET_S} s), results in {out}")
    for i, (name, _sub, timeout, title) in enumerate(STEPS, 1):
        print(f"\n{i}. {name} [timeout {timeout} s]: {title}\n   $ {shlex.join(step_command(name, py, out, recipe))}")
    if total >= BUDGET_S:
        missing.append(f"budget: step timeouts sum to {total} s, not under {BUDGET_S} s")
    print("\nfiles:")
    missing += _check_files(recipe)
    print("\nlaunched by the steps (recipes and 1-process profile copies are written to <out>/work):")
    import tempfile

    with tempfile.TemporaryDirectory(prefix="gpu-check-plan-") as tmp:
        missing += _check_launches(recipe, Path(tmp), out / "work")
    print("   [bench] $ " + shlex.join(bench_command(Path(py).parent, out / "work" / "bench" / "bench.json",
                                                    out / "work" / "bench" / "work")))
    if missing:
        print("\nmissing:")
        for item in missing:
            print(f"  - {item}")
        return 1
    print("\nall commands, modules, profiles, configs and recipe files exist")
    return 0


def _check_files(recipe: Path) -> list[str]:
    from dpo_dist.config.profiles import load_profile
    from dpo_dist.config.schema import ConfigError

    missing = []
    print(f"   recipe {recipe} (the check's recipes derive from it)")
    profiles = [CHAIN_PROFILE, V100_PROFILE, *SHARDED_PROFILES.values()]
    for name in profiles:
        try:
            p = load_profile(name)  # also checks that its accelerate/deepspeed file exists
        except ConfigError as err:
            missing.append(f"profile {name}: {err}")
            continue
        files = [f"{key} {p.path_of(key)}" for key in ("accelerate_config", "deepspeed_config") if getattr(p, key)]
        print(f"   profile {name} ({p.source})" + "".join(f", {f}" for f in files))
        ds = p.deepspeed_file()
        if ds is not None and not ds.is_file():
            missing.append(f"profile {name}: ZeRO file {ds}")
    if not recipe.is_file():
        missing.append(f"recipe {recipe} (the check's recipes derive from it; --recipe)")
        return missing
    from dpo_dist.config.schema import load_yaml

    try:
        stages = {s.get("stage"): s for s in load_yaml(recipe).get("stages", [])}
    except Exception as err:
        return missing + [f"recipe {recipe}: {err}"]
    for kind in ("sft", "dpo"):
        if kind not in stages:
            missing.append(f"recipe {recipe}: no {kind} stage to derive the check's recipe from")
            continue
        source = Path(stages[kind].get("data", {}).get("train", ""))
        source = find(source)
        if not source.is_file():
            missing.append(f"data file {source} (recipe {recipe}, {kind} stage)")
        else:
            print(f"   data ({kind}) {source}")
    return missing


def _check_launches(recipe: Path, tmp: Path, work: Path) -> list[str]:
    """Every `dpo-dist launch` the plan makes, through dpo-dist's own preflight (recipe overrides, profile, methods,
    batch split) and command builder, as the dry run of each launch would."""
    from dpo_dist.launch.command import Nodes, build_command, preflight
    from dpo_dist.config.profiles import load_profile
    from dpo_dist.config.schema import ConfigError

    missing = []
    try:
        paths = derive_recipes(recipe, tmp / "base", tmp / "recipes")
    except Exception as err:
        return [f"recipe {recipe}: cannot derive the check's recipes: {type(err).__name__}: {err}"]
    for step, profile_name, overrides in launches():
        which = "dpo" if step in SHARDED_PROFILES else "chain"
        try:
            arg = str(one_process_profile(profile_name, tmp / "profiles")) if step in SHARDED_PROFILES else profile_name
            profile = load_profile(arg)
            preflight(str(paths[which]), profile, overrides, 1, sources=False)
            cmd = build_command(str(paths[which]), profile, arg, Nodes(procs=1), overrides)
        except (ConfigError, OSError, KeyError) as err:
            missing.append(f"{step}: launch under {profile_name} is refused: {err}")
            continue
        shown = shlex.join(cmd[:1] + [a.replace(str(tmp), str(work)) for a in cmd[1:]])
        print(f"   [{step}] dpo-dist launch {paths[which].name} --profile {profile_name} {' '.join(overrides)}\n"
              f"      → {shown}")
    return missing


# ---- the report -----------------------------------------------------------------------------------------------------


def assemble(out: Path) -> dict:
    """report.json and report.md from the steps' results (steps/NAME.json) and the shell's exit records
    (steps/NAME.exit: {rc, seconds, timeout_s} or {skipped: reason})."""
    steps = []
    for name, _sub, timeout, title in STEPS:
        result_path, exit_path = out / "steps" / f"{name}.json", out / "steps" / f"{name}.exit"
        exit_info = json.loads(exit_path.read_text()) if exit_path.is_file() else None
        log = str(out / "logs" / f"{name}.log")
        entry = {"name": name, "title": title, "timeout_s": timeout, "log": log}
        if exit_info is None and not result_path.is_file():
            entry.update(status="skip", seconds=0.0, summary="not run", details={})
        elif exit_info and exit_info.get("skipped"):
            entry.update(status="skip", seconds=0.0, summary=f"skipped: {exit_info['skipped']}", details={})
        elif result_path.is_file():
            result = json.loads(result_path.read_text())
            entry.update(status=result.get("status", "fail"), summary=result.get("summary", ""),
                         details=result.get("details", {}), seconds=result.get("seconds"))
            if result.get("verdict"):
                entry["verdict"] = result["verdict"]
            entry["logs"] = result.get("logs", [])
        else:
            rc = exit_info.get("rc")
            why = (f"timed out after {timeout} s" if rc in (124, 137) else f"exited {rc} without writing a result")
            entry.update(status="fail", summary=why, details={"log_tail": _tail(log, 25)})
        if exit_info and "seconds" in exit_info:
            entry["seconds"] = exit_info["seconds"]
            entry["rc"] = exit_info.get("rc")
        steps.append(entry)
    counts = {s: sum(e["status"] == s for e in steps) for s in ("pass", "fail", "skip")}
    report = {"out": str(out), "budget_s": BUDGET_S, "total_seconds": round(sum(e["seconds"] or 0 for e in steps), 1),
              "counts": counts, "machine": _machine(), "steps": steps}
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / "report.md").write_text(markdown(report))
    return report


def _machine() -> dict:
    info = {"python": sys.version.split()[0]}
    try:
        import torch

        info.update(torch=torch.__version__, cuda=torch.version.cuda, gpus=torch.cuda.device_count())
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    except Exception as err:  # the report is still written
        info["torch_error"] = f"{type(err).__name__}: {err}"
    return info


def markdown(report: dict) -> str:
    lines = ["# gpu-check report", "",
             f"{report['counts']['pass']} pass, {report['counts']['fail']} fail, {report['counts']['skip']} skip; "
             f"{report['total_seconds']} s of {report['budget_s']} s; machine: "
             + ", ".join(f"{k} {v}" for k, v in report["machine"].items()), "",
             "| # | step | status | seconds | result |", "|---|---|---|---|---|"]
    for i, s in enumerate(report["steps"], 1):
        seconds = "" if s.get("seconds") is None else f"{s['seconds']:.1f}"
        text = str(s.get("summary", "")).replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {i} | {s['name']} | {s['status']} | {seconds} | {text} |")
    for i, s in enumerate(report["steps"], 1):
        lines += ["", f"## {i}. {s['name']}: {s['status']}", "", s["title"], "", f"log: `{s['log']}`"]
        for extra in s.get("logs", []):
            lines.append(f"log: `{extra}`")
        if s["status"] == "fail" and s["details"].get("log_tail"):
            lines += ["", "```", s["details"]["log_tail"].rstrip(), "```"]
        elif s["details"]:
            text = json.dumps(s["details"], indent=1, default=str)
            lines += ["", "<details><summary>details</summary>", "", "```json",
                      text if len(text) < 6000 else text[:6000] + "\n…", "```", "", "</details>"]
    return "\n".join(lines) + "\n"


def report_main(args) -> int:
    report = assemble(Path(args.out))
    print(markdown({**report, "steps": report["steps"]}).split("\n## ")[0].rstrip())
    print(f"\nreport: {Path(args.out) / 'report.json'} and {Path(args.out) / 'report.md'}")
    return 1 if report["counts"]["fail"] else 0


# ---- command line ---------------------------------------------------------------------------------------------------

STEP_FUNCS = {"doctor": step_doctor, "bnb-fsdp2": step_bnb_fsdp2, "compact-head": step_compact_head,
              "nf4-fsdp2": step_nf4_fsdp2, "chain": step_chain, "sharded": step_sharded, "bench": step_bench}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dpo_dist.bench.gpu_check", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="step", required=True)
    for name, func in STEP_FUNCS.items():
        p = sub.add_parser(name, help=(func.__doc__ or "").split("\n")[0])
        p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
        p.add_argument("--out", required=True, help="the step's JSON result")
        p.add_argument("--work", default="gpu-check-out/work", help="models, recipes, runs and logs")
        p.add_argument("--budget", type=float, default=120, help="seconds for the step's own subprocesses")
        p.add_argument("--bin", default=str(Path(sys.executable).parent), help="where dpo-dist and the launchers are")
        p.add_argument("--recipe", default=str(DEFAULT_RECIPE), help="recipe the training steps derive theirs from")
        p.add_argument("--profile", default=CHAIN_PROFILE, help="chain, sharded: the launch profile")
        p.add_argument("--padding-free", default="true,false", help="chain: the values to run, comma-separated")
        p.add_argument("--compare", help="chain: another chain result whose padding_free=false DPO losses to compare")
        p.set_defaults(func=func)
    p = sub.add_parser("plan", help="print the plan and check that everything it uses exists (exit 1 if not)")
    p.add_argument("--out", default="gpu-check-out")
    p.add_argument("--python", default=sys.executable, help="the Python the steps run with (launchers beside it)")
    p.add_argument("--recipe", default=str(DEFAULT_RECIPE))
    p.add_argument("--shell", action="store_true", help="one name<TAB>timeout<TAB>command line per step")
    p.set_defaults(func=plan)
    p = sub.add_parser("report", help="assemble report.json and report.md from the step results in --out")
    p.add_argument("--out", default="gpu-check-out")
    p.set_defaults(func=report_main)
    return parser


def run_step(args) -> dict:
    started = time.time()
    try:
        result = args.func(args)
    except Exception as err:  # a crash of the harness: recorded as this step's failure
        result = {"status": "fail", "summary": f"harness error: {type(err).__name__}: {str(err)[:300]}",
                  "details": {"traceback": traceback.format_exc()[-4000:]}}
    result = {"name": args.step, "seconds": round(time.time() - started, 2), "device": args.device, **result}
    if is_main_process():
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"[gpu-check] {args.step}: {result['status']}: {result.get('summary', '')}", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.func in (plan, report_main):
        return args.func(args)
    return 0 if run_step(args)["status"] != "fail" else 1


if __name__ == "__main__":
    sys.exit(main())
