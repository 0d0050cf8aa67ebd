"""Block-level checkpoint sync, crash safety, optimizer state, paths, ledger."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from hogwild.worker import checkpoint
from hogwild.worker.checkpoint import BLOCK, STATE_DIRNAME, read_layout, recover, sync


@pytest.fixture(scope="module")
def sharded(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model saved in several safetensors files."""
    out = tmp_path_factory.mktemp("sharded") / "model"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.save_pretrained(out, max_shard_size="400KB")
    for f in tiny_model_dir.iterdir():
        if f.name.startswith("tokenizer") or f.name.endswith(".jinja"):
            shutil.copy(f, out / f.name)
    assert len(list(out.glob("*.safetensors"))) >= 3
    return out


def file_tensors(directory: Path) -> dict[str, dict[str, torch.Tensor]]:
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            out[path.name] = {k: f.get_tensor(k) for k in f.keys()}
    return out


def changed_weights(directory: Path, seed: int) -> dict[str, torch.Tensor]:
    """The directory's tensors with a deterministic change: a few elements of
    some tensors (small, journaled) and every element of the embedding (large)."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {name: t.clone() for per_file in file_tensors(directory).values() for name, t in per_file.items()}
    tensors["model.embed_tokens.weight"] += 0.5
    for name in sorted(tensors)[::3]:
        flat = tensors[name].view(-1)
        idx = torch.randint(0, flat.numel(), (3,), generator=gen)
        flat[idx] += 1.0
    return tensors


def test_only_changed_blocks_are_written_and_the_directory_still_loads(sharded, tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(sharded, target)
    before = {p.name: p.read_bytes() for p in target.glob("*.safetensors")}
    layout = read_layout(target)
    tensors = {name: t.clone() for per in file_tensors(target).values() for name, t in per.items()}
    name = "model.layers.1.mlp.down_proj.weight"
    tensors[name].view(-1)[1000] += 1.0  # one element: one 4 KiB block
    report = sync(tensors, target)
    assert report.blocks_written == 1 and report.files_touched == [layout[name].file.name]
    assert report.method == {layout[name].file.name: "journal"}
    assert report.blocks_compared >= sum(-(-(t.end - t.begin) // BLOCK) for t in layout.values())
    for fname, data in before.items():
        now = (target / fname).read_bytes()
        diff = [i for i in range(len(data)) if data[i] != now[i]] if fname == layout[name].file.name else []
        if fname != layout[name].file.name:
            assert now == data
        else:
            assert diff and diff[-1] - diff[0] < 4  # the changed float, nothing else
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    assert torch.equal(dict(model.named_parameters())[name], tensors[name])
    assert not (target / STATE_DIRNAME / "journal" / f"{layout[name].file.name}.journal").exists()
    # Nothing changed since: nothing written.
    assert sync(tensors, target).blocks_written == 0


def test_a_mostly_changed_file_is_written_aside_and_renamed(sharded, tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(sharded, target)
    tensors = changed_weights(target, seed=0)
    report = sync(tensors, target)
    embed_file = read_layout(target)["model.embed_tokens.weight"].file.name
    assert report.method[embed_file] == "write-aside"
    assert "journal" in report.method.values()
    loaded = file_tensors(target)
    for per in loaded.values():
        for name, t in per.items():
            assert torch.equal(t, tensors[name]), name


def test_a_bf16_server_keeps_the_exact_fp32_values_it_did_not_change(sharded, tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(sharded, target)
    original = {n: t for per in file_tensors(target).values() for n, t in per.items()}
    served = {n: t.to(torch.bfloat16) for n, t in original.items()}  # what vLLM computes with
    served["model.norm.weight"][:4] += 1.0
    report = sync(served, target)
    assert report.blocks_written == 1
    after = {n: t for per in file_tensors(target).values() for n, t in per.items()}
    for name, t in after.items():
        if name != "model.norm.weight":
            assert torch.equal(t, original[name]), name
    assert torch.equal(after["model.norm.weight"][4:], original["model.norm.weight"][4:])
    assert torch.equal(after["model.norm.weight"][:4], served["model.norm.weight"][:4].float())


def test_a_directory_that_is_not_this_model_is_refused(sharded, tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(sharded, target)
    with pytest.raises(checkpoint.CheckpointError, match="no tensor model.extra.weight"):
        sync({"model.extra.weight": torch.zeros(2)}, target)


CHILD = """
import sys, torch
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_checkpoint import changed_weights
from hogwild.worker import checkpoint
target = Path(sys.argv[1])
tensors = changed_weights(Path(sys.argv[2]), seed=int(sys.argv[3]))
checkpoint.sync(tensors, target)
print(checkpoint.durable_steps)
"""


@pytest.mark.parametrize("seed", range(6))
def test_a_sync_killed_at_any_point_leaves_each_file_old_or_new(sharded, tmp_path, seed):
    script = CHILD.format(tests=str(Path(__file__).parent))
    old = file_tensors(sharded)
    new = changed_weights(sharded, seed)
    dry = tmp_path / "dry"
    shutil.copytree(sharded, dry)
    steps = int(subprocess.run([sys.executable, "-c", script, str(dry), str(sharded), str(seed)], capture_output=True,
                               text=True, check=True).stdout.split()[-1])
    kill_at = random.Random(seed).randint(1, steps)
    target = tmp_path / "ckpt"
    shutil.copytree(sharded, target)
    child = subprocess.run([sys.executable, "-c", script, str(target), str(sharded), str(seed)], capture_output=True,
                           env={**os.environ, "HOGWILD_CHECKPOINT_FAULT_AFTER": str(kill_at)})
    assert child.returncode == -9, child.stderr.decode()[-2000:]
    recover(target)  # what the next start-up (or sync) does first
    assert not list(target.glob(f"*{checkpoint.ASIDE_SUFFIX}"))
    after = file_tensors(target)
    outcome = {}
    for fname, tensors in after.items():
        is_old = all(torch.equal(t, old[fname][n]) for n, t in tensors.items())
        is_new = all(torch.equal(t, new[n]) for n, t in tensors.items())
        assert is_old or is_new, f"{fname} is neither the old nor the new version (killed at step {kill_at} of {steps})"
        outcome[fname] = "new" if is_new and not is_old else "old"
    AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)  # the directory loads
    # Finishing the sync afterwards completes every file.
    sync(new, target)
    assert all(torch.equal(t, new[n]) for per in file_tensors(target).values() for n, t in per.items())


def test_recover_discards_a_torn_journal_and_replays_a_sealed_one(sharded, tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(sharded, target)
    path = sorted(target.glob("*.safetensors"))[0]
    original = path.read_bytes()
    checkpoint._write_journal(path, [(4096, b"\x01" * 16)])
    journal = checkpoint._journal_path(path)
    sealed = journal.read_bytes()
    journal.write_bytes(sealed[:-10])  # torn: the seal is incomplete
    assert "torn" in recover(target)[0] and path.read_bytes() == original
    journal.write_bytes(sealed)
    assert "replayed" in recover(target)[0]
    assert path.read_bytes()[4096:4112] == b"\x01" * 16 and not journal.exists()


def test_optimizer_state_round_trips_without_pickle(tiny_model_dir, tmp_path):
    from hogwild.contracts.sft_config import SFTOptions
    from hogwild.training.batches import Sample
    from hogwild.training.sft import SFTTrainer

    samples = [Sample((5, 6, 7), (8, 9, 10))]
    a = SFTTrainer(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32))
    a.run(samples, SFTOptions(lr=1e-3, steps=3, rank=8))
    tensor_bytes, json_bytes = a.save_state()
    assert b"pickle" not in json_bytes and json.loads(json_bytes)["extra"]["global_step"] == 3

    b = SFTTrainer(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32))
    b.model.load_state_dict(a.model.state_dict())
    b.restore_state(tensor_bytes, json_bytes)
    assert b.global_step == 3 and b.structure.rank == 8
    options = SFTOptions(lr=1e-3, steps=2, rank=8)
    ra, rb = a.run(samples, options), b.run(samples, options)
    assert not rb.optimizer_reset and rb.optimizer_step == ra.optimizer_step == 5
    for (name, pa), pb in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.equal(pa, pb), name


def test_paths_in_requests_stay_inside_the_roots(tmp_path):
    from hogwild.plugin.api_server.http_errors import ApiError
    from hogwild.plugin.api_server.paths import PathPolicy

    root = tmp_path / "root"
    (root / "ok").mkdir(parents=True)
    (root / "escape").symlink_to(tmp_path)
    policy = PathPolicy([root])
    assert policy.confine(str(root / "ok" / "new"), "target") == (root / "ok" / "new").resolve()
    assert policy.confine("ok/relative", "target") == (root / "ok" / "relative").resolve()
    for bad in ("/etc", str(root / ".." / "elsewhere"), "../../etc/passwd", str(root / "escape" / "x")):
        with pytest.raises(ApiError) as err:
            policy.confine(bad, "target")
        assert err.value.status == 403 and "outside" in err.value.message
    with pytest.raises(ApiError) as err:
        policy.confine("a\x00b", "target")
    assert err.value.status == 422


def test_the_ledger_follows_the_weights_across_server_sessions(tmp_path):
    from hogwild.worker.ledger import Ledger

    saved = tmp_path / "ckpt-ledger.jsonl"
    live = tmp_path / "state" / "ledger.jsonl"
    first = Ledger.open(live, "session-1", saved)
    first.record(["a", "b"], "job-1")
    assert "a" in Ledger.open(live, "session-1", saved)  # the trainer restarted: same weights, same ledger
    saved.write_text(json.dumps({"id": "a"}) + "\n")  # the last checkpoint had trained "a" only
    again = Ledger.open(live, "session-2", saved)  # the server restarted from that checkpoint
    assert "a" in again and "b" not in again
    assert len(Ledger.open(live, "session-3", tmp_path / "none.jsonl")) == 0  # never checkpointed: nothing kept
