"""bench.py's bookkeeping (the measurements themselves run only in `python bench.py`)."""

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
