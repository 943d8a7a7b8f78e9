"""The tokenized-data cache: one directory per (data bytes, options, tokenizer, template, lengths).

An entry is built in a private temporary directory and published by one atomic rename, so a reader never sees half
an entry, and an interrupted build leaves only its temporary directory (removed by the next build of that entry).

Several processes can ask for the same entry at once: the ranks of a run (on one node or, with a shared file
system, on many), or `dpo-dist prepare` next to a training job. The first to create `<entry>.lock` builds it; the
others wait *on the entry itself*, not in a collective, so a build that takes hours never trips a collective
timeout. While it builds, the builder touches its lock every few seconds. A waiter logs every minute; it stops with
the builder's own message if the build fails, and takes over the build if the builder's lock goes stale (the
builder died). Which rank builds does not matter: any one of them produces the same entry.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Callable

CACHE_VERSION = "5"  # bump when the tokenized layout changes
HEARTBEAT_S = 5.0
STALE_S = 120.0  # a lock untouched this long belongs to a builder that died
WAIT_LOG_S = 60.0
POLL_S = 0.5


class BuildFailed(RuntimeError):
    """Another process failed to build the entry this one was waiting for."""


def cache_home() -> Path:
    """Where dpo-dist keeps its caches: $DPO_DIST_CACHE, else ~/.cache/dpo_dist."""
    return Path(os.environ.get("DPO_DIST_CACHE", Path.home() / ".cache" / "dpo_dist"))


def cache_root() -> Path:
    return cache_home() / "tokenized"


def hash_path(path: Path, h) -> None:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)


def tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    h.update(repr(sorted(tokenizer.special_tokens_map.items())).encode())
    return h.hexdigest()[:16]


def cache_key(source: str, options: dict, tokenizer, template_fingerprint: str) -> str:
    h = hashlib.sha256(CACHE_VERSION.encode())
    path = Path(source)
    if path.exists():
        hash_path(path, h)
    else:  # a Hugging Face dataset: its name and split identify it (datasets keeps its own download cache)
        h.update(source.encode())
    h.update(json.dumps(options, sort_keys=True).encode())
    h.update(tokenizer_fingerprint(tokenizer).encode())
    h.update(template_fingerprint.encode())
    return h.hexdigest()[:24]


def _me() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "rank": os.environ.get("RANK", "0")}


def _who(info: dict) -> str:
    return f"rank {info.get('rank', '?')} (pid {info.get('pid', '?')} on {info.get('host', '?')})"


class Entry:
    """One cache entry: ``path/report.json`` marks it complete; the data files sit beside it."""

    def __init__(self, key: str, source: str):
        self.path = cache_root() / key
        self.source = source
        self.lock = self.path.with_name(key + ".lock")

    def ready(self) -> bool:
        return (self.path / "report.json").is_file()

    def report(self) -> dict:
        return json.loads((self.path / "report.json").read_text())

    def get(self, build: Callable[[Path], dict], log=print) -> tuple[dict, bool]:
        """The entry's report, building the entry first unless it exists. Returns (report, read_from_cache)."""
        started = time.time()
        self._said_waiting = False
        while True:
            if self.ready():
                return self.report(), True
            if self._claim():
                if self.ready():  # published between the check above and the claim
                    self._release()
                    return self.report(), True
                return self._build(build), False
            self._wait(started, log)

    # ---- building ------------------------------------------------------------------------------------------------
    def _claim(self) -> bool:
        """Create the lock with its content in one step (a hard link of a written file), so that a waiter never
        reads a lock without its holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        mine = self._write_aside({**_me(), "state": "building", "started": time.time()})
        try:
            os.link(mine, self.lock)
            return True
        except FileExistsError:
            return False
        finally:
            mine.unlink(missing_ok=True)

    def _write_aside(self, content: dict) -> Path:
        aside = self.lock.with_name(f"{self.lock.name}.{socket.gethostname()}.{os.getpid()}")
        aside.write_text(json.dumps(content))
        return aside

    def _release(self) -> None:
        self.lock.unlink(missing_ok=True)

    def _build(self, build: Callable[[Path], dict]) -> dict:
        for stale in self.path.parent.glob(self.path.name + ".tmp*"):  # left by an interrupted build
            shutil.rmtree(stale, ignore_errors=True)
        tmp = self.path.with_name(f"{self.path.name}.tmp{os.getpid()}")
        stop = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(stop,), daemon=True)
        beat.start()
        try:
            report = build(tmp)
            (tmp / "report.json").write_text(json.dumps(report, indent=1))  # last: it marks the entry complete
            try:
                os.replace(tmp, self.path)
            except OSError:
                if not self.ready():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # a builder that took over from us finished first
        except BaseException as err:
            stop.set()
            beat.join()
            shutil.rmtree(tmp, ignore_errors=True)
            self._fail(err)
            raise
        stop.set()
        beat.join()
        self._release()
        return report

    def _heartbeat(self, stop: threading.Event) -> None:
        while not stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.lock)
            except OSError:
                return

    def _fail(self, err: BaseException) -> None:
        """Leave the error in the lock for the waiters; the next build of this entry replaces it."""
        message = " ".join(str(err).split()) or type(err).__name__
        if isinstance(err, KeyboardInterrupt):
            message = "interrupted"
        try:  # replaced whole, so a waiter reads either the old content or the new
            os.replace(self._write_aside({**_me(), "state": "failed", "error": message, "failed": time.time()}),
                       self.lock)
        except OSError:
            pass

    # ---- waiting -------------------------------------------------------------------------------------------------
    def _holder(self) -> dict | None:
        try:
            return json.loads(self.lock.read_text())
        except (OSError, ValueError):
            return None  # gone (published or released), or being written

    def _wait(self, started: float, log) -> None:
        last_log = time.time()
        while not self.ready():
            holder = self._holder()
            try:
                age = time.time() - self.lock.stat().st_mtime
            except FileNotFoundError:
                return  # released: look again (claim it, or read the entry)
            if holder and holder.get("state") == "failed":
                mine = (holder.get("host"), holder.get("pid")) == (_me()["host"], _me()["pid"])
                if not mine and holder.get("failed", 0) >= started:  # failed while we waited: its error is ours
                    raise BuildFailed(f"{self.source}: tokenizing failed on {_who(holder)}: {holder.get('error')}")
                self._take_over(f"an earlier build by {_who(holder)} failed ({holder.get('error')})", log)
                return
            if age > STALE_S:
                self._take_over(f"{_who(holder or {})} stopped updating its lock {age:.0f} s ago", log)
                return
            if not self._said_waiting:
                log(f"[data] {self.source}: waiting while {_who(holder or {})} tokenizes it into {self.path}")
                self._said_waiting = True
            elif time.time() - last_log >= WAIT_LOG_S:
                log(f"[data] {self.source}: still waiting for {_who(holder or {})} to finish tokenizing "
                    f"({time.time() - started:.0f} s)")
                last_log = time.time()
            time.sleep(POLL_S)

    def _take_over(self, why: str, log) -> None:
        """Remove a dead builder's lock so that the next claim succeeds. Two waiters may both do this: each then
        builds, and the atomic publish keeps the entry whole either way."""
        log(f"[data] {self.source}: {why}; building it here")
        self.lock.unlink(missing_ok=True)
