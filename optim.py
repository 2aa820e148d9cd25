"""The optimizer: AdamW in pure bf16 with stochastic rounding, and what lets a full IF-I-XL fine-tune fit a 24 GB card.

    opt = AdamW(params, lr=1e-5, state="8bit", factored=False, fused=False)
    loss.backward(); opt.step(lr); opt.zero_grad()                # unfused: the usual three calls
    opt.begin(lr); loss.backward(); norm = opt.end()              # fused: each parameter steps inside backward

Three independent options, each changing one thing:
- `state`: how the two moments are stored. "bf16" (stochastic rounding, 2 bytes each per weight), "fp32" (4), or
  "8bit": block-wise dynamic quantisation (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization"):
  each block of BLOCK values keeps its absolute maximum in fp32 and one byte per value, an index into a map that is
  dense near zero, so the small moments keep their relative precision (1 byte each, + 4/BLOCK).
- `factored`: the second moment of a matrix (a conv weight counts as [out, in*kh*kw]) as Adafactor keeps it
  (Shazeer & Stern 2018): a running mean of g^2 over each row and over each column, v ~ row col^T / mean(row):
  rows + columns of fp32 instead of rows x columns. Vectors keep their full second moment (in fp32: they are small).
- `fused`: the update of each parameter runs as soon as its gradient is complete (a post-accumulate-grad hook), and
  the gradient is freed at once, so no full gradient buffer ever exists (-8 GiB at IF-I-XL size). The maths is the
  same; what cannot be the same is said where it applies: no gradient accumulation (it needs the full gradient);
  clipping by the global norm uses the previous step's norm (this step's is known only once every parameter has
  stepped: `clip`); and a non-finite gradient skips the update of the parameters it reached, not the whole step.

The update is the same for all of them (Loshchilov & Hutter 2019, Algorithm 2, with bias correction):
    m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
    w = w (1 - lr wd) - lr/(1 - b1^t) * m / (sqrt(v/(1 - b2^t)) + eps)
computed in fp32 a piece at a time; bf16 weights are written back with stochastic rounding, or, with
`fp32_master`, from fp32 copies kept here.

Sharded (FSDP2, `torch.distributed.fsdp.fully_shard`): when the parameters are DTensors, each process steps its own
shards with the same update. The weights stay where FSDP keeps them (each parameter's local shard, the storage its
next all-gather reads); the states are flat buffers over the local shards; grad_norm() sums the squared norms over
the processes, so every process clips alike; param_state_dict() gives the states as DTensors placed like the
parameters, for torch.distributed.checkpoint to save and to reshard onto another number of processes. The fused
step works sharded too: FSDP2 runs each sharded parameter's post-accumulate-grad hooks once its gradient is
reduce-scattered. What cannot be sharded is refused: the factored second moment (AdamW says why).
"""

from __future__ import annotations

import math
import sys

import torch

BLOCK = 256  # values per 8-bit quantisation block; every parameter starts on a block boundary of the flat buffer
CHUNK = 1 << 25  # values per kernel launch in the unfused step: bounds the fp32 temporaries to ~0.5 GiB


def stochastic_round(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """fp32 -> bf16, rounding up with probability equal to the dropped fraction: unbiased, E[round(x)] = x.

    bf16 is the top 16 bits of fp32: add uniform noise to the low 16 bits, then truncate them."""
    noise = torch.randint(0, 1 << 16, x.shape, device=x.device, dtype=torch.int32, generator=generator)
    return noise.add_(x.view(torch.int32)).bitwise_and_(-65536).view(torch.float32).to(torch.bfloat16)  # in place


def dynamic_map(signed: bool) -> torch.Tensor:
    """The 256 values an 8-bit code stands for, in [-1, 1] (signed) or [0, 1], sorted: Dettmers' dynamic tree map.

    A code is a sign bit (signed only), then k zero bits that scale by 10^-k, a 1 bit, and the remaining bits as a
    linear fraction in (0.1, 1]: so each decade below the block's maximum gets its own levels, fewer as k grows
    (six decades signed, seven unsigned), plus 0 and +-1 exactly (the block's maximum maps to itself)."""
    bits, decades = (7, 6) if signed else (8, 7)
    values = []
    for k in range(decades):  # (0.1, 1], (0.01, 0.1], ...
        n = 2 ** (bits - 1 - k)  # fraction levels left in this decade
        values += [10.0**-k * (0.1 + 0.9 * (j + 0.5) / n) for j in range(n)]
    values = sorted([0.0, 1.0] + values + ([-v for v in values] + [-1.0] if signed else []))
    return torch.tensor(values + values[-1:] * (256 - len(values)))  # signed: 255 values; the spare repeats 1.0


class State:
    """One moment of the flat buffer, stored as `kind` says: "fp32", "bf16" (stochastic rounding) or "8bit".

    get(s) is the fp32 value of flat slice s (for fp32: the stored tensor itself, so updating it in place is the
    update); put(s, x) stores it back. 8-bit slices start on a block boundary and cover whole blocks."""

    def __init__(self, n: int, kind: str, device, signed: bool, generator=None):
        self.kind, self.generator = kind, generator
        if kind == "8bit":
            self.codes = torch.zeros(n, dtype=torch.uint8, device=device)
            self.absmax = torch.zeros(n // BLOCK, dtype=torch.float32, device=device)
            self.map = dynamic_map(signed).to(device)
            self.mid = (self.map[1:] + self.map[:-1]) / 2  # nearest code: bucketize against the midpoints
            self.codes.fill_(127 if signed else 0)  # the code of 0: 127 negative levels below it, or none
        else:
            self.data = torch.zeros(n, dtype=torch.float32 if kind == "fp32" else torch.bfloat16, device=device)

    def get(self, s: slice) -> torch.Tensor:
        if self.kind != "8bit":
            return self.data[s].float()
        blocks = slice(s.start // BLOCK, s.stop // BLOCK)
        return (self.map[self.codes[s].int()].view(-1, BLOCK) * self.absmax[blocks, None]).view(-1)

    def put(self, s: slice, x: torch.Tensor) -> None:
        if self.kind == "bf16":
            self.data[s].copy_(stochastic_round(x, self.generator))
        elif self.kind == "8bit":
            blocks = x.view(-1, BLOCK)
            absmax = blocks.abs().amax(1)
            self.absmax[s.start // BLOCK : s.stop // BLOCK] = absmax
            scaled = blocks / absmax.clamp(min=torch.finfo(torch.float32).tiny)[:, None]
            self.codes[s] = torch.bucketize(scaled.view(-1), self.mid).to(torch.uint8)
        # fp32: get() returned the state itself, already updated in place

    def state_dict(self, name: str) -> dict:
        if self.kind == "8bit":
            return {f"{name}.codes": self.codes, f"{name}.absmax": self.absmax}
        return {name: self.data}

    def load_state_dict(self, name: str, state: dict) -> None:
        for key, t in self.state_dict(name).items():
            t.copy_(state[key])


def _norm(x: torch.Tensor) -> torch.Tensor:
    """The L2 norm of a flat tensor in fp32, CHUNK values at a time: one vector_norm(dtype=fp32) of a bf16 tensor
    makes a whole fp32 copy of it on the CPU (17 GB for IF-I-XL's gradient)."""
    parts = [torch.linalg.vector_norm(x[i : i + CHUNK], dtype=torch.float32) for i in range(0, x.numel(), CHUNK)]
    return torch.linalg.vector_norm(torch.stack(parts)) if parts else torch.zeros((), device=x.device)  # an empty shard


def _fp32(x: torch.Tensor, n: int) -> torch.Tensor:
    """x in fp32, zero-padded to n values: x itself if it is fp32 and n long (updating it in place is the update)."""
    if x.numel() == n:
        return x.float()
    out = torch.zeros(n, dtype=torch.float32, device=x.device)
    out[: x.numel()].copy_(x)
    return out


def _is_dtensor(t) -> bool:
    """Only once torch.distributed.tensor is imported (fully_shard imports it) can a tensor be a DTensor: not
    importing it here keeps half a second off the start of every process that imports this module."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def _local(t):
    """A DTensor's tensor on this process (for FSDP's parameters: a view of the shard it all-gathers from), else t."""
    with torch.no_grad():  # with grad enabled, to_local() is an autograd op that returns a new view
        return t.to_local() if _is_dtensor(t) else t


def _sharding(params: list) -> tuple:
    """(device mesh, placements) of parameters that are DTensors - sharded by FSDP2's fully_shard - else (None, None).

    Refused: a mix of DTensors and plain tensors (one step cannot be both), parameters sharded in different ways
    (one grad_norm() reduction serves them all), and partial placements (a weight is never a partial sum)."""
    kinds = {_is_dtensor(p) for p in params}
    if kinds == {False}:
        return None, None
    if len(kinds) > 1:
        raise ValueError("some trainable parameters are DTensors and some are plain tensors: fully_shard the root "
                         "module too (fully_shard(model) after its submodules), so that every parameter is sharded")
    layouts = {(p.device_mesh, tuple(p.placements)) for p in params}
    if len(layouts) > 1:
        raise ValueError(f"the parameters are sharded {len(layouts)} different ways (device meshes or placements): "
                         "give each AdamW parameters that are sharded alike")
    mesh, placements = layouts.pop()
    if not all(pl.is_shard() or pl.is_replicate() for pl in placements):
        raise ValueError(f"parameters placed {placements}: AdamW steps shards or replicas of weights, not partial sums")
    if not all(_local(p).is_contiguous() for p in params):
        raise ValueError("a parameter's local shard is not contiguous: AdamW reads and writes shards as flat tensors")
    return mesh, placements


def _factorable(p: torch.Tensor) -> bool:
    return p.dim() >= 2 and p.shape[0] > 1 and p[0].numel() > 1


class AdamW:
    """AdamW for parameters that all share one dtype and device (see the module docstring for the options).

    The parameters become views into one flat buffer (each starting on a BLOCK boundary, keeping its memory layout:
    channels_last conv weights stay channels_last), so the unfused step is a handful of large kernels over chunks of
    it instead of ~20 small kernels per tensor. Unfused, the gradients are views of a second flat buffer.

    Sharded parameters (DTensors) are not moved: FSDP all-gathers each from its own storage, and its gradient arrives
    there too (reduce-scattered, averaged over the processes). The states keep the flat layout, laid out over the
    local shards, and each parameter steps on its own (a few kernels per parameter, as the fused step does). Each
    process draws stochastic rounding's noise from its own `generator` for its own shards: nothing needs the draws
    to agree across processes, but resuming exactly needs each process's generator state, not one for all."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, fp32_master=False,
                 generator=None, state="bf16", factored=False, fused=False, clip=None):
        self.params, self.lr, self.betas, self.eps, self.weight_decay = list(params), lr, betas, eps, weight_decay
        dtypes = {p.dtype for p in self.params}
        if len(dtypes) != 1:
            raise ValueError(f"all trainable parameters must share one dtype, got {dtypes}")
        p0 = self.params[0]
        self.device, self.dtype = p0.device, p0.dtype
        self.mesh, self.placements = _sharding(self.params)
        self.sharded = self.mesh is not None
        if self.sharded and factored:
            raise ValueError("factored=True (factored_second_moment) keeps a matrix's second moment as the means of "
                             "its rows and of its columns, and FSDP spreads each matrix's rows over the processes, so "
                             "no process could form a column's mean: use state='8bit' (optimizer_state='8bit') to "
                             "shrink the moments instead, or train unsharded")
        self.offsets, n = [], 0
        for p in self.params:
            self.offsets.append(n)
            n += -(-_local(p).numel() // BLOCK) * BLOCK
        self.size = n  # of the flat layout; the padding between parameters stays zero (zero gradient, zero update)
        if self.sharded:  # the weights stay in FSDP's shards, which each step reads and writes in place
            self.flat = None
        else:
            # Copied in one by one, so each old tensor is freed as soon as it is copied: the weights never exist twice
            # over (8 GiB more at IF-I-XL size).
            self.flat = torch.zeros(n, dtype=p0.dtype, device=p0.device)
            for p, offset in zip(self.params, self.offsets):
                self.flat[offset : offset + p.numel()].copy_(p.detach().as_strided((p.numel(),), (1,)))  # memory order
                p.data = self.flat.as_strided(p.shape, p.stride(), offset)
        self.rounded = p0.dtype == torch.bfloat16 and not fp32_master
        self.master = self.weights(torch.float32) if p0.dtype != torch.float32 and fp32_master else None
        if state == "bf16" and not self.rounded:  # fp32 weights or masters: the states are fp32 too
            state = "fp32"
        self.factored, self.fused, self.generator = factored, fused, generator
        self.exp_avg = State(n, state, p0.device, signed=True, generator=generator)
        # the second moment: factored per matrix (fp32 rows and columns), else a flat State like the first
        self.rows, self.cols, self.vec = {}, {}, {}  # parameter index -> fp32 tensor
        if factored:
            for i, p in enumerate(self.params):
                if _factorable(p):
                    self.rows[i] = torch.zeros(p.shape[0], device=p0.device)
                    self.cols[i] = torch.zeros(p[0].numel(), device=p0.device)
                else:
                    self.vec[i] = torch.zeros(-(-p.numel() // BLOCK) * BLOCK, device=p0.device)
            self.exp_avg_sq = None
        else:
            self.exp_avg_sq = State(n, state, p0.device, signed=False, generator=generator)
        self.step_count, self._lr, self._sq, self._scale = 0, lr, [], None
        self.clip, self.last_norm = clip, None  # fused: clip to `clip` by the previous step's gradient norm
        if fused:  # FSDP2 runs these hooks too, on the sharded parameter once its gradient is reduce-scattered
            self.grad = None
            for i, p in enumerate(self.params):
                p.register_post_accumulate_grad_hook(lambda p, i=i: self._hook(i, p))
        elif self.sharded:  # each parameter's gradient is FSDP's: a DTensor of this process's shard
            self.grad = None
        else:
            self.grad = torch.zeros_like(self.flat)
            for p, offset in zip(self.params, self.offsets):  # backward accumulates into self.grad via these views
                p.grad = self.grad.as_strided(p.shape, p.stride(), offset)

    # ---- the update of one piece of the flat buffer ------------------------------------------
    def _update(self, s: slice, w: torch.Tensor, g: torch.Tensor, lr: float, ok=None, v=None) -> None:
        """One AdamW update of flat slice `s` (whole blocks) of the states with its fp32 gradient `g` (the caller's
        reference aside, freed here). `w`: its weights, the same slice of the flat buffer or, sharded, the piece of a
        local shard it holds, which may end before the slice does (the rest is padding: the update runs on a padded
        copy, so every kernel sees whole blocks as in the flat buffer and computes the same bits). `v`: its second
        moment, already updated (factored, or a vector's), else the flat state is updated here. `ok`: a 0-dim bool
        tensor; False keeps the weights and moments as they were."""
        (b1, b2), t = self.betas, self.step_count
        bc1, bc2 = 1 - b1**t, 1 - b2**t  # bias corrections
        m = self.exp_avg.get(s)
        m_old = m.clone() if ok is not None and self.exp_avg.kind == "fp32" else None  # m is the state itself
        m.lerp_(g, 1 - b1)  # m = b1 m + (1 - b1) g
        if v is not None:
            denom = (v / bc2).sqrt_().add_(self.eps)
        elif self.exp_avg_sq.kind == "fp32":  # v is the state itself
            v = self.exp_avg_sq.get(s)
            new_v = v.mul(b2).addcmul_(g, g, value=1 - b2)  # v = b2 v + (1 - b2) g^2
            v.copy_(new_v if ok is None else torch.where(ok, new_v, v))
            denom = new_v.div_(bc2).sqrt_().add_(self.eps)
        else:  # stored now, so its fp32 copy can become the denominator in place
            v = self.exp_avg_sq.get(s).mul_(b2).addcmul_(g, g, value=1 - b2)
            self.exp_avg_sq.put(s, v if ok is None else torch.where(ok, v, self.exp_avg_sq.get(s)))
            denom = v.div_(bc2).sqrt_().add_(self.eps)
        del g, v
        if m_old is not None:
            m.copy_(torch.where(ok, m, m_old))
        else:
            self.exp_avg.put(s, m if ok is None else torch.where(ok, m, self.exp_avg.get(s)))
        p = self.master[s] if self.master is not None else _fp32(w, s.stop - s.start)  # fp32 weights: the weights
        if ok is None:  # in place: a chunk's fp32 temporaries peak at 4 (+ the rounding's noise), not 8
            new = p.mul_(1 - lr * self.weight_decay).addcdiv_(m, denom, value=-lr / bc1)  # decoupled decay, Adam
        else:
            new = torch.where(ok, p.mul(1 - lr * self.weight_decay).addcdiv_(m, denom, value=-lr / bc1), p)
        del m, denom
        if self.rounded:
            w.copy_(stochastic_round(new, self.generator)[: w.numel()])
        else:
            if self.master is not None and new is not p:  # an out-of-place result
                self.master[s].copy_(new)
            if new is not w:  # bf16 from fp32 masters, a padded copy, or an out-of-place result
                w.copy_(new[: w.numel()])

    def _update_parameter(self, i: int, grad: torch.Tensor, lr: float, ok=None, scale=None) -> None:
        """The update of parameter i from its gradient `grad` (flat, in the parameter's memory order, any float
        dtype; times `scale`, the clipping factor, if given), a piece of at most ~CHUNK values at a time. A factored
        matrix first updates its row and column means in one pass over the gradient, then steps whole rows at a
        time with v = row col^T / mean(row)."""
        n, offset, b2 = grad.numel(), self.offsets[i], self.betas[1]
        if i in self.rows:
            row, col = self.rows[i], self.cols[i]
            R, C = row.numel(), col.numel()
            k = max(1, CHUNK // C)
            k = -(-k // (BLOCK // math.gcd(C, BLOCK))) * (BLOCK // math.gcd(C, BLOCK))  # rows of whole blocks
            means, col_sum = torch.empty_like(row), torch.zeros_like(col)
            for r in range(0, R, k):
                g2 = grad[r * C : (r + k) * C].to(torch.float32, copy=True).view(-1, C)
                g2 = g2.mul_(scale) if scale is not None else g2
                g2.square_().add_(1e-30)  # no exact zeros, as in Adafactor
                means[r : r + k], col_sum = g2.mean(1), col_sum.add_(g2.sum(0))
            del g2
            for state, new in ((row, means), (col, col_sum.div_(R))):
                state.copy_(state.lerp(new, 1 - b2) if ok is None else torch.where(ok, state.lerp(new, 1 - b2), state))
            inv_mean = 1 / row.mean()  # v ~ row col^T / mean(row): the same bias (1 - b2^t) as v itself
            pieces = [(r * C, min(R, r + k) * C, lambda r=r: (row[r : r + k, None] * inv_mean * col).view(-1))
                      for r in range(0, R, k)]
        elif i in self.vec:  # a vector in a factored run: its full second moment, in fp32
            vec, g = self.vec[i][:n], grad.float() * (1 if scale is None else scale)
            new = vec.mul(b2).addcmul_(g, g, value=1 - b2)
            vec.copy_(new if ok is None else torch.where(ok, new, vec))
            del g, new
            pieces = [(0, n, lambda: vec)]
        else:
            pieces = [(a, min(a + CHUNK, n), None) for a in range(0, n, CHUNK)]
        for a, b, second in pieces:
            pad = -(b - a) % BLOCK  # the last piece is padded to a whole block with zeros (zero gradient, no update)
            g = torch.nn.functional.pad(grad[a:b].float(), (0, pad))
            g = g.mul_(scale) if scale is not None else g
            v = None if second is None else torch.nn.functional.pad(second(), (0, pad))
            w = _local(self.params[i]).view(-1)[a:b] if self.sharded else self.flat[offset + a : offset + b + pad]
            self._update(slice(offset + a, offset + b + pad), w, g, lr, ok, v)
            del g, v

    # ---- unfused: step() after backward -----------------------------------------------------
    def zero_grad(self) -> None:
        if self.grad is not None:
            self.grad.zero_()
        elif self.sharded:  # FSDP assigns each parameter a new sharded gradient in the next backward
            for p in self.params:
                p.grad = None

    def _grads(self) -> list[torch.Tensor]:
        """The gradient, as tensors that hold it: the flat buffer, or sharded each parameter's local shard."""
        return [self.grad] if not self.sharded else [_local(p.grad) for p in self.params if p.grad is not None]

    def _all_sum(self, x: torch.Tensor) -> torch.Tensor:
        """x summed (in place) over the processes that hold the other shards of the same parameters."""
        for dim, placement in enumerate(self.placements):
            if placement.is_shard():
                torch.distributed.all_reduce(x, group=self.mesh.get_group(dim))
        return x

    def grad_norm(self) -> torch.Tensor:
        """The global L2 norm in fp32; sharded, from the squared norms of the local shards summed over the
        processes, so every process gets the same norm and clips alike."""
        if not self.sharded:
            return _norm(self.grad)
        sq = sum((_norm(g.reshape(-1)).square() for g in self._grads()), torch.zeros((), device=self.device))
        return self._all_sum(sq).sqrt()

    @torch.no_grad()
    def clip_grad_(self, max_norm: float, norm: torch.Tensor) -> None:
        """Clip the gradient to `max_norm` given its global `norm` (grad_norm()): scale it by
        min(1, max_norm / (norm + 1e-6)), the factor the fused step applies too (begin)."""
        factor = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for g in self._grads():
            g.mul_(factor)

    @torch.no_grad()
    def step(self, lr: float | None = None) -> None:
        if self.fused:
            raise RuntimeError("a fused AdamW steps inside backward: call begin(lr) before it and end() after")
        self.step_count += 1
        lr = self.lr if lr is None else lr
        if self.factored:  # a factored second moment needs each matrix whole: one parameter at a time
            for i, p in enumerate(self.params):
                self._update_parameter(i, self.grad[self.offsets[i] : self.offsets[i] + p.numel()], lr)
        elif self.sharded:  # each parameter's shard is its own tensor: one parameter at a time
            for i, p in enumerate(self.params):  # no gradient (it reached no output): a zero one, as unsharded
                grad = _local(p.grad).reshape(-1) if p.grad is not None else torch.zeros_like(_local(p).view(-1))
                self._update_parameter(i, grad, lr)
        else:  # the whole flat buffer, CHUNK values at a time
            for start in range(0, self.flat.numel(), CHUNK):
                s = slice(start, min(start + CHUNK, self.flat.numel()))
                self._update(s, self.flat[s], self.grad[s].float(), lr)

    # ---- fused: begin(lr), backward, end() ---------------------------------------------------
    def begin(self, lr: float | None = None) -> None:
        self.step_count += 1
        self._lr, self._sq, self._scale = self.lr if lr is None else lr, [], None
        if self.clip is not None and self.last_norm is not None:  # as unfused clipping, with last step's norm
            last = self.last_norm
            self._scale = torch.where(torch.isfinite(last), torch.clamp(self.clip / (last + 1e-6), max=1.0), 1.0)

    @torch.no_grad()
    def _hook(self, i: int, p: torch.Tensor) -> None:
        grad, p.grad = p.grad, None  # freed when this returns
        if self.sharded:  # this process's shard, already averaged over the processes; contiguous, as its weights
            grad = _local(grad).reshape(-1)
        else:
            if grad.stride() != p.stride():  # the flat buffer holds p in p's memory order
                grad = torch.empty_strided(p.shape, p.stride(), dtype=grad.dtype, device=grad.device).copy_(grad)
            grad = grad.as_strided((p.numel(),), (1,))
        sq = _norm(grad).square()
        self._sq.append(sq)
        self._update_parameter(i, grad, self._lr, ok=torch.isfinite(sq), scale=self._scale)

    def end(self) -> torch.Tensor:
        """The norm of this step's gradient, before clipping (non-finite if some parameter's was: those kept their
        weights; sharded, those shards did: each process judges its own); the next step clips by it."""
        if self.sharded:  # every process takes part in the sum, whatever its hooks saw
            sq = torch.stack(self._sq).sum() if self._sq else torch.zeros((), device=self.device)
            norm = self._all_sum(sq).sqrt()
        else:
            norm = torch.stack(self._sq).sum().sqrt() if self._sq else torch.zeros(())
        self._sq, self.last_norm = [], norm
        return norm

    # ---- the weights in the flat layout: EMA, the final swap to it, checkpoints --------------
    def _pieces(self) -> list[tuple[slice, torch.Tensor]]:
        """(slice of the flat layout, the weights it holds): the flat buffer whole, or each parameter's local shard."""
        if not self.sharded:
            return [(slice(0, self.size), self.flat)]
        return [(slice(offset, offset + _local(p).numel()), _local(p).view(-1))
                for p, offset in zip(self.params, self.offsets)]

    @torch.no_grad()
    def weights(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A copy of the weights laid out as the states: a copy of the flat buffer, or sharded, of this process's
        shards (each at its offset, the padding zero). An EMA starts from it."""
        out = torch.zeros(self.size, dtype=dtype or self.dtype, device=self.device)
        for s, w in self._pieces():
            out[s].copy_(w)
        return out

    @torch.no_grad()
    def load_weights(self, flat: torch.Tensor) -> None:
        """The weights (and the fp32 masters) <- `flat`, laid out as weights() gives them: an EMA, or a checkpoint's."""
        for s, w in self._pieces():
            w.copy_(flat[s])
        if self.master is not None:
            self.master.copy_(flat)

    @torch.no_grad()
    def swap_weights(self, other: torch.Tensor) -> None:
        """Exchange the weights with `other` (laid out as weights() gives them, e.g. the EMA), a piece at a time, so
        no third copy of the weights exists; swapping again restores both bit for bit (the fp32 masters, if any,
        are not touched: the swapped-in weights are only looked at)."""
        for s, w in self._pieces():
            kept = w.clone()
            w.copy_(other[s])
            other[s].copy_(kept)

    @torch.no_grad()
    def update_ema(self, ema: torch.Tensor, decay: float, generator=None) -> None:
        """ema <- decay * ema + (1 - decay) * weights (ema_update), `ema` laid out as weights() gives them."""
        for s, w in self._pieces():
            ema_update(ema[s], w, decay, generator)

    def param_views(self, flat: torch.Tensor) -> list:
        """`flat`, laid out as the states, seen as one tensor per parameter shaped as it: a view in the parameter's
        memory order or, sharded, a DTensor on this process's piece with the parameter's mesh, placements and
        global shape and stride (shards may be uneven, or empty). Writing into a view writes `flat`."""
        from_local = sys.modules["torch.distributed.tensor"].DTensor.from_local if self.sharded else None
        views = []
        for p, offset in zip(self.params, self.offsets):
            if not self.sharded:
                views.append(flat[offset:].as_strided(p.shape, p.stride()))
                continue
            shape = _local(p).shape
            local = flat[offset : offset + shape.numel()].view(shape)
            views.append(from_local(local, self.mesh, self.placements, run_check=False, shape=p.shape,
                                    stride=p.stride()))
        return views

    # ---- checkpoints: the states as they are stored (8-bit stays 8-bit) -----------------------
    def state_dict(self) -> dict:
        state = self.exp_avg.state_dict("exp_avg") | {"step": torch.tensor(self.step_count)}
        state |= {"last_norm": self.last_norm} if self.clip is not None and self.last_norm is not None else {}
        if self.exp_avg_sq is not None:
            state |= self.exp_avg_sq.state_dict("exp_avg_sq")
        for name, d in (("row", self.rows), ("col", self.cols), ("vec", self.vec)):
            state |= {f"{name}.{i}": t for i, t in d.items()}
        return state | ({"master": self.master} if self.master is not None else {})

    def load_state_dict(self, state: dict) -> None:
        self.exp_avg.load_state_dict("exp_avg", state)
        if self.exp_avg_sq is not None:
            self.exp_avg_sq.load_state_dict("exp_avg_sq", state)
        for name, d in (("row", self.rows), ("col", self.cols), ("vec", self.vec)):
            for i, t in d.items():
                t.copy_(state[f"{name}.{i}"])
        self.step_count = int(state["step"])
        self.last_norm = state["last_norm"].to(self.device) if "last_norm" in state else None
        if self.master is not None:
            self.master.copy_(state["master"])

    # ---- checkpoints per parameter: what torch.distributed.checkpoint saves and reshards ------
    def param_state_dict(self) -> dict:
        """The states per parameter ("exp_avg.<i>", "exp_avg_sq.<i>", "master.<i>": i the parameter's index), each
        shaped, and sharded, as its parameter (param_views), with "step" (and "last_norm"). Saved by
        torch.distributed.checkpoint, they load onto any number of processes. fp32 and bf16 states are views of the
        stored ones, so a load fills them in place; 8-bit ones are dequantised copies in fp32, which
        load_param_state_dict quantises again. At the same sharding that gives back the same codes and maxima bit
        for bit: each block's largest value comes back as 1.0 x its maximum, and every other value as its level
        times that, within an ulp of the level and so far from the midpoints between levels that decide a code.
        At another sharding the blocks are other runs of values: the moments come back within 8-bit precision."""
        state = {"step": torch.tensor(self.step_count)}
        state |= {"last_norm": self.last_norm} if self.clip is not None and self.last_norm is not None else {}
        for name, moment in (("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq)):
            if moment is not None:
                flat = moment.get(slice(0, self.size)) if moment.kind == "8bit" else moment.data
                state |= {f"{name}.{i}": t for i, t in enumerate(self.param_views(flat))}
        for name, d in (("row", self.rows), ("col", self.cols), ("vec", self.vec)):  # factored: never sharded
            state |= {f"{name}.{i}": t for i, t in d.items()}
        if self.master is not None:
            state |= {f"master.{i}": t for i, t in enumerate(self.param_views(self.master))}
        return state

    @torch.no_grad()
    def load_param_state_dict(self, state: dict) -> None:
        """The states from `state`, laid out as param_state_dict() gives them; torch.distributed.checkpoint's load
        fills such a dict in place, whatever the number of processes that saved it."""
        for name, moment in (("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq)):
            if moment is None:
                continue
            flat = torch.zeros(self.size, device=self.device) if moment.kind == "8bit" else moment.data
            for i, view in enumerate(self.param_views(flat)):
                _local(view).copy_(_local(state[f"{name}.{i}"]))
            if moment.kind == "8bit":  # whole blocks: CHUNK and every parameter's offset are multiples of BLOCK
                for start in range(0, self.size, CHUNK):
                    s = slice(start, min(start + CHUNK, self.size))
                    moment.put(s, flat[s])
        for name, d in (("row", self.rows), ("col", self.cols), ("vec", self.vec)):
            for i, t in d.items():
                t.copy_(state[f"{name}.{i}"])
        if self.master is not None:
            for i, view in enumerate(self.param_views(self.master)):
                _local(view).copy_(_local(state[f"master.{i}"]))
        self.step_count = int(state["step"])
        self.last_norm = state["last_norm"].to(self.device) if "last_norm" in state else None

    def state_tensors(self) -> list[torch.Tensor]:
        """Every tensor the moments (and masters) are stored in: what the dry run counts as 'optimizer'."""
        return list(self.state_dict().values())


@torch.no_grad()
def ema_update(ema: torch.Tensor, flat: torch.Tensor, decay: float, generator=None) -> None:
    """ema <- decay * ema + (1 - decay) * weights; in bf16 with stochastic rounding (the increments are tiny)."""
    for i in range(0, flat.numel(), CHUNK):
        s = slice(i, i + CHUNK)
        new = ema[s].float().lerp_(flat[s].float(), 1 - decay)
        ema[s].copy_(stochastic_round(new, generator) if ema.dtype == torch.bfloat16 else new)
