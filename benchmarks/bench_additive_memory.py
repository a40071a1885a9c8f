"""Issue 5's memory claim as a test: fused additive attention on the seq2seq training batch grows the peak
RSS by less than a quarter of the (B, Lq, Lk, A) float32 tensor that broadcasting code builds (131 MB).

The measurement itself is in ``additive_memory.py`` (also runnable as a script).
"""

import pytest

from attnfast.bench.memory import reset_peak_rss

import additive_memory


@pytest.mark.skipif(not reset_peak_rss(), reason="needs Linux /proc/self/clear_refs to reset the peak RSS")
def test_fused_additive_attention_stays_under_a_quarter_of_the_temporary(record_property):
    result = additive_memory.measure()
    grew = result["growth"]["attnfast"]
    assert grew is not None, "peak RSS could not be measured"
    temp = result["temporary_bytes"]
    record_property("attnfast_peak_rss_growth_mb", grew / 1e6)
    record_property("temporary_mb", temp / 1e6)
    print("\n" + additive_memory.report(result))
    assert grew < additive_memory.LIMIT_FRACTION * temp
