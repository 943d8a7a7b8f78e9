"""`dpo-dist bench` end to end on the tiny model: the JSON is complete and well formed, and honest (both sides did the
same work). Speeds are never asserted: they belong in docs/benchmarks.md, not in a test."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e  # each bench invocation trains the tiny model on both sides

TINY = ["--steps", "2", "--repeats", "1", "--model-size", "tiny", "--micro-batch", "4"]
TINY_LOGITS = ["--logits-vocab", "8192", "--logits-hidden", "64", "--logits-seq", "32"]
SIDE_KEYS = {"real_tokens_per_s", "step_time_s", "padding_fraction", "peak_mem_mib"}
RUN_KEYS = SIDE_KEYS | {"steps", "timed_steps", "timed_s", "pairs", "real_tokens", "total_tokens", "peak_rss_mib",
                        "trainer_class", "wall_s", "warmup_s"}


def _bench(tmp: Path, *args: str, stdout: bool = False) -> tuple[dict, str]:
    """`stdout`: --json -, whose stdout must be the JSON alone (library import noise goes to stderr)."""
    out = tmp / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "dpo_dist.cli", "bench", *args, "--json", "-" if stdout else str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(proc.stdout if stdout else out.read_text()), proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def realistic(tmp_path_factory):
    return _bench(tmp_path_factory.mktemp("bench-realistic"), "--workload", "dpo", "--lengths", "realistic",
                  *TINY, *TINY_LOGITS)


@pytest.fixture(scope="module")
def uniform(tmp_path_factory):
    return _bench(tmp_path_factory.mktemp("bench-uniform"), "--workload", "dpo", "--lengths", "uniform", *TINY,
                  "--no-logits", stdout=True)


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_report_is_complete_and_ratios_are_b_over_a(realistic):
    report, output = realistic
    assert report["command"].startswith("dpo-dist bench --workload dpo --lengths realistic")
    for side in ("A", "B"):
        med = report["medians"][side]
        assert set(med) == SIDE_KEYS | {"method", "ref_prepass_s"}
        for key in ("real_tokens_per_s", "step_time_s", "peak_mem_mib"):
            assert _positive(med[key]), (side, key, med[key])
        assert 0 <= med["padding_fraction"] < 1
        (run,) = report["runs"][side]
        assert RUN_KEYS <= set(run)
        assert run["steps"] == run["timed_steps"] == 2 and _positive(run["warmup_s"])
        # B computes the reference log-probs of its pairs before step 1, into its own empty cache, and pays for it
        assert (run["ref_prepass_s"] > 0) == (side == "B")
        assert run["timed_s"] == pytest.approx(run["ref_prepass_s"] + sum(run["step_times_s"]), abs=0.01)
    for key in SIDE_KEYS:
        a, b = report["medians"]["A"][key], report["medians"]["B"][key]
        if a:
            assert report[f"ratio_{key}"] == pytest.approx(b / a)
    assert _positive(report["ratio_real_tokens_per_s"])
    # The logits micro-benchmark: B/A of the measured peaks, and both paths compute the same log-probs.
    logits = report["logits"]
    assert set(logits) == {"trl", "dpo_dist", "materialized"}
    for result in logits.values():
        assert _positive(result["peak_mib"]) and result["tokens"] == 2 * 4 * 32 and result["vocab"] == 8192
    assert report["ratio_logits_peak_mem"] == pytest.approx(logits["dpo_dist"]["peak_mib"] / logits["trl"]["peak_mib"])
    assert logits["trl"]["logps_sum"] == pytest.approx(logits["materialized"]["logps_sum"], rel=1e-4)
    assert logits["dpo_dist"]["logps_sum"] == pytest.approx(logits["trl"]["logps_sum"], rel=1e-4)
    assert "ratio_real_tokens_per_s_realistic" in report["targets"] and "ratio_logits_peak_mem" in report["targets"]
    assert "B/A" in output and "[bench] run 1/2" in output  # the table, and progress on stderr


def test_both_sides_did_the_same_work(realistic, uniform):
    for report, _ in (realistic, uniform):
        work = report["same_work"]
        assert work["equal"], work
        assert work["pairs_a"] == work["pairs_b"] == report["data"]["rows"] == 2 * 4
        assert work["real_tokens_a"] == work["real_tokens_b"] > 0
        # Row by row, the sides tokenize the same text to the same ids (same template, no truncation).
        rows = work["rows"]
        assert rows["checked"] and rows["token_counts_agree"], rows
        assert rows["rows_a"] == rows["rows_b"] == rows["rows_identical_ids"] == 8
        assert "note" not in work
        assert report["runs"]["A"][0]["trainer_class"] == "DPOTrainer"
        assert report["runs"]["B"][0]["trainer_class"] != "DPOTrainer"  # dpo-dist's own subclass


def test_realistic_lengths_pad_more_than_uniform_ones(realistic, uniform):
    padding = {name: report["medians"]["A"]["padding_fraction"] for name, (report, _) in
               (("realistic", realistic), ("uniform", uniform))}
    assert padding["realistic"] > padding["uniform"], padding
    assert uniform[0]["ratio_logits_peak_mem"] is None and "logits" not in uniform[0]


def test_sft_workload_runs_and_is_honest(tmp_path):
    report, _ = _bench(tmp_path, "--workload", "sft", "--lengths", "realistic", *TINY, "--no-logits")
    assert report["same_work"]["equal"], report["same_work"]
    assert report["same_work"]["rows"]["token_counts_agree"], report["same_work"]["rows"]
    assert report["runs"]["A"][0]["trainer_class"] == "SFTTrainer"
    assert _positive(report["ratio_real_tokens_per_s"])


def test_data_workload_reports_both_sizes_and_kinds_with_the_same_work(tmp_path):
    report, output = _bench(tmp_path, "--workload", "data", "--data-rows", "300,600", "--repeats", "1",
                            "--num-proc", "2")
    assert report["command"].startswith("dpo-dist bench --workload data --data-rows 300,600")
    assert [(r["kind"], r["rows"]) for r in report["results"]] == [("sft", 300), ("sft", 600), ("pretrain", 300),
                                                                   ("pretrain", 600)]
    for r in report["results"]:
        assert r["same_work"]["equal"], r["same_work"]
        for side in ("A", "B"):
            assert all(_positive(r["medians"][side][k]) for k in ("rows_per_s", "tokens_per_s", "peak_tree_rss_mib",
                                                                   "peak_tree_anon_mib"))
        assert r["ratios"]["rows_per_s"] == pytest.approx(r["medians"]["B"]["rows_per_s"] /
                                                          r["medians"]["A"]["rows_per_s"])
        if r["kind"] == "sft":
            assert r["tokens"]["B"] > r["tokens"]["A"]  # B's rows carry the chat template's tokens too
    assert set(report["growth"]) == {"sft", "pretrain"}
    assert report["growth"]["sft"]["at_1m_rows"]["rows"] == 1_000_000
    assert "extrapolated to 1M rows" in output and "B/A" in output


@pytest.mark.distributed
def test_sp_workload_runs_both_profiles_on_the_same_rows_and_reports_each_ranks_peak(tmp_path):
    report, output = _bench(tmp_path, "--workload", "sp", "--sp-seq", "256", "--steps", "1", "--repeats", "1",
                            "--model-size", "tiny")
    assert report["profiles"] == ["cpu-zero3-2", "cpu-zero3-sp-2"] and report["same_first_loss"], report
    dp, sp = (report["runs"][p][0] for p in report["profiles"])
    assert len(dp["peak_rss_mib"]) == len(sp["peak_rss_mib"]) == 2 and all(_positive(v) for v in sp["peak_rss_mib"])
    assert dp["sequence_parallel"] is None and sp["sequence_parallel"]["degree"] == 2
    assert dp["tokens"] == sp["tokens"] > 0  # the same rows, counted once per sequence under sequence parallelism
    assert _positive(report["ratio_real_tokens_per_s"]) and _positive(report["ratio_max_rank_peak_rss"])
    assert "peak RSS, largest rank (MiB)" in output
