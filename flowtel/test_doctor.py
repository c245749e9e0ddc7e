"""flowtel doctor against fake node trees (tmp_path laid out like /) and local HTTP servers."""
from __future__ import annotations

import gzip
import http.server
import json
import os
import shlex
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from flowtel.preflight import Btf, Capabilities, Executable, KubernetesAccess, Tracepoint
from processors.k8sattributes.access import kube_access
from processors.k8sattributes.config import K8sAttributesConfig
from receiver.ebpf.config import EbpfReceiverConfig
from receiver.ebpf.preflight import preflight as ebpf_preflight

from flowtel.doctor import (
    CheckResult,
    Root,
    Status,
    check_bcc,
    check_bpffs,
    check_btf,
    check_capabilities,
    check_executables,
    check_kernel,
    check_kernel_headers,
    check_kprobes,
    check_kubernetes,
    check_tracefs,
    check_tracepoints,
    format_report,
    main,
    parse_cap_eff,
    run_checks,
)

# The tracepoints the ebpf receiver declares (its default config: every kernel event).
TRACEPOINTS = [r for r in ebpf_preflight(EbpfReceiverConfig()) if isinstance(r, Tracepoint)]
BTF_NEEDED = [r for r in ebpf_preflight(EbpfReceiverConfig()) if isinstance(r, Btf)]


def KubeSettings(auth_type: str, kubeconfig: str | None = None) -> KubernetesAccess:
    """The k8sattributes processor's access for these settings, as its factory declares it."""
    access = kube_access(K8sAttributesConfig.model_validate({"auth_type": auth_type, "kubeconfig": kubeconfig}))
    assert access is not None
    return access


RELEASE = "6.18.44-fc-v669"
KDIR = f"/lib/modules/{RELEASE}"


class FakeNode:
    """A directory laid out like a node's /, built with the same links a node has."""

    def __init__(self, base: Path, release: str = RELEASE) -> None:
        self.base = base
        self.root = Root(str(base))
        self.write("/proc/sys/kernel/osrelease", release + "\n")

    def host(self, path: str) -> Path:
        return self.base / path.lstrip("/")

    def write(self, path: str, text: str = "") -> None:
        target = self.host(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)

    def mkdir(self, path: str) -> None:
        self.host(path).mkdir(parents=True, exist_ok=True)

    def link(self, path: str, target: str) -> None:
        """`ln -sfn target path` on the node: absolute targets stay node paths."""
        link = self.host(path)
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink():
            link.unlink()
        os.symlink(target, link)

    def debian_headers(self, version: str = "6.1.0-56", flavour: str = "amd64") -> tuple[str, str]:
        """Debian's split: -amd64 holds generated config, -common holds the headers."""
        build = f"/usr/src/linux-headers-{version}-{flavour}"
        common = f"/usr/src/linux-headers-{version}-common"
        self.write(f"{build}/include/generated/utsrelease.h",
                   f'#define UTS_RELEASE "{version}-{flavour}"\n')
        self.write(f"{build}/include/generated/autoconf.h")
        self.mkdir(f"{build}/include/config")
        self.write(f"{common}/include/linux/kconfig.h", "/* kconfig */\n")
        return build, common

    def tracefs(self, base: str = "/sys/kernel/tracing", skip: tuple[str, ...] = (),
                kfree_skb_reason: bool = True) -> None:
        for tp in TRACEPOINTS:
            if tp.name in skip:
                continue
            fields = "".join(f"\tfield:__u64 {name};\toffset:{8 + 8 * i};\tsize:8;\tsigned:0;\n"
                             for i, name in enumerate(tp.fields)
                             if kfree_skb_reason or (tp.event, name) != ("kfree_skb", "reason"))
            self.write(f"{base}/events/{tp.category}/{tp.event}/format",
                       f"name: {tp.event}\nID: 1\nformat:\n{fields}")

    def status(self, cap_eff: str) -> None:
        self.write("/proc/self/status",
                   f"Name:\tpython3\nCapInh:\t0000000000000000\nCapPrm:\t{cap_eff}\n"
                   f"CapEff:\t{cap_eff}\nCapBnd:\t000001ffffffffff\n")

    def kernel_config(self, **options: str) -> None:
        text = "".join(
            f"# {k} is not set\n" if v == "n" else f"{k}={v}\n" for k, v in options.items()
        )
        target = self.host("/proc/config.gz")
        target.parent.mkdir(parents=True, exist_ok=True)
        with gzip.open(target, "wt") as f:
            f.write(text)


@pytest.fixture
def node(tmp_path: Path) -> FakeNode:
    return FakeNode(tmp_path / "node")


def run_remedy(node: FakeNode, remedy: str) -> None:
    """Run the remedy's mkdir/ln commands as an operator would, but inside the fake tree."""
    for line in remedy.splitlines():
        if not line.startswith(("mkdir ", "ln ")):
            continue  # prose around the commands
        argv = shlex.split(line)
        if argv[:2] == ["mkdir", "-p"]:
            node.mkdir(argv[2])
        elif argv[:2] == ["ln", "-sfn"]:
            node.link(argv[3], argv[2])


# --- kernel headers ----------------------------------------------------------------------


def test_missing_headers_with_fallback_fail_with_exact_ln_commands(node: FakeNode) -> None:
    build, common = node.debian_headers()

    result = check_kernel_headers(node.root)

    assert result.status is Status.FAIL
    assert f"{KDIR}/build does not exist" in result.detail
    assert "fallback headers 6.1.0-56-amd64" in result.detail
    commands = result.remedy.splitlines()
    assert f"mkdir -p {KDIR}" in commands
    assert f"ln -sfn /usr/src/linux-headers-6.1.0-56-amd64 {KDIR}/build" in commands
    assert f"ln -sfn /usr/src/linux-headers-6.1.0-56-common {KDIR}/source" in commands
    # The commands are the fix: after them, the same check passes.
    run_remedy(node, result.remedy)
    assert check_kernel_headers(node.root).status is Status.OK


def test_fallback_is_the_newest_headers_and_the_running_kernels_own_win(node: FakeNode) -> None:
    node.debian_headers("5.10.0-30")
    node.debian_headers("6.1.0-9")
    node.debian_headers("6.1.0-56", flavour="cloud-amd64")

    result = check_kernel_headers(node.root)
    assert f"ln -sfn /usr/src/linux-headers-6.1.0-56-cloud-amd64 {KDIR}/build" in result.remedy
    assert f"ln -sfn /usr/src/linux-headers-6.1.0-56-common {KDIR}/source" in result.remedy

    own = FakeNode(node.base.parent / "own", release="6.1.0-9-amd64")
    own.debian_headers("6.1.0-9")
    own.debian_headers("6.1.0-56")
    result = check_kernel_headers(own.root)
    assert "matching headers 6.1.0-9-amd64" in result.detail
    assert "ln -sfn /usr/src/linux-headers-6.1.0-9-amd64 /lib/modules/6.1.0-9-amd64/build" in result.remedy


def test_headers_linked_to_fallback_are_ok_with_a_note(node: FakeNode) -> None:
    build, common = node.debian_headers()
    node.link(f"{KDIR}/build", build)
    node.link(f"{KDIR}/source", common)

    result = check_kernel_headers(node.root)

    assert result.status is Status.OK
    assert f"fallback headers 6.1.0-56-amd64 for kernel {RELEASE}" in result.detail
    assert f"{KDIR}/build -> /usr/src/linux-headers-6.1.0-56-amd64" in result.detail
    assert "only UAPI headers and tracepoint records, so this works" in result.detail


def test_matching_headers_are_ok_without_the_fallback_note(node: FakeNode) -> None:
    node.write(f"/usr/src/linux-headers-{RELEASE}/include/generated/utsrelease.h",
               f'#define UTS_RELEASE "{RELEASE}"\n')
    node.write(f"/usr/src/linux-headers-{RELEASE}/include/linux/kconfig.h")
    node.link(f"{KDIR}/build", f"/usr/src/linux-headers-{RELEASE}")

    result = check_kernel_headers(node.root)

    assert result.status is Status.OK
    assert f"headers for {RELEASE}" in result.detail
    assert "fallback" not in result.detail


def test_split_headers_without_source_link_fail(node: FakeNode) -> None:
    # bcc looks for include/linux/kconfig.h, which Debian keeps in -common: build alone is not enough.
    build, common = node.debian_headers()
    node.link(f"{KDIR}/build", build)

    result = check_kernel_headers(node.root)

    assert result.status is Status.FAIL
    assert "kconfig.h is missing" in result.detail
    assert f"ln -sfn {common} {KDIR}/source" in result.remedy


def test_dangling_header_link_names_the_missing_mount(node: FakeNode) -> None:
    # What a container sees when /lib/modules is mounted from the host but /usr/src is not.
    node.link(f"{KDIR}/build", "/usr/src/linux-headers-6.1.0-56-amd64")
    node.link(f"{KDIR}/source", "/usr/src/linux-headers-6.1.0-56-common")

    result = check_kernel_headers(node.root)

    assert result.status is Status.FAIL
    assert f"{KDIR}/build -> /usr/src/linux-headers-6.1.0-56-amd64 points at nothing" in result.detail
    assert "/usr/src" in result.remedy and "hostPath" in result.remedy


def test_kheaders_are_enough(node: FakeNode) -> None:
    node.write("/sys/kernel/kheaders.tar.xz", "xz")

    result = check_kernel_headers(node.root)

    assert result.status is Status.OK
    assert "/sys/kernel/kheaders.tar.xz" in result.detail


def test_no_headers_at_all_fail_with_apt_get(node: FakeNode) -> None:
    node.kernel_config(CONFIG_IKHEADERS="m")

    result = check_kernel_headers(node.root)

    assert result.status is Status.FAIL
    assert "apt-get install linux-headers-$(uname -r)" in result.remedy
    assert "modprobe kheaders" in result.remedy


# --- kernel, BTF, kprobes ----------------------------------------------------------------


def test_kernel_version_gate(tmp_path: Path) -> None:
    assert check_kernel(FakeNode(tmp_path / "a").root).status is Status.OK
    old = check_kernel(FakeNode(tmp_path / "b", release="5.4.0-150-generic").root)
    assert old.status is Status.FAIL
    assert "older than 5.8" in old.detail
    assert check_kernel(FakeNode(tmp_path / "c", release="5.8.0").root).status is Status.OK


def test_btf_missing_fails_when_a_component_requires_it(node: FakeNode) -> None:
    node.kernel_config(CONFIG_DEBUG_INFO_BTF="n")
    result = check_btf(node.root, BTF_NEEDED)
    assert result.status is Status.FAIL  # the receiver's kernel events do not start without it
    assert "CONFIG_DEBUG_INFO_BTF" in result.detail
    optional = check_btf(node.root, [Btf("drop attribution", required=False)])
    assert optional.status is Status.WARN and "drop attribution is lost" in optional.detail

    node.write("/sys/kernel/btf/vmlinux", "\0" * 4096)
    assert check_btf(node.root, BTF_NEEDED).status is Status.OK


def test_kprobes_are_information_only(node: FakeNode) -> None:
    node.kernel_config(CONFIG_KPROBES="n")
    off = check_kprobes(node.root)
    assert off.status is Status.OK
    assert "not available" in off.detail and "does not need kprobes" in off.detail

    node.write("/sys/kernel/tracing/kprobe_events")
    on = check_kprobes(node.root)
    assert on.status is Status.OK
    assert on.detail.startswith("available")


# --- tracefs and tracepoints -------------------------------------------------------------


def test_tracefs_missing_fails_with_mount_command(node: FakeNode) -> None:
    result = check_tracefs(node.root)

    assert result.status is Status.FAIL
    assert "mount -t tracefs tracefs /sys/kernel/tracing" in result.remedy
    assert "hostPath" in result.remedy
    assert [r.status for r in check_tracepoints(node.root, TRACEPOINTS)] == [Status.FAIL]


def test_tracefs_under_debugfs_counts(node: FakeNode) -> None:
    node.tracefs(base="/sys/kernel/debug/tracing")
    result = check_tracefs(node.root)
    assert result.status is Status.OK
    assert "/sys/kernel/debug/tracing" in result.detail


def test_every_tracepoint_present_is_ok(node: FakeNode) -> None:
    node.tracefs()
    results = check_tracepoints(node.root, TRACEPOINTS)
    assert [r.name for r in results] == [tp.name for tp in TRACEPOINTS]
    assert all(r.status is Status.OK for r in results)


def test_missing_tracepoint_fails_naming_it_and_its_feature(node: FakeNode) -> None:
    node.tracefs(skip=("tcp:tcp_retransmit_skb",))

    by_name = {r.name: r for r in check_tracepoints(node.root, TRACEPOINTS)}

    missing = by_name["tcp:tcp_retransmit_skb"]
    assert missing.status is Status.FAIL  # as in the receiver, which does not start without it
    assert "tcp_retransmit_skb" in missing.detail and "retransmission" in missing.detail
    assert all(r.status is Status.OK for n, r in by_name.items() if n != "tcp:tcp_retransmit_skb")


def test_kfree_skb_without_reason_fails(node: FakeNode) -> None:
    node.tracefs(kfree_skb_reason=False)
    result = {r.name: r for r in check_tracepoints(node.root, TRACEPOINTS)}["skb:kfree_skb"]
    assert result.status is Status.FAIL  # the receiver requires the field (tracefs require())
    assert "no field reason" in result.detail and "5.17" in result.detail


# --- bpffs --------------------------------------------------------------------------------

MOUNTS = (
    "sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0\n"
    "tracefs /sys/kernel/tracing tracefs rw,relatime 0 0\n"
)


def test_bpffs_not_mounted_fails_with_mount_command(node: FakeNode) -> None:
    node.write("/proc/self/mounts", MOUNTS)

    result = check_bpffs(node.root)

    assert result.status is Status.FAIL
    assert "mount -t bpf bpf /sys/fs/bpf" in result.remedy
    assert "mountPropagation" in result.remedy


def test_bpffs_elsewhere_or_shadowed_is_not_enough(node: FakeNode) -> None:
    node.write("/proc/self/mounts", MOUNTS + "bpf /run/cilium/bpffs bpf rw 0 0\n")
    assert "/run/cilium/bpffs" in check_bpffs(node.root).detail

    node.write("/proc/self/mounts", MOUNTS + "bpf /sys/fs/bpf bpf rw 0 0\n"
               "tmpfs /sys/fs/bpf tmpfs rw 0 0\n")
    shadowed = check_bpffs(node.root)
    assert shadowed.status is Status.FAIL
    assert "tmpfs" in shadowed.detail


def test_bpffs_mounted_is_ok(node: FakeNode) -> None:
    node.write("/proc/self/mounts", MOUNTS + "bpf /sys/fs/bpf bpf rw,nosuid,nodev,noexec 0 0\n")
    assert check_bpffs(node.root).status is Status.OK


# --- capabilities --------------------------------------------------------------------------


def test_capabilities_a_component_declares_are_checked_too(node: FakeNode) -> None:
    netns = [Capabilities(("CAP_SYS_ADMIN",), "entering the netns namespaces")]
    node.write("/proc/sys/kernel/osrelease", RELEASE + "\n")
    node.status("000000c000001000")  # BPF, PERFMON, NET_ADMIN; no SYS_ADMIN
    assert check_capabilities(node.root).status is Status.OK
    result = check_capabilities(node.root, extra=netns)
    assert result.status is Status.FAIL and "CAP_SYS_ADMIN (entering the netns namespaces)" in result.detail
    assert "SYS_ADMIN" in result.remedy
    only = check_capabilities(node.root, bpf=False, extra=netns)  # procfs alone: no BPF needed
    assert only.status is Status.FAIL and only.detail.endswith("missing CAP_SYS_ADMIN (entering the netns namespaces)")
    node.status("0000000000200000")  # SYS_ADMIN only
    assert check_capabilities(node.root, bpf=False, extra=netns).status is Status.OK


def test_executables_are_found_where_debian_puts_them(node: FakeNode) -> None:
    needs = [Executable("nft", "nftables", "the DNS redirect")]
    missing = check_executables(node.root, needs)[0]
    assert missing.status is Status.FAIL and missing.remedy.startswith("apt-get install nftables")
    node.write("/usr/sbin/nft")
    found = check_executables(node.root, needs)[0]
    assert found.status is Status.OK and found.detail.startswith("/usr/sbin/nft")


def test_sys_admin_stands_in_for_bpf_in_declared_capabilities(node: FakeNode) -> None:
    node.write("/proc/sys/kernel/osrelease", RELEASE + "\n")
    node.status("0000000000201400")  # SYS_ADMIN, NET_ADMIN, NET_BIND_SERVICE
    proxy = [Capabilities(("CAP_BPF", "CAP_NET_ADMIN", "CAP_NET_BIND_SERVICE"), "the proxy")]
    assert check_capabilities(node.root, bpf=False, extra=proxy).status is Status.OK
    node.status("0000000000001000")  # NET_ADMIN only
    result = check_capabilities(node.root, bpf=False, extra=proxy)
    assert result.status is Status.FAIL
    assert "CAP_BPF (the proxy)" in result.detail and "CAP_NET_BIND_SERVICE (the proxy)" in result.detail


def test_parse_cap_eff_reads_the_effective_set() -> None:
    text = "CapPrm:\t0000000000000001\nCapEff:\t000001fffeffffff\n"
    mask = parse_cap_eff(text)
    assert mask == 0x1FFFEFFFFFF
    assert mask >> 39 & 1 and mask >> 38 & 1 and mask >> 12 & 1
    assert not mask >> 24 & 1  # CAP_SYS_RESOURCE dropped: this VM's own root set


@pytest.mark.parametrize(
    ("cap_eff", "status", "expected"),
    [
        ("000001ffffffffff", Status.OK, "CAP_BPF, CAP_NET_ADMIN, CAP_NET_BIND_SERVICE, CAP_PERFMON, CAP_SYS_ADMIN, CAP_SYS_RESOURCE"),
        ("000001fffeffffff", Status.OK, "CAP_SYS_RESOURCE not needed on >= 5.11"),
        ("0000000000000000", Status.FAIL, "missing CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN"),
        # Docker's default set: no NET_ADMIN, no BPF, no SYS_ADMIN.
        ("00000000a80425fb", Status.FAIL, "missing CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN"),
        # SYS_ADMIN stands in for BPF and PERFMON.
        ("0000000000201000", Status.OK, "CAP_NET_ADMIN, CAP_SYS_ADMIN"),
        # BPF + PERFMON without NET_ADMIN cannot attach to tc.
        ("000000c000000000", Status.FAIL, "missing CAP_NET_ADMIN"),
    ],
)
def test_capabilities(node: FakeNode, cap_eff: str, status: Status, expected: str) -> None:
    node.status(cap_eff)
    result = check_capabilities(node.root)
    assert result.status is status
    assert expected in result.detail
    assert f"CapEff={cap_eff}" in result.detail
    if status is Status.FAIL:
        assert "securityContext" in result.remedy


def test_sys_resource_matters_only_before_5_11(tmp_path: Path) -> None:
    old = FakeNode(tmp_path / "old", release="5.10.0-30-amd64")
    old.status("000000c000001000")  # BPF, PERFMON, NET_ADMIN
    result = check_capabilities(old.root)
    assert result.status is Status.WARN
    assert "CAP_SYS_RESOURCE" in result.detail

    new = FakeNode(tmp_path / "new")
    new.status("000000c000001000")
    assert check_capabilities(new.root).status is Status.OK


# --- bcc import (real child interpreters, fake modules on PYTHONPATH) ---------------------


def fake_bcc(tmp_path: Path, body: str) -> str:
    package = tmp_path / "fakebcc" / "bcc"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(body)
    return str(package.parent)


def test_pypi_bcc_is_recognised(node: FakeNode, tmp_path: Path) -> None:
    path = fake_bcc(tmp_path, "def unrelated():\n    return 1\n")

    result = check_bcc(node.root, pythonpath=[path])

    assert result.status is Status.FAIL
    assert "no bcc.BPF" in result.detail and "PyPI" in result.detail
    assert "pip uninstall -y bcc" in result.remedy
    assert "apt-get install python3-bpfcc" in result.remedy


def test_bcc_with_bpf_is_ok(node: FakeNode, tmp_path: Path) -> None:
    path = fake_bcc(tmp_path, "__version__ = '9.9'\nclass BPF:\n    pass\n")
    result = check_bcc(node.root, pythonpath=[path])
    assert result.status is Status.OK
    assert "9.9" in result.detail and path in result.detail


def test_broken_libbcc_reports_the_import_error(node: FakeNode, tmp_path: Path) -> None:
    path = fake_bcc(tmp_path, "raise OSError('libbcc.so.0: cannot open shared object file')\n")
    result = check_bcc(node.root, pythonpath=[path])
    assert result.status is Status.FAIL
    assert "libbcc.so.0: cannot open shared object file" in result.detail
    assert "libbpfcc" in result.remedy


def test_bcc_not_installed(node: FakeNode) -> None:
    # -S: no site-packages at all, so `import bcc` genuinely finds nothing.
    result = check_bcc(node.root, python=(sys.executable, "-S"))
    assert result.status is Status.FAIL
    assert "no module named bcc" in result.detail
    assert "apt-get install python3-bpfcc" in result.remedy
    assert "unrelated" in result.remedy


def test_bcc_installed_for_system_python_but_invisible(node: FakeNode) -> None:
    node.write("/usr/lib/python3/dist-packages/bcc/__init__.py")
    result = check_bcc(node.root, python=(sys.executable, "-S"))
    assert result.status is Status.FAIL
    assert "python3-bpfcc is installed" in result.detail
    assert "--system-site-packages" in result.remedy


# --- report and exit code -----------------------------------------------------------------


def test_format_report_layout() -> None:
    results = [
        CheckResult("kernel", Status.OK, "6.18"),
        CheckResult("kernel headers", Status.FAIL, "missing", "mkdir -p /x\nln -sfn /a /x/build"),
        CheckResult("BTF", Status.WARN, "absent", "use a BTF kernel"),
        CheckResult("kprobes", Status.OK, "information", "an OK line shows no fix"),
    ]
    assert format_report(results) == (
        "[ OK ] kernel:         6.18\n"
        "[FAIL] kernel headers: missing\n"
        "       fix: mkdir -p /x\n"
        "            ln -sfn /a /x/build\n"
        "[WARN] BTF:            absent\n"
        "       fix: use a BTF kernel\n"
        "[ OK ] kprobes:        information\n"
        "4 checks: 2 OK, 1 WARN, 1 FAIL: flowtel cannot run on this node until the FAIL lines are fixed"
    )
    assert format_report([CheckResult("a", Status.WARN, "x", "y")]).endswith(
        "1 checks: 0 OK, 1 WARN, 0 FAIL: flowtel can run on this node, with the limits the WARN "
        "lines describe")


def test_main_exits_1_on_any_fail(node: FakeNode, capsys: pytest.CaptureFixture[str]) -> None:
    node.status("000001ffffffffff")
    node.write("/proc/self/mounts", MOUNTS)  # no bpffs: a FAIL

    assert main(root=str(node.base)) == 1

    out = capsys.readouterr().out
    assert "[FAIL] bpffs:" in out
    assert "fix: mount -t bpf bpf /sys/fs/bpf" in out
    assert out.rstrip().splitlines()[-1].endswith("until the FAIL lines are fixed")


def test_a_crashing_check_fails_alone(node: FakeNode) -> None:
    node.mkdir("/proc/self/status")  # reading it raises IsADirectoryError inside the check
    node.write("/proc/self/mounts", MOUNTS + "bpf /sys/fs/bpf bpf rw 0 0\n")
    node.write("/sys/kernel/btf/vmlinux", "btf")

    results = {r.name: r for r in run_checks(root=str(node.base))}

    assert results["capabilities"].status is Status.FAIL
    assert "IsADirectoryError" in results["capabilities"].detail
    assert results["bpffs"].status is Status.OK
    assert results["BTF"].status is Status.OK
    assert {"kernel", "bcc", "kernel headers", "bcc compile", "tracefs", "kprobes"} <= set(results)


# --- Kubernetes ---------------------------------------------------------------------------

VERSION = {
    "major": "1", "minor": "30", "gitVersion": "v1.30.2", "gitCommit": "abc",
    "gitTreeState": "clean", "buildDate": "2024-06-11T20:20:00Z", "goVersion": "go1.22.4",
    "compiler": "gc", "platform": "linux/amd64",
}
PODS = {"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": "1"}, "items": []}


class ApiServer:
    """A tiny API server: fixed answers per path, and a record of what was asked."""

    def __init__(self) -> None:
        self.answers: dict[str, tuple[int, dict[str, object]]] = {
            "/version": (200, VERSION), "/api/v1/pods": (200, PODS),
        }
        self.requests: list[tuple[str, str | None]] = []
        api = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?")[0].rstrip("/")
                api.requests.append((self.path, self.headers.get("Authorization")))
                status, body = api.answers.get(path, (404, {"kind": "Status", "message": "not found"}))
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def forbid_pods(self) -> None:
        self.answers["/api/v1/pods"] = (403, {
            "kind": "Status", "status": "Failure", "reason": "Forbidden", "code": 403,
            "message": 'pods is forbidden: User "flowtel" cannot list resource "pods"',
        })


@pytest.fixture
def api_server() -> Iterator[ApiServer]:
    pytest.importorskip("kubernetes", reason="the official kubernetes client is not installed")
    server = ApiServer()
    server.thread.start()
    try:
        yield server
    finally:
        server.server.shutdown()
        server.server.server_close()


def write_kubeconfig(path: Path, server: str, token: str = "secret-token") -> str:
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "test", "cluster": {"server": server}}],
        "users": [{"name": "flowtel", "user": {"token": token}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "flowtel"}}],
    }))
    return str(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_kubeconfig_missing_names_the_path(node: FakeNode, tmp_path: Path) -> None:
    pytest.importorskip("kubernetes", reason="the official kubernetes client is not installed")
    missing = str(tmp_path / "nowhere" / "kubeconfig")

    result = check_kubernetes(KubeSettings("kubeConfig", missing), node.root)

    assert result.status is Status.FAIL
    assert missing in result.detail and "does not exist" in result.detail


def test_kubeconfig_without_context_is_unusable(node: FakeNode, tmp_path: Path) -> None:
    pytest.importorskip("kubernetes", reason="the official kubernetes client is not installed")
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps({"apiVersion": "v1", "kind": "Config", "clusters": []}))

    result = check_kubernetes(KubeSettings("kubeConfig", str(kubeconfig)), node.root)

    assert result.status is Status.FAIL
    assert f"kubeconfig {kubeconfig} is unusable" in result.detail
    assert "current-context" in result.remedy


def test_kubeconfig_server_refusing_connections(node: FakeNode, tmp_path: Path) -> None:
    pytest.importorskip("kubernetes", reason="the official kubernetes client is not installed")
    port = free_port()
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", f"http://127.0.0.1:{port}")

    result = check_kubernetes(KubeSettings("kubeConfig", kubeconfig), node.root)

    assert result.status is Status.FAIL
    assert "connection refused" in result.detail
    assert f"127.0.0.1:{port}" in result.detail


def test_reachable_api_server_is_ok(node: FakeNode, tmp_path: Path, api_server: ApiServer) -> None:
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", api_server.url)

    result = check_kubernetes(KubeSettings("kubeConfig", kubeconfig), node.root)

    assert result.status is Status.OK, result
    assert "v1.30.2" in result.detail
    assert [path.split("?")[0].rstrip("/") for path, _ in api_server.requests] == ["/version", "/api/v1/pods"]
    assert all(auth == "Bearer secret-token" for _, auth in api_server.requests)


def test_kubeconfig_from_environment(
    node: FakeNode, tmp_path: Path, api_server: ApiServer, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KUBECONFIG", write_kubeconfig(tmp_path / "kubeconfig", api_server.url))
    result = check_kubernetes(KubeSettings("kubeConfig"), node.root)
    assert result.status is Status.OK, result


def test_forbidden_pods_give_an_rbac_remedy(
    node: FakeNode, tmp_path: Path, api_server: ApiServer,
) -> None:
    api_server.forbid_pods()
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", api_server.url)

    result = check_kubernetes(KubeSettings("kubeConfig", kubeconfig), node.root)

    assert result.status is Status.FAIL
    assert "403" in result.detail and "cannot list resource" in result.detail
    assert "ClusterRole" in result.remedy and "deploy/base/rbac.yaml" in result.remedy
    assert "kubectl auth can-i list pods" in result.remedy


def test_rejected_credentials(node: FakeNode, tmp_path: Path, api_server: ApiServer) -> None:
    api_server.answers["/version"] = (401, {"kind": "Status", "code": 401, "message": "Unauthorized"})
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", api_server.url)

    result = check_kubernetes(KubeSettings("kubeConfig", kubeconfig), node.root)

    assert result.status is Status.FAIL
    assert "401 Unauthorized" in result.detail


def test_service_account_without_token(node: FakeNode, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("kubernetes", reason="the official kubernetes client is not installed")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")

    result = check_kubernetes(KubeSettings("serviceAccount"), node.root)

    assert result.status is Status.FAIL
    assert "/var/run/secrets/kubernetes.io/serviceaccount/token does not exist" in result.detail
    assert "automountServiceAccountToken" in result.remedy


def test_service_account_outside_a_pod(node: FakeNode, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("kubernetes", reason="the official kubernetes client is not installed")
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    result = check_kubernetes(KubeSettings("serviceAccount"), node.root)
    assert result.status is Status.FAIL
    assert "KUBERNETES_SERVICE_HOST" in result.detail


def test_kubernetes_client_not_installed(node: FakeNode, monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry in sys.modules makes `import kubernetes` raise ImportError, as if absent.
    monkeypatch.setitem(sys.modules, "kubernetes", None)
    result = check_kubernetes(KubeSettings("kubeConfig"), node.root)
    assert result.status is Status.FAIL
    assert "not installed" in result.detail
    assert "pip install kubernetes" in result.remedy
