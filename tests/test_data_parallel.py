"""Data parallelism across replicas, in processes of a real gloo group (no vLLM): the split of
a step, the summed gradients equal to one replica's on the whole batch, the fingerprint
comparison and the catch-up of a replica that joins with other weights."""

from __future__ import annotations

import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hogwild.contracts.sft_config import SFTOptions
from hogwild.training.batches import Sample
from hogwild.training.data_parallel import FINGERPRINT_BLOCK, DataParallel, block_checksums, split_by_weight
from hogwild.training.sft import SFTTrainer


def test_a_step_splits_by_weight_into_contiguous_parts_that_keep_every_item():
    weights = [5, 1, 1, 1, 1, 1]
    parts = split_by_weight(list(range(6)), lambda i: weights[i], 2)
    assert parts == [[0], [1, 2, 3, 4, 5]]
    assert split_by_weight([0], lambda i: 1.0, 3) == [[], [0], []] or sum(map(len, split_by_weight([0], lambda i: 1.0, 3))) == 1
    even = split_by_weight(list(range(8)), lambda i: 1.0, 2)
    assert even == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_a_block_checksum_sees_one_changed_bit_and_a_swap():
    t = torch.randn(3 * FINGERPRINT_BLOCK // 2)
    base = block_checksums(t)
    assert base.shape == (2, 2)
    flipped = t.clone()
    flipped.view(torch.int32)[7] ^= 1
    assert (block_checksums(flipped) != base).any(dim=1).tolist() == [True, False]
    swapped = t.clone()
    swapped[[3, 4]] = swapped[[4, 3]]
    assert (block_checksums(swapped)[0] != base[0]).any()


def tiny_model(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).float()


def samples() -> list[Sample]:
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(12):  # uneven lengths: a token-weighted split is not a split by count
        n = 3 + (i * 5) % 9
        ids = torch.randint(0, 96, (n + 4,), generator=g).tolist()
        out.append(Sample(tuple(ids[:4]), tuple(ids[4:]), 1.0, None))
    return out


OPTIONS = dict(lr=3e-3, rank=4, batch_size=6, micro_batch_size=2, epochs=2, seed=3, eval_tokens=0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _replica(rank: int, size: int, port: int, out):
    from hogwild.worker.replica_sync import catch_up, compare

    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, size, rank == 0, timeout=timedelta(seconds=60))
    group = dist.ProcessGroupGloo(dist.PrefixStore("t", store), rank, size, timedelta(seconds=60))
    trainer = SFTTrainer(tiny_model())
    trainer.data_parallel = DataParallel(group, rank, size, torch.device("cpu"))
    result = trainer.run(samples(), SFTOptions(**OPTIONS))
    trainer.data_parallel = None
    agreed = compare(group, trainer.model, torch.device("cpu"))
    # Replica 1 drifts (one weight of one tensor), then catches up from replica 0, which has taken one more step.
    if rank == 1:
        with torch.no_grad():
            next(trainer.model.parameters()).view(-1)[5] += 1.0
        trainer.global_step -= 1
    differing = compare(group, trainer.model, torch.device("cpu"))
    done = catch_up(group, rank, trainer, 10 + rank, 1, torch.device("cpu"))
    after = compare(group, trainer.model, torch.device("cpu"))
    out.put((rank, [h["loss"] for h in result.history], agreed.consistent, differing.consistent, differing.first_difference,
             done.as_dict(), after.consistent, trainer.global_step, {n: p.detach().numpy().copy() for n, p in trainer.model.named_parameters()}))


@pytest.fixture(scope="module")
def replicas():
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_replica, args=(r, 2, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(out.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    return results


def test_two_replicas_train_as_one_replica_on_the_whole_batch_and_end_bitwise_equal(replicas):
    alone = SFTTrainer(tiny_model())
    expected = [h["loss"] for h in alone.run(samples(), SFTOptions(**OPTIONS)).history]
    (_, losses0, agreed, *_), (_, losses1, *_) = replicas
    assert len(losses0) == len(expected) == 4
    assert losses0 == losses1  # every replica reports the whole batch's loss
    assert losses0 == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert agreed  # fingerprints equal after training: bitwise the same weights


def test_a_replica_that_differs_is_named_and_catches_up_with_only_the_changed_block(replicas):
    (_, _, _, differing, first, done0, after0, step0, weights0), (_, _, _, _, _, done1, after1, step1, weights1) = replicas
    assert differing is False and first.startswith("replica 1: tensor ")
    assert done0["source"] == 0 and done0["blocks_sent"] == 1  # one block of one tensor, not the whole model
    assert done0["bytes_sent"] <= FINGERPRINT_BLOCK * 4 and done0["optimizer_bytes"] > 0
    assert done1["received"] and not done0["received"]
    assert done0["weights_version"] == done1["weights_version"] == 12  # the highest version, plus one for the change
    assert after0 and after1 and step0 == step1
    assert all((weights0[n] == weights1[n]).all() for n in weights0)
