"""Reference log-probs computed once per pair, before the first step, and cached on disk (`train.ref_logps_cache`).

A DPO step needs the reference's summed completion log-probs for each pair. TRL computes them with an extra forward
in every step, or (`precompute_ref_log_probs`) in a pass it runs before the trainer has prepared the model, which
breaks under FSDP2 (the ranks hold shards, not the model). Here the pass runs at the first training step, on the
model as the backend prepared it, with every rank taking part:

1. every pair of the training set gets a key: a digest of its chosen and rejected token ids and completion masks
   exactly as the collator hands them to the model (so the key is the data, whatever file it came from);
2. the cache file for this reference model (`<cache>/ref-logps/<model key>.json`; the model key covers the weights'
   files, dtype, quantization, precision, attention implementation and library versions) is read on rank 0 and
   broadcast, so all ranks agree on what is missing;
3. the missing pairs are sorted by length, cut into batches of `train.ref_logps_batch_size` pairs (default 4 × the
   micro-batch: a no-grad forward keeps no activations), dealt to the ranks round-robin, and run through TRL's own
   `compute_ref_log_probs` (adapter disabled with LoRA, the frozen copy for full DPO). A rank with fewer batches runs
   a repeat so that sharded forwards stay in step;
4. the results are gathered on every rank; rank 0 merges them into the file (atomically).

Afterwards each training micro-batch reads its reference values by key, and TRL's loss takes them from the batch
(`ref_chosen_logps` / `ref_rejected_logps`) instead of running the reference forward. A second epoch, a resumed run
or another run on the same model and rows computes nothing. Evaluation keeps the inline reference pass.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path

import torch

FORMAT = 1


def cache_dir() -> Path:
    from dpo_dist.data.tokenize import cache_home

    return cache_home() / "ref-logps"


def pair_keys(batch: dict) -> list[str]:
    """One key per pair of a collated DPO batch (rows [chosen..., rejected...]), padding ignored."""
    ids, attention, completion = (batch[k].detach().cpu() for k in ("input_ids", "attention_mask", "completion_mask"))
    pairs = ids.shape[0] // 2
    keys = []
    for i in range(pairs):
        h = hashlib.blake2b(digest_size=16)
        for row in (i, i + pairs):
            keep = attention[row].bool()
            for part in (ids[row][keep].to(torch.int64), completion[row][keep].to(torch.int64)):
                h.update(part.numel().to_bytes(8, "little"))
                h.update(part.numpy().tobytes())
        keys.append(h.hexdigest())
    return keys


def model_key(model, precision: str, extra: dict | None = None) -> str:
    """What the reference log-probs depend on besides the rows: the weights and how they are run."""
    import transformers
    import trl

    config = model.config
    name = str(getattr(config, "_name_or_path", "") or "")
    quant = getattr(config, "quantization_config", None)
    if quant is not None and not isinstance(quant, dict):
        quant = quant.to_dict()
    facts = {
        "format": FORMAT,
        "model": name,
        "commit": getattr(config, "_commit_hash", None),
        "dtype": str(getattr(model, "dtype", None)),
        "quantization": quant,
        "precision": precision,
        "attn": getattr(config, "_attn_implementation", None),
        "versions": [torch.__version__, transformers.__version__, trl.__version__],
        **(extra or {}),
    }
    h = hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode())
    path = Path(name)
    if name and path.is_dir():  # a local model: its files, by name, size and modification time
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            stat = f.stat()
            h.update(f"{f.relative_to(path)}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return h.hexdigest()[:32]


class RefLogpsCache:
    def __init__(self, path: Path, batch_size: int, log=print):
        self.path = path
        self.batch_size = batch_size
        self.log = log
        self.table: dict[str, tuple[float, float]] | None = None
        self.seconds = 0.0  # wall time of the pass (0 when every pair was cached)
        self.stats = {"pairs": 0, "cached": 0, "computed": 0, "batches": 0}

    # ---- file ------------------------------------------------------------------------------------------------------

    def _read(self) -> dict:
        if not self.path.is_file():
            return {}
        try:
            data = json.loads(self.path.read_text())
            if data.get("format") != FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {FORMAT}")
            return {k: (float(v[0]), float(v[1])) for k, v in data["pairs"].items()}
        except (OSError, ValueError, KeyError, TypeError, IndexError) as err:
            self.log(f"[ref-logps] ignoring unreadable cache {self.path} ({err}); recomputing")
            return {}

    def _write(self, new: dict) -> None:
        merged = {**self._read(), **new}  # another run may have added pairs since this one read the file
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"format": FORMAT, "pairs": merged}))
        os.replace(tmp, self.path)

    # ---- the pass --------------------------------------------------------------------------------------------------

    def fill(self, trainer) -> None:
        from accelerate.utils import broadcast_object_list, gather_object

        started = time.perf_counter()
        acc = trainer.accelerator
        main = acc.is_main_process
        dataset = trainer._remove_unused_columns(trainer.train_dataset, description="reference log-probs")
        collate = trainer.data_collator
        rows = [dataset[i] for i in range(len(dataset))]
        keys = [pair_keys(collate([row]))[0] for row in rows]
        box = [self._read() if main else None]
        broadcast_object_list(box, from_process=0)
        table = box[0]
        missing: dict[str, int] = {}
        for i, key in enumerate(keys):
            if key not in table:
                missing.setdefault(key, i)

        def length(i):
            row = rows[i]
            return 2 * len(row["prompt_ids"]) + len(row["chosen_ids"]) + len(row["rejected_ids"])

        order = sorted(missing.values(), key=lambda i: (-length(i), i))
        batches = [order[k:k + self.batch_size] for k in range(0, len(order), self.batch_size)]
        world, rank = acc.num_processes, acc.process_index
        rounds = math.ceil(len(batches) / world)
        if main and batches:
            self.log(f"[ref-logps] {len(missing)} of {len(set(keys))} pairs not in {self.path}: computing them in "
                     f"{len(batches)} batches of up to {self.batch_size} pairs on {world} rank(s)")
        model = trainer.ref_model if trainer.ref_model is not None else trainer.model
        computed = []
        report_every = max(1, rounds // 10)
        for r in range(rounds):
            mine = r * world + rank
            idx = batches[mine] if mine < len(batches) else batches[0]  # a repeat keeps sharded forwards in step
            batch = trainer._prepare_inputs(collate([rows[i] for i in idx]))
            chosen, rejected = trainer.compute_ref_log_probs(model, batch)
            if mine < len(batches):  # keys are padding-independent, so each row's key from above is its key here
                computed += zip((keys[i] for i in idx), chosen.float().tolist(), rejected.float().tolist())
            if main and (r + 1) % report_every == 0:
                self.log(f"[ref-logps] {min((r + 1) * world, len(batches))}/{len(batches)} batches, "
                         f"{time.perf_counter() - started:.1f} s")
        new = {k: (c, rj) for k, c, rj in (gather_object(computed) if world > 1 else computed)}
        table.update(new)
        if main and new:
            self._write(new)
        acc.wait_for_everyone()
        self.table = table
        self.seconds = time.perf_counter() - started if batches else 0.0
        self.stats = {"pairs": len(set(keys)), "cached": len(set(keys)) - len(missing), "computed": len(new),
                      "batches": len(batches), "seconds": round(self.seconds, 3)}
        if main:
            self.log(f"[ref-logps] {self.stats['cached']} cached, {self.stats['computed']} computed "
                     f"({self.seconds:.1f} s)")

    def lookup(self, trainer, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if self.table is None:
            self.fill(trainer)
        keys = pair_keys(inputs)
        absent = [k for k in keys if k not in self.table]
        if absent:
            # Cannot happen for rows of the training set; computing them here would put this rank's forwards out
            # of step with the others under FSDP/ZeRO-3, so stop instead of hanging.
            raise RuntimeError(f"reference log-probs: {len(absent)} pair(s) of this batch are not in the cache "
                               f"{self.path}; set train.ref_logps_cache: false to run the reference inline")
        device = inputs["input_ids"].device
        values = torch.tensor([self.table[k] for k in keys], dtype=torch.float32, device=device)
        return values[:, 0], values[:, 1]
