"""Model cards and Hugging Face Hub uploads for what train.py writes.

    write_card(cfg, "output/corgi", repo_id="me/corgi")     # README.md + grid.png beside the weights
    push("output/corgi", "me/corgi")                         # create the repo if needed, upload the folder
    push("output/corgi/checkpoint-500", "me/corgi", background=True, commit_message="step 500")
    wait()                                                   # the background uploads' results, in order

The card is the Hub's format: YAML front matter (base_model, license, tags, ...) and a markdown body with the last
validation grid, the settings that matter and how to sample the weights here and in diffusers, for what the run
saved (checkpoint.save_weights): a LoRA file (stage I or II) or a full unet/ + scheduler/ (stage I or II).

An upload never raises into the training run: a failure prints one line with the reason, where the files are and
the `hf upload` command that retries it, and returns False. Uploads run one at a time in submission order (one
worker thread), so a checkpoint's commit never lands after the final one's.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import tempfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import data
import lora
import sample
import t5cache
from config import FLAVOUR_REPOS, Config

CARD = "README.md"  # the file the Hub renders as the model card
GRID = "grid.png"  # the validation grid, copied next to the card so a relative link renders on the Hub
# Not uploaded: checkpoint folders (each is pushed on its own, if at all), the optimizer and RNG states a resume
# needs (the size of the weights again, twice for AdamW, and of no use for sampling), and this module's snapshots.
IGNORE = ("checkpoint-*", "*training_state.*", ".hub-*")
STAGE_I_FOR_STAGE_II = FLAVOUR_REPOS["i-xlarge-4.3b"]  # the stage I a stage II card suggests for the cascade

# The card's settings table: options always shown, then options shown only where they differ from the default.
SHOWN = ["model_flavour", "model_type", "loss_type", "learning_rate", "lr_scheduler", "lr_end", "train_batch_size",
         "gradient_accumulation_steps", "mixed_precision", "caption_dropout_probability", "seed"]
SHOWN_LORA = ["lora_rank", "lora_alpha", "lora_targets"]
SHOWN_STAGE_II = ["noise_aug_range"]
SHOWN_IF_SET = ["use_dora", "use_bitfit", "lora_dropout", "quantise_base", "prediction_type", "vlb_weight", "snr_gamma",
                "timestep_sampling", "lr_warmup_steps", "adam_beta1", "adam_beta2", "adam_weight_decay",
                "max_grad_norm", "optimizer_state", "factored_second_moment", "fused_backward", "fp32_master",
                "use_ema", "ema_decay", "tokenizer_max_length", "clean_caption", "text_encoder_dtype"]
TEXT_OPTIONS = ["tokenizer_max_length", "clean_caption", "text_encoder_dtype"]  # how sample.py must encode prompts


# ---------------------------------------------------------------------------------------------
# the model card


def base_model(cfg: Config) -> str | None:
    """The Hub id of the run's base weights, for the card's `base_model` (which must name a Hub repo): cfg.weights
    if it is one, a local folder named like a published IF repo (`hf download DeepFloyd/IF-I-M-v1.0 --local-dir
    weights/IF-I-M-v1.0`) as that repo; None for a random init or any other local folder."""
    if cfg.unet_config is not None:
        return None
    if not Path(cfg.weights).expanduser().exists():
        return cfg.weights if cfg.weights.count("/") == 1 else None
    return {Path(repo).name: repo for repo in FLAVOUR_REPOS.values()}.get(Path(cfg.weights).name)


def last_grid(out: str | Path, step: int | None = None) -> Path | None:
    """The newest validation grid validation.validate wrote in `out`/samples (step-NNNNNN.png), at or before `step`."""
    grids = sorted(Path(out, "samples").glob("step-*.png"))
    grids = [g for g in grids if step is None or int(g.stem.removeprefix("step-")) <= step]
    return grids[-1] if grids else None


def _instance_prompt(cfg: Config) -> str | None:
    """The first trained dataset's instance_prompt (its first, if a list): the Hub's trigger words."""
    for ds in data.load_datasets(cfg, need_images=False):
        prompts = [ds["instance_prompt"]] if isinstance(ds["instance_prompt"], str) else ds["instance_prompt"]
        if prompts and not ds["held_out"]:
            return prompts[0]
    return None


def front_matter(cfg: Config) -> dict:
    """The card's YAML metadata: what the Hub files the model under and links it to."""
    base, kind = base_model(cfg), cfg.model_type
    tags = ["deepfloyd-if", "if-tune", kind] + ["dora"] * cfg.use_dora + ["bitfit"] * cfg.use_bitfit
    tags += ["text-to-image"] if cfg.stage == 1 else ["image-to-image", "super-resolution"]
    return {"base_model": base, "base_model_relation": ("adapter" if kind == "lora" else "finetune") if base else None,
            "library_name": "diffusers", "license": "deepfloyd-if-license",
            "pipeline_tag": "text-to-image" if cfg.stage == 1 else "image-to-image", "tags": tags,
            "instance_prompt": _instance_prompt(cfg)}


def _lora_alpha(cfg: Config) -> float:
    return cfg.lora_rank if cfg.lora_alpha is None else cfg.lora_alpha  # lora.add_lora's rule


def _value(v) -> str:
    return f"`{v!r}`".replace("|", "\\|")  # a | would end the table cell


def settings_table(cfg: Config, step: int) -> str:
    """The options that decide what the weights are, as `key | value` rows (the names train.py takes)."""
    defaults = Config()
    keys = SHOWN + SHOWN_LORA * (cfg.model_type == "lora") + SHOWN_STAGE_II * (cfg.stage == 2)
    keys += [k for k in SHOWN_IF_SET if getattr(cfg, k) != getattr(defaults, k)]
    rows = [("base weights", f"`{cfg.weights}`" if cfg.unet_config is None else "random init (`unet_config`)"),
            ("trained steps", f"{step} of {cfg.max_train_steps}")]
    effective = {"lora_alpha": _lora_alpha(cfg), "lora_targets": list(cfg.lora_targets or lora.DEFAULT_TARGETS)}
    rows += [(f"`{k}`", _value(effective.get(k, getattr(cfg, k)))) for k in keys]
    rows += [(f"dataset `{ds['id']}`", f"{ds['resolution']} px" + (", crops" if ds["crop"] else ""))
             for ds in data.load_datasets(cfg, need_images=False)]
    return "| option | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def _sample_command(cfg: Config, folder: str, prompt: str) -> str:
    """`python sample.py ...` for these weights in `folder`: the T5 the run was trained with and its text options
    given explicitly (this folder is not the base that would say which); the variance comes from the weights."""
    base = base_model(cfg) or cfg.weights  # a local download of a published repo: the repo, as on the Hub
    t5 = t5cache.default_text_encoder(cfg)
    if cfg.stage == 1:
        args = [f"--pretrained={base}", f"--lora={folder}/{lora.LORA_FILE}"] if cfg.model_type == "lora" else [
            f"--pretrained={folder}"]
    else:
        args = [f"--pretrained={STAGE_I_FOR_STAGE_II}", f"--stage2={base}",
                f"--stage2_lora={folder}/{lora.LORA_FILE}"] if cfg.model_type == "lora" else [
            f"--pretrained={STAGE_I_FOR_STAGE_II}", f"--stage2={folder}"]
    args.append(f"--text_encoder={base if t5 == cfg.weights else t5}")
    defaults = Config()
    args += [f"--{k}={getattr(cfg, k)}" for k in TEXT_OPTIONS if getattr(cfg, k) != getattr(defaults, k)]
    args.append(f"--prompt={prompt}")
    return "python sample.py " + " ".join("=".join(map(shlex.quote, a.split("=", 1))) for a in args)


def _diffusers_code(cfg: Config, variance: str, where: str, is_repo: bool, prompt: str) -> str:
    """Python that loads these weights into IFPipeline (stage I) or IFSuperResolutionPipeline (stage II), with
    `variance`, up to `pipe.to("cuda")`, then one call."""
    pipeline = "IFPipeline" if cfg.stage == 1 else "IFSuperResolutionPipeline"
    base = base_model(cfg) or cfg.weights
    fp16 = ', variant="fp16"' if base in FLAVOUR_REPOS.values() else ""  # the DeepFloyd repos have fp16 files
    names, imports, lines = {pipeline}, set(), []  # what it imports from diffusers, its other imports, its code
    if cfg.model_type == "lora":
        lines.append(f'pipe = {pipeline}.from_pretrained("{base}"{fp16}, torch_dtype=torch.float16)')
        if cfg.use_bitfit:  # before the LoRA: peft renames the bias of a layer it wraps (lora.py)
            imports.add("from safetensors.torch import load_file")
            if is_repo:
                imports.add("from huggingface_hub import hf_hub_download")
            file = f'hf_hub_download("{where}", "{lora.BIASES_FILE}")' if is_repo else f'"{where}/{lora.BIASES_FILE}"'
            lines += [f"biases = load_file({file})  # the trained biases, applied before the LoRA",
                      'pipe.unet.load_state_dict({k.removeprefix("unet."): v for k, v in biases.items()}, '
                      "strict=False)"]
        lines.append(f'pipe.load_lora_weights("{where}")')
        if variance != "learned_range":  # the base's scheduler samples learned_range
            names.add("DDPMScheduler")
            lines.append("pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config, "
                         f'variance_type="{variance}")')
    else:
        names |= {"DDPMScheduler", "UNet2DConditionModel"}
        lines += [f'unet = UNet2DConditionModel.from_pretrained("{where}", subfolder="unet", '
                  "torch_dtype=torch.float16)",
                  f'scheduler = DDPMScheduler.from_pretrained("{where}", subfolder="scheduler")  # variance_type='
                  f'"{variance}"']
        if cfg.unet_config is None:
            lines.append(f'pipe = {pipeline}.from_pretrained("{base}", unet=unet, scheduler=scheduler{fp16}, '
                         "torch_dtype=torch.float16)")
        else:  # a random init has no base pipeline: its parts, with the run's T5
            imports.add("from transformers import T5EncoderModel, T5Tokenizer")
            noising = ' image_noising_scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2"),' * (cfg.stage == 2)
            lines += [f't5 = "{t5cache.default_text_encoder(cfg)}"',
                      f'pipe = {pipeline}(tokenizer=T5Tokenizer.from_pretrained(t5, subfolder="tokenizer"), '
                      'text_encoder=T5EncoderModel.from_pretrained(t5, subfolder="text_encoder", '
                      f"torch_dtype=torch.float16), unet=unet, scheduler=scheduler,{noising} safety_checker=None, "
                      "feature_extractor=None, watermarker=None, requires_safety_checker=False)"]
    lines.append('pipe.to("cuda")')
    call = f"{prompt!r}, clean_caption={cfg.clean_caption}"  # the pipelines clean captions unless told not to
    if cfg.stage == 1:
        lines.append(f"image = pipe({call}).images[0]  # 64 px")
    else:
        imports.add("from PIL import Image")
        lines += ['low_res = Image.open("stage_I_64px.png")  # a stage I image',
                  f"image = pipe(image=low_res, prompt={call}).images[0]  # 4x its size"]
    head = ["import torch", f"from diffusers import {', '.join(sorted(names))}", *sorted(imports)]
    return "\n".join(head + [""] + lines)


def saved_variance(cfg: Config, directory: str | Path) -> str:
    """The variance the weights checkpoint.save_weights wrote in `directory` sample with: the LoRA file's metadata, or
    the scheduler config beside unet/, each read as sample.auto_variance reads it."""
    directory = Path(directory)
    if cfg.model_type == "lora":
        return sample.auto_variance(lora.read_lora_metadata(directory / lora.LORA_FILE), None)
    return sample.auto_variance(None, json.loads((directory / "scheduler" / "scheduler_config.json").read_text()))


def card_text(cfg: Config, variance: str, *, repo_id: str | None = None, folder: str | Path = ".",
              step: int | None = None, grid: bool = False) -> str:
    """The model card for the weights checkpoint.save_weights wrote for `cfg` (in `folder`, or on the Hub at `repo_id`),
    which sample with `variance` (saved_variance), at training step `step` (None: the last); `grid`: whether
    grid.png lies beside it."""
    import yaml  # a huggingface_hub dependency

    step = cfg.max_train_steps if step is None else step
    stage, lora_run = "I" if cfg.stage == 1 else "II", cfg.model_type == "lora"
    meta = {k: v for k, v in front_matter(cfg).items() if v is not None}
    name = repo_id.split("/")[-1] if repo_id else Path(cfg.output_dir).name
    prompt = meta.get("instance_prompt") or (cfg.validation_prompts or ["a photograph"])[0]
    base = f"[{meta['base_model']}](https://huggingface.co/{meta['base_model']})" if "base_model" in meta else (
        f"`{cfg.weights}`" if cfg.unet_config is None else None)
    unet = f"the stage {stage} U-Net of {base}" if base else f"a randomly initialised IF stage {stage} U-Net"
    if lora_run:
        what = f"A {'DoRA' if cfg.use_dora else 'LoRA'} (rank {cfg.lora_rank}, alpha {_lora_alpha(cfg):g}) for {unet}"
        files = f"`{lora.LORA_FILE}`" + (f" and the trained biases, `{lora.BIASES_FILE}`" if cfg.use_bitfit else "")
    else:
        what = f"{unet[0].upper()}{unet[1:]}, {'its biases' if cfg.use_bitfit else 'every weight'} fine-tuned"
        files = "`unet/` (the U-Net, diffusers' layout) and `scheduler/` (its sampler config)"
    job = "draws 64 px images from text" if cfg.stage == 1 else "upscales stage I's 64 px images 4x, to 256 px"
    checkpoint = Path(folder).name.startswith("checkpoint-")
    at = f" This is the checkpoint at step {step}." if checkpoint or step != cfg.max_train_steps else ""
    if cfg.use_ema:  # checkpoints hold the raw weights (the EMA is in their training state); the end, the EMA's
        at += (" These are the raw trained weights, not their EMA." if checkpoint else
               f" These are the EMA of the trained weights (decay {cfg.ema_decay:g}), not the raw ones.")
    out = [f"# {name}", "",
           f"{what} (DeepFloyd IF's stage {stage} {job}), trained with if-tune for {cfg.max_train_steps} steps.{at} "
           f"Files: {files}.", ""]
    if grid:
        shows = ("each validation prompt (a row) at each validation size, the same seed for every image"
                 if cfg.stage == 1 else "each row a validation picture: its low-res version, the upscale, the original")
        out += [f"![validation images at step {step}]({GRID})", "", f"Validation at step {step}: {shows}.", ""]
    loss = f"`loss_type={cfg.loss_type!r}`"
    why = (f"{loss} trained the U-Net's variance channels too" if variance == "learned_range" else
           f"{loss} did not train the U-Net's variance channels, which no longer fit the fine-tuned epsilon")
    reads = ("the LoRA file's metadata (`variance_trained`) says so" if lora_run
             else f"`scheduler/scheduler_config.json` has `variance_type: {variance}`")
    local = name if repo_id else str(folder)
    fetch = [f"hf download {repo_id} --local-dir {shlex.quote(name)}"] if repo_id else []
    cascade = (f"add `--stage2={FLAVOUR_REPOS['ii-large-1.2b']}` for 256 px" if cfg.stage == 1 else
               f"stage II runs after a stage I, here `{STAGE_I_FOR_STAGE_II}` (any IF stage I of the same T5)")
    out += ["## Sampling", "", f"Sample with `variance_type=\"{variance}\"`: {why}; {reads}.", ""]
    if lora_run and cfg.unet_config is not None:
        out += ["The LoRA's base is the run's own random init, so it applies to no published U-Net.", ""]
    else:
        out += ["With if-tune's `sample.py`:", "", "```bash", *fetch, _sample_command(cfg, local, prompt), "```", "",
                f"It reads the variance from the weights; {cascade}.", "",
                f"With diffusers ({'IFPipeline' if cfg.stage == 1 else 'IFSuperResolutionPipeline'}):", "",
                "```python", _diffusers_code(cfg, variance, repo_id or str(folder), bool(repo_id), prompt), "```", ""]
        if cfg.quantise_base:
            out += ["The LoRA was trained on an int8 copy of the base (`quantise_base`); diffusers applies it to the "
                    "fp16 base, sample.py to the int8 one it was trained on.", ""]
    out += ["## Training settings", "", settings_table(cfg, step), "",
            "The DeepFloyd IF weights, and what is fine-tuned from them, come under DeepFloyd's non-commercial "
            "research licence.", ""]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n\n" + "\n".join(out)


def write_card(cfg: Config, directory: str | Path, *, repo_id: str | None = None, step: int | None = None,
               grid: str | Path | None = None) -> Path:
    """Write README.md (the model card) into `directory`, the folder checkpoint.save_weights filled (output_dir or a
    checkpoint-N), and copy the validation grid beside it as grid.png. `repo_id`: where the folder will be pushed
    (the card's code loads from it; None: from `directory`). `step`: the step the weights are from (None: the
    last). `grid`: the PNG to show (None: the newest grid in output_dir/samples at or before `step`).
    Returns the card's path."""
    directory = Path(directory)
    grid = Path(grid) if grid is not None else last_grid(cfg.output_dir, step)
    if grid is not None and grid.is_file():
        shutil.copyfile(grid, directory / GRID)
    text = card_text(cfg, saved_variance(cfg, directory), repo_id=repo_id, folder=directory, step=step,
                     grid=(directory / GRID).is_file())
    (directory / CARD).write_text(text)
    return directory / CARD


# ---------------------------------------------------------------------------------------------
# uploads

_uploads: ThreadPoolExecutor | None = None  # one worker: uploads happen in the order they were asked for
_pending: list[Future] = []
_lock = threading.Lock()


def retry_command(directory: str | Path, repo_id: str, private: bool | None = None,
                  ignore_patterns=IGNORE) -> str:
    """The `hf upload` command that does what push does."""
    args = ["hf", "upload", repo_id, str(directory)] + ["--private"] * bool(private)
    for pattern in ignore_patterns:
        args += ["--exclude", pattern]
    return shlex.join(args)


def _failed(directory: Path, repo_id: str, error: Exception, private, ignore_patterns) -> bool:
    """The one line a failed upload prints: why, where the files are, how to retry. -> False."""
    reason = " ".join(f"{type(error).__name__}: {error}".split())[:300]
    print(f"upload of {directory} to {repo_id} failed ({reason}); the files are in {directory}; retry with: "
          f"{retry_command(directory, repo_id, private, ignore_patterns)}", flush=True)
    return False


def _upload(directory: Path, source: Path, repo_id: str, token, private, commit_message, ignore_patterns,
            api) -> bool:
    """create_repo + upload_folder of `source` (the folder or its snapshot); any failure is printed, not raised."""
    try:
        if api is None:
            from huggingface_hub import HfApi

            api = HfApi(token=token)
        repo = api.create_repo(repo_id, private=private, exist_ok=True).repo_id  # "name" gains the user's namespace
        api.upload_folder(repo_id=repo, folder_path=str(source), ignore_patterns=ignore_patterns,
                          commit_message=commit_message or f"Upload {directory.name}")
        print(f"uploaded {directory} to https://huggingface.co/{repo}", flush=True)
        return True
    except Exception as e:  # anything: a failed upload must not end the run whose files it was sending
        return _failed(directory, repo_id, e, private, ignore_patterns)
    finally:
        if source != directory:
            shutil.rmtree(source, ignore_errors=True)


def _snapshot(directory: Path, ignore_patterns: list[str]) -> Path:
    """Hard links to the files to upload (copies where links fail), in a hidden folder beside `directory`: a
    background upload then sends the folder as it was, even if the run deletes or replaces it meanwhile
    (checkpoints_total_limit, a checkpoint saved again at the same step)."""
    from huggingface_hub.utils import filter_repo_objects

    stage = Path(tempfile.mkdtemp(prefix=f".hub-{directory.name}-", dir=directory.parent))
    files = [p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()]
    for rel in filter_repo_objects(files, ignore_patterns=ignore_patterns):  # the upload's own matching
        (stage / rel).parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(directory / rel, stage / rel)
        except OSError:
            shutil.copy2(directory / rel, stage / rel)
    return stage


def push(directory: str | Path, repo_id: str, *, token: str | None = None, private: bool | None = None,
         background: bool = False, commit_message: str | None = None, ignore_patterns=IGNORE,
         api=None) -> bool | Future:
    """Upload `directory` to the Hub model repo `repo_id` ("user/name"; created if missing, `private` then),
    without the files `ignore_patterns` match (IGNORE: checkpoint folders and training states). `token`: None
    uses the stored login or HF_TOKEN. Returns True, or False after printing why, where the files are and the
    `hf upload` command that retries; never raises. background=True: snapshot the folder (hard links) and upload
    it in a worker thread, returning a Future of that bool; a later push(background=False) or wait() waits for it
    first. `api`: an object with HfApi's create_repo and upload_folder (tests pass a stand-in)."""
    global _uploads
    directory = Path(directory)
    args = (repo_id, token, private, commit_message, list(ignore_patterns), api)
    if not background:
        wait()
        return _upload(directory, directory, *args)
    try:
        source = _snapshot(directory, list(ignore_patterns))
    except Exception as e:  # e.g. the folder is gone, or the disk is full
        done: Future = Future()
        done.set_result(_failed(directory, repo_id, e, private, ignore_patterns))
        return done
    with _lock:
        _uploads = _uploads or ThreadPoolExecutor(max_workers=1, thread_name_prefix="hub-upload")
        future = _uploads.submit(_upload, directory, source, *args)
        _pending.append(future)
    return future


def wait() -> list[bool]:
    """Wait for every background upload started so far; their results (True: uploaded), oldest first."""
    with _lock:
        futures = list(_pending)
        _pending.clear()
    return [f.result() for f in futures]
