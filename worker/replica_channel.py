"""The channels between the trainers of a replica group: the leader's commands over the
group's process group (``send``/``receive``), and a follower's requests for the leader through
the group's store (``forward``; the leader's ``serve_inbox`` answers them). Typed, versioned
JSON (``contracts.replica_group``), never pickled."""

from __future__ import annotations

import logging
import secrets
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from hogwild.contracts.protocol import Reply, Request
from hogwild.contracts.replica_group import ForwardedRequest, GroupEnvelope

logger = logging.getLogger("hogwild.worker")

FORWARD_TIMEOUT_S = 60.0  # a follower waits this long for the leader's answer to a forwarded request


def send(group, envelope: GroupEnvelope) -> None:
    """The leader: one command to every replica of ``group`` (a length, then the JSON bytes)."""
    data = torch.frombuffer(bytearray(envelope.model_dump_json().encode()), dtype=torch.uint8)
    length = torch.tensor([data.numel()], dtype=torch.int64)
    group.broadcast(length, 0).wait()
    group.broadcast(data, 0).wait()


def receive(group) -> GroupEnvelope:
    """A follower: the leader's next command."""
    length = torch.zeros(1, dtype=torch.int64)
    group.broadcast(length, 0).wait()
    data = torch.empty(int(length.item()), dtype=torch.uint8)
    group.broadcast(data, 0).wait()
    return GroupEnvelope.model_validate_json(bytes(data.numpy()))


def forward(host: str, port: int, address: str, rank: int, request: Request) -> Reply:
    """The leader's answer to ``request`` (through the group's store)."""
    key = f"reply/{rank}/{secrets.token_hex(8)}"
    try:
        store = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=FORWARD_TIMEOUT_S))
        store.queue_push("inbox", ForwardedRequest(reply_key=key, request=request).model_dump_json())
        store.wait([key])
        reply = Reply.model_validate_json(store.get(key))
        store.delete_key(key)
        return reply
    except Exception as exc:
        return Reply(id=request.id, ok=False, error={"code": "unavailable", "message": (
            f"this replica (rank {rank}) could not reach the group's leader, replica 0, through {address}: "
            f"{type(exc).__name__}: {exc}")})


def serve_inbox(host: str, port: int, service) -> None:
    """The leader: answer what the followers forward (``service.answer``: as if asked here), until it stops."""
    store = None
    while not service.stopping:
        try:
            if store is None:
                store = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=1))
            raw = store.queue_pop("inbox", True)
        except dist.DistStoreError as exc:  # nothing queued within the second, or the store is not up yet
            if "timeout" not in str(exc).lower():
                store = None
                time.sleep(1.0)
            continue
        except Exception:
            store = None
            time.sleep(1.0)
            continue
        forwarded = ForwardedRequest.model_validate_json(raw)
        reply = service.answer(forwarded.request)
        try:
            store.set(forwarded.reply_key, reply.model_dump_json())
        except Exception:
            logger.exception("replica group: could not answer a forwarded request")
