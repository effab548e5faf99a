"""Activation memory measured exactly: bytes of the tensors autograd saves for backward."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch


@dataclass
class SavedBytes:
    """Result of :func:`saved_tensor_bytes`: ``total`` bytes over distinct storages."""

    total: int = 0
    tensors: int = 0
    _seen: set[tuple[int, int]] = field(default_factory=set, repr=False)


def plain_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors holding ``t``'s data: itself, or the inner tensors of a wrapper subclass
    (a torchao-quantized weight is int8/float8 data plus scales)."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if not is_traceable_wrapper_subclass(t):
        return [t]
    names, _ = t.__tensor_flatten__()
    return [leaf for name in names for leaf in plain_tensors(getattr(t, name))]


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (wrapper subclasses counted by their parts)."""
    seen: dict[tuple[int, int], int] = {}
    for t in tensors:
        for leaf in plain_tensors(t):
            seen[storage_key(leaf)] = leaf.untyped_storage().nbytes()
    return sum(seen.values())


def storage_key(t: torch.Tensor) -> tuple[int, int]:
    """Identity of a tensor's storage: its address and device (a view shares its base's key).

    Meta tensors (the ``--dry-run`` estimates) have no address; their storage object's identity is used.
    """
    storage = t.untyped_storage()
    if t.device.type == "meta":
        return (storage._cdata, -2)
    return (storage.data_ptr(), t.device.index or 0)


@contextmanager
def saved_tensor_bytes(exclude: Iterable[torch.Tensor] = ()) -> Iterator[SavedBytes]:
    """Count the bytes autograd saves for backward inside the block.

    Each storage counts once (a tensor saved by two ops costs memory once) and storages of ``exclude``
    (pass the model's parameters) are skipped: weights are resident anyway, only activations scale with
    the surrogate. Exact and repeatable on CPU, unlike allocator statistics.
    """
    meter = SavedBytes()
    skip = {storage_key(leaf) for t in exclude for leaf in plain_tensors(t)}

    def pack(t: torch.Tensor) -> torch.Tensor:
        for leaf in plain_tensors(t):
            key = storage_key(leaf)
            if key not in skip and key not in meter._seen:
                meter._seen.add(key)
                meter.total += leaf.untyped_storage().nbytes()
                meter.tensors += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield meter
