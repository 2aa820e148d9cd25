"""Prior preservation (DreamBooth's class images) and regularisation data (SimpleTuner's parent-teacher)."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import config, project  # noqa: F401  (project is a fixture)

import data
import lora
import prior
import sample
import train

CLASS_PROMPT = "a white square"


def prior_config(root, tmp_path, out="out", **kw):
    values = dict(model_type="lora", lora_rank=4, mixed_precision="bf16", with_prior_preservation=True,
                  class_data_dir=str(tmp_path / "class"), class_prompt=CLASS_PROMPT, num_class_images=3,
                  sample_batch_size=2, validation_num_inference_steps=2, output_dir=str(tmp_path / out))
    return config(root, tmp_path, **{**values, **kw})


def rows(out: Path) -> list[dict]:
    return [r for r in map(json.loads, open(out / "metrics.jsonl")) if "loss" in r]


def test_class_images_are_drawn_once_and_prior_runs_resume_exactly(project, tmp_path, monkeypatch):  # noqa: F811
    """The missing class images are drawn (in sample_batch_size batches, PNG + caption), a later run draws none,
    an interrupted drawing draws only the rest, the prior loss is logged apart, and stopping at step 2 of 4 and
    resuming gives the straight run's LoRA bit for bit (both loaders' positions are in the checkpoint)."""
    drawn, real = [], sample.stage1
    monkeypatch.setattr(sample, "stage1", lambda unet, text, *a, **k: drawn.append(len(text)) or real(unet, text, *a,
                                                                                                         **k))
    train.main(prior_config(project, tmp_path, "a"))
    pngs = sorted((tmp_path / "class").glob("*.png"))
    assert drawn == [2, 1] and [p.name for p in pngs] == [f"class-{i:05d}.png" for i in range(3)]
    assert all(p.with_suffix(".txt").read_text().strip() == CLASS_PROMPT for p in pngs)
    mtimes = [p.stat().st_mtime_ns for p in pngs]
    for row in rows(tmp_path / "a"):
        assert row["prior_loss"] > 0 and "regularisation_loss" not in row
        assert row["loss"] == pytest.approx(row["mse"] + row["vlb"] + row["prior_loss"], rel=1e-5)

    train.main(prior_config(project, tmp_path, "b", max_train_steps=2))
    (tmp_path / "b" / lora.LORA_FILE).unlink()
    train.main(prior_config(project, tmp_path, "b", resume_from_checkpoint="latest"))
    assert drawn == [2, 1] and [p.stat().st_mtime_ns for p in pngs] == mtimes  # reused, not redrawn
    state = json.loads((tmp_path / "b" / "checkpoint-2" / "training_state.json").read_text())
    seen = [s["epoch"] * s["steps_per_epoch"] + s["step"] for s in (state["data"], state["class_data"])]
    assert seen == [2, 2]  # batches handed out by each loader
    a, b = (load_file(str(tmp_path / d / lora.LORA_FILE)) for d in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["prior_loss"] for r in rows(tmp_path / "b")] == [r["prior_loss"] for r in rows(tmp_path / "a")]

    pngs[1].unlink()  # as if drawing had stopped there: only the missing one is drawn, under the free name
    train.main(prior_config(project, tmp_path, "c", max_train_steps=1))
    assert drawn == [2, 1, 1] and pngs[1].exists() and len(list((tmp_path / "class").glob("*.png"))) == 3


def test_the_class_loader_serves_the_class_images_alone(project, tmp_path):  # noqa: F811
    cfg = prior_config(project, tmp_path)
    folder = tmp_path / "class"
    folder.mkdir()
    for i in range(3):
        data.Image.new("RGB", (40, 40), (9 * i, 0, 0)).save(folder / f"c{i}.png")
    loader = data.make_class_loader(cfg)
    assert sorted(Path(e[0]).name for e in loader.items.entries) == ["c0.png", "c1.png", "c2.png"]
    batch = next(iter(loader))
    assert batch["captions"] == [CLASS_PROMPT] * 2 and batch["pixels"].shape[-2:] == (32, 32)
    assert (tmp_path / "out" / "class" / "skipped.txt").exists()  # beside, not over, the instance loader's


def test_prior_and_regularisation_options_are_checked(project, tmp_path):  # noqa: F811
    with pytest.raises(ValueError, match="class_prompt"):
        train.check_options(prior_config(project, tmp_path, class_prompt=None), world=1)
    with pytest.raises(ValueError, match="fused_backward"):
        train.check_options(prior_config(project, tmp_path, fused_backward=True), world=1)
    with pytest.raises(ValueError, match="stage II cannot draw"):
        cfg = prior_config(project, tmp_path, stage=2, unet_config=None)
        prior.make_class_images(cfg, None, None, "cpu", torch.float32, 0, None, False)
    with pytest.raises(ValueError, match="frozen copy of the whole U-Net"):
        train.check_options(reg_config(project, tmp_path, model_type="full"), world=1)
    with pytest.raises(ValueError, match="use_bitfit=False"):
        train.check_options(reg_config(project, tmp_path, use_bitfit=True), world=1)


def reg_config(root, tmp_path, **kw):
    ds = {"id": "teacher", "instance_data_dir": str(root / "imgs"), "caption_strategy": "filename",
          "resolution": 32, "minimum_image_size": 32, "is_regularisation_data": True}
    return config(root, tmp_path, **{"model_type": "lora", "lora_rank": 4, "datasets": [ds], **kw})


def test_regularisation_only_data_has_zero_loss_on_a_fresh_lora(project, tmp_path):  # noqa: F811
    """A fresh LoRA (B = 0) is the base model: its output equals the base's exactly, so the loss and its gradient
    are zero, and the adapter stays where it started."""
    train.main(reg_config(project, tmp_path, max_train_steps=2, checkpointing_steps=100))
    logged = rows(tmp_path / "out")
    assert [(r["regularisation_loss"], r["loss"], r["mse"]) for r in logged] == [(0.0, 0.0, 0.0)] * 2
    B = [v for k, v in load_file(str(tmp_path / "out" / lora.LORA_FILE)).items() if "lora_B" in k]
    assert B and all(not v.any() for v in B)


def test_the_regularisation_target_is_the_base_models_prediction(project, tmp_path, monkeypatch):  # noqa: F811
    """With a LoRA that has learned something, the target is what the U-Net without any adapter predicts for the
    same noisy input, timestep and text, the trained forward runs with the LoRA back on, and the logged loss is
    their MSE over every output channel, weighted."""
    cfg = reg_config(project, tmp_path, caption_dropout_probability=0.0, regularisation_loss_weight=0.5)
    r = train.setup(cfg)
    with torch.no_grad():
        for name, p in r.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    base_unet, _, _ = train.setup_model(dataclasses.replace(cfg, model_type="full"), r.device, r.dtype)
    calls, outputs, real = [], [], prior.base_prediction
    monkeypatch.setattr(prior, "base_prediction", lambda *a: calls.append(a) or real(*a))
    r.unet.register_forward_hook(lambda m, args, out: outputs.append(out.detach().clone()))
    batch = next(iter(r.loader))
    assert batch["regularisation"].tolist() == [True, True]
    row = train.train_step(r, iter([batch]))
    (_, x_in, t, text, level), (target, trained) = calls[0], outputs
    with torch.no_grad():
        assert torch.equal(target, base_unet(x_in, t, text, noise_level=level))
    assert (trained - target).abs().max() > 1e-3  # the LoRA was on again for the trained forward
    mse = ((trained.float() - target.float()) ** 2).mean()
    assert row["regularisation_loss"] == pytest.approx(mse.item(), rel=1e-5) and row["mse"] == 0
    assert row["loss"] == pytest.approx(0.5 * mse.item(), rel=1e-5)


def test_regularisation_flags_follow_the_samples_on_every_rank(project, tmp_path):  # noqa: F811
    """Mixed datasets: each sample's flag is its dataset's, and rank r's slice of a global batch says what the
    same samples say in one process."""
    plain = {"id": "plain", "instance_data_dir": str(project / "imgs"), "caption_strategy": "filename",
             "resolution": 32, "minimum_image_size": 32}
    cfg = reg_config(project, tmp_path, train_batch_size=2)
    cfg.datasets = [plain, cfg.datasets[0]]
    one = data.Loader(dataclasses.replace(cfg, train_batch_size=4), 0, 1)
    halves = [data.Loader(cfg, rank, 2) for rank in range(2)]
    flags = [b["regularisation"].tolist() for b in one]
    assert {tuple(f) for f in flags} == {(True,) * 4, (False,) * 4}  # a batch comes from one dataset
    for rank, loader in enumerate(halves):
        assert [b["regularisation"].tolist() for b in loader] == [f[2 * rank : 2 * rank + 2] for f in flags]


def test_two_processes_draw_the_class_images_once_and_train_as_one(project, tmp_path):  # noqa: F811
    """Under torchrun rank 0 draws the class images while the other waits, and two processes with half the batch
    each (instance and class) give the LoRA one process gives (within test_train's two-process bound)."""
    from test_train import run, torchrun, write_config

    cfg = prior_config(project, tmp_path, max_train_steps=2, train_batch_size=4, adam_epsilon=1e-3,
                       mixed_precision="fp32")
    path = write_config(cfg, tmp_path / "c.py")
    two = torchrun(train.__file__, path, f"--output_dir={tmp_path / 'two'}", "--train_batch_size=2")
    assert two.returncode == 0, two.stderr[-3000:]
    assert len(list((tmp_path / "class").glob("*.png"))) == 3 == len(list((tmp_path / "class").glob("*.txt")))
    one = run(path, f"--output_dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr[-2000:]
    a, b = (load_file(str(tmp_path / d / lora.LORA_FILE)) for d in ("one", "two"))
    assert max(v.abs().max().item() for k, v in a.items() if "lora_B" in k) > 5e-4  # training moved B off zero
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
