"""Weights by collective broadcast: the trainer's rank 0 and the rollout replicas in a group of their own.

The trainer hosts a TCP store for as long as it runs. For each publication it invites the replicas over HTTP
(``POST /v1/weights/broadcast``, a ``shared.schemas.WeightsBroadcast``), each under a rank of its own; each
replica checks the request against the model it serves, writes ``SESSION/joined/RANK`` into the store (with
the name of the group it still holds from an earlier broadcast, if any) and waits for ``SESSION/members``:
the group's name and the ranks that made it in time, which the trainer writes once all joined (or refused,
or the time ran out). So a replica that refuses never holds the others up. The tensors then travel by
broadcast from rank 0, packed into buckets of bytes in an order both sides derive from the tensor list
(``plan_buckets``); HTTP carries only that list (names, shapes, dtypes), never a tensor.

The group outlives the publication while its members stay the same: when every member still holds the
trainer's group, it is used again; otherwise the trainer names a new one (the session's), which every member
makes on ``NAME/group``, dropping the one it held. Making a gloo group takes about 2 ms, but ending one waits
about 20 ms on each side (measured here), which was a sixth of a 92 MB model's publication. A transfer that
fails drops the group on the side that saw it fail, and the next publication makes a new one.

Why torch's ``ProcessGroupGloo`` / ``ProcessGroupNCCL`` made directly from the store, and not
``init_process_group`` or ``new_group``: those build on the default (WORLD) group, which DeepSpeed owns in the
trainer and vLLM owns in its workers. A backend object made from a store is a group of its own, with the same
constructor on both sides (the trainer need not import vLLM, whose ``StatelessProcessGroup`` and
``PyNcclCommunicator`` would do the same on GPUs only).

Only raw tensor bytes cross the group, and the store holds only ASCII names, flags and rank lists: nothing
from the network is unpickled.
"""

from __future__ import annotations

import socket
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Literal

import torch
import torch.distributed as dist
from transformers.core_model_loading import revert_weight_conversion

Backend = Literal["gloo", "nccl"]

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
"""Safetensors' dtype names (what the served checkpoint's headers say) and torch's dtypes."""
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
IN_FLIGHT = 16
"""Buckets a sender has under way at once (see ``send``)."""
# Every tensor starts at a multiple of this in its bucket: a slice can be viewed as any dtype, and is
# aligned as torch aligns its own CPU tensors.
_ALIGN = 64


class BroadcastError(Exception):
    """Joining the group or moving the tensors failed; the weights that were serving are untouched."""


@dataclass(frozen=True)
class TensorMeta:
    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return DTYPES[self.dtype].itemsize * _numel(self.shape)


def _numel(shape: Sequence[int]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


@dataclass(frozen=True)
class Bucket:
    nbytes: int
    entries: tuple[tuple[int, int], ...]
    """(index into the tensor list, byte offset in the bucket) of each tensor it carries."""


def plan_buckets(tensors: Sequence[TensorMeta], bucket_bytes: int) -> list[Bucket]:
    """The tensors, in order, packed into buckets of at most ``bucket_bytes`` (a larger tensor goes alone)."""
    buckets: list[Bucket] = []
    entries: list[tuple[int, int]] = []
    size = 0
    for index, meta in enumerate(tensors):
        offset = -(-size // _ALIGN) * _ALIGN
        if entries and offset + meta.nbytes > bucket_bytes:
            buckets.append(Bucket(size, tuple(entries)))
            entries, offset = [], 0
        entries.append((index, offset))
        size = offset + meta.nbytes
    if entries:
        buckets.append(Bucket(size, tuple(entries)))
    return buckets


@dataclass(frozen=True)
class Invitation:
    """What a member needs to join one broadcast (``shared.schemas.WeightsBroadcast`` without the version).

    Plain data, so that it also crosses to vLLM's worker processes (``as_dict``)."""

    host: str
    port: int
    session: str
    rank: int
    backend: Backend
    tensors: tuple[TensorMeta, ...]
    bucket_bytes: int
    timeout_s: float

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Invitation:
        tensors = tuple(TensorMeta(t["name"], tuple(t["shape"]), t["dtype"]) for t in data["tensors"])
        return cls(**{**data, "tensors": tensors})


_RENAMINGS: weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple[str, ...], dict[str, str]]] = (
    weakref.WeakKeyDictionary()
)
"""Per model (kept only as long as it lives) and set of its names: checkpoint name → the model's name."""


def checkpoint_tensors(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` (the model's own names) under the served checkpoint's names, as ``save_pretrained`` writes
    them: tied tensors once, and transformers' renaming at load time undone (Qwen2.5-VL keeps
    ``model.language_model.*`` in memory and ``model.*`` on disk). The tensors are the same objects.

    Transformers works the names out in milliseconds a call, a tenth of a publication's time on a 92 MB model,
    so a renaming is worked out once per model and set of names."""
    unique = untied(state)
    known = _RENAMINGS.setdefault(model, {})
    names = tuple(unique)
    if names not in known:
        reverted = revert_weight_conversion(model, unique)
        own = {id(tensor): name for name, tensor in unique.items()}
        if any(id(tensor) not in own for tensor in reverted.values()):
            return reverted  # a conversion that fuses or splits tensors makes new ones: nothing to remember
        known[names] = {checkpoint: own[id(tensor)] for checkpoint, tensor in reverted.items()}
    return {checkpoint: unique[name] for checkpoint, name in known[names].items()}


def untied(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with each tied tensor (lm_head = embeddings) under its first name only, as
    ``save_pretrained`` stores them."""
    unique, seen = {}, set()
    for name, tensor in state.items():
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        unique[name] = tensor
    return unique


def local_address_towards(host: str, port: int) -> str:
    """The address of this machine's interface that reaches ``host`` (no packet is sent)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect((host, port))
        return probe.getsockname()[0]


def describe(tensors: dict[str, torch.Tensor]) -> tuple[TensorMeta, ...]:
    return tuple(TensorMeta(name, tuple(t.shape), DTYPE_NAMES[t.dtype]) for name, t in tensors.items())


@dataclass(frozen=True)
class _Held:
    """A group kept between broadcasts: its name, the invited ranks in it, and this side's invited rank."""

    name: str
    members: tuple[int, ...]
    rank: int
    group: dist.ProcessGroup


class Root:
    """The trainer's end: the TCP store it hosts at ``port`` on every interface (0: a free one, then
    ``self.port``) for as long as it runs, and the group it broadcasts over."""

    def __init__(self, port: int, backend: Backend, bucket_bytes: int, timeout_s: float) -> None:
        self.store = dist.TCPStore(
            "0.0.0.0", port, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=timeout_s)
        )
        self.port = self.store.port
        self.backend, self.bucket_bytes, self.timeout_s = backend, bucket_bytes, timeout_s
        self.held: _Held | None = None
        self.pool: list[torch.Tensor] = []

    def broadcast(
        self,
        session: str,
        invited: Iterable[int],
        gave_up: Callable[[int], bool],
        address: str,
        tensors: dict[str, torch.Tensor],
    ) -> list[int]:
        """Send ``tensors`` to the invited ranks that join ``session`` (see ``open``); returns them.
        ``address`` is this machine's, as the members reach it."""
        invited = list(invited)
        try:
            group, members = self.open(session, invited, gave_up, address)
            if group is not None:
                send(group, list(tensors.values()), describe(tensors), self.bucket_bytes, self.pool)
        except RuntimeError as error:  # gloo's and NCCL's errors (a member gone, a timeout)
            self.held = None
            raise BroadcastError(f"broadcasting to ranks {invited} failed: {error}") from error
        return members

    def open(
        self, session: str, invited: Iterable[int], gave_up: Callable[[int], bool], address: str
    ) -> tuple[dist.ProcessGroup | None, list[int]]:
        """Wait until every invited rank joined, or gave up (its request failed), or ``timeout_s`` passed.
        Returns the group of those that joined (None when none did) and their ranks: the group held since an
        earlier broadcast if they are its members and all still hold it, else a new one."""
        waiting, holds = set(invited), {}
        deadline = time.monotonic() + self.timeout_s
        while waiting and time.monotonic() < deadline:
            for rank in sorted(waiting):
                key = f"{session}/joined/{rank}"
                if self.store.check([key]):
                    holds[rank] = self.store.get(key).decode("ascii", "replace")
                    waiting.discard(rank)
                elif gave_up(rank):
                    waiting.discard(rank)
            if waiting:
                # The replicas join as soon as their running requests finish: a poll in milliseconds will do.
                time.sleep(0.002)
        members = tuple(sorted(holds))
        held = self.held
        kept = held is not None and held.members == members and all(holds[r] == held.name for r in members)
        if not kept:
            self.held = None  # ends the group the members are leaving
        name = held.name if kept and held is not None else session
        self.store.set(f"{session}/members", f"{name}:{','.join(map(str, members))}")
        if not members:
            return None, []
        if self.held is None:
            group = _group(self.store, name, 0, len(members) + 1, self.backend, address, self.timeout_s)
            self.held = _Held(name, members, 0, group)
        return self.held.group, list(members)


def _group(
    store: dist.Store, name: str, rank: int, size: int, backend: Backend, address: str, timeout_s: float
) -> dist.ProcessGroup:
    """The group called ``name``, made on the store's keys under ``NAME/group``."""
    store = dist.PrefixStore(f"{name}/group", store)
    timeout = timedelta(seconds=timeout_s)
    if backend == "gloo":
        options = dist.ProcessGroupGloo._Options()
        # On the interface that reaches the other side; gloo's default resolves the host name, which often
        # means a loopback address.
        options._devices = [dist.ProcessGroupGloo.create_device(hostname=address)]
        options._timeout = timeout
        return dist.ProcessGroupGloo(store, rank, size, options)
    options = dist.ProcessGroupNCCL.Options()
    options._timeout = timeout
    return dist.ProcessGroupNCCL(store, rank, size, options)


def _device(backend: Backend) -> torch.device:
    return torch.device("cpu") if backend == "gloo" else torch.device("cuda", torch.cuda.current_device())


def send(
    group: dist.ProcessGroup,
    tensors: Sequence[torch.Tensor],
    metas: Sequence[TensorMeta],
    bucket_bytes: int,
    pool: list[torch.Tensor],
    in_flight: int = IN_FLIGHT,
) -> None:
    """Broadcast ``tensors`` (described by ``metas``) to the group, bucket by bucket.

    Each bucket is sent as soon as it is packed, with at most ``in_flight`` of them under way: packing
    overlaps sending, gloo moves several buckets at once, and the sender's extra memory stays at
    ``in_flight × bucket_bytes`` instead of a second copy of the model (which would not fit beside a 7B
    policy on its GPU). ``pool`` keeps those packing buffers from one call to the next, since on CPU memory
    written for the first time costs a page fault per 4 KiB. A bucket of one tensor goes unpacked."""
    backend: Backend = "gloo" if isinstance(group, dist.ProcessGroupGloo) else "nccl"
    device = _device(backend)
    sending: deque[dist.Work] = deque()
    for number, bucket in enumerate(plan_buckets(metas, bucket_bytes)):
        if len(sending) >= in_flight:
            sending.popleft().wait()
        first = tensors[bucket.entries[0][0]].detach()
        if len(bucket.entries) == 1 and (first.device == device or bucket.nbytes > bucket_bytes):
            buffer = first.to(device).contiguous().reshape(-1).view(torch.uint8)
        else:
            buffer = _packing_buffer(pool, number % in_flight, bucket_bytes, device)[: bucket.nbytes]
            for index, offset in bucket.entries:
                data = tensors[index].detach().contiguous().reshape(-1).view(torch.uint8)
                buffer[offset : offset + data.numel()].copy_(data)
        sending.append(group.broadcast(buffer, 0))
    for work in sending:
        work.wait()


def _packing_buffer(pool: list[torch.Tensor], slot: int, nbytes: int, device: torch.device) -> torch.Tensor:
    """The pool's buffer ``slot``, of ``nbytes`` on ``device``; made on first use."""
    while len(pool) <= slot:
        pool.append(torch.empty(0, dtype=torch.uint8))
    if (pool[slot].numel(), pool[slot].device) != (nbytes, device):
        pool[slot] = torch.empty(nbytes, dtype=torch.uint8, device=device)
    return pool[slot]


class Member:
    """A replica's end: it joins the broadcasts it is invited to, and keeps the group between them."""

    def __init__(self) -> None:
        self.held: _Held | None = None

    def join(self, invitation: Invitation) -> dist.ProcessGroup:
        """Join the trainer's group as ``invitation.rank``; ``BroadcastError`` if the trainer left it out."""
        where, session, rank = f"{invitation.host}:{invitation.port}", invitation.session, invitation.rank
        held = self.held if self.held is not None and self.held.rank == rank else None
        try:
            store = dist.TCPStore(
                invitation.host,
                invitation.port,
                is_master=False,
                wait_for_workers=False,
                timeout=timedelta(seconds=invitation.timeout_s),
            )
            store.set(f"{session}/joined/{rank}", held.name if held is not None else "")
            store.wait([f"{session}/members"])
            name, _, listed = store.get(f"{session}/members").decode("ascii").partition(":")
            members = tuple(int(r) for r in listed.split(",") if r.isdigit())
            if rank not in members:
                self.held = None
                raise BroadcastError(f"the trainer at {where} went on without rank {rank}")
            if held is None or (held.name, held.members) != (name, members):
                self.held = None  # ends the group the trainer left
                address = local_address_towards(invitation.host, invitation.port)
                group_rank, size = members.index(rank) + 1, len(members) + 1
                backend, timeout_s = invitation.backend, invitation.timeout_s
                group = _group(store, name, group_rank, size, backend, address, timeout_s)
                self.held = _Held(name, members, rank, group)
            return self.held.group
        # torch's store and group errors are RuntimeErrors (DistStoreError, DistNetworkError are among them).
        except (RuntimeError, OSError, UnicodeDecodeError) as error:
            self.held = None
            raise BroadcastError(f"cannot join the group at {where}: {error}") from error

    def receive(
        self, invitation: Invitation, into: Sequence[torch.Tensor] = ()
    ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
        """Join the group and receive every tensor; returns them (views of the buckets) and the buckets.

        ``into`` are an earlier receive's buckets, which nothing uses any more: each is written over where its
        size is the bucket's. On CPU, memory written for the first time costs a page fault per 4 KiB, and for
        a 92 MB model that took as long as the transfer itself (measured with gloo between two processes).

        Nothing is written into a model until the last bucket is in, so that a transfer that fails half-way
        leaves the serving weights whole (at the cost of one copy of the weights, as loading a checkpoint
        has)."""
        group = self.join(invitation)
        device = _device(invitation.backend)
        buckets = plan_buckets(invitation.tensors, invitation.bucket_bytes)
        spare = list(into)
        buffers = [
            spare[i]
            if i < len(spare) and (spare[i].numel(), spare[i].device) == (bucket.nbytes, device)
            else torch.empty(bucket.nbytes, dtype=torch.uint8, device=device)
            for i, bucket in enumerate(buckets)
        ]
        try:
            # Every bucket is posted at once, as the root sends them (see ``send``).
            for work in [group.broadcast(buffer, 0) for buffer in buffers]:
                work.wait()
        except RuntimeError as error:  # gloo's and NCCL's errors (a peer gone, a timeout)
            self.held = None
            raise BroadcastError(f"receiving the weights failed: {error}") from error
        received: dict[str, torch.Tensor] = {}
        for bucket, buffer in zip(buckets, buffers, strict=True):
            for index, offset in bucket.entries:
                meta = invitation.tensors[index]
                data = buffer[offset : offset + meta.nbytes]
                received[meta.name] = data.view(DTYPES[meta.dtype]).view(meta.shape)
        return received, buffers


def copy_into(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Put checkpoint-named ``tensors`` into ``model``'s own parameters and buffers. A parameter of the same
    dtype and device takes the received tensor as its data (no copy: on CPU the copy cost as much as the
    transfer); the others are copied into, cast. Raises ``ValueError`` before touching anything if the
    names or shapes do not match."""
    targets = checkpoint_tensors(model, model.state_dict())
    owned = {tensor.data_ptr() for tensor in [*model.parameters(), *model.buffers()]}
    problems = [f"unexpected {name}" for name in sorted(tensors.keys() - targets.keys())]
    problems += [f"missing {name}" for name in sorted(targets.keys() - tensors.keys())]
    problems += [
        f"{name} has shape {list(tensor.shape)}, the model needs {list(targets[name].shape)}"
        for name, tensor in tensors.items()
        if name in targets and tensor.shape != targets[name].shape
    ]
    # Renaming keeps the model's own tensors; a conversion that splits or fuses them makes new ones.
    problems += [
        f"{name} is not one of the model's tensors"
        for name, t in targets.items()
        if t.data_ptr() not in owned
    ]
    if problems:
        raise ValueError("; ".join(problems[:5]))
    # Tied parameters are one object, so setting its data sets every name it has.
    parameters = {parameter.data_ptr(): parameter for parameter in model.parameters() if parameter.numel()}
    with torch.no_grad():
        for name, tensor in tensors.items():
            parameter = parameters.get(targets[name].data_ptr())
            if parameter is not None and (parameter.dtype, parameter.device) == (tensor.dtype, tensor.device):
                parameter.data = tensor
            else:
                targets[name].copy_(tensor)
