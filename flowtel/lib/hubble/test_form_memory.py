"""The JSON text a record keeps (its wire form, shared by every line-writing consumer) is sized
to the text: orjson's own result keeps its 4-8 KB write buffer, which every record waiting in a
queue, and every flow in the Hubble ring, would hold for as long as it lives."""
from __future__ import annotations

import tracemalloc

from flowtel.lib.hubble import convert
from tests.flowsamples import sample_flows


def test_cached_flow_text_is_right_sized() -> None:
    flows = [f for _ in range(50) for f in sample_flows().values()]  # fresh records: nothing cached yet
    for f in sample_flows().values():  # the shapes' templates and endpoint texts: cached once, not per record
        convert.flow_text_bytes(f)
    for f in flows:
        convert.wire_form(f)  # the form object itself is not what is measured
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        texts = [convert.flow_text_bytes(f) for f in flows]
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    text = sum(len(t) for t in texts)
    # A bytes object's header is 33 bytes; the allocator rounds a little. orjson's buffer
    # alone would be ≥ 4096 bytes a flow.
    assert kept < text + 100 * len(texts), (kept / len(texts), text / len(texts))
    assert [t.decode() for t in texts] == [convert.flow_text(f) for f in flows]
