"""hub.py: the model card (front matter, grid, commands) for stage I and II, LoRA and full, read back by the
tools it names (config.load_config for sample.py's flags, diffusers for its code), and uploads that never raise
or reach the network."""

import re
import shlex
import shutil
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from PIL import Image

import checkpoint
import diffusion
import hub
import lora
import t5cache
from config import FLAVOUR_REPOS, Config, load_config
from model import UNet, build, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "a photo of sks dog"
BASE = {1: FLAVOUR_REPOS["i-medium-400m"], 2: FLAVOUR_REPOS["ii-large-1.2b"]}


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any connection attempt fails the test (HF_HUB_OFFLINE, set in conftest.py, stops huggingface_hub first)."""
    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    return t5cache.make_tiny_t5(tmp_path_factory.mktemp("t5"), [PROMPT, "a dog", ""])


def run_config(tmp_path, stage, model_type, **kw) -> Config:
    """A run's config as train.py would hold it at the end (the dataset folder need not exist for the card)."""
    values = dict(model_flavour="i-medium-400m" if stage == 1 else "ii-large-1.2b", pretrained=BASE[stage],
                  model_type=model_type, lora_rank=4, lora_alpha=8.0, output_dir=str(tmp_path / "out"),
                  max_train_steps=20, validation_prompts=["a dog"] if stage == 1 else [],
                  datasets=[{"instance_data_dir": str(tmp_path / "imgs"), "caption_strategy": "instanceprompt",
                             "instance_prompt": PROMPT}])
    return Config(**{**values, **kw})


def trained_unet(cfg: Config, unet: UNet) -> UNet:
    """`unet` as a run of `cfg` leaves it: a LoRA (and biases) with non-zero weights, or every weight moved."""
    torch.manual_seed(0)
    if cfg.model_type == "lora":
        params = lora.add_lora(unet, cfg.lora_rank, cfg.lora_alpha)
        params += lora.mark_bitfit(unet) if cfg.use_bitfit else []
    else:
        params = list(unet.parameters())
    with torch.no_grad():
        for p in params:
            p.add_(0.1 * torch.randn_like(p))
    return unet.eval()


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


def split_card(path: Path) -> tuple[dict, str]:
    """(front matter, body) of a model card: the YAML between the first two `---` lines, then markdown."""
    empty, front, body = path.read_text().split("---\n", 2)
    assert empty == ""
    return yaml.safe_load(front), body


# ---------------------------------------------------------------------------------------------
# the card


CASES = [(1, "lora", "hybrid"), (1, "full", "mse"), (2, "lora", "mse"), (2, "full", "hybrid")]


@pytest.mark.parametrize("stage,model_type,loss_type", CASES)
def test_card_says_what_the_folder_holds(tmp_path, stage, model_type, loss_type):
    cfg = run_config(tmp_path, stage, model_type, loss_type=loss_type)
    out = Path(cfg.output_dir)
    (out / "samples").mkdir(parents=True)
    for step, colour in ((10, "red"), (20, "blue")):
        Image.new("RGB", (8, 8), colour).save(out / "samples" / f"step-{step:06d}.png")
    ckpt = out / "checkpoint-15"
    ckpt.mkdir()
    checkpoint.save_weights(trained_unet(cfg, build(tiny_config(stage))), cfg, ckpt, cfg.weights)
    meta, body = split_card(hub.write_card(cfg, ckpt, repo_id="me/corgi", step=15))

    assert meta["base_model"] == BASE[stage] and meta["license"] == "deepfloyd-if-license"
    assert meta["base_model_relation"] == ("adapter" if model_type == "lora" else "finetune")
    assert meta["library_name"] == "diffusers" and meta["instance_prompt"] == PROMPT
    assert {"deepfloyd-if", model_type} <= set(meta["tags"])
    assert meta["pipeline_tag"] == ("text-to-image" if stage == 1 else "image-to-image")
    # the newest grid at or before step 15, beside the card and linked relatively
    assert "](grid.png)" in body
    assert (ckpt / "grid.png").read_bytes() == (out / "samples" / "step-000010.png").read_bytes()
    assert "checkpoint at step 15" in body and "| trained steps | 15 of 20 |" in body
    assert ("| `lora_rank` | `4` |" in body) == (model_type == "lora")

    variance = diffusion.sampler_variance(loss_type)
    assert hub.saved_variance(cfg, ckpt) == variance  # what save_weights wrote, read back as sample.py reads it
    assert f'Sample with `variance_type="{variance}"`' in body
    (python,) = code_blocks(body, "python")
    pipeline, other = ("IFPipeline", "IFSuperResolutionPipeline")[:: 1 if stage == 1 else -1]
    assert f"{pipeline}.from_pretrained" in python and other not in body
    if model_type == "lora":
        assert 'pipe.load_lora_weights("me/corgi")' in python
        # the base's scheduler samples learned_range: only fixed_small needs a line
        assert ('variance_type="fixed_small"' in python) == (variance == "fixed_small")
    else:
        assert 'UNet2DConditionModel.from_pretrained("me/corgi", subfolder="unet"' in python
        assert 'DDPMScheduler.from_pretrained("me/corgi", subfolder="scheduler")' in python

    # sample.py's command line, parsed by the config loader sample.py uses
    (bash,) = code_blocks(body, "bash")
    fetch, command = bash.strip().splitlines()
    assert fetch == "hf download me/corgi --local-dir corgi"
    argv = shlex.split(command)
    assert argv[:2] == ["python", "sample.py"]
    args = load_config(argv[2:])
    assert args.prompt == PROMPT and args.text_encoder == BASE[stage]  # the T5 the run trained with
    weights = "corgi/" + lora.LORA_FILE if model_type == "lora" else "corgi"
    if stage == 1:
        assert (args.pretrained, args.lora) == ((BASE[1], weights) if model_type == "lora" else ("corgi", None))
    else:
        assert args.stage == 1 and args.pretrained in FLAVOUR_REPOS.values()  # a stage I before it
        assert (args.stage2, args.stage2_lora) == ((BASE[2], weights) if model_type == "lora" else ("corgi", None))


def test_card_of_a_random_init_and_its_options(tmp_path, t5):
    """No base_model for a random init (the Hub wants a repo id there); the text options sample.py needs are passed;
    the variance is read from scheduler/ also where the run's config.json lies beside it."""
    cfg = run_config(tmp_path, 1, "full", pretrained=None, unet_config=tiny_config(1), text_encoder=str(t5),
                     tokenizer_max_length=12, clean_caption=True, snr_gamma=5.0, loss_type="mse")
    out = Path(cfg.output_dir)
    out.mkdir()
    cfg.save(out / "config.json")  # the final output_dir, as train.setup leaves it
    checkpoint.save_weights(trained_unet(cfg, build(cfg.unet_config)), cfg, out, "random init")
    meta, body = split_card(hub.write_card(cfg, out))
    assert 'Sample with `variance_type="fixed_small"`' in body
    assert "base_model" not in meta and "base_model_relation" not in meta
    assert not (out / "grid.png").exists() and "grid.png" not in body  # no validation grid yet: no image
    (bash,) = code_blocks(body, "bash")
    args = load_config(shlex.split(bash.strip())[2:])
    assert (args.pretrained, args.text_encoder, args.tokenizer_max_length, args.clean_caption) == (
        str(out), str(t5), 12, True)
    assert "| `snr_gamma` | `5.0` |" in body and "`vlb_weight`" not in body  # set options only
    assert "clean_caption=True" in code_blocks(body, "python")[0]


def test_base_model_names_a_hub_repo(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert hub.base_model(Config(pretrained="DeepFloyd/IF-I-XL-v1.0")) == "DeepFloyd/IF-I-XL-v1.0"
    assert hub.base_model(Config()) == FLAVOUR_REPOS["i-medium-400m"]
    assert hub.base_model(Config(pretrained=".")) is None  # a local folder of unknown origin
    assert hub.base_model(Config(unet_config=tiny_config(1))) is None
    Path("weights/IF-I-L-v1.0").mkdir(parents=True)  # as `hf download ... --local-dir` names a published repo
    assert hub.base_model(Config(pretrained="weights/IF-I-L-v1.0")) == "DeepFloyd/IF-I-L-v1.0"


# ---------------------------------------------------------------------------------------------
# the card's diffusers code, run as written (up to pipe.to("cuda"); fp32 on the CPU)


def base_pipeline(folder: Path, stage: int, t5: Path) -> Path:
    """A tiny IF pipeline folder of the stage (T5, tokenizer, U-Net, IF's scheduler), as the DeepFloyd repos are."""
    import diffusers
    from transformers import T5EncoderModel, T5Tokenizer

    torch.manual_seed(stage)
    build(tiny_config(stage)).save_pretrained(folder / "unet")
    parts = dict(tokenizer=T5Tokenizer.from_pretrained(t5, subfolder="tokenizer"),
                 text_encoder=T5EncoderModel.from_pretrained(t5, subfolder="text_encoder"),
                 unet=diffusers.UNet2DConditionModel.from_pretrained(folder / "unet"),
                 scheduler=diffusers.DDPMScheduler.from_config(diffusion.scheduler_config(stage)),
                 safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False)
    if stage == 2:
        parts["image_noising_scheduler"] = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    (diffusers.IFPipeline if stage == 1 else diffusers.IFSuperResolutionPipeline)(**parts).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("stage,model_type,loss_type,bitfit,base", [
    (1, "lora", "hybrid", False, True), (2, "lora", "mse", True, True),
    (1, "full", "mse", False, True), (2, "full", "hybrid", False, False),  # False: a random init, the run's T5
])
def test_diffusers_code_loads_the_folder(tmp_path, t5, stage, model_type, loss_type, bitfit, base):
    kw = dict(pretrained=str(base_pipeline(tmp_path / "base", stage, t5))) if base else dict(
        pretrained=None, unet_config=tiny_config(stage), text_encoder=str(t5))
    cfg = run_config(tmp_path, stage, model_type, loss_type=loss_type, use_bitfit=bitfit, **kw)
    out = Path(cfg.output_dir)
    out.mkdir()
    torch.manual_seed(stage)
    ours = trained_unet(cfg, UNet.from_pretrained(cfg.weights) if base else build(cfg.unet_config))
    checkpoint.save_weights(ours, cfg, out, cfg.weights)
    _, body = split_card(hub.write_card(cfg, out))
    (code,) = code_blocks(body, "python")
    code = code[: code.index('pipe.to("cuda")')].replace("torch.float16", "torch.float32")
    scope: dict = {}
    exec(code, scope)
    pipe = scope["pipe"]

    assert type(pipe).__name__ == ("IFPipeline" if stage == 1 else "IFSuperResolutionPipeline")
    assert pipe.scheduler.config.variance_type == diffusion.sampler_variance(loss_type)
    if model_type == "full":
        theirs = pipe.unet.state_dict()
        assert all(torch.equal(v, theirs[k]) for k, v in ours.state_dict().items())
        return
    g = torch.Generator().manual_seed(0)
    x, t, text = torch.randn(1, 3 * stage, 16, 16, generator=g), torch.tensor([500]), torch.randn(1, 5, 32, generator=g)
    level = torch.tensor([250]) if stage == 2 else None
    with torch.no_grad():
        want = ours(x, t, text, noise_level=level)
        got = pipe.unet(x, t, text, class_labels=level).sample
        plain = UNet.from_pretrained(cfg.weights)(x, t, text, noise_level=level)
    assert (want - plain).abs().max() > 1e-3  # the LoRA (and biases) change the output...
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # ...and diffusers applies them as we do


# ---------------------------------------------------------------------------------------------
# uploads


class FakeApi:
    """HfApi's create_repo and upload_folder, recording what they were asked and which files the upload sends
    (matched with huggingface_hub's own filter, as upload_folder matches). `fail`: upload_folder raises it;
    `gate`: the first upload waits for it."""

    def __init__(self, fail: Exception | None = None, gate: threading.Event | None = None):
        self.fail, self.gate, self.calls, self.uploads = fail, gate, [], []

    def create_repo(self, repo_id, private=None, exist_ok=False):
        self.calls.append(("create_repo", repo_id, private, exist_ok))
        return SimpleNamespace(repo_id=repo_id if "/" in repo_id else f"me/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, ignore_patterns, commit_message):
        from huggingface_hub.utils import filter_repo_objects

        if self.gate is not None and not self.uploads:
            assert self.gate.wait(10)
        if self.fail is not None:
            raise self.fail
        root = Path(folder_path)
        files = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
        sent = {f: (root / f).read_bytes() for f in filter_repo_objects(files, ignore_patterns=ignore_patterns)}
        self.uploads.append(SimpleNamespace(repo_id=repo_id, folder=folder_path, files=sent, message=commit_message))


def output_folder(root: Path) -> Path:
    """What a LoRA run leaves in output_dir: weights, card, grid, samples, logs, and a checkpoint."""
    for name in ("README.md", "grid.png", lora.LORA_FILE, "config.json", "samples/step-000010.png",
                 "checkpoint-10/" + lora.LORA_FILE, "checkpoint-10/training_state.safetensors",
                 "checkpoint-10/training_state.json"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(name.encode())
    return root


def test_push_sends_weights_card_and_samples_not_training_state(tmp_path, capsys):
    api = FakeApi()
    out = output_folder(tmp_path / "out")
    assert hub.push(out, "corgi", private=True, api=api) is True
    assert api.calls == [("create_repo", "corgi", True, True)]
    (up,) = api.uploads
    assert up.repo_id == "me/corgi"  # the namespaced id create_repo returned
    assert set(up.files) == {"README.md", "grid.png", lora.LORA_FILE, "config.json", "samples/step-000010.png"}
    assert capsys.readouterr().out.strip() == f"uploaded {out} to https://huggingface.co/me/corgi"
    ckpt = out / "checkpoint-10"
    assert hub.push(ckpt, "me/corgi", api=api, commit_message="step 10")
    assert set(api.uploads[-1].files) == {lora.LORA_FILE} and api.uploads[-1].message == "step 10"


@pytest.mark.parametrize("api", [FakeApi(fail=RuntimeError("403 Forbidden:\n  no write access")), None])
def test_failed_push_returns_false_and_says_how_to_retry(tmp_path, capsys, api):
    """None: the real HfApi, which HF_HUB_OFFLINE stops before any request."""
    out = output_folder(tmp_path / "my out")
    assert hub.push(out, "me/corgi", token="hf_not_a_token", private=True, api=api) is False
    (line,) = capsys.readouterr().out.strip().splitlines()
    assert line.startswith(f"upload of {out} to me/corgi failed (")
    assert ("403 Forbidden: no write access" if api else "OfflineModeIsEnabled") in line
    assert f"the files are in {out}" in line
    retry = shlex.split(line.split("retry with: ")[1])
    assert retry[:5] == ["hf", "upload", "me/corgi", str(out), "--private"]
    assert retry[5:] == [a for p in hub.IGNORE for a in ("--exclude", p)]


def test_background_push_uploads_the_folder_as_it_was(tmp_path):
    """A checkpoint deleted while it waits to upload (checkpoints_total_limit) still goes up whole; a later push
    waits for it, so commits land in the order asked for."""
    gate, out = threading.Event(), output_folder(tmp_path / "out")
    api = FakeApi(gate=gate)
    ckpt = out / "checkpoint-10"
    future = hub.push(ckpt, "me/corgi", background=True, api=api, commit_message="step 10")
    shutil.rmtree(ckpt)
    final = threading.Thread(target=hub.push, args=(out, "me/corgi"), kwargs=dict(api=api))
    final.start()
    time.sleep(0.2)
    assert not api.uploads  # the final push is waiting behind the checkpoint's
    gate.set()
    final.join(10)
    assert future.result() is True and hub.wait() == []
    assert [u.message for u in api.uploads] == ["step 10", "Upload out"]
    assert api.uploads[0].files == {lora.LORA_FILE: f"checkpoint-10/{lora.LORA_FILE}".encode()}
    assert not list(out.glob(".hub-*"))  # the snapshot is gone


def test_background_failure_is_a_false_result(tmp_path, capsys):
    api = FakeApi(fail=OSError("connection reset"))
    out = output_folder(tmp_path / "out")
    hub.push(out / "checkpoint-10", "me/corgi", background=True, api=api)
    assert hub.wait() == [False]
    assert "connection reset" in capsys.readouterr().out
