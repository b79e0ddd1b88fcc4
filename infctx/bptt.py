"""Segmented backprop-through-time for RWKV: train on sequences of any length by cutting them into segments and
carrying the recurrent State from one segment to the next. Knows nothing of Lightning or DeepSpeed: the backward call
is injected, so a trainer can pass its own (manual_backward, engine.backward, ...).

full mode (exact): the gradient of the whole-sequence loss, including what flows back through every carried state,
with activation memory of ONE segment. A no-grad forward pass keeps only the boundary States; then segments are
recomputed in reverse, each with grad from its detached boundary state, and backpropagated together with the state
gradient handed back by the segment after it; the boundary state's .grad is what goes to the segment before.

truncated mode: the State is carried forward but the graph is cut every `truncate_every` segments.

The loss is the token-weighted mean over every counted target of the whole sequence (mask[b,t] says whether predicting
targets[b,t] counts): each segment contributes sum(CE * mask) / (counted tokens of the whole sequence), so how the
sequence is cut never changes the loss or its gradient. The head and the cross-entropy run in chunks, so the [tokens,
vocab] logits only ever exist for one chunk: by default as infctx.ops.fused_ce's fused op (its gradients computed in the
forward; the model's LMHead runs it inside its own forward, so ZeRO-3's gathers apply), else (fused_ce=False, or a
head replaced by another module) checkpointed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from infctx.model import RWKV, State
from infctx.model.rwkv import LMHead


@dataclass
class BPTTConfig:
    segment_len: int
    mode: str = "full"  # "full" (exact gradient, constant memory) | "truncated"
    truncate_every: int = 1  # truncated mode: cut the graph every k segments
    l2wrap: bool = False  # RWKV-LM's L2Wrap: push the max logit of every position towards 0 (gradient only)
    ce_chunk: int = 4096  # tokens (batch x time) per head+CE chunk; 0 = one chunk per segment, not checkpointed
    # head + CE (+ L2Wrap) as one op that computes its gradients during the forward, chunk by chunk (infctx.ops.fused_ce:
    # no stored logits, no recompute), run by the model's LMHead (DeepSpeed ZeRO-3 included); a head replaced by
    # another module, or False, takes the checkpointed chunks.
    fused_ce: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.segment_len, int) or self.segment_len <= 0:
            raise ValueError(f"BPTTConfig.segment_len must be a positive integer (got {self.segment_len!r})")
        if self.mode not in ("full", "truncated"):
            raise ValueError(f"BPTTConfig.mode must be 'full' or 'truncated' (got {self.mode!r})")
        if not isinstance(self.truncate_every, int) or self.truncate_every <= 0:
            raise ValueError(f"BPTTConfig.truncate_every must be a positive integer (got {self.truncate_every!r})")
        if self.ce_chunk < 0:
            raise ValueError(f"BPTTConfig.ce_chunk must be >= 0 (got {self.ce_chunk!r})")


@dataclass
class StepResult:
    loss: float  # token-weighted mean CE over the counted targets of the whole sequence
    n_tokens: float  # counted targets (sum of the mask)
    n_segments: int  # segments run, padding included
    final_state: State  # detached state after the last real token


class L2Wrap(torch.autograd.Function):
    """RWKV-LM's L2Wrap: returns `loss` unchanged; in backward adds factor * max_logit at each position's argmax,
    scaled by the incoming gradient (RWKV-LM's corrected form). Keeps only the max and argmax, not the logits."""

    @staticmethod
    def forward(ctx, loss: Tensor, logits: Tensor, factor: float) -> Tensor:
        maxx, ids = logits.detach().max(dim=-1, keepdim=True)
        ctx.save_for_backward(maxx, ids)
        ctx.factor, ctx.logits_shape, ctx.logits_dtype = factor, logits.shape, logits.dtype
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        maxx, ids = ctx.saved_tensors
        gy = torch.zeros(ctx.logits_shape, dtype=ctx.logits_dtype, device=maxx.device)
        gy.scatter_(-1, ids, maxx * ctx.factor)
        return grad_output, gy * grad_output, None


class _WithCarriedGrad(torch.autograd.Function):
    """loss + carried, where `carried` = sum(state_out * grad handed back by the next segment).

    The injected backward may scale what it is given by a constant c (DeepSpeed divides by gradient-accumulation steps
    and multiplies by the fp16 loss scale). The handed-back state gradient already carries that c, so the carried term
    must receive gradient 1, not c: this node passes the incoming c to `loss` and 1 to `carried`."""

    @staticmethod
    def forward(ctx, loss: Tensor, carried: Tensor) -> Tensor:
        return loss + carried

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        return grad_output, torch.ones_like(grad_output)


def _wide(t: Tensor) -> Tensor:
    """At least fp32, so a bf16 shift state's dot product with its gradient is not summed in bf16."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _default_backward(t: Tensor) -> None:
    t.backward()


class BPTTEngine:
    def __init__(self, model: RWKV, cfg: BPTTConfig, backward: Callable[[Tensor], None] = _default_backward):
        self.model, self.cfg, self.backward = model, cfg, backward

    # ---- public API ---------------------------------------------------------------------------------------------
    def forward_backward(
        self,
        inputs: Tensor,
        targets: Tensor,
        mask: Tensor | None = None,
        state: State | None = None,
        loss_scale: float = 1.0,
        min_segments: int = 0,
    ) -> StepResult:
        """Accumulate the gradient of the sequence loss (times loss_scale) into the parameters' .grad.

        min_segments: run zero-weight padding segments (full forward + backward through every parameter, adding exactly
        zero) until that many segments ran, so every rank of a sharded job makes the same number of collective calls."""
        targets, weights, n_tokens = self._prepare(inputs, targets, mask)
        state = self._initial_state(inputs, state)
        bounds = self._bounds(inputs.shape[1])
        l2 = 1e-4 / inputs.numel() if self.cfg.l2wrap else 0.0  # RWKV-LM: 1e-4 / (B*T) of the whole sequence
        n_pad = max(0, min_segments - len(bounds))
        if self.cfg.mode == "full":  # (n-1) gradient-free forwards before the first backward: padding joins that count
            self._padding(inputs.shape[0], state, n_pad, loss_scale, with_grad=False)
            loss, final = self._full(inputs, targets, weights, state, bounds, loss_scale, l2)
            self._padding(inputs.shape[0], final, n_pad, loss_scale, with_grad=True)
        else:  # padding segments join the truncation windows, so windows end where a rank without padding ends them
            loss, final = self._truncated(inputs, targets, weights, state, bounds, loss_scale, l2, n_pad)
        return StepResult(loss, n_tokens, len(bounds) + n_pad, final)

    @torch.no_grad()
    def evaluate(self, inputs: Tensor, targets: Tensor, mask: Tensor | None = None, state: State | None = None) -> StepResult:
        targets, weights, n_tokens = self._prepare(inputs, targets, mask)
        state = self._initial_state(inputs, state)
        bounds = self._bounds(inputs.shape[1])
        total = 0.0
        for a, b in bounds:
            loss, state = self._segment(inputs[:, a:b], targets[:, a:b], weights[:, a:b], state, 0.0)
            total += _wide(loss.detach())  # on the device: no sync per segment
        return StepResult(float(total), n_tokens, len(bounds), state.detach())

    # ---- modes --------------------------------------------------------------------------------------------------
    def _full(self, inputs, targets, weights, state0, bounds, loss_scale, l2) -> tuple[float, State]:
        cut = lambda t, j: t[:, bounds[j][0]:bounds[j][1]]  # noqa: E731
        states, total = [state0], 0.0
        with torch.no_grad():  # keep only the boundary states
            for j in range(len(bounds) - 1):
                loss, nxt = self._segment(cut(inputs, j), cut(targets, j), cut(weights, j), states[-1], 0.0)
                states.append(nxt)
                total += _wide(loss.detach())  # on the device: no sync per segment
        train_state0 = any(t.requires_grad for t in state0.tensors())  # e.g. state tuning: keep its graph
        carried: tuple[Tensor | None, ...] | None = None
        final = None
        for j in reversed(range(len(bounds))):
            s_in = states.pop()
            if j > 0 or not train_state0:
                s_in = s_in.detach().requires_grad_(j > 0)
            with torch.enable_grad():
                loss, s_out = self._segment(cut(inputs, j), cut(targets, j), cut(weights, j), s_in, l2)
                objective = loss * loss_scale
                pairs = [(t, g) for t, g in zip(s_out.tensors(), carried or ()) if g is not None]
                if pairs:
                    dot = sum((_wide(t) * _wide(g)).sum() for t, g in pairs)
                    objective = _WithCarriedGrad.apply(objective, dot.to(objective.dtype))
            if j == len(bounds) - 1:
                final = s_out.detach()
                total += _wide(loss.detach())  # on the device: no sync per segment
            self.backward(objective)
            carried = s_in.grads() if j > 0 else None
            del loss, s_out, objective
        return float(total), final

    def _truncated(self, inputs, targets, weights, state, bounds, loss_scale, l2, n_pad) -> tuple[float, State]:
        """Backprop every `truncate_every` segments (and at the end), then cut the graph. The n_pad zero-weight
        segments after the real ones count as segments of the windows: one backward per window either way."""
        k, total, group = self.cfg.truncate_every, 0.0, None
        n_total = len(bounds) + n_pad
        for j in range(n_total):
            with torch.enable_grad():
                if j < len(bounds):
                    a, b = bounds[j]
                    loss, state = self._segment(inputs[:, a:b], targets[:, a:b], weights[:, a:b], state, l2)
                    total += _wide(loss.detach())  # on the device: no sync per segment
                else:
                    loss = self._padding_segment(inputs.shape[0], state)
            group = loss if group is None else group + loss
            if (j + 1) % k == 0 or j == n_total - 1:  # end of a truncation window: backprop it, cut the graph
                self.backward(group * loss_scale)
                group, state = None, state.detach()
        return float(total), state

    def _padding(self, batch: int, state: State, n_pad: int, loss_scale: float, with_grad: bool) -> None:
        """Full mode's padding: n_pad forward(+backward) pairs after the real segments.

        with_grad=False runs only their gradient-free forwards (full mode's boundary pass), so a padded rank makes the
        same sequence of forwards and backwards (and so of ZeRO-3 gathers) as a rank with that many real segments."""
        for _ in range(n_pad):
            with torch.set_grad_enabled(with_grad):
                loss = self._padding_segment(batch, state)
            if with_grad:
                self.backward(loss * loss_scale)

    def _padding_segment(self, batch: int, state: State) -> Tensor:
        """A zero-weight segment from a detached state: graph-connected to every parameter (backward hooks fire as
        for a real one) with a loss that is exactly zero; its output state is dropped."""
        L = self.cfg.segment_len
        device = self.model.emb.weight.device
        tokens = torch.zeros(batch, L, dtype=torch.long, device=device)
        zero_w = torch.zeros(batch, L, dtype=self._weight_dtype(), device=device)
        loss, _ = self._segment(tokens, tokens, zero_w, state.detach(), 0.0)
        return loss

    # ---- one segment --------------------------------------------------------------------------------------------
    def _segment(self, inputs, targets, weights, state, l2) -> tuple[Tensor, State]:
        """Sum over the segment of CE * weight (weights already divided by the sequence's token count)."""
        h, state = self.model.forward_hidden(inputs, state)
        B, T, _ = h.shape
        if self._fused_head():
            return self.model.head(h, targets, weights, l2, self.cfg.ce_chunk or B * T), state
        step = T if self.cfg.ce_chunk == 0 else max(1, self.cfg.ce_chunk // B)
        use_ckpt = self.cfg.ce_chunk > 0 and torch.is_grad_enabled()
        loss = None
        for a in range(0, T, step):
            args = (h[:, a:a + step], targets[:, a:a + step], weights[:, a:a + step], l2)
            part = checkpoint(self._head_ce, *args, use_reentrant=False) if use_ckpt else self._head_ce(*args)
            loss = part if loss is None else loss + part
        return loss, state

    def _fused_head(self) -> bool:
        """Whether the head runs as the fused head+CE op: fused_ce is on and the head is the model's LMHead (called
        as a module, so that hooks on it, e.g. DeepSpeed ZeRO-3's parameter gathers, run). A head replaced by anything
        else keeps the checkpointed path, which calls it for logits."""
        return self.cfg.fused_ce and type(self.model.head) is LMHead

    def _head_ce(self, h: Tensor, targets: Tensor, weights: Tensor, l2: float) -> Tensor:
        logits = self.model.head(h)
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
        loss = (ce * weights.reshape(-1).to(ce.dtype)).sum()
        if l2 and torch.is_grad_enabled():
            loss = L2Wrap.apply(loss, logits, l2)
        return loss

    # ---- inputs -------------------------------------------------------------------------------------------------
    def _weight_dtype(self) -> torch.dtype:
        return torch.float64 if self.model.emb.weight.dtype == torch.float64 else torch.float32

    def _prepare(self, inputs: Tensor, targets: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, float]:
        """(targets with uncounted positions set to 0, per-target weights = mask / counted tokens, counted tokens)."""
        if inputs.dim() != 2 or inputs.shape[1] == 0:
            raise ValueError(f"BPTTEngine: inputs must be token ids [B, T] with T >= 1, got shape {tuple(inputs.shape)}")
        if targets.shape != inputs.shape:
            raise ValueError(f"BPTTEngine: targets shape {tuple(targets.shape)} != inputs shape {tuple(inputs.shape)}")
        if mask is None:
            mask = torch.ones_like(inputs, dtype=self._weight_dtype())
        elif mask.shape != inputs.shape:
            raise ValueError(
                f"BPTTEngine: mask shape {tuple(mask.shape)} != inputs shape {tuple(inputs.shape)} (mask is aligned to targets)"
            )
        mask = mask.to(self._weight_dtype())
        n_tokens = mask.sum().item()
        targets = targets.masked_fill(mask == 0, 0)  # an uncounted target may be a pad id outside the vocabulary
        return targets, (mask / n_tokens if n_tokens > 0 else mask), n_tokens

    def _initial_state(self, inputs: Tensor, state: State | None) -> State:
        if state is None:
            return self.model.zero_state(inputs.shape[0])
        if state.batch_size != inputs.shape[0]:
            raise ValueError(f"BPTTEngine: state has batch {state.batch_size} but inputs have batch {inputs.shape[0]}")
        return state

    def _bounds(self, T: int) -> list[tuple[int, int]]:
        L = self.cfg.segment_len
        return [(a, min(a + L, T)) for a in range(0, T, L)]
