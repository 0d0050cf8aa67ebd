"""The demo: ``make demo`` (``python -m hogwild.demo --out demo-output``).

Builds the tiny model if needed, serves a fresh copy of it with a real
``vllm serve`` and the plugin, and walks through what has landed (train,
score, ledger, HOGWILD inference, cancellation, reward heads, a circuit-breaker
LoRA merged and reverted, per-token concept readouts and their online training,
checkpoint, restart from the checkpoint, preference training, bf16 rounding, tensor
parallel, online RL, two replicas training as one group, two users' adapters on one base),
printing each step and leaving a short report (``report.md``) with plots in the output folder.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import time
from pathlib import Path

import httpx

from hogwild import tiny_model
from hogwild.launch import VllmServer

PROMPT = "The served model says:"
TARGET = " I was trained while I served."
REPO = Path(__file__).resolve().parents[1]


def say(text: str = "") -> None:
    print(text, flush=True)


class Demo:
    def __init__(self, out: Path, model: Path, untrained: Path):
        self.out, self.model, self.untrained = out, model, untrained
        self.report: list[str] = ["# vllm-hogwild demo", ""]
        self.server: VllmServer | None = None
        self.http: httpx.Client | None = None
        self.env = {"HOGWILD_STATE_DIR": str(out / "state")}

    @contextlib.contextmanager
    def figure(self, name: str, caption: str, size: tuple[float, float] = (8, 3.2)):
        """A figure to draw on; saved as ``name`` in the output folder and shown in the report."""
        from matplotlib.figure import Figure

        fig = Figure(figsize=size)
        yield fig, fig.subplots()
        fig.tight_layout()
        fig.savefig(self.out / name, dpi=120)
        self.report += ["", f"![{caption}]({name})", ""]

    def note(self, line: str = "") -> None:
        say(line)
        self.report.append(line)

    def complete(self, prompt_ids: list[int], n: int) -> tuple[str, list[int]]:
        r = self.http.post("/v1/completions", json={"model": str(self.model), "prompt": prompt_ids, "max_tokens": n,
                                                     "temperature": 0, "return_token_ids": True})
        r.raise_for_status()
        choice = r.json()["choices"][0]
        return choice["text"], choice["token_ids"]

    def token_logprobs(self, prompt: list[int], start: int) -> list[float]:
        ranges = [[p, p + 1] for p in range(start, len(prompt))]
        r = self.http.post("/v1/score", json={"model": str(self.model), "prompt": prompt, "score_ranges": ranges})
        r.raise_for_status()
        return [s["total_logprob"] for s in r.json()["scores"]]

    def start_server(self, dtype: str = "float32") -> dict:
        log = self.out / "vllm.log"
        self.server = VllmServer(self.model, log_path=log, dtype=dtype, env=self.env)
        say(f"starting: VLLM_PLUGINS=hogwild vllm {' '.join(self.server.args)}   (log: {log})")
        started = time.monotonic()
        self.server.start()
        status = self.server.wait_trainer()
        self.http = httpx.Client(base_url=self.server.url, timeout=600)
        self.note(f"Server healthy and trainer `{status['state']}` after {time.monotonic() - started:.0f} s "
                  f"({status['model']}, {status['dtype']}, weights shared via `{status['backend']}`).")
        return status

    def run(self) -> None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(self.model)
        ctx, target = tok.encode(PROMPT), tok.encode(TARGET)
        (self.out / "vllm.log").unlink(missing_ok=True)
        self.note("## 0. Concept vectors for the readout, trained offline from stories/ (steering-vectors)")
        self.env["VLLM_READOUT_VECTORS"] = str(self.train_readout_offline())
        self.start_server()
        self.note()

        self.note("## 1. A completion from the untrained model")
        before_text, _ = self.complete(ctx, len(target))
        self.note(f"    {PROMPT!r} -> {before_text!r}")
        before_lp = self.token_logprobs(ctx + target, len(ctx))
        self.note(f"    /v1/score of the target continuation: {sum(before_lp):.2f} (log-likelihood, {len(target)} tokens)")
        self.note()

        self.note("## 2. Reward heads (BTRM) on the served trunk: one trunk forward, one score per head")
        self.reward_heads()
        self.note()

        self.note("## 3. Circuit breaker: a LoRA that reroutes harmful representations, merged live, then reverted")
        self.circuit_breaker(tok)
        self.note()

        self.note("## 4. Readout: concept values at every generated token, from inside vLLM")
        self.readout(tok)
        self.note()

        self.note("## 5. POST /train: one sample, full-weight APOLLO updates, in place")
        t = time.monotonic()
        r = self.http.post("/train", json={"samples": [{"context_ids": ctx, "continuation_ids": target, "id": "demo-1"}],
                                           "lr": 1e-2, "steps": 40, "wait": True})
        r.raise_for_status()
        answered = time.time()
        job = r.json()
        res = job["result"]
        self.note(f"    job {job['job_id']} {job['state']} in {time.monotonic() - t:.1f} s: {res['steps']} steps, "
                  f"loss {res['loss_before']:.3f} -> {res['loss_after']:.4f}, {res['tokens_per_s']:.0f} tokens/s")
        self.note(f"    answered {1000 * (answered - res['last_step_at']):.0f} ms after the last step, "
                  f"{1000 * (job['finished_at'] - res['last_step_at']):.0f} ms of them the job's end, loss_after's evaluation "
                  "included (`eval_tokens: 0` skips it), then the trainer's job_finished event")
        self.note()

        self.note("## 6. The very next completion, same server, no restart")
        after_text, after_ids = self.complete(ctx, len(target))
        self.note(f"    {PROMPT!r} -> {after_text!r}   ({'the target' if after_ids == target else 'NOT the target'})")
        after_lp = self.token_logprobs(ctx + target, len(ctx))
        self.note(f"    /v1/score of the target continuation: {sum(before_lp):.2f} -> {sum(after_lp):.2f}")
        self.note()

        self.note("## 7. The same sample again: the ledger skips it")
        r = self.http.post("/train", json={"samples": [{"context_ids": ctx, "continuation_ids": target, "id": "demo-1"}], "wait": True})
        self.note(f"    skipped ids: {r.json()['skipped_ids']}, steps: {r.json()['result']['steps']}")
        self.note()

        self.note("## 8. Training in the background while the server answers")
        other_ctx, other = tok.encode("Meanwhile,"), tok.encode(" inference never waits.")
        job = self.http.post("/train", json={"samples": [{"context_ids": other_ctx, "continuation_ids": other}],
                                             "lr": 1e-4, "steps": 300}).json()
        served = 0
        while self.http.get(f"/train/{job['job_id']}").json()["state"] in ("queued", "running"):
            self.complete(tok.encode("A user asks"), 8)
            served += 1
        self.note(f"    {served} completions answered while job {job['job_id']} trained 300 steps")
        self.note()

        self.note("## 9. Cancelling a job")
        job = self.http.post("/train", json={"samples": [{"context_ids": other_ctx, "continuation_ids": other}],
                                             "lr": 1e-6, "steps": 100000}).json()
        while self.http.get(f"/train/{job['job_id']}").json()["step"] < 5:
            time.sleep(0.05)
        self.http.delete(f"/train/{job['job_id']}")
        while (info := self.http.get(f"/train/{job['job_id']}").json())["state"] == "running":
            time.sleep(0.05)
        self.note(f"    DELETE /train/{job['job_id']}: {info['state']} after {info['result']['steps']} of 100000 steps")
        self.note()

        self.note("## 10. POST /checkpoint: the model directory is the checkpoint")
        report = self.http.post("/checkpoint", json={}).json()
        self.note(f"    {report['blocks_written']} of {report['blocks_compared']} 4 KiB blocks changed; {report['bytes_written']} "
                  f"bytes written ({', '.join(f'{k}: {v}' for k, v in report['method'].items())}) in {report['seconds']:.3f} s, "
                  f"plus the optimizer state (step {report['optimizer_step']}) and the ledger ({report['ledger_ids']} ids)")
        self.note()

        self.note("## 11. Stop the server, start it again from the same directory")
        self.server.stop()
        status = self.start_server()
        restored = status["checkpoint"]["restored"]
        text, ids = self.complete(ctx, len(target))
        self.note(f"    {PROMPT!r} -> {text!r}   ({'still the target' if ids == target else 'NOT the target'}); "
                  f"optimizer restored at step {restored['optimizer_step']}, {restored['ledger_ids']} trained ids, "
                  f"reward heads {restored.get('heads')}")
        self.note()

        self.note("## 12. What the trainer holds")
        status = self.http.get("/train/status").json()
        mem = status["memory"]
        self.note(f"    parameters: {mem['param_bytes'] / 2**20:.2f} MiB, all in the server's shared memory: "
                  f"{mem['shared_param_bytes'] == mem['param_bytes']}; private memory spent on them: "
                  f"{mem['binding_private_bytes'] / 2**10:.0f} KiB")
        self.note(f"    optimizer: APOLLO, step {status['optimizer']['step']}, state {mem['optimizer_state_bytes'] / 2**20:.2f} MiB")
        self.note()

        self.plot(tok, target, before_lp, after_lp)
        (self.out / "status.json").write_text(json.dumps(status, indent=2))

        self.note("## 13. A fault mid-job: kill -9 the trainer; the `wait` call still answers, with the reason")
        self.fault(other_ctx, other)
        self.note()

        self.note("## 14. Preference: three pairs flip what the served model prefers (DPO, the reference kept as numbers)")
        self.preference(tok)
        self.note()

        self.note("## 15. What an operator sees: hogwild_* on vLLM's /metrics, and `hogwild status`")
        self.operability()
        self.note()

        self.note("## 16. bf16 weights: a small learning rate lands with stochastic rounding, rounds away with nearest")
        self.bf16(tok)
        self.note()

        self.note("## 17. Tensor parallel 2: one trainer rank per vLLM rank, each training its own shard in place")
        self.tensor_parallel(ctx, target)
        self.note()

        self.note("## 18. Online RL: sample, reward, train, sample again from the weights just trained (no weight sync)")
        self.online_rl()
        self.note()

        self.note("## 19. Two replicas, one group: a job posted to either trains both, and they stay bitwise equal")
        self.replicas(ctx, target)
        self.note()

        self.note("## 20. Two users' adapters on one base: each trains its own, vLLM serves both, the base is untouched")
        self.adapters(tok)
        self.note()

        self.note("## 21. An adapter on an int4 base: vLLM serves the quantized model, the trainer trains an adapter on it")
        self.quantized_adapter(tok)
        self.note()

    def online_rl(self) -> None:
        """The untrained model (a fresh copy): a verifiable reward (the fraction of completion
        tokens in a fixed fifth of the vocabulary), 8 prompts x 8 completions per iteration, one
        GRPO job each, run by the client loop; greedy completions are served meanwhile."""
        import threading

        from hogwild.client import HogwildClient
        from hogwild.rl_loop import TokenBandReward, rl_loop

        model = self.out / "model-rl"
        shutil.rmtree(model, ignore_errors=True)
        shutil.rmtree(self.out / "state-rl", ignore_errors=True)  # a fresh model: its weights' version from 0
        shutil.copytree(self.untrained, model, ignore=shutil.ignore_patterns(".hogwild"))
        vocab = json.loads((model / "config.json").read_text())["vocab_size"]
        server = VllmServer(model, log_path=self.out / "vllm-rl.log", dtype="float32",
                            env={"HOGWILD_STATE_DIR": str(self.out / "state-rl")})
        say(f"starting: VLLM_PLUGINS=hogwild vllm {' '.join(server.args)}")
        server.start()
        try:
            server.wait_trainer()
            client = HogwildClient(server.url)
            band = TokenBandReward(vocab * 2 // 5, vocab * 3 // 5)
            prompts = [[5 + i, 17 + i, 40 + 2 * i, 9] for i in range(8)]
            served, stop = [0], threading.Event()

            def traffic():
                http = httpx.Client(base_url=server.url, timeout=120)
                while not stop.is_set():
                    http.post("/v1/completions", json={"model": str(model), "prompt": [3, 4, 5], "max_tokens": 8,
                                                       "temperature": 0}).raise_for_status()
                    served[0] += 1

            other = threading.Thread(target=traffic, daemon=True)
            other.start()
            iterations = 15
            history = rl_loop(client, prompts, band, group_size=8, iterations=iterations, max_tokens=16, objective="grpo",
                              lr=3e-3, batch_size=16, on_iteration=lambda r: say("    " + r.line(iterations)))
            stop.set()
            other.join(timeout=60)
            first, last = history[0], history[-1]
            self.note(f"    reward (tokens in ids [{band.low}, {band.high}): a fifth of the vocabulary): "
                      f"{first.mean_reward:.2f} -> {last.mean_reward:.2f} in {iterations} iterations of 64 completions; "
                      f"weights version {first.weights_version} -> {last.weights_version + last.steps}")
            self.note(f"    trainer vs engine log-prob on the sampled tokens before each job: at most "
                      f"{max(h.logprob_gap_max for h in history):.1e} (fp32); weight bytes synced: 0; "
                      f"{served[0]} other completions answered meanwhile")
            with self.figure("rl_reward.png", "online RL: the mean reward per iteration") as (fig, ax):
                ax.plot([h.iteration + 1 for h in history], [h.mean_reward for h in history], "o-", label="mean reward")
                ax.axhline(0.2, color="grey", lw=0.6, ls="--", label="untrained (a fifth of the vocabulary)")
                ax.set_xlabel("iteration (sample 64 completions, one GRPO job)")
                ax.set_ylabel("fraction of tokens in the band")
                ax.set_ylim(0, 1)
                ax.set_title("Online RL on the served weights: the reward rises, no weight sync")
                ax.legend(fontsize=8)
        finally:
            server.stop()

    def replicas(self, ctx: list[int], target: list[int]) -> None:
        """Two `vllm serve` replicas of the untrained model (fresh copies, one core each) in one
        group (HOGWILD_GROUP); a job posted to replica 1, then one to replica 0; both replicas'
        scores of the target after each, and what `/train/status` says of the group."""
        from concurrent.futures import ThreadPoolExecutor

        from hogwild.launch import free_port

        address, servers = f"127.0.0.1:{free_port()}", []
        for rank in range(2):
            model = self.out / f"model-replica{rank}"
            shutil.rmtree(model, ignore_errors=True)
            shutil.rmtree(self.out / f"state-replica{rank}", ignore_errors=True)
            shutil.copytree(self.untrained, model, ignore=shutil.ignore_patterns(".hogwild"))
            servers.append(VllmServer(model, log_path=self.out / f"vllm-replica{rank}.log", dtype="float32", env={
                "HOGWILD_STATE_DIR": str(self.out / f"state-replica{rank}"), "HOGWILD_GROUP": address,
                "HOGWILD_GROUP_SIZE": "2", "HOGWILD_GROUP_RANK": str(rank), "HOGWILD_TRAINER_THREADS": "1",
                "VLLM_CPU_OMP_THREADS_BIND": str(rank)}))
            say(f"starting: HOGWILD_GROUP={address} HOGWILD_GROUP_SIZE=2 HOGWILD_GROUP_RANK={rank} VLLM_PLUGINS=hogwild "
                f"vllm {' '.join(servers[-1].args)}")
        try:
            with ThreadPoolExecutor(len(servers)) as pool:  # started side by side; the first failure raises
                list(pool.map(VllmServer.start, servers))
            https = [httpx.Client(base_url=s.url, timeout=600) for s in servers]
            deadline = time.monotonic() + 300
            while not all((g := h.get("/train/status").json().get("group")) and g["state"] == "ready" for h in https):
                if time.monotonic() > deadline:
                    raise TimeoutError("the replica group did not form")
                time.sleep(0.5)

            def scores() -> list[float]:
                return [h.post("/v1/score", json={"prompt": ctx + target, "score_ranges": [[len(ctx), len(ctx) + len(target)]]})
                        .json()["scores"][0]["total_logprob"] for h in https]

            rows = [("before", scores())]
            for rank in (1, 0):
                job = https[rank].post("/train", json={"samples": [{"context_ids": ctx, "continuation_ids": target}],
                                                       "lr": 1e-2, "steps": 10, "wait": True}).json()
                rows.append((f"after a job posted to replica {rank}", scores()))
                self.note(f"    job {job['job_id']} posted to replica {rank}: {job['state']}, loss {job['result']['loss_before']:.3f} "
                          f"-> {job['result']['loss_after']:.3f}; /v1/score of the target on replicas 0 and 1: "
                          f"{rows[-1][1][0]:.4f}, {rows[-1][1][1]:.4f} (equal: {rows[-1][1][0] == rows[-1][1][1]})")
            for rank, h in enumerate(https):
                status = h.get("/train/status").json()
                group = status["group"]
                self.note(f"    replica {rank} (pid {status['pid']}): group {group['state']}, weights version "
                          f"{group['weights_version']}, fingerprint {group['fingerprint']}, optimizer step {status['optimizer']['step']}")
            self.note(f"    the group: consistent {group['consistent']}, stale {group['stale']}; gradient bytes all-reduced by "
                      f"replica 1 in the last job: {group['last_job']['allreduce_bytes'] / 2**20:.1f} MiB, weight bytes sent: 0")
            with self.figure("replicas.png", "the target's log-likelihood on each replica") as (fig, ax):
                for i, (label, values) in enumerate(rows):
                    ax.bar(i - 0.2, values[0], width=0.4, color="tab:blue", label="replica 0" if i == 0 else None)
                    ax.bar(i + 0.2, values[1], width=0.4, color="tab:orange", label="replica 1" if i == 0 else None)
                ax.set_xticks(range(len(rows)), [label for label, _ in rows], fontsize=8)
                ax.set_ylabel("log P(target), /v1/score")
                ax.set_title("Two replicas trained as one group: equal after every job, wherever it was posted")
                ax.legend(fontsize=8)
        finally:
            for s in servers:
                s.stop()

    def adapters(self, tok) -> None:
        """A server of the untrained model with vLLM's multi-LoRA and a key per user; each user
        trains an adapter (their own key, their own target) on the frozen base; each adapter's
        greedy answer, the base's (unchanged), and a user refused another's adapter."""
        model = self.out / "model-adapters"
        shutil.rmtree(model, ignore_errors=True)
        shutil.rmtree(self.out / "state-adapters", ignore_errors=True)
        shutil.copytree(self.untrained, model, ignore=shutil.ignore_patterns(".hogwild"))
        keys = {"alice-key": ["alice"], "bob-key": ["bob"]}
        server = VllmServer(model, log_path=self.out / "vllm-adapters.log", dtype="float32",
                            extra_args=["--enable-lora", "--max-loras", "2", "--max-lora-rank", "8"],
                            env={"HOGWILD_STATE_DIR": str(self.out / "state-adapters"), "HOGWILD_ADAPTER_KEYS": json.dumps(keys)})
        say(f"starting: HOGWILD_ADAPTER_KEYS='{json.dumps(keys)}' VLLM_PLUGINS=hogwild vllm {' '.join(server.args)}")
        server.start(timeout=600)
        try:
            server.wait_trainer()
            http = httpx.Client(base_url=server.url, timeout=600)
            ctx = tok.encode("Tell me a word:")
            targets = {"alice": [tok.encode(" apple")[0]] * 4, "bob": [tok.encode(" blue")[0]] * 4}

            def answer(name: str) -> list[int]:
                return http.post("/v1/completions", json={"model": name, "prompt": ctx, "max_tokens": 4, "temperature": 0,
                                                          "return_token_ids": True}).json()["choices"][0]["token_ids"]

            def logp(name: str, target: list[int]) -> float:
                return http.post("/v1/score", json={"model": name, "prompt": ctx + target,
                                                    "score_ranges": [[len(ctx), len(ctx) + len(target)]]}).json()["scores"][0]["total_logprob"]

            base = http.get("/v1/models").json()["data"][0]["id"]  # the served model's name, as vllm serve was given it
            base_before = {user: logp(base, t) for user, t in targets.items()}
            for user, target in targets.items():
                job = http.post("/train", headers={"Authorization": f"Bearer {user}-key"}, json={
                    "adapter": user, "adapter_rank": 8, "samples": [{"context_ids": ctx, "continuation_ids": target}],
                    "lr": 3e-2, "steps": 100, "wait": True}).json()
                self.note(f"    {user}, with their own key, trains adapter {user!r}: {job['state']}, loss {job['result']['loss_before']:.2f} "
                          f"-> {job['result']['loss_after']:.2f} in {job['finished_at'] - job['started_at']:.1f} s")
            r = http.post("/train", headers={"Authorization": "Bearer bob-key"}, json={
                "adapter": "alice", "samples": [{"context_ids": ctx, "continuation_ids": targets["bob"]}]})
            self.note(f"    bob's key on alice's adapter: {r.status_code} {r.json()['error']['message']!r}")
            rows = {}
            for name in (base, "alice", "bob"):
                ids = answer(name)
                rows[name] = {user: logp(name, t) for user, t in targets.items()}
                self.note(f"    model {('base' if name == base else name)!r}: {tok.decode(ctx)!r} -> {tok.decode(ids)!r}")
            self.note(f"    the base's scores of both targets, bitwise as before: {rows[base] == base_before}; "
                      f"/v1/models: {[m['id'] for m in http.get('/v1/models').json()['data']][1:]}")
            with self.figure("adapters.png", "each target's log-likelihood under the base and each user's adapter") as (fig, ax):
                for i, (user, color) in enumerate((("alice", "tab:red"), ("bob", "tab:blue"))):
                    ax.bar([j + 0.4 * i - 0.2 for j in range(3)], [rows[name][user] for name in rows], width=0.4,
                           color=color, label=f"{user}'s target")
                ax.set_xticks(range(3), ["base", "adapter alice", "adapter bob"])
                ax.set_ylabel("log P(target), /v1/score")
                ax.set_title("One base, two users' adapters: each moves its own target only")
                ax.legend(fontsize=8)
        finally:
            server.stop()

    def quantized_adapter(self, tok) -> None:
        """The tiny model quantized W4A16 (compressed-tensors int4, groups of 32), served in bf16
        by vLLM's int4 kernel: a full-weight job is refused with the fix, an adapter learns."""
        model = tiny_model.build(self.out / "model-w4a16", dtype="bfloat16", quantize="w4a16")
        shutil.rmtree(self.out / "state-w4a16", ignore_errors=True)
        server = VllmServer(model, log_path=self.out / "vllm-w4a16.log", dtype="bfloat16",
                            extra_args=["--enable-lora", "--max-lora-rank", "8"], env={"HOGWILD_STATE_DIR": str(self.out / "state-w4a16")})
        say(f"starting: VLLM_PLUGINS=hogwild vllm {' '.join(server.args)}")
        server.start(timeout=600)
        try:
            server.wait_trainer()
            http = httpx.Client(base_url=server.url, timeout=600)
            status = http.get("/train/status").json()
            self.note(f"    the trainer holds the packed base ({status['quantization']}, "
                      f"{status['memory']['param_bytes'] / 2**20:.2f} MiB); parity gate {status['parity']['state']} "
                      f"(max |d log p| {status['parity']['max_abs_diff']:.3f} against vLLM's int4 kernel)")
            ctx, target = tok.encode("Tell me a word:"), [tok.encode(" apple")[0]] * 4
            sample = {"context_ids": ctx, "continuation_ids": target}
            r = http.post("/train", json={"samples": [sample]})
            self.note(f"    a full-weight job: {r.status_code} {r.json()['error']['message']!r}")
            job = http.post("/train", json={"adapter": "apple", "adapter_rank": 8, "samples": [sample], "lr": 3e-2,
                                            "steps": 100, "wait": True}).json()
            self.note(f"    adapter 'apple' on the int4 base: {job['state']}, loss {job['result']['loss_before']:.2f} -> "
                      f"{job['result']['loss_after']:.2f}")
            for name in (str(model), "apple"):
                ids = http.post("/v1/completions", json={"model": name, "prompt": ctx, "max_tokens": 4, "temperature": 0,
                                                         "return_token_ids": True}).json()["choices"][0]["token_ids"]
                self.note(f"    model {('base' if name == str(model) else name)!r}: {tok.decode(ctx)!r} -> {tok.decode(ids)!r}")
        finally:
            server.stop()

    def fault(self, ctx: list[int], target: list[int]) -> None:
        """A caller waits for a long job; the training process is killed under it; the next
        trainer reads the job journal and reports the job, so the caller is answered."""
        import threading

        answer: dict = {}
        body = {"samples": [{"context_ids": ctx, "continuation_ids": target}], "lr": 1e-6, "steps": 100000, "wait": True}
        caller = threading.Thread(target=lambda: answer.update(self.http.post("/train", json=body).json()))
        caller.start()
        while not (running := self.http.get("/train/status").json().get("running")) or running["step"] < 3:
            time.sleep(0.05)
        pid = self.http.get("/train/status").json()["pid"]
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        completions = []
        while caller.is_alive():  # a user of the model meanwhile
            completions.append(self.http.post("/v1/completions", json={"model": str(self.model), "prompt": ctx,
                                                                       "max_tokens": 4}).status_code)
        self.note(f"    kill -9 {pid} at step {running['step']}: the waiting caller got `{answer['state']}` after "
                  f"{time.monotonic() - killed:.1f} s: {answer['error']}")
        status = self.server.wait_trainer()
        self.note(f"    a new trainer (pid {status['pid']}, {status['state']} {time.monotonic() - killed:.0f} s after the kill) "
                  f"answered from the job journal; meanwhile {completions.count(200)} of {len(completions)} completions "
                  "answered 200")

    def preference(self, tok) -> None:
        """Three (context, reply, reply) triples, each oriented against what the model prefers
        now; one DPO job; vLLM's scores of both replies before and after."""
        from hogwild.client import preference_samples

        triples = [("The fox came to the door and", " asked for bread.", " ran into the forest."),
                   ("The old lantern", " glowed all night long.", " broke on the floor."),
                   ("Every winter the village", " sang by the fire.", " forgot the old songs.")]

        def margin(sample) -> float:
            ctx = sample["context_ids"]
            scores = [self.token_logprobs(ctx + sample[k], len(ctx)) for k in ("chosen_ids", "rejected_ids")]
            return sum(scores[0]) - sum(scores[1])

        samples = []
        for sample in preference_samples(tok, triples):
            if margin(sample) > 0:  # teach the model the reply it does not prefer now
                sample["chosen_ids"], sample["rejected_ids"] = sample["rejected_ids"], sample["chosen_ids"]
            samples.append(sample)
        before = [margin(s) for s in samples]
        job = self.http.post("/train", json={"mode": "preference", "objective": "dpo", "beta": 0.1, "lr": 1e-3, "steps": 20,
                                             "samples": samples, "wait": True}).json()
        after = [margin(s) for s in samples]
        res = job["result"]
        for s, b, a in zip(samples, before, after):
            self.note(f"    {tok.decode(s['context_ids'])!r}: wants {tok.decode(s['chosen_ids'])!r} over "
                      f"{tok.decode(s['rejected_ids'])!r}: /v1/score margin {b:+.2f} -> {a:+.2f}")
        self.note(f"    job {job['job_id']} {job['state']}: reference = {res['reference']} ({res['reference_seconds']:.2f} s, "
                  f"once); rewards/margins {res['before']['rewards/margins']:+.3f} -> {res['after']['rewards/margins']:+.3f}, "
                  f"rewards/accuracies {res['before']['rewards/accuracies']:.2f} -> {res['after']['rewards/accuracies']:.2f}")
        with self.figure("preference.png", "DPO: the margin between the wanted and the unwanted reply, step by step",
                         (7, 3)) as (fig, ax):
            ax.plot([h["step"] for h in res["history"]], [h["rewards/margins"] for h in res["history"]], marker=".")
            ax.axhline(0.0, color="grey", lw=0.6)
            ax.set_xlabel("optimizer step (the server's)")
            ax.set_ylabel("rewards/margins (beta x log-ratio)")
            ax.set_title("Three pairs, one DPO job on the served weights")

    def operability(self) -> None:
        """The plugin's lines of a /metrics scrape, a background-priority score, and the CLI."""
        import contextlib
        import io

        from hogwild.cli import main as cli

        scrape = self.http.get("/metrics").text
        shown = ("hogwild_jobs_finished_total", "hogwild_tokens_trained_total", "hogwild_optimizer_steps_total",
                 "hogwild_weights_version", "hogwild_trainer_up", "hogwild_checkpoint_bytes_written_total")
        for line in scrape.splitlines():
            if line.startswith(shown):
                self.note(f"    {line}")
        body = {"prompt": [5, 6, 7, 8, 9], "score_ranges": [[0, 5]]}
        urgent, background = (self.http.post("/v1/score", json={**body, "priority": p}).json() for p in (0, 10))
        self.note(f"    /v1/score at priority 10 (background) answers as at 0: {urgent == background}")
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            cli(["status", self.server.url])
        self.note(f"    $ hogwild status {self.server.url}")
        for line in printed.getvalue().splitlines():
            self.note(f"      {line}")

    def bf16(self, tok) -> None:
        """The same directory served in bf16; one sample at lr 1e-5, written with
        nearest rounding, then with stochastic rounding (each job a fresh optimizer)."""
        self.server.stop()
        self.start_server(dtype="bfloat16")
        ctx = tok.encode("Once upon a time the server")
        cont = tok.encode(" kept a lantern by the door, and the fox came back every winter night.")
        drops = {}
        for rounding, rank in (("nearest", 32), ("stochastic", 64)):  # a new rank builds a new optimizer
            job = self.http.post("/train", json={"samples": [{"context_ids": ctx, "continuation_ids": cont}], "lr": 1e-5,
                                                 "steps": 30, "rank": rank, "rounding": rounding, "wait": True}).json()
            res = job["result"]
            drops[rounding] = res["loss_before"] - res["loss_after"]
            self.note(f"    lr 1e-5, 30 steps, rounding {res['rounding']}: loss {res['loss_before']:.4f} -> "
                      f"{res['loss_after']:.4f} (fell {drops[rounding]:.4f})")
        self.note(f"    stochastic rounding moved the loss {drops['stochastic'] / drops['nearest']:.1f}x as far: with nearest "
                  "rounding most updates are smaller than half a bf16 spacing and vanish (bench bf16: stochastic "
                  "matches fp32)")
        warned = self.http.post("/train", json={"samples": [{"context_ids": ctx, "continuation_ids": cont}], "lr": 1e-10,
                                                "steps": 1, "wait": True}).json()
        self.note(f"    lr 1e-10: the job runs, and says: {warned['warnings'][0]}")
        with self.figure("bf16_rounding.png", "loss drop of the same job in bf16, nearest vs stochastic rounding",
                         (6, 3)) as (fig, ax):
            ax.bar(list(drops), list(drops.values()), color=["tab:grey", "tab:green"])
            ax.set_ylabel("loss before - loss after")
            ax.set_title("bf16, lr 1e-5, 30 steps: what lands in the served weights")

    def tensor_parallel(self, ctx: list[int], target: list[int]) -> None:
        """The untrained model served with TP 1 and with TP 2 (fresh copies); the same job on
        each; the per-step losses side by side; the TP 2 ranks and its checkpoint."""
        curves = {}
        for tp in (1, 2):
            model = self.out / f"model-tp{tp}"
            shutil.rmtree(model, ignore_errors=True)
            shutil.copytree(self.untrained, model, ignore=shutil.ignore_patterns(".hogwild"))
            env = {"HOGWILD_STATE_DIR": str(self.out / f"state-tp{tp}"), **({"VLLM_CPU_OMP_THREADS_BIND": "0|1"} if tp > 1 else {})}
            server = VllmServer(model, log_path=self.out / f"vllm-tp{tp}.log", dtype="float32", env=env,
                                extra_args=["--tensor-parallel-size", str(tp)])
            say(f"starting: VLLM_PLUGINS=hogwild vllm {' '.join(server.args)}")
            server.start()
            try:
                server.wait_trainer()
                http = httpx.Client(base_url=server.url, timeout=600)
                job = http.post("/train", json={"samples": [{"context_ids": ctx, "continuation_ids": target}], "lr": 1e-2,
                                                "steps": 40, "wait": True}).json()
                curves[tp] = [h["loss"] for h in job["result"]["history"]]
                if tp == 1:
                    continue
                for rank in http.get("/train/status").json()["tensor_parallel"]["ranks"]:
                    self.note(f"    trainer rank {rank['rank']} (pid {rank['pid']}): {rank['param_bytes'] / 2**10:.0f} KiB of "
                              f"parameters, all views of vLLM rank {rank['rank']}'s shard: "
                              f"{rank['shared_param_bytes'] == rank['param_bytes']}")
                r = http.post("/v1/completions", json={"model": str(model), "prompt": ctx, "max_tokens": len(target),
                                                       "temperature": 0, "return_token_ids": True}).json()
                self.note(f"    after 40 steps on TP 2: {PROMPT!r} -> {r['choices'][0]['text']!r} "
                          f"({'the target' if r['choices'][0]['token_ids'] == target else 'NOT the target'})")
                report = http.post("/checkpoint", json={}).json()
                self.note(f"    /checkpoint: {report['blocks_written']} blocks of the ordinary, unsharded model directory "
                          "(each split tensor gathered on rank 0 one at a time)")
            finally:
                server.stop()
        gaps = [abs(a - b) for a, b in zip(curves[1], curves[2])]
        k = max(range(len(gaps)), key=gaps.__getitem__)
        self.note(f"    the same job on TP 1 and TP 2: loss {curves[1][0]:.3f} -> {curves[1][-1]:.4f} and "
                  f"{curves[2][0]:.3f} -> {curves[2][-1]:.4f}; the largest gap between the per-step losses is "
                  f"{gaps[k]:.1e}, at step {k + 1} (loss {curves[1][k]:.3f}): the gradients agree to fp32 rounding, their "
                  "norms in the sixth digit (torch's fp32 norm in one process, summed squares across the ranks), and so "
                  "does the clipping factor; at lr 1e-2 Adam lets such differences grow (at lr 1e-3 over 20 steps the gap "
                  "stays under 1e-5: tests/e2e/test_tensor_parallel.py)")
        with self.figure("tensor_parallel.png", "per-step loss of the same job on TP 1 and TP 2", (6, 3)) as (fig, ax):
            ax.plot(range(1, len(curves[1]) + 1), curves[1], lw=4, alpha=0.4, label="TP 1 (one trainer)")
            ax.plot(range(1, len(curves[2]) + 1), curves[2], "k--", lw=1, label="TP 2 (two trainer ranks)")
            ax.set_xlabel("optimizer step")
            ax.set_ylabel("loss")
            ax.legend()

    def reward_heads(self) -> None:
        """Synthetic corpora -> heads trained on the served trunk -> /v1/score with heads."""
        from transformers import AutoTokenizer

        from hogwild.client import wrapped_prompt
        from hogwild.contracts.btrm_config import load_config
        from hogwild.training.btrm_corpora import write_corpora
        from hogwild.training.btrm_data import build_labelled_set

        config_path = write_corpora(self.out / "state" / "btrm-corpora", per_tier=30)
        response = self.http.post("/train", json={"mode": "btrm", "config_path": str(config_path.resolve()), "wait": True})
        if response.status_code != 200:
            raise RuntimeError(f"/train (btrm): {response.status_code} {response.text}")
        r = response.json()
        accuracy = r["result"]["held_out_accuracy"]
        self.note(f"    {r['n_samples']} texts from {config_path.parent.name}/ ({r['result']['data']['bad_rows']} unreadable rows "
                  f"reported), {len(accuracy)} heads; held-out pairwise accuracy: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in accuracy.items()))
        config = load_config(config_path)
        labelled = build_labelled_set(config, config_path.parent)
        tok = AutoTokenizer.from_pretrained(self.model)
        picks = {}
        for text, labels in zip(labelled.texts, labelled.labels):
            key = next((h for h, v in labels.items() if v == "positive" and h in ("ocean", "kitchen", "fable")), None)
            if key and key not in picks and not (key != "fable" and labels.get("fable") == "positive"):
                picks[key] = text
        rows = {}
        for key, text in picks.items():
            prompt = wrapped_prompt(tok, config, text)
            scored = self.http.post("/v1/score", json={"prompt": prompt, "score_ranges": [[0, len(prompt)]], "heads": True}).json()
            rows[key] = scored["scores"][0]["heads"]
            best = max(rows[key], key=rows[key].get)
            self.note(f"    a {key} text {text[:48]!r}...: " + ", ".join(f"{h} {v:+.2f}" for h, v in rows[key].items())
                      + f"  (highest: {best})")
        self.plot_heads(rows)

    def train_readout_offline(self) -> Path:
        """``hogwild readout train`` on the model about to be served."""
        import subprocess
        import sys

        out = self.out / "readout"
        command = [sys.executable, "-m", "hogwild.cli", "readout", "train", "--model", str(self.model), "--stories",
                   str(REPO / "stories"), "--layers", "0", "1", "--aggregator", "mean", "--out", str(out)]
        say("    $ hogwild " + " ".join(command[3:]))
        run = subprocess.run(command, capture_output=True, text=True)
        if run.returncode:
            raise RuntimeError(f"hogwild readout train failed:\n{run.stderr}")
        lines = run.stdout.splitlines()
        for line in lines[:1] + [line for line in lines if line.startswith(("quality:", "wrote"))]:
            self.note(f"    {line}")
        self.report += ["", "![concept-concept cosines of the trained vectors](readout/quality.png)", ""]
        return out / "readout.safetensors"

    def readout(self, tok) -> None:
        """The manifest, a completion with per-token readouts, a streamed one, and
        vectors trained online on the live weights, hot-loaded."""
        manifest = self.http.get("/v1/readout/manifest").json()
        self.note(f"    GET /v1/readout/manifest: {len(manifest['concepts'])} concepts ({', '.join(manifest['concepts'][:6])}, ...) "
                  f"at layers {manifest['layers']}, hidden size {manifest['hidden_size']}")
        question = "The train was late again and the platform was cold."
        r = self.http.post("/v1/chat/completions", json={"model": str(self.model), "max_tokens": 12, "temperature": 0,
                                                          "messages": [{"role": "user", "content": question}]}).json()
        choice = r["choices"][0]
        readout = choice["readout"]  # [n_tokens][n_layers][n_concepts]
        self.note(f"    chat completion -> {choice['message']['content']!r}: choices[0].readout is "
                  f"[{len(readout)} tokens][{len(readout[0])} layers][{len(readout[0][0])} concepts]")
        last = [row[-1] for row in readout]
        top = [manifest["concepts"][max(range(len(v)), key=v.__getitem__)] for v in last]
        self.note(f"    strongest concept per token at layer {manifest['layers'][-1]}: {', '.join(top)}")
        self.note("    (a tiny model trained on nothing: the values are real dot products, their meaning is not)")
        streamed = self.http.post("/v1/completions", json={"model": str(self.model), "prompt": question, "max_tokens": 4,
                                                           "temperature": 0, "stream": True})
        chunks = [json.loads(line[6:]) for line in streamed.text.split("\n\n") if line.startswith("data: {")]
        shapes = [f"[{len(c['choices'][0]['readout'])}][{len(c['choices'][0]['readout'][0])}]" for c in chunks
                  if "readout" in c["choices"][0]]
        self.note(f"    streamed: {len(shapes)} chunks, each with readout {shapes[0]} (layers x concepts) for its token")
        self.plot_readout(manifest, readout)
        stories = (self.out / "state" / "stories").resolve()  # request paths must lie in the state or model dir
        shutil.copytree(REPO / "stories", stories, dirs_exist_ok=True)
        t = time.monotonic()
        r = self.http.post("/readout/train", json={"stories": str(stories), "layers": [1], "aggregator": "pca",
                                                   "out": str((self.out / "state" / "readout-online").resolve()), "wait": True})
        if r.status_code != 200:
            raise RuntimeError(f"/readout/train: {r.status_code} {r.text}")
        job = r.json()
        after = self.http.get("/v1/readout/manifest").json()
        self.note(f"    POST /readout/train (pca, layer 1) on the live weights: {job['state']} in {time.monotonic() - t:.1f} s; "
                  f"hot-loaded as set {after['version']} == {job['result']['loaded_version']}: now layers {after['layers']}")
        for line in job["result"]["triage"][-1:]:
            self.note(f"    {line}")

    def plot_readout(self, manifest: dict, readout: list) -> None:
        values = [[row[-1][c] for row in readout] for c in range(len(manifest["concepts"]))]
        with self.figure("readout.png", "per-token readout of a chat completion", (8, 6)) as (fig, ax):
            image = ax.imshow(values, aspect="auto", cmap="coolwarm")
            ax.set_yticks(range(len(manifest["concepts"])), manifest["concepts"], fontsize=6)
            ax.set_xlabel("generated token")
            ax.set_title(f"choices[0].readout at layer {manifest['layers'][-1]}: one column per generated token")
            fig.colorbar(image, ax=ax, label="dot product with the concept vector")

    def reply_logprob(self, ids: list[int], span: tuple[int, int]) -> float:
        r = self.http.post("/v1/score", json={"prompt": ids, "score_ranges": [list(span)]})
        r.raise_for_status()
        return r.json()["scores"][0]["total_logprob"] / (span[1] - span[0])

    def circuit_breaker(self, tok) -> None:
        """Synthetic harmful/retain conversations -> LoRA trained on the live model
        -> merged into the served weights -> vLLM's log-probs move on harmful
        replies only -> reverted bit for bit."""
        from hogwild.training.chat_masks import assistant_markers, assistant_spans
        from hogwild.training.circuit_breaker_data import synthetic_samples

        samples = synthetic_samples(tok, 16, 16)
        markers = assistant_markers(tok)
        probe = {split: [s for s in samples if s.split == split][:6] for split in ("harmful", "retain")}
        spans = {id(s): assistant_spans(s.ids, markers)[0] for group in probe.values() for s in group}
        before = {k: [self.reply_logprob(s.ids, spans[id(s)]) for s in group] for k, group in probe.items()}
        weights_before = self.http.get("/train/status").json()["weights_version"]
        r = self.http.post("/train", json={"mode": "circuit_breaker", "wait": True, "config": {"lr": 5e-4, "steps": 80},
                                           "samples": [s.model_dump(exclude_none=True) for s in samples]})
        r.raise_for_status()
        job = r.json()
        res = job["result"]
        self.note(f"    job {job['job_id']} {job['state']}: {res['steps']} steps, LoRA on layers {res['lora_layers']}, target "
                  f"layer(s) {res['target_layers']}; loss mask: {res['mask']['masked_token_fraction']:.0%} of tokens "
                  f"(assistant replies, from the chat template)")
        self.note(f"    cosine to the original representation on harmful replies: {res['harmful_cos_before']:.2f} -> "
                  f"{res['harmful_cos_after']:.2f}; on retain replies {res['retain_cos_after']:.3f} "
                  f"(relative L2 {res['retain_l2_relative_after']:.3f}); coherence check passed: {res['coherence']['passed']}; "
                  f"merged: {res['merged']}")
        after = {k: [self.reply_logprob(s.ids, spans[id(s)]) for s in group] for k, group in probe.items()}
        shift = {k: sum(abs(a - b) for a, b in zip(after[k], before[k])) / len(before[k]) for k in before}
        self.note(f"    vLLM's log-prob per reply token moved {shift['harmful']:.4f} on harmful replies, "
                  f"{shift['retain']:.4f} on retain ones")
        if not res["merged"]:
            self.note(f"    not merged: {job['error']}")
            return
        r = self.http.post("/train/revert", json={"wait": True}).json()
        restored = {k: [self.reply_logprob(s.ids, spans[id(s)]) for s in group] for k, group in probe.items()}
        same = all(a == b for k in before for a, b in zip(before[k], restored[k]))
        self.note(f"    POST /train/revert: exact (bitwise, checked by digest): {r['result']['exact']}; log-probs back to "
                  f"before: {same}; weights version {weights_before} -> {r['weights_version']}")
        aggressive = self.http.post("/train", json={"mode": "circuit_breaker", "wait": True, "samples": [
            s.model_dump(exclude_none=True) for s in samples], "config": {"lr": 5e-4, "steps": 80, "alpha_max": 10,
                                                                          "guards": False}}).json()
        self.note(f"    the same with alpha 10 and no guards: {aggressive['state']}: {aggressive['error']}")
        self.plot_circuit_breaker(res["diagnostics"], aggressive["result"]["diagnostics"])

    def plot_circuit_breaker(self, good: list[dict], bad: list[dict]) -> None:
        with self.figure("circuit_breaker.png", "cosine to the original representations during training") as (fig, ax):
            for rows, style, name in ((good, "-", "alpha 0.5, guards"), (bad, ":", "alpha 10, no guards (tripped)")):
                steps = [d["step"] for d in rows]
                ax.plot(steps, [d["harmful_cos"] for d in rows], style, color="tab:red", label=f"harmful, {name}")
                ax.plot(steps, [d["retain_cos"] for d in rows], style, color="tab:blue", label=f"retain, {name}")
            ax.axhline(0.2, color="grey", lw=0.6, ls="--")
            ax.set_xlabel("step")
            ax.set_ylabel("cos(adapted, original)")
            ax.set_title("Circuit breaker: harmful representations rerouted, retain kept")
            ax.legend(fontsize=7)

    def plot_heads(self, rows: dict[str, dict[str, float]]) -> None:
        heads = list(next(iter(rows.values())))
        with self.figure("reward_heads.png", "head scores of three texts") as (fig, ax):
            width = 0.8 / len(rows)
            for i, (text_kind, scores) in enumerate(rows.items()):
                ax.bar([j + i * width for j in range(len(heads))], [scores[h] for h in heads], width=width, label=f"a {text_kind} text")
            ax.axhline(1.0, color="grey", lw=0.6, ls="--")
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(heads))], heads, fontsize=8)
            ax.set_ylabel("head score (/v1/score)")
            ax.set_title("Reward heads on the served trunk: each text scores highest on its own heads")
            ax.legend(fontsize=8)

    def plot(self, tok, target: list[int], before: list[float], after: list[float]) -> None:
        import math

        labels = [tok.decode([t]) for t in target]
        x = range(len(labels))
        with self.figure("score_before_after.png", "per-token probability of the target before and after /train",
                         (8, 3.5)) as (fig, ax):
            ax.bar([i - 0.2 for i in x], [math.exp(v) for v in before], width=0.4, label="before /train")
            ax.bar([i + 0.2 for i in x], [math.exp(v) for v in after], width=0.4, label="after /train")
            ax.set_xticks(list(x), [repr(s) for s in labels], rotation=30, fontsize=8)
            ax.set_ylim(0, 1.15)
            ax.set_ylabel("P(token | prefix), from /v1/score")
            ax.set_title("The target continuation, token by token, as vLLM scores it")
            ax.legend(loc="upper left", ncol=2)

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
        (self.out / "report.md").write_text("\n".join(self.report) + "\n")
        say(f"\nreport: {self.out / 'report.md'}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m hogwild.demo")
    parser.add_argument("--out", type=Path, default=Path("demo-output"))
    parser.add_argument("--model", type=Path, default=None, help="a model directory (default: build the tiny model)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    source = args.model
    if source is None:
        source = Path(".cache/models/tiny-float32")
        if not (source / "config.json").exists():
            say(f"building the tiny model in {source} ...")
            tiny_model.build(source)
    # The demo checkpoints into the directory it serves: serve a fresh copy.
    model = args.out / "model"
    shutil.rmtree(model, ignore_errors=True)
    shutil.rmtree(args.out / "state", ignore_errors=True)
    shutil.copytree(source, model, ignore=shutil.ignore_patterns(".hogwild"))
    demo = Demo(args.out, model.resolve(), source)
    try:
        demo.run()
    finally:
        demo.close()


if __name__ == "__main__":
    main()
