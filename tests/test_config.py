import json

import pytest

from config import FLAVOUR_REPOS, Config, load_config, stage_of, torch_dtype


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_file_then_overrides(tmp_path):
    f = write(tmp_path, "c.py", "learning_rate = 1e-4\nlora_rank = 8\nvalidation_prompts = ['a cat']\n")
    cfg = load_config([f, "--lora_rank=4", "--output_dir=out/x", "--gradient_checkpointing"])
    assert cfg.learning_rate == 1e-4 and cfg.lora_rank == 4 and cfg.output_dir == "out/x"
    assert cfg.gradient_checkpointing is True and cfg.validation_prompts == ["a cat"]


def test_split_on_first_equals_and_string_fallback():
    cfg = load_config(["--validation_prompt=a=b c", "--text_encoder=some/repo"])
    assert cfg.validation_prompt == "a=b c" and cfg.validation_prompts == ["a=b c"]
    assert cfg.text_encoder == "some/repo"
    # a number typed for a str option is kept as typed; where the option takes numbers too, it stays a number
    cfg = load_config(["--resolution=64", "--validation_resolution=0064", "--prompt=1e3", "--timesteps=27"])
    assert (cfg.resolution, cfg.validation_resolution, cfg.prompt, cfg.timesteps) == ("64", "0064", "1e3", "27")
    assert load_config(["--timesteps=[999, 500, 0]"]).timesteps == [999, 500, 0]
    with pytest.raises(TypeError, match="lora_rank must be int"):
        load_config(["--lora_rank=4.5"])


def test_unknown_key_names_closest(tmp_path):
    with pytest.raises(ValueError, match="learning_rate"):
        load_config(["--learning_rat=1"])
    f = write(tmp_path, "c.py", "lora_rnak = 4\n")
    with pytest.raises(ValueError, match="lora_rank"):
        load_config([f])


def test_types_checked_int_ok_for_float():
    assert load_config(["--learning_rate=1"]).learning_rate == 1
    with pytest.raises(TypeError, match="lora_rank must be int"):
        load_config(["--lora_rank=1.5"])
    with pytest.raises(TypeError, match="model_type"):
        load_config(["--model_type=qlora"])
    with pytest.raises(TypeError):
        load_config(["--gradient_checkpointing=3"])


def test_none_default_can_be_overridden_and_reset():
    assert load_config(["--lora_alpha=8"]).lora_alpha == 8
    assert load_config(["--snr_gamma=5.0", "--snr_gamma=None"]).snr_gamma is None


def test_structures_survive_into_logged_config(tmp_path):
    f = write(tmp_path, "c.py", "noise_aug_range = (0, 500)\ndatasets = [{'id': 'x', 'repeats': 2}]\n")
    cfg = load_config([f])
    cfg.save(tmp_path / "config.json")
    d = json.loads((tmp_path / "config.json").read_text())
    assert d["noise_aug_range"] == [0, 500] and d["datasets"] == [{"id": "x", "repeats": 2}]
    assert "_code_version" in d


def test_include_and_helpers_ignored(tmp_path):
    write(tmp_path, "base.py", "lora_rank = 8\nmax_train_steps = 10\n")
    text = "import math\ninclude('base.py')\n_tmp = 3\nmax_train_steps = max_train_steps * _tmp\n"
    f = write(tmp_path, "child.py", text)
    cfg = load_config([f])
    assert cfg.lora_rank == 8 and cfg.max_train_steps == 30


def test_stage_from_flavour_or_unet_config():
    assert Config().stage == 1
    assert Config(model_flavour="ii-large-1.2b").stage == 2
    assert Config(unet_config={"in_channels": 6}).stage == 2
    assert Config(model_flavour="i-xlarge-4.3b").weights == "DeepFloyd/IF-I-XL-v1.0"


def test_defaults_are_not_shared():
    a, b = Config(), Config()
    a.validation_prompts.append("x")
    assert b.validation_prompts == []


def test_shipped_configs():
    """Every file in configs/ loads; the per-model ones carry SimpleTuner's DeepFloyd guide's recipe for their
    stage (the LoRA's; a full fine-tune takes a lower learning rate), need only `pretrained` (default: the flavour's
    Hub repo) and an image folder, and keep their outputs apart."""
    from pathlib import Path

    from model import FLAVOURS

    configs = Path(__file__).resolve().parents[1] / "configs"
    assert {p.stem for p in configs.glob("*.py")} >= {"demo", "demo_lora", "demo_ii", "i_m", "i_l", "i_xl", "ii_m",
                                                      "ii_l"}
    outputs = set()
    for path in sorted(configs.glob("*.py")):
        cfg = load_config([str(path)])
        outputs.add(cfg.output_dir)
        if path.stem.startswith("demo"):
            continue
        flavour = FLAVOURS[cfg.model_flavour]
        want = (stage_of(flavour["config"]), FLAVOUR_REPOS[cfg.model_flavour], None)
        assert (cfg.stage, cfg.weights, cfg.pretrained) == want, path.name
        if cfg.model_type == "lora":  # the guide's recipe is a LoRA's
            assert (cfg.learning_rate, cfg.lr_end, cfg.lora_rank) == (4e-5, 4e-6, 32), path.name
        else:  # a full fine-tune moves every weight: a lower rate than the LoRA's
            assert cfg.learning_rate < 4e-5, path.name
        ds = cfg.datasets[0]
        res = flavour["resolution"]
        assert (ds["resolution"], ds["resolution_type"], ds["crop"]) == (res, "pixel", True)
        assert (ds["minimum_image_size"], ds["maximum_image_size"], ds["target_downsample_size"]) == \
            (res, 4 * res, 2 * res)  # the guide's 64 / 256 / 128, scaled to the stage
        assert ds["instance_data_dir"] == "data/my_images"
    assert len(outputs) == len(list(configs.glob("*.py")))


def test_stage_of_a_unet_config():
    assert stage_of({"in_channels": 6}) == 2 and stage_of({"in_channels": 3}) == 1 and stage_of({}) == 1


def test_auto_precision_is_fp32_without_a_bf16_gpu():
    import torch

    assert torch_dtype("auto", "cpu") == torch.float32 and torch_dtype(None) == torch.float32
    assert torch_dtype("bf16") == torch.bfloat16 and torch_dtype("torch.float16") == torch.float16
    with pytest.raises(ValueError, match="unknown precision"):
        torch_dtype("int8")
