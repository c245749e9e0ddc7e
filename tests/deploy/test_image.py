"""deploy/Dockerfile, .dockerignore and deploy/entrypoint.sh. No Docker engine here: what can
be checked without one is, with the real tools (apt-cache, pip, bcc, a mount namespace)."""
from __future__ import annotations

import fnmatch
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from flowtel.registry import all_factories
from tests.deploy.manifests import REPO, container, find, render

DOCKERFILE = REPO / "deploy" / "Dockerfile"
ENTRYPOINT = REPO / "deploy" / "entrypoint.sh"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    current = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        current += " " + stripped.removesuffix("\\").strip()
        if not stripped.endswith("\\"):
            word, _, rest = current.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            current = ""
    return out


def dockerignore_patterns() -> list[tuple[bool, str]]:
    out = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            negate = line.startswith("!")
            out.append((negate, line.lstrip("!").rstrip("/")))
    return out


def ignored(rel: str) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern matches a path or any parent."""
    parts = rel.split("/")
    result = False
    for negate, pattern in dockerignore_patterns():
        for i in range(1, len(parts) + 1):
            prefix = "/".join(parts[:i])
            if fnmatch.fnmatchcase(prefix, pattern) or (
                pattern.startswith("**/") and fnmatch.fnmatchcase(parts[i - 1], pattern[3:])
            ):
                result = not negate
                break
    return result


def context_files() -> list[str]:
    out = []
    for root, dirs, files in os.walk(REPO):
        rel_root = os.path.relpath(root, REPO)
        for d in list(dirs):
            rel = os.path.normpath(os.path.join(rel_root, d))
            # Directories re-included by a later "!" pattern must still be walked.
            if ignored(rel) and not any(neg and p.startswith(rel + "/") for neg, p in dockerignore_patterns()):
                dirs.remove(d)
        for f in files:
            rel = os.path.normpath(os.path.join(rel_root, f))
            if not ignored(rel):
                out.append(rel)
    return sorted(out)


# --- Dockerfile -------------------------------------------------------------------------------


def test_base_images_are_debian_bookworm() -> None:
    froms = [args for word, args in instructions() if word == "FROM"]
    assert froms and all(args.split()[0] == "debian:bookworm-slim" for args in froms)


def test_every_copy_source_exists_in_the_build_context() -> None:
    stages = {args.split()[-1] for word, args in instructions() if word == "FROM" and " AS " in args.upper()}
    checked = 0
    for word, args in instructions():
        if word == "COPY":
            tokens = shlex.split(args)
            flags = [t for t in tokens if t.startswith("--")]
            sources = [t for t in tokens if not t.startswith("--")][:-1]
            from_stage = next((f.split("=", 1)[1] for f in flags if f.startswith("--from=")), None)
            if from_stage is not None:
                assert from_stage in stages
                continue
            for src in sources:
                assert (REPO / src).exists(), f"COPY {src}: not in the repository"
                assert src == "." or not ignored(src), f"COPY {src}: excluded by .dockerignore"
                checked += 1
        if word == "RUN" and args.startswith("--mount=type=bind"):
            opts = dict(kv.split("=", 1) for kv in args.split()[0].removeprefix("--mount=").split(",") if "=" in kv)
            assert (REPO / opts.get("source", ".")).exists()
            assert opts["target"] in args.split(" ", 1)[1], "the bind mount is used by its RUN"
            checked += 1
    assert checked >= 2


def _apt_lists_present() -> bool:
    lists = Path("/var/lib/apt/lists")
    return lists.is_dir() and any("Packages" in p.name for p in lists.iterdir())


def test_every_apt_package_exists_in_bookworm() -> None:
    if shutil.which("apt-cache") is None:
        pytest.skip("apt-cache is not available (not a Debian machine)")
    if not _apt_lists_present():
        pytest.skip("apt package lists are empty: run `apt-get update` first")
    arch = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True).stdout.strip()
    packages: list[str] = []
    for word, args in instructions():
        if word == "RUN" and "apt-get install" in args:
            line = args.split("apt-get install", 1)[1].split("&&", 1)[0].replace("$(dpkg --print-architecture)", arch)
            packages += [w.strip('"') for w in line.split() if not w.startswith("-")]
    # nftables: the DNS proxy's redirect (`nft`), run from the same image.
    assert {"python3-bpfcc", f"linux-headers-{arch}", "python3-venv", "bpftool", "nftables"} <= set(packages)
    for pkg in packages:
        out = subprocess.run(["apt-cache", "policy", pkg], capture_output=True, text=True).stdout
        candidate = re.search(r"Candidate: (\S+)", out)
        assert candidate and candidate.group(1) != "(none)", f"{pkg}: no installation candidate\n{out}"


def test_flowtel_goes_into_a_system_site_packages_venv_of_the_system_python() -> None:
    text = " ".join(args for word, args in instructions() if word == "RUN")
    assert "/usr/bin/python3 -m venv --system-site-packages /opt/flowtel/venv" in text
    assert "/opt/flowtel/venv/bin/python -m pip install" in text
    assert "-e " not in text.split("pip install", 1)[1].split("&&")[0], "not an editable install"
    env = " ".join(args for word, args in instructions() if word == "ENV")
    assert "PATH=/opt/flowtel/venv/bin:$PATH" in env


def test_entrypoint_and_command_match_the_daemonset() -> None:
    ins = dict(instructions())
    assert ins["ENTRYPOINT"] == '["/usr/local/bin/flowtel-entrypoint"]'
    copy = next(args for word, args in instructions() if word == "COPY" and "entrypoint" in args)
    assert copy == "deploy/entrypoint.sh /usr/local/bin/flowtel-entrypoint"
    assert os.access(ENTRYPOINT, os.X_OK)
    agent = container(find(render("base"), "DaemonSet", "flowtel"), "flowtel")
    assert "command" not in agent, "the DaemonSet must keep the image's entrypoint (headers)"
    assert ins["CMD"] == str(agent["args"]).replace("'", '"')
    assert ins["USER"] == "0:0"


# --- what `pip install` in the image gets -------------------------------------------------------


def test_build_context_holds_the_sources_and_nothing_else() -> None:
    files = context_files()
    assert "pyproject.toml" in files and "README.md" in files and "deploy/entrypoint.sh" in files
    assert "config/flowtel.yaml" in files and "bpf/tc_flow.c" in files
    for f in files:
        assert not f.startswith((".git/", ".venv/", "tests/", "bench/", ".ci/")), f
        assert "__pycache__" not in f and not f.startswith("deploy/overlays"), f


def test_wheel_from_the_context_contains_every_registered_component(tmp_path: Path) -> None:
    """`pip install /tmp/flowtel-src` in the image builds this wheel from the context."""
    ctx = tmp_path / "ctx"
    for rel in context_files():
        dst = ctx / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, dst)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "w"),
         str(ctx)], capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (tmp_path / "w").glob("flowtel-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for factory in all_factories():
        module = factory.create.__module__.replace(".", "/") + ".py"
        assert module in names, f"{factory.kind.value}.{factory.type}: {module} missing from the wheel"
    for bpf in (REPO / "bpf").glob("*.[ch]"):
        assert f"bpf/{bpf.name}" in names
    assert "extensions/health_check/README.md" in names
    assert not any(n.startswith("tests/") for n in names)


# --- entrypoint.sh ------------------------------------------------------------------------------


def run_entrypoint(tmp: Path, *, host_headers: bool, bundled: bool, prelinked: bool = False) -> tuple[Path, str]:
    release = "6.99.0-test"
    modules, host, bundle = tmp / "lib-modules", tmp / "host-lib-modules", tmp / "bundle"
    modules.mkdir(parents=True)
    (host / release).mkdir(parents=True)
    if host_headers:
        (tmp / "usr-src" / "linux-headers-6.99.0-test" / "include").mkdir(parents=True)
        (host / release / "build").symlink_to(tmp / "usr-src" / "linux-headers-6.99.0-test")
    if bundled:
        for name in ("linux-headers-6.1.0-56-amd64", "linux-headers-6.1.0-9-amd64", "linux-headers-6.1.0-56-common",
                     "linux-headers-6.1.0-9-common"):
            (bundle / name / "include").mkdir(parents=True)
    if prelinked:
        (tmp / "own" / "include").mkdir(parents=True)
        (modules / release).mkdir()
        (modules / release / "build").symlink_to(tmp / "own")
    env = {**os.environ, "FLOWTEL_KERNEL_RELEASE": release, "FLOWTEL_MODULES_DIR": str(modules),
           "FLOWTEL_HOST_MODULES_DIR": str(host), "FLOWTEL_BUNDLED_HEADERS_DIR": str(bundle)}
    proc = subprocess.run(["sh", str(ENTRYPOINT), "sh", "-c", "echo ran; exit 7"], env=env, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 7 and proc.stdout == "ran\n", "the command is exec'd with its exit status"
    return modules / release, proc.stderr


def test_entrypoint_prefers_the_hosts_headers(tmp_path: Path) -> None:
    kdir, log = run_entrypoint(tmp_path, host_headers=True, bundled=True)
    assert os.readlink(kdir / "build") == str(tmp_path / "host-lib-modules" / "6.99.0-test" / "build")
    assert (kdir / "build" / "include").is_dir()
    assert "the host's" in log


def test_entrypoint_falls_back_to_the_newest_bundled_headers(tmp_path: Path) -> None:
    kdir, log = run_entrypoint(tmp_path, host_headers=False, bundled=True)
    assert os.readlink(kdir / "build") == str(tmp_path / "bundle" / "linux-headers-6.1.0-56-amd64")
    assert os.readlink(kdir / "source") == str(tmp_path / "bundle" / "linux-headers-6.1.0-56-common")
    assert "using the bundled linux-headers-6.1.0-56-amd64 (fallback)" in log


def test_entrypoint_keeps_existing_headers_and_warns_without_any(tmp_path: Path) -> None:
    kdir, log = run_entrypoint(tmp_path / "a", host_headers=False, bundled=True, prelinked=True)
    assert os.readlink(kdir / "build") == str(tmp_path / "a" / "own")
    kdir, log = run_entrypoint(tmp_path / "b", host_headers=False, bundled=False)
    assert not (kdir / "build").exists()
    assert "WARNING: no kernel headers" in log and "flowtel doctor" in log


@pytest.mark.kernel
def test_bcc_compiles_flowtels_programs_with_only_the_bundled_headers(tmp_path: Path) -> None:
    """The image's situation on a node without headers: /usr/src and /lib/modules hold nothing
    (a private mount namespace hides this machine's), the Debian headers sit apart as in
    /opt/flowtel/kernel-headers (their kbuild links dangling, as in the image), and the
    entrypoint links them; then bcc compiles and loads the tc program."""
    sources = sorted(Path("/usr/src").glob("linux-headers-*-amd64"))
    if not sources:
        pytest.skip("no Debian linux-headers-*-amd64 under /usr/src to play the bundled headers (make setup installs them)")
    arch_dir = sources[-1]
    common = arch_dir.with_name(re.sub(r"-(cloud-|rt-)?amd64$", "-common", arch_dir.name))
    bundle = tmp_path / "kernel-headers"
    script = f"""
set -e
mkdir -p {bundle}/{arch_dir.name} {bundle}/{common.name}
mount --bind {arch_dir} {bundle}/{arch_dir.name}
mount --bind {common} {bundle}/{common.name}
mount -t tmpfs none /usr/src
mount -t tmpfs none /lib/modules
mkdir -p {tmp_path}/empty-host
FLOWTEL_HOST_MODULES_DIR={tmp_path}/empty-host FLOWTEL_BUNDLED_HEADERS_DIR={bundle} \
  exec sh {ENTRYPOINT} {sys.executable} -c '
import bpf
from bcc import BPF
b = BPF(text=bpf.source("tc_flow.c"), cflags=bpf.cflags(FLOWTEL_MAX_FLOWS=1024, FLOWTEL_IFACE_SLOTS=16))
b.load_func("flowtel_tc", BPF.SCHED_CLS)
print("compiled and loaded")
'
"""
    proc = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "compiled and loaded" in proc.stdout
    assert f"using the bundled {arch_dir.name} (fallback)" in proc.stderr
