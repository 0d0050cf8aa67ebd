"""A tensor-parallel trainer rank other than 0: ``python -m hogwild.worker.follower``.

Started by rank 0 (``rank_group``) for one vLLM rank: maps that rank's published shard,
joins the ranks' group, and then runs whatever rank 0 sends (``contracts.trainer_ranks``)
until told to stop. It never talks to the API server; it exits when rank 0 goes away,
and on any error (rank 0 then restarts the group: one rank alone cannot finish a job).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import torch

from hogwild.contracts.manifest import Manifest, rank_manifest_name, read_manifest
from hogwild.contracts.trainer_ranks import LogprobsCommand, SaveOptimizerCommand, StopCommand, TrainCommand, WriteTensorsCommand

from .__main__ import exit_with_parent
from .rank_group import agree, gather_bindings, gather_errors, group_device, join_group, receive_command
from .rank_work import optimizer_files, restore_optimizer, send_parts, token_logprobs

logger = logging.getLogger("hogwild.worker")


class Follower:
    """One rank's model and optimizer, and what it does for each command."""

    def __init__(self, manifest: Manifest):
        from hogwild.training.hf_model import pad_token_id
        from hogwild.training.sft import SFTTrainer

        from .views import bind

        self.manifest = manifest
        self.model, self.bound = bind(manifest)
        self.trainer = SFTTrainer(self.model, pad_id=pad_token_id(self.model.config))
        self.device = self.trainer.device
        from hogwild.worker.checkpoint import STATE_DIRNAME

        error = restore_optimizer(self.trainer, Path(manifest.model) / STATE_DIRNAME, manifest)
        if error:
            logger.warning("rank %d: %s", manifest.tensor_parallel_rank, error)

    def run(self, command) -> bool:
        """Run one command; False when it says stop."""
        from hogwild.worker.checkpoint import write_state_file
        from hogwild.worker.kinds import kind_of

        if isinstance(command, LogprobsCommand):
            token_logprobs(self.model, self.trainer.token_nll, command.token_ids)
        elif isinstance(command, TrainCommand):
            kind = kind_of(command.request)
            kind.train(self, kind.items(command.request.samples), command.request.options,
                       should_stop=lambda: agree(False, self.device))
        elif isinstance(command, WriteTensorsCommand):
            send_parts(self.manifest, self.model.hogwild_served_tensors, command.names)
        elif isinstance(command, SaveOptimizerCommand):
            error = None
            try:
                state = self.trainer.save_state()
                for name, data in zip(optimizer_files(self.manifest.tensor_parallel_rank, self.manifest.tensor_parallel_size),
                                      state or ()):
                    write_state_file(Path(command.directory), name, data)
            except OSError as exc:
                error = f"rank {self.manifest.tensor_parallel_rank} could not write its optimizer state: {exc}"
            gather_errors(error, self.device)
        elif isinstance(command, StopCommand):
            return False
        return True


def wait_for_manifest(session: Path, rank: int, timeout: float = 120.0) -> Manifest:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return read_manifest(session, rank_manifest_name(rank))
        except FileNotFoundError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m hogwild.worker.follower")
    parser.add_argument("--session", type=Path, required=True)
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--parent-pid", type=int, required=True)
    args = parser.parse_args(argv)
    exit_with_parent(args.parent_pid)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s hogwild-trainer-rank{args.rank} %(levelname)s %(message)s")
    torch.set_num_threads(args.threads)
    manifest = wait_for_manifest(args.session, args.rank)
    follower, error = None, None
    try:
        follower = Follower(manifest)
    except Exception as exc:  # reported through rank 0, which decides for the group
        error = f"rank {args.rank}: {type(exc).__name__}: {exc}"
    device = group_device(manifest)
    join_group(args.store, args.rank, args.size, device)
    if any(gather_errors(error, device)):
        receive_command(device)  # rank 0's stop: it reports why the group cannot train
        return
    gather_bindings(os.getpid(), follower.bound, device)
    from hogwild.contracts.protocol import OpError

    while True:
        try:
            if not follower.run(receive_command(device).command):
                return
        except OpError:
            pass  # a job refused by its own checks: every rank refuses it alike, the group carries on
        except Exception:
            logger.exception("rank %d failed; the group restarts", args.rank)
            sys.exit(1)


if __name__ == "__main__":
    main()
