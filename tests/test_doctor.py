"""`dpo-dist doctor`: the real command on this machine, and its decisions on the facts of machines we do not have."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dpo_dist.commands.doctor import GPU, Machine, check_package, preflight_verdict, profile_verdict, torch_has_arch
from dpo_dist.config.profiles import load_profile, profile_names

ROOT = Path(__file__).resolve().parent.parent
DPO_DIST = Path(sys.executable).parent / "dpo-dist"  # the installed console script of this venv
CPU_PROFILES = [n for n in profile_names() if load_profile(n).device == "cpu"]
GPU_PROFILES = [n for n in profile_names() if load_profile(n).device == "gpu"]


def _model_dir(path: Path) -> Path:
    """What the preflight accepts as a model directory (demo.yaml's own, demo-out/base, exists after the demo)."""
    (path / "config.json").write_text("{}")
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One launch each, started together: text with a passing preflight, --json, and a failing preflight."""
    out = tmp_path_factory.mktemp("doctor-out") / "not-yet-created"
    model = _model_dir(tmp_path_factory.mktemp("doctor-model"))
    commands = {
        "text": ["doctor", "--recipe", "configs/recipes/demo.yaml", "--profile", "cpu", f"model.name_or_path={model}"],
        "json": ["doctor", "--json", "--out", str(out)],
        # demo.yaml pretrains with full parameters, which the QLoRA-only 8-GPU profile refuses
        "fail": ["doctor", "--recipe", "configs/recipes/demo.yaml", "--profile", "8xh100-fsdp-qlora"],
    }
    assert DPO_DIST.is_file(), f"{DPO_DIST} missing: pip install -e ."
    procs = {k: subprocess.Popen([str(DPO_DIST), *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True) for k, args in commands.items()}
    done = {k: (p.communicate(timeout=180), p.returncode) for k, p in procs.items()}
    return {k: {"stdout": o, "stderr": e, "rc": rc} for k, ((o, e), rc) in done.items()} | {"out": out}


@pytest.fixture(scope="module")
def facts(runs):
    assert runs["json"]["rc"] == 0, runs["json"]["stderr"][-2000:]
    return json.loads(runs["json"]["stdout"])  # stdout is the JSON object alone


@pytest.mark.slow
def test_json_reports_this_machine(facts, runs):
    import torch

    assert facts["packages"]["torch"]["version"] == torch.__version__ == facts["torch_version"]
    assert facts["packages"]["torch"]["tested"] == ">=2.4" and facts["packages"]["torch"]["status"] == "ok"
    assert facts["packages"]["deepspeed"]["tested"] == "<0.20,>=0.19"
    assert facts["cuda"]["torch_cuda_version"] == torch.version.cuda
    assert facts["cuda"]["cuda_available"] == torch.cuda.is_available()
    assert len(facts["cuda"]["gpus"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert facts["host"]["cpu_cores"] == len(os.sched_getaffinity(0))
    assert facts["host"]["ram_total_gib"] > 0
    assert facts["host"]["disk"]["out"]["path"] == str(runs["out"]) and facts["host"]["disk"]["out"]["free_gib"] > 0
    assert facts["preflight"] is None
    assert facts["elapsed_s"] < 60


@pytest.mark.slow
def test_the_4bit_check_really_ran(facts):
    bnb = facts["bnb_4bit"]
    assert bnb["ran"] and bnb["ok"], bnb
    assert 1 < bnb["weight_error_pct"] < 20  # NF4 really rounded the weight
    assert bnb["matmul_error_pct"] < 2


@pytest.mark.slow
def test_profiles_on_this_machine(facts):
    rows = {p["name"]: p for p in facts["profiles"]}
    assert sorted(rows) == profile_names()
    for name in CPU_PROFILES:
        assert rows[name]["runnable"], rows[name]
        assert f"{load_profile(name).num_processes} CPU process" in rows[name]["reason"]
    if not facts["cuda"]["gpus"]:
        for name in GPU_PROFILES:
            assert not rows[name]["runnable"] and "GPU" in rows[name]["reason"], rows[name]
            assert "gpu" in rows[name]["missing"]
        no_gpu = next(m for m in facts["missing_here"] if m["missing"].startswith("no usable GPU"))
        assert sorted(no_gpu["rules_out"]) == sorted(GPU_PROFILES)


@pytest.mark.slow
def test_text_screen(runs):
    import torch

    run = runs["text"]
    assert run["rc"] == 0, run["stderr"][-2000:]
    lines = run["stdout"].splitlines()
    torch_line = next(line for line in lines if line.split()[:1] == ["torch"])
    assert torch_line.split()[1] == torch.__version__ and torch_line.split()[-1] == "ok"
    assert any(line.startswith("  bitsandbytes 4-bit  ok") for line in lines)
    for name in profile_names():
        verdict = next(line.split()[1] for line in lines if line.split()[:1] == [name])
        if name in CPU_PROFILES or not torch.cuda.is_available():
            assert verdict == ("yes" if name in CPU_PROFILES else "no"), (name, verdict)
    assert lines[-1] == "preflight configs/recipes/demo.yaml --profile cpu: ok"


@pytest.mark.slow
def test_a_failing_preflight_exits_1_with_one_error_line(runs):
    run = runs["fail"]
    assert run["rc"] == 1
    assert "Traceback" not in run["stderr"]
    errors = [line for line in run["stderr"].splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "method full is not supported by profile 8xh100-fsdp-qlora" in errors[0]
    assert run["stdout"].splitlines()[-1].startswith("preflight configs/recipes/demo.yaml --profile 8xh100-fsdp-qlora: "
                                                     "stages.pretrain: method full")


def test_preflight_verdict_is_launchs_own(tmp_path):
    model = [f"model.name_or_path={_model_dir(tmp_path)}"]
    assert preflight_verdict("configs/recipes/demo.yaml", "cpu", model) == {
        "recipe": "configs/recipes/demo.yaml", "profile": "cpu", "ok": True, "error": None}
    bad = preflight_verdict("configs/recipes/demo.yaml", "cpu", ["train.learning_rat=1"])
    assert not bad["ok"] and "learning_rat: unknown key; did you mean" in bad["error"] and "\n" not in bad["error"]
    assert "not found" in preflight_verdict("configs/recipes/demo.yaml", "no-such-profile", [])["error"]


def test_usage_errors_are_not_preflight_failures(capsys):
    from dpo_dist.cli import main

    assert main(["doctor", "--profile", "cpu"]) == 2
    assert "--recipe and --profile go together" in capsys.readouterr().err


# ---- pure decisions ----------------------------------------------------------------------------------------------

def test_check_package():
    assert check_package("2.13.0+cpu", ">=2.4") == "ok"
    assert check_package("0.19.8", "<0.20,>=0.19") == "ok"
    assert check_package("0.20.1", "<0.20,>=0.19") == "out of range"
    assert check_package("4.57.0", "<6,>=5.0") == "out of range"
    assert check_package("6.0.0rc1", "<6,>=5.0") == "out of range"
    assert check_package(None, ">=2.4") == "missing"
    assert check_package(None, None) == "not installed"
    assert check_package("2.8.3", None) == "ok"


CU126 = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]
CU128 = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120"]


@pytest.mark.parametrize("cap, arch, ok, said", [
    ((9, 0), CU128, True, "sm_90 kernels"),
    ((8, 9), CU128, True, "sm_80 kernels"),  # the same major, a lower minor: L40S / RTX 4090 on sm_80/86
    ((8, 6), ["sm_80"], True, "sm_80 kernels"),
    ((8, 0), ["sm_86"], False, "sm_80"),  # a higher minor does not run on a lower one
    ((7, 0), CU126, True, "sm_70 kernels"),
    ((7, 0), CU128, False, "install the cu126 build of torch, the last that keeps Volta"),
    ((6, 1), CU128, False, "cu126"),
    ((12, 0), CU126 + ["compute_90"], True, "compute_90 PTX"),
    ((12, 0), CU126, False, "sm_120"),
    ((9, 0), ["sm_80", "sm_90a"], True, "sm_90a"),
    ((10, 0), ["sm_80", "sm_90a"], False, "sm_100"),  # sm_90a runs on 9.0 only
])
def test_torch_has_arch(cap, arch, ok, said):
    got, why = torch_has_arch(cap, arch)
    assert got is ok and said in why, why


H100 = GPU("NVIDIA H100 80GB HBM3", (9, 0), 79.1, 78.5, True)
V100 = GPU("Tesla V100-SXM2-32GB", (7, 0), 31.7, 31.4, False)
A100 = GPU("NVIDIA A100-SXM4-80GB", (8, 0), 79.2, 78.9, True)
H100_NODE = Machine(cpu_cores=192, gpus=(H100,) * 8, arch_list=tuple(CU128), flash_attn=(True, "flash-attn runs"))
V100_BOX = Machine(cpu_cores=16, gpus=(V100,), arch_list=tuple(CU126))
CPU_BOX = Machine(cpu_cores=2, no_gpu_why="torch 2.13.0+cpu is the CPU build")


def verdicts(machine: Machine) -> dict:
    return {name: profile_verdict(load_profile(name), machine) for name in profile_names()}


def test_an_8xh100_node_runs_every_profile():
    for name, v in verdicts(H100_NODE).items():
        assert v.runnable, (name, v.reason)
    v = profile_verdict(load_profile("8xh100-fsdp-qlora"), H100_NODE)
    assert "8 of 8 GPUs (8× NVIDIA H100 80GB HBM3), bf16 precision, attention flash_attention_2" == v.reason
    one = profile_verdict(load_profile("1gpu-bf16"), H100_NODE)
    assert one.reason.startswith("1 of 8 GPUs (NVIDIA H100 80GB HBM3)")


def test_a_v100_runs_only_the_v100_and_cpu_profiles():
    got = verdicts(V100_BOX)
    assert {n for n, v in got.items() if v.runnable} == {"v100-qlora", *CPU_PROFILES}
    assert "attention sdpa" in got["v100-qlora"].reason
    assert "native bf16" in got["1gpu-bf16"].reason and "Tesla V100" in got["1gpu-bf16"].reason
    assert got["1gpu-bf16"].codes == ["bf16"]
    assert "needs 8 GPUs per node; this machine has 1 (Tesla V100-SXM2-32GB)" in got["8xh100-zero3"].reason
    # torch's cu128 wheels dropped Volta: the same box with one of them runs no GPU profile, and says which to install
    cu128 = verdicts(Machine(cpu_cores=16, gpus=(V100,), arch_list=tuple(CU128)))
    assert not cu128["v100-qlora"].runnable and "arch" in cu128["v100-qlora"].codes
    assert "install the cu126 build of torch, the last that keeps Volta" in cu128["v100-qlora"].reason


def test_this_cpu_box_runs_the_cpu_profiles_only():
    got = verdicts(CPU_BOX)
    for name in CPU_PROFILES:
        assert got[name].runnable, (name, got[name].reason)
    for name in GPU_PROFILES:
        assert not got[name].runnable and got[name].codes == ["gpu"]
        assert "this machine has none (torch 2.13.0+cpu is the CPU build)" in got[name].reason
    assert got["cpu-ddp-2"].reason == "2 CPU processes on 2 cores, fp32 precision"
    one_core = profile_verdict(load_profile("cpu-ddp-2"), Machine(cpu_cores=1))
    assert one_core.runnable and "oversubscribed" in one_core.reason


def test_missing_pieces_rule_out_the_profiles_that_need_them():
    no_bnb = verdicts(Machine(cpu_cores=2, bnb_4bit=(False, "RuntimeError: no backend")))
    assert {n for n, v in no_bnb.items() if "bnb" in v.codes and n in CPU_PROFILES} == {
        "cpu-fsdp-qlora-2", "cpu-zero3-qlora-2"}
    assert no_bnb["cpu"].runnable and "no backend" in no_bnb["cpu-fsdp-qlora-2"].reason
    no_adam = verdicts(Machine(cpu_cores=192, gpus=(H100,) * 8, arch_list=tuple(CU128),
                               cpu_adam=(False, "no ninja")))
    assert {n for n, v in no_adam.items() if not v.runnable} == {"8xh100-zero3-offload"}
    assert no_adam["8xh100-zero3-offload"].codes == ["cpu_adam"]
    no_ds = verdicts(Machine(cpu_cores=2, installed=frozenset({"torch", "accelerate", "bitsandbytes"})))
    assert {n for n, v in no_ds.items() if "launcher" in v.codes} == {
        n for n in profile_names() if load_profile(n).launcher == "deepspeed"}


def test_flash_attention_2_profiles_need_ampere_and_a_working_flash_attn(tmp_path):
    path = tmp_path / "a100-flash.yaml"
    path.write_text("launcher: python\nnum_processes: 1\nprecision: bf16\nattn_implementation: flash_attention_2\n")
    profile = load_profile(str(path))
    ampere_flash = Machine(cpu_cores=8, gpus=(A100,), arch_list=tuple(CU128), flash_attn=(True, "runs"))
    assert profile_verdict(profile, ampere_flash).runnable
    broken = Machine(cpu_cores=8, gpus=(A100,), arch_list=tuple(CU128), flash_attn=(False, "undefined symbol"))
    assert profile_verdict(profile, broken).codes == ["flash"]
    volta = profile_verdict(profile, Machine(cpu_cores=8, gpus=(V100,), arch_list=tuple(CU126)))
    assert set(volta.codes) == {"bf16", "flash"} and "needs Ampere" in volta.reason


def test_cuda_facts_of_a_mixed_gpu_box(monkeypatch):
    # The GPU branch of the fact gathering, on torch.cuda answers of an H100 + V100 box with a cu128 wheel.
    import contextlib

    import torch

    from dpo_dist.commands import doctor

    props = [("NVIDIA H100 80GB HBM3", 9, 0), ("Tesla V100-SXM2-32GB", 7, 0)]
    current = [0]

    @contextlib.contextmanager
    def device(i):
        current[0] = i
        yield

    monkeypatch.setattr(doctor, "_nvidia_smi", lambda: ("570.86.15", 2))
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    for name, value in {
        "is_available": lambda: True, "device_count": lambda: 2, "device": device,
        "get_device_properties": lambda i: type("P", (), dict(zip(("name", "major", "minor"), props[i])))(),
        "mem_get_info": lambda i: (70 * doctor.GIB, 80 * doctor.GIB),
        "is_bf16_supported": lambda including_emulation=True: props[current[0]][1] >= 8 or including_emulation,
        "get_arch_list": lambda: CU128,
    }.items():
        monkeypatch.setattr(torch.cuda, name, value)
    monkeypatch.setattr(torch.cuda.nccl, "version", lambda: (2, 27, 3))
    monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: True)
    cuda = doctor.cuda_facts()
    assert (cuda["driver_version"], cuda["driver_source"]) == ("570.86.15", "nvidia-smi")
    assert cuda["nccl_version"] == "2.27.3"
    h100, v100 = cuda["gpus"]
    assert (h100["capability"], h100["free_gib"], h100["total_gib"], h100["bf16_native"]) == ("9.0", 70.0, 80.0, True)
    assert h100["torch_arch_ok"] and not v100["bf16_native"]
    assert not v100["torch_arch_ok"] and "cu126" in v100["torch_arch"]
    machine = doctor.machine_of({"host": {"cpu_cores": 32}, "cuda": cuda, "bnb_4bit": {"ok": True, "detail": ""},
                                 "flash_attn": {"ok": True, "detail": ""},
                                 "deepspeed_cpu_adam": {"ok": True, "detail": ""},
                                 "packages": {"accelerate": {"version": "1.15.0"}}})
    v = profile_verdict(load_profile("v100-qlora"), machine)  # it takes the first GPU, the H100
    assert v.runnable and "NVIDIA H100" in v.reason
    assert profile_verdict(load_profile("8xh100-zero3"), machine).codes == ["launcher", "gpu", "arch", "bf16"]


def test_missing_here_names_what_each_gap_rules_out():
    from dpo_dist.commands.doctor import missing_here

    ok = {"ok": True, "detail": ""}
    facts = {"packages": {"deepspeed": {"version": None, "tested": "<0.20,>=0.19", "status": "missing"},
                          "trl": {"version": "0.9.0", "tested": "<2,>=1.16", "status": "out of range"},
                          "torch": {"version": "2.13.0", "tested": ">=2.4", "status": "ok"}},
             "cuda": {"gpus": [], "no_gpu_why": "torch 2.13.0+cpu is the CPU build"},
             "bnb_4bit": {"ok": False, "detail": "RuntimeError: no backend"}, "flash_attn": ok,
             "deepspeed_cpu_adam": ok,
             "profiles": [{"name": "cpu-zero3-2", "missing": ["launcher"]},
                          {"name": "cpu-fsdp-qlora-2", "missing": ["bnb"]},
                          {"name": "1gpu-bf16", "missing": ["gpu"]}, {"name": "cpu", "missing": []}]}
    got = {m["missing"]: m["rules_out"] for m in missing_here(facts)}
    assert got == {"deepspeed is not installed (tested: <0.20,>=0.19)": ["cpu-zero3-2"],
                   "trl 0.9.0 is outside the tested range <2,>=1.16": [],
                   "no usable GPU: torch 2.13.0+cpu is the CPU build": ["1gpu-bf16"],
                   "bitsandbytes 4-bit: RuntimeError: no backend": ["cpu-fsdp-qlora-2"]}
