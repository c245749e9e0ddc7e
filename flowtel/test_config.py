"""Config loading: every error class names the file, the key path and the expectation."""
from __future__ import annotations

from pathlib import Path

import pytest

from flowtel.component import Kind
from flowtel.config import ConfigError, load_config
from flowtel.registry import factories_by_kind

GOOD = """
receivers:
  ebpf:
    interfaces: ["veth*", "eth0"]
    collection_interval: 5s
exporters:
  console: {}
  file/flows:
    path: ${env:FLOWTEL_TEST_DIR}/flows.log
    max_size_mb: ${env:FLOWTEL_TEST_SIZE:-7}
service:
  pipelines:
    logs:
      receivers: [ebpf]
      exporters: [console, file/flows]
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "flowtel.yaml"
    p.write_text(text)
    return p


def load_error(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> ConfigError:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, environ=environ or {}, factories=factories_by_kind())
    err = info.value
    assert str(path) in str(err), "the message must name the file"
    return err


def test_good_config_is_typed_and_env_expanded(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD), environ={"FLOWTEL_TEST_DIR": "/tmp/x"}, factories=factories_by_kind())
    ebpf = cfg.component(Kind.RECEIVER, "ebpf")
    assert ebpf.interfaces == ["veth*", "eth0"]
    assert ebpf.collection_interval == 5.0
    f = cfg.component(Kind.EXPORTER, "file/flows")
    assert f.path == "/tmp/x/flows.log"
    assert f.max_size_mb == 7  # default of ${env:…:-7} takes the YAML type of the value
    logs = cfg.pipelines["logs"]
    assert logs.receivers == ("ebpf",) and logs.exporters == ("console", "file/flows")


def test_env_var_overrides_default_and_is_typed(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD), environ={"FLOWTEL_TEST_DIR": "/d", "FLOWTEL_TEST_SIZE": "3"}, factories=factories_by_kind())
    assert cfg.component(Kind.EXPORTER, "file/flows").max_size_mb == 3


def test_missing_env_var_names_key_path(tmp_path: Path) -> None:
    err = load_error(tmp_path, GOOD)
    assert err.path == "exporters.file/flows.path"
    assert "FLOWTEL_TEST_DIR" in err.message


def test_dollar_escape(tmp_path: Path) -> None:
    text = GOOD.replace("${env:FLOWTEL_TEST_DIR}/flows.log", "/tmp/$$HOME/flows.log")
    cfg = load_config(write(tmp_path, text), environ={}, factories=factories_by_kind())
    assert cfg.component(Kind.EXPORTER, "file/flows").path == "/tmp/$HOME/flows.log"


def test_unknown_component_type(tmp_path: Path) -> None:
    err = load_error(tmp_path, GOOD.replace("  console: {}", "  kafka: {}"), {"FLOWTEL_TEST_DIR": "/d"})
    assert err.path == "exporters.kafka"
    assert "unknown exporter type 'kafka'" in err.message and "console" in err.message


def test_wrong_type_names_nested_key(tmp_path: Path) -> None:
    err = load_error(tmp_path, GOOD.replace('interfaces: ["veth*", "eth0"]', "interfaces: veth*"), {"FLOWTEL_TEST_DIR": "/d"})
    assert err.path == "receivers.ebpf.interfaces"
    assert "list" in err.message


def test_wrong_type_in_list_item(tmp_path: Path) -> None:
    err = load_error(tmp_path, GOOD.replace('interfaces: ["veth*", "eth0"]', 'interfaces: ["veth*", 7]'), {"FLOWTEL_TEST_DIR": "/d"})
    assert err.path == "receivers.ebpf.interfaces[1]"
    assert "string" in err.message


def test_bad_duration(tmp_path: Path) -> None:
    err = load_error(tmp_path, GOOD.replace("collection_interval: 5s", "collection_interval: soon"), {"FLOWTEL_TEST_DIR": "/d"})
    assert err.path == "receivers.ebpf.collection_interval"
    assert "duration" in err.message


def test_unknown_key_in_component(tmp_path: Path) -> None:
    err = load_error(tmp_path, GOOD.replace("    collection_interval: 5s", "    colection_interval: 5s"), {"FLOWTEL_TEST_DIR": "/d"})
    assert err.path == "receivers.ebpf.colection_interval"
    assert err.message == "unknown key"


def test_pipeline_names_undefined_component(tmp_path: Path) -> None:
    err = load_error(tmp_path, GOOD.replace("exporters: [console, file/flows]", "exporters: [console, otlp]"), {"FLOWTEL_TEST_DIR": "/d"})
    assert err.path == "service.pipelines.logs.exporters[1]"
    assert "'otlp' is not defined" in err.message


def test_pipeline_bad_id_and_missing_receivers(tmp_path: Path) -> None:
    err = load_error(tmp_path, GOOD.replace("    logs:\n", "    traces:\n"), {"FLOWTEL_TEST_DIR": "/d"})
    assert err.path == "service.pipelines.traces"
    err = load_error(tmp_path, GOOD.replace("      receivers: [ebpf]\n", ""), {"FLOWTEL_TEST_DIR": "/d"})
    assert err.path == "service.pipelines.logs.receivers"
    assert "at least one" in err.message


def test_component_in_wrong_signal(tmp_path: Path) -> None:
    # The console and file exporters write flow logs; they cannot take a metrics pipeline.
    err = load_error(tmp_path, GOOD.replace("    logs:\n", "    metrics:\n"), {"FLOWTEL_TEST_DIR": "/d"})
    assert err.path == "service.pipelines.metrics.exporters[0]"
    assert "'console' does not support metrics" in err.message


def test_missing_service_and_unknown_top_level(tmp_path: Path) -> None:
    err = load_error(tmp_path, "receivers:\n  ebpf: {}\n")
    assert err.path == "service"
    err = load_error(tmp_path, GOOD + "recievers: {}\n", {"FLOWTEL_TEST_DIR": "/d"})
    assert err.path == "recievers"


def test_invalid_yaml_reports_line(tmp_path: Path) -> None:
    err = load_error(tmp_path, "receivers:\n  ebpf: [\n")
    assert "line" in err.message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.yaml", factories=factories_by_kind())
    assert "nope.yaml" in str(info.value) and "cannot read" in str(info.value)


def test_bad_component_id(tmp_path: Path) -> None:
    err = load_error(tmp_path, GOOD.replace("  console: {}", "  Console!: {}"), {"FLOWTEL_TEST_DIR": "/d"})
    assert err.path == "exporters.Console!"


def test_bundled_default_config_is_valid() -> None:
    cfg = load_config(Path(__file__).resolve().parents[1] / "config" / "flowtel.yaml", environ={}, factories=factories_by_kind())
    assert "ebpf" in cfg.components[Kind.RECEIVER]
    assert cfg.pipelines["logs"].exporters == ("file", "hubblemetrics")
    assert cfg.pipelines["metrics"].receivers == ("ebpf", "procfs", "hubblemetrics")
    assert cfg.pipelines["metrics"].exporters == ("prometheus",)


# --- hostile YAML ---------------------------------------------------------------------------


def _laughs(levels: int, width: int = 9) -> str:
    lines = ["a: &a [" + ",".join(['"lol"'] * width) + "]"]
    names = "abcdefghijklmnop"
    for prev, name in zip(names, names[1:levels]):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * width) + "]")
    return "\n".join(lines) + "\n"


def test_an_alias_bomb_is_a_config_error_before_it_expands(tmp_path: Path) -> None:
    import time

    text = _laughs(9)
    assert len(text.encode()) < 700  # the size of the 609-byte bomb: 9^9 nodes expanded
    started = time.monotonic()
    err = load_error(tmp_path, text)
    assert time.monotonic() - started < 5
    assert "excessive aliasing" in err.message and err.source.endswith("flowtel.yaml")


def test_aliasing_within_yaml_v3s_ratio_is_accepted_and_beyond_it_refused(tmp_path: Path) -> None:
    from flowtel.config import _check_aliases, allowed_alias_ratio
    import yaml

    assert allowed_alias_ratio(1000) == 0.99 and allowed_alias_ratio(4_000_000) == 0.10
    assert abs(allowed_alias_ratio(2_200_000) - 0.545) < 1e-9
    # 3 levels of 9: 729 leaves, under yaml.v3's 1000-node floor: fine.
    _check_aliases(yaml.compose(_laughs(3)), "x.yaml")
    # 5 levels: 74,738 nodes (root, keys, 10 + 91 + 820 + 7381 + 66430), all but 20 of them through aliases: refused, as yaml.v3 refuses it.
    with pytest.raises(ConfigError, match="excessive aliasing: the document expands to 74,738 nodes, 100% of them through aliases"):
        _check_aliases(yaml.compose(_laughs(5)), "x.yaml")


def test_ordinary_anchors_and_merge_keys_still_work(tmp_path: Path) -> None:
    path = write(tmp_path, """
receivers:
  procfs: &common {collection_interval: 5s}
exporters:
  prometheus: {endpoint: "127.0.0.1:0"}
service:
  pipelines:
    metrics: &p {receivers: [procfs], exporters: [prometheus]}
    metrics/2: {<<: *p}
""")
    cfg = load_config(path, environ={}, factories=factories_by_kind())
    assert set(cfg.pipelines) == {"metrics", "metrics/2"}


@pytest.mark.parametrize("text", [
    "a: &a [*a]\n",
    "receivers: &r\n  ebpf: *r\nservice: {}\n",
    "x: &x {y: {z: [1, *x]}}\n",
])
def test_a_recursive_alias_is_a_config_error_naming_the_file(tmp_path: Path, text: str) -> None:
    err = load_error(tmp_path, text)
    assert "recursive alias at line" in err.message and "refers to itself" in err.message
    assert str(err).startswith(f"config error in {tmp_path / 'flowtel.yaml'}")


def test_deep_nesting_and_huge_files_are_config_errors(tmp_path: Path) -> None:
    assert "nested too deeply" in load_error(tmp_path, "a: " + "[" * 50_000 + "]" * 50_000 + "\n").message
    big = tmp_path / "big.yaml"
    big.write_bytes(b"# " + b"x" * (5 * 1024 * 1024) + b"\n")
    with pytest.raises(ConfigError, match="larger than 4 MiB"):
        load_config(big, environ={}, factories=factories_by_kind())
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"a: \xe9\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(bad, environ={}, factories=factories_by_kind())


def test_flowtel_run_with_an_alias_bomb_or_a_recursive_alias_exits_with_a_config_error(tmp_path: Path) -> None:
    import subprocess
    import sys
    import time

    repo = Path(__file__).resolve().parents[1]
    levels = ["a: &a [" + ",".join(['"lol"'] * 9) + "]"]
    for prev, name in zip("abcdefgh", "bcdefghi"):
        levels.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(levels) + "\n")
    assert bomb.stat().st_size < 700  # the 609-byte class: 9^9 nodes when expanded
    recursive = tmp_path / "recursive.yaml"
    recursive.write_text("receivers: &r\n  ebpf: *r\nservice: {}\n")
    for path, message in ((bomb, "excessive aliasing"), (recursive, "recursive alias")):
        started = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "flowtel.cli", "run", "--config", str(path)], cwd=repo,
                              capture_output=True, text=True, timeout=60)
        assert time.monotonic() - started < 30
        assert proc.returncode != 0
        assert f"config error in {path}" in proc.stderr and message in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr and "RecursionError" not in proc.stderr
