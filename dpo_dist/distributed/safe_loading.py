"""Resuming never unpickles arbitrary Python objects.

transformers and peft read their pickled files (optimizer, scheduler, RNG state, .bin adapters) with
torch.load(weights_only=True). Two loaders in the stack do not, and are replaced here before any checkpoint is read:

- DeepSpeed (0.19) `TorchCheckpointEngine.load`: torch.load(weights_only=False) on ZeRO checkpoint files.
- torch.distributed.checkpoint (torch 2.13), which FSDP's sharded checkpoints use: `FileSystemReader.read_metadata`
  runs pickle.load on `.metadata`, and `DefaultLoadPlanner.load_bytes` torch.load(weights_only=False) on non-tensor
  entries (optimizer param groups).

Each replacement allows tensors, plain containers and numbers, and the few library classes those files are made of.
Anything else raises UnsafeCheckpoint naming the file, instead of running code from a tampered checkpoint.
"""
from __future__ import annotations

import io
import pickle

from dpo_dist import compat


class UnsafeCheckpoint(pickle.UnpicklingError):
    """A checkpoint file holds a pickled Python object that is not on the allowlist."""


def _refuse(path, err) -> UnsafeCheckpoint:
    why = str(err).strip().splitlines()[0] if str(err).strip() else "a disallowed object"
    return UnsafeCheckpoint(f"{path}: refusing to load it: it holds a pickled Python object that is not tensors or "
                            f"settings ({why}); only resume from checkpoints your own runs wrote")


def harden_deepspeed_loading() -> None:
    import torch
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    if getattr(TorchCheckpointEngine.load, "weights_only", False):
        return
    allowed = [ZeroStageEnum, LossScaler, DynamicLossScaler]  # what ZeRO optimizer states hold besides tensors

    def load(self, path: str, map_location=None):
        with torch.serialization.safe_globals(allowed):
            try:
                return torch.load(path, map_location=map_location, weights_only=True)
            except pickle.UnpicklingError as err:
                raise _refuse(path, err) from None

    load.weights_only = True
    compat.patch("deepspeed-safe-checkpoint-load")
    TorchCheckpointEngine.load = load


class _MetadataUnpickler(pickle.Unpickler):
    """The classes a torch.distributed.checkpoint `.metadata` file is made of, and nothing else."""

    def find_class(self, module, name):
        import torch

        if module.startswith("torch.distributed.checkpoint.") or (module, name) in (
                ("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
                ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
                ("pathlib", "PureWindowsPath")):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                         torch.memory_format)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed")


def harden_dcp_loading() -> None:
    import torch
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.filesystem import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    if getattr(FileSystemReader.read_metadata, "restricted", False):
        return

    def read_metadata(self, *args, **kwargs):
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            try:
                metadata = _MetadataUnpickler(stream).load()
            except pickle.UnpicklingError as err:
                raise _refuse(path, err) from None
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as err:
            raise _refuse(f"checkpoint entry {read_item.dest_index.fqn}", err) from None
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj

    read_metadata.restricted = True
    compat.patch("torch-dcp-safe-metadata")
    FileSystemReader.read_metadata = read_metadata
    compat.patch("torch-dcp-safe-load-bytes")
    DefaultLoadPlanner.load_bytes = load_bytes


def harden_checkpoint_loading() -> None:
    """Install both replacements (idempotent). DeepSpeed's only when it is installed."""
    import importlib.util

    harden_dcp_loading()
    if importlib.util.find_spec("deepspeed") is not None:
        harden_deepspeed_loading()
