"""`flowtel doctor`: can the agent run on this node, and if not, exactly what to type.

Every check returns a :class:`CheckResult` and runs on its own: an exception inside one
check becomes that check's FAIL, so one surprise on an odd node never hides the others.

File-based checks read through ``root`` (a tree seen as ``/``; absolute symlinks resolve
inside it), so tests point them at a fake tree instead of patching ``os``. The bcc checks
always probe the running system, in a child interpreter: importing bcc loads LLVM (~60 MB
resident, more after a compile) which the caller must not keep, and a crashing LLVM must not
take the doctor down.
"""
from __future__ import annotations

import enum
import errno
import glob
import gzip
import json
import os
import posixpath
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from flowtel.component import Factory, Kind
from flowtel.config import AgentConfig, ConfigError, component_type, load_config
from flowtel.preflight import (
    BccCompile,
    BpfPrivileges,
    Bpffs,
    Btf,
    Capabilities,
    Executable,
    KubernetesAccess,
    Requirement,
    Tracefs,
    Tracepoint,
)


class Status(enum.Enum):
    OK = "OK"
    WARN = "WARN"
    FAIL = "FAIL"


@dataclass(slots=True)
class CheckResult:
    name: str
    status: Status
    detail: str
    remedy: str = ""


@dataclass(frozen=True, slots=True)
class Needed:
    """A requirement and the components (``receivers.ebpf``) that declare it."""

    requirement: Requirement
    by: tuple[str, ...]


MIN_KERNEL = (5, 8)
# Below 5.11 BPF memory is charged to RLIMIT_MEMLOCK, which only CAP_SYS_RESOURCE may raise.
MEMCG_BPF_KERNEL = (5, 11)

CAP_NET_BIND_SERVICE = 10
CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21
CAP_SYS_RESOURCE = 24
CAP_PERFMON = 38
CAP_BPF = 39
CAPABILITY_NAMES = {
    CAP_NET_BIND_SERVICE: "CAP_NET_BIND_SERVICE",
    CAP_NET_ADMIN: "CAP_NET_ADMIN",
    CAP_SYS_ADMIN: "CAP_SYS_ADMIN",
    CAP_SYS_RESOURCE: "CAP_SYS_RESOURCE",
    CAP_PERFMON: "CAP_PERFMON",
    CAP_BPF: "CAP_BPF",
}

TRACEFS_DIRS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
BTF_VMLINUX = "/sys/kernel/btf/vmlinux"
KHEADERS = "/sys/kernel/kheaders.tar.xz"
SYSTEM_BCC = "/usr/lib/python3/dist-packages/bcc/__init__.py"

COMPILE_TIMEOUT_S = 30.0
IMPORT_TIMEOUT_S = 30.0
KUBE_TIMEOUT_S = 5.0

CONTAINER_HEADERS_NOTE = (
    "in a container: hostPath-mount the host's /lib/modules and /usr/src read-only at the "
    "same paths (the links point into /usr/src)"
)


# --- the tree the file-based checks look at ---------------------------------------------


class Root:
    """A directory tree seen as `/`: absolute symlinks inside it resolve inside it.

    With root "/" this is the real system; tests pass a tmp_path laid out like one, with
    links made exactly as on a node (``build -> /usr/src/linux-headers-…``).
    """

    def __init__(self, root: str = "/") -> None:
        self.root = os.path.abspath(root)

    def resolve(self, path: str) -> str:
        """`path` (absolute, as on the node) with every symlink followed, as on the node."""
        pending = [p for p in path.split("/") if p]
        done: list[str] = []
        hops = 0
        while pending:
            part = pending.pop(0)
            if part == ".":
                continue
            if part == "..":
                if done:
                    done.pop()
                continue
            here = os.path.join(self.root, *done, part)
            if os.path.islink(here):
                hops += 1
                if hops > 40:
                    raise OSError(errno.ELOOP, "too many levels of symbolic links", path)
                target = os.readlink(here)
                if target.startswith("/"):
                    done = []
                pending = [p for p in target.split("/") if p] + pending
            else:
                done.append(part)
        return "/" + "/".join(done)

    def real(self, path: str) -> str:
        return os.path.join(self.root, self.resolve(path).lstrip("/"))

    def readlink(self, path: str) -> str | None:
        parent, name = posixpath.split(path)
        here = os.path.join(self.real(parent), name)
        return os.readlink(here) if os.path.islink(here) else None

    def isdir(self, path: str) -> bool:
        return os.path.isdir(self.real(path))

    def isfile(self, path: str) -> bool:
        return os.path.isfile(self.real(path))

    def exists(self, path: str) -> bool:
        return os.path.exists(self.real(path))

    def lexists(self, path: str) -> bool:
        return self.readlink(path) is not None or self.exists(path)

    def read_text(self, path: str) -> str:
        with open(self.real(path), encoding="utf-8", errors="replace") as f:
            return f.read()

    def glob(self, directory: str, pattern: str) -> list[str]:
        base = self.real(directory)
        return sorted(
            posixpath.join(directory, os.path.basename(p))
            for p in glob.glob(os.path.join(glob.escape(base), pattern))
        )


def kernel_release(root: Root) -> str:
    try:
        return root.read_text("/proc/sys/kernel/osrelease").strip()
    except FileNotFoundError:
        return os.uname().release


def parse_kernel_version(release: str) -> tuple[int, int] | None:
    m = re.match(r"(\d+)\.(\d+)", release)
    return (int(m.group(1)), int(m.group(2))) if m else None


def kernel_config(root: Root, release: str) -> dict[str, str] | None:
    """The running kernel's build config, or None where the node does not publish it."""
    text: str | None = None
    if root.isfile("/proc/config.gz"):
        with gzip.open(root.real("/proc/config.gz"), "rt", errors="replace") as f:
            text = f.read()
    elif root.isfile(f"/boot/config-{release}"):
        text = root.read_text(f"/boot/config-{release}")
    if text is None:
        return None
    config: dict[str, str] = {}
    for line in text.splitlines():
        if m := re.match(r"(CONFIG_\w+)=(.*)", line):
            config[m.group(1)] = m.group(2)
        elif m := re.match(r"# (CONFIG_\w+) is not set", line):
            config[m.group(1)] = "n"
    return config


def _debian_arch() -> str:
    machine = os.uname().machine
    return {"x86_64": "amd64", "aarch64": "arm64", "ppc64le": "ppc64el"}.get(machine, machine)


# --- 1. kernel version ------------------------------------------------------------------


def check_kernel(root: Root) -> CheckResult:
    release = kernel_release(root)
    version = parse_kernel_version(release)
    if version is None:
        return CheckResult(
            "kernel", Status.FAIL, f"cannot parse the kernel release {release!r}",
            "check /proc/sys/kernel/osrelease; flowtel needs Linux >= 5.8",
        )
    if version < MIN_KERNEL:
        return CheckResult(
            "kernel", Status.FAIL,
            f"{release} is older than 5.8: flowtel needs BPF ring buffers and CAP_BPF (both 5.8)",
            "move the node to a kernel >= 5.8 and reboot: Debian 11+ ships 5.10+, Ubuntu 20.04 "
            "gets 5.15 with `apt-get install linux-generic-hwe-20.04`; on a managed cluster, "
            "upgrade the node pool's image",
        )
    return CheckResult("kernel", Status.OK, f"{release} (>= 5.8: BPF ring buffers, CAP_BPF)")


# --- 2. BTF -----------------------------------------------------------------------------


def check_btf(root: Root, needs: Sequence[Btf] = (Btf("drop attribution reads sk_buff offsets from it", required=False),)) -> CheckResult:
    purposes = "; ".join(dict.fromkeys(n.purpose for n in needs))
    if root.isfile(BTF_VMLINUX):
        size = os.path.getsize(root.real(BTF_VMLINUX))
        return CheckResult("BTF", Status.OK, f"{BTF_VMLINUX} present ({size // 1024} KiB): {purposes}")
    config = kernel_config(root, kernel_release(root))
    if config is not None and config.get("CONFIG_DEBUG_INFO_BTF") != "y":
        why = "the kernel is built without CONFIG_DEBUG_INFO_BTF"
    else:
        why = f"{BTF_VMLINUX} is not visible here"
    required = any(n.required for n in needs)
    return CheckResult(
        "BTF", Status.FAIL if required else Status.WARN,
        f"{why}: the agent does not start ({purposes})" if required else f"{why}: {purposes} is lost",
        "use a kernel built with CONFIG_DEBUG_INFO_BTF=y (Debian 11+ and Ubuntu 20.10+ kernels are); "
        f"in a container: hostPath-mount {posixpath.dirname(BTF_VMLINUX)} read-only",
    )


# --- 3. bcc importable ------------------------------------------------------------------

_MARKER = "@@flowtel-doctor@@"

_IMPORT_PROBE = f"""
import json
try:
    import bcc
except BaseException as e:
    out = {{"ok": False, "type": type(e).__name__, "error": str(e),
           "missing": isinstance(e, ModuleNotFoundError) and e.name == "bcc"}}
else:
    out = {{"ok": True, "file": getattr(bcc, "__file__", None), "has_bpf": hasattr(bcc, "BPF"),
           "version": getattr(bcc, "__version__", None)}}
print({_MARKER!r} + json.dumps(out), flush=True)
"""


@dataclass(slots=True)
class _Probe:
    data: dict[str, object] | None  # what the child reported, None if it never got that far
    returncode: int
    stdout: str
    stderr: str


def _run_probe(
    argv: Sequence[str], code: str, *, stdin: str = "", timeout: float,
    pythonpath: Sequence[str] = (),
) -> _Probe:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([*pythonpath, *filter(None, [env.get("PYTHONPATH")])])
    # cwd "/": `python -c` puts the cwd first on sys.path, and a stray ./bcc must not count.
    proc = subprocess.run(
        [*argv, "-c", code], input=stdin, capture_output=True, text=True,
        timeout=timeout, env=env, errors="replace", cwd="/",
    )
    data = None
    # bcc's C++ side writes to the same stdout, so the marker line may not be the last one.
    for line in proc.stdout.splitlines():
        if line.startswith(_MARKER):
            data = json.loads(line[len(_MARKER):])
    return _Probe(data, proc.returncode, proc.stdout, proc.stderr)


def _signal_name(returncode: int) -> str:
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def check_bcc(
    root: Root, *, python: Sequence[str] = (sys.executable,), pythonpath: Sequence[str] = (),
    timeout: float = IMPORT_TIMEOUT_S,
) -> CheckResult:
    """`import bcc` in the interpreter the agent runs with (`python`)."""
    interp = " ".join(python)
    never_pip = "do not `pip install bcc`: the PyPI package of that name is an unrelated project"
    try:
        probe = _run_probe(python, _IMPORT_PROBE, timeout=timeout, pythonpath=pythonpath)
    except subprocess.TimeoutExpired:
        return CheckResult(
            "bcc", Status.FAIL, f"`import bcc` did not finish within {timeout:g} s",
            "apt-get install --reinstall libbpfcc python3-bpfcc",
        )
    data = probe.data
    if data is None:
        how = (f"crashed ({_signal_name(probe.returncode)})" if probe.returncode < 0
               else f"exited with code {probe.returncode}")
        return CheckResult(
            "bcc", Status.FAIL, f"`import bcc` {how}: {_last_line(probe.stderr)}",
            "apt-get install --reinstall libbpfcc python3-bpfcc",
        )
    if data["ok"] and data["has_bpf"]:
        return CheckResult("bcc", Status.OK, f"bcc {data['version']} importable ({data['file']})")
    if data["ok"]:
        return CheckResult(
            "bcc", Status.FAIL,
            f"`import bcc` finds {data['file']}, which has no bcc.BPF: that is the unrelated PyPI "
            "package `bcc`, not the BPF Compiler Collection",
            "pip uninstall -y bcc   (in the agent's virtualenv)\n"
            "apt-get install python3-bpfcc   (the real bcc, packaged for /usr/bin/python3)",
        )
    if data["missing"]:
        if root.isfile(SYSTEM_BCC):
            return CheckResult(
                "bcc", Status.FAIL,
                f"python3-bpfcc is installed ({posixpath.dirname(SYSTEM_BCC)}), but {interp} does "
                "not see it (a virtualenv without system site-packages, or another Python)",
                "/usr/bin/python3 -m venv --system-site-packages VENV, then run flowtel from VENV; "
                + never_pip,
            )
        return CheckResult(
            "bcc", Status.FAIL, f"no module named bcc for {interp}",
            "apt-get install python3-bpfcc   (bcc for /usr/bin/python3; create virtualenvs from "
            "it with --system-site-packages); in a container: install it in the image; "
            + never_pip,
        )
    return CheckResult(
        "bcc", Status.FAIL, f"`import bcc` failed: {data['type']}: {data['error']}",
        "apt-get install --reinstall libbpfcc python3-bpfcc   (libbcc.so and its LLVM)",
    )


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


# --- 4. kernel headers ------------------------------------------------------------------


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", name))


def _headers_source_for(root: Root, build: str) -> str | None:
    """The tree holding include/linux/kconfig.h for an arch-specific headers dir.

    Debian splits headers into linux-headers-V-amd64 (config, generated) and
    linux-headers-V-common (the headers); Ubuntu into V-generic and V; a kernel tree has both.
    """
    if root.isfile(f"{build}/include/linux/kconfig.h"):
        return build
    m = re.match(r"linux-headers-\d+\.\d+(?:\.\d+)?(?:-\d+)?", posixpath.basename(build))
    if m is None:
        return None
    for sibling in (f"/usr/src/{m.group(0)}-common", f"/usr/src/{m.group(0)}"):
        if sibling != build and root.isfile(f"{sibling}/include/linux/kconfig.h"):
            return sibling
    return None


def find_fallback_headers(root: Root, release: str) -> tuple[str, str] | None:
    """(build, source) under /usr/src for bcc: the running kernel's own if present, else the newest."""
    candidates = []
    for build in root.glob("/usr/src", "linux-headers-*"):
        # -common and bare source trees have no generated config: they are not build dirs.
        if not root.isdir(f"{build}/include/generated"):
            continue
        source = _headers_source_for(root, build)
        if source is None:
            continue
        exact = posixpath.basename(build) == f"linux-headers-{release}"
        candidates.append(((exact, _version_key(posixpath.basename(build))), build, source))
    if not candidates:
        return None
    _, build, source = max(candidates)
    return build, source


def _headers_release(root: Root, build: str) -> str | None:
    try:
        text = root.read_text(f"{build}/include/generated/utsrelease.h")
    except OSError:
        text = ""
    if m := re.search(r'UTS_RELEASE\s+"([^"]+)"', text):
        return m.group(1)
    name = posixpath.basename(root.resolve(build))
    return name.removeprefix("linux-headers-") if name.startswith("linux-headers-") else None


def check_kernel_headers(root: Root) -> CheckResult:
    """Headers as bcc finds them (loader.cc): modules dir first, then kheaders."""
    name = "kernel headers"
    release = kernel_release(root)
    kdir = f"/lib/modules/{release}"
    build, source = f"{kdir}/build", f"{kdir}/source"
    override = os.environ.get("BCC_KERNEL_SOURCE")
    if override:
        kpath = override
    else:
        # bcc compiles from source/ (adding build/'s include dirs) only when both are dirs.
        kpath = source if root.isdir(build) and root.isdir(source) else build

    if root.isfile(f"{kpath}/include/linux/kconfig.h"):
        if override:
            where, hdr_release = f"BCC_KERNEL_SOURCE={override}", _headers_release(root, override)
        else:
            link = root.readlink(build)
            where = f"{build} -> {link}" if link else build
            hdr_release = _headers_release(root, build)
        if hdr_release and hdr_release != release:
            return CheckResult(
                name, Status.OK,
                f"fallback headers {hdr_release} for kernel {release} ({where}); flowtel programs "
                "use only UAPI headers and tracepoint records, so this works",
            )
        return CheckResult(name, Status.OK, f"headers for {release} ({where})")

    if root.isfile(KHEADERS):
        return CheckResult(
            name, Status.OK,
            f"no headers under {kdir}, but {KHEADERS} (CONFIG_IKHEADERS) is present: bcc "
            f"extracts it to /tmp/kheaders-{release}",
        )

    problem = _describe_missing_headers(root, release, kpath, override)
    fallback = find_fallback_headers(root, release)
    if fallback is not None:
        hb, hs = fallback
        version = _headers_release(root, hb) or posixpath.basename(hb)
        kind = "matching" if version == release else "fallback"
        return CheckResult(
            name, Status.FAIL,
            f"{problem}; {kind} headers {version} are installed in {hb}",
            f"mkdir -p {kdir}\nln -sfn {hb} {build}\nln -sfn {hs} {source}\n"
            + ("" if kind == "matching" else
               "(flowtel programs use only UAPI headers and tracepoint records, so other "
               "kernels' headers work)\n")
            + CONTAINER_HEADERS_NOTE,
        )
    arch = _debian_arch()
    remedy = (
        "apt-get install linux-headers-$(uname -r)\n"
        f"if no package matches this kernel: apt-get install linux-headers-{arch} (Debian) or "
        "linux-headers-generic (Ubuntu), then rerun flowtel doctor for the link commands\n"
        + CONTAINER_HEADERS_NOTE
    )
    config = kernel_config(root, release)
    if config is not None and config.get("CONFIG_IKHEADERS") == "m":
        remedy = "modprobe kheaders   (this kernel has CONFIG_IKHEADERS=m)\n" + remedy
    return CheckResult(name, Status.FAIL, problem + "; no kernel headers under /usr/src", remedy)


def _describe_missing_headers(root: Root, release: str, kpath: str, override: str | None) -> str:
    if override:
        return f"BCC_KERNEL_SOURCE={override} has no include/linux/kconfig.h"
    kdir = f"/lib/modules/{release}"
    parts = []
    for entry in ("build", "source"):
        path = f"{kdir}/{entry}"
        link = root.readlink(path)
        if link is not None and not root.exists(path):
            parts.append(f"{path} -> {link} points at nothing")
        elif entry == "build" and not root.lexists(path):
            parts.append(f"no kernel headers for {release}: {path} does not exist")
    if not parts:
        parts.append(f"{kpath}/include/linux/kconfig.h is missing (bcc needs build and, for "
                     "split Debian/Ubuntu headers, source linked)")
    return "; ".join(parts)


# --- 5. bcc compile ---------------------------------------------------------------------

PROBE_PROGRAM = """
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/if_ether.h>

int flowtel_doctor_probe(struct __sk_buff *skb) {
    /* A bounds-checked packet read: the verifier path flowtel's tc programs take. */
    void *data = (void *)(long)skb->data;
    void *end = (void *)(long)skb->data_end;
    if (data + sizeof(struct ethhdr) > end)
        return TC_ACT_OK;
    return TC_ACT_OK;
}
"""

_COMPILE_PROBE = f"""
import json, sys, time
started = time.monotonic()
try:
    from bcc import BPF
    bpf = BPF(text=sys.stdin.read())
    bpf.load_func("flowtel_doctor_probe", BPF.SCHED_CLS)
    out = {{"ok": True, "seconds": time.monotonic() - started}}
except Exception as e:
    out = {{"ok": False, "error": f"{{type(e).__name__}}: {{e}}"}}
sys.stderr.flush()
print({_MARKER!r} + json.dumps(out), flush=True)
"""


def first_error_line(*outputs: str) -> str | None:
    """The line an operator needs from clang/bcc output: the first `error:`, else bcc's own."""
    lines = [line.strip() for text in outputs for line in text.splitlines()]
    for line in lines:
        if re.search(r"\berror:", line):
            return line
    for line in lines:
        if "Unable to find kernel headers" in line:
            return line
    return None


def check_bcc_compile(
    *, python: Sequence[str] = (sys.executable,), program: str = PROBE_PROGRAM,
    timeout: float = COMPILE_TIMEOUT_S,
) -> CheckResult:
    """Compile and load a SCHED_CLS program with bcc: the proof that headers and LLVM work."""
    name = "bcc compile"
    try:
        probe = _run_probe(python, _COMPILE_PROBE, stdin=program, timeout=timeout)
    except subprocess.TimeoutExpired:
        return CheckResult(
            name, Status.FAIL, f"bcc did not finish compiling within {timeout:g} s",
            "the node is short of CPU or memory (bcc needs ~150 MB and a few seconds); "
            "check `dmesg` and the agent's resource limits, then rerun",
        )
    data = probe.data
    if data is None:
        if probe.returncode < 0:
            sig = _signal_name(probe.returncode)
            return CheckResult(
                name, Status.FAIL, f"the compiler crashed ({sig})",
                "SIGKILL is usually the OOM killer: give the agent >= 300 MiB; otherwise libbcc "
                "and its LLVM disagree: apt-get install --reinstall libbpfcc python3-bpfcc",
            )
        return CheckResult(
            name, Status.FAIL,
            f"the probe exited with code {probe.returncode}: {_last_line(probe.stderr)}",
            "apt-get install --reinstall libbpfcc python3-bpfcc",
        )
    if data["ok"]:
        return CheckResult(
            name, Status.OK, f"compiled and loaded a SCHED_CLS program in {data['seconds']:.1f} s",
        )
    error = str(data["error"])
    line = first_error_line(probe.stderr, probe.stdout) or error
    if re.search(r"Operation not permitted|Permission denied|super-user", error):
        remedy = "loading BPF needs privileges: see the capabilities check"
    elif "file not found" in line or "kernel headers" in line:
        remedy = "the kernel headers are unusable: see the kernel headers check"
    else:
        remedy = ("bcc cannot build a trivial program: apt-get install --reinstall libbpfcc "
                  "python3-bpfcc; if that does not help, report this output to flowtel")
    return CheckResult(name, Status.FAIL, f"bcc failed: {line}", remedy)


# --- 6. tracefs and the tracepoints -----------------------------------------------------


def find_tracefs(root: Root) -> str | None:
    for base in TRACEFS_DIRS:
        if root.isdir(f"{base}/events"):
            return base
    return None


def check_tracefs(root: Root) -> CheckResult:
    base = find_tracefs(root)
    if base is not None:
        return CheckResult("tracefs", Status.OK, f"mounted at {base}")
    for candidate in TRACEFS_DIRS:
        # tracefs is mode 0700: to anyone but root it looks absent, which is the wrong fix.
        try:
            os.stat(root.real(f"{candidate}/events"))
        except PermissionError:
            return CheckResult(
                "tracefs", Status.FAIL, f"{candidate} is not readable by this user",
                "run the agent (and flowtel doctor) as root; see the capabilities check",
            )
        except OSError:
            continue
    return CheckResult(
        "tracefs", Status.FAIL,
        "no tracefs at /sys/kernel/tracing or /sys/kernel/debug/tracing: no tracepoints "
        "(drops, TCP state, retransmits, resets) and no tracepoint formats",
        "mount -t tracefs tracefs /sys/kernel/tracing   (keep it: `tracefs /sys/kernel/tracing "
        "tracefs defaults 0 0` in /etc/fstab); in a container: hostPath-mount "
        "/sys/kernel/tracing at /sys/kernel/tracing",
    )


def check_tracepoints(root: Root, tracepoints: Sequence[Tracepoint]) -> list[CheckResult]:
    """Each tracepoint a component attaches to, with the fields it reads: a missing one is a
    FAIL, because the component does not start without it."""
    base = find_tracefs(root)
    if base is None:
        return [CheckResult("tracepoints", Status.FAIL, "not checked: no readable tracefs",
                            "see the tracefs check")]
    results = []
    for tp in tracepoints:
        fmt = f"{base}/events/{tp.category}/{tp.event}/format"
        if not root.isfile(fmt):
            results.append(CheckResult(
                tp.name, Status.FAIL,
                f"tracepoint missing ({base}/events/{tp.category}/{tp.event}): needed for {tp.purpose}",
                f"this kernel does not expose {tp.name}; distribution kernels >= 5.8 do — "
                f"check `ls {base}/events/{tp.category}/`; or disable the feature in the component's config",
            ))
            continue
        text = root.read_text(fmt)
        missing = [f for f in tp.fields if not re.search(rf"field:[^;]*\b{re.escape(f)}(\[\d*\])?;", text)]
        if missing:
            reason_note = " (the drop reason needs Linux >= 5.17)" if "reason" in missing and tp.event == "kfree_skb" else ""
            results.append(CheckResult(
                tp.name, Status.FAIL,
                f"tracepoint has no field {', '.join(missing)}{reason_note}: needed for {tp.purpose}",
                f"this kernel's {tp.name} lacks what flowtel reads (see {fmt}); move to a newer kernel, "
                "or disable the feature in the component's config",
            ))
        else:
            results.append(CheckResult(tp.name, Status.OK, f"tracepoint present, for {tp.purpose}"))
    return results


# --- 7. bpffs ---------------------------------------------------------------------------


def _unescape_mount_field(field: str) -> str:
    # /proc/*/mounts escapes space, tab, newline and backslash as \ooo octal.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def check_bpffs(root: Root) -> CheckResult:
    mounts: list[tuple[str, str]] = []
    for line in root.read_text("/proc/self/mounts").splitlines():
        fields = line.split()
        if len(fields) >= 3:
            mounts.append((_unescape_mount_field(fields[1]), fields[2]))
    at_sys_fs_bpf = [fstype for point, fstype in mounts if point == "/sys/fs/bpf"]
    if at_sys_fs_bpf and at_sys_fs_bpf[-1] == "bpf":  # the last mount on a point is the visible one
        return CheckResult("bpffs", Status.OK, "bpf filesystem mounted at /sys/fs/bpf")
    if at_sys_fs_bpf:
        seen = f"/sys/fs/bpf is a {at_sys_fs_bpf[-1]} mount, not bpf"
    else:
        elsewhere = [point for point, fstype in mounts if fstype == "bpf"]
        seen = "/sys/fs/bpf is not mounted" + (
            f" (bpffs is mounted at {', '.join(elsewhere)})" if elsewhere else "")
    return CheckResult(
        "bpffs", Status.FAIL,
        f"{seen}: maps cannot be pinned (the FQDN allow-list shared with dnsproxy)",
        "mount -t bpf bpf /sys/fs/bpf   (keep it: `bpffs /sys/fs/bpf bpf defaults 0 0` in "
        "/etc/fstab); in a container: hostPath-mount /sys/fs/bpf (type DirectoryOrCreate) with "
        "mountPropagation: Bidirectional",
    )


# --- 8. capabilities --------------------------------------------------------------------


def parse_cap_eff(status_text: str) -> int:
    """The effective capability mask from a /proc/<pid>/status text."""
    m = re.search(r"^CapEff:\s*([0-9a-fA-F]+)\s*$", status_text, re.MULTILINE)
    if m is None:
        raise ValueError("no CapEff line in /proc/self/status")
    return int(m.group(1), 16)


def check_capabilities(root: Root, *, bpf: bool = True, extra: Sequence[Capabilities] = ()) -> CheckResult:
    """The BPF privileges (``bpf``: a component loads programs) and the ``extra``
    capabilities components declare."""
    name = "capabilities"
    mask = parse_cap_eff(root.read_text("/proc/self/status"))
    have = {cap for cap in CAPABILITY_NAMES if mask >> cap & 1}
    version = parse_kernel_version(kernel_release(root)) or (0, 0)
    sys_admin = CAP_SYS_ADMIN in have
    missing = []
    # CAP_SYS_ADMIN implies BPF and PERFMON; before 5.8 it is the only way to get them.
    if bpf and not sys_admin and (CAP_BPF not in have or version < MIN_KERNEL):
        missing.append("CAP_BPF")
    if bpf and not sys_admin and (CAP_PERFMON not in have or version < MIN_KERNEL):
        missing.append("CAP_PERFMON")
    if bpf and CAP_NET_ADMIN not in have:
        missing.append("CAP_NET_ADMIN")
    by_name = {v: k for k, v in CAPABILITY_NAMES.items()}
    for need in extra:
        for cap in need.names:
            number = by_name.get(cap)
            # CAP_SYS_ADMIN stands in for CAP_BPF and CAP_PERFMON (and is all there is before 5.8).
            implied = sys_admin and number in (CAP_BPF, CAP_PERFMON)
            if number not in have and not implied and cap not in missing:
                missing.append(f"{cap} ({need.purpose})")
    present = ", ".join(CAPABILITY_NAMES[c] for c in sorted(have, key=lambda c: CAPABILITY_NAMES[c]))
    summary = f"CapEff={mask:016x} ({present or 'none of the ones flowtel uses'})"
    wanted = (["BPF", "PERFMON", "NET_ADMIN", "SYS_RESOURCE"] if bpf else []) + [
        cap.removeprefix("CAP_") for need in extra for cap in need.names]
    remedy = (
        "run the agent as root, or add to the DaemonSet container's securityContext: "
        f"capabilities: {{add: [{', '.join(dict.fromkeys(wanted))}]}}"
        + (" (SYS_ADMIN instead of BPF and PERFMON where the kernel or container runtime predates CAP_BPF)"
           if bpf else "")
    )
    if missing:
        return CheckResult(name, Status.FAIL, f"{summary}; missing {', '.join(missing)}", remedy)
    if CAP_SYS_RESOURCE not in have and version < MEMCG_BPF_KERNEL:
        return CheckResult(
            name, Status.WARN,
            f"{summary}; CAP_SYS_RESOURCE missing: on kernels < 5.11 maps count against "
            "RLIMIT_MEMLOCK, which only it can raise, so large maps fail to load",
            remedy,
        )
    note = "" if CAP_SYS_RESOURCE in have else "; CAP_SYS_RESOURCE not needed on >= 5.11"
    return CheckResult(name, Status.OK, summary + note)


# --- 8b. executables --------------------------------------------------------------------

EXECUTABLE_DIRS = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")


def check_executables(root: Root, needs: Sequence[Executable]) -> list[CheckResult]:
    results = []
    for need in needs:
        found = next((f"{d}/{need.name}" for d in EXECUTABLE_DIRS if root.isfile(f"{d}/{need.name}")), None)
        if found is not None:
            results.append(CheckResult(need.name, Status.OK, f"{found}, for {need.purpose}"))
        else:
            results.append(CheckResult(
                need.name, Status.FAIL, f"not found in {', '.join(EXECUTABLE_DIRS)}: needed for {need.purpose}",
                f"apt-get install {need.package}   (in the image: add it to the Dockerfile's packages)"))
    return results


# --- 9. kprobes (information only) ------------------------------------------------------


def check_kprobes(root: Root) -> CheckResult:
    why = "flowtel does not need kprobes: it attaches to tracepoints and tc only"
    for base in TRACEFS_DIRS:
        if root.exists(f"{base}/kprobe_events"):
            return CheckResult("kprobes", Status.OK, f"available; {why}")
    config = kernel_config(root, kernel_release(root))
    if config is not None and config.get("CONFIG_KPROBES") == "y":
        return CheckResult("kprobes", Status.OK, f"available (CONFIG_KPROBES=y); {why}")
    if config is not None:
        return CheckResult("kprobes", Status.OK, f"not available (CONFIG_KPROBES is off); {why}")
    return CheckResult("kprobes", Status.OK, f"not visible; {why}")


# --- 10. Kubernetes ---------------------------------------------------------------------


def check_kubernetes(access: KubernetesAccess, root: Root, *, timeout: float = KUBE_TIMEOUT_S) -> CheckResult:
    """Connect as the component would (flowtel.lib.kube: the same problems, the same
    remedies), then prove access with GET /version and one list of its first resource."""
    name = "kubernetes" if access.component == "k8sattributes" else f"kubernetes ({access.component})"
    try:
        import kubernetes  # noqa: F401  (first: the shared client below needs it)
    except ImportError as e:
        return CheckResult(
            name, Status.FAIL, f"the Python package `kubernetes` is not installed ({e})",
            "pip install kubernetes   (into the agent's virtualenv: the official client that "
            f"{access.component} uses)",
        )
    from kubernetes import client

    from flowtel.lib.kube import client as kube_client
    from flowtel.lib.kube.health import describe, rbac_remedy

    try:
        loaded = kube_client.load(access, resolve=root.real)
    except kube_client.AccessError as e:
        return CheckResult(name, Status.FAIL, e.problem, e.remedy)
    cfg = loaded.configuration
    cfg.retries = False  # one attempt: report the first failure, not three retries of it
    api = client.ApiClient(cfg)
    # The first core-group resource the component lists (pods, for every user today).
    plural = next((p for g, p in access.resources if g == ""), "pods")
    step = "GET /version"
    try:
        version = client.VersionApi(api).get_code(_request_timeout=timeout)
        step = f"list {plural}"
        _list_one(api, plural, timeout)
    except Exception as e:  # ApiException, urllib3/socket/ssl errors: described below
        what, remedy = describe(e, rbac_remedy(access, loaded.subject), timeout=timeout)
        return CheckResult(name, Status.FAIL, f"{loaded.where}: {step}: {what}", remedy)
    finally:
        api.close()
    return CheckResult(
        name, Status.OK, f"{loaded.where}: Kubernetes {version.git_version}, listing {plural} allowed",
    )


def _list_one(api: object, plural: str, timeout: float) -> None:
    """One item of a core-group list: the cheapest proof that listing is allowed."""
    from kubernetes import client

    assert isinstance(api, client.ApiClient)
    core = client.CoreV1Api(api)
    calls: dict[str, Callable[..., object]] = {"pods": core.list_pod_for_all_namespaces, "namespaces": core.list_namespace,
             "nodes": core.list_node, "services": core.list_service_for_all_namespaces}
    calls.get(plural, core.list_pod_for_all_namespaces)(limit=1, _request_timeout=timeout)


# --- running and reporting --------------------------------------------------------------


def _guarded(name: str, check: Callable[[], CheckResult | list[CheckResult]]) -> list[CheckResult]:
    try:
        result = check()
    except Exception as e:  # a broken check must cost its own line, never the report
        return [CheckResult(
            name, Status.FAIL, f"the check itself failed: {type(e).__name__}: {e}",
            "unexpected on this node: report it to flowtel with this output",
        )]
    return result if isinstance(result, list) else [result]


def requirements_of(
    config: AgentConfig, factories: Mapping[Kind, Mapping[str, Factory]] | None = None,
) -> list[Needed]:
    """What the components a config runs declare (their factories' ``preflight``), each
    requirement once, with the components that need it, in config order."""
    if factories is None:
        factories = config.factories
    used: dict[Kind, list[str]] = {kind: [] for kind in Kind}
    for spec in config.pipelines.values():
        for cid in (*spec.receivers, *spec.processors, *spec.exporters):
            for kind in (Kind.RECEIVER, Kind.PROCESSOR, Kind.EXPORTER, Kind.CONNECTOR):
                if cid in config.components[kind] and cid not in used[kind]:
                    used[kind].append(cid)
    used[Kind.EXTENSION] = list(config.extensions)
    by: dict[Requirement, list[str]] = {}
    for kind, ids in used.items():
        for cid in ids:
            factory = factories[kind][component_type(cid)]
            for requirement in factory.preflight(config.component(kind, cid)):
                by.setdefault(requirement, []).append(f"{kind.value}.{cid}")
    return [Needed(requirement, tuple(names)) for requirement, names in by.items()]


def _of(needed: Sequence[Needed], kind: type[Requirement]) -> list[Needed]:
    return [n for n in needed if isinstance(n.requirement, kind)]


def _needed_by(needed: Sequence[Needed]) -> str:
    return ", ".join(dict.fromkeys(name for n in needed for name in n.by))


def run_checks(
    config: AgentConfig | None = None, *, root: str = "/",
    factories: Mapping[Kind, Mapping[str, Factory]] | None = None,
) -> list[CheckResult]:
    """The checks the config's components need (by default the config `flowtel run` would
    use), in the order an operator fixes things.

    `root` relocates the file-based checks (/proc, /sys, /lib/modules, /usr/src); the bcc
    checks always probe this machine's interpreter and kernel.
    """
    tree = Root(root)
    results: list[CheckResult] = []
    if factories is None:
        from flowtel.registry import factories_by_kind

        factories = factories_by_kind()
    if config is None:
        try:
            config = load_config(None, factories=factories)
        except ConfigError as e:
            return [CheckResult("config", Status.FAIL, str(e),
                                "fix the default config, or name the agent's config with --config FILE")]
    needed = _guarded_requirements(config, factories, results)
    return results + check_requirements(needed, tree)


def check_requirements(needed: Sequence[Needed], tree: Root) -> list[CheckResult]:
    """The kernel check, then one check per kind of requirement ``needed`` holds."""
    results: list[CheckResult] = []
    results += _guarded("kernel", lambda: check_kernel(tree))
    btf = _of(needed, Btf)
    if btf:
        needs = [n.requirement for n in btf if isinstance(n.requirement, Btf)]
        results += _guarded("BTF", lambda: check_btf(tree, needs))
    if _of(needed, BccCompile):
        bcc = _guarded("bcc", lambda: check_bcc(tree))
        headers = _guarded("kernel headers", lambda: check_kernel_headers(tree))
        results += bcc + headers
        if bcc[0].status is Status.OK and headers[0].status is Status.OK:
            results += _guarded("bcc compile", check_bcc_compile)
        else:
            results.append(CheckResult(
                "bcc compile", Status.FAIL, "not attempted: needs bcc and kernel headers",
                "fix the bcc and kernel headers checks above, then rerun flowtel doctor",
            ))
    tracepoints = [n.requirement for n in _of(needed, Tracepoint) if isinstance(n.requirement, Tracepoint)]
    if _of(needed, Tracefs) or tracepoints:
        results += _guarded("tracefs", lambda: check_tracefs(tree))
    if tracepoints:
        results += _guarded("tracepoints", lambda: check_tracepoints(tree, tracepoints))
    if _of(needed, Bpffs):
        results += _guarded("bpffs", lambda: check_bpffs(tree))
    extra_caps = [n.requirement for n in _of(needed, Capabilities) if isinstance(n.requirement, Capabilities)]
    if _of(needed, BpfPrivileges) or extra_caps:
        bpf = bool(_of(needed, BpfPrivileges))
        results += _guarded("capabilities", lambda: check_capabilities(tree, bpf=bpf, extra=extra_caps))
    executables = [n.requirement for n in _of(needed, Executable) if isinstance(n.requirement, Executable)]
    if executables:
        results += _guarded("executables", lambda: check_executables(tree, executables))
    results += _guarded("kprobes", lambda: check_kprobes(tree))
    for n in _of(needed, KubernetesAccess):
        access = n.requirement
        assert isinstance(access, KubernetesAccess)
        results += _guarded("kubernetes", lambda: check_kubernetes(access, tree))
    return results


def _guarded_requirements(
    config: AgentConfig, factories: Mapping[Kind, Mapping[str, Factory]] | None, results: list[CheckResult],
) -> list[Needed]:
    try:
        needed = requirements_of(config, factories)
    except Exception as e:  # a component's preflight that raises costs its line, not the report
        results.append(CheckResult("config", Status.FAIL, f"{config.source}: cannot list what its components "
                                   f"need: {type(e).__name__}: {e}", "report it to flowtel with this output"))
        return []
    results.append(CheckResult(
        "config", Status.OK,
        f"{config.source}: checking what {_needed_by(needed) or 'its components'} need"))
    return needed


_TAGS = {Status.OK: "[ OK ]", Status.WARN: "[WARN]", Status.FAIL: "[FAIL]"}


def format_report(results: list[CheckResult]) -> str:
    width = max((len(r.name) for r in results), default=0) + 1
    indent = " " * (len(_TAGS[Status.OK]) + 1)
    lines = []
    for r in results:
        lines.append(f"{_TAGS[r.status]} {r.name + ':':<{width}} {r.detail}")
        if r.status is not Status.OK and r.remedy:
            first, *rest = r.remedy.splitlines()
            lines.append(f"{indent}fix: {first}")
            lines.extend(f"{indent}     {line}" for line in rest)
    counts = {s: sum(r.status is s for r in results) for s in Status}
    if counts[Status.FAIL]:
        verdict = "flowtel cannot run on this node until the FAIL lines are fixed"
    elif counts[Status.WARN]:
        verdict = "flowtel can run on this node, with the limits the WARN lines describe"
    else:
        verdict = "flowtel can run on this node"
    lines.append(
        f"{len(results)} checks: {counts[Status.OK]} OK, {counts[Status.WARN]} WARN, "
        f"{counts[Status.FAIL]} FAIL: {verdict}"
    )
    return "\n".join(lines)


def main(config: AgentConfig | None = None, *, root: str = "/") -> int:
    return _report(run_checks(config, root=root))


def main_dnsproxy(*, kube: bool, kubeconfig: str | None, pin_dir: str, root: str = "/") -> int:
    """`flowtel doctor --dnsproxy`: what the DNS proxy started with these flags needs."""
    return _report(run_dnsproxy_checks(kube=kube, kubeconfig=kubeconfig, pin_dir=pin_dir, root=root))


def run_dnsproxy_checks(*, kube: bool, kubeconfig: str | None, pin_dir: str, root: str = "/") -> list[CheckResult]:
    from dnsproxy.preflight import preflight

    needed = [Needed(r, ("dnsproxy",)) for r in dict.fromkeys(preflight(kube=kube, kubeconfig=kubeconfig, pin_dir=pin_dir))]
    head = CheckResult("dnsproxy", Status.OK, "checking what `flowtel dnsproxy` with these flags needs")
    return [head] + check_requirements(needed, Root(root))


def _report(results: list[CheckResult]) -> int:
    print(format_report(results), flush=True)
    return 1 if any(r.status is Status.FAIL for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
