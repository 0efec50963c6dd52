"""Weight sync by collective broadcast (``sync.mode: broadcast``) over gloo, into the transformers backend.

The servers are real (uvicorn on real ports); one runs in the test's own process so that its model's tensors
can be compared with the trainer's, tensor by tensor. The group mechanics are checked on their own first.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import torch
from pydantic import SecretStr
from servers import app_in_a_thread, running_server

from rollout_server.app import create_app
from rollout_server.config import RolloutSettings
from rollout_server.transformers_backend import TransformersBackend
from shared import weight_broadcast as wb
from shared.launch import free_port
from shared.schemas import MIN_BUCKET_BYTES, TensorSpec, WeightsBroadcast
from shared.tiny_model import build_tiny_model
from shared.vlm import load_model
from trainer.clients import Broadcast, ReplicaError, RolloutReplicas
from trainer.sync import Publisher

API_KEY = "broadcast-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
CHAT = {
    "messages": [{"role": "user", "content": "What colour is the shape?"}],
    "max_tokens": 8,
    "temperature": 0,
    "logprobs": True,
}


# --- the group on its own ------------------------------------------------------------------------------


def test_buckets_keep_the_order_align_every_tensor_and_give_a_large_one_a_bucket_of_its_own():
    tensors = (
        wb.TensorMeta("a", (3,), "F32"),  # 12 bytes
        wb.TensorMeta("b", (5,), "BF16"),  # 10 bytes, at 64
        wb.TensorMeta("big", (100,), "F64"),  # 800 bytes: alone
        wb.TensorMeta("c", (1,), "U8"),
    )
    buckets = wb.plan_buckets(tensors, bucket_bytes=128)
    assert [b.entries for b in buckets] == [((0, 0), (1, 64)), ((2, 0),), ((3, 0),)]
    assert [b.nbytes for b in buckets] == [74, 800, 1]


def receive_in_a_thread(invitation: wb.Invitation, results: dict) -> threading.Thread:
    def run() -> None:
        try:
            results[invitation.rank] = wb.Member().receive(invitation)
        except wb.BroadcastError as error:
            results[invitation.rank] = error

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_the_members_that_join_receive_every_tensor_bit_for_bit_and_a_late_one_is_told():
    torch.manual_seed(0)
    tensors = {
        "w": torch.randn(64, 33),
        "h": torch.randn(7).to(torch.bfloat16),
        "ids": torch.arange(-5, 5),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5, dtype=torch.float64),
        "big": torch.randn(300_000),  # larger than a bucket
    }
    # More buckets than a sender keeps in flight, so that it waits for the first ones before packing more.
    tensors |= {f"layer{i}": torch.randn(200_000) for i in range(2 * wb.IN_FLIGHT)}
    assert len(wb.plan_buckets(wb.describe(tensors), MIN_BUCKET_BYTES)) > wb.IN_FLIGHT
    root = wb.Root(0, "gloo", bucket_bytes=MIN_BUCKET_BYTES, timeout_s=30)
    results: dict = {}
    threads = [
        receive_in_a_thread(
            wb.Invitation(
                "127.0.0.1", root.port, "s1", rank, "gloo", wb.describe(tensors), MIN_BUCKET_BYTES, 30
            ),
            results,
        )
        for rank in (1, 2)
    ]
    # Rank 3 never joins: its request failed, as a refused invitation does.
    members = root.broadcast("s1", [1, 2, 3], lambda rank: rank == 3, "127.0.0.1", tensors)
    for thread in threads:
        thread.join()
    assert members == [1, 2]
    for rank in members:
        received, _ = results[rank]
        assert received.keys() == tensors.keys()
        for name, tensor in tensors.items():
            assert received[name].dtype == tensor.dtype and torch.equal(received[name], tensor), name
    late = wb.Invitation("127.0.0.1", root.port, "s1", 3, "gloo", wb.describe(tensors), MIN_BUCKET_BYTES, 30)
    with pytest.raises(wb.BroadcastError, match="went on without rank 3"):
        wb.Member().join(late)


# --- into a rollout server ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def new_weights(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """Another tiny model of the same layout (seed 1): its folder, and its tensors under checkpoint names,
    as the trainer broadcasts them."""
    folder = build_tiny_model(tmp_path_factory.mktemp("new"), seed=1)
    model = load_model(folder, dtype=torch.float32)
    return folder, {name: t.clone() for name, t in wb.checkpoint_tensors(model, model.state_dict()).items()}


@pytest.fixture
def in_process_server(tiny: Path) -> Iterator[tuple[str, TransformersBackend]]:
    """A rollout server in this process, and its backend, whose model the test can read."""
    backend = TransformersBackend(str(tiny))
    app = create_app(RolloutSettings(model=str(tiny), api_key=API_KEY), backend)
    with app_in_a_thread(app) as port:
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(timeout=60) as client:
            wait_until_ready(client, url)
        yield url, backend


def wait_until_ready(client: httpx.Client, url: str) -> None:
    for _ in range(600):
        if client.get(url + "/ready").status_code == 200:
            return
        threading.Event().wait(0.1)
    raise AssertionError(f"{url} never became ready")


def replicas_of(*urls: str) -> RolloutReplicas:
    return RolloutReplicas(list(urls), None, SecretStr(API_KEY), timeout_s=60, attempts=1, outage_s=0)


def load_by_value(client: httpx.Client, url: str, folder: Path) -> None:
    """The folder's weights, sent as version 1 in the request body: what broadcast is compared with."""
    loaded = client.post(
        url + "/v1/weights/tensors",
        params={"version": 1},
        content=(folder / "model.safetensors").read_bytes(),
        headers={"Content-Type": "application/octet-stream"},
    )
    assert loaded.status_code == 200, loaded.text


def served_tensors(backend: TransformersBackend) -> dict[str, torch.Tensor]:
    return wb.checkpoint_tensors(backend.model, backend.model.state_dict())


def test_a_broadcast_lands_in_the_served_model_tensor_by_tensor_and_samples_as_a_load_by_value_does(
    in_process_server, new_weights, tiny, tmp_path
):
    url, backend = in_process_server
    folder, weights = new_weights
    before = {name: t.clone() for name, t in served_tensors(backend).items()}
    assert any(not torch.equal(before[name], weights[name]) for name in weights)
    root = wb.Root(0, "gloo", bucket_bytes=MIN_BUCKET_BYTES, timeout_s=60)
    replicas = replicas_of(url)
    assert replicas.publish(1, broadcast=Broadcast(root, weights)) == [url]
    served = served_tensors(backend)
    assert served.keys() == weights.keys()
    for name, tensor in weights.items():
        assert torch.equal(served[name], tensor), name
    with httpx.Client(timeout=60, headers=AUTH) as client:
        assert client.get(url + "/v1/weights").json()["version"] == 1
        by_broadcast = client.post(url + "/v1/chat/completions", json=CHAT).json()
    # The same weights, loaded by value into a server of its own: the same tokens and log-probs.
    server = running_server("rollout-server", ["--model", str(tiny)], tmp_path)
    with server as other, httpx.Client(timeout=60) as client:
        load_by_value(client, other.url, folder)
        by_value = client.post(other.url + "/v1/chat/completions", json=CHAT).json()
    assert (
        len(by_broadcast["choices"][0]["logprobs"]["content"])
        == by_broadcast["usage"]["completion_tokens"]
        > 0
    )
    assert same_completion(by_broadcast, by_value)


def test_checkpoint_names_are_transformers_own_and_the_tensors_those_passed_each_time(new_weights):
    """The renaming is remembered per model and set of names; the tensors must still be this call's."""
    from transformers.core_model_loading import revert_weight_conversion

    folder, _ = new_weights
    model = load_model(folder, dtype=torch.float32)
    for _ in range(2):
        state = model.state_dict()  # tensor objects of this call's own
        named = wb.checkpoint_tensors(model, state)
        expected = revert_weight_conversion(model, {n: t for n, t in state.items() if n != "lm_head.weight"})
        assert named.keys() == expected.keys() and any(n.startswith("model.layers.") for n in named)
        assert all(named[name] is tensor for name, tensor in expected.items())


def test_broadcasts_keep_their_group_and_land_in_two_sets_of_buckets_by_turns(in_process_server, new_weights):
    """Ending a gloo group waits about 20 ms on each side, so the group is kept while its members stay.
    Fresh memory costs a page fault per 4 KiB as it is first written, so the backend receives into the
    buckets of the broadcast before last, which the model no longer uses, and never into those it serves."""
    url, backend = in_process_server
    _, weights = new_weights
    doubled = {name: t * 2 if t.is_floating_point() else t for name, t in weights.items()}
    replicas = replicas_of(url)

    def publish(root: wb.Root, version: int, tensors: dict[str, torch.Tensor]) -> set[int]:
        """Where the served parameters live once ``tensors`` serve as ``version``."""
        assert replicas.publish(version, broadcast=Broadcast(root, tensors)) == [url]
        served = served_tensors(backend)
        assert all(torch.equal(served[name], tensor) for name, tensor in tensors.items())
        assert root.held is not None and backend._member.held is not None
        assert backend._member.held.name == root.held.name
        return {parameter.untyped_storage().data_ptr() for parameter in backend.model.parameters()}

    root = wb.Root(0, "gloo", bucket_bytes=MIN_BUCKET_BYTES, timeout_s=60)
    first = publish(root, 1, weights)
    group = root.held.group
    assert publish(root, 2, doubled).isdisjoint(first)
    assert publish(root, 3, weights) == first
    assert root.held.group is group
    # A trainer started again: the replica leaves the group it held for the new trainer's.
    again = wb.Root(0, "gloo", bucket_bytes=MIN_BUCKET_BYTES, timeout_s=60)
    publish(again, 4, doubled)
    assert backend._member.held.group is not group


def same_completion(first: dict, second: dict) -> bool:
    """The same tokens, and log-probs equal to float noise: a broadcast model's tensors live in the received
    buckets, at other addresses than a loaded model's, and CPU kernels may then sum in another order."""
    one, two = first["choices"][0]["logprobs"]["content"], second["choices"][0]["logprobs"]["content"]
    return [t["token"] for t in one] == [t["token"] for t in two] and all(
        abs(a["logprob"] - b["logprob"]) < 1e-5 for a, b in zip(one, two, strict=True)
    )


def invitation(weights: dict[str, torch.Tensor], **changes) -> dict:
    body = WeightsBroadcast(
        version=1,
        host="127.0.0.1",
        port=1,
        session="s",
        rank=1,
        backend="gloo",
        tensors=[TensorSpec(name=m.name, shape=list(m.shape), dtype=m.dtype) for m in wb.describe(weights)],
        bucket_bytes=MIN_BUCKET_BYTES,
        timeout_s=1,
    ).model_dump()
    return {**body, **changes}


def test_an_invitation_that_does_not_fit_is_refused_before_joining_and_names_the_field(
    in_process_server, new_weights
):
    url, backend = in_process_server
    _, weights = new_weights
    specs = invitation(weights)["tensors"]
    wrong_shape = [{**specs[0], "shape": [1, 2]}, *specs[1:]]
    cases = [
        (invitation(weights, tensors=specs[1:]), 422, "tensors", "missing"),
        (invitation(weights, tensors=wrong_shape), 422, "tensors", "has shape [1, 2]"),
        (invitation(weights, tensors=[*specs, specs[0]]), 422, f"tensors.{len(specs)}.name", "twice"),
        (invitation(weights, backend="nccl"), 422, "backend", "CUDA"),
        (invitation(weights, version=0), 409, "version", "not newer"),
        (invitation(weights, bucket_bytes=1), 422, "bucket_bytes", ""),
        (invitation(weights, session="a/b"), 422, "session", ""),
        # Nothing listens at port 1: the join fails within timeout_s, and the old weights keep serving.
        (invitation(weights), 422, "host", "old weights keep serving"),
    ]
    before = {name: t.clone() for name, t in served_tensors(backend).items()}
    with httpx.Client(timeout=60, headers=AUTH) as client:
        assert (
            client.post(
                url + "/v1/weights/broadcast", json=cases[0][0], headers={"Authorization": ""}
            ).status_code
            == 401
        )
        for body, status, field, words in cases:
            response = client.post(url + "/v1/weights/broadcast", json=body)
            error = response.json()["error"]
            assert (response.status_code, error["field"]) == (status, field), response.text
            assert words in error["message"]
        assert client.get(url + "/v1/weights").json()["version"] == 0
    # Through the trainer's client: when every replica refuses the tensors, the publication stops at once.
    root = wb.Root(0, "gloo", bucket_bytes=MIN_BUCKET_BYTES, timeout_s=60)
    partial = dict(list(weights.items())[1:])
    with pytest.raises(ReplicaError, match=r"refused the weights of version 1: .*missing"):
        replicas_of(url).publish(1, broadcast=Broadcast(root, partial))
    served = served_tensors(backend)
    assert all(torch.equal(served[name], before[name]) for name in before)


def test_a_replica_that_refuses_is_set_aside_without_holding_the_others_up_and_catches_up_when_back(
    in_process_server, new_weights, tiny, tmp_path
):
    url, backend = in_process_server
    _, weights = new_weights
    port = free_port()
    away = f"http://127.0.0.1:{port}"
    root = wb.Root(0, "gloo", bucket_bytes=MIN_BUCKET_BYTES, timeout_s=60)
    broadcast = Broadcast(root, weights)
    replicas = replicas_of(url, away)
    # One replica is down: the other gets the weights, and the one that is down is set aside.
    assert replicas.publish(1, broadcast=broadcast) == [url]
    assert list(replicas.dead) == [away]
    served = served_tensors(backend)
    assert all(torch.equal(served[name], weights[name]) for name in weights)
    # It comes back: the publisher's catch-up broadcasts the current version to it alone.
    config = SimpleNamespace(sync=SimpleNamespace(mode="broadcast"))
    publisher = Publisher(policy=None, replicas=replicas, config=config)  # type: ignore[arg-type]
    publisher.version, publisher.last_broadcast = 1, broadcast
    with running_server("rollout-server", ["--model", str(tiny), "--api-key", API_KEY], tmp_path, port=port):
        publisher.catch_up()
        assert replicas.versions() == {url: 1, away: 1}
        with httpx.Client(timeout=60, headers=AUTH) as client:
            again = client.post(away + "/v1/chat/completions", json=CHAT).json()
            here = client.post(url + "/v1/chat/completions", json=CHAT).json()
        assert same_completion(again, here)
        # Each was in a group of its own; together they make a new one, and both serve what it brought.
        doubled = {name: t * 2 if t.is_floating_point() else t for name, t in weights.items()}
        assert replicas.publish(2, broadcast=Broadcast(root, doubled)) == [url, away]
        assert root.held is not None and root.held.members == (1, 2)
        served = served_tensors(backend)
        assert all(torch.equal(served[name], doubled[name]) for name in doubled)
        with httpx.Client(timeout=60, headers=AUTH) as client:
            answers = [client.post(u + "/v1/chat/completions", json=CHAT).json() for u in (url, away)]
    assert same_completion(*answers)


@pytest.mark.gpu
@pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="NCCL needs a GPU per rank: the trainer's and the server's"
)
def test_a_broadcast_over_nccl_serves_as_a_load_by_value_does(new_weights, tiny, tmp_path):
    """The same as over gloo, with the trainer on GPU 0 and the server's receiving end on GPU 1."""
    folder, weights = new_weights
    root = wb.Root(0, "nccl", bucket_bytes=MIN_BUCKET_BYTES, timeout_s=120)
    on_gpu = {name: tensor.to("cuda:0") for name, tensor in weights.items()}
    args = ["--model", str(tiny), "--api-key", API_KEY]
    second_gpu = {"CUDA_VISIBLE_DEVICES": "1"}
    with (
        running_server("rollout-server", args, tmp_path, env=second_gpu) as by_nccl,
        running_server("rollout-server", args, tmp_path) as by_value,
        httpx.Client(timeout=120, headers=AUTH) as client,
    ):
        assert replicas_of(by_nccl.url).publish(1, broadcast=Broadcast(root, on_gpu)) == [by_nccl.url]
        load_by_value(client, by_value.url, folder)
        answers = [client.post(s.url + "/v1/chat/completions", json=CHAT).json() for s in (by_nccl, by_value)]
    assert same_completion(*answers)
