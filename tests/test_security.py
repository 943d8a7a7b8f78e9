"""Security defaults: no remote code unless asked (and a warning when asked), safetensors for every weight the
product writes, no unsafe unpickling, no shell, and user paths that are passed as data, never as code."""
from __future__ import annotations

import ast
import pickle
import re
import subprocess

import pytest
import torch

from dpo_dist.config.recipe import recipe_from_dict
from tests.helpers import BIN, ROOT, write_recipe

HOSTILE = "we'ird \"dir\" $(touch pwned) `touch pwned2`"


def _product_sources():
    files = sorted((ROOT / "dpo_dist").rglob("*.py")) + sorted((ROOT / "scripts").rglob("*.py"))
    assert len(files) > 20
    return files


def _call_name(node: ast.Call) -> str:
    parts, f = [], node.func
    while isinstance(f, ast.Attribute):
        parts.append(f.attr)
        f = f.value
    if isinstance(f, ast.Name):
        parts.append(f.id)
    return ".".join(reversed(parts))


def test_no_shell_no_unsafe_loading_in_product_code():
    found = []
    for path in _product_sources():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            name, where = _call_name(node), f"{path.relative_to(ROOT)}:{node.lineno}"
            kwargs = {k.arg: k.value for k in node.keywords}
            if "shell" in kwargs and not (isinstance(kwargs["shell"], ast.Constant) and kwargs["shell"].value is False):
                found.append(f"{where}: {name}(shell=...)")
            if name in ("os.system", "os.popen", "subprocess.getoutput", "subprocess.getstatusoutput", "eval", "exec",
                        "pickle.load", "pickle.loads", "yaml.load", "yaml.unsafe_load"):
                found.append(f"{where}: {name}()")
            if name == "torch.load":
                wo = kwargs.get("weights_only")
                if not (isinstance(wo, ast.Constant) and wo.value is True):
                    found.append(f"{where}: torch.load without weights_only=True")
    assert not found, "\n".join(found)


class _Payload:
    def __reduce__(self):
        return (print, ("code ran while loading",))


def test_torch_load_refuses_pickled_code_by_default(tmp_path):
    # Every torch.load in the stack (transformers' optimizer/RNG state, peft's .bin adapters) runs with torch's default,
    # which in the torch this project pins is weights_only=True: a checkpoint cannot smuggle code in.
    path = tmp_path / "evil.pt"
    torch.save({"x": _Payload()}, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path)


def test_trust_remote_code_is_off_by_default_and_warns_when_on(tiny_base, monkeypatch, capsys):
    from transformers import AutoTokenizer

    from dpo_dist.models import loading as models

    seen = []
    original = AutoTokenizer.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        return original(*args, **kwargs)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", spy)
    monkeypatch.setattr(models, "_WARNED", set())
    recipe = recipe_from_dict({"name": "x", "model": {"name_or_path": str(tiny_base)},
                               "stages": [{"stage": "sft", "data": {"train": "d.jsonl"}}]})
    assert recipe.model.trust_remote_code is False
    models.load_tokenizer(recipe.model)
    assert seen == [False] and "trust_remote_code" not in capsys.readouterr().err
    recipe.model.trust_remote_code = True
    models.load_tokenizer(recipe.model)
    assert seen == [False, True]
    err = capsys.readouterr().err
    assert f"warning: trust_remote_code is on: Python code from {tiny_base} will run on this machine" in err


@pytest.mark.e2e
def test_hostile_recipe_path_trains_and_writes_only_safetensors_weights(tiny_base, data, tmp_path):
    """A recipe and output directory whose path holds spaces, quotes, `$(...)` and backticks: launched through
    `dpo-dist launch`, trained SFT -> DPO (chained: adapter, merge), nothing in the path was executed, and every
    weight file the run wrote is safetensors."""
    hostile = tmp_path / HOSTILE
    hostile.mkdir()
    recipe = write_recipe(hostile / "recipe.yaml", tiny_base, data, chain=True, max_steps=2, save_steps=1)
    dry = subprocess.run([BIN / "dpo-dist", "launch", recipe, "--profile", "cpu", "--dry-run"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert dry.returncode == 0, dry.stderr
    proc = subprocess.run([BIN / "dpo-dist", "launch", recipe, "--profile", "cpu"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert not list(tmp_path.rglob("pwned*")) and not list(ROOT.glob("pwned*"))
    runs = hostile / "runs"
    assert (runs / "dpo" / "adapter" / "adapter_model.safetensors").is_file()
    assert list((runs / "sft" / "merged").glob("*.safetensors"))
    # Pickled trainer state is allowed only inside checkpoints, under the Trainer's names (read back with
    # weights_only=True); weights are safetensors everywhere.
    trainer_state = re.compile(r"(optimizer|scheduler|scaler)\.pt|training_args\.bin|rng_state(_\d+)?\.pth")
    pickles = [p for p in runs.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]
    bad = [p for p in pickles if "checkpoints" not in p.parts or not trainer_state.fullmatch(p.name)]
    assert pickles and not bad, bad
    weights = [p for p in runs.rglob("*.safetensors")]
    assert any("checkpoints" in p.parts for p in weights) and any("adapter" in p.parts for p in weights)


def test_deepspeed_checkpoint_loading_refuses_pickled_code(tmp_path):
    # DeepSpeed's own loader unpickles anything (weights_only=False); backends.harden_deepspeed_loading replaces it.
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from dpo_dist.distributed.safe_loading import UnsafeCheckpoint, harden_deepspeed_loading

    harden_deepspeed_loading()
    engine = TorchCheckpointEngine()
    evil, fine = tmp_path / "evil.pt", tmp_path / "optim_states.pt"
    torch.save({"optimizer_state_dict": {"x": _Payload()}}, evil)
    torch.save({"optimizer_state_dict": {"zero_stage": ZeroStageEnum.weights, "loss_scaler": LossScaler(1.0),
                                         "state": torch.ones(2)}, "ds_version": "0.19"}, fine)
    with pytest.raises(UnsafeCheckpoint, match="refusing to load it"):
        engine.load(str(evil))
    assert engine.load(str(fine))["optimizer_state_dict"]["state"].sum() == 2


def test_sharded_checkpoint_loading_refuses_pickled_code(tmp_path):
    # torch.distributed.checkpoint (FSDP's sharded checkpoints) unpickles its .metadata and non-tensor entries;
    # safe_loading.harden_dcp_loading restricts both.
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from dpo_dist.distributed.safe_loading import UnsafeCheckpoint, harden_dcp_loading

    harden_dcp_loading()
    state = {"w": torch.arange(4.0), "param_groups": [{"lr": 0.1, "betas": (0.9, 0.999), "params": [0]}]}
    dcp.save(state, checkpoint_id=str(tmp_path / "ok"))
    loaded = {"w": torch.zeros(4), "param_groups": [{"lr": 0.0, "betas": (0.0, 0.0), "params": [0]}]}
    dcp.load(loaded, checkpoint_id=str(tmp_path / "ok"))
    assert loaded["w"].tolist() == [0.0, 1.0, 2.0, 3.0] and loaded["param_groups"][0]["lr"] == 0.1
    dcp.save(state, checkpoint_id=str(tmp_path / "evil"))
    (tmp_path / "evil" / ".metadata").write_bytes(pickle.dumps(_Payload()))
    # (the checkpoint API wraps the reader's error in its own exception type, a BaseException; the message is kept)
    with pytest.raises(CheckpointException, match=r"evil/\.metadata: refusing to load it.*builtins\.print is not allowed"):
        dcp.load(loaded, checkpoint_id=str(tmp_path / "evil"))
    dcp.save({"w": torch.ones(2), "extra": _Payload()}, checkpoint_id=str(tmp_path / "evil-entry"))
    with pytest.raises(CheckpointException, match="checkpoint entry extra: refusing to load it"):
        dcp.load({"w": torch.zeros(2), "extra": None}, checkpoint_id=str(tmp_path / "evil-entry"))
    assert UnsafeCheckpoint.__mro__[1] is pickle.UnpicklingError
