"""Plain helpers shared by several test modules (pytest fixtures live in tests/conftest.py). No test module imports
another test module: what two of them share is here.

- launching: `free_port()`, `run()` (a command in its own session, killed whole on a timeout), `write_recipe()`,
  `summary()`, `losses()`, `steps()`
- data files: `write_jsonl()`; a base whose greedy replies are not empty: `untied_base()`
- host reads of tensor values: `host_reads()`
- answers during training: `sampling_recipe()`, `read_samples()`, `training_numbers()`
- the DPO trainer in-process: `dpo_trainer()`, `perturb()`, `train_step()`, `KernelSpy`
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # this venv's launchers and console scripts


# ---- launching ---------------------------------------------------------------------------------------------------

def free_port() -> int:
    """A TCP port that is free now (the OS picks it), for a launcher's rendezvous: two test runs on one machine, or a
    port still held by an earlier run, never collide the way a fixed port does."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def untied_base(tiny_base: Path, out: Path) -> Path:
    """tiny_base's architecture and tokenizer with larger, untied random weights. tiny_base's small tied weights make
    greedy decoding repeat the prompt's last token ("\\n"), so every greedy reply would be empty and prove nothing."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(tiny_base, tie_word_embeddings=False, initializer_range=0.3)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_base).save_pretrained(out)
    return out


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def write_recipe(path: Path, base: Path, data: dict, stages=("sft", "dpo"), chain=False, **train) -> str:
    stage_list = []
    for s in stages:
        fmt = {"sft": "firefly", "kto": "unpaired"}.get(s, "pair")  # orpo and cpo read the dpo pairs
        entry = {"stage": s, "data": {"train": data.get(s) or data["dpo"], "format": fmt}, "max_length": 64}
        if s in ("dpo", "kto", "orpo", "cpo"):
            entry["max_prompt_length"] = 32
        stage_list.append(entry)
    recipe = {
        "name": "dist", "seed": 11, "chain": chain,
        "model": {"name_or_path": str(base), "template": "qwen"},
        "method": {"type": "lora", "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0},
        "train": {"learning_rate": 1e-2, "global_batch_size": 8, "max_steps": 4, "logging_steps": 1,
                  "save_steps": 100, "lr_scheduler": "constant", "gradient_checkpointing": True, **train},
        "output_dir": str(path.parent / "runs"),
        "stages": stage_list,
    }
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def run(cmd: list, env: dict | None = None, expect: int = 0, timeout: int = 900) -> subprocess.CompletedProcess:
    # Own session: on a timeout the launcher's ranks are killed with it, not left holding ports and CPU.
    proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})})
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(map(str, cmd))}\ntimed out after {timeout} s\n" + "\n".join((out + err).splitlines()[-30:]))
    proc = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    if (proc.returncode == 0) != (expect == 0):
        lines = (proc.stdout + proc.stderr).splitlines()
        errors = [ln for ln in lines if "Error" in ln and "Warning" not in ln][:10]
        tail = "\n".join(errors + ["..."] + lines[-30:])
        pytest.fail(f"{' '.join(map(str, cmd))}\nexit {proc.returncode}\n{tail}")
    return proc


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def losses(run_dir: Path, key: str = "loss") -> list[float]:
    from dpo_dist.training.common import read_metrics

    return [m[key] for m in read_metrics(run_dir) if "loss" in m]


def steps(run_dir: Path) -> list[int]:
    from dpo_dist.training.common import read_metrics

    return [m["step"] for m in read_metrics(run_dir) if "loss" in m]


# ---- answers during training (tests/test_samples.py, tests/test_trackers.py) -------------------------------------

SAMPLE_PAIRS = [{"prompt": f"Describe the owl {i}.", "chosen": "It is calm and kind.", "rejected": "It is rude."}
                for i in range(16)]
SAMPLE_PROMPTS = [{"prompt": "Describe the owl 3."}, {"messages": [{"role": "user", "content": "Hi"},
                                                                   {"role": "assistant", "content": "Hello."},
                                                                   {"role": "user", "content": "Describe a cat."}]}]


def sampling_recipe(base, tmp_path, *, sample: dict, report_to=None) -> dict:
    """SFT with sampling, the same SFT without it (`plain`), and DPO with sampling; unchained, so `sft` and `plain`
    train the same model on the same rows. LoRA dropout is on: a sampler that left the model in eval mode, or used
    the random-number state training draws from, would change the losses."""
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"conversation": [{"human": p["prompt"], "assistant": p["chosen"]}]}
                                               for p in SAMPLE_PAIRS])
    prompts = write_jsonl(tmp_path / "prompts.jsonl", SAMPLE_PROMPTS)
    sampling = {"sample_prompts": str(prompts), **sample}
    train = {"learning_rate": 1e-2, "global_batch_size": 4, "max_steps": 4, "logging_steps": 1, "save_steps": 100,
             "lr_scheduler": "constant"}
    if report_to is not None:
        train["report_to"] = report_to
    return {
        "name": "tracked", "model": {"name_or_path": str(base), "template": "qwen"}, "chain": False, "seed": 5,
        "method": {"type": "lora", "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.1},
        "train": train, "output_dir": str(tmp_path / "runs"),
        "stages": [{"stage": "sft", "data": {"train": str(sft)}, "max_length": 48, "train": sampling},
                   {"stage": "sft", "name": "plain", "data": {"train": str(sft)}, "max_length": 48},
                   {"stage": "dpo", "data": {"train": str(write_jsonl(tmp_path / "dpo.jsonl", SAMPLE_PAIRS))},
                    "max_length": 48, "max_prompt_length": 32, "train": sampling}]}


def read_samples(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "samples.jsonl").read_text(encoding="utf-8").splitlines()]


def training_numbers(run_dir: Path) -> list[tuple]:
    from dpo_dist.training.common import read_metrics

    return [(m["step"], m["loss"], m["grad_norm"]) for m in read_metrics(run_dir) if "loss" in m]


# ---- host reads --------------------------------------------------------------------------------------------------

HOST_READS = ("__bool__", "__int__", "__float__", "__index__", "item", "tolist")


@contextlib.contextmanager
def host_reads():
    """Records every read of a tensor's value on the host (on a GPU, each one waits for the device: a sync)."""
    import torch

    seen = []
    saved = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def recorder(name):
        def read(self, *a, **k):
            seen.append(name)
            return saved[name](self, *a, **k)
        return read

    for name in HOST_READS:
        setattr(torch.Tensor, name, recorder(name))
    try:
        yield seen
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


# ---- the DPO trainer, in-process ---------------------------------------------------------------------------------

class KernelSpy:
    """Records the tokens each call of the log-prob kernel scores. Only dpo-dist's path looks the kernel up at call
    time; TRL's own head holds its own reference, so its calls are not seen."""

    def __init__(self, monkeypatch):
        from trl.kernels import ChunkedLogProbFunction as kernel

        self.calls: list[int] = []
        calls = self.calls

        class Spy:
            @staticmethod
            def apply(hidden, *args):
                calls.append(hidden.shape[0])
                return kernel.apply(hidden, *args)

        monkeypatch.setattr("trl.kernels.ChunkedLogProbFunction", Spy)


def dpo_trainer(tiny_base, tmp_path, compact: bool, method: str = "lora", chunk: int = 100, ref_cache: bool = False,
                padding_free=False, attn: str = "sdpa", log=print, **stage_keys):
    """A LoRA (or full) DPO trainer on 8 tokenized pairs; `stage_keys` are more StageConfig keys (loss_type, ...)."""
    import torch
    from transformers import AutoTokenizer

    from dpo_dist.config.profiles import Profile
    from dpo_dist.config.recipe import DataConfig, MethodConfig, ModelConfig, StageConfig, TrainConfig
    from dpo_dist.data.render import Renderer
    from dpo_dist.data.tokenize import prepare_dataset
    from dpo_dist.models.loading import load_model, lora_config
    from dpo_dist.training.dpo.trainer import build_dpo_trainer, dpo_args

    src = write_jsonl(tmp_path / "dpo.jsonl", [
        {"prompt": "Describe the owl." + " And the fox." * (3 * (i % 4)) + f" Owl {i}?", "chosen": "It is calm." * (1 + i % 2),
         "rejected": "It is rude."} for i in range(8)])
    tok = AutoTokenizer.from_pretrained(tiny_base)
    ds = prepare_dataset("dpo", str(src), tok, Renderer(tok, "qwen"), max_length=128, log=lambda *_: None).dataset
    stage = StageConfig(stage="dpo", data=DataConfig(train=str(src)), max_length=128,
                        **{"sft_weight": 0.5, **stage_keys},
                        train=TrainConfig(learning_rate=1e-2, global_batch_size=4, max_steps=2, logging_steps=1,
                                          save_steps=100, lr_scheduler="constant", compact_logps=compact,
                                          logps_vocab_chunk=chunk, ref_logps_cache=ref_cache,
                                          padding_free=padding_free))
    stage.check("stages[0]")
    torch.manual_seed(0)
    model = load_model(ModelConfig(name_or_path=str(tiny_base)), method, "fp32", attn)
    peft = lora_config(MethodConfig(lora_r=4, lora_alpha=8, lora_dropout=0.0)) if method != "full" else None
    profile = Profile(name="t", micro_batch_size=4, precision="fp32", attn_implementation=attn)
    args = dpo_args(stage, profile, tmp_path / f"run-{compact}", 0, 1)
    return build_dpo_trainer(stage, args, model, tok, ds, None, peft, [], log=log)


def perturb(trainer) -> None:
    """Move the policy off the reference (the same way every time), so that rewards are not all zero."""
    import torch

    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.02)


def train_step(trainer, rows=(0, 1, 2, 3), backward: bool = True):
    """compute_loss (and backward) on the given training rows: (loss, gradients, last logged metrics, batch)."""
    batch = trainer.data_collator([trainer.train_dataset[i] for i in rows])
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    if backward:
        loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.item(), grads, {k: v[-1] for k, v in trainer._metrics["train"].items() if v}, batch
