"""scripts/torch-wheel picks a CUDA build of torch with kernels for the machine's GPUs, and `make install` uses it.

The script runs for real against a fake `nvidia-smi` first on PATH; `make install` runs for real with a fake
`python3 -m venv` whose python only records the pip commands it is given.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "torch-wheel"
URL = "https://download.pytorch.org/whl/"
VERSION = "2.13.0"


def fake_nvidia_smi(bin_dir: Path, caps: list[str], driver_cuda: str | None = "13.0", gpus: bool = True) -> None:
    bin_dir.mkdir(exist_ok=True)
    header = f"| NVIDIA-SMI 580.65.06   Driver Version: 580.65.06   CUDA Version: {driver_cuda}     |" if driver_cuda else \
        "| NVIDIA-SMI 580.65.06   Driver Version: 580.65.06 |"
    script = bin_dir / "nvidia-smi"
    script.write_text(
        "#!/bin/sh\n"
        + ("" if gpus else "echo 'No devices were found' >&2; exit 6\n")
        + 'case "$*" in\n'
        "  -L) echo 'GPU 0: Tesla V100-SXM2-32GB (UUID: GPU-0)';;\n"
        f"  *compute_cap*) printf '%s\\n' {' '.join(caps)};;\n"
        f"  '') echo '{header}';;\n"
        "  *) echo \"unexpected arguments: $*\" >&2; exit 2;;\n"
        "esac\n"
    )
    script.chmod(0o755)


def clean_env(bin_dir: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("TORCH_CUDA", "TORCH_INDEX_URL", "VENV", "MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def torch_wheel(tmp_path: Path, caps: list[str], *args: str, driver_cuda: str | None = "13.0", **env: str):
    bin_dir = tmp_path / "bin"
    fake_nvidia_smi(bin_dir, caps, driver_cuda)
    return subprocess.run([sys.executable, str(SCRIPT), "--torch-version", VERSION, *args],
                          capture_output=True, text=True, env=clean_env(bin_dir, **env), timeout=30)


def assert_refused(done, *words: str) -> str:
    assert done.returncode == 1, done
    assert done.stdout == ""
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("caps, variant", [
    (["7.0"], "cu126"),         # Volta (V100): no kernels in the CUDA 13 builds of torch 2.11+, only in cu126
    (["6.1"], "cu126"),         # Pascal: cu126's sm_60 cubins run on 6.1
    (["7.5"], "cu130"),         # Turing
    (["8.0"], "cu130"),         # Ampere (A100)
    (["8.9"], "cu130"),         # Ada: sm_86 cubins run on 8.9
    (["9.0"], "cu130"),         # Hopper
    (["10.0"], "cu130"),        # Blackwell (B200)
    (["12.0"], "cu130"),        # Blackwell (RTX 50xx)
    (["7.0", "9.0"], "cu126"),  # a V100 next to an H100: only cu126 covers both
    (["9.0", "7.0", "9.0"], "cu126"),
])
def test_variant_covers_every_gpu(tmp_path, caps, variant):
    done = torch_wheel(tmp_path, caps)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"torch=={VERSION} --index-url {URL}{variant}"


def test_driver_without_cuda_13_gets_the_cuda_12_build(tmp_path):
    done = torch_wheel(tmp_path, ["9.0"], driver_cuda="12.4")
    assert done.stdout.strip() == f"torch=={VERSION} --index-url {URL}cu126"


def test_capability_no_build_supports_is_refused(tmp_path):
    line = assert_refused(torch_wheel(tmp_path, ["3.7"]), "no torch 2.13.0 build supports compute capability 3.7")
    assert "starts at 5.0" in line or "start at 5.0" in line


def test_gpus_no_single_build_covers_are_refused(tmp_path):
    assert_refused(torch_wheel(tmp_path, ["7.0", "10.0"]), "no single torch 2.13.0 build", "7.0: cu126",
                   "10.0: cu130", "TORCH_CUDA=")


def test_blackwell_on_a_cuda_12_driver_is_told_to_update_the_driver(tmp_path):
    assert_refused(torch_wheel(tmp_path, ["12.0"], driver_cuda="12.8"), "needs a CUDA 13 build",
                   "supports CUDA 12.8", "driver 580 or newer")


def test_unreadable_compute_capability_is_refused(tmp_path):
    assert_refused(torch_wheel(tmp_path, ["[N/A]"]), "did not report the GPUs' compute capability", "TORCH_CUDA=")


def test_override_by_variant(tmp_path):
    done = torch_wheel(tmp_path, ["9.0"], TORCH_CUDA="cu126")
    assert done.stdout.strip() == f"torch=={VERSION} --index-url {URL}cu126"


def test_override_by_variant_the_release_does_not_have(tmp_path):
    assert_refused(torch_wheel(tmp_path, ["9.0"], TORCH_CUDA="cu128"), "torch 2.13.0 has no cu128 build")


def test_override_by_index_url(tmp_path):
    done = torch_wheel(tmp_path, ["3.7"], TORCH_INDEX_URL="https://mirror.example/whl/cu126")
    assert done.stdout.strip() == f"torch=={VERSION} --index-url https://mirror.example/whl/cu126"


def test_capability_from_the_command_line_needs_no_nvidia_smi(tmp_path):
    env = clean_env(tmp_path / "empty")
    env["PATH"] = "/nonexistent"
    done = subprocess.run([sys.executable, str(SCRIPT), "--torch-version", VERSION, "--compute-cap", "7.0",
                           "--machine", "x86_64"], capture_output=True, text=True, env=env, timeout=30)
    assert done.stdout.strip() == f"torch=={VERSION} --index-url {URL}cu126", done.stderr


def test_aarch64_table(tmp_path):
    # Grace Hopper: both builds have Hopper kernels on aarch64; a Turing card has none in either.
    done = torch_wheel(tmp_path, ["9.0"], "--machine", "aarch64")
    assert done.stdout.strip() == f"torch=={VERSION} --index-url {URL}cu130"
    assert_refused(torch_wheel(tmp_path, ["7.5"], "--machine", "aarch64"), "compute capability 7.5")


# --- make install -------------------------------------------------------------------------------------------

def make_install(tmp_path: Path, caps: list[str], gpus: bool = True, **make_vars: str):
    """Run the real `make install` with a fake nvidia-smi and a fake venv; return (result, pip commands)."""
    bin_dir = tmp_path / "bin"
    fake_nvidia_smi(bin_dir, caps, gpus=gpus)
    venv = tmp_path / "venv"
    # `python3 -m venv DIR` makes a DIR/bin/python that logs its arguments; every other python3 call is the real one.
    python3 = bin_dir / "python3"
    python3.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = -m ] && [ "$2" = venv ]; then\n'
        '  mkdir -p "$3/bin"\n'
        '  printf \'#!/bin/sh\\necho "$*" >> "%s/pip.log"\\n\' "$3" > "$3/bin/python"\n'
        '  chmod +x "$3/bin/python"; exit 0\n'
        "fi\n"
        f'exec "{sys.executable}" "$@"\n'
    )
    python3.chmod(0o755)
    args = ["make", "--no-print-directory", "-C", str(REPO), "install", f"VENV={venv}"]
    args += [f"{k}={v}" for k, v in make_vars.items()]
    done = subprocess.run(args, capture_output=True, text=True, env=clean_env(bin_dir), timeout=60)
    log = venv / "pip.log"
    return done, (log.read_text().splitlines() if log.exists() else [])


def test_make_install_on_a_v100_installs_the_cu126_build(tmp_path):
    done, pip = make_install(tmp_path, ["7.0"])
    assert done.returncode == 0, done.stdout + done.stderr
    assert pip[0] == f"-m pip install torch=={VERSION} --index-url {URL}cu126"
    assert pip[1] == "-m pip install -e .[test,tensorboard,mlflow,wandb,serve]"
    assert (tmp_path / "venv" / ".installed").exists()


def test_make_install_passes_the_override(tmp_path):
    done, pip = make_install(tmp_path, ["9.0"], TORCH_CUDA="cu126")
    assert done.returncode == 0, done.stdout + done.stderr
    assert pip[0] == f"-m pip install torch=={VERSION} --index-url {URL}cu126"


def test_make_install_stops_where_no_build_fits(tmp_path):
    done, pip = make_install(tmp_path, ["3.7"])
    assert done.returncode != 0
    assert "no torch 2.13.0 build supports compute capability 3.7" in done.stderr
    assert "Traceback" not in done.stderr
    assert pip == []  # nothing installed, no .installed stamp
    assert not (tmp_path / "venv" / ".installed").exists()


def test_make_install_without_a_gpu_keeps_the_cpu_build(tmp_path):
    done, pip = make_install(tmp_path, ["7.0"], gpus=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"no NVIDIA GPU: installing the CPU build of torch {VERSION}" in done.stdout
    assert pip[0] == f"-m pip install torch=={VERSION}"
