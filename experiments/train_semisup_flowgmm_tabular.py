"""Semi-supervised FlowGMM on feature vectors: UCI tables, sentence embeddings of text, any (features, labels) file.

A RealNVPTabular flow with a Gaussian-mixture prior (one component per class), trained with AdamW and a cosine
learning-rate schedule on all labeled points + a batch of unlabeled points per step:
    loss = label_weight * mean NLL(labeled) + unlabeled_weight * mean NLL(unlabeled)
(:func:`flowgmm_fast.training.semisup_loss`). The loop, TensorBoard logging, the non-finite guard, atomic
checkpoints and exact resume are the shared :class:`flowgmm_fast.training.Trainer`. An epoch is one pass over the
unlabeled points.

Data (--dataset):
  miniboone, hepmass        the UCI files in --data-root (flowgmm_fast.data.tabular, MAF preprocessing)
  ag_news, yahoo_answers    --features: an .npz of embeddings written by experiments/embed_text.py (x, y, x_test,
                            y_test); or --data-root with the standard train.csv / test.csv, embedded (and cached)
                            offline with the default sentence-transformers model
  digits, breast_cancer     scikit-learn's bundled sets
  custom                    --features FILE.npz|FILE.csv (--label-column; a test set from the npz's x_test/y_test
                            or a stratified --test-fraction split)
Features are standardised with the training mean / std. Labels: --split FILE (labeled indices into the training
set, .npz with labeled_idx or one index per line), --num-labeled N balanced over the classes, or --labels-per-class
N (up to N per class: a small class gives all of its rows), drawn with --seed. A custom table's default run folder is
named after its features file (runs/tabular_custom-<file stem>-<path hash>_s<seed>), so two tables never share one.

Presets (REFERENCE.md; every value can be overridden by its flag):
  dataset        labels  unlabeled weight  epochs  lr     flow
  ag_news        200     0.6               100     3e-4   7 couplings, hidden 1024
  yahoo_answers  800     0.2               200     3e-4   7 couplings, hidden 1024
  miniboone      20      3                 300     3e-4   10 couplings, hidden 256
  hepmass        20      10                15      1e-3   10 couplings, hidden 256
  digits         100     1                 300     1e-3   4 couplings, hidden 128, means from the labels
  breast_cancer  20      1                 300     1e-3   4 couplings, hidden 128, means from the labels
  custom         --      1                 100     3e-4   10 couplings, hidden 256, means from the labels
The reference means (more than 2 classes: N(0, 0.56^2 I)) are about 0.8 sqrt(D) apart against sigma = 1.31: fine for
768-d text embeddings, overlapping in a few dimensions, hence --means-init labeled (the labeled class means in latent
space, spread to >= 4 sigma apart) for the sklearn sets and custom data.

    python experiments/train_semisup_flowgmm_tabular.py --dataset miniboone --data-root data/miniboone
    python experiments/train_semisup_flowgmm_tabular.py --dataset custom --features feats.npz --split lab.txt
    python experiments/train_semisup_flowgmm_tabular.py --dataset digits --resume     # continue runs/<name>
    python experiments/train_semisup_flowgmm_tabular.py --dataset custom --features feats.npz --predict new.csv
        # classify new rows with that run's model and standardisation (both in its last.pt) -> predictions.csv

--resume (flowgmm_fast.training.resume): flags not given take the checkpoint's values; RESUME_MUTABLE flags may be
changed (applied -- a new --lr to the restored optimizer and schedule -- and logged); RESUME_ENVIRONMENT flags always
come from the command line; any other flag given with a value other than the checkpoint's is an error.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

import numpy as np
import torch

from flowgmm_fast.data import tabular as T
from flowgmm_fast.semisup import FitConfig, build_tabular_flowgmm, fit_flowgmm, init_means_from_labeled
from flowgmm_fast.training import (TrainLogger, explicit_dests, load_checkpoint, read_checkpoint,
                                   reconcile_resume_args, seed_everything, set_learning_rate)

PRESETS = {
    "ag_news": dict(num_labeled=200, unlabeled_weight=0.6, epochs=100, lr=3e-4, num_coupling_layers=7,
                    hidden_dim=1024, means_init="reference"),
    "yahoo_answers": dict(num_labeled=800, unlabeled_weight=0.2, epochs=200, lr=3e-4, num_coupling_layers=7,
                          hidden_dim=1024, means_init="reference"),
    "miniboone": dict(num_labeled=20, unlabeled_weight=3.0, epochs=300, lr=3e-4, num_coupling_layers=10,
                      hidden_dim=256, means_init="reference"),
    "hepmass": dict(num_labeled=20, unlabeled_weight=10.0, epochs=15, lr=1e-3, num_coupling_layers=10,
                    hidden_dim=256, means_init="reference"),
    "digits": dict(num_labeled=100, unlabeled_weight=1.0, epochs=300, lr=1e-3, num_coupling_layers=4,
                   hidden_dim=128, means_init="labeled"),
    "breast_cancer": dict(num_labeled=20, unlabeled_weight=1.0, epochs=300, lr=1e-3, num_coupling_layers=4,
                          hidden_dim=128, means_init="labeled"),
    "custom": dict(num_labeled=None, unlabeled_weight=1.0, epochs=100, lr=3e-4, num_coupling_layers=10,
                   hidden_dim=256, means_init="labeled"),
}
COMMON = dict(batch_size=5000, weight_decay=1e-5, dropout=0.5, num_layers=1, label_weight=1.0)
# what --resume may change (the optimisation's hyperparameters, the run's length and rhythm) and what always comes from
# the command line (where and how it runs); every other flag defines the saved state
RESUME_MUTABLE = ("unlabeled_weight", "label_weight", "lr", "epochs", "max_steps", "max_grad_norm", "eval_every",
                  "save_every")
RESUME_ENVIRONMENT = ("data_root", "features", "split", "run_dir", "resume", "device", "threads", "no_progress",
                      "log_every", "stop_at", "invertible_backprop", "invertible_checkpoint_every", "step_in_backward")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, choices=list(PRESETS))
    p.add_argument("--data-root", help="folder with the dataset's standard files (UCI / text CSVs)")
    p.add_argument("--features", help="features file: .npz (x, y[, x_test, y_test]) or .csv")
    p.add_argument("--label-column", default="-1", help="CSV label column: index or header name (default: last)")
    p.add_argument("--test-fraction", type=float, default=None,
                   help="stratified test split of --features when it has no test set")
    p.add_argument("--split", help="labeled-index file (.npz labeled_idx or one index per line)")
    p.add_argument("--num-labeled", type=int, help="labels balanced over the classes (when no --split)")
    p.add_argument("--labels-per-class", type=int,
                   help="up to N labels per class (a class with fewer training rows gives all of them); instead of "
                        "--num-labeled, e.g. on an imbalanced table")
    p.add_argument("--max-train", type=int, help="keep the first N training rows (quick runs)")
    p.add_argument("--seed", type=int, default=0)
    for name in ("unlabeled_weight", "label_weight", "lr", "weight_decay", "dropout", "epochs"):
        p.add_argument("--" + name.replace("_", "-"), type=float)
    for name in ("batch_size", "num_coupling_layers", "hidden_dim", "num_layers"):
        p.add_argument("--" + name.replace("_", "-"), type=int)
    p.add_argument("--means-init", choices=("reference", "labeled"),
                   help="reference: REFERENCE.md's fixed random means; labeled: class means of the labeled latents, "
                        "spread to >= 4 sigma apart")
    p.add_argument("--max-steps", type=int, help="train this many steps (default: epochs x steps per epoch)")
    p.add_argument("--learn-priors", action="store_true",
                   help="EM updates of the class priors from the unlabeled rows at every epoch end (not in the paper)")
    p.add_argument("--patience", type=int, default=None,
                   help="early stopping: epochs without a held-out unlabeled NLL improvement (not in the paper)")
    p.add_argument("--validation-fraction", type=float, default=0.1,
                   help="unlabeled rows held out for --patience (default 0.1)")
    p.add_argument("--stop-at", type=int, help="stop with a checkpoint at this step, the schedule unchanged (continue "
                   "later with --resume)")
    p.add_argument("--invertible-backprop", action="store_true",
                   help="backprop by inversion: training memory independent of the number of couplings "
                        "(flowgmm_fast.nn.invertible)")
    p.add_argument("--invertible-checkpoint-every", type=int, default=None,
                   help="with --invertible-backprop: also keep every N-th coupling's exact input")
    p.add_argument("--max-grad-norm", type=float, default=100.0)
    p.add_argument("--step-in-backward", action="store_true",
                   help="AdamW steps each parameter inside the backward pass and frees its gradient (the same updates; "
                        "a step holds one gradient at a time: with --invertible-backprop the step's memory no longer "
                        "grows with the depth). No gradient clipping: --max-grad-norm cannot be given with it")
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--eval-every", type=int, default=None, help="steps between test evaluations (default: end)")
    p.add_argument("--save-every", type=int, default=None, help="steps between checkpoints (default: end)")
    p.add_argument("--run-dir",
                   help="TensorBoard logs, checkpoint and metrics (default runs/tabular_<dataset>_s<seed>)")
    p.add_argument("--resume", action="store_true", help="continue from <run-dir>/last.pt")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--predict", metavar="FILE",
                   help="no training: classify the rows of FILE (.npz with x, or a CSV of the feature columns, header "
                        "optional) with the model in <run-dir>/last.pt and its stored standardisation; writes "
                        "--predictions")
    p.add_argument("--predictions", metavar="CSV",
                   help="where --predict writes the class and class probabilities (default <run-dir>/predictions.csv)")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    preset = {**COMMON, **PRESETS[args.dataset]}
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    predicting = args.predict is not None
    if args.dataset == "custom" and args.features is None and not (predicting and args.run_dir):
        p.error("--dataset custom needs --features FILE")
    if args.dataset in ("miniboone", "hepmass") and args.data_root is None and not predicting:
        p.error(f"--dataset {args.dataset} needs --data-root with the UCI files")
    if args.dataset in ("ag_news", "yahoo_answers") and args.features is None and args.data_root is None \
            and not predicting:
        p.error(f"--dataset {args.dataset} needs --features (embeddings .npz) or --data-root (train.csv, test.csv)")
    if args.split is not None and args.labels_per_class is not None:
        p.error("give either --split FILE or --labels-per-class N, not both")
    if args.labels_per_class is not None and args.labels_per_class < 1:
        p.error(f"--labels-per-class must be >= 1, got {args.labels_per_class}")
    if args.split is None and args.num_labeled is None and args.labels_per_class is None and not predicting:
        p.error("give --split FILE, --num-labeled N or --labels-per-class N")
    for name in ("lr", "epochs"):
        if not getattr(args, name) > 0:
            p.error(f"--{name} must be > 0")
    if args.invertible_checkpoint_every is not None and args.invertible_checkpoint_every < 1:
        p.error("--invertible-checkpoint-every must be >= 1")
    if args.step_in_backward:  # nothing left to clip once every parameter is stepped inside the backward pass
        if "max_grad_norm" in explicit_dests(p, argv):
            p.error("--step-in-backward steps each parameter before the global gradient norm is known: it cannot "
                    "clip it, drop --max-grad-norm")
        args.max_grad_norm = None
    if args.batch_size < 1 or args.unlabeled_weight < 0 or args.label_weight < 0:
        p.error("--batch-size must be >= 1 and the loss weights >= 0")
    if args.run_dir is None:  # custom data: the features file names the run, so two tables never share a folder
        name = args.dataset
        if args.features is not None:
            path = os.path.abspath(args.features)
            stem = os.path.splitext(os.path.basename(path))[0]
            name += f"-{stem}-{hashlib.sha256(path.encode()).hexdigest()[:8]}"
        args.run_dir = os.path.join("runs", f"tabular_{name}_s{args.seed}")
    return args


def load_data(args) -> T.TabularData:
    if args.dataset == "miniboone":
        return T.load_miniboone(args.data_root)
    if args.dataset == "hepmass":
        return T.load_hepmass(args.data_root)
    if args.dataset in ("digits", "breast_cancer"):
        return T.load_sklearn(args.dataset)
    if args.dataset in ("ag_news", "yahoo_answers") and args.features is None:
        from flowgmm_fast.data.text import embed_cached, load_text_dataset

        arrays = []
        for split in ("train", "test"):
            texts, y = load_text_dataset(args.data_root, args.dataset, split)
            arrays += embed_cached(texts, y, os.path.join(args.data_root, f"embeddings_{split}.npz"),
                                   progress=not args.no_progress)
        return T.TabularData(*arrays, args.dataset).standardized()
    label_column = int(args.label_column) if args.label_column.lstrip("-").isdigit() else args.label_column
    x, y, xt, yt = T.load_features(args.features, label_column)
    if xt is None:
        if args.test_fraction is None:
            raise SystemExit(f"{args.features} has no test set: add x_test/y_test to the npz or pass --test-fraction")
        x, y, xt, yt = T.train_test_split_stratified(x, y, args.test_fraction, seed=0)
    return T.TabularData(x, y, xt, yt, args.dataset).standardized()


def read_rows(path: str) -> np.ndarray:
    """(N, D) float64 feature rows of a .npz (array x / X / features) or a CSV of numbers (header line optional)."""
    if not os.path.exists(path):
        raise SystemExit(f"--predict: {path} not found")
    if path.endswith(".npz"):
        from flowgmm_fast.data._files import open_npz

        with open_npz(path, "--predict file") as f:
            key = next((k for k in ("x", "X", "features") if k in f.files), None)
            if key is None:
                raise SystemExit(f"--predict: {path} holds no array x / X / features (found {sorted(f.files)})")
            x = np.asarray(f[key], np.float64)
    else:
        with open(path) as f:
            first = f.readline()
        try:
            [float(v) for v in first.strip().split(",")]
            skip = 0
        except ValueError:
            skip = 1  # a header line
        x = np.loadtxt(path, delimiter=",", skiprows=skip, ndmin=2, dtype=np.float64)
    if x.ndim != 2 or not np.all(np.isfinite(x)):
        raise SystemExit(f"--predict: {path} must hold a 2-D table of finite numbers, got shape {x.shape}")
    return x


def predict_file(args) -> dict:
    """--predict: the saved run's model and standardisation on new rows; writes the predictions CSV."""
    ckpt_path = os.path.join(args.run_dir, "last.pt")
    saved = read_checkpoint(ckpt_path)["extra"]
    if "scaler_mean" not in saved:
        raise SystemExit(f"--predict: {ckpt_path} does not store the standardisation (written by an older version); "
                         "retrain the run")
    a = argparse.Namespace(**saved["args"])
    mean, std = np.asarray(saved["scaler_mean"]), np.asarray(saved["scaler_std"])
    x = read_rows(args.predict)
    if x.shape[1] != mean.size:
        raise SystemExit(f"--predict: {args.predict} has {x.shape[1]} feature columns; the model was trained on "
                         f"{mean.size}")
    model = build_tabular_flowgmm(mean.size, int(saved["num_classes"]), num_coupling_layers=a.num_coupling_layers,
                                  hidden_dim=a.hidden_dim, num_layers=a.num_layers, dropout=a.dropout)
    load_checkpoint(ckpt_path, model, restore_rng=False)
    model.eval()
    z = torch.from_numpy(((x - mean) / std).astype(np.float32))
    with torch.no_grad():
        proba = torch.cat([model.predict_proba(z[i:i + 10000]) for i in range(0, z.shape[0], 10000)]).numpy()
    out = args.predictions or os.path.join(args.run_dir, "predictions.csv")
    with open(out, "w") as f:
        f.write("class," + ",".join(f"p_{k}" for k in range(proba.shape[1])) + "\n")
        for row in proba:
            f.write(f"{int(row.argmax())}," + ",".join(f"{v:.6g}" for v in row) + "\n")
    result = {"predictions": out, "rows": int(x.shape[0]), "counts": np.bincount(proba.argmax(1),
                                                                                 minlength=proba.shape[1]).tolist()}
    print(json.dumps(result))
    return result


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.predict is not None:
        return predict_file(args)
    changes = {}
    if args.resume:  # the saved arguments, before anything is built from them
        saved = read_checkpoint(os.path.join(args.run_dir, "last.pt"))["extra"].get("args")
        changes = reconcile_resume_args(args, saved, build_parser(), argv, mutable=RESUME_MUTABLE,
                                        environment=RESUME_ENVIRONMENT)
        if args.step_in_backward and args.max_grad_norm is not None:
            raise SystemExit(f"--step-in-backward: the checkpoint's run clips the gradient norm (--max-grad-norm "
                             f"{args.max_grad_norm}), which a step inside the backward pass cannot do; resume it "
                             f"without --step-in-backward")
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    data = load_data(args)
    if args.max_train is not None:
        data = T.TabularData(data.x_train[:args.max_train], data.y_train[:args.max_train], data.x_test, data.y_test,
                             data.name, data.scaler)
    if args.split is not None:
        labeled_idx = T.load_split(args.split, num_train=data.x_train.shape[0])
    elif args.labels_per_class is not None:
        labeled_idx = T.labels_per_class(data.y_train, args.labels_per_class, seed=args.seed)
    else:
        try:
            labeled_idx = T.balanced_labeled_indices(data.y_train, args.num_labeled, seed=args.seed)
        except ValueError as exc:
            raise SystemExit(f"--num-labeled {args.num_labeled}: {exc} (--labels-per-class N takes up to N per "
                             "class instead)") from None
    labels_np = T.semisup_labels(data.y_train, labeled_idx)
    device = torch.device(args.device)
    x = torch.from_numpy(data.x_train).to(device)
    labels = torch.from_numpy(labels_np).to(device)
    x_test, y_test = torch.from_numpy(data.x_test).to(device), torch.from_numpy(data.y_test).to(device)

    model = build_tabular_flowgmm(data.dim, data.num_classes, num_coupling_layers=args.num_coupling_layers,
                                  hidden_dim=args.hidden_dim, num_layers=args.num_layers, dropout=args.dropout,
                                  seed=args.seed, invertible_backprop=args.invertible_backprop,
                                  checkpoint_every=args.invertible_checkpoint_every).to(device)
    if args.means_init == "labeled":
        init_means_from_labeled(model, x, labels)
    # AdamW decays every trainable weight here (the original tabular trainer), not only the weight-norm gains
    config = FitConfig(epochs=None if args.max_steps else args.epochs, steps=args.max_steps, lr=args.lr,
                       batch_size=args.batch_size, unlabeled_weight=args.unlabeled_weight,
                       label_weight=args.label_weight, weight_decay=args.weight_decay, grad_clip=args.max_grad_norm,
                       seed=args.seed, log_every=args.log_every, learn_priors=args.learn_priors,
                       validation_fraction=args.validation_fraction if args.patience else 0.0,
                       patience=args.patience, step_in_backward=args.step_in_backward)
    os.makedirs(args.run_dir, exist_ok=True)

    @torch.no_grad()
    def evaluate(_trainer):
        model.eval()
        pred = torch.cat([model.predict(x_test[i:i + 10000]) for i in range(0, x_test.shape[0], 10000)])
        test_nll = torch.cat([model.nll(x_test[i:i + 10000]) for i in range(0, x_test.shape[0], 10000)])
        return {"test_accuracy": float((pred == y_test).float().mean()), "test_nll": float(test_nll.mean())}

    def check_resume(extra):
        if extra.get("labeled_idx") != labeled_idx.tolist():
            raise SystemExit("--resume: the checkpoint was trained on a different labeled split")

    def on_resume(trainer, _extra):  # the mutable flags changed: the loss weights and lengths reach FitConfig
        if "lr" in changes:  # the restored optimizer and schedule carry the saved lr
            set_learning_rate(trainer.optimizers["flow"], trainer.schedulers["flow"], args.lr)
        if changes:
            trainer.logger.write(f"resume: changed {', '.join(map(str, changes.values()))} (applied from step "
                                 f"{trainer.step})")

    fit = fit_flowgmm(model, x, labels, config, evaluate=evaluate, eval_every=args.eval_every,
                      ckpt_path=os.path.join(args.run_dir, "last.pt"), save_every=args.save_every,
                      logger=TrainLogger(args.run_dir, progress_bar=not args.no_progress), resume=args.resume,
                      extra_state=lambda: {"args": vars(args), "labeled_idx": labeled_idx.tolist(),
                                           "scaler_mean": data.scaler.mean.tolist(),
                                           "scaler_std": data.scaler.std.tolist(), "num_classes": data.num_classes},
                      check_resume=check_resume, on_resume=on_resume, stop_at=args.stop_at)
    metrics = fit.metrics
    result = {"dataset": args.dataset, "seed": args.seed, "labels": int(labeled_idx.size), "steps": fit.steps,
              "epochs": fit.epochs[-1]["epoch"] if fit.epochs else 0.0, "dim": data.dim,
              "classes": data.num_classes, **metrics}
    if args.learn_priors and fit.epochs and "weights" in fit.epochs[-1]:
        result["class_prior"] = fit.epochs[-1]["weights"]
    with open(os.path.join(args.run_dir, "metrics.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
    sys.exit(0)
