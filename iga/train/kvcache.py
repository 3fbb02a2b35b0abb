"""The KV cache of greedy decoding (iga.train.decode): a batch whose rows come and go.

Every layer keeps its keys and values in one buffer, [slots, heads, capacity, dim]. All rows end at the same
position (`length`): a row's prompt is written so that it ends there, the positions before its start are
masked out, and each decoding step writes one position for every row in place (DynamicLayer's torch.cat
copies the whole cache at every step). A finished row's slot takes the next prompt; once enough positions
before every row's start are dead, every row moves back together (attention reads all `length` positions, so
dead ones cost every step). Attention reads a view of the filled part, so it
sees what a cache of that length holds (measured: the same greedy tokens as a fresh batch per prompt group
and as one prompt at a time, docs/measured.md).
"""
from __future__ import annotations

from typing import Any, Sequence

from torch import Tensor
from transformers.cache_utils import Cache, DynamicLayer


class _Layer(DynamicLayer):
    def __init__(self, capacity: int):
        super().__init__()
        self.capacity, self.length = capacity, 0

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        raise RuntimeError("a Slots cache is filled with Slots.place before it is decoded into")

    def allocate(self, slots: int, like_keys: Tensor, like_values: Tensor) -> None:
        """Buffers for `slots` rows shaped as one row's (heads, positions, dim) keys and values."""
        self.dtype, self.device = like_keys.dtype, like_keys.device
        self._keys = like_keys.new_zeros(slots, like_keys.shape[0], self.capacity, like_keys.shape[2])
        self._values = like_values.new_zeros(slots, like_values.shape[0], self.capacity, like_values.shape[2])
        self.is_initialized = True

    def _views(self) -> None:
        self.keys, self.values = self._keys[:, :, :self.length], self._values[:, :, :self.length]

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        end = self.length + key_states.shape[-2]
        self._keys[:, :, self.length:end] = key_states
        self._values[:, :, self.length:end] = value_states
        self.length = end
        self._views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: Tensor) -> None:
        self._keys, self._values = self._keys[indices], self._values[indices]
        self._views()


class Slots(Cache):
    """`slots` rows of up to `capacity` positions in each of `n_layers` layers."""

    def __init__(self, n_layers: int, slots: int, capacity: int):
        super().__init__(layers=[_Layer(capacity) for _ in range(n_layers)])
        self.slots, self.capacity = slots, capacity

    @property
    def length(self) -> int:
        return self.layers[0].length

    def start(self, length: int) -> None:
        """An empty cache whose rows all end at position `length` (the longest prompt's)."""
        for layer in self.layers:
            layer.length = length

    def place(self, slot: int, keys: Sequence[Tensor], values: Sequence[Tensor]) -> None:
        """One prompt's keys and values, (heads, its tokens, dim) per layer, into `slot`, ending at `length`;
        what the slot held before is masked by the caller."""
        for layer, k, v in zip(self.layers, keys, values, strict=True):
            if not layer.is_initialized:
                layer.allocate(self.slots, k, v)
            end = layer.length
            layer._keys[slot, :, end - k.shape[1]:end] = k
            layer._values[slot, :, end - v.shape[1]:end] = v
            layer._views()

    def shift(self, by: int) -> None:
        """Every row's positions moved back by `by` (none of the first `by` is still read)."""
        for layer in self.layers:
            end = layer.length
            layer._keys[:, :, :end - by] = layer._keys[:, :, by:end].clone()
            layer._values[:, :, :end - by] = layer._values[:, :, by:end].clone()
            layer.length = end - by
            layer._views()

