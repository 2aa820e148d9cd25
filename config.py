"""Every option of the repo, its default and a one-line doc, plus the config-file loader.

A config file is plain Python assignments (like nanoGPT's `config/*.py`); later files and then
`--key=value` arguments override earlier ones:

    python train.py configs/i_m.py --learning_rate=1e-5 --datasets='[{"instance_data_dir": "img"}]'

Unlike nanoGPT's configurator, a typo'd key is an error naming the closest valid keys, values are
type-checked, `None` defaults can be overridden, and lists/tuples/dicts survive into the logged
`config.json`. A config file may start from another one with `include("demo.py")` (path relative to
the including file).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import json
import subprocess
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

# The five published IF U-Nets, by the names SimpleTuner's guide uses, and their Hub repos: the one list of them.
# Their architectures live in model.FLAVOURS under the same names (a test keeps the two in step); config.py imports
# none of the repo's files. A name starting with "ii-" is a stage II U-Net (Config.stage).
FLAVOUR_REPOS = {
    "i-medium-400m": "DeepFloyd/IF-I-M-v1.0",
    "i-large-900m": "DeepFloyd/IF-I-L-v1.0",
    "i-xlarge-4.3b": "DeepFloyd/IF-I-XL-v1.0",
    "ii-medium-450m": "DeepFloyd/IF-II-M-v1.0",
    "ii-large-1.2b": "DeepFloyd/IF-II-L-v1.0",
}
Flavour = Literal[tuple(FLAVOUR_REPOS)]


def stage_of(unet_config: dict) -> int:
    """1 or 2 from a unet/config.json dict: stage II's U-Net reads 6 channels (its noisy image + the upsampled
    low-res image), stage I's 3."""
    return 2 if unet_config.get("in_channels", 3) == 6 else 1


def torch_dtype(name, device=None):
    """A precision option ("bf16", "fp32", "fp16" or their torch names, a torch.dtype) -> the torch dtype. "auto" or
    None: bf16 where `device` computes it natively (a CUDA GPU with bf16 support: Ampere or newer), else fp32, the
    more precise choice on the CPU and on older GPUs (fp16 is never chosen: T5 overflows in it)."""
    import torch

    if isinstance(name, torch.dtype):
        return name
    if name in (None, "auto"):
        cuda = torch.device(device or "cpu").type == "cuda"
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32,
             "fp16": torch.float16, "float16": torch.float16}
    if str(name).removeprefix("torch.") not in names:
        raise ValueError(f"unknown precision {name!r}: use 'auto', 'bf16' or 'fp32'")
    return names[str(name).removeprefix("torch.")]


def _opt(default, doc: str):
    """A dataclass field with its one-line doc attached (shown by `python train.py --help`)."""
    if isinstance(default, (list, dict, tuple)):
        return field(default_factory=lambda: json.loads(json.dumps(default)), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


@dataclass
class Config:
    # ---- model -----------------------------------------------------------------------------
    model_flavour: Flavour = _opt("i-medium-400m", "which IF U-Net: decides the stage and the default weights")
    pretrained: str | None = _opt(None, "base weights: a diffusers-layout folder or Hub id (default: the flavour's)")
    variant: str | None = _opt(None, "weights variant, e.g. 'fp16' (diffusion_pytorch_model.fp16.safetensors)")
    unet_config: dict | None = _opt(None, "random init from this unet/config.json dict instead of `pretrained`")
    model_type: Literal["lora", "full"] = _opt("lora", "train a LoRA (or DoRA) adapter, or every weight of the U-Net")
    use_dora: bool = _opt(False, "DoRA: LoRA plus a trained per-output-channel magnitude (Liu et al. 2024)")
    use_bitfit: bool = _opt(False, "also train every bias of the U-Net (with model_type='full': train only biases)")
    lora_rank: int = _opt(16, "LoRA rank r")
    lora_alpha: float | None = _opt(None, "LoRA alpha; the update is scaled by alpha/rank (None: alpha = rank)")
    lora_dropout: float = _opt(0.0, "dropout on the LoRA input")
    lora_targets: list | None = _opt(None, "module-name patterns to wrap (None: all attention, text k/v too)")
    lora_init: Literal["default", "gaussian"] = _opt("default", "A's init: kaiming-uniform like peft, or gaussian 1/r")
    attention_mechanism: Literal["sdpa", "xformers", "math"] = _opt("sdpa", "attention kernel")
    gradient_checkpointing: bool | Literal["attention", "full"] = _opt(
        False, "recompute in backward: True/'attention' (about +5% time) or 'full' (least memory, +20-50%)"
    )
    compile: bool | Literal["inductor", "aot_eager"] = _opt(
        False, "torch.compile the U-Net (one graph for forward and backward); True: inductor; aot_eager: for tests"
    )

    # ---- precision -------------------------------------------------------------------------
    mixed_precision: Literal["auto", "bf16", "fp32"] = _opt(
        "auto", "bf16: pure bf16 weights/grads/states, stochastic rounding; auto: bf16 on GPUs that have it, else fp32"
    )
    fp32_master: bool = _opt(False, "with bf16: keep fp32 master weights and optimizer states (for comparison)")

    # ---- memory: what lets IF-I-XL fit small cards (optim.py, quant.py; see the README's GPU table) --------
    optimizer_state: Literal["auto", "8bit"] = _opt(
        "auto", "AdamW moments: auto (as the weights: bf16 with stochastic rounding, or fp32), or 8bit block-wise"
    )
    factored_second_moment: bool = _opt(False, "Adafactor's second moment for matrices: row and column means only")
    fused_backward: bool = _opt(
        False, "step each weight inside backward, free its gradient (no accumulation; clips by the last step's norm)"
    )
    quantise_base: bool = _opt(False, "LoRA: hold the frozen U-Net weights in int8, per-channel scales (QLoRA-style)")

    # ---- loss ------------------------------------------------------------------------------
    loss_type: Literal["hybrid", "mse", "huber", "smooth_l1"] = _opt(
        "hybrid", "hybrid: epsilon MSE + VLB that trains the variance channels (as IF was trained); mse: epsilon "
        "only; huber / smooth_l1: scheduled pseudo-Huber on epsilon (Khrapov et al. 2024), beside hybrid's VLB"
    )
    prediction_type: Literal["epsilon", "v_prediction"] | None = _opt(
        None, "what the U-Net's output predicts: None for the base weights' own (their scheduler config's; IF's: "
        "epsilon; a U-Net built from unet_config: epsilon); v_prediction (v = sqrt(abar) eps - sqrt(1 - abar) x0) "
        "trains one from scratch or converts one in a full fine-tune; a LoRA or bitfit keeps its base's (checked); "
        "written to scheduler/scheduler_config.json, where sample.py reads it"
    )
    vlb_weight: float = _opt(1.0, "weight of the VLB term, relative to improved-DDPM's lambda=0.001 over 1000 steps")
    huber_schedule: Literal["constant", "exponential", "snr"] = _opt(
        "snr", "huber / smooth_l1: how the threshold c moves with t: fixed, huber_c ** (t/T), or by the noise level "
        "(1 at low noise, huber_c at high)"
    )
    huber_c: float = _opt(0.1, "huber / smooth_l1: residuals well below c count squared, above it linearly")
    snr_gamma: float | None = _opt(
        None, "min-SNR-gamma loss weighting (Hang et al. 2023); 5.0 is the paper's choice; None is off (0 an error)"
    )
    use_soft_min_snr: bool = _opt(
        False, "soft min-SNR weighting of the epsilon loss (HDiT, Crowson et al. 2024): 1 / (1 + sigma_data^2 SNR_t); "
        "instead of snr_gamma"
    )
    soft_min_snr_sigma_data: float = _opt(
        0.5, "soft min-SNR's data standard deviation (0.5 for pixels in [-1, 1]); acts as gamma = 1 / sigma_data^2"
    )
    noise_offset: float = _opt(0.0, "offset noise (Guttenberg 2023): add offset * N(0, 1) per sample and channel to "
                                    "the noise; 0.1 is usual, 0 is off")
    noise_offset_probability: float = _opt(
        0.25, "the fraction of samples that get the offset (drawn per sample; SimpleTuner draws once per batch)"
    )
    input_perturbation: float = _opt(
        0.0, "input perturbation (Ning et al. 2023): x_t is made from noise + gamma * N(0, 1), the target stays the "
        "noise; the paper's gamma is 0.1, 0 is off"
    )
    input_perturbation_steps: int = _opt(0, "decay input_perturbation linearly to 0 over this many steps (0: constant)")
    timestep_sampling: Literal["uniform", "stratified"] = _opt(
        "uniform", "how t is drawn per batch: i.i.d. uniform, or one per equal slice of [0, 1000)"
    )
    caption_dropout_probability: float = _opt(0.1, "probability to train on the empty caption (keeps CFG working)")
    noise_aug_range: tuple = _opt((0, 1000), "stage II: low-res noise level drawn uniformly in [lo, hi) per sample")

    # ---- prior preservation (DreamBooth) and regularisation data ------------------------------
    with_prior_preservation: bool = _opt(
        False, "DreamBooth: each step also trains train_batch_size class images of class_prompt (a second forward);"
        " loss = instance loss + prior_loss_weight * prior_loss"
    )
    class_data_dir: str | None = _opt(
        None, "prior preservation: the class images (+ .txt); stage I draws the missing ones up to num_class_images "
        "with the base model; stage II cannot: supply them at its resolution"
    )
    class_prompt: str | None = _opt(None, "prior preservation: every class image's caption, e.g. 'a photo of a dog'")
    num_class_images: int = _opt(100, "prior preservation: at least this many class images (every one found trains)")
    prior_loss_weight: float = _opt(1.0, "prior preservation: weight of the class images' loss")
    sample_batch_size: int = _opt(
        4, "prior preservation: class images per sampler call (drawn with validation_num_inference_steps, "
        "validation_guidance and validation_negative_prompt)"
    )
    regularisation_loss_weight: float = _opt(
        1.0, "datasets with is_regularisation_data=True: weight of their loss, the MSE of the output to the base "
        "model's own (LoRA off; every output channel)"
    )

    # ---- optimizer and schedule ------------------------------------------------------------
    learning_rate: float = _opt(4e-5, "peak learning rate")
    lr_end: float = _opt(4e-6, "final learning rate for decaying schedules")
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine", "polynomial"] = _opt(
        "cosine", "learning-rate schedule after warm-up (linear/cosine/polynomial decay to lr_end)"
    )
    lr_warmup_steps: int = _opt(0, "linear warm-up steps from 0")
    lr_power: float = _opt(1.0, "power of the polynomial schedule")
    adam_beta1: float = _opt(0.9, "AdamW beta1")
    adam_beta2: float = _opt(0.999, "AdamW beta2")
    adam_epsilon: float = _opt(1e-8, "AdamW epsilon")
    adam_weight_decay: float = _opt(1e-2, "AdamW decoupled weight decay")
    max_grad_norm: float | None = _opt(1.0, "clip the global gradient norm to this (None: no clipping)")
    use_ema: bool = _opt(False, "keep an exponential moving average of the trainable weights")
    ema_decay: float = _opt(0.999, "EMA decay per EMA update")
    ema_update_interval: int = _opt(1, "update the EMA every this many optimizer steps")
    ema_warmup_steps: int = _opt(0, "before this step the EMA copies the weights instead of averaging them")
    ema_validation: Literal["none", "ema_only", "comparison"] = _opt(
        "comparison", "with use_ema: validation grids of the raw weights (none), of the EMA (ema_only), or both "
        "side by side with the same seeds (comparison)"
    )
    max_nonfinite_steps: int = _opt(20, "stop after this many consecutive steps with a non-finite loss or gradient")

    # ---- run -------------------------------------------------------------------------------
    train_batch_size: int = _opt(4, "images per step per process")
    gradient_accumulation_steps: int = _opt(1, "micro-batches per optimizer step")
    max_train_steps: int = _opt(1000, "optimizer steps to train")
    seed: int = _opt(42, "seed for everything: data order, noise, timesteps, init")
    output_dir: str = _opt("output", "where checkpoints, samples, logs and final weights go")
    resume_from_checkpoint: str | None = _opt(None, "'latest' or a checkpoint-<step> path to continue from")
    checkpointing_steps: int = _opt(500, "save a checkpoint every this many steps")
    checkpoints_total_limit: int | None = _opt(None, "keep only the newest this many checkpoints (None: keep all)")
    logging_steps: int = _opt(10, "append to metrics.jsonl every this many steps")
    report_to: Literal["none", "tensorboard", "wandb"] = _opt(
        "none", "also log to TensorBoard or Weights & Biases (if installed; wandb: WANDB_MODE=offline to stay local)"
    )
    push_to_hub: bool = _opt(False, "at the end, upload output_dir (weights, model card, samples; no checkpoints or "
                                    "training state) to hub_model_id; a failed upload never fails the run")
    hub_model_id: str | None = _opt(None, "the Hub model repo to upload to, 'user/name' (created if missing); log in "
                                          "first: hf auth login, or set HF_TOKEN")
    hub_private: bool = _opt(True, "create the Hub repo private (an existing repo keeps its visibility)")
    push_checkpoints_to_hub: bool = _opt(False, "also upload each checkpoint's weights and card to the repo, in the "
                                                "background (one commit each)")
    device: str | None = _opt(None, "torch device (None: cuda if available, else cpu)")
    parallelism: Literal["auto", "ddp", "fsdp"] = _opt(
        "auto", "several processes: ddp (a whole model per GPU) or fsdp (each GPU holds 1/N of the weights, "
        "gradients and moments); auto: fsdp for model_type='full', ddp for adapters and bitfit (parallel.py)"
    )
    # Rank 0 validates and writes checkpoints alone while the other ranks wait; a full IF-I-XL checkpoint (weights,
    # moments, EMA: ~35 GB) takes ~12 min at 50 MB/s, and its validation a few more. NCCL's own 10 min would fire.
    distributed_timeout: int = _opt(1800, "several processes: seconds the others wait for rank 0's checkpoint or "
                                          "validation, and for a stop signal to be agreed, before giving up")
    dry_run: bool = _opt(False, "train.py: estimate memory, FLOPs and time of one real-size step on fake tensors, exit")

    # ---- data ------------------------------------------------------------------------------
    datasets: list | str = _opt([], "list of dataset dicts (SimpleTuner's keys) or a multidatabackend.json path")
    dataloader_num_workers: int = _opt(2, "image-decoding worker processes")
    max_aspect_ratio: float = _opt(4.0, "widest bucket aspect ratio (long side / short side)")

    # ---- text encoder and cache ------------------------------------------------------------
    text_encoder: str | None = _opt(None, "T5 folder or Hub id (default: text_encoder/ + tokenizer/ of `pretrained`)")
    text_cache_dir: str | None = _opt(None, "where T5 embeddings are cached (default: cache/t5 beside output_dir)")
    tokenizer_max_length: int = _opt(77, "T5 tokens per caption (IF used 77; T5 can read more)")
    clean_caption: bool = _opt(False, "IF's heavy caption cleaning (needs beautifulsoup4 and ftfy)")
    text_encoder_batch_size: int = _opt(32, "captions per T5 forward when building the cache")
    text_encoder_dtype: Literal["auto", "bf16", "fp32", "int8"] = _opt(
        "auto", "T5 weights' dtype (auto: bf16, fp32 on CPU; int8: int8 weights computing in bf16, half the memory)"
    )

    # ---- validation during training --------------------------------------------------------
    validation_prompt: str | None = _opt(None, "one validation prompt (SimpleTuner's name)")
    validation_prompts: list = _opt([], "validation prompts, one grid row each")
    validation_negative_prompt: str = _opt("", "negative prompt for validation")
    validation_resolution: str | None = _opt(
        None, "comma list of output sizes, e.g. '64,96,64x96,96x64' (WxH); None: the first dataset's resolution"
    )
    validation_steps: int = _opt(100, "make validation grids every this many steps (0: never)")
    validation_num_inference_steps: int = _opt(50, "sampler steps for validation images")
    validation_guidance: float | None = _opt(None, "classifier-free guidance for validation (None: the stage's, 7 / 4)")
    validation_noise_level: int | None = _opt(None, "stage II validation: the low-res input's noise level (None: 250)")
    validation_seed: int = _opt(0, "fixed seed so grids are comparable across steps")
    num_eval_images: int = _opt(4, "stage II validation: upscale this many dataset images (held-out ones first)")
    validation_loss_images: int = _opt(0, "hold this many images out of training; their loss at fixed noise (0: off)")

    # ---- sampling (sample.py) --------------------------------------------------------------
    prompt: str | None = _opt(None, "sample.py: the prompt")
    prompts_file: str | None = _opt(None, "sample.py: a text file with one prompt per line")
    negative_prompt: str = _opt("", "sample.py: negative prompt")
    lora: str | None = _opt(None, "sample.py: a LoRA .safetensors for the stage I U-Net")
    stage2: str | None = _opt(None, "sample.py: stage II weights (folder or Hub id); runs the cascade")
    stage2_lora: str | None = _opt(None, "sample.py: a LoRA .safetensors for the stage II U-Net")
    num_images: int = _opt(1, "sample.py: images per prompt")
    steps: int | None = _opt(None, "sample.py: stage I sampler steps (None: 100, or the timesteps list)")
    guidance: float = _opt(7.0, "sample.py: stage I classifier-free guidance")
    timesteps: str | list | None = _opt(None, "sample.py: 'leading', 'trailing', an IF respacing ('smart100'), a list")
    variance: Literal["auto", "learned_range", "fixed_small"] = _opt(
        "auto", "sample.py: variance (auto: learned_range unless a LoRA says its variance head was not trained)"
    )
    resolution: str = _opt("64", "sample.py: stage I size, 'S' or 'WxH'")
    stage2_steps: int = _opt(50, "sample.py: stage II sampler steps")
    stage2_guidance: float = _opt(4.0, "sample.py: stage II classifier-free guidance")
    noise_level: int = _opt(250, "sample.py: stage II's augmentation level of the low-res input")
    image: str | None = _opt(None, "sample.py: a picture to start from (img2img), to inpaint (with mask) or to upscale")
    mask: str | None = _opt(None, "sample.py: inpainting mask, the image's size: white (>= 50% grey) = repaint")
    strength: float | None = _opt(None, "sample.py: stage I from `image`: share of steps run (None: 0.7; mask: 1.0)")
    stage2_strength: float | None = _opt(
        None, "sample.py: the same for stage II (None: 0.8; upscale_only without a mask: from noise, plain upscaling)"
    )
    upscale_only: bool = _opt(False, "sample.py: skip stage I; stage II (or stage III alone) upscales `image` 4x")
    stage3: str | None = _opt(None, "sample.py: stage III, the x4 upscaler (folder or Hub id); 4x stage II's images")
    stage3_lora: str | None = _opt(None, "sample.py: a LoRA .safetensors for the stage III (x4) U-Net")
    stage3_steps: int = _opt(75, "sample.py: stage III sampler steps")
    stage3_guidance: float = _opt(9.0, "sample.py: stage III classifier-free guidance")
    stage3_noise_level: int = _opt(100, "sample.py: stage III's augmentation level of its input, 0 to 350")

    # ------------------------------------------------------------------------------------------
    @property
    def stage(self) -> int:
        """1 or 2: from `unet_config` (6 input channels = stage II) or else the flavour's name."""
        if self.unet_config is not None:
            return stage_of(self.unet_config)
        return 2 if self.model_flavour.startswith("ii-") else 1

    @property
    def weights(self) -> str:
        """Where the base weights come from: `pretrained`, else the flavour's Hub repo."""
        return self.pretrained or FLAVOUR_REPOS[self.model_flavour]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        """Write the resolved config (plus the code version) as JSON."""
        d = {**self.to_dict(), "_code_version": code_version()}
        Path(path).write_text(json.dumps(d, indent=2, default=str) + "\n")


def code_version() -> str:
    """`git describe` of this repo (with -dirty), or 'unknown' outside a checkout."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=12"],
            cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ---------------------------------------------------------------------------------------------
# type checking of values from files and the command line


def _check_type(value: Any, tp: Any) -> bool:
    if tp is Any:
        return True
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_check_type(value, a) for a in typing.get_args(tp))
    if origin is Literal:
        return value in typing.get_args(tp)
    if tp is type(None):
        return value is None
    if tp is float:  # an int is a fine float; a bool is not
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp in (list, tuple):  # a list and a tuple are interchangeable in a config
        return isinstance(value, (list, tuple))
    return isinstance(value, origin or tp)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


_HINTS: dict | None = None


def _hints() -> dict:
    global _HINTS
    if _HINTS is None:
        _HINTS = typing.get_type_hints(Config)
    return _HINTS


def _set(values: dict, key: str, value: Any, where: str) -> None:
    hints = _hints()
    if key not in hints:
        close = difflib.get_close_matches(key, list(hints), n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(close)}?" if close else " `python train.py --help` lists every option."
        raise ValueError(f"{where}: unknown config key {key!r}.{hint}")
    if not _check_type(value, hints[key]):
        raise TypeError(f"{where}: {key} must be {_type_name(hints[key])}, got {value!r} ({type(value).__name__})")
    values[key] = value


def _run_file(path: Path, values: dict, seen: tuple = ()) -> None:
    """Execute a config file; every public top-level name it defines must be a config key."""
    path = path.resolve()
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    if path in seen:
        raise ValueError(f"config file {path} includes itself")

    def include(rel: str) -> None:
        _run_file(path.parent / rel, values, seen + (path,))
        namespace.update(values)

    namespace: dict = {"include": include, "__file__": str(path), **values}
    before = dict(namespace)
    exec(compile(path.read_text(), str(path), "exec"), namespace)
    for key, value in namespace.items():
        if key.startswith("_") or key == "include" or isinstance(value, (types.ModuleType, types.FunctionType, type)):
            continue
        if key in before and before[key] is value and key in values:
            continue  # untouched (seeded from earlier files)
        _set(values, key, value, str(path))


def _parse_value(text: str) -> Any:
    """`--key=value`: a Python literal if it parses as one, else the raw string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def load_config(argv: list[str] | None = None) -> Config:
    """Config files (in order), then `--key=value` overrides; `--flag` alone means True."""
    argv = sys.argv[1:] if argv is None else argv
    values: dict = {}
    for arg in argv:
        if arg.startswith("--"):
            key, eq, text = arg[2:].partition("=")  # split on the first '=' only
            key, value = key.replace("-", "_"), _parse_value(text) if eq else True
            hint = _hints().get(key)
            if eq and hint and not _check_type(value, hint) and _check_type(text, hint):
                value = text  # --resolution=64 for a str option: the text as typed
            _set(values, key, value, f"argument {arg!r}")
        else:
            _run_file(Path(arg), values)
    cfg = Config(**values)
    if cfg.validation_prompt and cfg.validation_prompt not in cfg.validation_prompts:
        cfg.validation_prompts = [cfg.validation_prompt, *cfg.validation_prompts]
    return cfg


def help_text() -> str:
    """Every option with its default and doc, for `--help`."""
    lines = []
    for f in dataclasses.fields(Config):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"  --{f.name}={default!r}\n      {f.metadata.get('doc', '')}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None, usage: str = "") -> Config:
    """What every entry point calls: handles --help, loads the config."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage or "usage: python SCRIPT.py CONFIG [CONFIG ...] [--key=value ...]")
        print("options:\n" + help_text())
        sys.exit(0 if argv else 2)
    return load_config(argv)
