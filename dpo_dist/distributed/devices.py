"""What this process's device can do, and what this rank holds of a parameter. No other dpo_dist module is imported
here: the model loader, the backend checks and the loss guard all ask these."""
from __future__ import annotations

import importlib.util
import sys

import torch

from dpo_dist.config.schema import ConfigError, error_line

def bf16_native() -> bool:
    """This GPU computes bf16 itself (Ampere and newer). torch's own is_bf16_supported() also counts emulation, which
    a V100 or T4 offers: a bf16 run there would be slow and would not compute what an A100 computes."""
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


_WARNED: set[str] = set()


_FLASH: dict[bool, tuple[bool, str]] = {}


def flash_attn_status(cuda: bool | None = None) -> tuple[bool, str]:
    """(usable, why) for flash_attention_2 in this process, found by trying it rather than by finding the package:
    a flash-attn built for another torch or CUDA is found, but fails at import (an undefined symbol) or at its first
    kernel launch. Checks, in order: a GPU (``cuda``, default: one is visible), Ampere or newer, the package imports,
    and one tiny causal forward runs on the GPU in bf16 (fp16 where bf16 is not native). Probed once per process."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if cuda in _FLASH:
        return _FLASH[cuda]
    _FLASH[cuda] = status = _probe_flash(cuda)
    return status


def _probe_flash(cuda: bool) -> tuple[bool, str]:
    if importlib.util.find_spec("flash_attn") is None:
        return False, "the flash-attn package is not installed"
    if not cuda:
        return False, "flash-attn runs on an NVIDIA GPU only, and this process trains on the CPU"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return False, f"flash-attn 2 needs compute capability 8.0 or newer (Ampere); this GPU is {major}.{minor}"
    try:
        from flash_attn import flash_attn_func
    except Exception as err:  # an ABI mismatch raises ImportError or OSError, a broken build anything
        return False, f"flash-attn is installed but does not import: {error_line(err)}"
    try:
        dtype = torch.bfloat16 if bf16_native() else torch.float16
        q = torch.randn(1, 16, 2, 64, device="cuda", dtype=dtype)
        out = flash_attn_func(q, q, q, causal=True)
        torch.cuda.synchronize()
        if not bool(torch.isfinite(out).all()):
            return False, "flash-attn's test forward returned non-finite values"
    except Exception as err:
        return False, f"flash-attn imports but its kernel fails on this GPU: {error_line(err)}"
    import flash_attn

    return True, f"flash-attn {getattr(flash_attn, '__version__', '?')} runs on this GPU"


def pick_attn_implementation(requested: str = "auto", precision: str = "fp32", cuda: bool | None = None) -> str:
    """sdpa by default; flash_attention_2 when it really runs here (flash_attn_status) at half precision; eager as
    a fallback. An installed flash-attn that fails its probe falls back to sdpa with a warning saying why; an explicit
    flash_attention_2 that cannot run is refused. ``cuda``: this process trains on a GPU
    (dpo_dist.distributed.backends.on_cuda); default: one is visible."""
    if requested != "auto":
        if requested == "flash_attention_2":
            usable, why = flash_attn_status(cuda)
            if not usable:
                raise ConfigError(f"attn_implementation flash_attention_2 cannot run here: {why}; use sdpa (or auto)")
        return requested
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if cuda and precision in ("fp16", "bf16") and importlib.util.find_spec("flash_attn") is not None:
        usable, why = flash_attn_status(cuda)
        if usable:
            return "flash_attention_2"
        _warn_once(f"warning: not using flash-attention: {why}; attention runs on sdpa")
    if hasattr(torch.nn.functional, "scaled_dot_product_attention"):
        return "sdpa"
    return "eager"


def _warn_once(line: str) -> None:
    if line not in _WARNED:
        _WARNED.add(line)
        print(line, file=sys.stderr, flush=True)


def local_tensor(param):
    """What this rank stores of a parameter: an FSDP2 DTensor's local shard, a ZeRO-3 parameter's partition (its own
    `.numel()` is the global size, or 0 once partitioned), otherwise the whole tensor."""
    if hasattr(param, "to_local"):
        return param.to_local()
    if hasattr(param, "ds_tensor"):
        return param.ds_tensor
    return param


def peak_rss_mib_per_rank() -> list[float]:
    """Each rank's peak resident memory so far (the process's whole life, so a later stage includes the earlier
    ones' peaks), in MiB, in rank order. Collective when several ranks run."""
    import resource

    import torch.distributed as dist

    mine = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return [mine]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, mine)
    return out
