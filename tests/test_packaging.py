"""Packaging: the README's commands are what CI runs, the sdist is complete,
the metadata is whole, and the compiled extension knows the torch it was
built against (a missing or mismatched one warns once, with the fix)."""

import importlib
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tarfile

import pytest
import torch

import pyclloss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
in_source_tree = pytest.mark.skipif(not os.path.exists(os.path.join(ROOT, "pyproject.toml")),
                                    reason="needs the source tree")


def _read(relpath: str) -> str:
    with open(os.path.join(ROOT, relpath), encoding="utf-8") as f:
        return f.read()


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads(_read("pyproject.toml"))


def _python(code: str) -> str:
    """What a fresh interpreter that finds this pyclloss prints (stdout and stderr)."""
    package_parent = os.path.dirname(os.path.dirname(pyclloss.__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([package_parent,
                                                       os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


# ------------------------------------------------------------- the commands


@in_source_tree
def test_the_readme_commands_are_what_ci_runs():
    readme = _read("README.md")
    section = readme[readme.index("## The two commands"):]
    section = section[:section.index("\n## ", 1)]
    commands = re.findall(r"```bash\n(.*?)\n```", section, re.S)
    assert len(commands) == 2, commands
    ci_lines = _read(".ci/run").splitlines()
    for command in commands:
        assert command in ci_lines, f"CI does not run the README's command: {command}"
    main_job, tests = commands
    assert "torch==2.13.0" in main_job and "--no-build-isolation" in main_job
    assert main_job.endswith("pyclloss train") and '".[train]"' in main_job
    assert '".[test]"' in tests and tests.endswith("python -m pytest tests -q")


@in_source_tree
def test_extras_match_the_code_and_never_replace_torch():
    project = _pyproject()["project"]
    extras = project["optional-dependencies"]
    names = {extra: {re.split(r"[<>=!\[ ;]", req, maxsplit=1)[0].lower() for req in reqs}
             for extra, reqs in extras.items()}
    assert {"scikit-learn", "tqdm"} <= names["train"]
    assert "matplotlib" in names["bench"]
    assert {"pytest", "pytest-timeout", "triton", "pytorch-metric-learning",
            "diffsort"} <= names["test"]
    assert "pyclloss[train,bench]" in extras["test"]
    assert "triton==3.9.0" in extras["test"]
    # torch itself, or packages that pin their own torch (torchvision and what needs it)
    replacing = {"torch", "torchvision", "lightly", "open-clip-torch", "timm"}
    for extra, required in names.items():
        assert not required & replacing, f"[{extra}] may replace torch: {required & replacing}"


# ------------------------------------------------------- metadata and sdist


@in_source_tree
def test_metadata_license_classifiers_and_one_version():
    pyproject = _pyproject()
    project = pyproject["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    license_text = _read("LICENSE")
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert "END OF TERMS AND CONDITIONS" in license_text
    assert any(c.startswith("Programming Language :: Python :: 3") for c in
               project["classifiers"])
    assert "version" not in project and project["dynamic"] == ["version"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "pyclloss.__version__"}
    assert os.path.exists(os.path.join(os.path.dirname(pyclloss.__file__), "py.typed"))
    try:
        installed = importlib.metadata.version("pyclloss")
    except importlib.metadata.PackageNotFoundError:
        installed = pyclloss.__version__  # run from a source tree that is not installed
    assert installed == pyclloss.__version__


@in_source_tree
def test_sdist_has_everything_a_build_and_the_tests_need(tmp_path):
    out = tmp_path / "dist"
    subprocess.run([sys.executable, "-c", "import sys; from setuptools import build_meta; "
                    "build_meta.build_sdist(sys.argv[1])", str(out)], cwd=ROOT, check=True,
                   capture_output=True, timeout=300)
    (sdist,) = out.iterdir()
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    required = ["LICENSE", "README.md", "CMakeLists.txt", "setup.py", "pyproject.toml",
                "MANIFEST.in", "pyclloss/py.typed", "csrc/bindings.cpp", "tests/conftest.py",
                ".ci/run"]
    for folder, suffixes in (("csrc/include/pyclloss", (".h",)), ("csrc/cpu", (".cpp",)),
                             ("csrc/cuda", (".cu", ".cpp")), ("csrc/tests", (".cpp",)),
                             ("docs", (".md",)), ("tests", (".py",)),
                             ("triton_kernels", (".py", ".json"))):
        required += [f"{folder}/{f}" for f in os.listdir(os.path.join(ROOT, folder))
                     if f.endswith(suffixes)]
    missing = sorted(set(required) - names)
    assert not missing, f"the sdist lacks {missing}"
    assert not [n for n in names if n.endswith((".so", ".o", ".pyc"))]


def test_extension_is_a_stripped_release_build():
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf not found")
    path = importlib.import_module("pyclloss._C").__file__
    sections = subprocess.run([readelf, "-S", "-W", path], capture_output=True, text=True,
                              check=True).stdout
    assert ".debug_info" not in sections and ".symtab" not in sections, sections


# ------------------------------------------- the torch the extension was built against


def test_extension_records_the_torch_it_was_built_against():
    assert importlib.import_module("pyclloss._C").built_with_torch() == torch.__version__
    assert pyclloss.backends()["cpp"].available


# a fresh interpreter that imports pyclloss with one change, catches every
# warning, runs a loss twice on "auto" and prints `pyclloss info`
_IMPORT_AND_RUN = """
import sys, warnings
import torch
{change}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import pyclloss
    from pyclloss.backends import resolve
    from pyclloss.tools.cli import main
    x = torch.randn(6, 4)
    pyclloss.nt_xent(x, x)
    pyclloss.supcon(x, torch.arange(6) % 2)
    print("auto on cpu:", resolve("auto", torch.device("cpu")))
    main(["info"])
ours = [w for w in caught if issubclass(w.category, pyclloss.CompiledKernelsWarning)]
print("warnings:", len(ours))
for w in ours:
    print("warning:", w.message)
"""


def test_extension_built_against_another_torch_warns_once_and_info_says_so():
    built = importlib.import_module("pyclloss._C").built_with_torch()
    out = _python(_IMPORT_AND_RUN.format(change="torch.__version__ = '0.0.1'"))
    assert "warnings: 1" in out
    why = f"pyclloss._C was built against torch {built}, this is torch 0.0.1"
    warning = next(line for line in out.splitlines() if line.startswith("warning:"))
    assert "backend='auto' runs the plain-PyTorch reference backend on cpu tensors" in warning
    assert why in warning and "pip install --no-build-isolation" in warning
    assert f"_C       {why}" in out
    assert "auto on cpu: reference" in out


def test_missing_extension_warns_once_with_the_fix():
    out = _python(_IMPORT_AND_RUN.format(change="sys.modules['pyclloss._C'] = None"))
    assert "warnings: 1" in out
    assert "pyclloss._C is not built here; build it against the installed torch: pip install" \
        in out
    assert "auto on cpu: reference" in out


def test_a_working_extension_is_silent():
    out = _python(_IMPORT_AND_RUN.format(change=""))
    assert "warnings: 0" in out and "auto on cpu: cpp" in out
    assert f"_C       built against torch {torch.__version__} (this torch)" in out


# ------------------------------------------------------------------- the docs


def _project_texts():
    """(path, text) of the README, the docs and every source and test file."""
    for folder in ("docs", "pyclloss", "csrc", "triton_kernels", "tests", "examples", "bench"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            for name in files:
                if name.endswith((".md", ".py", ".cpp", ".cu", ".h", ".sh")) \
                        and "results" not in dirpath:
                    path = os.path.join(dirpath, name)
                    with open(path, encoding="utf-8") as f:
                        yield os.path.relpath(path, ROOT), f.read()
    yield "README.md", _read("README.md")


@in_source_tree
def test_docs_cite_nothing_outside_the_repository():
    outside = re.compile(r"LOSSES\.md|DESIGN\.md|\.\./shared|shared/|/work/")
    this_file = os.path.relpath(__file__, ROOT)
    cited = [(path, m.group()) for path, text in _project_texts() if path != this_file
             for m in outside.finditer(text)]
    assert not cited, cited
    docs = {f"docs/{name}" for name in os.listdir(os.path.join(ROOT, "docs"))}
    named = {m for _, text in _project_texts() for m in re.findall(r"docs/[\w.]+\.md", text)}
    assert named <= docs, f"cited but missing: {sorted(named - docs)}"


@in_source_tree
def test_docs_give_the_formula_of_every_loss():
    text = _read("docs/losses.md")
    losses = [name for name in pyclloss.__all__ if name[0].islower() and name != "backends"]
    missing = [name for name in losses if f"`{name}(" not in text and f"{name}`" not in text
               and f"`{name}," not in text]
    assert not missing, f"docs/losses.md does not cover {missing}"
