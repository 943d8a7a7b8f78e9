"""Reference log-probs computed once per pair, before the first step, and cached on disk (`train.ref_logps_cache`).

A DPO step needs the reference's summed completion log-probs for each pair. TRL computes them with an extra forward
in every step, or (`precompute_ref_log_probs`) in a pass it runs before the trainer has prepared the model, which
breaks under FSDP2 (the ranks hold shards, not the model). Here the pass runs at the first training step, on the
model as the backend prepared it, with every rank taking part:

1. every pair of the training set gets a key: a digest of its chosen and rejected token ids and completion masks
   exactly as the collator hands them to the model (so the key is the data, whatever file it came from);
2. the cache file for this reference model (`<cache>/ref-logps/<model key>.jsonl`; the model key covers the weights'
   files, dtype, quantization, precision, attention implementation and library versions) is read on rank 0 and
   broadcast, so all ranks agree on what is missing;
3. the missing pairs are sorted by length, cut into batches of `train.ref_logps_batch_size` pairs (default 4 × the
   micro-batch: a no-grad forward keeps no activations), dealt to the ranks round-robin (to the groups, under sequence
   parallelism), and run through TRL's own
   `compute_ref_log_probs` (adapter disabled with LoRA, the frozen copy for full DPO). A rank with fewer batches runs
   a repeat so that sharded forwards stay in step;
4. the pass flushes as it goes: after its first round and then about every `flush_s` (60) seconds, the results since
   the last flush are gathered on every rank and rank 0 appends them to the file. A run stopped during the pass (a
   preemption at step 1 of a 72B run, where the pass takes an hour) loses at most the last minute: the rerun reads
   what was written and computes only the rest.

The file (FORMAT 2) is append-only: a header line `{"format": 2, ...}`, then one line `["<pair key>", chosen,
rejected]` per pair. Each flush appends its lines in one write under an exclusive `flock`, so other runs on the same
reference model can append to the same file; a flush costs its own lines only (no rewrite of what is there). A run
killed mid-write leaves a torn last line: readers ignore it, and the next writer ends it with a newline first. A
format-1 file (`<model key>.json`, one JSON object, rewritten whole) is still read; nothing writes it any more.

Afterwards each training micro-batch reads its reference values by key, and TRL's loss takes them from the batch
(`ref_chosen_logps` / `ref_rejected_logps`) instead of running the reference forward. The keys are computed by the
collator (`KeyedCollator`), on the CPU tensors, and travel in the batch as `pair_keys` (a list of str, which
`Trainer._prepare_inputs` leaves as it is): hashing device tensors would cost a device→host sync per micro-batch.
A second epoch, a resumed run or another run on the same model and rows computes nothing. Evaluation keeps the
inline reference pass.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import time
from pathlib import Path

import torch

FORMAT = 2  # the file layout (see the module docstring); format 1 is still read
VALUES = 1  # what a cached value means, part of the model key: bump it when the computation changes
PAIR_KEYS = "pair_keys"  # the batch entry KeyedCollator adds; not a model input


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


class KeyedCollator:
    """The trainer's collator, plus each pair's key under `pair_keys`, computed from the CPU tensors it made."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, examples):
        batch = self.collate(examples)
        batch[PAIR_KEYS] = pair_keys(batch)
        return batch

    def __getattr__(self, name):  # the wrapped collator's attributes (e.g. its tokenizer)
        if name == "collate":  # not set yet (unpickling)
            raise AttributeError(name)
        return getattr(self.collate, name)


def without_pair_keys(batch: dict) -> dict:
    """The batch as the model may see it: TRL hands every key but a few to the model's forward."""
    return {k: v for k, v in batch.items() if k != PAIR_KEYS} if PAIR_KEYS in batch else batch


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
        "format": VALUES,  # named "format" since format 1, so that format-1 files keep their names
        "model": name,
        "commit": getattr(config, "_commit_hash", None),
        "dtype": str(getattr(model, "dtype", None)),
        "quantization": quant,
        "precision": precision,
        # compat: transformers-config-attn-implementation
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


def _record(line: bytes) -> tuple[str, tuple[float, float]] | None:
    try:
        key, chosen, rejected = json.loads(line)
        if not isinstance(key, str):
            return None
        return key, (float(chosen), float(rejected))
    except (ValueError, TypeError):
        return None


class RefLogpsCache:
    def __init__(self, path: Path, batch_size: int, log=print, flush_s: float = 60.0):
        self.path = path  # <model key>.jsonl
        self.batch_size = batch_size
        self.log = log
        self.flush_s = flush_s  # aimed-for seconds between two flushes of the pass (0: after every round)
        self.table: dict[str, tuple[float, float]] | None = None
        self.seconds = 0.0  # wall time of the pass (0 when every pair was cached)
        self.stats = {"pairs": 0, "cached": 0, "computed": 0, "batches": 0}
        self._unreadable = False  # the file's header could not be read: the next write starts a new file

    # ---- file ------------------------------------------------------------------------------------------------------

    @property
    def format1_path(self) -> Path:
        return self.path.with_suffix(".json")

    def _read_format1(self) -> dict:
        path = self.format1_path
        if not path.is_file():
            return {}
        try:
            data = json.loads(path.read_text())
            if data.get("format") != 1:
                raise ValueError(f"format {data.get('format')!r}, expected 1")
            table = {k: (float(v[0]), float(v[1])) for k, v in data["pairs"].items()}
        except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
            self.log(f"[ref-logps] ignoring unreadable format-1 cache {path} ({err})")
            return {}
        self.log(f"[ref-logps] {len(table)} pairs read from the format-1 cache {path}; new ones go to {self.path}")
        return table

    def _read(self) -> dict:
        table = self._read_format1()
        if not self.path.is_file():
            return table
        try:
            lines = self.path.read_bytes().split(b"\n")
            header = json.loads(lines[0])
            if not isinstance(header, dict) or header.get("format") != FORMAT:
                found = header.get("format") if isinstance(header, dict) else header
                raise ValueError(f"format {found!r}, expected {FORMAT}")
        except (OSError, ValueError) as err:
            self.log(f"[ref-logps] ignoring unreadable cache {self.path} ({err}); recomputing (it is kept as "
                     f"{self.path.name}.unreadable)")
            self._unreadable = True
            return table
        bad = 0
        for line in lines[1:-1]:
            record = _record(line) if line.strip() else None
            if record is None:
                bad += line.strip() != b""
                continue
            table[record[0]] = record[1]
        if bad:
            self.log(f"[ref-logps] skipped {bad} unreadable line(s) of {self.path}")
        if lines[-1]:  # no newline at the end: a run was stopped while writing this line
            self.log(f"[ref-logps] ignoring the unfinished last line of {self.path}")
        return table

    def _append(self, records: list) -> None:
        """Appends `[key, chosen, rejected]` lines: one write per call, under an exclusive lock, since other runs on
        this reference model may be appending to the same file."""
        if not records:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self._unreadable:
            try:
                os.replace(self.path, self.path.with_name(self.path.name + ".unreadable"))
            except FileNotFoundError:
                pass
            self._unreadable = False
        body = "".join(json.dumps([k, c, r]) + "\n" for k, c, r in records).encode()
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError:  # a file system without flock (some NFS/Lustre mounts): O_APPEND alone
                pass
            size = os.fstat(fd).st_size
            if size == 0:
                body = (json.dumps({"format": FORMAT, "record": ["pair key", "chosen", "rejected"]}) + "\n").encode() \
                    + body
            elif os.pread(fd, 1, size - 1) != b"\n":  # a torn last line: end it, so that ours start on their own
                body = b"\n" + body
            view = memoryview(body)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)  # releases the lock

    # ---- the pass --------------------------------------------------------------------------------------------------

    def fill(self, trainer) -> None:
        from accelerate.utils import broadcast_object_list, gather_object

        from dpo_dist.reliability.faults import Faults

        started = time.perf_counter()
        acc = trainer.accelerator
        main = acc.is_main_process
        guard = getattr(trainer, "guard", None)
        faults = guard.faults if guard is not None else Faults()
        # compat: transformers-trainer-input-pipeline
        dataset = trainer._remove_unused_columns(trainer.train_dataset, description="reference log-probs")
        collate = trainer.data_collator
        rows = [dataset[i] for i in range(len(dataset))]
        keys = [batch_keys(collate([row]))[0] for row in rows]
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
        pairs_before = [0]  # pairs in batches[:n], for the progress lines
        for b in batches:
            pairs_before.append(pairs_before[-1] + len(b))
        # The ranks of a sequence-parallel group run each batch together (dpo_dist.distributed.sequence): batches
        # are dealt to the groups, and the first rank of each group keeps the results.
        sp = trainer.get_sp_size()
        world, rank = acc.num_processes // sp, acc.process_index // sp
        keeps = acc.process_index % sp == 0
        rounds = math.ceil(len(batches) / world)
        if main and batches:
            self.log(f"[ref-logps] {len(missing)} of {len(set(keys))} pairs not in {self.path}: computing them in "
                     f"{len(batches)} batches of up to {self.batch_size} pairs on {world} rank(s)")
        model = trainer.ref_model if trainer.ref_model is not None else trainer.model
        pending = []  # this rank's results since the last flush
        computed = flushes = last_flush = 0
        next_flush, flushed_at = 1, time.perf_counter()
        report_every = max(1, rounds // 10)
        for r in range(rounds):
            mine = r * world + rank
            idx = batches[mine] if mine < len(batches) else batches[0]  # a repeat keeps sharded forwards in step
            batch = trainer._prepare_inputs(without_pair_keys(collate([rows[i] for i in idx])))
            chosen, rejected = trainer.compute_ref_log_probs(model, batch)
            if mine < len(batches) and keeps:  # keys are padding-independent: each row's key from above is its key
                pending += zip((keys[i] for i in idx), chosen.float().tolist(), rejected.float().tolist())
            done = r + 1
            faults.during_ref_pass(done)
            flush = done in (next_flush, rounds)
            if flush:  # a collective: every rank reaches the same rounds
                seconds = time.perf_counter() - flushed_at
                parts = gather_object([(seconds, pending)]) if acc.num_processes > 1 else [(seconds, pending)]
                new = [record for _, records in parts for record in records]
                if main:
                    self._append(new)
                table.update((k, (c, rj)) for k, c, rj in new)
                computed, flushes = computed + len(new), flushes + 1
                # The next flush point, from the slowest rank's time per round since this one's: every rank derives
                # it from the same gathered numbers, so no rank's own clock decides alone.
                per_round = max(s for s, _ in parts) / (done - last_flush)
                next_flush = done + (max(1, int(self.flush_s / per_round)) if per_round > 0 else rounds)
                pending, last_flush, flushed_at = [], done, time.perf_counter()
            if main and (done % report_every == 0 or flush):
                upto, elapsed = min(done * world, len(batches)), time.perf_counter() - started
                self.log(f"[ref-logps] {upto}/{len(batches)} batches ({pairs_before[upto]}/{len(order)} pairs), "
                         f"{elapsed:.1f} s, {pairs_before[upto] / max(elapsed, 1e-9):.1f} pairs/s; "
                         f"{computed} saved to the cache")
        acc.wait_for_everyone()
        self.table = table
        self.seconds = time.perf_counter() - started if batches else 0.0
        self.stats = {"pairs": len(set(keys)), "cached": len(set(keys)) - len(missing), "computed": computed,
                      "batches": len(batches), "flushes": flushes, "seconds": round(self.seconds, 3)}
        if main:
            self.log(f"[ref-logps] {self.stats['cached']} cached, {self.stats['computed']} computed "
                     f"({self.seconds:.1f} s)")

    def lookup(self, trainer, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if self.table is None:
            self.fill(trainer)
        keys = batch_keys(inputs)
        absent = [k for k in keys if k not in self.table]
        if absent:
            # Cannot happen for rows of the training set; computing them here would put this rank's forwards out
            # of step with the others under FSDP/ZeRO-3, so stop instead of hanging.
            raise RuntimeError(f"reference log-probs: {len(absent)} pair(s) of this batch are not in the cache "
                               f"{self.path}; set train.ref_logps_cache: false to run the reference inline")
        device = inputs["input_ids"].device
        values = torch.tensor([self.table[k] for k in keys], dtype=torch.float32, device=device)
        return values[:, 0], values[:, 1]


def batch_keys(batch: dict) -> list[str]:
    """The pair keys KeyedCollator put in the batch; computed from its tensors (a device→host copy when they are on
    the accelerator) only for a batch that did not come through it."""
    keys = batch.get(PAIR_KEYS)
    return list(keys) if keys is not None else pair_keys(batch)
