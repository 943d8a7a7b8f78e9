"""`dpo-dist doctor [--json] [--recipe R --profile P]`: what this machine can run, on one screen.

It reads versions against the tested ranges, then CUDA, the GPUs, a real NF4 quantize + 4-bit matmul, flash-attention,
DeepSpeed's CPU Adam, cores, RAM and disk. From those facts it decides which shipped profiles can run here, and why.
No model is loaded, and nothing is built. The decisions (`check_package`, `torch_has_arch`, `profile_verdict`) are
pure functions of the facts, so they can be tested with the facts of machines we do not have.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from dpo_dist.config.schema import error_line

SHOWN = ("torch", "transformers", "trl", "peft", "accelerate", "deepspeed", "bitsandbytes", "flash-attn")
GIB = 1024 ** 3


# ---- pure decisions ----------------------------------------------------------------------------------------------

def check_package(installed: str | None, tested: str | None) -> str:
    """ok | missing | out of range; without a tested range (an optional package): ok | not installed."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    if not tested:
        return "ok" if installed else "not installed"
    if installed is None:
        return "missing"
    try:
        return "ok" if SpecifierSet(tested).contains(Version(installed), prereleases=True) else "out of range"
    except InvalidVersion:
        return "out of range"


_ARCH = re.compile(r"^(sm|compute)_(\d+)(\d)([af]?)$")
_OLD_GPUS = {5: "Maxwell", 6: "Pascal", 7: "Volta"}


def torch_has_arch(capability: tuple[int, int], arch_list: list[str]) -> tuple[bool, str]:
    """Whether torch's wheel runs on a GPU of this compute capability, and why (or the fix). A GPU runs SASS built for
    its own major version and a minor up to its own (sm_80 runs on 8.6), or JIT-compiles PTX built for any capability
    up to its own (compute_90 on 12.0). An `a` variant (sm_90a) runs on exactly that capability."""
    cap = tuple(capability)
    ptx = None
    for entry in arch_list:
        m = _ARCH.match(entry)
        if not m:
            continue
        kind, built, suffix = m[1], (int(m[2]), int(m[3])), m[4]
        if suffix == "a":  # architecture-specific code: that capability only
            fits = built == cap
        elif kind == "sm":
            fits = built[0] == cap[0] and built[1] <= cap[1]
        else:
            fits = built <= cap
        if fits and kind == "sm":
            return True, f"{entry} kernels run on {cap[0]}.{cap[1]}"
        if fits:
            ptx = entry
    if ptx:
        return True, (f"no sm_{cap[0]}{cap[1]} kernels, but {ptx} PTX is JIT-compiled for {cap[0]}.{cap[1]} "
                      "(slow first launches)")
    have = " ".join(arch_list) or "none"
    if cap < (7, 5):
        generation = _OLD_GPUS.get(cap[0], "this GPU")
        return False, (f"torch's wheel has no kernels for {cap[0]}.{cap[1]} (it has {have}): install the cu126 build "
                       f"of torch, the last that keeps {generation} (pip install torch --index-url "
                       "https://download.pytorch.org/whl/cu126)")
    return False, (f"torch's wheel has no kernels for {cap[0]}.{cap[1]} (it has {have}): install a torch build whose "
                   f"arch list has sm_{cap[0]}{cap[1]} (a build for a newer CUDA)")


@dataclass(frozen=True)
class GPU:
    name: str
    capability: tuple[int, int]
    total_gib: float
    free_gib: float
    bf16_native: bool


@dataclass(frozen=True)
class Machine:
    """The facts profile_verdict decides from."""
    cpu_cores: int
    gpus: tuple[GPU, ...] = ()
    arch_list: tuple[str, ...] = ()  # torch.cuda.get_arch_list()
    no_gpu_why: str = "no GPU"  # why `gpus` is empty
    bnb_4bit: tuple[bool, str] = (True, "")
    flash_attn: tuple[bool, str] = (False, "the flash-attn package is not installed")
    cpu_adam: tuple[bool, str] = (True, "")
    installed: frozenset = frozenset({"torch", "accelerate", "deepspeed", "bitsandbytes"})


@dataclass
class Verdict:
    runnable: bool
    reason: str
    codes: list[str] = field(default_factory=list)  # what is missing: gpu, arch, bf16, flash, bnb, launcher, cpu_adam


def _needs_cpu_adam(profile) -> bool:
    """ZeRO with the optimizer offloaded to the CPU steps with DeepSpeed's compiled CPU Adam."""
    zero = profile.deepspeed_settings().get("zero_optimization", {})
    return (zero.get("offload_optimizer") or {}).get("device") == "cpu"


def _needs_bnb(profile) -> bool:
    from dpo_dist.distributed.backends import BITSANDBYTES_OPTIMIZERS

    return profile.methods == ["qlora"] or (profile.optim or "") in BITSANDBYTES_OPTIMIZERS


def profile_verdict(profile, machine: Machine) -> Verdict:
    """Can `profile` run on this node (one of its num_nodes), and why (not)."""
    missing: list[tuple[str, str]] = []
    if profile.launcher in ("accelerate", "deepspeed") and profile.launcher not in machine.installed:
        missing.append(("launcher", f"its launcher needs the {profile.launcher} package, which is not installed"))
    if _needs_bnb(profile) and not machine.bnb_4bit[0]:
        missing.append(("bnb", f"it needs bitsandbytes, whose 4-bit check failed: {machine.bnb_4bit[1]}"))
    n, precision = profile.num_processes, profile.precision or "the recipe's"
    if profile.device == "cpu":
        cores = machine.cpu_cores
        what = f"{n} CPU process{'es' if n > 1 else ''} on {cores} core{'s' if cores > 1 else ''}"
        if n > cores:
            what += " (oversubscribed: slow)"
        what += f", {precision} precision"
    else:
        if len(machine.gpus) < n:
            has = (f"{len(machine.gpus)} ({_gpu_names(machine.gpus)})" if machine.gpus
                   else f"none ({machine.no_gpu_why})")
            missing.append(("gpu", f"needs {n} GPU{'s' if n > 1 else ''} per node; this machine has {has}"))
        used = machine.gpus[:n]
        for gpu in {g.capability: g for g in used}.values():
            ok, why = torch_has_arch(gpu.capability, list(machine.arch_list))
            if not ok:
                missing.append(("arch", f"{gpu.name}: {why}"))
        if profile.precision == "bf16" and any(not g.bf16_native for g in used):
            missing.append(("bf16", f"bf16 needs native bf16 (Ampere, 8.0+); {_gpu_names(used)} has none: use a fp16 "
                                    "profile such as v100-qlora"))
        attn = "sdpa" if profile.attn_implementation in ("sdpa", "eager") else "flash_attention_2"
        if profile.attn_implementation in ("auto", "flash_attention_2") and used:
            if any(g.capability < (8, 0) for g in used):
                attn = "sdpa"
                if profile.attn_implementation == "flash_attention_2":
                    missing.append(("flash", f"flash_attention_2 needs Ampere (8.0+); {_gpu_names(used)} is older"))
            elif not machine.flash_attn[0]:
                attn = "sdpa"
                if profile.attn_implementation == "flash_attention_2":
                    missing.append(("flash", f"flash_attention_2 is not usable: {machine.flash_attn[1]}"))
        if _needs_cpu_adam(profile) and not machine.cpu_adam[0]:
            missing.append(("cpu_adam", f"ZeRO optimizer offload needs DeepSpeed's CPU Adam: {machine.cpu_adam[1]}"))
        what = f"{n} of {len(machine.gpus)} GPUs ({_gpu_names(used)}), {precision} precision, attention {attn}"
    if profile.num_nodes > 1:
        what += f"; {profile.num_nodes} such nodes needed"
    if missing:
        return Verdict(False, "; ".join(text for _, text in missing), [code for code, _ in missing])
    return Verdict(True, what)


def _gpu_names(gpus) -> str:
    names = [g.name for g in gpus]
    return ", ".join(f"{names.count(n)}× {n}" if names.count(n) > 1 else n for n in dict.fromkeys(names)) or "no GPU"


# ---- facts (each one cheap) --------------------------------------------------------------------------------------

def tested_ranges() -> dict[str, str]:
    """dpo-dist's install_requires (setup.cfg), read from the installed metadata: one source of truth."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    reqs = [Requirement(r) for r in importlib.metadata.requires("dpo-dist") or []]
    return {canonicalize_name(r.name): str(r.specifier) for r in reqs if r.marker is None}


def package_facts() -> dict:
    from packaging.utils import canonicalize_name

    try:
        ranges, note = tested_ranges(), None
    except importlib.metadata.PackageNotFoundError:
        ranges, note = {}, "dpo-dist is not installed (pip install -e .), so its tested ranges are unknown"
    out = {}
    for name in dict.fromkeys([*SHOWN, *ranges]):
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            version = None
        tested = ranges.get(canonicalize_name(name))
        out[name] = {"version": version, "tested": tested, "status": check_package(version, tested)}
    return {"packages": out, "packages_note": note}


def _nvidia_smi() -> tuple[str | None, int]:
    """(driver version, GPUs it lists), or (None, 0) without a working nvidia-smi."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None, 0
    try:
        res = subprocess.run([exe, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return None, 0
    lines = [s.strip() for s in res.stdout.splitlines() if s.strip()] if res.returncode == 0 else []
    return (lines[0] if lines else None), len(lines)


def cuda_facts() -> dict:
    import torch
    import torch.distributed

    driver, smi_gpus = _nvidia_smi()
    available = torch.cuda.is_available()
    source = "nvidia-smi" if driver else None
    # compat: torch-cuda-driver-version
    if driver is None and available and hasattr(torch._C, "_cuda_getDriverVersion"):
        api = torch._C._cuda_getDriverVersion()  # e.g. 12040: the CUDA version the driver supports, not its release
        driver, source = f"CUDA {api // 1000}.{api % 1000 // 10}", "torch (no nvidia-smi)"
    gpus = []
    if available:
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            free, total = torch.cuda.mem_get_info(i)
            with torch.cuda.device(i):
                bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
            gpus.append({"index": i, "name": props.name, "capability": f"{props.major}.{props.minor}",
                         "free_gib": round(free / GIB, 1), "total_gib": round(total / GIB, 1), "bf16_native": bf16})
    arch_list = torch.cuda.get_arch_list() if available else []
    for gpu in gpus:
        gpu["torch_arch_ok"], gpu["torch_arch"] = torch_has_arch(_cap(gpu["capability"]), arch_list)
    if available:
        why = ""
    elif torch.version.cuda is None:
        why = f"torch {torch.__version__} is the CPU build" + (
            f", though nvidia-smi lists {smi_gpus} GPU(s): install the CUDA build of torch" if smi_gpus else "")
    else:
        why = f"torch is built with CUDA {torch.version.cuda} but sees no GPU" + (
            f" (nvidia-smi lists {smi_gpus}; check CUDA_VISIBLE_DEVICES and the driver)" if smi_gpus
            else " (no NVIDIA driver found)")
    nccl = None
    if available and torch.distributed.is_nccl_available():
        nccl = torch.cuda.nccl.version()  # (2, 27, 3); an int in older torch
        nccl = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
    return {"torch_cuda_version": torch.version.cuda, "cuda_available": available, "driver_version": driver,
            "driver_source": source, "nccl_version": nccl, "torch_arch_list": arch_list, "no_gpu_why": why,
            "gpus": gpus}


def _cap(text: str) -> tuple[int, int]:
    major, minor = text.split(".")
    return int(major), int(minor)


def bnb_4bit_check() -> dict:
    """Quantize a tiny weight to NF4 and run the 4-bit matmul QLoRA's layers use, on this machine's device."""
    import torch

    from dpo_dist.distributed.devices import bf16_native

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cpu" or bf16_native() else torch.float16
    result = {"ran": False, "ok": False, "device": device, "dtype": str(dtype).removeprefix("torch."),
              "weight_error_pct": None, "matmul_error_pct": None}
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf

        gen = torch.Generator().manual_seed(0)
        weight = torch.randn(64, 128, generator=gen).to(device, dtype)
        x = torch.randn(4, 128, generator=gen).to(device, dtype)
        packed, state = bnbf.quantize_4bit(weight, quant_type="nf4", blocksize=64)
        dequantized = bnbf.dequantize_4bit(packed, state)
        y = bnb.matmul_4bit(x, packed.t(), quant_state=state)
        ref = x @ dequantized.t()
        if device == "cuda":
            torch.cuda.synchronize()
        result["ran"] = True
        w_err = float((dequantized.float() - weight.float()).norm() / weight.float().norm())
        m_err = float((y.float() - ref.float()).norm() / ref.float().norm())
        result.update(weight_error_pct=round(100 * w_err, 2), matmul_error_pct=round(100 * m_err, 2))
        # NF4 rounds a Gaussian weight by ~9% (norm); the 4-bit kernel must then agree with x @ W_dequantized.
        result["ok"] = w_err < 0.2 and m_err < 0.02
        result["detail"] = (f"NF4 quantize + 4-bit matmul ran on {device} in {result['dtype']}: weight error "
                            f"{result['weight_error_pct']}%, matmul vs dequantized {result['matmul_error_pct']}%")
    except Exception as err:  # a bitsandbytes without a backend for this device fails at import or at the first call
        result["detail"] = error_line(err)
    return result


def flash_facts() -> dict:
    import torch

    from dpo_dist.distributed.devices import flash_attn_status

    ok, why = flash_attn_status(torch.cuda.is_available())
    return {"ok": ok, "detail": why}


def host_facts(out_dir: str) -> dict:
    from dpo_dist.data.cache import cache_home

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    available = None
    with contextlib.suppress(OSError, ValueError, StopIteration):
        line = next(s for s in Path("/proc/meminfo").read_text().splitlines() if s.startswith("MemAvailable:"))
        available = int(line.split()[1]) * 1024
    return {"cpu_cores": cores, "ram_total_gib": round(total / GIB, 1),
            "ram_available_gib": round(available / GIB, 1) if available is not None else None,
            "disk": {"cache": _disk(cache_home()), "out": _disk(Path(out_dir))}}


def _disk(path: Path) -> dict:
    path = path.expanduser().absolute()
    probe = path
    while not probe.exists() and probe != probe.parent:  # a directory a run would create: its first existing parent
        probe = probe.parent
    return {"path": str(path), "free_gib": round(shutil.disk_usage(probe).free / GIB, 1)}


# ---- the report --------------------------------------------------------------------------------------------------

def machine_of(facts: dict) -> Machine:
    return Machine(
        cpu_cores=facts["host"]["cpu_cores"],
        gpus=tuple(GPU(g["name"], _cap(g["capability"]), g["total_gib"], g["free_gib"], g["bf16_native"])
                   for g in facts["cuda"]["gpus"]),
        arch_list=tuple(facts["cuda"]["torch_arch_list"]), no_gpu_why=facts["cuda"]["no_gpu_why"] or "no GPU",
        bnb_4bit=(facts["bnb_4bit"]["ok"], facts["bnb_4bit"]["detail"]),
        flash_attn=(facts["flash_attn"]["ok"], facts["flash_attn"]["detail"]),
        cpu_adam=(facts["deepspeed_cpu_adam"]["ok"], facts["deepspeed_cpu_adam"]["detail"]),
        installed=frozenset(n for n, p in facts["packages"].items() if p["version"]))


def profile_rows(machine: Machine) -> list[dict]:
    from dpo_dist.config.profiles import load_profile, profile_names
    from dpo_dist.config.schema import ConfigError

    rows = []
    for name in profile_names():
        try:
            v = profile_verdict(load_profile(name), machine)
        except ConfigError as err:
            v = Verdict(False, f"the profile does not load: {err}", ["profile"])
        rows.append({"name": name, "runnable": v.runnable, "reason": v.reason, "missing": v.codes})
    return rows


def missing_here(facts: dict) -> list[dict]:
    """What this machine lacks, each with the shipped profiles it rules out."""
    items = []  # (code as in Verdict.codes, what is missing, note)
    for name, p in facts["packages"].items():
        if p["status"] == "missing":
            code = "launcher" if name in ("accelerate", "deepspeed") else "package"
            items.append((code, f"{name} is not installed (tested: {p['tested']})", None))
        elif p["status"] == "out of range":
            items.append(("package", f"{name} {p['version']} is outside the tested range {p['tested']}",
                          "it may work, but the tests never ran with it"))
    cuda = facts["cuda"]
    if not cuda["gpus"]:
        items.append(("gpu", f"no usable GPU: {cuda['no_gpu_why']}", None))
    items += [("arch", f"GPU {g['index']} {g['name']}: {g['torch_arch']}", None)
              for g in cuda["gpus"] if not g["torch_arch_ok"]]
    no_bf16 = [g["name"] for g in cuda["gpus"] if not g["bf16_native"]]
    if no_bf16:
        items.append(("bf16", f"no native bf16 on {', '.join(dict.fromkeys(no_bf16))}", None))
    for code, key, what in (("bnb", "bnb_4bit", "bitsandbytes 4-bit"), ("flash", "flash_attn", "flash-attention"),
                            ("cpu_adam", "deepspeed_cpu_adam", "DeepSpeed CPU Adam")):
        if not facts[key]["ok"]:
            note = "profiles with attention auto use sdpa" if code == "flash" else None
            items.append((code, f"{what}: {facts[key]['detail']}", note))
    return [{"missing": text, "rules_out": [p["name"] for p in facts["profiles"] if code in p["missing"]],
             "note": note} for code, text, note in items]


def collect(out_dir: str = ".", recipe: str | None = None, profile: str | None = None,
            overrides: list[str] | None = None) -> dict:
    start = time.perf_counter()
    # Libraries announce themselves on stdout (DeepSpeed's logger binds sys.stdout when first imported): send that to
    # stderr, so that stdout holds the report alone and `--json` output parses.
    with contextlib.redirect_stdout(sys.stderr):
        import torch

        from dpo_dist.distributed.backends import cpu_adam_facts

        facts = {"torch_version": torch.__version__, **package_facts(), "cuda": cuda_facts(),
                 "bnb_4bit": bnb_4bit_check(), "flash_attn": flash_facts(), "deepspeed_cpu_adam": cpu_adam_facts(),
                 "host": host_facts(out_dir)}
        facts["profiles"] = profile_rows(machine_of(facts))
        facts["missing_here"] = missing_here(facts)
        facts["preflight"] = preflight_verdict(recipe, profile, overrides or []) if recipe else None
    facts["elapsed_s"] = round(time.perf_counter() - start, 1)
    return facts


def preflight_verdict(recipe: str, profile: str, overrides: list[str]) -> dict:
    """What `dpo-dist launch` would say before starting anything: the same dpo_dist.launch.command.preflight call."""
    from dpo_dist.launch.command import preflight
    from dpo_dist.config.profiles import load_profile
    from dpo_dist.config.schema import ConfigError

    try:
        prof = load_profile(profile)
        preflight(recipe, prof, overrides, prof.num_nodes)
    except ConfigError as err:
        return {"recipe": recipe, "profile": profile, "ok": False, "error": " ".join(str(err).splitlines())}
    return {"recipe": recipe, "profile": profile, "ok": True, "error": None}


def render(f: dict) -> str:
    lines = [f"dpo-dist doctor: what this machine can run (checked in {f['elapsed_s']} s)", "",
             "packages (tested ranges: dpo-dist's requirements)"]
    for name in SHOWN:
        p = f["packages"][name]
        lines.append(f"  {name:<14}{p['version'] or '-':<16}{p['tested'] or '(no range)':<16}{p['status']}")
    rest = [n for n in f["packages"] if n not in SHOWN]
    bad = [n for n in rest if f["packages"][n]["status"] != "ok"]
    lines.append(f"  {'others':<14}{', '.join(rest)}: " + (f"NOT OK: {', '.join(bad)}" if bad else "in range"))
    if f["packages_note"]:
        lines.append(f"  {f['packages_note']}")
    c = f["cuda"]
    built = f"CUDA {c['torch_cuda_version']}" if c["torch_cuda_version"] else "no CUDA (CPU build)"
    driver = f"{c['driver_version']} ({c['driver_source']})" if c["driver_version"] else "none found"
    lines += ["", "CUDA", f"  torch built with  {built}", f"  driver            {driver}",
              f"  NCCL              {c['nccl_version'] or '-'}"]
    if not c["gpus"]:
        lines.append(f"  GPUs              none: {c['no_gpu_why']}")
    for g in c["gpus"]:
        lines.append(f"  GPU {g['index']:<13} {g['name']}, {g['capability']}, {g['free_gib']} of {g['total_gib']} GiB "
                     f"free, bf16 {'native' if g['bf16_native'] else 'NOT native'}; "
                     f"{'' if g['torch_arch_ok'] else 'NOT RUNNABLE: '}{g['torch_arch']}")
    lines += ["", "checks"]
    for key, what in (("bnb_4bit", "bitsandbytes 4-bit"), ("flash_attn", "flash-attention"),
                      ("deepspeed_cpu_adam", "DeepSpeed CPU Adam")):
        lines.append(f"  {what:<20}{'ok' if f[key]['ok'] else 'no':<4}{f[key]['detail']}")
    h = f["host"]
    ram = f"{h['ram_available_gib']} GiB available of {h['ram_total_gib']} GiB" if h["ram_available_gib"] is not None \
        else f"{h['ram_total_gib']} GiB"
    lines += ["", "machine", f"  CPU cores         {h['cpu_cores']}", f"  RAM               {ram}",
              f"  disk (cache)      {h['disk']['cache']['free_gib']} GiB free at {h['disk']['cache']['path']}",
              f"  disk (output)     {h['disk']['out']['free_gib']} GiB free at {h['disk']['out']['path']}",
              "", "profiles this machine can run"]
    width = max(len(p["name"]) for p in f["profiles"]) + 2
    lines += [f"  {p['name']:<{width}}{'yes' if p['runnable'] else 'no':<5}{p['reason']}" for p in f["profiles"]]
    if f["missing_here"]:
        lines += ["", "missing here"]
        lines += [f"  {m['missing']}\n    rules out: {', '.join(m['rules_out']) or 'no shipped profile'}"
                  + (f" ({m['note']})" if m["note"] else "") for m in f["missing_here"]]
    if f["preflight"]:
        pf = f["preflight"]
        lines += ["", f"preflight {pf['recipe']} --profile {pf['profile']}: {'ok' if pf['ok'] else pf['error']}"]
    return "\n".join(lines)


def run(args) -> int:
    if bool(args.recipe) != bool(args.profile) or (args.overrides and not args.recipe):
        print("dpo-dist doctor: error: --recipe and --profile go together, and key=value overrides need them",
              file=sys.stderr)
        return 2
    facts = collect(args.out, args.recipe, args.profile, args.overrides)
    from dpo_dist.cli import json_stdout

    print(json.dumps(facts, indent=2) if args.json else render(facts), file=json_stdout(), flush=True)
    if facts["preflight"] and not facts["preflight"]["ok"]:
        print(f"error: {facts['preflight']['error']}", file=sys.stderr)
        return 1
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("doctor", help="what this machine can run: versions, CUDA, GPUs, 4-bit, flash-attention, "
                       "CPU Adam, cores, RAM, disk, and the shipped profiles it can run",
                       description="Exit status 0, also when no GPU is found or some profile cannot run here; 1 only "
                       "when --recipe/--profile is given and its preflight (the checks `dpo-dist launch` makes "
                       "before starting) fails.")
    p.add_argument("overrides", nargs="*", help="with --recipe: key=value overrides, as for launch")
    p.add_argument("--json", action="store_true", help="print the same facts as one JSON object")
    p.add_argument("--out", default=".", metavar="DIR", help="output directory whose free disk to report (default .)")
    p.add_argument("--recipe", help="with --profile: also run the preflight `dpo-dist launch` runs for them")
    p.add_argument("--profile", help="launch profile name (launch/*.yaml) or path, for --recipe")
    p.set_defaults(func=run)
