"""Scale bank and tenant residency (DESIGN.md §3; S-LoRA-style adapter paging, Sheng et al. 2023).

Every quantized linear holds ``bank (num_slots, N, G)`` float32; slot 0 is the base scale set. A resident
tenant scale set ``(tenant, version)`` owns one slot index, the same in every layer. Requests pin their
``(tenant, version)`` when the engine admits them and unpin when they finish; a slot whose key has no pins is
an eviction candidate (least recently used first). Cold keys are read by loader threads (a small pool, so one
slow tenant does not hold up the others) through
``scale_loader(tenant, version) -> {name: (N, G) tensor}`` (disk, SQLite, ...) while the step loop keeps
stepping; the copy into the bank happens in the step thread between steps (:meth:`ScaleBank.poll`), and only
into a slot no pinned request reads, so a step in flight never sees its scales change.

Slots: ``max_slots = 1 + max_resident`` where ``max_resident`` is ``EngineConfig.max_resident_tenants`` or
``EngineConfig.scale_bank_memory_bytes // bytes_per_scale_set`` (SmolLM2-135M, g64: 6.6 MB per set, so the
512 MiB default holds 77 tenants). Banks start small and double on demand up to ``max_slots``.
"""
from __future__ import annotations

import logging
import queue
from concurrent.futures import ThreadPoolExecutor
from collections import OrderedDict
from typing import Callable

import torch

log = logging.getLogger(__name__)

ScaleKey = tuple[str, "int | None"]  # (tenant, version)
ScaleLoader = Callable[[str, "int | None"], dict[str, torch.Tensor]]


class ScaleLoadError(RuntimeError):
    """A tenant's scale set could not be loaded (missing, wrong names/shapes, loader error)."""


class ScaleBank:
    """Residency of tenant scale sets in the per-layer banks of ``modules`` (each has ``.bank (S, N, G)``).

    All methods except the loader thread's work run on the engine's step thread.
    """

    def __init__(self, modules: dict[str, torch.nn.Module], max_resident: int, scale_loader: ScaleLoader | None,
                 wake: Callable[[], None] | None = None, initial_slots: int = 8, loader_threads: int = 2) -> None:
        if not modules:
            raise ValueError("the model has no quantized layers: a scale bank needs QuantLinear modules")
        if max_resident < 1:
            raise ValueError(f"max_resident must be >= 1, got {max_resident}")
        self.modules = modules
        self.shapes = {name: tuple(m.bank.shape[1:]) for name, m in modules.items()}  # name -> (N, G)
        self.bytes_per_set = sum(4 * n * g for n, g in self.shapes.values())
        self.max_slots = 1 + max_resident
        self.scale_loader = scale_loader
        self._wake = wake
        first = next(iter(modules.values())).bank
        self.device = first.device
        self.capacity = first.shape[0]
        assert all(m.bank.shape[0] == self.capacity for m in modules.values())
        self._initial_slots = max(2, min(initial_slots, self.max_slots))
        self._slot_of: dict[ScaleKey, int] = {}
        self._key_of: dict[int, ScaleKey] = {}
        self._free_slots: list[int] = list(range(self.capacity - 1, 0, -1))  # slot 0 is the base
        self._lru: OrderedDict[ScaleKey, None] = OrderedDict()  # resident keys, least recently used first
        self._pins: dict[ScaleKey, int] = {}
        self._loading: set[ScaleKey] = set()
        self._loaded: dict[ScaleKey, dict[str, torch.Tensor]] = {}  # read, waiting for a slot
        self._failed: dict[ScaleKey, str] = {}
        self._dropped: set[str] = set()  # tenants whose pinned slots are freed on last unpin
        self.num_loads = 0
        self.num_evictions = 0
        self.loader_threads = loader_threads
        self._pool: ThreadPoolExecutor | None = None
        self._results: queue.Queue[tuple[ScaleKey, dict[str, torch.Tensor] | None, str | None]] = queue.Queue()

    # -- residency ---------------------------------------------------------------------
    @property
    def num_resident(self) -> int:
        return len(self._slot_of)

    def resident_keys(self) -> list[ScaleKey]:
        return list(self._slot_of)

    def slot_of(self, key: ScaleKey) -> int | None:
        """The slot of a resident key (and mark it recently used), else None."""
        slot = self._slot_of.get(key)
        if slot is not None:
            self._lru.move_to_end(key)
        return slot

    def has_pending(self) -> bool:
        """Loads in flight or read but waiting for a slot."""
        return bool(self._loading or self._loaded)

    def has_results(self) -> bool:
        """The loader thread finished something that :meth:`poll` has not taken yet."""
        return not self._results.empty()

    def failure(self, key: ScaleKey) -> str | None:
        return self._failed.get(key)

    def pin(self, key: ScaleKey) -> None:
        """A request for ``key`` was admitted: keep it resident (or load it) until :meth:`unpin`."""
        self._pins[key] = self._pins.get(key, 0) + 1
        if key in self._slot_of or key in self._loading or key in self._loaded:
            return
        if key in self._failed and self._pins[key] > 1:
            return  # the requests already pinned fail with it; a later first pin retries
        self._failed.pop(key, None)
        self._start_load(key)

    def unpin(self, key: ScaleKey) -> None:
        n = self._pins[key] - 1
        assert n >= 0
        if n:
            self._pins[key] = n
            return
        del self._pins[key]
        if key[0] in self._dropped:
            self._evict(key)
            self._loaded.pop(key, None)

    def is_pinned(self, key: ScaleKey) -> bool:
        return key in self._pins

    def drop_tenant(self, tenant: str) -> None:
        """Forget every version of ``tenant``: unpinned slots free now, pinned ones when their requests end."""
        for key in [k for k in self._slot_of if k[0] == tenant]:
            if key not in self._pins:
                self._evict(key)
        for key in [k for k in self._loaded if k[0] == tenant]:
            if key not in self._pins:
                del self._loaded[key]
        if any(k[0] == tenant for k in self._pins):
            self._dropped.add(tenant)

    def undrop(self, tenant: str) -> None:
        self._dropped.discard(tenant)

    def evict_unpinned(self, tenant: str, keep_version: int | None) -> None:
        """Free the unpinned slots of ``tenant``'s versions other than ``keep_version`` (after a version flip)."""
        for key in [k for k in self._slot_of if k[0] == tenant and k[1] != keep_version and k not in self._pins]:
            self._evict(key)

    def _evict(self, key: ScaleKey) -> None:
        slot = self._slot_of.pop(key, None)
        if slot is None:
            return
        self._lru.pop(key, None)
        del self._key_of[slot]
        self._free_slots.append(slot)
        self.num_evictions += 1

    # -- loading -----------------------------------------------------------------------
    def _start_load(self, key: ScaleKey) -> None:
        if self.scale_loader is None:
            self._failed[key] = f"no scale_loader configured: cannot load tenant {key[0]!r} version {key[1]}"
            return
        self._loading.add(key)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.loader_threads, thread_name_prefix="scaleswap-scale-loader")
        self._pool.submit(self._load_one, key)

    def _load_one(self, key: ScaleKey) -> None:
        """Loader thread: read + validate; the step thread copies it into the bank in :meth:`poll`."""
        try:
            data = self._validate(self.scale_loader(*key))
            self._results.put((key, data, None))
        except Exception as e:  # noqa: BLE001 - any loader failure fails the requests of that key
            log.warning("loading scales of tenant %r version %r failed: %s", key[0], key[1], e)
            self._results.put((key, None, f"{type(e).__name__}: {e}"))
        if self._wake is not None:
            self._wake()

    def _validate(self, data: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        missing = sorted(set(self.shapes) - set(data))
        extra = sorted(set(data) - set(self.shapes))
        if missing or extra:
            raise ScaleLoadError(f"scale set names do not match the base: missing {missing[:3]}, unexpected {extra[:3]}")
        out = {}
        for name, shape in self.shapes.items():
            t = data[name]
            if tuple(t.shape) != shape:
                raise ScaleLoadError(f"{name}: shape {tuple(t.shape)}, expected {shape}")
            t = t.to(device=self.device, dtype=torch.float32).contiguous()
            if not torch.isfinite(t).all():
                raise ScaleLoadError(f"{name}: non-finite scales")
            out[name] = t
        return out

    def poll(self) -> bool:
        """Between steps: take finished loads and copy them into free slots. Returns True if anything changed."""
        changed = False
        while True:
            try:
                key, data, err = self._results.get_nowait()
            except queue.Empty:
                break
            self._loading.discard(key)
            changed = True
            if err is not None:
                self._failed[key] = err
            elif key in self._pins:  # nobody wants it any more otherwise (aborted/dropped while loading)
                self._loaded[key] = data
        for key in list(self._loaded):
            if key not in self._pins:
                del self._loaded[key]
                continue
            slot = self._acquire_slot()
            if slot is None:
                break
            data = self._loaded.pop(key)
            for name, m in self.modules.items():
                m.bank[slot].copy_(data[name])
            self._slot_of[key] = slot
            self._key_of[slot] = key
            self._lru[key] = None
            self.num_loads += 1
            changed = True
        return changed

    def _acquire_slot(self) -> int | None:
        if not self._free_slots and self.capacity < self.max_slots:
            self._grow(min(self.max_slots, max(self._initial_slots, 2 * self.capacity)))
        if self._free_slots:
            return self._free_slots.pop()
        for key in self._lru:  # least recently used first
            if key not in self._pins:
                self._evict(key)
                return self._free_slots.pop()
        return None

    def _grow(self, new_capacity: int) -> None:
        """Reallocate every bank with ``new_capacity`` slots (between steps, so no forward reads the old one)."""
        # NOTE: a normal (not inference-mode) tensor even when called from the engine's inference-mode step
        # thread, so kernels may cache per-slot derived formats keyed on the bank's identity and version.
        with torch.inference_mode(False):
            self._grow_banks(new_capacity)
        self._free_slots = list(range(new_capacity - 1, self.capacity - 1, -1)) + self._free_slots
        self.capacity = new_capacity

    def _grow_banks(self, new_capacity: int) -> None:
        for m in self.modules.values():
            old = m.bank
            bank = torch.empty((new_capacity, *old.shape[1:]), dtype=old.dtype, device=old.device)
            bank[: old.shape[0]].copy_(old)
            bank[old.shape[0]:].copy_(old[0:1].expand(new_capacity - old.shape[0], *old.shape[1:]))
            m.bank = bank

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
