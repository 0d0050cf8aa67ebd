"""The training subprocess: ``python -m hogwild.worker --session DIR --state-dir DIR``.

Started by the API server (one per server, however many API server processes
run). Binds a ZMQ ROUTER on ``<session>/trainer.sock``, answers requests, runs
jobs on a second thread, pushes events to every client it has heard from, and
exits when its parent (the API server) goes away.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import threading
from pathlib import Path

import zmq
from pydantic import ValidationError

from hogwild.contracts.protocol import PROTOCOL_VERSION, SOCKET_NAME, ErrorInfo, Reply, Request, encode

from .service import TrainerService

logger = logging.getLogger("hogwild.worker")


def parse_request(payload: bytes) -> Request | Reply:
    """A validated request, or the error reply to send instead."""
    try:
        raw = json.loads(payload)
    except ValueError:
        return Reply(id="", ok=False, error=ErrorInfo(code="invalid", message="the message is not JSON"))
    req_id = str(raw.get("id", "")) if isinstance(raw, dict) else ""
    version = raw.get("v") if isinstance(raw, dict) else None
    if version != PROTOCOL_VERSION:
        return Reply(id=req_id, ok=False, error=ErrorInfo(code="version", message=f"protocol version {version} is not {PROTOCOL_VERSION}"))
    try:
        return Request.model_validate(raw)
    except ValidationError as exc:
        return Reply(id=req_id, ok=False, error=ErrorInfo(code="invalid", message=str(exc)))


def serve(service: TrainerService, parent_pid: int) -> None:
    """The transport thread: blocks until a request arrives or another thread rings the
    doorbell with something to send (a reply computed elsewhere, an event); wakes once
    a second to see whether the parent is still there."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    path = service.session / SOCKET_NAME
    path.unlink(missing_ok=True)
    old_umask = os.umask(0o177)  # the socket file is created owner-only
    try:
        sock.bind(f"ipc://{path}")
    finally:
        os.umask(old_umask)
    bell_read, bell_write = os.pipe()
    os.set_blocking(bell_read, False)
    os.set_blocking(bell_write, False)  # a full pipe already rings

    def ring() -> None:
        try:
            os.write(bell_write, b"!")
        except BlockingIOError:
            pass

    service.doorbell = ring
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    poller.register(bell_read, zmq.POLLIN)
    clients: set[bytes] = set()
    logger.info("trainer listening on %s", path)
    while not service.stopping:
        ready = dict(poller.poll(1000))
        if sock in ready:
            while sock.poll(0):
                identity, payload = sock.recv_multipart()[:2]
                clients.add(identity)
                request = parse_request(payload)
                reply = request if isinstance(request, Reply) else service.handle(request, identity)
                if reply is not None:
                    sock.send_multipart([identity, encode(reply)])
        if bell_read in ready:
            try:
                while os.read(bell_read, 4096):
                    pass
            except BlockingIOError:
                pass
        while not service.outbox.empty():
            target, message = service.outbox.get_nowait()
            frame = encode(message)
            for identity in clients if target is None else [target]:
                sock.send_multipart([identity, frame], flags=zmq.NOBLOCK)
        if os.getppid() != parent_pid:
            logger.info("parent process is gone; trainer exiting")
            service.stopping = True
    sock.close()
    ctx.term()


def exit_with_parent(parent_pid: int) -> None:
    """Ask the kernel for SIGTERM when the parent dies (Linux), and check it has
    not died already; ``serve`` also polls, for other platforms."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:
        raise SystemExit("hogwild trainer: parent process is gone")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m hogwild.worker")
    parser.add_argument("--session", type=Path, required=True)
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this process is gone")
    parser.add_argument("--restart-reason", default=None, help="why the previous trainer stopped (reported on its running job)")
    args = parser.parse_args(argv)
    parent = args.parent_pid or os.getppid()
    exit_with_parent(parent)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s hogwild-trainer %(levelname)s %(message)s")

    import torch

    torch.set_num_threads(args.threads)
    args.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    service = TrainerService(args.session, args.state_dir, restart_reason=args.restart_reason)

    def stop(*_):
        service.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    jobs = threading.Thread(target=service.job_loop, name="hogwild-jobs", daemon=True)
    jobs.start()
    serve(service, parent)


if __name__ == "__main__":
    main()
