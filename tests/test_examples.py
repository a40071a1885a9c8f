"""examples/seq2seq_attention.py: it runs, and its alignment has the structure the task demands.

The example is not a package module, so it is imported by path.
"""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "seq2seq_attention.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("seq2seq_attention", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules while the class is being created.
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def translated(example):
    return example.translate(example.SENTENCES)


def test_main_prints_the_reversed_sentences(example, capsys):
    assert example.main([]) == 0
    out = capsys.readouterr().out
    for sentence in example.SENTENCES:
        assert f"output: {' '.join(reversed(sentence.split()))} <eos>" in out


def test_greedy_output_is_the_reversed_source(example, translated):
    decoded, _ = translated
    for sentence, output in zip(example.SENTENCES, decoded.outputs):
        assert output == list(reversed(sentence.split())) + [example.EOS]


def test_each_step_attends_to_the_mirrored_source_word(translated):
    decoded, lengths = translated
    for alignment, n in zip(decoded.alignments, lengths):
        words = alignment[:n]  # the <eos> step follows; it has no word to point at
        assert words.shape == (n, n)
        np.testing.assert_array_equal(words.argmax(axis=1), np.arange(n)[::-1])
        # Soft but decisive: the score gap of ~3.8 leaves the right word most of the weight.
        assert words.max(axis=1).min() > 0.8


def test_eos_step_spreads_its_weight_evenly(translated):
    decoded, lengths = translated
    for alignment, n in zip(decoded.alignments, lengths):
        np.testing.assert_allclose(alignment[n], np.full(n, 1.0 / n), rtol=1e-5)


def test_weights_are_distributions_that_ignore_the_padding(translated):
    decoded, lengths = translated
    weights = decoded.weights  # (B, steps, L) over the padded source
    np.testing.assert_allclose(weights.sum(axis=-1), 1.0, rtol=1e-5)
    assert (weights >= 0).all()
    assert (lengths < weights.shape[-1]).any(), "the batch should contain padded sentences"
    for b, n in enumerate(lengths):
        np.testing.assert_array_equal(weights[b, :, n:], 0.0)


def test_score_gap_matches_the_attention_scores(example):
    """The closed form in the docstring is what attnfast computes for a matching vs. another word."""
    import attnfast

    vocab = example.build_vocab(example.SENTENCES)
    ids, lengths = example.encode_batch(example.SENTENCES, vocab)
    model = example.build_model(len(vocab), ids.shape[1])
    states, final = example.encode(model, ids, lengths)
    query = np.zeros((1, 1, model.state_size), np.float32)
    query[..., model.vocab_size:] = final[:1, model.vocab_size:]  # points at the last word of sentence 0
    s = attnfast.scores(query, states[:1, :lengths[0]], method="additive", w_q=model.w_q, w_k=model.w_k,
                        v_a=model.v_a, score_bias=model.score_bias)[0, 0]
    assert s.argmax() == lengths[0] - 1
    assert s[-1] - s[0] == pytest.approx(example.score_gap(model.slots), rel=1e-4)


def test_plot_writes_a_png(example, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "alignment.png"
    assert example.main(["--plot", str(path)]) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(path) in capsys.readouterr().out
