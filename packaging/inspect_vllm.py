"""Check every vLLM internal the plugin uses against the source of vLLM releases.

    python packaging/inspect_vllm.py [--versions 0.32.0 0.33.0 0.34.0] [--installed]

Each release's wheel is downloaded (``pip download --no-deps``, cached in
``.cache/vllm-wheels``) and its ``.py`` files are read from the zip and parsed with ``ast``:
nothing is installed, imported or run, so no GPU is needed. For each entry of
``vllm_internals.INTERNALS`` it reports whether the name is found (following vLLM's
imports, re-exports and base classes) and whether its signature fits the way the plugin
uses it (the parameters passed, the attributes read, what a replacement must mirror).
That is all it proves: not that the code behind a name still does what the plugin
expects, nor anything about running on a GPU (DESIGN.md, "The vLLM versions").

Writes ``packaging/vllm-inspection.md`` and ``.json``. Exits 1 when a release inside the
``gpu`` extra's pin fails, or when the pin and the runtime check
(``vllm_internals.SUPPORTED``) disagree about which releases are admitted.
``--installed`` checks the vLLM installed here instead (what the tests do).
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import operator
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VERSIONS = ("0.32.0", "0.33.0", "0.34.0")  # every vLLM release from 0.32 on that the registry serves (add new ones)
CACHE = REPO / ".cache" / "vllm-wheels"
REPORT = REPO / "packaging" / "vllm-inspection"


def load_internals():
    """``vllm_internals`` by path: it imports no vLLM (nor the rest of the plugin) at import time."""
    path = REPO / "plugin" / "model_runner" / "vllm_internals.py"
    spec = importlib.util.spec_from_file_location("hogwild_vllm_internals", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# ---- a vLLM source tree, from a wheel or a directory ------------------------------


class Tree:
    """The parsed modules of one vLLM source tree; ``read(path)`` gives a file's text or None."""

    def __init__(self, read, label: str):
        self._read, self.label, self._parsed = read, label, {}

    @classmethod
    def from_wheel(cls, wheel: Path) -> Tree:
        archive = zipfile.ZipFile(wheel)
        names = set(archive.namelist())
        return cls(lambda p: archive.read(p).decode() if p in names else None, wheel.name)

    @classmethod
    def from_dir(cls, root: Path) -> Tree:
        """``root`` holds the ``vllm`` package (e.g. site-packages)."""
        return cls(lambda p: (root / p).read_text() if (root / p).is_file() else None, str(root / "vllm"))

    def module(self, dotted: str) -> tuple[ast.Module, bool] | None:
        """(the module's AST, whether it is a package), or None where the tree has no such module."""
        if dotted not in self._parsed:
            base = dotted.replace(".", "/")
            self._parsed[dotted] = None
            for path, package in ((base + ".py", False), (base + "/__init__.py", True)):
                text = self._read(path)
                if text is not None:
                    self._parsed[dotted] = (ast.parse(text), package)
                    break
        return self._parsed[dotted]


@dataclass
class Found:
    module: str
    node: ast.AST  # a def, a class, an assignment, or the module itself
    owner: str = ""  # for a member: the class that defines it


def _top_level(body):
    """A module's statements, including those inside ``if`` / ``try`` (fallbacks), but not
    ``if TYPE_CHECKING:`` (names there do not exist when the plugin runs)."""
    for node in body:
        if isinstance(node, ast.If):
            if "TYPE_CHECKING" not in ast.unparse(node.test):
                yield from _top_level(node.body)
            yield from _top_level(node.orelse)
        elif isinstance(node, ast.Try):
            yield from _top_level(node.body)
            for handler in node.handlers:
                yield from _top_level(handler.body)
            yield from _top_level(node.orelse)
        else:
            yield node


def _absolute(module: str, package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    parts = module.split(".")
    base = parts[: len(parts) - node.level + (1 if package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def _assigns(node: ast.AST, name: str) -> bool:
    if isinstance(node, ast.Assign):
        return any(isinstance(t, ast.Name) and t.id == name for t in node.targets)
    return isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == name


def find(tree: Tree, module: str, name: str, depth: int = 0) -> Found | None:
    """Where ``module.name`` is defined, following imports, star imports and a lazy
    ``{"Name": "module:attr"}`` table (vLLM's ``__init__`` exports through one)."""
    parsed = tree.module(module)
    if parsed is None or depth > 12:
        return None
    mod, package = parsed
    for node in _top_level(mod.body):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            return Found(module, node)
        if _assigns(node, name):
            return Found(module, node)
    for node in _top_level(mod.body):
        if isinstance(node, ast.ImportFrom):
            source = _absolute(module, package, node)
            for alias in node.names:
                if alias.name == "*" and (hit := find(tree, source, name, depth + 1)):
                    return hit
                if (alias.asname or alias.name) == name:
                    return find(tree, source, alias.name, depth + 1) or _module(tree, f"{source}.{alias.name}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname == name:
                    return _module(tree, alias.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Dict):
            for key, value in zip(node.value.keys, node.value.values):
                if (isinstance(key, ast.Constant) and key.value == name and isinstance(value, ast.Constant)
                        and isinstance(value.value, str) and ":" in value.value):
                    target, attr = value.value.split(":", 1)
                    dots = len(target) - len(target.lstrip("."))
                    target = _absolute(module, package, ast.ImportFrom(module=target[dots:] or None, level=dots))
                    return find(tree, target, attr, depth + 1)
    return _module(tree, f"{module}.{name}")


def _module(tree: Tree, dotted: str) -> Found | None:
    parsed = tree.module(dotted)
    return Found(dotted, parsed[0]) if parsed else None


def _bases(tree: Tree, cls: Found) -> list[Found]:
    """The class's bases that are vLLM classes (others, like torch.Tensor, are not followed)."""
    out = []
    for base in cls.node.bases:
        base = base.value if isinstance(base, ast.Subscript) else base  # Generic[T]
        hit = None
        if isinstance(base, ast.Name):
            hit = find(tree, cls.module, base.id)
        elif isinstance(base, ast.Attribute) and isinstance(base.value, ast.Name):
            holder = find(tree, cls.module, base.value.id)
            if holder and isinstance(holder.node, ast.Module):
                hit = find(tree, holder.module, base.attr)
        if hit and isinstance(hit.node, ast.ClassDef):
            out.append(hit)
    return out


def member(tree: Tree, cls: Found, name: str, depth: int = 0) -> Found | None:
    """A class's own or inherited member: a def, a class-level field, or ``self.name = ...`` in a method."""
    for node in cls.node.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name or _assigns(node, name):
            return Found(cls.module, node, cls.node.name)
    for node in ast.walk(cls.node):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, (ast.AnnAssign, ast.AugAssign)) else []
        for target in targets:
            for t in ast.walk(target):
                if isinstance(t, ast.Attribute) and t.attr == name and isinstance(t.value, ast.Name) and t.value.id == "self":
                    return Found(cls.module, node, cls.node.name)
    if depth < 12:
        for base in _bases(tree, cls):
            if hit := member(tree, base, name, depth + 1):
                return hit
    return None


def resolve(tree: Tree, internal) -> Found | None:
    head, _, rest = internal.name.partition(".")
    if internal.kind == "text":
        return _module(tree, internal.module)
    found = find(tree, internal.module, head)
    if found and rest:
        found = member(tree, found, rest) if isinstance(found.node, ast.ClassDef) else None
    return found


# ---- the checks -------------------------------------------------------------------


def _params(fn: ast.FunctionDef) -> list[str]:
    a = fn.args
    names = [p.arg for p in a.posonlyargs + a.args]
    names += [f"*{a.vararg.arg}"] if a.vararg else (["*"] if a.kwonlyargs else [])
    names += [p.arg for p in a.kwonlyargs] + ([f"**{a.kwarg.arg}"] if a.kwarg else [])
    return names


def _shown(fn: ast.FunctionDef) -> str:
    return f"{fn.name}({', '.join(_params(fn))})"


def fits_call(fn: ast.FunctionDef, positional: int, keywords: tuple[str, ...], bound: bool) -> list[str]:
    """Why a call with ``positional`` arguments, then ``keywords``, does not fit ``fn``
    (``bound``: its first parameter is self/cls, given by Python)."""
    a = fn.args
    by_position = a.posonlyargs + a.args
    defaults = [None] * (len(by_position) - len(a.defaults)) + list(a.defaults)
    slots = list(zip(by_position, defaults))[1 if bound else 0:]
    problems = []
    if positional > len(slots) and not a.vararg:
        problems.append(f"takes {len(slots)} positional arguments, the plugin passes {positional}")
    named = {p.arg for p in a.args + a.kwonlyargs}  # what can be passed by keyword
    for key in keywords:
        if key not in named and not a.kwarg:
            problems.append(f"has no parameter {key!r}")
    for param, default in slots[positional:]:
        if default is None and param.arg not in keywords:
            problems.append(f"needs {param.arg!r}, which the plugin does not pass")
    for param, default in zip(a.kwonlyargs, a.kw_defaults):
        if default is None and param.arg not in keywords:
            problems.append(f"needs keyword {param.arg!r}, which the plugin does not pass")
    return problems


def _is_static(fn: ast.FunctionDef) -> bool:
    return any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in fn.decorator_list) and fn.name != "__new__"


def _calls(node: ast.AST, name: str) -> bool:
    return any(isinstance(n, ast.Call) and (getattr(n.func, "id", None) == name or getattr(n.func, "attr", None) == name)
               for n in ast.walk(node))


def _fields(tree: Tree, cls: Found, depth: int = 0) -> set[str]:
    """The class-level annotated fields of a dataclass / msgspec Struct / TypedDict, with its bases'."""
    names = {n.target.id for n in cls.node.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
    for base in _bases(tree, cls) if depth < 12 else []:
        names |= _fields(tree, base, depth + 1)
    return names


def check(tree: Tree, internal) -> dict:
    """One internal against one tree: {"status": "ok" | "absent" | "fail", "found", "signature", "problems"}."""
    found = resolve(tree, internal)
    if found is None:
        if internal.optional:
            return dict(status="absent", problems=["not in this release (optional: the plugin goes on without it)"])
        return dict(status="fail", problems=[f"{internal.module}.{internal.name} not found"])
    node, problems, signature = found.node, [], ""
    where = found.module + (f":{node.lineno}" if hasattr(node, "lineno") else "") + (f" ({found.owner})" if found.owner else "")
    is_def = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
    if internal.kind in ("function", "method"):
        if not is_def:
            return dict(status="fail", found=where, problems=[f"{internal.name} is no longer a function"])
        signature = _shown(node)
        bound = internal.kind == "method" and not _is_static(node)
        if internal.exact:
            if _params(node) != list(internal.params):
                problems.append(f"parameters are ({', '.join(_params(node))}); the plugin's replacement takes "
                                f"({', '.join(internal.params)})")
        elif internal.call:
            problems += fits_call(node, internal.positional, internal.params, bound)
        else:  # vLLM's own call: only that the parameters the plugin relies on are there
            problems += [f"has no parameter {p!r}" for p in internal.params if p not in _params(node)]
        if internal.own and found.owner != internal.name.split(".")[0]:
            problems.append(f"inherited from {found.owner}, not defined by the class itself: the plugin wraps its own")
        problems += [f"its body no longer calls {c}" for c in internal.calls if not _calls(node, c)]
        if internal.stateless:
            first = (node.args.posonlyargs + node.args.args)[0].arg
            if any(isinstance(n, ast.Name) and n.id == first for s in node.body for n in ast.walk(s)):
                problems.append(f"its body uses {first}: the plugin calls it without an instance")
        for caller in internal.late_in:
            problems += _late(tree, caller, internal)
        if internal.keywords:
            problems += _keyword_calls(tree, found.module, internal)
    elif internal.kind == "class":
        if not isinstance(node, ast.ClassDef):
            return dict(status="fail", found=where, problems=[f"{internal.name} is no longer a class"])
        missing = [a for a in internal.attrs if member(tree, found, a) is None]
        problems += [f"has no member {a!r}" for a in missing]
        signature = f"members: {', '.join(internal.attrs)}" if internal.attrs else ""
        if internal.params:
            init = member(tree, found, "__init__") or member(tree, found, "__new__")
            if init and isinstance(init.node, ast.FunctionDef):
                signature = f"{init.owner}.{_shown(init.node)}" + (f"; {signature}" if signature else "")
                problems += fits_call(init.node, internal.positional, internal.params, True)
            else:
                fields = _fields(tree, found)
                signature = f"fields include {', '.join(internal.params)}" + (f"; {signature}" if signature else "")
                problems += [f"has no field {p!r}" for p in internal.params if p not in fields]
    elif internal.kind == "text":
        if not any(isinstance(n, ast.Constant) and n.value == internal.name or isinstance(n, ast.Attribute)
                   and n.attr == internal.name for n in ast.walk(node)):
            problems.append(f"{internal.module} no longer uses {internal.name!r}")
        signature = f"uses {internal.name!r}"
    return dict(status="fail" if problems else "ok", found=where, signature=signature, problems=problems)


def _late(tree: Tree, caller: str, internal) -> list[str]:
    """The plugin replaces the function on its module: ``caller`` must look it up there when it calls it."""
    parsed = tree.module(caller)
    if parsed is None:
        return [f"{caller} (which must call it) is gone"]
    mod, package = parsed
    for node in _top_level(mod.body):
        if (isinstance(node, ast.ImportFrom) and _absolute(caller, package, node) == internal.module
                and any(a.name == internal.name for a in node.names)):
            return [f"{caller} imports it at import time: the plugin's replacement would not reach it"]
    if not any(isinstance(n, ast.ImportFrom) and any(a.name == internal.name for a in n.names) or
               isinstance(n, ast.Attribute) and n.attr == internal.name for n in ast.walk(mod)):
        return [f"{caller} no longer calls it"]
    return []


def _keyword_calls(tree: Tree, module: str, internal) -> list[str]:
    """The plugin's wrapper takes these by keyword only: every call in the module must pass them so."""
    calls = [n for n in ast.walk(tree.module(module)[0]) if isinstance(n, ast.Call) and
             getattr(n.func, "id", None) == internal.name]
    if not calls:
        return [f"no call of {internal.name} left in {module}"]
    return [f"line {c.lineno} passes arguments by position or without {', '.join(internal.keywords)}" for c in calls
            if c.args or not set(internal.keywords) <= {k.arg for k in c.keywords}]


def as_used(internal) -> str:
    """How the plugin uses it, for the report."""
    short = internal.name.split(".")[-1]
    if internal.kind == "text":
        return f"the name {internal.name!r}"
    parts = []
    if internal.exact:
        parts.append(f"replaced by {short}({', '.join(internal.params)})")
    elif internal.call and (internal.kind in ("function", "method") or internal.params):
        args = [f"arg{i + 1}" for i in range(internal.positional)] + [f"{p}=" for p in internal.params]
        parts.append(f"{short}({', '.join(args)})")
    elif internal.params:
        parts.append(f"has parameters {', '.join(internal.params)}")
    if internal.attrs:
        parts.append("." + ", .".join(internal.attrs))
    parts += ["defined by the class itself"] * internal.own + [f"calls {c}" for c in internal.calls]
    parts += ["body uses no self"] * internal.stateless
    parts += [f"looked up at call time by {', '.join(c.rsplit('.', 1)[-1] for c in internal.late_in)}"] * bool(internal.late_in)
    parts += [f"called with {', '.join(internal.keywords)} by keyword"] * bool(internal.keywords)
    parts += ["optional"] * internal.optional
    return "; ".join(parts) or internal.kind


def inspect_tree(tree: Tree, internals) -> list[dict]:
    return [dict(internal=f"{i.module}.{i.name}" if i.kind != "text" else f"{i.module}: {i.name!r}",
                 used_by=i.used_by, as_used=as_used(i), **check(tree, i)) for i in internals]


# ---- releases, the pin, the report ----------------------------------------------------


def wheel(version: str) -> Path:
    found = sorted(CACHE.glob(f"vllm-{version}-*.whl"))
    if not found:
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
                        f"vllm=={version}", "-d", str(CACHE)], check=True)
        found = sorted(CACHE.glob(f"vllm-{version}-*.whl"))
    return found[-1]


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text.split("+")[0])[:3])


_OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq, "!=": operator.ne}


def gpu_pin() -> str:
    """The ``gpu`` extra's requirement, e.g. ``vllm>=0.32,<0.34``."""
    line = re.search(r"^gpu = \[(.*)\]$", (REPO / "pyproject.toml").read_text(), re.M)  # no tomllib on Python 3.10
    return next(r.strip(' "') for r in line.group(1).split('", ') if r.strip(' "').startswith("vllm"))


def in_pin(version: str, pin: str) -> bool:
    """Plain comparisons only (``>=``, ``<``, ...): enough for this pin, without the ``packaging`` library."""
    clauses = re.findall(r"(>=|<=|==|!=|>|<)\s*([\d.]+)", pin)
    return all(_OPS[op](_version(version), _version(bound)) for op, bound in clauses)


def verdict(results: dict[str, list[dict]], pin: str, supported: tuple[str, ...]) -> list[str]:
    """Why the pin and the runtime check are not justified by these results (empty: they are)."""
    problems = []
    passed = {v for v, rows in results.items() if all(r["status"] != "fail" for r in rows)}
    for version in results:
        minor = ".".join(version.split(".")[:2])
        if in_pin(version, pin) and version not in passed:
            problems.append(f"{pin} admits vLLM {version}, which fails the inspection")
        if in_pin(version, pin) and minor not in supported:
            problems.append(f"{pin} admits vLLM {version}, which the runtime check refuses ({', '.join(supported)})")
    for minor in supported:
        if not any(v.startswith(minor + ".") and v in passed and in_pin(v, pin) for v in results):
            problems.append(f"the runtime check admits {minor}.x, which has no passing release inside {pin}")
    return problems


def markdown(results: dict[str, list[dict]], pin: str, run: tuple, inspected: tuple, problems: list[str]) -> str:
    versions = list(results)
    passing = [v for v, rows in results.items() if all(r["status"] != "fail" for r in rows)]
    lines = ["# vLLM internals: inspection report", "",
             "Written by `make inspect-vllm` (`packaging/inspect_vllm.py`): each vLLM internal the plugin uses "
             "(`plugin/model_runner/vllm_internals.py`, `INTERNALS`), looked up in each release's source, read from "
             "its wheel with `ast` (not installed, imported or run). \"fits\" means the name is there and its signature "
             "fits the plugin's use; it says nothing about behaviour (DESIGN.md, \"The vLLM versions\").", "",
             "| release | wheel | result |", "| --- | --- | --- |"]
    for version, rows in results.items():
        failed = sum(r["status"] == "fail" for r in rows)
        absent = sum(r["status"] == "absent" for r in rows)
        result = f"**fails**: {failed} of {len(rows)}" if failed else f"passes: {len(rows) - absent} of {len(rows)} fit"
        result += f", {absent} optional absent" if absent else ""
        lines.append(f"| {version} | {SOURCES.get(version, '')} | {result} |")
    lines += ["", f"The `gpu` extra's pin, `{pin}`, admits {', '.join(v for v in versions if in_pin(v, pin)) or 'none'} "
              f"of these; passing: {', '.join(passing) or 'none'}. The runtime check (`vllm_internals.check_version`) "
              f"admits {', '.join(m + '.x' for m in run)} (run: the tests ran on it) and "
              f"{', '.join(m + '.x' for m in inspected)} (inspected only, and logged so at start-up)."]
    if problems:
        lines += ["", "**The pin or the runtime check disagrees with this report:**", *[f"- {p}" for p in problems]]
    lines += ["", "## Each internal, as the plugin uses it", "",
              "| internal | used by | as used | " + " | ".join(versions) + " |",
              "| --- | --- | --- | " + " | ".join("---" for _ in versions) + " |"]
    for i, row in enumerate(results[versions[0]]):
        cells = [{"ok": "fits", "absent": "absent (optional)"}.get(results[v][i]["status"], "**fails**") for v in versions]
        lines.append(f"| `{row['internal']}` | {row['used_by']} | {row['as_used']} | " + " | ".join(cells) + " |")
    for version, rows in results.items():
        lines += ["", f"## vLLM {version}: where each was found", "", "| internal | found at | in vLLM | result |",
                  "| --- | --- | --- | --- |"]
        for r in rows:
            result = {"ok": "fits", "absent": "absent (optional)"}.get(r["status"], "**fails**: " + "; ".join(r["problems"]))
            lines.append(f"| `{r['internal']}` | {r.get('found', '')} | {r.get('signature', '')} | {result} |")
    return "\n".join(lines) + "\n"


SOURCES: dict[str, str] = {}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--versions", nargs="+", default=list(VERSIONS))
    parser.add_argument("--installed", action="store_true", help="check the vLLM installed here (no report written)")
    parser.add_argument("--out", type=Path, default=REPORT, help="report path without suffix (.md and .json)")
    args = parser.parse_args(argv)
    internals = load_internals()
    if args.installed:
        spec = importlib.util.find_spec("vllm")  # finds the package without importing it
        rows = inspect_tree(Tree.from_dir(Path(spec.submodule_search_locations[0]).parent), internals.INTERNALS)
        for r in rows:
            print(f"{r['status']:6} {r['internal']}  {'; '.join(r['problems'])}")
        return int(any(r["status"] == "fail" for r in rows))
    results = {}
    for version in args.versions:
        path = wheel(version)
        SOURCES[version] = path.name
        results[version] = inspect_tree(Tree.from_wheel(path), internals.INTERNALS)
    pin = gpu_pin()
    problems = verdict(results, pin, internals.SUPPORTED)
    args.out.with_suffix(".md").write_text(markdown(results, pin, internals.RUN, internals.INSPECTED, problems))
    args.out.with_suffix(".json").write_text(json.dumps(
        dict(pin=pin, run=internals.RUN, inspected=internals.INSPECTED, problems=problems,
             wheels=SOURCES, results=results), indent=1) + "\n")
    for version, rows in results.items():
        failed = [r for r in rows if r["status"] == "fail"]
        print(f"vLLM {version}: {'FAILS' if failed else 'passes'} ({len(rows) - len(failed)}/{len(rows)})"
              f"{'' if in_pin(version, pin) else ' (outside the pin)'}")
        for r in failed:
            print(f"    {r['internal']}: {'; '.join(r['problems'])}")
    print(f"pin: {pin}; report: {args.out.with_suffix('.md').relative_to(REPO)}")
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    return int(bool(problems))


if __name__ == "__main__":
    sys.exit(main())
