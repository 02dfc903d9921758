"""Smoke tests of the benchmark harness (benchmarks/): the timers, the original-formulation baseline's values, the op
and training-step benchmarks on tiny shapes, the results files and the report. Seconds on a CPU; the timings
themselves are not checked (the machine is shared), only that they are well-formed and the outputs agree."""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path

import pytest
import torch
from helpers import requires_native

from benchmarks import bench_ops, bench_train_step, common, report
from benchmarks.baseline_original import OriginalFormulation, original_gmm_nll
from flowgmm_fast.ops import reference as R

CPU = torch.device("cpu")


def test_summarize_quantiles():
    s = common.summarize([5.0, 1.0, 4.0, 2.0, 3.0])
    assert (s["median_ms"], s["q20_ms"], s["q80_ms"], s["n"]) == (3.0, 1.8, 4.2, 5)
    with pytest.raises(ValueError, match="samples_ms"):
        common.summarize([])


def test_time_interleaved_times_each_callable():
    stats = common.time_interleaved({"short": lambda: time.sleep(0.002), "long": lambda: time.sleep(0.004)},
                                    warmup=1, rounds=3, sample_ms=5)
    assert set(stats) == {"short", "long"}
    assert stats["short"]["median_ms"] >= 2.0 and stats["long"]["median_ms"] >= 4.0
    for s in stats.values():
        assert s["q20_ms"] <= s["median_ms"] <= s["q80_ms"] and s["n"] == 3
    with pytest.raises(ValueError, match="rounds"):
        common.time_interleaved({"a": lambda: None}, rounds=0)


def test_original_formulation_matches_closed_form():
    g = torch.Generator().manual_seed(0)
    b, d, k = 9, 7, 4
    z = torch.randn(b, d, generator=g, dtype=torch.float64, requires_grad=True)
    means = torch.randn(k, d, generator=g, dtype=torch.float64, requires_grad=True)
    log_std = (0.2 * torch.randn(k, generator=g, dtype=torch.float64)).requires_grad_()
    weights = torch.randn(k, generator=g, dtype=torch.float64)
    labels = torch.tensor([-1, 0, 1, 2, 3, -1, 3, -1, 0])
    ours = original_gmm_nll(z, means, log_std, weights, labels, 3.0)
    ref = R.gmm_nll(z, means, log_std, weights, labels, 3.0)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    g1 = torch.autograd.grad(ours.sum(), (z, means, log_std))
    g2 = torch.autograd.grad(ref.sum(), (z, means, log_std))
    for a, r in zip(g1, g2):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(original_gmm_nll(z, means, log_std), R.gmm_nll(z, means, log_std, None, None, 1.0))
    with pytest.raises(ValueError, match="log_std must be"):
        original_gmm_nll(z, means, torch.zeros(k, d, dtype=torch.float64))


def test_original_formulation_model_checks_nans():
    model = bench_train_step.CONFIGS["smoke-tabular"].build().eval()  # no dropout: two calls must agree
    net = OriginalFormulation(model)
    x = torch.randn(4, 6)
    torch.testing.assert_close(net(x), model(x).nll, rtol=1e-5, atol=1e-4)
    with pytest.raises(RuntimeError, match="NaN"):
        net(torch.full((4, 6), float("nan")))
    net.remove_checks()
    net(torch.full((4, 6), float("nan")))


def test_min_bytes_counts_each_tensor_once():
    n = 2 * 3 * 4 * 4
    fwd = bench_ops.Case("coupling_fwd", "t", (2, 3, 4, 4), "checkerboard")
    assert bench_ops.min_bytes(fwd) == 4 * n * 4 + 4 * (3 + 2 * 2)
    assert bench_ops.min_bytes(bench_ops.Case("squeeze", "t", (2, 3, 4, 4))) == 2 * n * 4
    assert bench_ops.min_bytes(bench_ops.Case("squeeze", "t", (2, 3, 4, 4), dtype="bfloat16")) == 2 * n * 2
    with pytest.raises(ValueError, match="Case.op"):
        bench_ops.Case("nope", "t", (1,))


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    ops = bench_ops.main(["--device", "cpu", "--suite", "smoke", "--no-compile", "--budget", "0.05", "--rounds", "3",
                          "--out-dir", str(out)])
    steps = bench_train_step.main(["--device", "cpu", "--suite", "smoke", "--no-compile", "--rounds", "2",
                                   "--out-dir", str(out)])
    return out, ops, steps


def test_bench_ops_smoke_records(smoke_runs):
    out, ops, _ = smoke_runs
    data = common.load_results(ops["path"])
    assert data["kind"] == "ops" and data["meta"]["device_type"] == "cpu" and data["copy_bandwidth"]["gbps"] > 0
    for key in ("torch", "git_commit", "date_utc", "device", "backends_available"):
        assert key in data["meta"]
    recs = data["records"]
    cases = {(c.op, c.name) for c in bench_ops.suite("smoke")}
    assert {(r["op"], r["case"]) for r in recs} == cases
    for r in recs:
        assert "error" not in r, r
        assert r["q20_ms"] <= r["median_ms"] <= r["q80_ms"] and r["gbps"] > 0
        tol = 1e-5 if r["backend"] != bench_ops.ORIGINAL else 1e-4
        assert r["rel_err_vs_eager"] <= tol, r
        if r["backend"] == bench_ops.EAGER:
            assert math.isclose(r["x_eager"], 1.0)
    assert any(r["backend"] == bench_ops.ORIGINAL for r in recs if r["op"] == "gmm_fwdbwd")
    assert {r["backend"] for r in recs} >= {bench_ops.EAGER, *bench_ops.fast_backends(CPU)}
    # interleaved rounds: every candidate of a case has one sample per round, and the paired figure is the median of
    # the per-round ratios t / t_eager (recomputed here), not a ratio of the medians
    for case in cases:
        mine = {r["backend"]: r for r in recs if (r["op"], r["case"]) == case}
        eager = mine[bench_ops.EAGER]["round_ms"]
        assert len(eager) >= 3
        for r in mine.values():
            assert len(r["round_ms"]) == len(eager)
            ratios = sorted(a / b for a, b in zip(r["round_ms"], eager))
            assert math.isclose(r["paired_vs_eager"], statistics.median(ratios), rel_tol=1e-12)
            assert r["paired_vs_eager_q20"] <= r["paired_vs_eager"] <= r["paired_vs_eager_q80"]
        assert mine[bench_ops.EAGER]["paired_vs_eager"] == 1.0


def test_cuda_timer_interleaves_rounds():
    """The GPU timer's rounds (do_bench replaced by a recorder): every candidate once per round, order reshuffled,
    warm-up only in the first round, the repetition time split over the rounds; statistics over all calls."""
    calls = []
    times = {"a": [1.0, 3.0], "b": [2.0, 2.0], "c": [4.0, 8.0]}

    def bench(fn, warmup, rep, return_mode):
        name = fn()
        calls.append((name, warmup, rep))
        assert return_mode == "all"
        return [t * (1 + (len(calls) - 1) // 3) for t in times[name]]      # drifts by round, alike for all

    fns = {k: (lambda k=k: k) for k in times}
    stats = common.time_cuda_interleaved(fns, rounds=4, warmup_ms=25, rep_ms=100, bench=bench)
    rounds = [calls[i:i + 3] for i in range(0, 12, 3)]
    assert all(sorted(c[0] for c in rnd) == ["a", "b", "c"] for rnd in rounds)
    assert len({tuple(c[0] for c in rnd) for rnd in rounds}) > 1          # shuffled per round
    assert all(c[1] == 25 for c in rounds[0]) and all(c[1] == 1 for rnd in rounds[1:] for c in rnd)
    assert all(c[2] == 25 for c in calls)
    for st in stats.values():
        assert len(st["round_ms"]) == 4 and st["q20_ms"] <= st["median_ms"] <= st["q80_ms"]
    pr = common.paired_ratio(stats["c"], stats["a"])
    assert pr["n"] == 4 and math.isclose(pr["median"], 3.0)               # (4 + 8) / (1 + 3) in every round
    assert common.paired_ratio(stats["c"], {"median_ms": 1.0}) is None    # no rounds, no paired figure


def test_report_reads_files_with_and_without_paired_ratios(smoke_runs):
    _, ops, _ = smoke_runs
    data = common.load_results(ops["path"])
    assert " p" in report.ops_table(data)
    for r in data["records"]:                                              # a results file from before the change
        for k in ("paired_vs_eager", "paired_vs_eager_q20", "paired_vs_eager_q80", "round_ms"):
            r.pop(k, None)
    old = report.ops_table(data)
    assert " p" not in old.replace("| op", "") and "x" in old


def test_bench_train_step_smoke_records(smoke_runs):
    _, _, steps = smoke_runs
    recs = common.load_results(steps["path"])["records"]
    for cfg in bench_train_step.SUITES["smoke"]:
        mine = {(r["backend"], r["variant"]): r for r in recs if r["config"] == cfg}
        expected = {("torch", "eager"), ("original", "eager")} | {(b, "eager") for b in bench_ops.fast_backends(CPU)}
        assert set(mine) == expected
        for r in mine.values():
            assert "error" not in r, r
            assert r["q20_ms"] <= r["median_ms"] <= r["q80_ms"]
        # same weights, data and seed: the original formulation and every backend give the reference's first loss
        ref = mine[("torch", "eager")]["loss_first"]
        assert math.isfinite(ref)
        for r in mine.values():
            assert math.isclose(r["loss_first"], ref, rel_tol=1e-4, abs_tol=1e-4), r


def test_deadline_cuts_the_run_short(tmp_path):
    res = bench_ops.main(["--device", "cpu", "--suite", "smoke", "--no-compile", "--deadline-s", "0",
                          "--out-dir", str(tmp_path)])
    assert res["records"] == [] and len(res["cases_not_run"]) == len(bench_ops.suite("smoke"))
    assert json.loads(open(res["path"]).read())["cases_not_run"] == res["cases_not_run"]


def test_bad_arguments_are_named():
    with pytest.raises(SystemExit, match="--ops"):
        bench_ops.main(["--device", "cpu", "--ops", "coupling_sideways", "--no-write"])
    with pytest.raises(SystemExit, match="--configs"):
        bench_train_step.main(["--device", "cpu", "--configs", "imagenet", "--no-write"])
    with pytest.raises(ValueError, match="suite"):
        bench_ops.suite("huge")


def test_report_writes_tables_plot_and_readme_block(smoke_runs, tmp_path, capsys):
    out, _, _ = smoke_runs
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nbefore\n\n{report.START}\nstale\n{report.END}\n\nafter\n")
    result = report.build(out, readme)
    text = readme.read_text()
    assert result["readme_updated"] and "stale" not in text
    assert text.startswith("# title\n\nbefore\n\n" + report.START) and text.endswith(report.END + "\n\nafter\n")
    tag = common.device_tag(CPU)
    assert "| op | case (shape) | torch-eager" in text and "Training step" in text and f"perf_{tag}.png" in text
    assert (out / f"perf_{tag}.png").stat().st_size > 1000
    full = (out / "report.md").read_text()
    assert "gmm_fwdbwd" in full and "original-fullcov" in full and "smoke-tabular" in full
    # without the markers: README untouched, the block printed
    plain = tmp_path / "PLAIN.md"
    plain.write_text("# no markers\n")
    result = report.build(out, plain)
    assert not result["readme_updated"] and plain.read_text() == "# no markers\n"
    assert report.START in capsys.readouterr().out


@pytest.mark.slow
def test_compile_candidate_agrees_with_eager():
    case = bench_ops.Case("coupling_fwdbwd", "tiny", (2, 2, 4, 4), "checkerboard")
    recs = bench_ops.run_case(case, CPU, [], True, 1.0, 0.05, 3, 10)
    by = {r["backend"]: r for r in recs}
    assert "error" not in by[bench_ops.COMPILE], by[bench_ops.COMPILE]
    assert by[bench_ops.COMPILE]["rel_err_vs_eager"] < 1e-5 and math.isclose(by[bench_ops.COMPILE]["x_compile"], 1.0)


def _rec(**kw):
    base = {"dtype": "float32", "shape": [1], "mask": "none", "bytes": 1, "q20_ms": 0.9, "q80_ms": 1.1, "n": None,
            "gbps": 1.0, "pct_copy_bw": 1.0, "x_compile": 1.0, "rel_err_vs_eager": 0.0, "peak_mb": 1.0}
    base.update(kw)
    base["q20_ms"], base["q80_ms"] = 0.9 * base["median_ms"], 1.1 * base["median_ms"]
    return base


def test_report_checks_gpu_targets_from_records(tmp_path):
    """The GPU side of the report (unrun here: no GPU) on hand-made records: targets met / missed as the numbers say."""
    meta = common.run_metadata(CPU, ["test"])
    meta.update(device_type="cuda", device="Fake GPU", device_tag="cuda-fake")
    gmm = dict(op="gmm_fwdbwd", case="target-b4096-d3072")
    ops = [_rec(**gmm, backend="torch-eager", median_ms=9.0, x_eager=1.0),
           _rec(**gmm, backend="triton", median_ms=1.0, x_eager=9.0),
           _rec(**gmm, backend="native", median_ms=5.0, x_eager=1.8),
           _rec(**gmm, backend="original-fullcov", median_ms=300.0, x_eager=0.03),
           _rec(op="coupling_fwdbwd", case="large-c12-64x64-b256", backend="triton", median_ms=1.0, x_eager=3.0,
                pct_copy_bw=80.0)]
    steps = [dict(config="cifar", backend="torch", variant="eager", median_ms=30.0, q20_ms=29.0, q80_ms=31.0,
                  x_eager=1.0, x_original=4.0, peak_mb=1000.0, loss_first=1.0),
             dict(config="cifar", backend="triton", variant="cudagraph", median_ms=20.0, q20_ms=19.0, q80_ms=21.0,
                  x_eager=1.5, x_original=6.0, peak_mb=1100.0, loss_first=1.0),
             dict(config="cifar", backend="original", variant="eager", median_ms=120.0, q20_ms=110.0, q80_ms=130.0,
                  x_eager=0.25, x_original=1.0, peak_mb=900.0, loss_first=1.0)]
    common.write_results("ops", meta, ops, tmp_path, extra={"copy_bandwidth": {"gbps": 3000.0}})
    common.write_results("train_step", meta, steps, tmp_path)
    runs = report.newest_runs(tmp_path)["cuda-fake"]
    rows = {(r[0], r[1]): r for r in report.target_rows(runs["ops"], runs["train_step"], "cuda")}
    gmm_orig = "GMM NLL fwd+bwd (B=4096, D=3072, K=10) >= 100x the original full-covariance prior"
    assert rows[(gmm_orig, "triton")][2:] == ["300.00x (1.00 ms)", "yes"]
    assert rows[(gmm_orig, "native")][2:] == ["60.00x (5.00 ms)", "no"]
    assert rows[("coupling fwd+bwd (B=256, C=12, 64x64) >= 75% of copy bandwidth", "triton")][2:] == \
        ["80% (1.00 ms)", "yes"]
    step = {r[0]: r for r in report.target_rows(None, runs["train_step"], "cuda")}
    assert step["CIFAR-10 step, batch 64: >= 1.3x eager reference"][2:] == ["1.50x (20.0 ms)", "yes"]
    assert step["CIFAR-10 step, batch 64: >= 3x the original formulation"][3] == "yes"
    assert step["CIFAR-10 step, batch 64: peak memory <= eager's"][2:] == ["1.10x (20.0 ms)", "no"]
    assert any("not measured" in r[2] for r in report.target_rows(runs["ops"], None, "cuda"))
    result = report.build(tmp_path, None, write_readme=False)
    assert "Fake GPU" in result["report"].read_text() and result["pngs"]["cuda-fake"].exists()


def test_import_benchmark_writes_a_results_file_the_report_tolerates(tmp_path):
    from benchmarks import bench_import

    result = bench_import.main(["--rounds", "1", "--out-dir", str(tmp_path)])
    data = common.load_results(result["path"])
    assert data["kind"] == "import" and [r["module"] for r in data["records"]] == ["torch", "flowgmm_fast"]
    assert all(r["n"] == 1 and r["median_ms"] > 0 for r in data["records"])
    assert data["summary"]["ratio_median"] == result["ratio_median"] > 0
    assert "torch._dynamo" not in data["records"][1]["heavy_modules_loaded"]
    # the report has sections for op and training-step results only; an import file alone does not break it
    assert "import" in report.newest_runs(tmp_path)[data["meta"]["device_tag"]]
    with pytest.raises(SystemExit, match="no results files"):
        report.build(tmp_path, None, write_readme=False)


def test_invertible_benchmark_smoke(tmp_path):
    """bench_invertible's parts on tiny models: paired timing and drift in this process, the memory and budget
    workers in fresh processes (the budget worker limits its own address space), then the tables and the plot."""
    from benchmarks import bench_invertible as B

    suite = dict(B.SUITES["smoke"])
    suite["memory"] = suite["memory"][:1]
    records = B.run(suite, ["time", "drift", "memory", "budget", "time-fused"], CPU, log=lambda s: None)
    parts = [r["part"] for r in records]
    assert parts.count("memory") == 2 and parts.count("budget") == 2 and "time" in parts and "drift" in parts
    for r in records:
        assert "error" not in r, r
    mem = [r for r in records if r["part"] == "memory"]
    assert all(r["peak_mb"] >= 0 and r["param_mb"] > 0 for r in mem)
    assert mem[0]["loss"] == mem[1]["loss"], "both modes measure one step from the same weights and data"
    assert all(r["fits"] for r in records if r["part"] == "budget")  # 512 MB is plenty for the tiny model
    t = next(r for r in records if r["part"] == "time")
    assert len(t["ratios"]) == t["pairs"] and t["median_ratio"] > 0
    f = next(r for r in records if r["part"] == "time-fused")
    assert len(f["ratios"]) == f["pairs"] == 2 and f["median_fused_s"] > 0 and f["mode"] == "invertible"
    for r in (r for r in records if r["part"] == "drift"):
        assert 0 <= r["grad_rel_invertible_none"] < 1e-3 and 0 <= r["rebuilt_rel_max_none"] < 1e-3
    text = B.summary(records)
    assert "Peak training-step memory" in text and "median of the per-pair" in text
    meta = common.run_metadata(CPU)
    png = B.plot(records, meta, tmp_path / "inv.png")
    assert png is None or png.exists()


def test_invertible_targets_and_readme_block_from_records(tmp_path):
    """The target rows and the README block are computed from the records (made up here), misses included."""
    from benchmarks import bench_invertible as B

    def mem(config, axis, size, mode, grads, mb):
        return {"part": "memory", "config": config, "axis": axis, "mode": mode, "grads": grads, "param_mb": 1.0,
                "batch": size if axis == "batch" else 5000, "depth": size if axis == "couplings" else 10,
                "peak_mb": mb}

    records = [mem("mnist", "batch", 64, "standard", "kept", 900.0),
               mem("mnist", "batch", 64, "invertible", "kept", 200.0),
               {"part": "time", "config": "mnist", "batch": 64, "depth": 10, "pairs": 1, "ratios": [1.5],
                "median_ratio": 1.5, "median_standard_s": 2.0, "median_invertible_s": 3.0}]
    for n, std, inv in ((4, 100.0, 50.0), (32, 400.0, 55.0)):
        records += [mem("tabular", "couplings", n, "standard", "kept", std),
                    mem("tabular", "couplings", n, "invertible", "kept", inv)]
    records += [{"part": "budget", "config": "tabular", "depth": 32, "mode": m, "batch": 5000, "budget_mb": 200,
                 "fits": m == "invertible", "peak_rss_mb": 1.0} for m in B.MODES]
    rows = {r[0]: r[1:] for r in B.targets(records)}
    assert list(rows.values())[0] == ["4.5x (900 -> 200 MB)", "yes"]
    assert rows["... and step time <= 1.4x standard"] == ["1.50x (1 pair)", "no"]
    kept, none = (rows[f"RealNVPTabular 4 -> 32 couplings (gradients {g}): invertible grows < 15%, standard grows"]
                  for g in ("kept", "none"))
    assert kept[1] == "yes" and "(+10%)" in kept[0] and "(+300%)" in kept[0] and none == ["-", "not measured"]
    assert list(rows.values())[-1][1] == "yes"
    meta = {"device": "Fake CPU", "torch": "x", "git_commit": "0123456789", "date_utc": "now", "device_tag": "cpu-1t"}
    readme = tmp_path / "README.md"
    readme.write_text(f"a\n{B.README_START}\nstale\n{B.README_END}\nb\n")
    out = B.write_outputs(records, meta, tmp_path / "res" / "invertible_x.json", readme)
    text = readme.read_text()
    assert out["readme_updated"] and "stale" not in text and text.startswith("a\n") and text.endswith("\nb\n")
    assert "| ... and step time <= 1.4x standard | 1.50x (1 pair) | no |" in text


def test_estimator_fit_benchmark_writes_a_results_file(tmp_path):
    pytest.importorskip("sklearn")
    from benchmarks import bench_estimator

    out = bench_estimator.main(["--rows", "300", "--features", "4", "--repeats", "1", "--threads", "1",
                                "--max-steps", "20", "--out-dir", str(tmp_path)])
    rec = out["records"][0]
    assert rec["seconds"] > 0 and rec["cpu_seconds"] > 0 and len(rec["steps_per_member"]) == 5
    assert out["median_s"] == rec["seconds"] and out["met"] is False  # a capped run never counts for the target
    saved = json.loads(open(out["path"]).read())
    assert saved["summary"]["rows"] == 300 and saved["records"][0]["cpu_seconds"] == rec["cpu_seconds"]
    with pytest.raises(SystemExit, match="--repeats"):
        bench_estimator.main(["--repeats", "0", "--no-write"])


def test_bench_cpu_recipe_smoke():
    """The CPU recipe benchmark on a tiny model: eager fp32 variants start from the same loss; 2 threads recorded."""
    import flowgmm_fast
    from benchmarks import bench_cpu_recipe

    if "native" not in flowgmm_fast.available_backends():
        pytest.skip("the native backend is not built here")
    threads = torch.get_num_threads()
    try:
        out = bench_cpu_recipe.main(["--mid", "4", "--blocks", "1", "--batch", "4", "--variants",
                                     "torch,native,channels_last", "--more-threads", "2", "--rounds", "1", "--no-write"])
    finally:
        torch.set_num_threads(threads)  # main sets --threads (default 1) for the process
    recs = {r["variant"]: r for r in out["records"]}
    assert set(recs) == {"torch", "native", "channels_last", "threads=2"}
    assert all("error" not in r and r["median_ms"] > 0 for r in recs.values())
    losses = [recs[v]["loss_first"] for v in ("torch", "native", "channels_last", "threads=2")]
    assert max(losses) - min(losses) <= 1e-3 * abs(losses[0])
    with pytest.raises(SystemExit, match="unknown"):
        bench_cpu_recipe.main(["--variants", "fp8", "--no-write"])


def test_invertible_render_of_several_files_lets_a_later_part_replace_the_earlier(tmp_path):
    from benchmarks import bench_invertible as B
    from benchmarks import common

    def time_rec(ratio):
        return {"part": "time", "config": "mnist", "batch": 64, "depth": 10, "pairs": 3, "ratios": [ratio] * 3,
                "median_ratio": ratio, "median_standard_s": 2.0, "median_invertible_s": 2.0 * ratio}

    mem = {"part": "memory", "config": "mnist", "axis": "batch", "mode": "standard", "grads": "kept",
           "param_mb": 1.0, "batch": 64, "depth": 10, "peak_mb": 900.0}
    meta = {"device": "Fake CPU", "torch": "x", "date_utc": "then", "device_tag": "cpu-1t"}
    files = []
    for i, recs in enumerate(([mem, time_rec(1.5)], [time_rec(1.2)])):
        path = common.write_results("invertible", {**meta, "git_commit": f"{i}" * 10}, recs, tmp_path / "res")
        files.append(str(path))
    readme = tmp_path / "README.md"
    readme.write_text(f"{B.README_START}\n{B.README_END}\n")
    B.main(["--render", *files, "--readme", str(readme)])
    text = readme.read_text()
    assert "| ... and step time <= 1.4x standard | 1.20x (3 pairs) | yes |" in text  # the later file's time part
    assert "1.50x" not in text and all(Path(f).name in text for f in files)
    merged, used = B.merge_results([common.load_results(f) for f in files])
    assert sorted(r["part"] for r in merged) == ["memory", "time"]  # the earlier file's other parts stay
    assert used == [{"memory mnist/kept"}, {"time"}]


def test_invertible_a_later_file_adding_the_fused_policy_keeps_the_earlier_policies(tmp_path):
    """Memory is replaced per (config, gradient policy): a file measuring only `fused` leaves the earlier file's
    `none` figures in place, and each policy gets its own target row."""
    from benchmarks import bench_invertible as B

    def mem(n, mode, grads, mb):
        return {"part": "memory", "config": "tabular", "axis": "couplings", "mode": mode, "grads": grads,
                "param_mb": 1.0, "batch": 5000, "depth": n, "peak_mb": mb}

    early = [mem(n, m, "none", mb) for n, m, mb in ((4, "standard", 100.0), (4, "invertible", 40.0),
                                                   (32, "standard", 800.0), (32, "invertible", 54.0))]
    late = [mem(n, m, "fused", mb) for n, m, mb in ((4, "standard", 99.0), (4, "invertible", 40.0),
                                                   (32, "standard", 790.0), (32, "invertible", 41.0))]
    records, used = B.merge_results([{"records": early}, {"records": late}])
    assert len(records) == 8 and used == [{"memory tabular/none"}, {"memory tabular/fused"}]
    rows = {r[0]: r[1:] for r in B.targets(records)}
    none = rows["RealNVPTabular 4 -> 32 couplings (gradients none): invertible grows < 15%, standard grows"]
    fused = next(v for k, v in rows.items() if "gradients fused" in k and "step_in_backward=True" in k)
    assert none[1] == "no" and "(+35%)" in none[0]
    assert fused[1] == "yes" and "invertible 40 -> 41 MB (+2%)" in fused[0]
    # a re-measured `none` replaces the earlier one only
    records, _ = B.merge_results([{"records": early + late}, {"records": [mem(4, "invertible", "none", 1.0)]}])
    assert sorted(r["peak_mb"] for r in records if r["grads"] == "none") == [1.0]
    assert len([r for r in records if r["grads"] == "fused"]) == 4
    time_fused = {"part": "time-fused", "config": "tabular", "batch": 5000, "depth": 32, "mode": "invertible",
                  "pairs": 2, "ratios": [1.1, 1.3], "median_ratio": 1.2, "median_none_s": 2.0, "median_fused_s": 2.4}
    readme = tmp_path / "README.md"
    readme.write_text(f"{B.README_START}\n{B.README_END}\n")
    meta = {"device": "Fake CPU", "torch": "x", "git_commit": "0123456789", "date_utc": "now", "device_tag": "cpu-1t"}
    B.write_outputs(records + [time_fused], meta, tmp_path / "res" / "invertible_x.json", readme)
    assert "invertible: 1.20x (2 pairs: 1.10, 1.30; 2.00 s vs 2.40 s)" in readme.read_text()


@requires_native
def test_coupling_layer_benchmark_writes_paired_ratios(tmp_path, capsys):
    from benchmarks import bench_coupling_layer

    out = bench_coupling_layer.main(["--pairs", "3", "--inner", "1", "--batch", "2", "--out-dir", str(tmp_path)])
    recs = {r["mask"]: r for r in out["records"]}
    assert set(recs) == {"channel", "checkerboard"}
    for r in recs.values():
        assert len(r["ratios"]) == 3 and r["median_ratio"] == sorted(r["ratios"])[1] > 0
        assert r["max_rel_err"] < 1e-4  # native and torch backends agree on y, ldj and every gradient
    saved = common.load_results(out["path"])
    assert saved["kind"] == "coupling_layer" and set(saved["summary"]) == {"channel", "checkerboard"}
    assert bench_coupling_layer.main(["--profile", "--batch", "2", "--masks", "checkerboard"]) == {}
    assert "flowgmm_native::coupling_bwd" in capsys.readouterr().out
