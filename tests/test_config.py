import json

import pytest

from config import Config, load_config


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
