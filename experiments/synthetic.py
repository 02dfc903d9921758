"""FlowGMM on 2-D synthetic data with a handful of labels: figures and test accuracies (the original's toy notebooks).

For each data set (two moons, concentric circles, 8 Gaussians, pinwheel) a small RealNVPTabular FlowGMM (component
means started at the labeled class means, spread to 4 sigma apart) is trained twice on the same labels:
semi-supervised (labeled + unlabeled points) and on the labeled points only (the original's
second notebook). One figure per data set, ``<out>/<name>.png``, rows = the two variants, columns:
  data with the labeled points | learned density log p(x) | latent z = f(x) with the components |
  decision regions | class-conditional samples
and a markdown table of test accuracies in ``<out>/synthetic.md`` (also printed).

    python experiments/synthetic.py                        # all four sets (measured: 63 s to 6.5 min, CPU load)
    python experiments/synthetic.py --datasets pinwheel --steps 1000
    python experiments/synthetic.py --quick                # a few steps: checks the pipeline only
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

from flowgmm_fast.data.tabular import TabularData, balanced_labeled_indices, semisup_labels
from flowgmm_fast.data.toy import DATASETS, make_toy
from flowgmm_fast.semisup import FitConfig, accuracy, build_tabular_flowgmm, fit_flowgmm, init_means_from_labeled

LABELS_PER_CLASS = {"two_moons": 3, "circles": 3, "eight_gaussians": 2, "pinwheel": 2}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    p.add_argument("--out", default="outputs/synthetic")
    p.add_argument("--n-train", type=int, default=1000)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--hidden-dim", type=int, default=128, help="s/t MLP width (the original used 512)")
    p.add_argument("--num-coupling-layers", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.n_train = 5, 200
    if args.steps < 1 or args.n_train < 20:
        p.error("--steps must be >= 1 and --n-train >= 20")
    return args


def train_pair(name: str, args):
    x, y = make_toy(name, args.n_train, seed=args.seed)
    xt, yt = make_toy(name, 1000, seed=args.seed + 1000)
    data = TabularData(x, y, xt, yt, name)
    labels = semisup_labels(y, balanced_labeled_indices(y, LABELS_PER_CLASS[name] * data.num_classes, args.seed))
    xs, ls = torch.from_numpy(x), torch.from_numpy(labels)
    models, accs = {}, {}
    for variant, weight in (("semi-supervised", 1.0), ("labels only", 0.0)):
        model = build_tabular_flowgmm(2, data.num_classes, num_coupling_layers=args.num_coupling_layers,
                                      hidden_dim=args.hidden_dim, dropout=0.2, seed=args.seed)
        init_means_from_labeled(model, xs, ls)  # labeled class means spread to 4 sigma (experiments/RESULTS.md)
        cfg = FitConfig(steps=args.steps, lr=args.lr, batch_size=args.n_train, unlabeled_weight=weight,
                        seed=args.seed, log_every=20)
        fit_flowgmm(model, xs, ls, cfg, progress=False if args.no_progress else f"{name}: {variant}")
        models[variant] = model
        accs[variant] = accuracy(model, torch.from_numpy(xt), torch.from_numpy(yt))
    return data, labels, models, accs


@torch.no_grad()
def plot(path: str, data: TabularData, labels: np.ndarray, models: dict, accs: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("tab10")
    x, y = data.x_train, data.y_train
    lab = labels >= 0
    lo, hi = x.min(0) - 0.4, x.max(0) + 0.4
    gx, gy = np.meshgrid(np.linspace(lo[0], hi[0], 150), np.linspace(lo[1], hi[1], 150))
    grid = torch.from_numpy(np.stack([gx.ravel(), gy.ravel()], 1).astype(np.float32))
    k = data.num_classes
    fig, axes = plt.subplots(len(models), 5, figsize=(22, 4.4 * len(models)), squeeze=False)
    for row, (variant, model) in zip(axes, models.items()):
        model.eval()
        torch.manual_seed(0)
        ax = row[0]
        ax.scatter(x[~lab, 0], x[~lab, 1], s=3, c="0.65")
        ax.scatter(x[lab, 0], x[lab, 1], s=110, marker="*", edgecolors="k", c=[cmap(int(c)) for c in y[lab]])
        ax.set_title(f"{variant}: data, {int(lab.sum())} labels")
        ax = row[1]
        logp = model.log_prob(grid).numpy().reshape(gx.shape)
        ax.imshow(np.exp(logp), origin="lower", extent=(lo[0], hi[0], lo[1], hi[1]), aspect="auto", cmap="magma")
        ax.set_title("learned density p(x)")
        ax = row[2]
        z, _ = model.encode(torch.from_numpy(x))
        z = z.numpy()
        ax.scatter(z[:, 0], z[:, 1], s=3, c=[cmap(int(c)) for c in y])
        sigma = torch.exp(model.prior.log_std).numpy()
        for j, mu in enumerate(model.prior.means.numpy()):
            ax.add_patch(plt.Circle(mu, float(sigma[j]), fill=False, color=cmap(j), lw=2))
            ax.add_patch(plt.Circle(mu, 2 * float(sigma[j]), fill=False, color=cmap(j), lw=1, ls="--"))
        ax.set_aspect("equal", adjustable="datalim")
        ax.set_title("latent z = f(x), components (1, 2 sigma)")
        ax = row[3]
        pred = model.predict(grid).numpy().reshape(gx.shape)
        ax.contourf(gx, gy, pred, levels=np.arange(-0.5, k), colors=[cmap(j) for j in range(k)], alpha=0.3)
        ax.scatter(data.x_test[:, 0], data.x_test[:, 1], s=2, c=[cmap(int(c)) for c in data.y_test])
        ax.set_title(f"decision regions, test accuracy {100 * accs[variant]:.1f}%")
        ax = row[4]
        for j in range(k):
            s = model.sample(300, class_id=j).numpy()
            ax.scatter(s[:, 0], s[:, 1], s=3, color=cmap(j))
        ax.set_xlim(lo[0], hi[0])
        ax.set_ylim(lo[1], hi[1])
        ax.set_title("class-conditional samples")
    fig.suptitle(data.name)
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    rows = []
    for name in args.datasets:
        data, labels, models, accs = train_pair(name, args)
        plot(os.path.join(args.out, f"{name}.png"), data, labels, models, accs)
        rows.append(f"| {name} | {int((labels >= 0).sum())} | {100 * accs['semi-supervised']:.1f} | "
                    f"{100 * accs['labels only']:.1f} |")
    table = "\n".join(["| data set | labels | FlowGMM semi-supervised (%) | FlowGMM labels only (%) |",
                       "| --- | --- | --- | --- |", *rows])
    wall = time.perf_counter() - t0
    print(table)
    print(f"\n{args.steps} steps, seed {args.seed}, wall {wall:.0f} s; figures in {args.out}/")
    with open(os.path.join(args.out, "synthetic.md"), "w") as f:
        f.write(f"{table}\n\n{args.steps} steps, seed {args.seed}, wall {wall:.0f} s\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
