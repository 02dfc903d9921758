"""Semi-supervised FlowGMM in under two minutes on a CPU, on data that ships with scikit-learn (no download).

Two problems, each with a handful of labels and the rest of the training set unlabeled:
  two moons       2-D, 1000 training points, 3 labels per class; RealNVPTabular(2, 5 couplings, hidden 128)
  sklearn digits  8x8 images as 64 standardised (dequantised) features, 10 labels per class;
                  RealNVPTabular(64, 4 couplings, hidden 128), component means started at the labeled class means
and three models on the same labels: FlowGMM (labeled + unlabeled), the same FlowGMM trained on the labels only, and
logistic regression on the labels only. Prints a table of test accuracies and writes to --out (default outputs/demo/):
  demo.png     moons: data, labeled points and decision regions; moons latent space with the class components;
               moons class-conditional samples; digits latent space (2-D PCA) with the components; digits
               class-conditional samples (one row per class); test accuracies
  results.md   the printed table (markdown) with the settings and wall time

    python experiments/demo.py                 # full demo (measured: 50-111 s wall on a busy shared 2-core CPU)
    python experiments/demo.py --quick         # a few steps per model: checks the pipeline, not the accuracy
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

from flowgmm_fast.data.tabular import TabularData, balanced_labeled_indices, load_sklearn, semisup_labels
from flowgmm_fast.data.toy import two_moons
from flowgmm_fast.semisup import FitConfig, accuracy, build_tabular_flowgmm, fit_flowgmm, init_means_from_labeled


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="outputs/demo", help="output folder for demo.png and results.md")
    p.add_argument("--quick", action="store_true", help="a few training steps only (pipeline check)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--moons-steps", type=int, default=400)
    p.add_argument("--digits-steps", type=int, default=300)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: these small nets gain little from more, and lose a lot on a busy CPU)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    args = p.parse_args(argv)
    if args.quick:
        args.moons_steps, args.digits_steps = 10, 5
    if args.moons_steps < 1 or args.digits_steps < 1:
        p.error("--moons-steps and --digits-steps must be >= 1")
    return args


def logistic_regression_accuracy(x, y, labels, x_test, y_test) -> float:
    from sklearn.linear_model import LogisticRegression

    lab = labels >= 0
    clf = LogisticRegression(max_iter=2000).fit(x[lab], y[lab])
    return float(clf.score(x_test, y_test))


def run_problem(name, data: TabularData, labels: np.ndarray, model_kwargs: dict, config: FitConfig, *,
                means_from_labels: bool, progress: bool, seed: int):
    """Train FlowGMM semi-supervised and on labels only; returns (results dict, semi-supervised model)."""
    x, y_lab = torch.from_numpy(data.x_train), torch.from_numpy(labels)
    x_te, y_te = torch.from_numpy(data.x_test), torch.from_numpy(data.y_test)
    results, models = {}, {}
    for variant, weight in (("FlowGMM (labeled + unlabeled)", config.unlabeled_weight),
                            ("FlowGMM (labels only)", 0.0)):
        model = build_tabular_flowgmm(data.dim, data.num_classes, seed=seed, **model_kwargs)
        if means_from_labels:
            init_means_from_labeled(model, x, y_lab)
        cfg = FitConfig(**{**config.__dict__, "unlabeled_weight": weight})
        t0 = time.perf_counter()
        fit_flowgmm(model, x, y_lab, cfg, progress=f"{name}: {variant}" if progress else False)
        results[variant] = (accuracy(model, x_te, y_te), time.perf_counter() - t0)
        models[variant] = model
    t0 = time.perf_counter()
    acc = logistic_regression_accuracy(data.x_train, data.y_train, labels, data.x_test, data.y_test)
    results["logistic regression (labels only)"] = (acc, time.perf_counter() - t0)
    return results, models["FlowGMM (labeled + unlabeled)"]


def _pca2(z: np.ndarray, *others: np.ndarray):
    mean = z.mean(0)
    _, _, vt = np.linalg.svd(z - mean, full_matrices=False)
    return [(a - mean) @ vt[:2].T for a in (z, *others)]


@torch.no_grad()
def make_figure(path, moons: TabularData, moons_labels, moons_model, digits: TabularData, digits_labels,
                digits_model, table):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    torch.manual_seed(0)
    fig, axes = plt.subplots(2, 3, figsize=(15, 9.5))
    cmap = plt.get_cmap("tab10")
    xm, ym = moons.x_train, moons.y_train
    lab = moons_labels >= 0

    ax = axes[0, 0]
    lo, hi = xm.min(0) - 0.5, xm.max(0) + 0.5
    gx, gy = np.meshgrid(np.linspace(lo[0], hi[0], 200), np.linspace(lo[1], hi[1], 200))
    grid = torch.from_numpy(np.stack([gx.ravel(), gy.ravel()], 1).astype(np.float32))
    pred = moons_model.predict(grid).numpy().reshape(gx.shape)
    ax.contourf(gx, gy, pred, levels=[-0.5, 0.5, 1.5], colors=[cmap(0), cmap(1)], alpha=0.25)
    ax.scatter(xm[~lab, 0], xm[~lab, 1], s=4, c="0.6", label="unlabeled")
    ax.scatter(xm[lab, 0], xm[lab, 1], s=90, c=[cmap(int(c)) for c in ym[lab]], edgecolors="k", marker="*",
               label="labeled")
    ax.set_title("moons: data, labels (stars), decision regions")
    ax.legend(loc="lower right", fontsize=8)

    ax = axes[0, 1]
    z, _ = moons_model.encode(torch.from_numpy(xm))
    z = z.numpy()
    ax.scatter(z[:, 0], z[:, 1], s=4, c=[cmap(int(c)) for c in ym])
    means = moons_model.prior.means.numpy()
    sigma = float(torch.exp(moons_model.prior.log_std)[0])
    for k, mu in enumerate(means):
        for r in (1, 2):
            ax.add_patch(plt.Circle(mu, r * sigma, fill=False, color=cmap(k), lw=1.5, ls="-" if r == 1 else "--"))
        ax.plot(*mu, "kx", ms=10)
    ax.set_aspect("equal")
    ax.set_title("moons latent z = f(x), components (1, 2 sigma)")

    ax = axes[0, 2]
    for k in range(moons.num_classes):
        s = moons_model.sample(400, class_id=k).numpy()
        ax.scatter(s[:, 0], s[:, 1], s=4, color=cmap(k), label=f"class {k}")
    ax.set_xlim(lo[0], hi[0])
    ax.set_ylim(lo[1], hi[1])
    ax.legend(fontsize=8)
    ax.set_title("moons class-conditional samples")

    ax = axes[1, 0]
    zt, _ = digits_model.encode(torch.from_numpy(digits.x_test))
    zt2, mu2 = _pca2(zt.numpy(), digits_model.prior.means.numpy())
    ax.scatter(zt2[:, 0], zt2[:, 1], s=5, c=[cmap(int(c)) for c in digits.y_test])
    for k, mu in enumerate(mu2):
        ax.text(mu[0], mu[1], str(k), fontsize=14, weight="bold", ha="center", va="center",
                bbox=dict(boxstyle="circle", fc="white", ec=cmap(k)))
    ax.set_title("digits test latent (2 principal axes), means")

    ax = axes[1, 1]
    n_per = 8
    rows = []
    for k in range(digits.num_classes):
        s = digits_model.sample(n_per, class_id=k).numpy()
        s = digits.scaler.inverse(s) if digits.scaler is not None else s
        rows.append(np.concatenate([np.pad(im.reshape(8, 8), 1, constant_values=0) for im in s], 1))
    ax.imshow(np.clip(np.concatenate(rows, 0), 0, 17), cmap="gray_r")
    ax.set_xticks([])
    ax.set_yticks([(k + 0.5) * 10 for k in range(digits.num_classes)], [str(k) for k in range(digits.num_classes)])
    ax.set_title("digits class-conditional samples (row = class)")

    ax = axes[1, 2]
    names = list(table["two moons"].keys())
    width = 0.38
    for i, problem in enumerate(table):
        accs = [100 * table[problem][n][0] for n in names]
        bars = ax.bar(np.arange(len(names)) + (i - 0.5) * width, accs, width, label=problem)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(np.arange(len(names)), [n.replace(" (", "\n(") for n in names], fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=8)
    ax.set_title(f"test accuracy ({int(lab.sum())} / {int((digits_labels >= 0).sum())} labels)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def format_table(table, label_counts) -> str:
    methods = list(next(iter(table.values())).keys())
    head = "| method | " + " | ".join(f"{p} ({label_counts[p]} labels)" for p in table) + " |"
    lines = [head, "|" + " --- |" * (len(table) + 1)]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(f"{100 * table[p][m][0]:.1f}%" for p in table) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    os.makedirs(args.out, exist_ok=True)
    t_start = time.perf_counter()
    progress = not args.no_progress

    x, y = two_moons(1000, noise=0.1, seed=args.seed)
    x_te, y_te = two_moons(1000, noise=0.1, seed=args.seed + 1000)
    moons = TabularData(x, y, x_te, y_te, "two moons")
    moons_labels = semisup_labels(y, balanced_labeled_indices(y, 6, seed=args.seed))
    moons_cfg = FitConfig(steps=args.moons_steps, lr=1e-3, batch_size=1000, seed=args.seed, log_every=20)
    moons_res, moons_model = run_problem(
        "moons", moons, moons_labels, dict(num_coupling_layers=5, hidden_dim=128, dropout=0.2), moons_cfg,
        means_from_labels=False, progress=progress, seed=args.seed)

    digits = load_sklearn("digits", test_fraction=0.3, seed=args.seed)
    digits_labels = semisup_labels(digits.y_train, balanced_labeled_indices(digits.y_train, 100, seed=args.seed))
    digits_cfg = FitConfig(steps=args.digits_steps, lr=1e-3, batch_size=1300, seed=args.seed, log_every=20)
    digits_res, digits_model = run_problem(
        "digits", digits, digits_labels, dict(num_coupling_layers=4, hidden_dim=128, dropout=0.5), digits_cfg,
        means_from_labels=True, progress=progress, seed=args.seed)

    table = {"two moons": moons_res, "sklearn digits": digits_res}
    counts = {"two moons": int((moons_labels >= 0).sum()), "sklearn digits": int((digits_labels >= 0).sum())}
    fig_path = os.path.join(args.out, "demo.png")
    make_figure(fig_path, moons, moons_labels, moons_model, digits, digits_labels, digits_model, table)
    wall = time.perf_counter() - t_start
    text = format_table(table, counts)
    print("\nTest accuracy, same labels for every method:\n" + text)
    print(f"\nwall time {wall:.1f} s ({'quick mode, accuracies not meaningful' if args.quick else 'full demo'}); "
          f"figure: {fig_path}")
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(f"# FlowGMM demo\n\n{text}\n\nsteps: moons {args.moons_steps}, digits {args.digits_steps}; "
                f"seed {args.seed}; torch threads {args.threads}; wall time {wall:.1f} s"
                f"{' (quick mode)' if args.quick else ''}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
