"""The house rules: every op family declares its kernels once (the registry,
which ``pyclloss info`` lists), and Triton kernel modules are leaves."""

import ast
import importlib
import os

import pytest
import torch

import pyclloss
from pyclloss.backends import BACKENDS, KernelFamily, compiled, families, module, resolve
from pyclloss.tools.cli import main
from pyclloss.reference import rnc as rnc_reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _imports(path: str):
    """(level, dotted name) of every module a Python file imports, at any depth
    (``from . import x`` gives (1, "x"))."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((0, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is None:
            yield from ((node.level, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            yield node.level, node.module


def _ops_modules():
    folder = os.path.join(ROOT, "pyclloss", "ops")
    names = sorted(name[:-3] for name in os.listdir(folder) if name.endswith(".py"))
    return [importlib.import_module(f"pyclloss.ops.{name}") for name in names if name != "__init__"]


def test_every_ops_module_declares_its_family_once():
    declared = families()
    assert {module.KERNELS.name for module in _ops_modules()} == set(declared)
    assert len(declared) == len(_ops_modules()) >= 6
    for module in _ops_modules():
        assert declared[module.KERNELS.name] is module.KERNELS
        assert set(module.KERNELS.backends) <= set(BACKENDS)


def test_info_lists_family_by_backend(capsys):
    main(["info"])
    lines = capsys.readouterr().out.splitlines()
    start = lines.index("kernels (yes: here, no: not available here, -: none):")
    rows = {line.split()[0]: line.split()[1:] for line in lines[start + 2:]}
    available = {name: a.available for name, a in pyclloss.backends().items()}
    assert set(rows) == set(families())
    for name, family in families().items():
        cells = ["-" if b not in family.backends else "yes" if available[b] else "no"
                 for b in BACKENDS]
        assert rows[name][:len(BACKENDS)] == cells, name
        assert rows[name][len(BACKENDS)] == resolve("auto", torch.device("cpu"), family.backends)


def test_a_family_names_known_backends_and_a_reference():
    with pytest.raises(ValueError, match="family 'x'"):
        KernelFamily("x", cpp=compiled("rnc_fwd"))
    with pytest.raises(ValueError, match="family 'y'"):
        KernelFamily("y", gpu=compiled("rnc_fwd"), reference=module(rnc_reference))
    assert not {"x", "y"} & set(families())


def test_triton_kernels_are_leaves():
    # each kernel module imports triton, torch, the standard library and the
    # shared helpers; never the reference nor another family's module
    folder = os.path.join(ROOT, "triton_kernels")
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py"):
            for level, imported in _imports(os.path.join(folder, name)):
                if level:
                    assert (level, imported) in ((1, "common"), (1, "tuning")), (name, imported)
                else:
                    assert imported.split(".")[0] != "pyclloss", (name, imported)


def test_the_library_never_imports_a_tool():
    # python -m pyclloss (__main__.py) is the console script: a tool
    package = os.path.join(ROOT, "pyclloss")
    for folder, _, files in os.walk(package):
        parts = ["pyclloss"] + [p for p in os.path.relpath(folder, package).split(os.sep)
                                if p != "."]
        if parts[1:2] == ["tools"]:
            continue
        for name in (n for n in files if n.endswith(".py") and n != "__main__.py"):
            for level, imported in _imports(os.path.join(folder, name)):
                base = parts[:len(parts) - level + 1] if level else []
                absolute = ".".join(base + [imported])
                assert not absolute.startswith("pyclloss.tools"), (folder, name, imported)
