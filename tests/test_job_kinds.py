"""Job kinds see a narrow protocol of the trainer service (worker/kinds/base.py ``Services``):
every member of the service a kind uses is in it, every member of it is used by some kind,
and the service provides it. ``kind.train`` sees a rank (``RankTrainer``) only."""

from __future__ import annotations

import ast
from pathlib import Path

from hogwild.worker.kinds.base import RankTrainer, Services

KINDS = Path(__file__).resolve().parents[1] / "worker" / "kinds"


def protocol_members(protocol) -> set[str]:
    members = set(getattr(protocol, "__annotations__", {}))
    members |= {name for name, value in vars(protocol).items() if callable(value) and not name.startswith("_")}
    return members


def uses_of(name: str) -> dict[str, set[str]]:
    """Per kinds module: the attributes it reads of a parameter called ``name``."""
    uses = {}
    for path in sorted(KINDS.glob("*.py")):
        if path.name == "base.py":
            continue
        tree = ast.parse(path.read_text())
        uses[path.name] = {node.attr for node in ast.walk(tree)
                           if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == name}
    return uses


def test_the_kinds_use_only_the_protocol_and_all_of_it():
    members = protocol_members(Services)
    uses = uses_of("service")
    beyond = {module: sorted(used - members) for module, used in uses.items() if used - members}
    assert not beyond, f"job kinds use members of the service beyond kinds.base.Services: {beyond}"
    assert members == set().union(*uses.values()), f"unused in the protocol: {members - set().union(*uses.values())}"
    rank_uses = set().union(*uses_of("rank").values())
    assert rank_uses and rank_uses <= protocol_members(RankTrainer), rank_uses


def test_every_kind_method_takes_the_protocol():
    for path in sorted(KINDS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name in ("admit", "estimate", "run"):
                service = node.args.args[1]
                assert service.arg == "service" and ast.unparse(service.annotation) == "Services", (path.name, node.name)
            if isinstance(node, ast.FunctionDef) and node.name == "train":
                assert ast.unparse(node.args.args[1].annotation) == "RankTrainer", (path.name, node.name)


def test_the_trainer_service_provides_the_protocol(tmp_path):
    from hogwild.worker.service import TrainerService

    service = TrainerService(tmp_path / "session", tmp_path / "state")
    try:
        assert isinstance(service, Services)
    finally:
        service.model_ops.shutdown()
        service.reader_ops.shutdown()
