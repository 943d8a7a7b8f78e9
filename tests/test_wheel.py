"""The product as a user installs it: the wheel, installed into a fresh virtualenv (not editable), run from an empty
directory. Profiles, configs, recipes, sbatch scripts and the demo data must come from the package itself."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.e2e


def _run(cmd, cwd, env=None, timeout=1200):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_the_wheel_installed_in_a_fresh_venv_runs_from_an_empty_directory(tmp_path):
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(REPO)],
         tmp_path)
    wheel = next(wheels.glob("dpo_dist-*.whl"))
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path)
    py, exe = venv / "bin" / "python", venv / "bin" / "dpo-dist"
    # The dependencies come from this environment's site-packages (no network), appended by a .pth line; its own
    # .pth files (the clone's editable install) are not run from there, so dpo-dist itself comes only from the wheel.
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path).stdout.strip())
    deps = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    (site / "_dpo_dist_test_deps.pth").write_text("\n".join(deps) + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", str(wheel)], tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", PYTHONNOUSERSITE="1")
    where = _run([str(py), "-c", "import dpo_dist; print(dpo_dist.__file__)"], empty, env).stdout.strip()
    assert str(venv) in where and str(REPO) not in where, where  # the installed copy, not the clone

    listed = _run([str(exe), "profiles"], empty, env).stdout
    shipped = sorted(p.stem for p in (REPO / "dpo_dist" / "resources" / "launch").glob("*.yaml"))
    assert len(shipped) >= 16
    for name in shipped:
        assert name in listed, f"{name} missing from `dpo-dist profiles`:\n{listed}"

    cmd = _run([str(exe), "launch", "qwen2.5-7b-sft-dpo-qlora", "--profile", "8xh100-fsdp-qlora", "--dry-run"],
               empty, env).stdout
    assert "accelerate" in cmd and "--config_file" in cmd and "-m dpo_dist.train" in cmd, cmd
    config = cmd.split("--config_file")[1].split()[0]
    assert Path(config).is_file() and str(venv) in config, config  # the accelerate file from the installed package

    _run([str(exe), "init", "mine", "--profile", "8xh100-zero3-qlora"], empty, env)
    assert (empty / "mine" / "configs" / "deepspeed" / "zero3.json").is_file()

    out = empty / "demo-out"
    _run([str(exe), "demo", "--out", str(out)], empty, env)
    results = json.loads((out / "demo_results.json").read_text())["results"]
    assert set(results) == {"base", "sft", "dpo"}
    assert results["dpo"]["preference_accuracy"] > results["base"]["preference_accuracy"]
