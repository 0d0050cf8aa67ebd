"""The ``hogwild`` command.

    hogwild btrm synth -o DIR              synthetic corpora with known structure, and a config for them
    hogwild btrm gen-config -o FILE        an annotated config template
    hogwild btrm test-decoders -c CONFIG   decode every source: rows, texts, filtered and bad rows
    hogwild btrm sample-inputs -c CONFIG   what each head will see (wrapped in the meta-prompt)
    hogwild btrm train -c CONFIG -o DIR --model MODEL
    hogwild btrm score -m DIR -i in.jsonl -o out.jsonl
    hogwild readout train --model DIR --stories stories/ --layers 10 20 --aggregator mean --out DIR
    hogwild rl URL --prompts prompts.jsonl --reward band:800:1200 --group-size 8 --iterations 20
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

CONFIG_TEMPLATE = """\
# hogwild BTRM config: one shared trunk, one scalar head per criterion.
# Paths are relative to this file.

# Wraps every sample, positive and negative alike, so the prompt carries no label.
meta_prompt: |-
  Read the passage below.

  Passage:
  {text}

  End of passage.

heads:
  - name: my_head                     # letters, digits, _ . -
    description: what membership means for this head
    positive_sources:
      - path: positives.jsonl
        text_field: auto              # auto: `text` (flattened), `prose` (fk_normed, brainrot_aesop*), else the first string field
        tier_filter: [flattened, fk_normed]   # keep rows whose `tier` is listed (omit: all rows)
    negative_sources:
      - path: near_misses.jsonl
        neg_tier: soft_neg            # soft_neg | semi_firm_neg | furthest_neg (see tier_weights)

# Merged into every head's negatives at load time.
shared_negatives:
  - path: external.jsonl
    neg_tier: furthest_neg

tier_weights: {soft_neg: 2.0, semi_firm_neg: 1.0, furthest_neg: 0.5}
cap: 10.0              # scores = cap * tanh(scores / cap); 0 disables
logsq: squared         # squared: (log(r^2+eps))^2, positives settle near 1; literal: log(r^2+eps), pulls them to 0
logsq_lambda: 0.1
lr: 0.003
epochs: 300
batch_size: 64
held_out_fraction: 0.2
max_length: 256
seed: 0
trunk_lora: false      # also train a LoRA (r=16, alpha=32) on the trunk, kept apart: never merged into the model
trunk_lora_epochs: 3   # with trunk_lora: after `epochs` of the heads alone, epochs of heads and adapter together
trunk_lora_lr: 3.0e-5  # the adapter's learning rate (higher drags the features faster than the heads follow)
max_grad_norm: 1.0     # with trunk_lora: gradient clipping
"""


def _progress(total_label: str):
    from tqdm import tqdm

    bars: dict[str, tqdm] = {}

    def update(phase: str, done: int, total: int) -> None:
        bar = bars.get(phase) or bars.setdefault(phase, tqdm(total=total, desc=f"{total_label} {phase}", leave=True))
        bar.n = done
        bar.refresh()
        if done >= total:
            bar.close()

    return update


def btrm_synth(args) -> None:
    from hogwild.training.btrm_corpora import write_corpora

    path = write_corpora(args.out, per_tier=args.per_tier, seed=args.seed)
    print(f"wrote synthetic corpora and {path}")


def btrm_gen_config(args) -> None:
    args.out.write_text(CONFIG_TEMPLATE)
    print(f"wrote {args.out}")


def btrm_test_decoders(args) -> None:
    from hogwild.contracts.btrm_config import load_config
    from hogwild.training.btrm_data import build_labelled_set

    labelled = build_labelled_set(load_config(args.config), args.config.parent)
    report = labelled.report
    for name, source in report["sources"].items():
        print(f"{name}: {source['rows']} rows -> {source['texts']} texts, {source['filtered_out']} filtered out, "
              f"{source['bad_rows']} bad")
        for line, why in source["bad_examples"]:
            print(f"    line {line}: {why}")
    print(json.dumps(report["per_head"], indent=2))
    if report["bad_rows"]:
        print(f"{report['bad_rows']} bad rows in all (not used)", file=sys.stderr)


def btrm_sample_inputs(args) -> None:
    from hogwild.contracts.btrm_config import load_config
    from hogwild.training.btrm_data import build_labelled_set

    config = load_config(args.config)
    labelled = build_labelled_set(config, args.config.parent)
    for h, head in enumerate(config.heads):
        print(f"=== {head.name}: {head.description}")
        for kind, rows in (("positive", labelled.positive[:, h]), ("negative", labelled.negative[:, h])):
            picked = rows.nonzero().flatten()[: args.n].tolist()
            for i in picked:
                tier = ""
                if kind == "negative":
                    weight = float(labelled.negative_weight[i, h])
                    tier = " " + next((t for t, w in config.tier_weights.items() if w == weight), f"weight {weight}")
                print(f"--- {kind}{tier}:\n{config.wrap(labelled.texts[i])}")


def btrm_train(args) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hogwild.contracts.btrm_config import load_config
    from hogwild.training.btrm_data import build_labelled_set
    from hogwild.training.btrm_run import encode, plot_training, train_btrm, train_btrm_with_trunk_lora
    from hogwild.training.lora import attached_lora

    config = load_config(args.config)
    labelled = build_labelled_set(config, args.config.parent)
    if labelled.report["bad_rows"]:
        print(f"{labelled.report['bad_rows']} bad rows skipped (see `hogwild btrm test-decoders`)", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32 if args.float32 else "auto").eval()
    args.out.mkdir(parents=True, exist_ok=True)
    if config.trunk_lora:
        with attached_lora(model, r=16, alpha=32, dropout=0.05) as peft_model:
            result = train_btrm_with_trunk_lora(peft_model, encode(tokenizer, config, labelled.texts), labelled.head_names,
                                                labelled.positive, labelled.negative_weight, config, labelled.report,
                                                progress=_progress("btrm"))
            peft_model.save_pretrained(args.out / "trunk_lora")  # the adapter only: the trunk is untouched
    else:
        result = train_btrm(model, tokenizer, config, labelled, progress=_progress("btrm"))
    extra = {"model": str(args.model), "descriptions": {h.name: h.description for h in config.heads},
             "meta_prompt": config.meta_prompt, "config": config.model_dump(), **result.summary()}
    tensors, meta = result.heads.to_bytes(extra)
    (args.out / "heads.safetensors").write_bytes(tensors)
    (args.out / "heads.json").write_bytes(meta)
    plot_training(result.log, labelled.head_names, args.out / "training.png")
    print(json.dumps({"held_out_accuracy": result.held_out_accuracy, "positive_scores": result.positive_scores}, indent=2))
    print(f"wrote {args.out}/heads.safetensors, heads.json and training.png")


def btrm_score(args) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hogwild.contracts.btrm_config import SourceSpec
    from hogwild.training.btrm import RewardHeads, last_token_features
    from hogwild.training.btrm_data import decode_source

    heads = RewardHeads.from_bytes((args.heads / "heads.safetensors").read_bytes(), (args.heads / "heads.json").read_bytes())
    model_path = args.model or heads.extra.get("model")
    if not model_path:
        raise SystemExit("which trunk? pass --model")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32 if args.float32 else "auto").eval()
    if (args.heads / "trunk_lora").is_dir():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.heads / "trunk_lora").eval()
    decoded = decode_source(SourceSpec(path=str(args.input.resolve()), text_field=args.text_field), args.input.parent)
    for line, why in decoded.bad:
        print(f"{args.input}: line {line} skipped: {why}", file=sys.stderr)
    wrap = heads.extra.get("meta_prompt", "{text}")
    max_length = heads.extra.get("config", {}).get("max_length", 256)
    ids = [tokenizer.encode(wrap.replace("{text}", t), add_special_tokens=False)[-max_length:] for t in decoded.texts]
    bar = _progress("score")
    with torch.no_grad():
        scores = heads(last_token_features(model, ids, progress=lambda done, total: bar("features", done, total)))
    with open(args.output, "w") as f:
        for text, row in zip(decoded.texts, scores.tolist()):
            f.write(json.dumps({"text": text, "scores": dict(zip(heads.names, row))}) + "\n")
    print(f"scored {len(decoded.texts)} texts with {len(heads.names)} heads into {args.output}")


def parse_layers(values: list[str], num_layers: int) -> list[int]:
    """``--layers 3 5``, ``3,5``, ``all``, or negative indices counted from the end."""
    if values == ["all"]:
        return list(range(num_layers))
    layers = [int(v) for value in values for v in value.split(",") if v.strip()]
    return sorted({layer + num_layers if layer < 0 else layer for layer in layers})


def readout_train(args) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hogwild.readout.corpus import CorpusError, read_corpus
    from hogwild.readout.train import train_readout, write_training

    try:  # the corpus is checked before the model is loaded
        corpus = read_corpus(args.stories, args.min_positives)
    except CorpusError as exc:
        raise SystemExit(f"error: {exc}") from None
    for warning in corpus.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"{len(corpus.concepts)} concepts, {len(corpus.texts())} unique texts "
          f"({len(corpus.baselines)} baselines, {len(corpus.neutral)} neutral)")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32 if args.float32 else "auto").eval()
    layers = parse_layers(args.layers, model.config.num_hidden_layers)
    result = train_readout(model, tokenizer, corpus, layers, args.aggregator, args.dtype)
    written = write_training(result, args.out)
    print("\n".join(result.triage))
    print(f"wrote {written['vectors']}, {Path(written['manifest']).name}, quality.json and quality.png")


def preference_train(args) -> None:
    """Tokenize (context, chosen, rejected) texts with the served model's tokenizer and
    send them to a running server as one preference job."""
    from transformers import AutoTokenizer

    from hogwild.client import HogwildClient, preference_samples

    rows = [json.loads(line) for line in args.pairs.read_text().splitlines() if line.strip()]
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    samples = preference_samples(tokenizer, [(r["context"], r["chosen"], r["rejected"]) for r in rows],
                                 ids=[r["id"] for r in rows] if all("id" in r for r in rows) else None)
    client = HogwildClient(args.url, api_key=args.api_key, admin_key=args.admin_key)
    options = {"beta": args.beta, "steps": args.steps} if args.steps else {"beta": args.beta}
    job = client.train_preference(samples, objective=args.objective, wait=True, lr=args.lr, **options)
    print(json.dumps({k: job.get(k) for k in ("job_id", "state", "error", "warnings")}, indent=1))
    result = job.get("result") or {}
    for when in ("before", "after"):
        print(when, json.dumps({k: round(v, 4) for k, v in (result.get(when) or {}).items()}))


def load_reward(spec: str):
    """``band:LOW:HIGH`` (the fraction of completion tokens with ids in [LOW, HIGH)) or
    ``module:function`` (any importable callable (prompt_ids, completion_ids) -> float)."""
    import importlib

    from hogwild.rl_loop import TokenBandReward

    kind, _, rest = spec.partition(":")
    if kind == "band":
        low, _, high = rest.partition(":")
        return TokenBandReward(int(low), int(high))
    if not rest:
        raise SystemExit(f"--reward {spec!r}: give band:LOW:HIGH or module:function")
    return getattr(importlib.import_module(kind), rest)


def rl_run(args) -> None:
    """Online RL against a running server: sample, reward, train, repeat (``hogwild.rl_loop``)."""
    from tqdm import tqdm

    from hogwild.client import HogwildClient
    from hogwild.rl_loop import rl_loop

    rows = [json.loads(line) for line in args.prompts.read_text().splitlines() if line.strip()]
    prompts = [row["prompt_ids"] if isinstance(row, dict) else row for row in rows]
    if (args.reward is None) == (not args.reward_heads):
        raise SystemExit("give --reward or --reward-heads (one of them)")
    reward = load_reward(args.reward) if args.reward else None
    options = {"lr": args.lr, "objective": args.objective}
    if args.reward_heads:
        options["reward_heads"] = {h.partition("=")[0]: float(h.partition("=")[2] or 1) for h in args.reward_heads}
    for name in ("batch_size", "steps", "kl_coef", "max_staleness", "adapter", "adapter_rank"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    client = HogwildClient(args.url, api_key=args.api_key, admin_key=args.admin_key)
    bar = tqdm(total=args.iterations, desc="rl", unit="it")

    def report(record) -> None:
        bar.update(1)
        bar.set_postfix(reward=f"{record.mean_reward:.3f}")
        tqdm.write(record.line(args.iterations))

    history = rl_loop(client, prompts, reward, args.group_size, args.iterations, max_tokens=args.max_tokens,
                      temperature=args.temperature, on_iteration=report, **options)
    bar.close()
    if args.out:
        from dataclasses import asdict

        args.out.write_text("\n".join(json.dumps(asdict(h)) for h in history) + "\n")


def group_rows(group: dict | None) -> list[tuple[str, object]]:
    """The replica group as ``hogwild status`` lists it: this replica, whether all agree, then each replica."""
    if group is None:
        return [("replica group", "none (this replica trains alone)")]
    agree = {True: "yes", False: "NO", None: "not compared yet"}[group.get("consistent")]
    rows = [("replica group", f"rank {group['rank']} of {group['size']}, {group['state']}"), ("  reason", group.get("reason")),
            ("  replicas agree", agree), ("  stale", group.get("stale")), ("  fingerprint", group.get("fingerprint"))]
    if group.get("members_read_at"):
        rows.append(("  member list read", f"{time.time() - group['members_read_at']:.1f} s ago"))
    for m in group.get("members") or []:
        age = time.time() - m["seen_at"]
        rows.append((f"  replica {m['rank']}", f"{m['host']} pid {m['pid']}: {m['state']}, version {m['weights_version']}, "
                     f"fingerprint {m['fingerprint'] or '-'}{', stale' if m['stale'] else ''}, seen {age:.1f} s ago"))
    return rows


def status(args) -> None:
    """What a running server's trainer reports: the figures its /metrics publish, and more."""
    from hogwild.client import HogwildClient

    body = HogwildClient(args.url, api_key=args.api_key).status()
    if args.json:
        print(json.dumps(body, indent=1))
        return
    totals, server = body.get("totals") or {}, body.get("server") or {}
    rows = [("state", body.get("state")), ("reason", body.get("reason")), ("model", body.get("model")),
            *([("quantized base", f"{body['quantization']} (trains adapters only)")] if body.get("quantization") else []),
            ("weights version", body.get("weights_version")), ("queue depth", len(body.get("queue") or [])),
            ("running", (body.get("running") or {}).get("job_id")),
            ("jobs submitted", totals.get("jobs_submitted")), ("jobs finished", totals.get("jobs_finished")),
            ("tokens trained", totals.get("tokens_trained")), ("optimizer steps", totals.get("optimizer_steps")),
            ("last loss", totals.get("last_loss")), ("trainer restarts", server.get("trainer_restarts")),
            ("checkpoint bytes written", totals.get("checkpoint_bytes_written")),
            ("checkpoint seconds", totals.get("checkpoint_seconds")),
            ("readout rows received", server.get("readout_rows_received")),
            ("trainer ranks", (body.get("tensor_parallel") or {}).get("size"))]
    for name, key in (("seconds since last step", "last_step_at"), ("seconds since last checkpoint", "last_checkpoint_at")):
        rows.append((name, round(time.time() - totals[key], 1) if totals.get(key) else None))
    unreadable = (body.get("journal") or {}).get("unreadable") or []
    rows.append(("unreadable journal records", len(unreadable)))
    rows += [(f"  {u['file']}", u["reason"]) for u in unreadable]
    rows += group_rows(body.get("group"))
    adapters = body.get("served_adapters") or []
    rows.append(("served adapters", len(adapters)))
    rows += [(f"  {a['name']}", f"rank {a['rank']}, {a['steps']} steps, version {a['version']}") for a in adapters]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value if value is not None else '-'}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="hogwild", description="vllm-hogwild tools")
    sub = parser.add_subparsers(dest="tool", required=True)
    btrm = sub.add_parser("btrm", help="multi-head Bradley-Terry reward heads").add_subparsers(dest="command", required=True)

    p = btrm.add_parser("synth", help="write synthetic corpora and a config for them")
    p.add_argument("-o", "--out", type=Path, required=True)
    p.add_argument("--per-tier", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=btrm_synth)

    p = btrm.add_parser("gen-config", help="write an annotated config template")
    p.add_argument("-o", "--out", type=Path, required=True)
    p.set_defaults(run=btrm_gen_config)

    for name, run, helptext in (("test-decoders", btrm_test_decoders, "decode every source of a config and report"),
                                ("sample-inputs", btrm_sample_inputs, "show what each head will see")):
        p = btrm.add_parser(name, help=helptext)
        p.add_argument("-c", "--config", type=Path, required=True)
        p.add_argument("-n", type=int, default=2, help="samples per head and kind (sample-inputs)")
        p.set_defaults(run=run)

    p = btrm.add_parser("train", help="train the heads on a frozen trunk")
    p.add_argument("-c", "--config", type=Path, required=True)
    p.add_argument("-o", "--out", type=Path, required=True)
    p.add_argument("--model", required=True, help="the trunk: a Hugging Face model directory or id")
    p.add_argument("--float32", action="store_true", help="run the trunk in float32")
    p.set_defaults(run=btrm_train)

    p = btrm.add_parser("score", help="score a JSONL file with trained heads")
    p.add_argument("-m", "--heads", type=Path, required=True, help="a directory written by `hogwild btrm train`")
    p.add_argument("-i", "--input", type=Path, required=True)
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("--model", default=None, help="the trunk (default: the one the heads were trained on)")
    p.add_argument("--text-field", default="auto")
    p.add_argument("--float32", action="store_true")
    p.set_defaults(run=btrm_score)

    readout = sub.add_parser("readout", help="concept vectors for per-token readouts").add_subparsers(dest="command", required=True)
    p = readout.add_parser("train", help="train concept vectors from a story corpus (steering-vectors)")
    p.add_argument("--model", required=True, help="a Hugging Face model directory or id (the served model)")
    p.add_argument("--stories", type=Path, required=True, help="the corpus directory (see stories/README.md)")
    p.add_argument("--layers", nargs="+", required=True, help="decoder layer indices (0-based; -1 = last; or 'all')")
    p.add_argument("--aggregator", choices=["mean", "pca", "logistic"], default="mean")
    p.add_argument("--out", type=Path, required=True, help="writes readout.safetensors, readout.json, quality.json/.png")
    p.add_argument("--min-positives", type=int, default=4, help="fewer stories for a concept is an error")
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16", help="of the written vectors")
    p.add_argument("--float32", action="store_true", help="run the model in float32")
    p.set_defaults(run=readout_train)

    preference = sub.add_parser("preference", help="preference training on a running server").add_subparsers(
        dest="command", required=True)
    p = preference.add_parser("train", help="send (context, chosen, rejected) texts as one preference job")
    p.add_argument("url", help="the server, e.g. http://127.0.0.1:8000")
    p.add_argument("--pairs", type=Path, required=True, help='JSONL: {"context", "chosen", "rejected", "id"?} per line')
    p.add_argument("--model", required=True, help="the served model (for its tokenizer)")
    p.add_argument("--objective", choices=["dpo", "ipo", "dpop", "orpo", "simpo"], default="dpo")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--api-key", default=None)
    p.add_argument("--admin-key", default=None)
    p.set_defaults(run=preference_train)

    p = sub.add_parser("rl", help="online RL on a running server: sample, reward, train, repeat")
    p.add_argument("url", help="the server, e.g. http://127.0.0.1:8000")
    p.add_argument("--prompts", type=Path, required=True, help='JSONL: {"prompt_ids": [...]} (or a bare list) per line')
    p.add_argument("--reward", default=None, help="band:LOW:HIGH, or module:function taking (prompt_ids, completion_ids)")
    p.add_argument("--reward-heads", nargs="+", default=None, metavar="HEAD=WEIGHT",
                   help="instead of --reward: the server's reward heads score the completions")
    p.add_argument("--group-size", type=int, default=8, help="completions per prompt (one group)")
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--objective", choices=["grpo", "cispo", "reinforce"], default="grpo")
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--batch-size", type=int, default=None, help="samples per optimizer step (default: all)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--kl-coef", type=float, default=None)
    p.add_argument("--max-staleness", type=int, default=None)
    p.add_argument("--adapter", default=None, help="train this served adapter (sampled from it) instead of the base")
    p.add_argument("--adapter-rank", type=int, default=None, help="the rank of a new adapter")
    p.add_argument("--out", type=Path, default=None, help="write each iteration as a JSON line")
    p.add_argument("--api-key", default=None)
    p.add_argument("--admin-key", default=None)
    p.set_defaults(run=rl_run)

    p = sub.add_parser("status", help="what a running server's trainer reports (the figures of its /metrics)")
    p.add_argument("url", help="the server, e.g. http://127.0.0.1:8000")
    p.add_argument("--api-key", default=None)
    p.add_argument("--json", action="store_true", help="the whole /train/status answer")
    p.set_defaults(run=status)

    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
