"""``python -m attnfast demo``: the printed walk-through is right, not just printed."""

import re
import sys

import numpy as np
import pytest

from attnfast import demo

# "  杰瑞 (Jierui):  Jerry 0.475  Tom 0.312  chase 0.213" (pinyin-only when the terminal lacks CJK)
RANKED = re.compile(r"^\s+(?:\S+ \()?(Tangmu|zhuizhu|Jierui)\)?:\s+((?:(?:Tom|chase|Jerry) [0-9.]+\s*){3})$")


def ranked_weights(text):
    rows = {}
    for line in text.splitlines():
        m = RANKED.match(line)
        if m:
            pairs = m.group(2).split()
            rows[m.group(1)] = [(word, float(x)) for word, x in zip(pairs[::2], pairs[1::2])]
    return rows


@pytest.fixture
def output(capsys):
    assert demo.main([]) == 0
    return capsys.readouterr().out


def test_printed_weights_sum_to_one_and_are_sorted(output):
    rows = ranked_weights(output)
    assert set(rows) == {"Tangmu", "zhuizhu", "Jierui"}
    for pairs in rows.values():
        assert {w for w, _ in pairs} == {"Tom", "chase", "Jerry"}
        weights = [x for _, x in pairs]
        assert sum(weights) == pytest.approx(1.0, abs=2e-3)  # three values rounded to 3 decimals
        assert weights == sorted(weights, reverse=True)


def test_each_target_word_attends_most_to_its_source_word(output):
    rows = ranked_weights(output)
    assert rows["Jierui"][0][0] == "Jerry"
    assert rows["Tangmu"][0][0] == "Tom"
    assert rows["zhuizhu"][0][0] == "chase"
    # Attention is soft: Jerry dominates for 杰瑞 but Tom still gets a share.
    jerry = dict(rows["Jierui"])
    assert 0.4 < jerry["Jerry"] < 0.6 and jerry["Tom"] > jerry["chase"] > 0.1


def test_fused_attention_matches_the_three_stages(output):
    m = re.search(r"max \|difference\| = ([0-9.e+-]+)", output)
    assert m and float(m.group(1)) < 1e-12


def test_demo_numbers_match_the_reference(output):
    from attnfast import reference as ref

    s, h = demo.embeddings()
    weights = ref.softmax(ref.scores(s, h))
    rows = ranked_weights(output)
    for name, row in zip(demo.PINYIN, weights):
        printed = dict(rows[name])
        np.testing.assert_allclose([printed[w] for w in demo.SOURCE], row, atol=5e-4)


def test_pinyin_labels_when_the_terminal_cannot_print_cjk(monkeypatch, capsys):
    monkeypatch.setattr(demo, "_can_print", lambda text: False)
    demo.main([])
    out = capsys.readouterr().out
    assert "杰瑞" not in out and "Jierui:" in out
    assert len(ranked_weights(out)) == 3


def test_display_width_counts_cjk_as_two_columns():
    assert demo._width("杰瑞 (Jierui)") == 13
    assert demo._width(demo._pad("汤姆", 6)) == 6


def test_plot_writes_a_png(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="--plot is optional and needs matplotlib")
    path = tmp_path / "weights.png"
    assert demo.main(["--plot", str(path)]) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(path) in capsys.readouterr().out


def test_plot_without_matplotlib_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    with pytest.raises(SystemExit, match="pip install matplotlib"):
        demo.main(["--plot", str(tmp_path / "x.png")])
    assert not (tmp_path / "x.png").exists()
