"""The plugin's entry points, outside a running server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

from hogwild.contracts.protocol import PROTOCOL_VERSION, Request, StatusOp, TokenLogprobsOp
from hogwild.plugin.trainability import full_weight_refusal, unsupported_reason
from hogwild.worker.__main__ import parse_request

PROBE = """
import json, os
from vllm.model_executor.layers import utils
from vllm.model_executor.model_loader.base_loader import BaseModelLoader
original = (utils.dispatch_cpu_unquantized_gemm, BaseModelLoader.load_model)
from vllm.plugins import load_general_plugins
load_general_plugins()
print(json.dumps({
    "dispatch_patched": utils.dispatch_cpu_unquantized_gemm is not original[0],
    "loader_patched": BaseModelLoader.load_model is not original[1],
    "session": os.environ.get("HOGWILD_SESSION_DIR"),
}))
"""


def probe(env_changes: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("VLLM_PLUGINS", "HOGWILD_SESSION_DIR")}
    env.update(env_changes)
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_plugin_is_inert_unless_named_in_vllm_plugins():
    # vLLM loads every installed general plugin when VLLM_PLUGINS is unset.
    assert probe({}) == {"dispatch_patched": False, "loader_patched": False, "session": None}
    assert probe({"VLLM_PLUGINS": "someother"})["dispatch_patched"] is False


def test_the_plugin_patches_when_enabled(tmp_path):
    session = tmp_path / "session"
    result = probe({"VLLM_PLUGINS": "hogwild", "HOGWILD_SESSION_DIR": str(session)})
    assert result == {"dispatch_patched": True, "loader_patched": True, "session": str(session)}
    assert session.is_dir() and oct(session.stat().st_mode & 0o777) == "0o700"


def config(tp=1, pp=1, dp=1, quant=None, device="cpu"):
    return SimpleNamespace(
        parallel_config=SimpleNamespace(tensor_parallel_size=tp, pipeline_parallel_size=pp, data_parallel_size=dp),
        quant_config=None, model_config=SimpleNamespace(quantization=quant), device_config=SimpleNamespace(device=SimpleNamespace(type=device)),
    )


def test_pipeline_data_parallel_and_quantized_servers_are_refused_with_a_reason_or_train_adapters_only():
    assert unsupported_reason(config()) is None
    assert unsupported_reason(config(tp=2)) is None  # each rank publishes its shard, one trainer rank each
    assert "pipeline parallel size 2" in unsupported_reason(config(pp=2))
    assert "data parallel" in unsupported_reason(config(dp=2))
    assert "fp8 base is not supported: adapters train on compressed-tensors" in unsupported_reason(config(quant="fp8"))
    # A compressed-tensors base trains adapters only, with tensor parallel size 1.
    assert unsupported_reason(config(quant="compressed-tensors")) is None
    assert '"adapter"' in full_weight_refusal(config(quant="compressed-tensors")) and full_weight_refusal(config()) is None
    assert "tensor parallel size 2" in unsupported_reason(config(tp=2, quant="compressed-tensors"))
    assert "inference works" in unsupported_reason(config(pp=2))
    assert "xpu" in unsupported_reason(config(device="xpu"))


def test_wire_messages_are_versioned_json():
    req = Request(id="1", body=TokenLogprobsOp(token_ids=[1, 2]))
    assert json.loads(req.model_dump_json())["v"] == PROTOCOL_VERSION
    assert isinstance(parse_request(req.model_dump_json().encode()), Request)
    wrong = parse_request(json.dumps({"v": 999, "id": "2", "body": {"op": "status"}}).encode())
    assert not wrong.ok and wrong.error.code == "version" and wrong.id == "2"
    bad = parse_request(json.dumps({"v": PROTOCOL_VERSION, "id": "3", "body": {"op": "rm -rf"}}).encode())
    assert not bad.ok and bad.error.code == "invalid"
    assert parse_request(b"\x80 not json").ok is False
    assert Request(id="4", body=StatusOp()).body.op == "status"


def test_unauthenticated_training_beyond_loopback_needs_an_explicit_opt_in(monkeypatch):
    from hogwild.plugin.api_server.auth import Access

    for var in ("VLLM_API_KEY", "HOGWILD_ADMIN_KEY", "HOGWILD_ALLOW_UNAUTHENTICATED_TRAINING"):
        monkeypatch.delenv(var, raising=False)

    def args(**kw):
        return SimpleNamespace(api_key=None, host=None, uds=None, **kw) if "host" not in kw else SimpleNamespace(api_key=None, uds=None, **kw)

    assert "every interface" in Access(args()).refusal  # vLLM's default host: all interfaces
    assert "0.0.0.0" in Access(args(host="0.0.0.0")).refusal
    assert Access(args(host="127.0.0.1")).refusal is None
    assert Access(SimpleNamespace(api_key=["k"], host="0.0.0.0", uds=None)).refusal is None
    monkeypatch.setenv("HOGWILD_ADMIN_KEY", "admin")
    assert Access(args(host="0.0.0.0")).refusal is None
    monkeypatch.delenv("HOGWILD_ADMIN_KEY")
    monkeypatch.setenv("HOGWILD_ALLOW_UNAUTHENTICATED_TRAINING", "1")
    assert Access(args(host="0.0.0.0")).refusal is None
