"""The package's layout and import rules (docs/architecture.md), and the commands the docs print."""

from __future__ import annotations

import ast
import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "paradiffpolicy"

LIBRARY = {"config", "features", "normalizer", "schedulers", "policy", "checkpoint", "backends", "presets", "errors",
           "runtime", "measure", "success_stats"}
COMMANDS = {"eval", "train", "tune", "collect", "convert", "serve"}
FOLDERS = {"models", "sampling", "interop", "envs", "control", "remote", "data", "bench"}
DATA_TOOLS = {"data.make_obs_sample", "data.add_privileged_state", "data.eval_expert"}
POLICY_CORE = LIBRARY | {"models", "sampling", "interop"}
DOCS = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def unit(module: str) -> str:
    """``paradiffpolicy.control.agent`` → ``control``; ``paradiffpolicy.data.make_obs_sample`` → that tool;
    ``paradiffpolicy.eval`` → ``eval``; the package itself → ``""``."""
    parts = module.split(".")[1:]
    if len(parts) >= 2 and ".".join(parts[:2]) in DATA_TOOLS:
        return ".".join(parts[:2])
    return parts[0] if parts else ""


def imports() -> dict[str, set[str]]:
    """Per module of the package (dotted name), the modules of the package it imports (anywhere in it)."""
    out: dict[str, set[str]] = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        package = name if rel.name == "__init__" else name.rsplit(".", 1)[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = (".".join(package.split(".")[: len(package.split(".")) - node.level + 1]) if node.level else "")
                target = ".".join(p for p in (base, node.module or "") if p)
                if target == "paradiffpolicy":  # from paradiffpolicy import x: x may be a module
                    found |= {f"paradiffpolicy.{a.name}" for a in node.names}
                elif target.startswith("paradiffpolicy"):
                    found.add(target)
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("paradiffpolicy")}
        out[name] = found
    return out


def test_package_top_level_is_the_library_the_commands_and_the_folders():
    names = {p.stem for p in PKG.iterdir() if p.name != "__pycache__" and p.name != "__init__.py"}
    assert names == LIBRARY | COMMANDS | FOLDERS, f"unexpected: {sorted(names - LIBRARY - COMMANDS - FOLDERS)}, " \
                                                  f"missing: {sorted(LIBRARY | COMMANDS | FOLDERS - names)}"
    for folder in FOLDERS:
        assert (PKG / folder / "__init__.py").exists(), folder


def test_import_rules_of_docs_architecture():
    graph = imports()
    assert len(graph) > 50  # the walk found the package
    broken = []
    for module, targets in graph.items():
        src = unit(module)
        for target in targets:
            dst = unit(target)
            if dst in ("", src) and src != "":
                continue
            if dst == "bench" and src != "bench":
                broken.append(f"1: {module} imports {target} (nothing outside bench/ imports it)")
            if (dst in COMMANDS or dst in DATA_TOOLS) and src not in ("bench", *DATA_TOOLS) and src != dst:
                broken.append(f"1: {module} imports the command {target}")
            if src in POLICY_CORE and dst in ("envs", "control", "remote", "data"):
                broken.append(f"2: {module} (policy core) imports {target}")
            if src == "envs" and dst != "envs":
                broken.append(f"3: {module} imports {target} (envs/ imports only itself)")
            if src == "remote" and dst == "control":
                broken.append(f"4: {module} imports {target}")
    assert not broken, "\n".join(sorted(broken))


def test_importing_the_package_loads_no_simulator_or_server_stack():
    heavy = ["robosuite", "mujoco", "gymnasium", "grpc", "hydra", "zarr", "ray", "openvino", "onnxruntime"]
    code = ("import sys, paradiffpolicy; from paradiffpolicy import load_policy, PolicyRunner; "
            f"print([m for m in {heavy!r} if m in sys.modules])")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "[]", run.stdout


def documented_commands() -> list[tuple[str, list[str]]]:
    """Every ``python -m paradiffpolicy.<module> ...`` / ``python <file>.py ...`` the user docs print:
    (where, argv after ``python``), comments and environment assignments dropped."""
    out = []
    for doc in DOCS:
        for line in doc.read_text().splitlines():
            for m in re.finditer(r"python (-m paradiffpolicy[\w.]*|(?:examples|scripts)/[\w/]+\.py)([^`#\n]*)", line):
                if m.group(1).endswith("."):  # a pattern such as paradiffpolicy.bench.<name>
                    continue
                try:
                    args = shlex.split(m.group(2))
                except ValueError:
                    args = m.group(2).split()
                out.append((f"{doc.relative_to(ROOT)}: {m.group(0).strip()}", [*m.group(1).split(), *args]))
    return out


def test_every_documented_command_names_a_runnable_module():
    commands = documented_commands()
    assert len(commands) > 20
    for where, argv in commands:
        if argv[0] == "-m":
            spec = importlib.util.find_spec(argv[1])
            assert spec is not None and spec.origin, f"{where}: no module {argv[1]}"
            assert '__name__ == "__main__"' in Path(spec.origin).read_text(), f"{where}: {argv[1]} is not a command"
        else:
            assert (ROOT / argv[0]).exists(), f"{where}: no file {argv[0]}"


HYDRA_COMMANDS = {"eval": "eval", "train": "train", "tune": "tune", "collect": "collect", "serve": "serve"}


@pytest.mark.parametrize("command", sorted(HYDRA_COMMANDS))
def test_documented_hydra_overrides_compose(command):
    """Every documented override of a Hydra command names a key or preset that exists (the config
    composes), except placeholders (``<run>``, ``...``) and sweeps (``-m``)."""
    from hydra import compose, initialize_config_dir

    importlib.import_module(f"paradiffpolicy.{command}")  # registers its schema
    checked = 0
    for where, argv in documented_commands():
        if argv[:2] != ["-m", f"paradiffpolicy.{command}"] or "-m" in argv[2:]:
            continue
        overrides = [a for a in argv[2:] if "=" in a and "<" not in a and "..." not in a]
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            try:
                compose(HYDRA_COMMANDS[command], overrides=overrides)
            except Exception as e:  # noqa: BLE001 - the message says which override
                pytest.fail(f"{where}: {e}")
        checked += 1
    assert checked or command in ("collect",), f"no documented {command} command was checked"


def test_documented_overrides_of_argv_commands_name_their_config_keys():
    """The benchmark and data commands parse ``key=value`` into a dataclass (``from_argv``): every
    documented key is one of its fields."""
    import dataclasses

    checked = 0
    for where, argv in documented_commands():
        if argv[0] != "-m" or argv[1] in {f"paradiffpolicy.{c}" for c in (*HYDRA_COMMANDS, "convert")}:
            continue
        module = importlib.import_module(argv[1])
        calls = [n for n in ast.walk(ast.parse(Path(module.__file__).read_text())) if isinstance(n, ast.Call)
                 and getattr(n.func, "id", None) in ("from_argv", "script_arguments") and n.args and isinstance(n.args[0], ast.Name)]
        if not calls:
            continue
        fields = {f.name for f in dataclasses.fields(getattr(module, calls[0].args[0].id))}
        for arg in argv[2:]:
            key = arg.split("=", 1)[0].split(".")[0]
            if "=" in arg and calls[0].func.id == "from_argv":
                assert key in fields, f"{where}: {key!r} is not a key of {argv[1]} ({sorted(fields)})"
                checked += 1
    assert checked >= 2
