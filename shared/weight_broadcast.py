"""Weights by collective broadcast: the trainer's rank 0 and the rollout replicas in a group of their own.

The trainer hosts a TCP store for as long as it runs. For each publication it invites the replicas over HTTP
(``POST /v1/weights/broadcast``, a ``shared.schemas.WeightsBroadcast``), each under a rank of its own; each
replica checks the request against the model it serves, writes ``SESSION/joined/RANK`` into the store and
waits for ``SESSION/members``, the ranks that made it in time, which the trainer writes once all joined (or
refused, or the time ran out). So a replica that refuses never holds the others up. The members and the
trainer then make a group on ``SESSION/group`` and the tensors travel by broadcast from rank 0, packed into
buckets of bytes in an order both sides derive from the tensor list (``plan_buckets``); HTTP carries only that
list (names, shapes, dtypes), never a tensor.

Why torch's ``ProcessGroupGloo`` / ``ProcessGroupNCCL`` made directly from the store, and not
``init_process_group`` or ``new_group``: those build on the default (WORLD) group, which DeepSpeed owns in the
trainer and vLLM owns in its workers. A backend object made from a store is a group of its own, with the same
constructor on both sides (the trainer need not import vLLM, whose ``StatelessProcessGroup`` and
``PyNcclCommunicator`` would do the same on GPUs only). A group is made per publication: the replicas that
answer change from step to step, and making one costs milliseconds against the transfer (measured in
``bench/train_step.py``).

Only raw tensor bytes cross the group, and the store holds only ASCII flags and rank lists: nothing from the
network is unpickled.
"""

from __future__ import annotations

import socket
import time
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


def checkpoint_tensors(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` (the model's own names) under the served checkpoint's names, as ``save_pretrained`` writes
    them: tied tensors once, and transformers' renaming at load time undone (Qwen2.5-VL keeps
    ``model.language_model.*`` in memory and ``model.*`` on disk). The tensors are the same objects."""
    unique, seen = {}, set()
    for name, tensor in state.items():
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        unique[name] = tensor
    return revert_weight_conversion(model, unique)


def local_address_towards(host: str, port: int) -> str:
    """The address of this machine's interface that reaches ``host`` (no packet is sent)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect((host, port))
        return probe.getsockname()[0]


def describe(tensors: dict[str, torch.Tensor]) -> tuple[TensorMeta, ...]:
    return tuple(TensorMeta(name, tuple(t.shape), DTYPE_NAMES[t.dtype]) for name, t in tensors.items())


class Root:
    """The trainer's end: the TCP store it hosts at ``port`` on every interface (0: a free one, then
    ``self.port``) for as long as it runs, and a group of its own per broadcast."""

    def __init__(self, port: int, backend: Backend, bucket_bytes: int, timeout_s: float) -> None:
        self.store = dist.TCPStore(
            "0.0.0.0", port, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=timeout_s)
        )
        self.port = self.store.port
        self.backend, self.bucket_bytes, self.timeout_s = backend, bucket_bytes, timeout_s

    def broadcast(
        self,
        session: str,
        invited: Iterable[int],
        gave_up: Callable[[int], bool],
        address: str,
        tensors: dict[str, torch.Tensor],
    ) -> list[int]:
        """Send ``tensors`` to the invited ranks that join ``session`` (see ``open_as_root``); returns them.
        ``address`` is this machine's, as the members reach it."""
        invited = list(invited)
        try:
            group, members = open_as_root(
                self.store, session, invited, gave_up, self.backend, address, self.timeout_s
            )
            if group is not None:
                send(group, list(tensors.values()), describe(tensors), self.bucket_bytes)
        except RuntimeError as error:  # gloo's and NCCL's errors (a member gone, a timeout)
            raise BroadcastError(f"broadcasting to ranks {invited} failed: {error}") from error
        return members


def _group(
    store: dist.Store, rank: int, size: int, backend: Backend, address: str, timeout_s: float
) -> dist.ProcessGroup:
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


def open_as_root(
    store: dist.Store,
    session: str,
    invited: Iterable[int],
    gave_up: Callable[[int], bool],
    backend: Backend,
    address: str,
    timeout_s: float,
) -> tuple[dist.ProcessGroup | None, list[int]]:
    """Wait until every invited rank joined, or gave up (its request failed), or ``timeout_s`` passed; then
    make the group of those that joined. Returns it (None when none joined) and their ranks."""
    waiting, joined = set(invited), []
    deadline = time.monotonic() + timeout_s
    while waiting and time.monotonic() < deadline:
        for rank in sorted(waiting):
            if store.check([f"{session}/joined/{rank}"]):
                joined.append(rank)
                waiting.discard(rank)
            elif gave_up(rank):
                waiting.discard(rank)
        if waiting:
            # The replicas join as soon as their running requests finish: a poll in milliseconds is plenty.
            time.sleep(0.002)
    members = sorted(joined)
    store.set(f"{session}/members", ",".join(map(str, members)))
    if not members:
        return None, []
    group_store = dist.PrefixStore(f"{session}/group", store)
    return _group(group_store, 0, len(members) + 1, backend, address, timeout_s), members


def send(
    group: dist.ProcessGroup,
    tensors: Sequence[torch.Tensor],
    metas: Sequence[TensorMeta],
    bucket_bytes: int,
    in_flight: int = IN_FLIGHT,
) -> None:
    """Broadcast ``tensors`` (described by ``metas``) to the group, bucket by bucket.

    Each bucket is sent as soon as it is packed, with at most ``in_flight`` of them under way: packing
    overlaps sending, gloo moves several buckets at once, and the sender's extra memory stays at
    ``in_flight × bucket_bytes`` instead of a second copy of the model (which would not fit beside a 7B
    policy on its GPU)."""
    backend: Backend = "gloo" if isinstance(group, dist.ProcessGroupGloo) else "nccl"
    device = _device(backend)
    sending: deque[tuple[dist.Work, torch.Tensor]] = deque()
    for bucket in plan_buckets(metas, bucket_bytes):
        if len(sending) >= in_flight:
            sending.popleft()[0].wait()
        buffer = torch.empty(bucket.nbytes, dtype=torch.uint8, device=device)
        for index, offset in bucket.entries:
            data = tensors[index].detach().contiguous().reshape(-1).view(torch.uint8)
            buffer[offset : offset + data.numel()].copy_(data)
        sending.append((group.broadcast(buffer, 0), buffer))  # the buffer lives until its work is done
    for work, _ in sending:
        work.wait()


def join(invitation: Invitation) -> dist.ProcessGroup:
    """Join the trainer's group as ``invitation.rank``; ``BroadcastError`` if the trainer left it out."""
    where, session = f"{invitation.host}:{invitation.port}", invitation.session
    try:
        store = dist.TCPStore(
            invitation.host,
            invitation.port,
            is_master=False,
            wait_for_workers=False,
            timeout=timedelta(seconds=invitation.timeout_s),
        )
        store.set(f"{session}/joined/{invitation.rank}", "1")
        store.wait([f"{session}/members"])
        text = store.get(f"{session}/members").decode("ascii")
        members = [int(rank) for rank in text.split(",") if rank.isdigit()]
        if invitation.rank not in members:
            raise BroadcastError(f"the trainer at {where} went on without rank {invitation.rank}")
        address = local_address_towards(invitation.host, invitation.port)
        group_store = dist.PrefixStore(f"{session}/group", store)
        rank, size = members.index(invitation.rank) + 1, len(members) + 1
        return _group(group_store, rank, size, invitation.backend, address, invitation.timeout_s)
    # torch's store and group errors are RuntimeErrors (DistStoreError, DistNetworkError are among them).
    except (RuntimeError, OSError, UnicodeDecodeError) as error:
        raise BroadcastError(f"cannot join the group at {where}: {error}") from error


def receive(invitation: Invitation) -> dict[str, torch.Tensor]:
    """Join the group and receive every tensor, into CPU memory of this process's own.

    Nothing is written into a model until the last bucket is in, so that a transfer that fails half-way
    leaves the serving weights whole (at the cost of one copy of the weights, as loading a checkpoint has)."""
    group = join(invitation)
    device = _device(invitation.backend)
    received: dict[str, torch.Tensor] = {}
    buckets = plan_buckets(invitation.tensors, invitation.bucket_bytes)
    try:
        # Every bucket is posted at once, as the root sends them (see ``send``).
        buffers = [torch.empty(bucket.nbytes, dtype=torch.uint8, device=device) for bucket in buckets]
        for work in [group.broadcast(buffer, 0) for buffer in buffers]:
            work.wait()
        for bucket, buffer in zip(buckets, buffers, strict=True):
            staged = buffer.cpu()
            for index, offset in bucket.entries:
                meta = invitation.tensors[index]
                data = staged[offset : offset + meta.nbytes]
                received[meta.name] = data.view(DTYPES[meta.dtype]).view(meta.shape)
    except RuntimeError as error:  # gloo's and NCCL's errors (a peer gone, a timeout)
        raise BroadcastError(f"receiving the weights failed: {error}") from error
    return received


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
