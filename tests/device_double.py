"""A stand-in for a GPU in the training kernel, on a machine that has none.

CUDA refuses an operation that mixes a tensor on the GPU with a CPU tensor of one or more
dimensions (CPU scalars are allowed), and `.numpy()` of a GPU tensor. On the CPU both work,
so a kernel that forgets to move a tensor passes every CPU test and crashes at its first GPU
step. `OnDevice` keeps the same rules on the CPU: inside it, the device named `OnDevice.DEVICE`
("cpu:0", a real torch device, so every call still runs) stands for the GPU. What a call puts
there (`.to(DEVICE)`, `device=DEVICE` or any `device=` taken from such a tensor, a module moved
with `.to`) is marked, results of marked inputs are marked, `.cpu()` unmarks, and a call that
meets both kinds, or `.numpy()` of a marked tensor, raises `DeviceMix` naming the call.
"""
from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

_MARK = "_on_test_device"


class DeviceMix(RuntimeError):
    pass


def _tensors(obj, out):
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            _tensors(o, out)
    elif isinstance(obj, dict):
        for o in obj.values():
            _tensors(o, out)
    return out


def marked(t: torch.Tensor) -> bool:
    return getattr(t, _MARK, False)


def _mark(obj) -> None:
    for t in _tensors(obj, []):
        try:
            setattr(t, _MARK, True)
        except (AttributeError, RuntimeError):  # a tensor that takes no attributes
            pass


def _names_device(device) -> bool:
    return device is not None and str(device) == OnDevice.DEVICE


# Calls that may legally take a tensor from the other device (copies between devices).
_CROSSING = {"copy_", "to", "cpu", "cuda", "__set__", "__get__", "numpy", "tolist", "item",
             "__repr__", "__format__", "__bool__", "__len__", "__index__", "__int__",
             "__float__", "dim", "size", "numel", "is_floating_point", "requires_grad_",
             "__reduce_ex__", "__deepcopy__", "data_ptr", "untyped_storage",
             "_has_compatible_shallow_copy_type"}


class OnDevice(TorchFunctionMode):
    DEVICE = "cpu:0"

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        inputs = _tensors(args, []) + _tensors(kwargs, [])
        on = [t for t in inputs if marked(t)]
        if name == "numpy" and on:
            raise DeviceMix(".numpy() of a tensor on the device: move it with .cpu() first")
        if name not in _CROSSING:
            off = [t for t in inputs if not marked(t) and t.dim() > 0]
            if on and off:
                raise DeviceMix(f"{name}: a CPU tensor of shape {tuple(off[0].shape)} meets "
                                f"a tensor on the device")
        result = func(*args, **kwargs)
        device = kwargs.get("device")
        if name == "to":
            device = device or next((a for a in args[1:] if isinstance(a, (str, torch.device))),
                                    None)
        if name == "cpu" or (name == "to" and device is not None and not _names_device(device)):
            # on the CPU the copy may be the tensor itself: an alias carries no mark
            return result.view_as(result) if marked(result) else result
        if name == "to":
            if _names_device(device) or (device is None and on):
                _mark(result)
            return result
        prop = getattr(getattr(func, "__self__", None), "__name__", "")
        if name == "__get__" and prop == "device" and args and marked(args[0]):
            return torch.device(self.DEVICE)  # so that device=x.device stays on the device
        if name == "__set__" and args and on:  # param.data = tensor on the device
            _mark(args[0])
        elif name == "__get__" and args and marked(args[0]):  # param.grad, param.data
            _mark(result)
        elif _names_device(device) or (on and name not in ("tolist", "item")):
            _mark(result)
        return result


def module_on_device(module: torch.nn.Module) -> None:
    """Marks a module's parameters and buffers as on the device (what `.to` did)."""
    _mark(list(module.parameters()) + list(module.buffers()))
