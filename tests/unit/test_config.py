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
    cfg = load_config(Path(__file__).resolve().parents[2] / "config" / "flowtel.yaml", environ={}, factories=factories_by_kind())
    assert "ebpf" in cfg.components[Kind.RECEIVER]
    assert cfg.pipelines["logs"].exporters == ("file", "hubblemetrics")
    assert cfg.pipelines["metrics"].receivers == ("ebpf", "procfs", "hubblemetrics")
    assert cfg.pipelines["metrics"].exporters == ("prometheus",)
