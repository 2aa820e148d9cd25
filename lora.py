"""LoRA, DoRA and bitfit for any nn.Module, addressed by module name, in the file format diffusers reads.

    params = add_lora(unet, rank=16, alpha=16)              # freeze the U-Net, wrap its attention projections
    params += mark_bitfit(unet)                               # optionally train every bias as well
    ...                                                       # train `params`
    save_lora(unet, "out/pytorch_lora_weights.safetensors")  # loads with diffusers' pipe.load_lora_weights(...)
    save_lora(unet, path, biases=True)                        # with the trained biases (a second file, see Files)
    load_lora(unet, "a_lora_from_elsewhere.safetensors")     # ours, peft/diffusers, old and mixed forms
    merge_lora(unet)                                          # fold into the base weights, e.g. to export

LoRA (Hu et al. 2021, eq. 3): y = W x + b + s * B A dropout(x), s = alpha / r, A [r, in], B [out, r].
A starts as peft does (Kaiming-uniform with a=sqrt(5), or normal with std 1/r: init="gaussian") and B at zero,
so a fresh injection is exactly the identity.
DoRA (Liu et al. 2024, eq. 5): W' = m * (W + s B A) / ||W + s B A||_c, with a trained magnitude m [out] that starts
at the row norms of W; the norm is a constant for autograd (paper section 4.3), as in peft.

How a layer is wrapped. A targeted nn.Linear / nn.Conv2d stays the same object in the same place; its class is
switched to a subclass (LoRALinear / LoRAConv2d) whose forward adds the adapters, which live in ParameterDicts on it
(`lora_A`, `lora_B`, `lora_magnitude`, keyed by adapter name, so several LoRAs can sit side by side). Hence the base
parameters keep their names (`...to_q.weight`, `...to_q.bias`: a base checkpoint still loads strictly, LoRA keys
aside), `.to()`, hooks, `load_state_dict(assign=True)` and isinstance checks keep working, torch.compile sees plain
modules (no hooks, no parametrize), and unwrapping is switching the class back.

Memory. Everything is computed on the forward path, W + s B A is never built for autograd. For backward a LoRA
layer saves what the base layer saves (its input, and W by reference) plus the rank-r activation A x (and A, B);
dropout > 0 adds its mask and the dropped input. DoRA also saves one output-sized tensor (for the gradient of m);
its norm ||W + s B A|| is computed under no_grad from a transient fp32 copy, so nothing of it is kept.

Targets are module-name patterns: a pattern matches a module whose dotted name equals it or ends with "." + it
("to_out.0" matches "mid_block.attentions.0.to_out.0", "to_q" does not match "add_to_q"), as peft matches
`target_modules`; a pattern starting with "re:" is a regular expression that must match the whole name.

Files: safetensors with `unet.<module>.lora_A.weight` [r, in] (conv [r, in, kh, kw]), `unet.<module>.lora_B.weight`
[out, r] (conv [out, r, 1, 1]) and, for DoRA, `unet.<module>.lora_magnitude_vector` [out] (conv [1, out, 1, 1]),
the keys peft and diffusers write. The safetensors metadata entry "lora_adapter_metadata" is the JSON that diffusers
passes to peft's LoraConfig (keys "unet.r", "unet.lora_alpha", "unet.target_modules", "unet.use_dora", ...), so a
non-default alpha survives `pipe.load_lora_weights(path)` and `unet.load_lora_adapter(path, prefix="unet")`.
load_lora skips `text_encoder.*` keys (diffusers writes them when T5 was trained too), with a warning: LoRAs apply to
the U-Net only here.

Trained biases (bitfit) are written as `unet.<parameter name>` (`unet.down_blocks.0.resnets.0.conv1.bias`), plain
diffusers parameter names, in a file whose metadata has "bitfit": "true". Next to a LoRA that is a second file,
`bitfit_biases.safetensors` in the same folder (so one such LoRA per folder), which the LoRA file's metadata entry
"bitfit_biases" names and load_lora reads with it; without a LoRA (bitfit alone) it is the file itself. They cannot
share a file with a LoRA that diffusers reads (0.42): `pipe.load_lora_weights` refuses any key without "lora" in it
("Invalid LoRA checkpoint"), and `unet.load_lora_adapter(path, prefix="unet")` silently copies the biases of layers
without a LoRA and drops those of layers with one (peft has renamed them `base_layer.bias`). In diffusers, apply the
biases first, then the LoRA (`pipe.load_lora_weights(folder)` picks `pytorch_lora_weights.safetensors` of the two):

    unet.load_state_dict({k.removeprefix("unet."): v for k, v in load_file(biases_file).items()}, strict=False)
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj")  # the whole attention path
METADATA_KEY = "lora_adapter_metadata"  # the safetensors metadata entry diffusers turns into a peft LoraConfig
BIASES_KEY = "bitfit_biases"  # a LoRA file's metadata entry naming the file of its trained biases (same folder)
LORA_FILE = "pytorch_lora_weights.safetensors"  # the name diffusers' load_lora_weights(folder) looks for
BIASES_FILE = "bitfit_biases.safetensors"  # that file, as save_lora writes it
BITFIT_KEY = "bitfit"  # "true" in the metadata of a file that holds trained biases
IGNORED_PREFIX = "text_encoder."  # another component's LoRA keys in a pipeline's file; skipped with a warning


def matches(name: str, pattern: str) -> bool:
    """Whether a module name matches a target pattern (rule in the module docstring)."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


# ---------------------------------------------------------------------------------------------
# the wrapped layers


class _LoRAMixin:
    """Adds named low-rank adapters to the forward of a layer whose base op is `_base(x, bias)`."""

    dropout_shard = (0, 1)  # (rank, world): this process's slice of the global batch (shard_dropout)

    def _setup(self) -> None:
        self.lora_A, self.lora_B, self.lora_magnitude = nn.ParameterDict(), nn.ParameterDict(), nn.ParameterDict()
        self.lora_alpha, self.lora_scale, self.lora_dropout = {}, {}, {}  # per adapter: floats

    def lora_scaling(self, name: str) -> float:
        """s = alpha / r, times the user's scale (set_lora_scale)."""
        return self.lora_alpha[name] / self.lora_A[name].shape[0] * self.lora_scale[name]

    def delta_weight(self, name: str) -> torch.Tensor:
        """s * B @ A in fp32, shaped like the base weight."""
        A, B = self.lora_A[name].float(), self.lora_B[name].float()
        return self.lora_scaling(name) * (B.flatten(1) @ A.flatten(1)).view(self.weight.shape)

    @torch.no_grad()
    def weight_norm(self, name: str) -> torch.Tensor:
        """||W + s B A|| per output channel, [out] fp32; no_grad: DoRA treats it as a constant (section 4.3)."""
        return (self.weight.float() + self.delta_weight(name)).flatten(1).norm(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y0 = self._base(x, self.bias)  # the base layer's own output
        y = y0
        for name in self.lora_A:
            s = self.lora_scaling(name)
            if s == 0:  # scale 0 switches the adapter off entirely, a DoRA magnitude included
                continue
            p = self.lora_dropout[name] if self.training else 0.0
            xd = self._dropout(x, p) if p > 0 else x
            z = self._lora(xd.to(self.lora_A[name].dtype), name).to(y.dtype) * s  # s B A xd (in the LoRA's dtype)
            if name not in self.lora_magnitude:
                y = y + z
                continue
            # DoRA as peft computes it: y0 + (g - 1) * W xd + g * s B A xd with g = m / ||W + s B A||, which is
            # g * (W x + s B A x) + b without dropout. Written as g * (W xd + z) - W xd it saves one tensor, not two.
            m = self.lora_magnitude[name]
            g = (m / self.weight_norm(name).to(m.dtype)).to(y.dtype).view(self._channels)
            wx = (y0 if self.bias is None else y0 - self.bias.view(self._channels)) if xd is x else self._base(xd, None)
            y = y + (g * (wx + z) - wx)  # exactly y when g == 1 and z == 0 (a fresh DoRA)
        return y


    def _dropout(self, x: torch.Tensor, p: float) -> torch.Tensor:
        """Dropout whose mask is drawn for the global batch and sliced, as train.py draws the noise: N processes
        with B samples each drop what one process with N B samples drops (dim 0 is the sample wherever a LoRA sits
        in the U-Net). The mask is F.dropout of ones shaped like the global batch, from the default generator
        (every rank seeds it alike; gradient checkpointing replays it). Masks are drawn in memory order, so each
        sample of the ones is laid out as a sample of x (the attention's inputs are transposed views); then one
        process draws exactly what F.dropout(x) draws, as peft does. Costs N x-sized transients for N processes."""
        rank, world, n = *self.dropout_shard, x.shape[0]
        sample = torch.empty_like(x[0])  # a sample's layout in x (if dense, else contiguous)
        ones = torch.empty_strided((n * world, *x.shape[1:]), (sample.numel(), *sample.stride()), dtype=x.dtype,
                                   device=x.device).fill_(1)
        return x * F.dropout(ones, p)[rank * n : (rank + 1) * n]


class LoRALinear(_LoRAMixin, nn.Linear):
    _plain, _channels = nn.Linear, (-1,)  # outputs [..., out]

    def _base(self, x, bias):
        return F.linear(x, self.weight, bias)

    def _lora(self, x, name):
        return F.linear(F.linear(x, self.lora_A[name]), self.lora_B[name])  # [..., r] -> [..., out]


class LoRAConv2d(_LoRAMixin, nn.Conv2d):
    _plain, _channels = nn.Conv2d, (-1, 1, 1)  # outputs [B, out, H, W]

    def _base(self, x, bias):
        return self._conv_forward(x, self.weight, bias)

    def _lora(self, x, name):  # A: a conv with the base's geometry down to r channels; B: 1x1 back up (as peft)
        h = F.conv2d(x, self.lora_A[name], None, self.stride, self.padding, self.dilation)
        return F.conv2d(h, self.lora_B[name])


_WRAPPERS = {nn.Linear: LoRALinear, nn.Conv2d: LoRAConv2d}


def _unsupported(module: nn.Module) -> str | None:
    """Why a module cannot carry a LoRA, or None."""
    if not isinstance(module, _LoRAMixin) and type(module) not in _WRAPPERS:
        return f"is a {type(module).__name__}; only nn.Linear and nn.Conv2d can carry a LoRA"
    if isinstance(module, nn.Conv2d) and (module.groups != 1 or module.padding_mode != "zeros"):
        return "is a grouped or non-zero-padded conv, which LoRA here does not support"
    return None


def _lora_layers(model: nn.Module) -> dict[str, _LoRAMixin]:
    return {n: m for n, m in model.named_modules() if isinstance(m, _LoRAMixin)}


def _add_adapter(layer, name, A, B, alpha, dropout=0.0, magnitude=None, dora=False) -> list[nn.Parameter]:
    if not isinstance(layer, _LoRAMixin):
        layer.__class__ = _WRAPPERS[type(layer)]
        layer._setup()
    layer.lora_A[name], layer.lora_B[name] = nn.Parameter(A), nn.Parameter(B)
    layer.lora_alpha[name], layer.lora_scale[name], layer.lora_dropout[name] = float(alpha), 1.0, float(dropout)
    if dora and magnitude is None:  # m = ||W + s B A||: the wrap starts as the identity
        magnitude = layer.weight_norm(name).to(layer.weight.dtype)
    if magnitude is not None:
        layer.lora_magnitude[name] = nn.Parameter(magnitude.reshape(-1))
    return [layer.lora_A[name], layer.lora_B[name]] + ([layer.lora_magnitude[name]] if magnitude is not None else [])


def _unwrap(layer: _LoRAMixin) -> None:
    del layer.lora_A, layer.lora_B, layer.lora_magnitude, layer.lora_alpha, layer.lora_scale, layer.lora_dropout
    layer.__class__ = layer._plain


def _check_name(name: str, layers: dict) -> None:
    # an adapter is an attribute of the ParameterDicts that hold it: "training" or "keys" would shadow theirs
    if not re.fullmatch(r"\w+", name) or hasattr(nn.ParameterDict(), name):
        raise ValueError(f"LoRA name {name!r} must be letters, digits and '_' only, and not an attribute of "
                         f"nn.ParameterDict (such as 'training' or 'keys'); pass another name=")
    taken = [n for n, m in layers.items() if isinstance(m, _LoRAMixin) and name in m.lora_A]
    if taken:
        raise ValueError(f"{taken[0]} (+{len(taken) - 1} more) already has a LoRA named {name!r}; pass another name=")


# ---------------------------------------------------------------------------------------------
# the public API


def add_lora(model: nn.Module, rank: int, alpha: float | None = None, targets=DEFAULT_TARGETS, dropout: float = 0.0,
             dora: bool = False, init: str = "default", name: str = "default") -> list[nn.Parameter]:
    """Freeze all of `model` and add a LoRA (DoRA with dora=True) to every layer `targets` match.

    Returns the new trainable parameters. Call mark_bitfit after this, not before (this freezes the biases)."""
    if init not in ("default", "gaussian"):
        raise ValueError(f"init={init!r}: use 'default' (Kaiming-uniform, like peft) or 'gaussian'")
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    modules, layers, problems = dict(model.named_modules()), {}, []
    for pattern in targets:
        hits = [n for n in modules if n and matches(n, pattern)]
        problems += [] if hits else [f"pattern {pattern!r} matches no module"]
        layers.update({n: modules[n] for n in hits})
    problems += [f"{n} {why}" for n, m in layers.items() if (why := _unsupported(m))]
    if problems:
        raise ValueError("add_lora: " + "; ".join(problems) + ". Targets are module names or suffixes (see lora.py)")
    _check_name(name, layers)
    model.requires_grad_(False)
    params = []
    for layer in layers.values():
        w = layer.weight
        A = torch.empty(rank, *w.shape[1:], device=w.device)  # [r, in] or [r, in, kh, kw]
        if init == "default":
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        else:
            nn.init.normal_(A, std=1 / rank)
        B = torch.zeros(w.shape[0], rank, *[1] * (w.dim() - 2), device=w.device, dtype=w.dtype)  # [out, r(, 1, 1)]
        params += _add_adapter(layer, name, A.to(w.dtype), B, rank if alpha is None else alpha, dropout, dora=dora)
    return params


def _is_bias(name: str) -> bool:
    return name.rsplit(".", 1)[-1] == "bias"


def mark_bitfit(model: nn.Module) -> list[nn.Parameter]:
    """Make every bias of `model` trainable (BitFit, Ben Zaken et al. 2022), norm layers' included; returns them."""
    params = [p for n, p in model.named_parameters() if _is_bias(n)]
    for p in params:
        p.requires_grad_(True)
    return params


def shard_dropout(model: nn.Module, rank: int, world: int) -> None:
    """Tell the LoRA layers of `model` which slice of the global batch this process holds (see _dropout)."""
    for layer in _lora_layers(model).values():
        layer.dropout_shard = (rank, world)


def set_lora_scale(model: nn.Module, scale: float, name: str | None = None) -> None:
    """Multiply the update of LoRA `name` (None: all of them) by `scale`; 0 switches it off, 1 is as trained."""
    layers = [m for m in _lora_layers(model).values() if name is None or name in m.lora_A]
    if not layers:
        raise ValueError(f"the model has no LoRA{'' if name is None else f' named {name!r}'}")
    for layer in layers:
        for n in layer.lora_scale:
            if name is None or n == name:
                layer.lora_scale[n] = float(scale)


@torch.no_grad()
def merge_lora(model: nn.Module) -> None:
    """Fold every LoRA (at its current scale) into the base weights and turn the layers back into plain ones.

    Exact up to rounding: W <- W + sum over adapters of s B A (DoRA: m * (W + s B A) / ||W + s B A|| - W), computed
    in fp32 from the unmerged W and rounded once. Not reversible; use set_lora_scale to switch a LoRA on and off."""
    for layer in _lora_layers(model).values():
        w = layer.weight.float()
        merged = w.clone()
        for name in layer.lora_A:
            if layer.lora_scaling(name) == 0:
                continue
            delta = layer.delta_weight(name)
            if name in layer.lora_magnitude:
                g = layer.lora_magnitude[name].float() / layer.weight_norm(name)  # [out]
                delta = g.view(-1, *[1] * (w.dim() - 1)) * (w + delta) - w
            merged += delta
        layer.weight.copy_(merged)
        _unwrap(layer)


def _file_parameters(model: nn.Module, name: str, prefix: str = "unet") -> dict[str, tuple[nn.Module, nn.Parameter]]:
    """The layer and parameter behind each file key of LoRA `name`: `<prefix>.<module>.lora_A.weight`,
    `.lora_B.weight`, `.lora_magnitude_vector`."""
    out = {}
    for module_name, layer in _lora_layers(model).items():
        if name in layer.lora_A:
            key = f"{prefix}.{module_name}" if prefix else module_name
            out[f"{key}.lora_A.weight"] = (layer, layer.lora_A[name])
            out[f"{key}.lora_B.weight"] = (layer, layer.lora_B[name])
            if name in layer.lora_magnitude:
                out[f"{key}.lora_magnitude_vector"] = (layer, layer.lora_magnitude[name])
    return out


def _trained_biases(model: nn.Module) -> dict[str, nn.Parameter]:
    """The biases that require grad (what mark_bitfit marked), by their file keys `unet.<parameter name>`."""
    return {f"unet.{n}": p for n, p in model.named_parameters() if _is_bias(n) and p.requires_grad}


def lora_state_dict(model: nn.Module, name: str = "default", prefix: str = "unet") -> dict[str, torch.Tensor]:
    """LoRA `name` as file tensors (keys: _file_parameters)."""
    out = {}
    for key, (layer, p) in _file_parameters(model, name, prefix).items():
        conv_magnitude = key.endswith(".lora_magnitude_vector") and isinstance(layer, LoRAConv2d)
        out[key] = p.detach().view(1, -1, 1, 1) if conv_magnitude else p.detach().contiguous()  # peft's [1, out, 1, 1]
    return out


def save_lora(model: nn.Module, path: str | Path, metadata: dict | None = None, name: str = "default",
              biases: bool = False) -> None:
    """Write LoRA `name` as safetensors that diffusers loads with the right alpha; `metadata` adds entries.

    biases=True also writes the trained biases, every `.bias` parameter that requires grad (what mark_bitfit
    marked): into BIASES_FILE next to `path`, or into `path` itself when the model has no LoRA named `name`
    (bitfit alone). See the module docstring for why, and for what diffusers reads."""
    from safetensors.torch import save_file

    path = Path(path)
    layers = {n: m for n, m in _lora_layers(model).items() if name in m.lora_A}
    trained = {k: p.detach().contiguous() for k, p in _trained_biases(model).items()} if biases else {}
    if biases and not trained:
        raise ValueError("save_lora(biases=True): no bias of the model requires grad; mark_bitfit(model) makes them "
                         "trainable, and save_lora writes those")
    if not layers and not biases:
        raise ValueError(f"the model has no LoRA named {name!r} to save (biases=True saves trained biases alone)")
    if layers and biases and path.name == BIASES_FILE:
        raise ValueError(f"{path}: {BIASES_FILE} is the name of the biases file written next to the LoRA; "
                         f"give the LoRA file another name")
    meta = {"format": "pt"}
    if layers:
        ranks = {n: m.lora_A[name].shape[0] for n, m in layers.items()}
        alphas = {n: m.lora_alpha[name] for n, m in layers.items()}
        r, alpha = Counter(ranks.values()).most_common(1)[0][0], Counter(alphas.values()).most_common(1)[0][0]
        config = {  # peft LoraConfig fields; per-module outliers as "^name" patterns, the form diffusers writes
            "r": r, "lora_alpha": alpha, "target_modules": sorted(layers),
            "rank_pattern": {f"^{n}": v for n, v in ranks.items() if v != r},
            "alpha_pattern": {f"^{n}": v for n, v in alphas.items() if v != alpha},
            "lora_dropout": Counter(m.lora_dropout[name] for m in layers.values()).most_common(1)[0][0],
            "use_dora": any(name in m.lora_magnitude for m in layers.values()),
        }
        meta[METADATA_KEY] = json.dumps({f"unet.{k}": v for k, v in config.items()}, sort_keys=True)
    if trained and layers:
        meta[BIASES_KEY] = BIASES_FILE
    elif trained:
        meta[BITFIT_KEY] = "true"
    for k, v in (metadata or {}).items():
        if k in ("format", METADATA_KEY, BIASES_KEY, BITFIT_KEY):
            raise ValueError(f"metadata key {k!r} is reserved for the LoRA's own description")
        meta[str(k)] = v if isinstance(v, str) else json.dumps(v)
    path.parent.mkdir(parents=True, exist_ok=True)
    if layers and trained:  # written first: a LoRA file never names a biases file that is not there
        save_file(trained, str(path.parent / BIASES_FILE), metadata={"format": "pt", BITFIT_KEY: "true"})
    save_file(lora_state_dict(model, name) if layers else trained, str(path), metadata=meta)


def read_lora_metadata(path: str | Path) -> dict:
    """A LoRA file's safetensors metadata, with the "lora_adapter_metadata" JSON decoded."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    if METADATA_KEY in meta:
        meta[METADATA_KEY] = json.loads(meta[METADATA_KEY])
    return meta


# Key forms load_lora reads, checked in order after the prefixes "unet." and "base_model.model." (peft) and any
# ".processor." (old attention-processor files) are taken off. Files may mix forms: the dreambooth script writes
# old-form to_q/k/v/out and new-form add_k/v_proj in one file, which diffusers loads only half of.
_KEY_FORMS = (
    (".lora_A.weight", "A"), (".lora_B.weight", "B"),  # peft / diffusers
    (".lora.down.weight", "A"), (".lora.up.weight", "B"),  # older diffusers
    ("_lora.down.weight", "A"), ("_lora.up.weight", "B"),  # attention processors: processor.to_q_lora.down.weight
    (".lora_magnitude_vector", "m"), (".lora_magnitude_vector.weight", "m"),  # DoRA
    (".alpha", "alpha"),  # a network alpha (kohya, old diffusers); else metadata, else alpha = r
    (".bias", "bias"),  # a trained bias (bitfit), copied into the model
)


def _parse_key(key: str) -> tuple[str | None, str | None]:
    for prefix in ("unet.", "base_model.model."):
        key = key.removeprefix(prefix)
    key = key.replace(".processor.", ".")
    for suffix, kind in _KEY_FORMS:
        if key.endswith(suffix):
            return key[: -len(suffix)], kind
    return None, None


def load_lora(model: nn.Module, path: str | Path, name: str = "default", scale: float = 1.0) -> list[nn.Parameter]:
    """Add the LoRA in file `path` to `model` as adapter `name`; ranks come from shapes, alphas from the file. Trained
    biases (in the file, or in the biases file its metadata names) are copied into the model's own parameters.

    Returns the LoRA's parameters, then those biases, all frozen (set requires_grad to train them further).
    `text_encoder.*` keys are skipped with a warning. Any other key that is unknown, names no Linear/Conv2d (for a
    bias: no parameter) of `model`, or has the wrong shape is an error listing all of them; then nothing is loaded."""
    from safetensors.torch import load_file

    path = Path(path)
    file_meta = read_lora_metadata(path)
    tensors, meta = load_file(str(path)), file_meta.get(METADATA_KEY) or {}
    problems = []
    if BIASES_KEY in file_meta:
        biases_file = path.parent / file_meta[BIASES_KEY]
        if not biases_file.is_file():
            raise FileNotFoundError(f"{path} was saved with its trained biases in {biases_file.name} next to it, which "
                                    f"is missing: put that file in {path.parent} (without it this is not the trained "
                                    f"model)")
        extra = load_file(str(biases_file))
        problems += [f"{k}: in both {path.name} and {biases_file.name}" for k in sorted(set(extra) & set(tensors))]
        tensors = {**tensors, **extra}
    skipped = [k for k in tensors if k.startswith(IGNORED_PREFIX)]
    tensors = {k: t for k, t in tensors.items() if not k.startswith(IGNORED_PREFIX)}
    if any(k.startswith("unet.") for k in meta):
        meta = {k.removeprefix("unet."): v for k, v in meta.items() if k.startswith("unet.")}
    modules, parameters, entries, biases = dict(model.named_modules()), dict(model.named_parameters()), {}, {}
    for key, t in tensors.items():
        module_name, kind = _parse_key(key)
        if kind is None:
            problems.append(f"{key}: not a LoRA key form this loader knows")
            continue
        if kind == "bias":
            bias = parameters.get(f"{module_name}.bias")
            if bias is None:
                problems.append(f"{key}: the model has no parameter named {module_name}.bias")
            elif t.shape != bias.shape:
                problems.append(f"{key}: shape {list(t.shape)} does not fit {module_name}.bias, which is "
                                f"{list(bias.shape)}")
            elif module_name in biases:
                problems.append(f"{key}: a second tensor for {module_name}.bias")
            else:
                biases[module_name] = (bias, t)
            continue
        found = [c for c in (module_name, module_name + ".0") if isinstance(modules.get(c), (nn.Linear, nn.Conv2d))]
        if not found:  # ("to_out" in old files is diffusers' "to_out.0")
            problems.append(f"{key}: the model has no Linear/Conv2d named {module_name}")
        elif kind in entries.setdefault(found[0], {}):
            problems.append(f"{key}: a second {kind} tensor for {found[0]}")
        else:
            entries[found[0]][kind] = (key, t)
    alpha_pattern = meta.get("alpha_pattern") or {}
    loaded = {}
    for module_name, e in entries.items():
        layer, keys = modules[module_name], ", ".join(k for k, _ in e.values())
        if "A" not in e or "B" not in e:
            problems.append(f"{keys}: {module_name} needs both an A (down) and a B (up) tensor")
            continue
        (_, A), (_, B), w = e["A"], e["B"], layer.weight
        r, m = A.shape[0], e.get("m", (None, None))[1]
        if why := _unsupported(layer):
            problems.append(f"{module_name} {why}")
            continue
        want_b = (w.shape[0], r, *[1] * (w.dim() - 2))
        if A.shape[1:] != w.shape[1:] or B.shape != want_b or (m is not None and m.numel() != w.shape[0]):
            got = f"A {list(A.shape)}, B {list(B.shape)}" + ("" if m is None else f", magnitude {list(m.shape)}")
            problems.append(f"{keys}: {got} do not fit {module_name}, whose weight is {list(w.shape)} (A must be "
                            f"[r, {', '.join(map(str, w.shape[1:]))}], B {list(want_b)}, a magnitude [{w.shape[0]}])")
            continue
        if "alpha" in e:
            alpha = float(e["alpha"][1])
        else:  # peft's pattern rule: a key matches a name ending in it (at a dot)
            hit = [v for p, v in alpha_pattern.items() if re.match(rf"(.*\.)?({p})$", module_name)]
            alpha = float(hit[0] if hit else meta.get("lora_alpha") or r)
        if meta.get("use_rslora"):  # rsLoRA scales by alpha / sqrt(r)
            alpha *= math.sqrt(r)
        loaded[module_name] = (A, B, m, alpha)
    if not problems and not loaded and not biases:
        problems.append(f"no U-Net LoRA or bias in the file ({len(skipped)} {IGNORED_PREFIX}* keys skipped)")
    if problems:
        raise ValueError(f"cannot load LoRA {path} into this model (nothing was loaded):\n  " + "\n  ".join(problems))
    _check_name(name, {n: modules[n] for n in loaded})
    params = []
    for module_name, (A, B, m, alpha) in loaded.items():
        w = modules[module_name].weight
        A, B, m = (None if t is None else t.to(w.device, w.dtype) for t in (A, B, m))
        params += _add_adapter(modules[module_name], name, A, B, alpha, meta.get("lora_dropout") or 0.0, magnitude=m)
        modules[module_name].lora_scale[name] = float(scale)
    with torch.no_grad():
        for bias, t in biases.values():
            bias.copy_(t)
            params.append(bias)
    for p in params:
        p.requires_grad_(False)
    if skipped:
        warnings.warn(f"{path}: ignored {len(skipped)} {IGNORED_PREFIX}* keys: this loader applies LoRAs to the "
                      f"U-Net only", stacklevel=2)
    return params


def restore_lora(model: nn.Module, path: str | Path, name: str = "default", biases: bool = False) -> None:
    """Copy a file save_lora wrote back into the adapters `model` already has (and, with biases, into its trained
    biases), in place: how a resumed run gets its trained weights back, which checkpoints store only in this file.
    The file must hold exactly those tensors, with their shapes."""
    from safetensors.torch import load_file

    path = Path(path)
    tensors, meta = load_file(str(path)), read_lora_metadata(path)
    if BIASES_KEY in meta:
        tensors |= load_file(str(path.parent / meta[BIASES_KEY]))
    targets = {k: p for k, (_, p) in _file_parameters(model, name).items()} | (_trained_biases(model) if biases else {})
    wrong = sorted(set(targets) ^ set(tensors)) + [k for k in targets.keys() & tensors.keys()
                                                  if tensors[k].numel() != targets[k].numel()]
    if wrong:
        raise ValueError(f"{path} does not hold this model's trained LoRA weights: {', '.join(wrong[:8])}"
                         f"{' ...' if len(wrong) > 8 else ''} missing, unexpected or of another size")
    with torch.no_grad():
        for k, p in targets.items():
            p.copy_(tensors[k].view_as(p))

