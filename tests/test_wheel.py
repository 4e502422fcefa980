"""Packaging: the wheel and the sdist hold the two packages and ``_C`` only, the wheel pins the torch it
was compiled against, and an installed wheel works from a fresh virtual environment.

The builds run once per session (module-scoped fixtures), from a copy of the repository's tracked files
in a temporary folder, so the working tree gets no build/, dist/ or egg-info and untracked files cannot
leak into the wheel. One compiled build (~1 min on 2 cores, MAX_JOBS=2 unless set): the sdist made by
``python -m build --sdist --no-isolation``, turned into a wheel by ``pip wheel --no-build-isolation
--no-deps`` (without the ``build`` package, ``pip wheel`` builds the copied tree instead and the sdist
tests skip). A second, pure-Python build (``LIMUON_SKIP_EXT=1``) takes seconds.

The fresh environments are plain venvs (they do not see this environment's site-packages, where the
editable install lives). They get torch (and triton, when installed here) through a ``.pth`` file naming
a folder of symlinks to exactly those distributions and their dependencies, not through ``pip install
torch``: that works only where a torch file is on disk (these CPU machines have one; the GPU machines
have a system torch and no network), copies 700+ MB per run, and might not be the torch the wheel was
built against. pip sees the linked ``torch-*.dist-info``, so installing the wheel still checks its pin.
Every pip call runs offline (``--no-index``, no pip config).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from email.parser import HeaderParser
from importlib import metadata
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import limuon_kernels

REPO = Path(__file__).resolve().parents[1]
VERSION = limuon_kernels.__version__
DIST_INFO = f"limuon_kernels-{VERSION}.dist-info/"
TORCH_PUBLIC = str(torch.__version__).split("+", 1)[0]
BIN = "Scripts" if os.name == "nt" else "bin"
EXT_SUFFIX = re.compile(r"^limuon_kernels/_C\.[^/]*(\.so|\.pyd)$")
# Written next to _C by setup.py's build_ext: the torch _C is compiled against, read before importing _C.
VERSION_FILE = "limuon_kernels/_C_torch_version.txt"


def _env(**overrides: str | None) -> dict[str, str]:
    """This process's environment without what would make a build or a venv see something else.

    No PYTHONPATH/PYTHONHOME/VIRTUAL_ENV (they would put this checkout or environment first), no user
    site, no LIMUON_* build or backend settings, no pip configuration (so nothing is downloaded).
    TRITON_INTERPRET stays as the conftest set it.
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONWARNINGS")
        and not k.startswith(("LIMUON_", "PIP_"))
    }
    env.update(PYTHONNOUSERSITE="1", PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.setdefault("MAX_JOBS", "2")
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def _run(cmd: list, cwd: Path, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env or _env(), capture_output=True, text=True, check=False
    )
    if check and proc.returncode != 0:
        command = " ".join(map(str, cmd))
        pytest.fail(f"{command} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def _copy_tracked_tree(dest: Path) -> None:
    """The files git tracks (as they are in the working tree), or, without git, the tree minus build output."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.split("\0")
    except (OSError, subprocess.CalledProcessError):
        ignore = shutil.ignore_patterns(
            ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*.so", "*.pyd", ".*_cache"
        )
        shutil.copytree(REPO, dest, ignore=ignore)
        return
    for name in filter(None, listed):
        src = REPO / name
        if src.is_file():  # a tracked file deleted in the working tree is not copied
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def _wheel_names(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as zf:
        return sorted(zf.namelist())


def _wheel_meta(wheel: Path, name: str):
    with zipfile.ZipFile(wheel) as zf:
        return HeaderParser().parsestr(zf.read(DIST_INFO + name).decode())


def _torch_requirements(meta) -> list[str]:
    return [r for r in meta.get_all("Requires-Dist", []) if Requirement(r).name == "torch"]


# ---------------------------------------------------------------------------------------------- builds


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    # Named so that nothing in it shadows a module: `python -m build` runs with this as its cwd.
    return tmp_path_factory.mktemp("wheeltest")


@pytest.fixture(scope="module")
def source(workdir) -> Path:
    src = workdir / "src"
    _copy_tracked_tree(src)
    return src


@pytest.fixture(scope="module")
def has_build(workdir) -> bool:
    """The ``build`` frontend is installed (checked outside the checkout, whose build/ would shadow it)."""
    return _run([sys.executable, "-m", "build", "--version"], workdir, check=False).returncode == 0


@pytest.fixture(scope="module")
def sdist(workdir, source, has_build) -> Path:
    if not has_build:
        pytest.skip("the `build` package is not installed (scripts/setup_env.sh installs it)")
    out = workdir / "sdist"
    _run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", out, source], workdir)
    (archive,) = out.glob("*.tar.gz")
    return archive


@pytest.fixture(scope="module")
def wheel(request, workdir, source, has_build) -> Path:
    """The compiled wheel: built from the sdist when `build` is there, else from the copied tree."""
    target = request.getfixturevalue("sdist") if has_build else source
    out = workdir / "wheelhouse"
    _run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--no-index", "-w", out, target],
         workdir)
    (whl,) = out.glob("*.whl")
    return whl


@pytest.fixture(scope="module")
def pure_wheel(workdir, source, has_build) -> Path:
    """``LIMUON_SKIP_EXT=1``, from its own copy of the tree, with the other documented command when it can."""
    src = workdir / "src_pure"
    shutil.copytree(source, src)
    out = workdir / "wheelhouse_pure"
    env = _env(LIMUON_SKIP_EXT="1")
    if has_build:
        _run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", out, src], workdir, env)
    else:
        _run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--no-index", "-w", out, src],
             workdir, env)
    (whl,) = out.glob("*.whl")
    return whl


# ------------------------------------------------------------------------------------ fresh environments


def _closure(names: list[str]) -> list[metadata.Distribution]:
    """The installed distributions ``names`` need, following their unconditional requirements."""
    found: dict[str, metadata.Distribution] = {}
    todo = list(names)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in found:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # a requirement for another platform, or satisfied some other way
        found[name] = dist
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return list(found.values())


def _top_level_entries(dist: metadata.Distribution) -> set[str]:
    """What ``dist`` put at the top of its site-packages folder (packages, modules, its .dist-info)."""
    entries = set()
    for file in dist.files or []:
        first = file.parts[0]
        if first != ".." and not first.endswith(".pth") and first != "__pycache__":
            entries.add(first)
    if not entries:  # no RECORD (a distribution's system package): top_level.txt and the metadata folder
        entries.update((dist.read_text("top_level.txt") or "").split())
        path = getattr(dist, "_path", None)
        if path is not None:
            entries.add(Path(path).name)
    return entries


@pytest.fixture(scope="module")
def torch_overlay(workdir) -> Path:
    """A folder of symlinks to torch (and triton) and their dependencies, and nothing else."""
    overlay = workdir / "torch_overlay"
    overlay.mkdir()
    wanted = ["torch"]
    try:
        metadata.distribution("triton")
        wanted.append("triton")
    except metadata.PackageNotFoundError:
        pass
    for dist in _closure(wanted):
        assert canonicalize_name(dist.metadata["Name"]) != "limuon-kernels"
        site = Path(dist.locate_file(""))
        for entry in _top_level_entries(dist):
            if (site / entry).exists() and not (overlay / entry).exists():
                (overlay / entry).symlink_to(site / entry, target_is_directory=(site / entry).is_dir())
    return overlay


def _make_venv(path: Path, overlay: Path | None) -> Path:
    """A plain venv (no system site-packages) whose sys.path ends with ``overlay``; returns its python.

    Without pip of its own (this environment's pip installs into it with ``--python``): the setuptools
    that ensurepip puts in a Python 3.11 venv is older than torch's requirement, and would shadow the
    linked one.
    """
    _run([sys.executable, "-m", "venv", "--without-pip", path], path.parent)
    python = path / BIN / "python"
    purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], path.parent)
    if overlay is not None:
        (Path(purelib.stdout.strip()) / "_limuon_test_torch.pth").write_text(f"{overlay}\n")
    return python


def _pip(python: Path, *args) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "pip", "--python", python, *args], python.parent, check=False)


def _pip_install(python: Path, *args) -> subprocess.CompletedProcess:
    return _pip(python, "install", "--no-index", *args)


@pytest.fixture(scope="module")
def installed(workdir, wheel, torch_overlay) -> Path:
    python = _make_venv(workdir / "venv", torch_overlay)
    proc = _pip_install(python, wheel)  # with dependencies: the linked torch must satisfy the pin
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return python


@pytest.fixture(scope="module")
def installed_pure(workdir, pure_wheel, torch_overlay) -> Path:
    python = _make_venv(workdir / "venv_pure", torch_overlay)
    proc = _pip_install(python, pure_wheel)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return python


# ------------------------------------------------------------------------------------------------ tests


def _expected_modules(source: Path) -> set[str]:
    """The wheel paths of the packages' tracked modules."""
    names = {f"limuon_kernels/{p.relative_to(source / 'limuon_kernels').as_posix()}"
             for p in (source / "limuon_kernels").rglob("*.py")}
    names |= {f"limuon/{p.relative_to(source / 'python' / 'limuon').as_posix()}"
              for p in (source / "python" / "limuon").rglob("*.py")}
    return names


@pytest.mark.slow
def test_wheel_is_a_platform_wheel_with_the_packages_and_C_only(wheel, source):
    names = _wheel_names(wheel)
    tags = _wheel_meta(wheel, "WHEEL")
    assert tags["Root-Is-Purelib"] == "false"
    (tag,) = tags.get_all("Tag")
    py, abi, plat = tag.split("-")
    assert py.startswith("cp") and abi != "none" and plat != "any", tag
    assert wheel.name.endswith(f"-{tag}.whl")

    extension = [n for n in names if EXT_SUFFIX.match(n)]
    assert len(extension) == 1, names
    with zipfile.ZipFile(wheel) as zf:
        assert zf.read(VERSION_FILE).decode().strip() == str(torch.__version__)
    dist_info = {n for n in names if n.startswith(DIST_INFO)}
    assert {DIST_INFO + f for f in ("METADATA", "WHEEL", "RECORD")} <= dist_info
    modules = set(names) - dist_info - set(extension) - {VERSION_FILE}
    assert modules == _expected_modules(source)  # every module, limuon_kernels/triton/ included, and nothing else
    assert "limuon_kernels/triton/__init__.py" in modules
    for name in names:
        assert not re.search(r"(^|/)(tests?|bench|build|scripts|csrc|__pycache__)/|\.pyc$|\.egg-info", name), name


@pytest.mark.slow
def test_wheel_pins_the_torch_it_was_built_against(wheel):
    pins = _torch_requirements(_wheel_meta(wheel, "METADATA"))
    assert pins == [f"torch=={TORCH_PUBLIC}"]
    # PEP 440: the public pin takes this torch's local builds (+cpu, +cu130: same C++ ABI), no other release.
    spec = Requirement(pins[0]).specifier
    assert spec.contains(torch.__version__, prereleases=True)
    assert spec.contains(f"{TORCH_PUBLIC}+cu130", prereleases=True)
    assert not spec.contains(f"{TORCH_PUBLIC}.post1", prereleases=True)


@pytest.mark.slow
def test_sdist_holds_what_the_build_needs_and_builds_the_same_wheel(sdist, source, wheel, pure_wheel):
    with tarfile.open(sdist) as tf:
        root = f"limuon_kernels-{VERSION}/"
        names = {n[len(root):] for n in tf.getnames() if n.startswith(root)}
        pkg_info = HeaderParser().parsestr(tf.extractfile(root + "PKG-INFO").read().decode())
    csrc = {p.relative_to(source).as_posix() for p in (source / "csrc").rglob("*") if p.is_file()}
    assert csrc and csrc <= names
    assert {"setup.py", "pyproject.toml", "README.md", "MANIFEST.in", "PKG-INFO"} <= names
    assert {"docs/ALGORITHM.md", "docs/DESIGN.md"} <= names  # the pages the code's comments cite
    assert VERSION_FILE not in names  # written when a wheel is built, for the torch it is built against
    assert {f"python/{n}" if n.startswith("limuon/") else n for n in _expected_modules(source)} <= names
    for name in names:
        assert not re.match(r"(tests|bench|scripts|build|dist)(/|$)|.*(__pycache__|\.so$|\.pyc$)", name), name
    # The sdist is not tied to a torch; the wheel built from it is (fixture `wheel`, checked above).
    assert _torch_requirements(pkg_info) == ["torch>=2.9"]
    assert "requires-dist" in [f.lower() for f in pkg_info.get_all("Dynamic", [])]
    # The wheel built from the sdist has the pure-Python wheel's files (built from the tree) plus _C and its
    # version file.
    compiled = {n for n in _wheel_names(wheel) if not EXT_SUFFIX.match(n) and n != VERSION_FILE}
    assert compiled == set(_wheel_names(pure_wheel))


@pytest.mark.slow
def test_pure_python_wheel_is_universal_and_loosely_pinned(pure_wheel):
    (tag,) = _wheel_meta(pure_wheel, "WHEEL").get_all("Tag")
    assert tag == "py3-none-any"
    assert not any(EXT_SUFFIX.match(n) or n == VERSION_FILE for n in _wheel_names(pure_wheel))
    assert _torch_requirements(_wheel_meta(pure_wheel, "METADATA")) == ["torch>=2.9"]


SMOKE = textwrap.dedent(
    """
    import os, sys
    import torch
    import limuon, limuon_kernels as lk

    venv, repo = (os.path.realpath(p) + os.sep for p in sys.argv[1:3])
    # torch is linked in from the dev environment, which may itself live in the repo (.venv): only
    # the packages under test must come from the new venv and not from the source tree.
    for mod in (lk, limuon):
        assert not os.path.realpath(mod.__file__).startswith(repo), (mod.__name__, mod.__file__)
        assert os.path.realpath(mod.__file__).startswith(venv), (mod.__name__, mod.__file__)
    assert lk.HAS_C_EXT == (sys.argv[3] == "1"), lk._extension.LOAD_ERROR
    assert ("cpp" in lk.available_backends()) == lk.HAS_C_EXT

    G = torch.randn(2, 24, 16, generator=torch.Generator().manual_seed(0))
    outs = {}
    for name in lk.available_backends():
        if name != "triton":  # the torch reference, and the C++ kernels when _C loaded
            lk.set_backend(name)
            outs[name] = lk.newton_schulz(G)
    lk.set_backend("auto")
    for out in outs.values():
        torch.testing.assert_close(out, outs["torch"], atol=1e-4, rtol=1e-4)

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    x = torch.randn(128, 8)
    y = torch.sin(x[:, :1]) + 0.5 * x[:, 1:2]
    for kwargs in ({}, {"rank": 4}):
        opt = limuon.LiMuon(model.parameters(), lr=0.02, adamw_lr=0.02, variance_reduction="exact", **kwargs)

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss

        losses = [float(opt.step(closure).detach()) for _ in range(8)]
        assert losses[-1] < losses[0], losses
    print("smoke ok", lk.__version__, lk.available_backends(), [round(v, 4) for v in losses])
    """
)


def _smoke(python: Path, workdir: Path, expect_ext: bool) -> subprocess.CompletedProcess:
    run_dir = workdir / "run"  # outside the source tree: nothing there shadows the installed packages
    run_dir.mkdir(exist_ok=True)
    (run_dir / "smoke.py").write_text(SMOKE)
    return _run([python, "smoke.py", python.parents[1], REPO, "1" if expect_ext else "0"], run_dir)


def _info(python: Path, workdir: Path) -> dict[str, str]:
    proc = _run([python, "-m", "limuon_kernels.info"], workdir / "run")
    report = dict(line.split(" : ", 1) for line in proc.stdout.splitlines() if " : " in line)
    return {k.strip(): v.strip() for k, v in report.items()}


@pytest.mark.slow
def test_installed_wheel_runs_from_a_fresh_venv(installed, workdir):
    proc = _smoke(installed, workdir, expect_ext=True)
    assert "smoke ok" in proc.stdout
    assert "RuntimeWarning" not in proc.stderr, proc.stderr
    report = _info(installed, workdir)
    assert report["limuon-kernels"] == VERSION
    assert report["C++ extension _C"] == "loaded"
    assert report["torch (extension built against)"] == report["torch (running)"] == str(torch.__version__)
    assert "cpp" in report["available backends"]
    assert {"triton", "triton compiles for this GPU", "device"} <= report.keys()


@pytest.mark.slow
def test_pure_python_install_falls_back_with_one_warning(installed_pure, workdir):
    proc = _smoke(installed_pure, workdir, expect_ext=False)
    assert "smoke ok" in proc.stdout
    # A plain import, default warning filters: the one warning says what failed and how to rebuild.
    proc = _run([installed_pure, "-c", "import limuon_kernels, limuon, limuon_kernels.info"], workdir / "run")
    assert proc.stderr.count("RuntimeWarning") == 1, proc.stderr
    assert "limuon_kernels._C could not be imported" in proc.stderr
    assert "pip install --no-build-isolation" in proc.stderr
    report = _info(installed_pure, workdir)
    assert report["C++ extension _C"].startswith("not loaded: limuon_kernels._C could not be imported")
    assert "cpp" not in report["available backends"]


@pytest.mark.slow
def test_wheel_refuses_another_torch(workdir, wheel):
    """Next to another torch, pip refuses the wheel, naming the pin, rather than a crash at import."""
    python = _make_venv(workdir / "venv_other_torch", overlay=None)
    other = "2.9.0" if TORCH_PUBLIC != "2.9.0" else "2.10.0"
    purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], workdir).stdout
    fake = Path(purelib.strip()) / f"torch-{other}.dist-info"  # metadata only: pip's view of an installed torch
    fake.mkdir()
    (fake / "METADATA").write_text(f"Metadata-Version: 2.1\nName: torch\nVersion: {other}\n")
    (fake / "INSTALLER").write_text("test\n")
    (fake / "RECORD").write_text("")
    # The README's recipe: name the installed torch in the same command, and pip reports the conflict.
    proc = _pip_install(python, wheel, f"torch=={other}")
    assert proc.returncode != 0
    assert "conflicting dependencies" in proc.stderr and f"depends on torch=={TORCH_PUBLIC}" in proc.stdout, proc
    # Without it, offline: no torch==<pin> to be had (online, pip would replace torch with the pinned one).
    proc = _pip_install(python, wheel)
    assert proc.returncode != 0
    assert f"No matching distribution found for torch=={TORCH_PUBLIC}" in proc.stderr, proc.stderr
    # Forced in anyway (--no-deps), `pip check` names the conflict.
    assert _pip_install(python, "--no-deps", wheel).returncode == 0
    proc = _pip(python, "check")
    assert proc.returncode != 0
    assert f"torch=={TORCH_PUBLIC}" in proc.stdout and other in proc.stdout, proc.stdout


def test_extension_built_for_another_torch_falls_back_with_one_warning(tmp_path):
    """``_C`` reporting another torch (simulated in a subprocess): reference kernels, one warning."""
    script = textwrap.dedent(
        """
        import sys, types, warnings
        fake = types.ModuleType("limuon_kernels._C")
        fake.TORCH_VERSION = "2.0.0+cpu"
        sys.modules["limuon_kernels._C"] = fake  # what importing the real module would find
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import torch
            import limuon, limuon_kernels as lk
            from limuon_kernels import _extension, info
            _extension.load()
            report = info.collect()
        ours = [w for w in caught if "limuon" in str(w.message)]
        assert len(ours) == 1, [str(w.message) for w in ours]
        assert ours[0].category is RuntimeWarning
        message = str(ours[0].message)
        assert "built against torch 2.0.0+cpu" in message and torch.__version__ in message, message
        assert "pip install --no-build-isolation" in message, message
        assert not lk.HAS_C_EXT and "cpp" not in lk.available_backends()
        assert report["torch (extension built against)"] == "2.0.0+cpu"
        assert report["C++ extension _C"].startswith("not loaded: limuon_kernels._C was built against")
        assert lk.newton_schulz(torch.randn(8, 6)).shape == (8, 6)
        print("fallback ok")
        """
    )
    proc = _run([sys.executable, "-c", script], tmp_path)
    assert "fallback ok" in proc.stdout


def test_build_cuda_flag_is_refused(tmp_path):
    """No CUDA C++ code exists: LIMUON_BUILD_CUDA=1 fails the build, saying why, instead of being ignored."""
    shutil.copy2(REPO / "setup.py", tmp_path / "setup.py")
    shutil.copy2(REPO / "README.md", tmp_path / "README.md")
    proc = _run([sys.executable, "setup.py", "--name"], tmp_path, _env(LIMUON_BUILD_CUDA="1"), check=False)
    assert proc.returncode != 0
    assert "LIMUON_BUILD_CUDA" in proc.stderr and "Triton kernels, compiled at run time" in proc.stderr, proc.stderr
