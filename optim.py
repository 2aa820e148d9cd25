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
"""

from __future__ import annotations

import math

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
    return torch.linalg.vector_norm(torch.stack(parts))


def _factorable(p: torch.Tensor) -> bool:
    return p.dim() >= 2 and p.shape[0] > 1 and p[0].numel() > 1


class AdamW:
    """AdamW for parameters that all share one dtype and device (see the module docstring for the options).

    The parameters become views into one flat buffer (each starting on a BLOCK boundary, keeping its memory layout:
    channels_last conv weights stay channels_last), so the unfused step is a handful of large kernels over chunks of
    it instead of ~20 small kernels per tensor. Unfused, the gradients are views of a second flat buffer."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, fp32_master=False,
                 generator=None, state="bf16", factored=False, fused=False, clip=None):
        self.params, self.lr, self.betas, self.eps, self.weight_decay = list(params), lr, betas, eps, weight_decay
        dtypes = {p.dtype for p in self.params}
        if len(dtypes) != 1:
            raise ValueError(f"all trainable parameters must share one dtype, got {dtypes}")
        p0 = self.params[0]
        self.offsets, n = [], 0
        for p in self.params:
            self.offsets.append(n)
            n += -(-p.numel() // BLOCK) * BLOCK
        # Copied in one by one, so each old tensor is freed as soon as it is copied: the weights never exist twice
        # over (8 GiB more at IF-I-XL size). The padding between parameters stays zero (zero gradient, zero update).
        self.flat = torch.zeros(n, dtype=p0.dtype, device=p0.device)
        for p, offset in zip(self.params, self.offsets):
            self.flat[offset : offset + p.numel()].copy_(p.detach().as_strided((p.numel(),), (1,)))  # memory order
            p.data = self.flat.as_strided(p.shape, p.stride(), offset)
        self.rounded = self.flat.dtype == torch.bfloat16 and not fp32_master
        self.master = self.flat.float() if self.flat.dtype != torch.float32 and fp32_master else None
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
        if fused:
            self.grad = None
            for i, p in enumerate(self.params):
                p.register_post_accumulate_grad_hook(lambda p, i=i: self._hook(i, p))
        else:
            self.grad = torch.zeros_like(self.flat)
            for p, offset in zip(self.params, self.offsets):  # backward accumulates into self.grad via these views
                p.grad = self.grad.as_strided(p.shape, p.stride(), offset)

    # ---- the update of one piece of the flat buffer ------------------------------------------
    def _update(self, s: slice, g: torch.Tensor, lr: float, ok=None, v=None) -> None:
        """One AdamW update of flat slice `s` (whole blocks) with its fp32 gradient `g` (the caller's reference
        aside, freed here). `v`: its second moment, already updated (factored, or a vector's), else the flat state
        is updated here. `ok`: a 0-dim bool tensor; False keeps the weights and moments as they were."""
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
        p = self.master[s] if self.master is not None else self.flat[s].float()  # fp32 weights: the weights
        if ok is None:  # in place: a chunk's fp32 temporaries peak at 4 (+ the rounding's noise), not 8
            new = p.mul_(1 - lr * self.weight_decay).addcdiv_(m, denom, value=-lr / bc1)  # decoupled decay, Adam
        else:
            new = torch.where(ok, p.mul(1 - lr * self.weight_decay).addcdiv_(m, denom, value=-lr / bc1), p)
        del m, denom
        if self.rounded:
            self.flat[s].copy_(stochastic_round(new, self.generator))
        elif new is not p or self.master is not None:  # bf16 from fp32 masters, or an out-of-place result
            if self.master is not None:
                self.master[s].copy_(new)
            self.flat[s].copy_(new)

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
            self._update(slice(offset + a, offset + b + pad), g, lr, ok, v)
            del g, v

    # ---- unfused: step() after backward -----------------------------------------------------
    def zero_grad(self) -> None:
        if self.grad is not None:
            self.grad.zero_()

    def grad_norm(self) -> torch.Tensor:
        """The global L2 norm in fp32."""
        return _norm(self.grad)

    @torch.no_grad()
    def step(self, lr: float | None = None) -> None:
        if self.fused:
            raise RuntimeError("a fused AdamW steps inside backward: call begin(lr) before it and end() after")
        self.step_count += 1
        lr = self.lr if lr is None else lr
        if self.factored:  # a factored second moment needs each matrix whole: one parameter at a time
            for i, p in enumerate(self.params):
                self._update_parameter(i, self.grad[self.offsets[i] : self.offsets[i] + p.numel()], lr)
        else:  # the whole flat buffer, CHUNK values at a time
            for start in range(0, self.flat.numel(), CHUNK):
                s = slice(start, min(start + CHUNK, self.flat.numel()))
                self._update(s, self.grad[s].float(), lr)

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
        if grad.stride() != p.stride():  # the flat buffer holds p in p's memory order
            grad = torch.empty_strided(p.shape, p.stride(), dtype=grad.dtype, device=grad.device).copy_(grad)
        grad = grad.as_strided((p.numel(),), (1,))
        sq = _norm(grad).square()
        self._sq.append(sq)
        self._update_parameter(i, grad, self._lr, ok=torch.isfinite(sq), scale=self._scale)

    def end(self) -> torch.Tensor:
        """The norm of this step's gradient, before clipping (non-finite if some parameter's was: those kept their
        weights); the next step clips by it."""
        norm = torch.stack(self._sq).sum().sqrt() if self._sq else torch.zeros(())
        self._sq, self.last_norm = [], norm
        return norm

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
        self.last_norm = state["last_norm"].to(self.flat.device) if "last_norm" in state else None
        if self.master is not None:
            self.master.copy_(state["master"])

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
