"""FSDP (parallel.py) on the CPU with gloo: sharded checkpoints resume exactly at the same number of processes and
correctly at another. (That 2 sharded processes train like 1, and that a signal to one rank stops all: see the
multi-process tests in tests/test_train.py.)"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import config, project, torchrun, weights, write_config  # noqa: F401 (project: a fixture)

import train

ROOT = Path(__file__).resolve().parents[1]


def test_sharded_checkpoints_resume_exactly_and_on_another_world_size(project, tmp_path):  # noqa: F811
    """Six steps on 2 sharded ranks (A); three more from A's checkpoint of step 3 on 2 ranks equal A bit for bit,
    and on 1 rank equal A within the bound of test_two_gloo_processes_equal_one (1e-5: the only difference left is
    the order fp32 sums the gradient); three on 1 rank, then three on 2, likewise. fp32 weights and moments and an
    EMA, so the resharded moments are exact too."""
    cfg = config(project, tmp_path, max_train_steps=6, checkpointing_steps=3, train_batch_size=2, adam_epsilon=1e-3,
                 parallelism="fsdp", use_ema=True, mixed_precision="fp32")
    path = write_config(cfg, tmp_path / "c.py")

    def launch(out, nproc, steps, resume=False):
        args = [ROOT / "train.py", path, f"--output_dir={tmp_path / out}", f"--max_train_steps={steps}",
                f"--train_batch_size={4 // nproc}"] + ["--resume_from_checkpoint=latest"] * resume
        done = torchrun(*args, nproc=nproc)
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    launch("a", 2, 6)
    middle = tmp_path / "a" / "checkpoint-3"
    state = json.loads((middle / "training_state.json").read_text())
    assert state["sharded"] and state["world_size"] == 2 and (middle / "sharded").is_dir()
    assert not load_file(str(middle / "training_state.safetensors")).keys() - {
        "rng.train", "rng.cpu"}  # moments and EMA are in sharded/, the weights in unet/
    for out, nproc in (("b2", 2), ("b1", 1)):
        shutil.copytree(middle, tmp_path / out / "checkpoint-3")
        assert "resumed from" in launch(out, nproc, 6, resume=True).stdout
    launch("c", 1, 3)
    launch("c", 2, 6, resume=True)
    a = weights(tmp_path / "a")
    init = {k: v.clone() for k, v in weights(middle).items()}
    assert max((a[k] - init[k]).abs().max().item() for k in a) > 1e-4  # the last three steps moved the weights
    b2 = weights(tmp_path / "b2")
    assert all(torch.equal(a[k], b2[k]) for k in a)
    for out in ("b1", "c"):
        other = weights(tmp_path / out)
        assert max((a[k] - other[k]).abs().max().item() for k in a) < 1e-5, out


def test_sharded_ranks_validate_together_and_the_checkpoint_needs_fsdp(project, tmp_path):  # noqa: F811
    """Sharded, every rank runs the validation forwards (each gathers the weights): the held-out loss, the raw and
    the EMA grid are written by rank 0 and the run ends; its checkpoint, given to an unsharded run, is refused with
    how to resume it."""
    cfg = config(project, tmp_path, max_train_steps=2, checkpointing_steps=2, parallelism="fsdp", use_ema=True,
                 validation_steps=2, validation_prompts=["a red square"], validation_num_inference_steps=2,
                 validation_resolution="32", validation_loss_images=2)
    path = write_config(cfg, tmp_path / "c.py")
    done = torchrun(ROOT / "train.py", path, "--train_batch_size=1")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(x) for x in open(tmp_path / "out" / "metrics.jsonl")]
    assert [r["step"] for r in rows if "eval_loss" in r] == [0, 2]
    assert (tmp_path / "out" / "samples" / "step-000002.png").is_file()
    with pytest.raises(ValueError, match="resume it under torchrun with parallelism='fsdp'"):
        train.main(config(project, tmp_path, max_train_steps=4, resume_from_checkpoint="latest", use_ema=True))
