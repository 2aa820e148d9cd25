"""bench.py: its bookkeeping, and the smoke run on the CPU (the measurements run only in `python bench.py`)."""

import math

import torch

import bench


def test_rounds_merge_to_medians_and_skip_failed_runs():
    runs = [{"step_s": 3.0, "peak_mib": 10, "mfu": None}, None, {"step_s": 1.0, "peak_mib": 12, "mfu": None},
            {"step_s": 2.0, "peak_mib": 14, "mfu": None}]
    merged = bench.merge(runs)
    assert merged == {"step_s": 2.0, "peak_mib": 12, "mfu": None, "rounds": 3, "step_s_each": [3.0, 1.0, 2.0]}
    assert bench.merge([None, {"step_s": 5.0}]) == {"step_s": 5.0}  # one round: reported as measured
    assert bench.merge([None]) is None


def test_plan_measures_t5_at_xxl_size_on_a_gpu():
    args = {"only": ["t5"], "flavour": "i-medium-400m", "attention": "sdpa"}
    cpu = [kw for _, _, kw, _ in bench.plan({**args, "device": "cpu"})]
    gpu = [kw for _, _, kw, _ in bench.plan({**args, "device": "cuda"})]
    assert [kw["dtype"] for kw in cpu] == ["fp32", "bf16"] and cpu[0]["d_model"] == 512
    assert [(kw["dtype"], kw["d_model"], kw["layers"], kw["heads"], kw["d_ff"]) for kw in gpu] == [
        ("bf16", 4096, 24, 64, 10240)]  # T5 v1.1 XXL, IF's text encoder


def test_smoke_rows_cover_every_mode_and_compile_each_mode_and_checkpointing():
    rows = bench.smoke_rows("cuda")
    assert {r["stage"] for r in rows} == {1, 2}
    assert {r["kind"] for r in rows} == set(bench.KINDS)
    assert {r["ckpt"] for r in rows} == {False, "attention", "full"}
    assert {r["attention"] for r in rows} == {"sdpa", "math", "xformers"}
    compiled = [r for r in rows if r["compile"]]
    assert {r["kind"] for r in compiled} >= {"lora", "dora", "full", "bitfit"}
    assert {r["ckpt"] for r in compiled} == {False, "attention", "full"} and {r["stage"] for r in compiled} == {1, 2}
    for r in compiled:  # each has its eager twin
        assert {**r, "compile": False} in rows
    assert [r for r in bench.smoke_rows("cpu") if r["compile"]] == compiled[:1]  # inductor is slow on a CPU


def test_compiled_step_off_its_eager_twin_fails_the_row():
    row = {"stage": 1, "kind": "lora", "ckpt": False, "attention": "sdpa", "compile": False}

    def results(loss, grad_norm):
        first = {"loss": 1.0, "grad_norm": 0.5}
        eager = {"row": row, "status": "ok", "detail": "", "steps": [first, first]}
        compiled = {"row": {**row, "compile": True}, "status": "ok", "detail": "",
                    "steps": [{"loss": loss, "grad_norm": grad_norm}, first]}
        return [eager, compiled]

    for device, loss, grad_norm, ok in [("cpu", 1.0 + 5e-5, 0.5, True), ("cpu", 1.001, 0.5, False),
                                        ("cpu", 1.0, 0.501, False), ("cuda", 1.001, 0.51, True),
                                        ("cuda", 1.01, 0.5, False), ("cuda", 1.0, 0.55, False),
                                        ("cuda", float("nan"), 0.5, False)]:
        got = results(loss, grad_norm)
        bench.compare_compiled(got, device)
        assert (got[1]["status"] == "ok") == ok and ("MISMATCH" in got[1]["detail"]) != ok, (device, loss, grad_norm)
        assert got[0]["status"] == "ok" and "vs eager" in got[1]["detail"]


def test_cpu_smoke_trains_every_eager_row_and_samples_and_reports_a_broken_row(tmp_path):
    """The CPU smoke without its compiled row (inductor takes minutes on two cores; tests/test_compile.py covers
    compiling), with a row that cannot run (an attention kernel that does not exist) among the others."""
    rows = [r for r in bench.smoke_rows("cpu") if not r["compile"]]
    broken = {**rows[0], "attention": "flash"}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # these models gain nothing from a second thread and lose 10x on a busy machine
    try:
        results = {r["name"]: r for r in bench.smoke("cpu", tmp_path, [rows[0], broken, *rows[1:]])}
    finally:
        torch.set_num_threads(threads)
    bad = results.pop(bench.row_name(broken))
    assert bad["status"] == "FAILED" and "attention backend must be" in bad["detail"]
    assert "\n" not in bad["detail"]
    for r in results.values():
        if r["name"].endswith("xformers, eager"):  # CUDA only
            assert r["status"] == "skipped"
            continue
        assert r["status"] == "ok", r
        if "steps" in r:  # a training row
            assert len(r["steps"]) == 2 and all(math.isfinite(v) for step in r["steps"] for v in step.values())
    assert len(results) == len(rows) + 2  # and the two sampler rows
