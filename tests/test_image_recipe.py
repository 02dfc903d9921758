"""experiments/train_semisup_cons.py: presets, --threads, the prior initialised from the labeled points, and the
whole path for a dataset in MNIST's IDX format under its own name (tiny data, a few steps)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import load_experiment
from test_data_images import write_idx

import flowgmm_fast
from flowgmm_fast.data import load_image_dataset
from flowgmm_fast.training import read_checkpoint


@pytest.fixture(scope="module")
def script():
    return load_experiment("train_semisup_cons")


REQUIRED = ["--dataset", "MNIST", "--label_path", "x.npz"]


def test_defaults_without_a_preset_are_the_originals(script):
    args = script.parse_args(REQUIRED)
    assert (args.lr, args.batch_size, args.mid_channels, args.num_blocks, args.num_scales) == (1e-3, 64, 64, 8, 2)
    assert (args.label_weight, args.consistency_weight, args.consistency_rampup) == (1.0, 1.0, 1)
    assert (args.means_init, args.std_init, args.means_r, args.cov_std) == ("random", "fixed", 1.0, 1.0)
    assert (args.warmup_steps, args.threads, args.schedule, args.preset) == (0, None, "constant", None)


def test_preset_sets_defaults_and_flags_win(script):
    preset = script.PRESETS["mnist-cpu"]
    args = script.parse_args(REQUIRED + ["--preset", "mnist-cpu"])
    for key, value in preset.items():
        assert getattr(args, key) == value, key
    assert args.means_init == "labeled"
    # a flag given on the command line wins, before or after --preset
    args = script.parse_args(["--lr", "0.01"] + REQUIRED + ["--preset", "mnist-cpu", "--mid_channels", "7"])
    assert args.lr == 0.01 and args.mid_channels == 7 and args.num_blocks == preset["num_blocks"]
    with pytest.raises(SystemExit):
        script.parse_args(REQUIRED + ["--preset", "no-such-preset"])


@pytest.mark.parametrize("flags", [["--threads", "0"], ["--warmup_steps", "-1"], ["--std_init", "labeled"],
                                   ["--dataset", "my data"], ["--time_limit", "0"], ["--teacher_weight", "-1"],
                                   ["--teacher_neighbors", "0"], ["--teacher", "oracle"]])
def test_bad_flags_are_refused(script, flags, capsys):
    with pytest.raises(SystemExit):
        script.parse_args(REQUIRED + flags)
    assert "error" in capsys.readouterr().err


def test_teacher_flags_without_the_teacher_are_refused(script, capsys):
    with pytest.raises(SystemExit):
        script.parse_args(REQUIRED + ["--teacher_pca", "20", "--teacher_weight", "2"])
    err = capsys.readouterr().err
    assert "--teacher_pca, --teacher_weight configure the graph teacher, which is off: add --teacher graph" in err
    args = script.parse_args(REQUIRED + ["--teacher", "graph", "--teacher_pca", "20"])
    assert (args.teacher, args.teacher_pca, args.teacher_weight) == ("graph", 20, 1.0)


def test_calibrated_batch_norm_makes_eval_mode_compute_what_training_does(script):
    torch.manual_seed(0)
    flow = flowgmm_fast.nn.RealNVP(1, 2, 4, 1, dequantize=False)
    x = torch.rand(64, 1, 8, 8)
    with torch.no_grad():
        z_train, ldj_train = flow.train()(x)
        z_eval, ldj_eval = flow.eval()(x)
        script.calibrate_batch_norm(flow, x, batch_size=64)
        assert not flow.training  # the mode it was in
        z_cal, ldj_cal = flow(x)
    # eval mode uses the unbiased variance (n / (n - 1), n = 64 x 64 at the first layers): a 1e-4 relative
    # difference that 22 batch-norm layers compound; the initial statistics (0, 1) are off by orders more
    assert (z_eval - z_train).abs().mean() > 0.5 and (ldj_eval - ldj_train).abs().mean() > 5
    assert (z_cal - z_train).abs().mean() < 5e-3 and (ldj_cal - ldj_train).abs().mean() < 2e-2
    momenta = {m.momentum for m in flow.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert momenta == {0.1}


def test_prior_from_labeled_points_is_the_class_means_and_pooled_std(script):
    torch.manual_seed(0)
    args = script.parse_args(REQUIRED + ["--means_init", "labeled", "--std_init", "labeled", "--mid_channels", "4",
                                         "--num_blocks", "1", "--eval_batch_size", "16"])
    model = script.build_model(args, 1, 64, 3)
    images = torch.randint(0, 256, (30, 1, 8, 8), dtype=torch.uint8)
    labels = torch.arange(30) % 3
    line = script.init_prior_from_labeled(model, images, labels, args)
    assert line.startswith("prior from the labeled points: means, std")
    x = flowgmm_fast.data.dequantize(images, torch.Generator().manual_seed(args.seed))
    with torch.no_grad():
        z, _ = model.eval().encode(x)
    means = torch.stack([z[labels == k].mean(0) for k in range(3)])
    torch.testing.assert_close(model.prior.means.detach(), means, atol=1e-4, rtol=1e-4)
    pooled = ((z - means[labels]) ** 2).sum() / (64 * (30 - 3))
    torch.testing.assert_close(torch.exp(model.prior.log_std).detach(), pooled.sqrt().expand(3), atol=1e-4,
                               rtol=1e-4)


def test_idx_dataset_by_name_prepare_then_train_with_the_preset(tmp_path, script, capsys):
    """prepare_data.py on IDX files under a new name, then the preset (shrunk) for 2 steps, labeled prior init."""
    write_idx(tmp_path / "src", n_train=60, n_test=20, size=(8, 8))
    load_experiment("prepare_data").main(["--dataset", "Fashion_MNIST", "--source", str(tmp_path / "src"),
                                          "--out", str(tmp_path / "data"), "--num_labels", "20", "--seeds", "3"])
    images = tmp_path / "data" / "images" / "fashion_mnist"
    split = tmp_path / "data" / "labels" / "fashion_mnist" / "20_balanced_labels" / "3.npz"
    assert split.exists() and str(np.load(images / "train.npz")["dataset"]) == "fashion_mnist"
    with pytest.raises(ValueError, match="holds 'fashion_mnist' data, not 'mnist'"):
        load_image_dataset("MNIST", images)  # the name travels with the files
    threads = torch.get_num_threads()
    capsys.readouterr()
    metrics = script.main(["--preset", "mnist-cpu", "--dataset", "fashion_mnist", f"--data_path={images}",
                           f"--label_path={split}", f"--logdir={tmp_path / 'tb'}", f"--ckptdir={tmp_path / 'ck'}",
                           "--mid_channels=4", "--num_blocks=1", "--batch_size=8", "--max_steps=2",
                           f"--threads={threads}", "--backend=torch", "--log_freq=1", "--eval_batch_size=8"])
    out = capsys.readouterr().out
    assert "FASHION_MNIST: 60 train (20 labeled), 20 test" in out and f"threads {threads}" in out
    assert "prior from the labeled points: means, std" in out
    final = json.loads(out.split("final ", 1)[1].splitlines()[0])
    assert final["steps"] == 2 and 0 <= final["test_acc"] <= 1 and np.isfinite(final["test_bpd"])
    assert 0 < final["train_s"] <= final["wall_s"] and set(metrics) >= {"test_acc", "test_bpd"}

    # the preset run resumes (its prior comes from the checkpoint, not a new initialisation)
    script.main(["--preset", "mnist-cpu", "--dataset", "fashion_mnist", f"--data_path={images}",
                 f"--label_path={split}", f"--logdir={tmp_path / 'tb'}", f"--ckptdir={tmp_path / 'ck'}",
                 "--mid_channels=4", "--num_blocks=1", "--batch_size=8", "--max_steps=3", "--resume=auto",
                 f"--threads={threads}", "--backend=torch", "--log_freq=1", "--eval_batch_size=8"])
    out = capsys.readouterr().out
    assert "resumed from" in out and "prior from the labeled points" not in out
    assert json.loads(out.split("final ", 1)[1].splitlines()[0])["steps"] == 3

    # --time_limit: a limit any epoch passes ends the run at the first epoch end (5 steps), not at --max_steps;
    # with --schedule cosine the schedule follows the budget's share spent (all of it here), not the 12 steps
    script.main(["--dataset", "fashion_mnist", f"--data_path={images}", f"--label_path={split}",
                 f"--logdir={tmp_path / 'tb2'}", f"--ckptdir={tmp_path / 'ck2'}", "--mid_channels=4", "--num_blocks=1",
                 "--batch_size=8", "--max_steps=12", "--time_limit=1e-6", "--curve_eval_limit=4", "--backend=torch",
                 "--log_freq=1", "--schedule=cosine", "--eval_batch_size=8"])
    final = json.loads(capsys.readouterr().out.split("final ", 1)[1].splitlines()[0])
    assert final["steps"] == 5 and final["epoch"] == 1.0 and final["test_n"] == 20  # the final evaluation: all
    ckpt = read_checkpoint(tmp_path / "ck2" / "last.pt")
    assert ckpt["extra"]["time_progress"] == 1.0
    # resumed, the run starts from the checkpoint's share: the budget is spent, so its step's lr is the cosine's end
    script.main(["--dataset", "fashion_mnist", f"--data_path={images}", f"--label_path={split}",
                 f"--logdir={tmp_path / 'tb2'}", f"--ckptdir={tmp_path / 'ck2'}", "--mid_channels=4", "--num_blocks=1",
                 "--batch_size=8", "--max_steps=6", "--time_limit=1e-6", "--curve_eval_limit=4", "--backend=torch",
                 "--log_freq=1", "--schedule=cosine", "--eval_batch_size=8", "--resume=auto"])
    assert json.loads(capsys.readouterr().out.split("final ", 1)[1].splitlines()[0])["steps"] == 6
    ckpt = read_checkpoint(tmp_path / "ck2" / "last.pt")
    assert ckpt["extra"]["time_progress"] == 1.0
    assert ckpt["schedulers"]["flow"]["_last_lr"][0] == pytest.approx(0.0, abs=1e-12)

    # --teacher graph: label spreading over the training images' PCA graph, logged with its own accuracy, then a
    # cross-entropy against it on the unlabeled rows: at weight 0 the run is the run without it, at weight 2 not
    finals = []
    for weight in ("0", "2"):
        script.main(["--dataset", "fashion_mnist", f"--data_path={images}", f"--label_path={split}",
                     f"--logdir={tmp_path / 'tb4'}", f"--ckptdir={tmp_path / ('ck4' + weight)}", "--mid_channels=4",
                     "--num_blocks=1", "--batch_size=8", "--max_steps=2", "--teacher=graph", "--teacher_pca=5",
                     "--teacher_neighbors=3", f"--teacher_weight={weight}", "--backend=torch", "--log_freq=1",
                     "--eval_batch_size=8", "--no_augment"])
        out = capsys.readouterr().out
        assert "teacher: label spreading on the 3-NN graph of PCA-5 pixels" in out and "on the 20 test images" in out
        finals.append(json.loads(out.split("final ", 1)[1].splitlines()[0]))
    script.main(["--dataset", "fashion_mnist", f"--data_path={images}", f"--label_path={split}",
                 f"--logdir={tmp_path / 'tb4'}", f"--ckptdir={tmp_path / 'ck4n'}", "--mid_channels=4",
                 "--num_blocks=1", "--batch_size=8", "--max_steps=2", "--backend=torch", "--log_freq=1",
                 "--eval_batch_size=8", "--no_augment"])
    plain = json.loads(capsys.readouterr().out.split("final ", 1)[1].splitlines()[0])
    assert finals[0]["test_nll"] == plain["test_nll"] and finals[1]["test_nll"] != plain["test_nll"]

    # --supervised_only: whole batches of labeled images (none of the batch is spent on unlabeled rows the loss
    # drops), so an epoch over the 20 labeled images is 20 // 8 = 2 steps, not 20 // 4 = 5
    script.main(["--dataset", "fashion_mnist", f"--data_path={images}", f"--label_path={split}",
                 f"--logdir={tmp_path / 'tb3'}", f"--ckptdir={tmp_path / 'ck3'}", "--mid_channels=4", "--num_blocks=1",
                 "--batch_size=8", "--max_steps=1", "--supervised_only", "--backend=torch", "--eval_batch_size=8"])
    out = capsys.readouterr().out
    assert "| 2 steps/epoch" in out and json.loads(out.split("final ", 1)[1].splitlines()[0])["steps"] == 1


def test_identity_flow_init_starts_as_the_logit_layer_and_still_learns(script):
    torch.manual_seed(0)
    args = script.parse_args(REQUIRED + ["--flow_init", "identity", "--mid_channels", "4", "--num_blocks", "1"])
    model = script.build_model(args, 1, 64, 3)
    x = torch.rand(5, 1, 8, 8)
    z, sldj = model.flow.train()(x)
    pre, sldj_pre = model.flow.preprocess(x, None)
    # the couplings are the identity, the squeezes only rearrange: z holds the logit pixels, the log-det is the logit's
    torch.testing.assert_close(z.flatten(1).sort(1).values, pre.flatten(1).sort(1).values)
    torch.testing.assert_close(sldj, sldj_pre)
    sldj.sum().backward()
    couplings = [m for m in model.flow.modules() if isinstance(m, flowgmm_fast.nn.AffineCoupling)]
    assert len(couplings) == 10
    assert all(float(m.st_net.out_conv.parametrizations.weight.original0.grad.abs().sum()) > 0 for m in couplings)
    # the original's random initialisation is not the identity
    args = script.parse_args(REQUIRED + ["--mid_channels", "4", "--num_blocks", "1"])
    z_rand, _ = script.build_model(args, 1, 64, 3).flow.train()(x)
    assert (z_rand.flatten(1).sort(1).values - pre.flatten(1).sort(1).values).abs().max() > 0.1


def test_step_in_backward_turns_clipping_off_and_refuses_what_it_cannot_do(script, capsys):
    args = script.parse_args(REQUIRED + ["--step_in_backward"])
    assert args.step_in_backward and args.max_grad_norm is None
    assert script.parse_args(REQUIRED).max_grad_norm == 100.0
    for flags, said in ((["--max_grad_norm", "5"], "cannot clip"), (["--distributed"], "--distributed")):
        with pytest.raises(SystemExit):
            script.parse_args(REQUIRED + ["--step_in_backward", *flags])
        assert said in capsys.readouterr().err
