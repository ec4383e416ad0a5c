"""The user's side of adapters: loading (a host LRU of max_cpu_loras), device slots (max_loras LoRA slots and
max_prompt_adapters prompt-table slots), and requests waiting for a slot.

A request with an adapter takes a slot before it is enqueued: the slot already holding its adapter, or a free one
(empty, or the least recently used with no request left in the executor), into which the adapter is installed
first (AdapterInstall, applied by the runner between steps). When every slot is held by adapters of requests
still running, the request waits here, and is enqueued when a finishing request frees a slot; so a step never
mixes more adapters than there are slots, and loading never stalls the executor's steps.
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import xxhash

from ..errors import AdapterError
from .config import LoraConfig, PromptAdapterConfig
from .requests import LoRARequest, PromptAdapterRequest
from .runtime import AdapterInstall
from .weights import AdapterWeights, check_adapter_path, load_peft


def fingerprint(path: str) -> int:
    """A 64-bit hash of an adapter's files (names, sizes, modification times): a changed adapter under the same
    id seeds the prefix cache anew."""
    p = Path(path).expanduser().resolve()
    h = xxhash.xxh64(str(p).encode())
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    for f in files:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.intdigest()


@dataclass
class LoadedLora:
    request: LoRARequest
    weights: AdapterWeights
    fingerprint: int


@dataclass
class LoadedPrompt:
    request: PromptAdapterRequest
    table: torch.Tensor  # [tasks, tokens, hidden]
    fingerprint: int

    @property
    def num_tasks(self) -> int:
        return self.table.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.table.shape[1]


@dataclass
class Prepared:
    """A request's adapters, loaded and checked (before anything is enqueued)."""

    lora: Optional[LoadedLora] = None
    prompt: Optional[LoadedPrompt] = None
    task: int = 0
    prompt_rows: int = 0  # rows of a prompt-table slot (PromptAdapterConfig.max_prompt_adapter_token)
    prompt_slots: int = 0

    def core_fields(self, ids: list, slots: tuple[int, int], vocab_size: int) -> dict:
        """core_request's adapter arguments once the request holds `slots` (LoRA slot, prompt slot): its
        virtual tokens (ids >= vocab_size) become rows of its table's slot in the device's table."""
        fields = dict(prompt_ids=ids, adapter_slot=slots[0], cache_salt=self.cache_salt, prompt_table_size=0)
        if self.prompt is not None:
            first = vocab_size + slots[1] * self.prompt_rows + self.task * self.prompt.num_tokens
            fields["prompt_ids"] = [t if t < vocab_size else first + (t - vocab_size) for t in ids]
            fields["prompt_table_size"] = self.prompt_slots * self.prompt_rows
        return fields

    @property
    def cache_salt(self) -> int:
        """The seed of the request's prefix-cache hash chain: its adapter and prompt table (with the task)."""
        h = xxhash.xxh64()
        if self.lora is not None:
            h.update(f"lora:{self.lora.request.lora_int_id}:{self.lora.fingerprint};".encode())
        if self.prompt is not None:
            h.update(f"prompt:{self.prompt.request.prompt_adapter_id}:{self.prompt.fingerprint}:{self.task};".encode())
        return h.intdigest() or 1  # 0 means "no salt"


class _Slots:
    """Device slots of one kind: which adapter id each holds, and the requests using it."""

    def __init__(self, count: int):
        self.keys: list = [None] * count
        self.users: list[set] = [set() for _ in range(count)]
        self.stale = [False] * count  # removed while in use: not matched by id any more
        self.last_used = [0] * count
        self.clock = 0

    def find(self, key) -> Optional[int]:
        for i, k in enumerate(self.keys):
            if k == key and not self.stale[i]:
                return i
        return None

    def free_slot(self) -> Optional[int]:
        """An empty slot, else the least recently used one that no request uses."""
        idle = [i for i in range(len(self.keys)) if not self.users[i]]
        if not idle:
            return None
        empty = [i for i in idle if self.keys[i] is None]
        return empty[0] if empty else min(idle, key=lambda i: self.last_used[i])

    def use(self, slot: int, key, rid: int) -> None:
        self.keys[slot], self.stale[slot] = key, False
        self.users[slot].add(rid)
        self.clock += 1
        self.last_used[slot] = self.clock


class AdapterManager:
    """Loads adapters, assigns device slots, and keeps requests that wait for one.

    `install(AdapterInstall)` hands an install to the runner (or rank 0) before the request that needs it is
    enqueued; `fail(request_id, error)` finishes a waiting request that could not be enqueued."""

    def __init__(self, engine_config: dict, dtype: torch.dtype, install: Callable, fail: Callable,
                 lora: Optional[LoraConfig] = None, prompt: Optional[PromptAdapterConfig] = None):
        self.engine_config, self.dtype = engine_config, dtype
        self.lora_config, self.prompt_config = lora, prompt
        self._install, self._fail = install, fail
        self._lock = threading.RLock()
        self._known: dict[int, LoRARequest] = {}  # add_lora'ed and requested adapters, by id
        self._cache: collections.OrderedDict[int, LoadedLora] = collections.OrderedDict()
        self._prompts: collections.OrderedDict[int, LoadedPrompt] = collections.OrderedDict()
        self._lora_slots = _Slots(lora.max_loras if lora else 0)
        self._prompt_slots = _Slots(prompt.max_prompt_adapters if prompt else 0)
        self._held: dict[int, tuple[int, int]] = {}  # request id -> (LoRA slot, prompt slot), -1 for none
        self._waiting: collections.OrderedDict[int, tuple[Prepared, Callable]] = collections.OrderedDict()
        self.counts = {"installs": 0, "waited": 0}  # adapters put in device slots; requests that waited for one

    # ---------------------------------------------------------------- loading
    def _check_enabled_lora(self) -> LoraConfig:
        if self.lora_config is None:
            raise AdapterError("lora_request needs an LLM started with LoRA enabled: LLM(..., enable_lora=True) or "
                               "LLM(..., lora_config=LoraConfig(...))")
        return self.lora_config

    def load_lora(self, request: LoRARequest) -> LoadedLora:
        """The adapter's loaded weights (from the host cache, else read from its path); AdapterError names why it
        cannot be used."""
        config = self._check_enabled_lora()
        if not isinstance(request, LoRARequest):
            raise AdapterError(f"lora_request must be a LoRARequest, got {type(request).__name__}")
        with self._lock:
            known = self._known.get(request.lora_int_id)
            if known is not None and Path(known.lora_path).expanduser() != Path(request.lora_path).expanduser():
                raise AdapterError(f"lora_int_id {request.lora_int_id} is adapter {known.lora_name!r} from "
                                   f"{known.lora_path}; this request names {request.lora_path} (remove_lora() it "
                                   "first, or give this adapter another id)")
            loaded = self._cache.get(request.lora_int_id)
            if loaded is not None:
                self._cache.move_to_end(request.lora_int_id)
                return loaded
        path = check_adapter_path(request.lora_path)
        source = request.lora_ckpt_source or ("nemo" if path.suffix == ".nemo" else config.lora_ckpt_source)
        if source == "nemo":
            from .nemo import load_nemo_lora

            weights = load_nemo_lora(request.lora_path, self.engine_config, config.max_lora_rank, self.dtype,
                                     config.lora_target_modules)
        else:
            weights = load_peft(request.lora_path, self.engine_config, config.max_lora_rank, self.dtype,
                                config.lora_target_modules)
        loaded = LoadedLora(request, weights, fingerprint(request.lora_path))
        with self._lock:
            self._known.setdefault(request.lora_int_id, request)
            self._cache[request.lora_int_id] = loaded
            while len(self._cache) > config.max_cpu_loras:
                self._cache.popitem(last=False)
        return loaded

    def load_prompt(self, request: PromptAdapterRequest) -> LoadedPrompt:
        if self.engine_config.get("is_encoder_decoder"):
            raise AdapterError("prompt_adapter_request: prompt tables are not supported for encoder-decoder models")
        if self.prompt_config is None:
            raise AdapterError("prompt_adapter_request needs an LLM started with prompt tuning enabled: "
                               "LLM(..., enable_prompt_adapter=True)")
        if not isinstance(request, PromptAdapterRequest):
            raise AdapterError(f"prompt_adapter_request must be a PromptAdapterRequest, got {type(request).__name__}")
        with self._lock:
            loaded = self._prompts.get(request.prompt_adapter_id)
            if loaded is not None:
                if loaded.request.prompt_adapter_local_path != request.prompt_adapter_local_path:
                    raise AdapterError(f"prompt_adapter_id {request.prompt_adapter_id} is the table from "
                                       f"{loaded.request.prompt_adapter_local_path}; this request names "
                                       f"{request.prompt_adapter_local_path}")
                self._prompts.move_to_end(request.prompt_adapter_id)
                return loaded
        from .prompt import load_prompt_table

        table = load_prompt_table(request.prompt_adapter_local_path, self.engine_config["hidden_size"], self.dtype)
        rows = table.shape[0] * table.shape[1]
        if rows > self.prompt_config.max_prompt_adapter_token:
            raise AdapterError(f"prompt table {request.prompt_adapter_local_path} has {table.shape[0]} task(s) of "
                               f"{table.shape[1]} virtual tokens ({rows} rows), more than max_prompt_adapter_token="
                               f"{self.prompt_config.max_prompt_adapter_token}")
        loaded = LoadedPrompt(request, table, fingerprint(request.prompt_adapter_local_path))
        with self._lock:
            self._prompts[request.prompt_adapter_id] = loaded
            while len(self._prompts) > max(self.prompt_config.max_prompt_adapters, 4):
                self._prompts.popitem(last=False)
        return loaded

    def prepare(self, lora_request: Optional[LoRARequest],
                prompt_request: Optional[PromptAdapterRequest]) -> Optional[Prepared]:
        """A request's adapters loaded and checked, or None when it runs the base model alone."""
        if lora_request is not None and not isinstance(lora_request, LoRARequest):
            raise AdapterError(f"lora_request must be a LoRARequest or None, got {type(lora_request).__name__}")
        lora = None if lora_request is None or lora_request.is_base else self.load_lora(lora_request)
        prompt, task = None, 0
        if prompt_request is not None:
            prompt = self.load_prompt(prompt_request)
            task = prompt_request.task_id
            if task >= prompt.num_tasks:
                raise AdapterError(f"task_id={task} is invalid: the prompt table "
                                   f"{prompt_request.prompt_adapter_name!r} has {prompt.num_tasks} task(s)")
            n = prompt_request.prompt_adapter_num_virtual_tokens
            if n is not None and n > prompt.num_tokens:
                raise AdapterError(f"prompt_adapter_num_virtual_tokens={n} is more than the table's "
                                   f"{prompt.num_tokens} virtual tokens per task")
        if lora is None and prompt is None:
            return None
        config = self.prompt_config
        return Prepared(lora, prompt, task, config.max_prompt_adapter_token if config else 0,
                        config.max_prompt_adapters if config else 0)

    # ---------------------------------------------------------------- the registry (add_lora / remove_lora)
    def add_lora(self, request: LoRARequest) -> bool:
        """Load an adapter into the host cache and remember its name (True: newly added)."""
        with self._lock:
            new = request.lora_int_id not in self._known
        self.load_lora(request)
        with self._lock:
            self._known[request.lora_int_id] = request
        return new

    def remove_lora(self, lora_id: int) -> bool:
        """Forget an adapter; its device slot is freed once no request uses it. False when it was unknown."""
        with self._lock:
            known = self._known.pop(lora_id, None) is not None
            cached = self._cache.pop(lora_id, None) is not None
            slot = self._lora_slots.find(lora_id)
            if slot is not None:
                if self._lora_slots.users[slot]:
                    self._lora_slots.stale[slot] = True
                else:
                    self._lora_slots.keys[slot] = None
            return known or cached or slot is not None

    def list_loras(self) -> dict[int, LoRARequest]:
        with self._lock:
            return dict(self._known)

    def by_name(self, name: str) -> Optional[LoRARequest]:
        with self._lock:
            return next((r for r in self._known.values() if r.lora_name == name), None)

    # ---------------------------------------------------------------- slots
    def acquire(self, rid: int, prepared: Prepared) -> Optional[tuple[int, int]]:
        """(LoRA slot, prompt slot) for request `rid` (-1: none), installing its adapters where they are not in
        a slot yet; None (nothing taken) when a slot it needs is held by running requests' adapters."""
        with self._lock:
            picks = []
            for slots, loaded, key in ((self._lora_slots, prepared.lora, "lora"),
                                       (self._prompt_slots, prepared.prompt, "prompt")):
                if loaded is None:
                    picks.append(None)
                    continue
                ident = loaded.request.lora_int_id if key == "lora" else loaded.request.prompt_adapter_id
                slot = slots.find(ident)
                fresh = slot is None
                if fresh:
                    slot = slots.free_slot()
                    if slot is None:
                        return None
                picks.append((slots, slot, ident, fresh, loaded, key))
            held = []
            for pick in picks:
                if pick is None:
                    held.append(-1)
                    continue
                slots, slot, ident, fresh, loaded, key = pick
                if fresh:
                    self.counts["installs"] += 1
                    if key == "lora":
                        self._install(AdapterInstall("lora", slot, linears=loaded.weights.linears))
                    else:
                        table = loaded.table.reshape(-1, loaded.table.shape[-1])
                        self._install(AdapterInstall("prompt", slot, table=table))
                slots.use(slot, ident, rid)
                held.append(slot)
            self._held[rid] = (held[0], held[1])
            return held[0], held[1]

    def wait(self, rid: int, prepared: Prepared, start: Callable[[tuple[int, int]], None]) -> None:
        """Keep request `rid` until a slot frees; then start(slots) enqueues it."""
        with self._lock:
            self._waiting[rid] = (prepared, start)
            self.counts["waited"] += 1

    def cancel(self, rid: int) -> bool:
        """Drop a waiting request (aborted, or the LLM closing); True if it was waiting."""
        with self._lock:
            return self._waiting.pop(rid, None) is not None

    def release(self, rid: int) -> None:
        """Request `rid` left the executor: its slots may serve others; waiting requests that can now get theirs
        are enqueued (in the order they came)."""
        with self._lock:
            held = self._held.pop(rid, None)
            if held is not None:
                for slots, slot in ((self._lora_slots, held[0]), (self._prompt_slots, held[1])):
                    if slot >= 0:
                        slots.users[slot].discard(rid)
                        if not slots.users[slot] and slots.stale[slot]:
                            slots.keys[slot], slots.stale[slot] = None, False
            ready = []
            for wid, (prepared, start) in list(self._waiting.items()):
                got = self.acquire(wid, prepared)
                if got is not None:
                    del self._waiting[wid]
                    ready.append((wid, start, got))
        for wid, start, got in ready:
            try:
                start(got)
            except Exception as e:  # e.g. the executor refused it, or is dead: this request fails alone
                self.release(wid)
                self._fail(wid, e)

    def num_waiting(self) -> int:
        with self._lock:
            return len(self._waiting)

    def slot_keys(self) -> tuple[list, list]:
        """(adapter id per LoRA slot, table id per prompt slot), None where empty (for tests and stats)."""
        with self._lock:
            return list(self._lora_slots.keys), list(self._prompt_slots.keys)


__all__ = ["AdapterManager", "LoadedLora", "LoadedPrompt", "Prepared", "fingerprint"]
