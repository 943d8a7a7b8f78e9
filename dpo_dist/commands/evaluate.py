"""`dpo-dist eval MODEL --data FILE`: held-out metrics of a model, a LoRA/QLoRA adapter or a training output.

- DPO data: implicit reward r = β·(log π(y|x) − log π_ref(y|x)) of the chosen and rejected responses, summed over
  the response tokens exactly as DPO training scores them. Reports reward accuracy (r_chosen > r_rejected; a tie
  counts as wrong, as in TRL), mean margin, mean chosen/rejected rewards, and the policy's own log-prob accuracy.
  The reference of an adapter is its base with the adapter disabled (one copy of the weights, as in training).
  A full model needs `--ref MODEL` for rewards; without it only the log-prob metrics are reported, with a note.
- Unpaired (KTO) data: the same implicit reward per row, reported for desirable and undesirable rows apart, and
  reward accuracy = how often its sign agrees with the label (r > 0 for a desirable row, r < 0 for an undesirable
  one; 0 counts as wrong). The policy's mean log-probs per label are reported with or without a reference.
- SFT data: the mean token negative log-likelihood over assistant tokens, weighted by tokens across the file, and
  perplexity = exp(loss). Pretraining text: the same over the packed blocks training sees.

Rows are read, rendered and tokenized by the training pipeline (dpo_dist.data), so the numbers are comparable with
the training logs at the same max_length / max_prompt_length / template.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from dpo_dist.config.schema import ConfigError

if TYPE_CHECKING:
    from dpo_dist.data.tokenize import Prepared

KINDS = ("dpo", "kto", "sft", "pretrain")  # --format auto tries them in this order
REWARDED = ("dpo", "kto")  # kinds scored against a reference


@dataclass
class Target:
    """What MODEL and --adapter name: the base weights to load, and the adapter on them (if any)."""
    base: str
    adapter: str | None


def resolve_target(model: str, adapter: str | None) -> Target:
    from dpo_dist.models.loading import resolve_base_and_adapter

    return Target(*resolve_base_and_adapter(model, adapter))


def resolve_kind(source: str, kind: str, fmt: str, split: str) -> str:
    """The data kind: given, implied by --data-format, or the kind whose formats match the most rows."""
    from dpo_dist.data.formats import FORMATS, DataError, scan_source

    if kind != "auto":
        if fmt not in FORMATS[kind]:
            raise ConfigError(f"--data-format {fmt}: not a {kind} format; choose one of {', '.join(FORMATS[kind])}")
        return kind
    if fmt != "auto":
        owners = [k for k in KINDS if fmt in FORMATS[k]]
        if not owners:
            known = sorted({f for k in KINDS for f in FORMATS[k]})
            raise ConfigError(f"--data-format {fmt}: unknown format; choose one of {', '.join(known)}")
        return owners[0]
    try:  # held-out files are small next to a forward pass over them: reading them once per kind is cheap
        usable = {k: len(scan_source(source, k, "auto", split).rows) for k in KINDS}
    except DataError as err:
        raise ConfigError(str(err)) from None
    best = max(KINDS, key=lambda k: usable[k])  # max keeps the first of equals: dpo, then kto, then sft
    if not usable[best]:
        raise ConfigError(f"{source}: no row matches a dpo, kto, sft or pretrain format; `dpo-dist validate --data "
                          f"{source} --format dpo|kto|sft|pretrain` lists the rows and why")
    return best


def load_data(args, kind: str, tokenizer, renderer, log) -> "Prepared":
    """Rows as training tokenizes them (cached like training data). Reader errors name FILE:LINE."""
    from dpo_dist.data.formats import DataError
    from dpo_dist.data.tokenize import prepare_dataset

    try:
        return prepare_dataset(kind, args.data, tokenizer, renderer, max_length=args.max_length,
                               max_prompt_length=args.max_prompt_length if kind in REWARDED else None,
                               fmt=args.data_format, on_bad_row=args.on_bad_row, split=args.split,
                               max_rows=args.max_rows, log=log)
    except DataError as err:
        raise ConfigError(str(err)) from None


@dataclass
class Scorer:
    model: object
    reference: Callable | None  # batch -> the reference's summed completion log-probs
    reference_name: str | None
    dtype: str


def load_scorer(target: Target, ref: str | None, rewarded: bool, dtype: str, trust_remote_code: bool) -> Scorer:
    """The policy, and for preference data the reference: an adapter's own base (the product's rule: one copy of the
    weights, the adapter disabled, as in training), else --ref's model, else none."""
    import torch

    from dpo_dist.distributed.devices import pick_attn_implementation
    from dpo_dist.inference.loader import load_model
    from dpo_dist.inference.scoring import summed_logps

    device = "cuda" if torch.cuda.is_available() else "cpu"
    common = dict(dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                  attn_implementation=pick_attn_implementation("auto", dtype))
    model = load_model(target.base, target.adapter, what="MODEL", **common)
    if target.adapter:
        def adapter_disabled(batch):
            with model.disable_adapter():
                return summed_logps(model, batch)

        return Scorer(model, adapter_disabled, "base with the adapter disabled", dtype)
    if not (ref and rewarded):
        return Scorer(model, None, None, dtype)
    ref_model = load_model(ref, what="--ref", **common)
    if ref_model.get_input_embeddings().num_embeddings != model.get_input_embeddings().num_embeddings:
        raise ConfigError(f"--ref {ref}: its vocabulary size differs from MODEL's; the reference must share the "
                          "policy's tokenizer")
    return Scorer(model, lambda batch: summed_logps(ref_model, batch), ref, dtype)


def pick_dtype(requested: str) -> str:
    import torch

    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        from dpo_dist.distributed.devices import bf16_native

        return "bf16" if bf16_native() else "fp16"
    return "fp32"  # CPUs are slow and often inexact in half precision


class Progress:
    """`scored k/N rows` on stderr, at most every `every_s` seconds, and once at the end."""

    def __init__(self, total: int, unit: str, every_s: float = 2.0):
        self.total, self.unit, self.every_s = total, unit, every_s
        self.start = self.last = time.monotonic()

    def update(self, done: int) -> None:
        now = time.monotonic()
        if done >= self.total:
            print(f"[eval] scored {done}/{self.total} {self.unit} in {now - self.start:.1f} s", file=sys.stderr)
        elif now - self.last >= self.every_s:
            print(f"[eval] scored {done}/{self.total} {self.unit}", file=sys.stderr, flush=True)
            self.last = now


def score_dpo(model, reference: Callable | None, dataset, batch_size: int, pad_id: int):
    """Policy log-probs of chosen and rejected, and the reference's (None without one), one tensor each."""
    import torch
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from dpo_dist.inference.scoring import summed_logps

    collate = DataCollatorForPreference(pad_token_id=pad_id)  # the training batch layout: [chosen..., rejected...]
    policy, ref = [], []
    progress = Progress(len(dataset), "rows")
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            rows = dataset.select(range(start, min(start + batch_size, len(dataset))))
            examples = [{k: r[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for r in rows]
            batch = {k: v.to(model.device) for k, v in collate(examples).items()}
            policy.append(summed_logps(model, batch).cpu())
            if reference is not None:
                ref.append(reference(batch).cpu())
            progress.update(start + len(examples))
    return _split_pairs(policy), (_split_pairs(ref) if ref else None)


def _split_pairs(chunks):
    import torch

    pairs = [c.chunk(2) for c in chunks]
    return torch.cat([c for c, _ in pairs]), torch.cat([r for _, r in pairs])


def dpo_metrics(policy, reference, beta: float) -> dict:
    chosen, rejected = policy
    out = {}
    if reference is not None:
        reward_c, reward_r = beta * (chosen - reference[0]), beta * (rejected - reference[1])
        out.update(reward_accuracy=(reward_c > reward_r).double().mean().item(),
                   reward_margin=(reward_c - reward_r).double().mean().item(),
                   reward_chosen=reward_c.double().mean().item(),
                   reward_rejected=reward_r.double().mean().item())
    out.update(logp_accuracy=(chosen > rejected).double().mean().item(),
               logp_margin=(chosen - rejected).double().mean().item(),
               logp_chosen=chosen.double().mean().item(),
               logp_rejected=rejected.double().mean().item())
    return out


def score_kto(model, reference: Callable | None, dataset, batch_size: int, pad_id: int):
    """Policy log-probs of each row's completion, the reference's (None without one), and the labels."""
    import torch
    from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference

    from dpo_dist.inference.scoring import summed_logps

    collate = DataCollatorForUnpairedPreference(pad_token_id=pad_id)  # the training batch layout
    policy, ref, labels = [], [], []
    progress = Progress(len(dataset), "rows")
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            rows = dataset.select(range(start, min(start + batch_size, len(dataset))))
            examples = [{k: r[k] for k in ("prompt_ids", "completion_ids", "label")} for r in rows]
            batch = collate(examples)
            labels.append(batch.pop("label").bool())
            batch = {k: v.to(model.device) for k, v in batch.items()}
            policy.append(summed_logps(model, batch).cpu())
            if reference is not None:
                ref.append(reference(batch).cpu())
            progress.update(start + len(examples))
    return torch.cat(policy), (torch.cat(ref) if ref else None), torch.cat(labels)


def kto_metrics(policy, reference, labels, beta: float) -> dict:
    """Per-label means (a label with no rows is left out) and, with a reference, the reward's sign accuracy."""
    out = {}
    if reference is not None:
        reward = beta * (policy - reference)
        out["reward_accuracy"] = _mean((reward > 0) == labels)
        for name, side in (("desirable", labels), ("undesirable", ~labels)):
            if side.any():
                out[f"reward_{name}"] = _mean(reward[side])
        if labels.any() and (~labels).any():
            out["reward_margin"] = out["reward_desirable"] - out["reward_undesirable"]
    for name, side in (("desirable", labels), ("undesirable", ~labels)):
        if side.any():
            out[f"logp_{name}"] = _mean(policy[side])
    return out


def _mean(values) -> float:
    return values.double().mean().item()


def score_nll(model, dataset, batch_size: int, pad_id: int) -> dict:
    """Token-weighted mean NLL over the labelled tokens (assistant turns; every token of pretraining blocks)."""
    import torch
    from torch.nn.functional import cross_entropy
    from torch.nn.utils.rnn import pad_sequence

    from dpo_dist.data.tokenize import IGNORE

    total_nll, total_tokens = 0.0, 0
    progress = Progress(len(dataset), "rows")
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            rows = dataset.select(range(start, min(start + batch_size, len(dataset))))
            ids = pad_sequence([torch.tensor(r["input_ids"]) for r in rows], batch_first=True, padding_value=pad_id)
            labels = pad_sequence([torch.tensor(r["labels"]) for r in rows], batch_first=True, padding_value=IGNORE)
            mask = pad_sequence([torch.ones(len(r["input_ids"]), dtype=torch.long) for r in rows], batch_first=True)
            logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits
            targets = labels[:, 1:].to(model.device)  # token t is predicted from the tokens before it
            for row_logits, row_targets in zip(logits[:, :-1], targets):  # fp32 one row at a time, as above
                total_nll += cross_entropy(row_logits.float(), row_targets, ignore_index=IGNORE, reduction="sum").item()
            total_tokens += int((targets != IGNORE).sum())
            progress.update(start + len(rows))
    if not total_tokens:
        raise ConfigError("--data: no labelled tokens left to score (assistant turns cut off by --max-length?)")
    loss = total_nll / total_tokens
    return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf, "scored_tokens": total_tokens}


def check_args(args) -> None:
    from dpo_dist.data.templates import get_template

    if args.template is not None:
        try:
            get_template(args.template)
        except ValueError as err:
            raise ConfigError(f"--template: {err}") from None
    if args.beta <= 0:
        raise ConfigError(f"--beta {args.beta}: must be positive")
    for flag, value in (("--max-length", args.max_length), ("--batch-size", args.batch_size),
                        ("--max-rows", args.max_rows)):
        if value is not None and value <= 0:
            raise ConfigError(f"{flag} {value}: must be positive")
    if args.max_prompt_length is not None and not 0 < args.max_prompt_length < args.max_length:
        raise ConfigError(f"--max-prompt-length {args.max_prompt_length}: must be between 1 and --max-length - 1 "
                          f"({args.max_length - 1})")


def evaluate(args, log=lambda line: print(line, file=sys.stderr)) -> dict:
    """Everything `dpo-dist eval` reports, as one JSON-ready dict."""
    from dpo_dist.data.render import Renderer, TemplateError
    from dpo_dist.data.tokenize import prompt_budget
    from dpo_dist.models.loading import load_tokenizer, tokenizer_source
    from dpo_dist.config.recipe import ModelConfig

    # ---- what to evaluate, on what: every argument and the data are checked before a model is loaded --------------
    check_args(args)
    target = resolve_target(args.model, args.adapter)
    kind = resolve_kind(args.data, args.format, args.data_format, args.split)
    rewarded = kind in REWARDED
    if args.ref and not rewarded:
        raise ConfigError(f"--ref: a reference is only used on preference data (dpo or kto); {args.data} is {kind} "
                          "data")
    if args.ref and target.adapter:
        raise ConfigError("--ref: an adapter's reference is its own base with the adapter disabled (no second copy "
                          "of the weights is loaded); drop --ref")

    # ---- tokenizer, template, data ----------------------------------------------------------------------------------
    tokenizer_dir = tokenizer_source(target.base, target.adapter)
    try:
        tokenizer = load_tokenizer(ModelConfig(name_or_path=tokenizer_dir, trust_remote_code=args.trust_remote_code))
    except OSError as err:
        raise ConfigError(f"{tokenizer_dir}: cannot load a tokenizer from it: {str(err).splitlines()[0]}") from None
    try:
        renderer = Renderer(tokenizer, args.template)
        prepared = load_data(args, kind, tokenizer, renderer, log)
    except TemplateError as err:
        flag = f"--template {args.template}" if args.template else "the tokenizer's own chat template"
        raise ConfigError(f"{flag}: {err}") from None

    # ---- models: the policy, and the reference it is measured against ----------------------------------------------
    scorer = load_scorer(target, args.ref, rewarded, pick_dtype(args.dtype), args.trust_remote_code)
    notes = []
    if rewarded and scorer.reference is None:
        notes.append("no reference (a full model without --ref): reward metrics are omitted; give --ref MODEL "
                     "(e.g. the SFT model DPO started from) for rewards")

    # ---- score ------------------------------------------------------------------------------------------------------
    pad_id = tokenizer.pad_token_id
    if kind == "dpo":
        policy, ref = score_dpo(scorer.model, scorer.reference, prepared.dataset, args.batch_size, pad_id)
        metrics = dpo_metrics(policy, ref, args.beta)
    elif kind == "kto":
        policy, ref, labels = score_kto(scorer.model, scorer.reference, prepared.dataset, args.batch_size, pad_id)
        metrics = kto_metrics(policy, ref, labels, args.beta)
        if labels.all() or not labels.any():
            notes.append(f"every row is {'desirable' if labels.all() else 'undesirable'}: the other label's "
                         "metrics and the margin are omitted")
    else:
        metrics = score_nll(scorer.model, prepared.dataset, args.batch_size, pad_id)
    report = prepared.report
    return {
        "model": target.base, "adapter": target.adapter, "reference": scorer.reference_name,
        "data": args.data, "kind": kind, "format": report["format"], "template": renderer.name,
        "beta": args.beta if rewarded else None, "dtype": scorer.dtype, "max_length": args.max_length,
        "max_prompt_length": prompt_budget(args.max_length, args.max_prompt_length) if rewarded else None,
        "rows": report["rows"], "examples": report["examples"], "truncated": report.get("truncated", 0),
        "skipped": report["skipped"], "warnings": report["warnings"],
        "metrics": metrics, "notes": notes,
    }


LABELS = {  # metric key -> table label
    "reward_accuracy": "reward accuracy", "reward_margin": "reward margin (mean)",
    "reward_chosen": "reward chosen (mean)", "reward_rejected": "reward rejected (mean)",
    "logp_accuracy": "policy logp accuracy", "logp_margin": "policy logp margin (mean)",
    "logp_chosen": "policy logp chosen (mean)", "logp_rejected": "policy logp rejected (mean)",
    "reward_desirable": "reward desirable (mean)", "reward_undesirable": "reward undesirable (mean)",
    "logp_desirable": "policy logp desirable (mean)", "logp_undesirable": "policy logp undesirable (mean)",
    "loss": "loss (token NLL)", "perplexity": "perplexity", "scored_tokens": "scored tokens",
}


def table(result: dict) -> str:
    what = result["model"] + (f" + adapter {result['adapter']}" if result["adapter"] else "")
    head = [f"model:     {what}",
            f"data:      {result['data']} ({result['kind']}, format {result['format']}, template {result['template']})"]
    if result["kind"] in REWARDED:
        head.append(f"reference: {result['reference'] or 'none'}   beta: {result['beta']}")
    rows = [("rows", result["rows"])]
    if result["kind"] == "pretrain":
        rows.append((f"blocks of {result['max_length']} tokens", result["examples"]))
    rows += [("rows truncated", result["truncated"]), ("rows skipped", len(result["skipped"]))]
    rows += [(LABELS.get(k, k), v) for k, v in result["metrics"].items()]
    width = max(len(label) for label, _ in rows) + 2
    lines = head + ["", f"{'metric':<{width}}{'value':>12}", "-" * (width + 12)]
    for label, value in rows:
        text = f"{value:.4f}" if isinstance(value, float) else str(value)
        lines.append(f"{label:<{width}}{text:>12}")
    return "\n".join(lines + [f"note: {n}" for n in result["notes"]])


def run(args) -> int:
    result = evaluate(args)
    text = json.dumps(result, indent=1)
    if args.json == "-":  # stdout is the JSON alone, so it can be piped; the table goes to stderr
        from dpo_dist.cli import json_stdout

        print(table(result), file=sys.stderr)
        print(text, file=json_stdout(), flush=True)
        return 0
    print(table(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="held-out metrics: DPO or KTO reward accuracy and margin, or SFT loss and "
                       "perplexity")
    p.add_argument("model", metavar="MODEL", help="model directory or hub name, or an adapter directory "
                   "(its base is read from adapter_config.json)")
    p.add_argument("--adapter", metavar="DIR", help="LoRA/QLoRA adapter on MODEL; the DPO reference is then MODEL "
                   "with the adapter disabled")
    p.add_argument("--ref", metavar="MODEL", help="reference for DPO/KTO rewards of a full model (e.g. the SFT "
                   "model DPO started from); without it only the policy's log-prob metrics are reported")
    p.add_argument("--data", required=True, metavar="FILE", help="held-out .jsonl/.json/.parquet file "
                   "(or Hugging Face dataset)")
    p.add_argument("--format", default="auto", choices=["auto", *KINDS],
                   help="kind of data (default: detected from the rows' keys)")
    p.add_argument("--data-format", default="auto", help="firefly, openai, sharegpt, alpaca, pair, ultrafeedback, "
                   "unpaired, text or auto (default)")
    p.add_argument("--split", default="train", help="split of a Hugging Face dataset (default train)")
    p.add_argument("--on-bad-row", default="error", choices=["error", "skip"],
                   help="stop at the first bad row (default) or skip bad rows and count them")
    p.add_argument("--template", metavar="NAME", help="chat template (default: the tokenizer's own, else default)")
    p.add_argument("--beta", type=float, default=0.1, help="β of the DPO/KTO implicit reward (default 0.1)")
    p.add_argument("--max-length", type=int, default=1024, help="token limit per sequence, as in training "
                   "(default 1024)")
    p.add_argument("--max-prompt-length", type=int, metavar="N", help="DPO/KTO prompt token limit (default: "
                   "max-length/2)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per forward pass (default 8)")
    p.add_argument("--max-rows", type=int, metavar="N", help="score only the first N rows")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="weights' dtype (default: bf16 on GPUs that have it, else fp16; fp32 on CPU)")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--json", metavar="OUT.json", help="also write the results as JSON ('-': JSON alone on stdout)")
    p.set_defaults(func=run)
