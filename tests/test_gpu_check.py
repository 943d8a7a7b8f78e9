"""scripts/gpu-check.sh and dpo_dist.bench.gpu_check on the CPU: the dry run (and what it names when something is
missing), the no-GPU refusal, the CPU modes of the compact-head and NF4 steps (really run), and the report."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dpo_dist.bench import gpu_check
from tests.helpers import free_port

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu-check.sh"
PY = sys.executable


def _script(*args, env=None, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=ROOT)


def _module(*args) -> list[str]:
    return [PY, "-m", "dpo_dist.bench.gpu_check", *args]


@pytest.mark.slow
def test_dry_run_checks_everything_and_prints_the_plan(tmp_path):
    proc = _script("--dry-run", "--out", str(tmp_path / "out"), "--python", PY)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "gpu-check --dry-run: OK" in out
    timeouts = [int(t) for t in re.findall(r"\[timeout (\d+) s\]", out)]
    assert len(timeouts) == len(gpu_check.STEPS) == 9
    total = int(re.search(r"timeouts sum to (\d+) s", out).group(1))
    assert total == sum(timeouts) < 540
    for i, (name, _sub, timeout, _title) in enumerate(gpu_check.STEPS, 1):
        assert f"{i}. {name} [timeout {timeout} s]" in out
    # the commands, in order: doctor, the two 1-rank torchrun steps, the launches with their profiles and overrides
    assert out.index("doctor --device cuda") < out.index("bnb-fsdp2 --device cuda") < out.index("compact-head")
    assert out.count("torchrun --nproc_per_node=1") == 2
    for text in ("--profile 1gpu-bf16 --padding-free true,false", "--profile v100-qlora",
                 "--profile 8xh100-fsdp-qlora", "--profile 8xh100-zero3-qlora",
                 "stages.dpo.train.padding_free=true", "stages.dpo.train.padding_free=false",
                 "bin/accelerate launch --config_file", "--num_processes 1", "bin/deepspeed --num_gpus 1",
                 "-m dpo_dist.train", "dpo-dist bench --workload dpo", "--logits-vocab 151936",
                 "--logits-hidden 896", "configs/accelerate/8xh100-fsdp-qlora.yaml", "configs/deepspeed/zero3.json"):
        assert text in out, text
    assert "missing" not in out.replace("all commands", "")


def test_dry_run_fails_naming_each_missing_item(tmp_path):
    # A Python without the launchers beside it, and a recipe that does not exist.
    bare = tmp_path / "bare-bin"
    bare.mkdir()
    wrapper = bare / "python"
    wrapper.write_text(f'#!/bin/sh\nexec "{PY}" "$@"\n')
    wrapper.chmod(0o755)
    recipe = tmp_path / "no-such-recipe.yaml"
    proc = _script("--dry-run", "--out", str(tmp_path / "out"), "--python", str(wrapper), "--recipe", str(recipe))
    out = proc.stdout
    assert proc.returncode == 1, out + proc.stderr
    assert "gpu-check --dry-run: FAILED" in out
    for tool in ("accelerate", "deepspeed", "torchrun", "dpo-dist"):
        assert f"launcher: {bare / tool}" in out, tool
    assert f"recipe {recipe}" in out
    assert "module:" not in out  # the module itself answered every --help


def test_without_a_gpu_it_refuses_at_once_pointing_at_dry_run(tmp_path):
    out = tmp_path / "out"
    proc = _script("--out", str(out), env={"CUDA_VISIBLE_DEVICES": ""}, timeout=30)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs one" in lines[0] and "--dry-run" in lines[0], proc.stderr
    assert not out.exists()


def _head_args(out: Path):
    return gpu_check.build_parser().parse_args(["compact-head", "--device", "cpu", "--out", str(out)])


@pytest.mark.distributed
def test_cpu_modes_of_the_compact_head_and_nf4_steps_run_and_pass(tmp_path, monkeypatch):
    # NF4 on a real 1-rank gloo group started by torchrun, while the compact head runs here (both mostly import).
    nf4_out = tmp_path / "nf4.json"
    nf4 = subprocess.Popen([str(Path(PY).parent / "torchrun"), "--nproc_per_node=1", "--nnodes=1",
                            "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "dpo_dist.bench.gpu_check",
                            "nf4-fsdp2", "--device", "cpu", "--out", str(nf4_out), "--work", str(tmp_path / "work")],
                           env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        head = gpu_check.run_step(_head_args(tmp_path / "head.json"))
        assert head["status"] == "pass", head
        assert json.loads((tmp_path / "head.json").read_text())["status"] == "pass"
        shape = head["details"]["shape"]
        assert shape["vocab"] % shape["vocab_chunk"] == shape["last_tile_width"] != 0  # a partial last tile
        assert set(head["details"]["dtypes"]) == {"fp32", "bf16"}
        for entry in head["details"]["dtypes"].values():
            for key in ("logps", "grad_hidden", "grad_weight"):
                assert entry[key]["ok"] and 0 < entry[key]["max_abs_err"] <= entry[key]["tolerance"], (key, entry)
            assert entry["logps"]["max_abs_err"] <= entry["logps"]["analytic_bound"]
        fp32, bf16 = head["details"]["dtypes"]["fp32"], head["details"]["dtypes"]["bf16"]
        assert fp32["logps"]["max_abs_err"] < 1e-4 < bf16["logps"]["max_abs_err"]  # the dtype really changed

        # ... and the step can fail: log-probs 0.1% too large are far outside fp32's tolerance.
        import dpo_dist.training.dpo.logps as logps

        original = logps.completion_logps

        def off_by_a_little(*args, **kwargs):
            out = original(*args, **kwargs)
            return (out[0] * 1.001, *out[1:])

        monkeypatch.setattr(logps, "completion_logps", off_by_a_little)
        off = gpu_check.run_step(_head_args(tmp_path / "off.json"))
        assert off["status"] == "fail" and "OUT OF TOLERANCE" in off["summary"]
        assert not off["details"]["dtypes"]["fp32"]["logps"]["ok"]
    finally:
        log = nf4.communicate(timeout=120)[0]
    assert nf4.returncode == 0, log[-4000:]
    result = json.loads(nf4_out.read_text())
    assert result["status"] == "pass", result
    d = result["details"]
    assert d["quantized_params"] == 14 and d["storage_dtype"] == ["bfloat16"]  # 2 layers × 7 projections
    assert d["packed_bytes"] == 2 * 128 * (128 + 64 + 64 + 128 + 3 * 384) // 2  # 4 bits per weight
    assert d["bytes_equal_after_gather"] and d["param_types_after_fully_shard"] == ["DTensor"]
    assert d["logits_max_abs_diff"] <= d["logits_tolerance"]


def test_memory_hook_wraps_the_model_loader_only_when_asked(tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(gpu_check.HOOK)
    env = {**os.environ, "PYTHONPATH": f"{hook}{os.pathsep}{ROOT}"}
    env.pop(gpu_check.MEMLOG_ENV, None)
    code = "import dpo_dist.models.loading as m; print(m.load_model.__qualname__)"
    wrapped = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=60,
                             env={**env, gpu_check.MEMLOG_ENV: str(tmp_path / "mem.jsonl")})
    assert wrapped.returncode == 0, wrapped.stderr[-2000:]
    assert wrapped.stdout.strip() == "install_memory_hook.<locals>.patch_models.<locals>.load_model"
    plain = subprocess.run([PY, "-c", "import sys, sitecustomize; print('dpo_dist.bench.gpu_check' in sys.modules)"],
                           capture_output=True, text=True, timeout=30, env=env)
    assert plain.stdout.strip() == "False", plain.stderr


def test_report_assembles_json_and_markdown_from_step_results(tmp_path):
    steps, logs = tmp_path / "steps", tmp_path / "logs"
    steps.mkdir()
    logs.mkdir()
    names = [s[0] for s in gpu_check.STEPS]

    def result(name, status, summary, **details):
        (steps / f"{name}.json").write_text(json.dumps({"name": name, "status": status, "summary": summary,
                                                        "details": details, "seconds": 1.0}))
        (steps / f"{name}.exit").write_text(json.dumps({"rc": 0 if status != "fail" else 1, "seconds": 2.5,
                                                        "timeout_s": 30}))

    result(names[0], "pass", "doctor reports no problem", doctor={"cuda": {}})
    result(names[1], "pass", "refusal still needed: NotImplementedError", known_error=True)
    result(names[2], "fail", "OUT OF TOLERANCE: bf16 | logps 1e-1")
    (steps / f"{names[3]}.exit").write_text(json.dumps({"rc": 124, "seconds": 40.0, "timeout_s": 40}))
    (logs / f"{names[3]}.log").write_text("loading\nstill loading\n")
    (steps / f"{names[4]}.exit").write_text(json.dumps({"skipped": "--skip qlora-chain"}))

    rc = gpu_check.main(["report", "--out", str(tmp_path)])
    assert rc == 1  # a step failed
    report = json.loads((tmp_path / "report.json").read_text())
    by_name = {s["name"]: s for s in report["steps"]}
    assert [s["name"] for s in report["steps"]] == names
    assert by_name[names[0]]["status"] == "pass" and by_name[names[0]]["seconds"] == 2.5
    assert by_name[names[1]]["details"]["known_error"] is True
    assert by_name[names[2]]["status"] == "fail"
    assert by_name[names[3]]["status"] == "fail" and "timed out after 40 s" in by_name[names[3]]["summary"]
    assert "still loading" in by_name[names[3]]["details"]["log_tail"]
    assert by_name[names[4]]["status"] == "skip"
    assert all(by_name[n]["status"] == "skip" for n in names[5:])
    assert report["counts"] == {"pass": 2, "fail": 2, "skip": 5}
    for entry in report["steps"]:
        assert set(entry) >= {"name", "status", "seconds", "details", "log"}
    md = (tmp_path / "report.md").read_text()
    assert "2 pass, 2 fail, 5 skip" in md
    assert f"| 4 | {names[3]} | fail | 40.0 | timed out after 40 s |" in md
    assert "OUT OF TOLERANCE: bf16 \\| logps" in md  # a pipe in a summary does not break the table
    assert md.count("\n## ") == len(names)
