"""Frozen weights stored in bf16 while training under bf16 autocast (`train.frozen_dtype: bfloat16`).

Under `torch.autocast(bfloat16)` every Linear and convolution already computes in bf16: autocast casts the
fp32 weight to bf16 at each call. Storing the *frozen* ones in bf16 gives those layers the same outputs bit for
bit and halves the memory they hold; a PEFT plan trains a few percent of the weights, so most of the model's
weights are frozen.

The token embedding is the largest frozen tensor of a multilingual text tower (multilingual-e5-small: 250k x
384, 366 MiB of its 449 MiB in fp32), and a step looks up a few hundred of its rows. On CPU it therefore stays
fp32, as a view of the memory map of the temporary file written on entry (below): only the pages of the rows
looked up come into memory, and its values do not change. Elsewhere (a GPU) it is stored in `dtype` and its
rows are returned as fp32, rounded to bf16's 8 bits of mantissa.

Inside the block a swapped layer called without autocast (a validation pass during training) computes with an
fp32 copy of its bf16 weight, made for that call. On exit the exact fp32 values come back from a temporary
safetensors file written on entry, so evaluation after training and saved checkpoints (which hold no frozen
pretrained weight) are what they would have been. Trainable tensors, norms, biases and buffers keep their dtype
and values (those that shared the loaded file's memory map with a cast weight are copied out of it, see _unshare).
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

# The layers whose frozen weight is swapped: autocast computes Linear and convolutions in bf16 anyway.
_MATMUL = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def native_bf16(device: torch.device | str) -> bool:
    """Whether `device` computes bf16 in hardware: a GPU that supports it, or a CPU with AVX512-BF16 or AMX."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)  # emulated on pre-Ampere GPUs
    if device.type != "cpu":
        return True  # other accelerators: trust the user's choice
    # Without these instructions oneDNN converts bf16 to fp32 around every kernel: on an AVX512 Xeon without them an
    # `lwa` / `layernorm` step under bf16 took 1.6x / 1.9x the fp32 step (benchmarks/results/speed-cpu-no-native-bf16/).
    # The checks are private torch API: a torch without them is taken at its word (no warning).
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    checks = [check for check in checks if check is not None]
    return not checks or any(check() for check in checks)


def _swappable(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (isinstance(module, (*_MATMUL, nn.Embedding)) and isinstance(weight, nn.Parameter)
            and not weight.requires_grad and weight.dtype == torch.float32)


def _full_precision_call(module: nn.Module, forward: Any) -> Any:
    """`forward`, except that a call without autocast on an input of another dtype runs with a transient copy of
    the weight in the input's dtype (the stock layers refuse mixed dtypes)."""
    def call(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        low = module.weight
        if torch.is_autocast_enabled(x.device.type) or x.dtype == low.dtype:
            return forward(x, *args, **kwargs)
        module.weight = nn.Parameter(low.to(x.dtype), requires_grad=False)
        try:
            return forward(x, *args, **kwargs)
        finally:
            module.weight = low
    return call


def _as_float32(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
    return output.float()


def _file_maps(pointers: set[int]) -> list[tuple[int, int]]:
    """The address ranges of the file memory maps (Linux /proc/self/maps) holding any of `pointers`."""
    maps = Path("/proc/self/maps")
    if not maps.is_file():
        return []
    ranges = []
    for line in maps.read_text().splitlines():
        fields = line.split()
        if len(fields) < 6 or not fields[5].startswith("/"):  # anonymous memory, the heap, the stack
            continue
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if any(start <= p < end for p in pointers):
            ranges.append((start, end))
    return ranges


def _unshare(model: nn.Module, ranges: list[tuple[int, int]]) -> None:
    """Copy out the tensors that still view one of the memory maps `ranges`, so that the maps can go.

    A model loaded from safetensors keeps its weights as views of one memory map of the file; the map, and every
    page of it read so far, stays while any tensor views it. The tensors left on it once the large weights are cast
    are small (norms, biases, position tables): copied, the map goes and the fp32 weights' pages with it.
    """
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.device.type != "cpu":  # device memory is not a file's map (a GPU's address range may look so)
            continue
        address = tensor.untyped_storage().data_ptr()
        if any(start <= address < end for start, end in ranges):
            tensor.data = tensor.data.clone()


@contextlib.contextmanager
def frozen_weights_in(model: nn.Module, dtype: torch.dtype = torch.bfloat16, enabled: bool = True) -> Iterator[int]:
    """Within the block, the frozen fp32 weights of Linear, convolution and embedding layers are stored in `dtype`
    (a CPU embedding: left in a file's memory map instead); yields how many layers were swapped. On exit every one
    of them is its exact fp32 value again."""
    modules = [(name, m) for name, m in model.named_modules() if _swappable(m)] if enabled else []
    if not modules:
        yield 0
        return
    owner: dict[int, str] = {}  # a weight shared by several layers is saved and cast once
    for name, m in modules:
        owner.setdefault(id(m.weight), name)
    with tempfile.TemporaryDirectory(prefix="lilt-frozen-") as tmp:
        saved = Path(tmp) / "frozen.safetensors"
        save_file({name: m.weight.detach().contiguous().cpu() for name, m in modules if owner[id(m.weight)] == name},
                  str(saved))
        maps = _file_maps({m.weight.untyped_storage().data_ptr() for _, m in modules if m.weight.device.type == "cpu"})
        hooks, patched = [], []  # patched: (layer, the instance forward it had before, if any)
        try:
            with safe_open(str(saved), framework="pt") as f:
                for name, m in modules:
                    mapped = isinstance(m, nn.Embedding) and m.weight.device.type == "cpu"
                    if owner[id(m.weight)] == name:
                        # get_tensor views the file's map: a row's pages come into memory when it is looked up
                        m.weight.data = f.get_tensor(name) if mapped else m.weight.data.to(dtype)
                    if mapped:
                        continue
                    if isinstance(m, nn.Embedding):
                        hooks.append(m.register_forward_hook(_as_float32))
                    else:
                        patched.append((m, m.__dict__.get("forward")))
                        m.forward = _full_precision_call(m, m.forward)
            _unshare(model, maps)
            yield len(modules)
        finally:
            for hook in hooks:
                hook.remove()
            for m, before in patched:
                if before is None:
                    del m.forward
                else:
                    m.forward = before
            with safe_open(str(saved), framework="pt") as f:
                for name, m in modules:
                    if owner[id(m.weight)] == name:  # a copy: not a view of the temp file's map
                        m.weight.data = f.get_tensor(name).to(m.weight.device, copy=True)
