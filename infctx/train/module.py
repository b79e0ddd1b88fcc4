"""The LightningModule: one optimizer step = `accumulate` micro-batches, each run through the segmented BPTT engine.

Manual optimization, because the engine calls backward once per segment: we hand it `manual_backward` so Lightning
and DeepSpeed see every backward. Under DDP the reducer is switched off and the gradients are all-reduced once per
step; under DeepSpeed each backward is counted as a micro-step so ZeRO accumulates (instead of
overwriting) the partitioned gradients. Ranks agree on the segment count of every micro-batch so collectives
(ZeRO-3 parameter gathers) stay in lockstep, and each rank scales its loss by its share of the global token count,
which makes the gradient equal to a single-process run over the same global batch.
"""

from __future__ import annotations

import math
import random
import resource
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist

from infctx.bptt import BPTTConfig, BPTTEngine
from infctx.model import RWKV, ModelConfig
from infctx.train.errors import ConfigError
from infctx.train.optim import OptimConfig, lr_at, make_optimizer, set_lr


class InfctxModule(pl.LightningModule):
    def __init__(
        self,
        arch: ModelConfig,
        segment_len: int = 512,
        bptt: Literal["full", "truncated"] = "full",
        truncate_every: int = 1,
        l2wrap: bool = True,
        global_batch_size: int | None = None,
        optim: OptimConfig | None = None,
        init_from: str | None = None,
        max_bad_steps: int = 5,
    ) -> None:
        """
        Args:
            arch: the RWKV architecture (version, n_layer, n_embd, vocab_size, head_size, wkv_backend, ...).
            segment_len: tokens per BPTT segment; the state is carried across segments.
            bptt: "full" = exact gradient through every segment boundary; "truncated" = cut it.
            truncate_every: in truncated mode, let the gradient cross this many segments before cutting.
            l2wrap: RWKV-LM's L2Wrap regulariser on the logits.
            global_batch_size: sequences per optimizer step over all ranks (None: one micro-batch per rank);
                must be a multiple of data.batch_size x devices; the rest is gradient accumulation.
            optim: optimizer and learning-rate schedule.
            init_from: RWKV-LM .pth to start from (None: fresh RWKV-LM initialisation).
            max_bad_steps: stop after this many consecutive steps with a non-finite loss or gradient.
        """
        super().__init__()
        if not isinstance(segment_len, int) or segment_len < 1:
            raise ConfigError(f"model.segment_len must be a positive integer (got {segment_len!r})")
        if bptt not in ("full", "truncated"):
            raise ConfigError(f"model.bptt must be 'full' or 'truncated' (got {bptt!r})")
        if truncate_every < 1:
            raise ConfigError(f"model.truncate_every must be >= 1 (got {truncate_every})")
        if init_from is not None and not Path(init_from).is_file():
            raise ConfigError(f"model.init_from: no such file {init_from!r}; give an RWKV-LM .pth or null")
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.arch = arch
        self.segment_len = segment_len
        self.bptt_cfg = BPTTConfig(segment_len=segment_len, mode=bptt, truncate_every=truncate_every, l2wrap=l2wrap)
        self.global_batch_size = global_batch_size
        self.optim_cfg = optim or OptimConfig()
        self.init_from = init_from
        self.max_bad_steps = max_bad_steps
        self.model: RWKV | None = None
        self.engine: BPTTEngine | None = None
        self._init_state: dict | None = None
        # Progress that must survive a resume (saved in on_save_checkpoint).
        self.tokens_seen = 0
        self.samples_seen = 0
        self.bad_streak = 0
        self.accumulate = 1
        self._grad_watch: GradWatch | None = None  # unmanaged ZeRO-2 only (see deepspeed_grads_finite)
        self._reset_step_stats()

    # ---------------------------------------------------------------- model creation
    def setup(self, stage: str) -> None:
        """Outside ZeRO-3's sharded context: rank 0 prepares the full initial weights once, on CPU."""
        self.accumulate = self._accumulate_steps()
        ds_config = self._ds_config()
        if ds_config is not None:  # one source of truth: the recipe's model.optim / data.batch_size
            ds_config["gradient_clipping"] = self.optim_cfg.grad_clip or 0.0
            ds_config["train_micro_batch_size_per_gpu"] = self._micro_batch_size()
            deepspeed_segment_config(ds_config)
        if self.model is None and self._zero3() and self.trainer.is_global_zero:
            self._init_state = self._initial_state_dict()

    def configure_model(self) -> None:
        """Built here so that ZeRO-3 partitions parameters as they are created."""
        if self.model is not None:
            return
        if self._zero3():
            self.model = RWKV(self.arch, init_weights=False)  # partitioned placeholders; filled from rank 0
            zero3_leaf_blocks(self.model)
            self._fill_partitioned(self.model)
        elif self.init_from:
            self.model = RWKV(self.arch, init_weights=False)
            self.model.load_state_dict(self._load_pth(), strict=True)
        else:
            self.model = RWKV(self.arch)  # RWKV-LM initialisation
        self.engine = BPTTEngine(self.model, self.bptt_cfg, backward=self._backward)

    def _zero3(self) -> bool:
        return bool(getattr(self.trainer.strategy, "zero_stage_3", False))

    def _ds_config(self) -> dict | None:
        config = getattr(self.trainer.strategy, "config", None)
        return config if isinstance(config, dict) else None

    def _load_pth(self) -> dict:
        """Memory-mapped RWKV-LM .pth, shape-checked against model.arch."""
        from infctx.checkpoint import load_pth

        return load_pth(self.init_from, self.arch)

    def _initial_state_dict(self) -> dict:
        if self.init_from:
            return self._load_pth()
        return RWKV(self.arch).state_dict()

    def _fill_partitioned(self, model: torch.nn.Module) -> None:
        """Copy rank 0's initial weights into ZeRO-3 partitions one parameter at a time (no full copy per rank)."""
        import deepspeed

        source = self._init_state
        for name, param in model.named_parameters():
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                if self.trainer.is_global_zero:
                    if name not in source:
                        raise ConfigError(f"model.init_from: {self.init_from} has no tensor {name!r}")
                    param.data.copy_(source[name].to(param.dtype).view_as(param))
        self._init_state = None

    def _backward(self, loss: torch.Tensor) -> None:
        self.manual_backward(loss)
        engine = self._deepspeed()
        if engine is not None:
            deepspeed_after_backward(engine)

    # ---------------------------------------------------------------- optimizer
    def configure_optimizers(self):
        zero = (self._ds_config() or {}).get("zero_optimization", {})
        offload = zero.get("offload_optimizer", {}).get("device") == "cpu"
        self._base_optimizer = make_optimizer(self.model, self.optim_cfg, cpu_offload=offload)
        return self._base_optimizer

    def _accumulate_steps(self) -> int:
        per_step = self._micro_batch_size() * self.trainer.world_size
        if self.global_batch_size is None:
            return 1
        if self.global_batch_size % per_step:
            raise ConfigError(
                f"model.global_batch_size={self.global_batch_size} is not a multiple of data.batch_size x devices"
                f" = {per_step}"
            )
        return self.global_batch_size // per_step

    def _micro_batch_size(self) -> int:
        dm = self.trainer.datamodule
        return int(getattr(dm, "batch_size", 1)) if dm is not None else 1

    def tokens_per_step(self) -> int:
        dm = self.trainer.datamodule
        ctx_len = int(getattr(dm, "ctx_len", 0))
        return self._micro_batch_size() * self.trainer.world_size * self.accumulate * ctx_len

    def decay_tokens(self) -> int | None:
        if self.optim_cfg.decay_tokens is not None:
            return self.optim_cfg.decay_tokens
        if self.trainer.max_steps and self.trainer.max_steps > 0:
            return max(self.trainer.max_steps * self.tokens_per_step() - self.optim_cfg.warmup_tokens, 1)
        return None

    # ---------------------------------------------------------------- training
    def _reset_step_stats(self) -> None:
        self._micro = 0
        self._loss_sum = 0.0  # sum over micro-batches of (local mean loss x local counted tokens)
        self._tok_counted = 0.0
        self._tok_input = 0  # tokens actually run this step (after trimming, before cross-rank padding)
        self._segments = 0
        self._step_batches: list[dict] = []
        if self._grad_watch is not None:
            self._grad_watch.reset()

    def on_train_start(self) -> None:
        self._t_last = time.perf_counter()
        engine = self._deepspeed()
        if engine is not None and engine.zero_optimization_stage() == 2 and not engine.managed_gradient_accumulation():
            self._grad_watch = GradWatch(self.model.parameters())
        if self.optim_cfg.schedule != "constant" and self.decay_tokens() is None:
            raise ConfigError("model.optim.decay_tokens is null and trainer.max_steps is unset: cannot decay the lr")

    def training_step(self, batch: dict, batch_idx: int) -> None:
        self._disable_ddp_reducer()
        inputs, targets, mask = batch["input_ids"], batch["targets"], batch.get("mask")
        # float64 sum: under DeepSpeed bf16 Lightning hands us the mask in bf16, whose sum of ones is exact only to 256
        counted = float(mask.sum(dtype=torch.float64)) if mask is not None else float(inputs.numel())
        counted_global = counted
        if self.trainer.world_size > 1:
            # Ranks agree on the length (max) and the global counted-token total (sum). Shorter batches are padded
            # with zero-weight tokens to the common length: every rank then runs the same segments, the same
            # no-grad and grad forwards and the same backwards, so ZeRO-3's per-module gathers stay in lockstep.
            stats = torch.tensor([inputs.shape[1], -counted], dtype=torch.float64, device=self.device)
            dist.all_reduce(stats, op=dist.ReduceOp.MAX)
            total = torch.tensor([counted], dtype=torch.float64, device=self.device)
            dist.all_reduce(total)
            inputs, targets, mask = _pad_to(inputs, targets, mask, int(stats[0]))
            counted_global = float(total[0])
        n_segments = math.ceil(inputs.shape[1] / self.segment_len)
        # Gradient = d(global token-weighted mean)/d(params) after the ranks' gradients are averaged.
        share = self.trainer.world_size * counted / counted_global if counted_global > 0 else 0.0
        self._step_batches.append({k: v.detach().cpu() for k, v in batch.items() if torch.is_tensor(v)})
        result = self.engine.forward_backward(
            inputs, targets, mask, loss_scale=share / self.accumulate, min_segments=n_segments
        )
        self._loss_sum += float(result.loss) * counted
        self._tok_counted += counted
        self._tok_input += batch["input_ids"].numel()
        self._segments = max(self._segments, result.n_segments)
        self._micro += 1
        if self._micro == self.accumulate:
            self._optimizer_step()

    def _disable_ddp_reducer(self) -> None:
        """We all-reduce gradients ourselves once per optimizer step. Lightning re-enables DDP's gradient sync after
        every training_step and its manual_backward then prepares the reducer once per backward, which breaks with
        one backward per segment: switch the sync off inside each step."""
        wrapped = self.trainer.strategy.model
        if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
            wrapped.require_backward_grad_sync = False

    def _deepspeed(self):
        return getattr(self.trainer.strategy, "deepspeed_engine", None)

    def _optimizer_step(self) -> None:
        opt = self.optimizers()
        totals = torch.tensor([self._loss_sum, self._tok_counted, float(self._tok_input)], dtype=torch.float64,
                              device=self.device)
        if self.trainer.world_size > 1:
            dist.all_reduce(totals)
        loss = float(totals[0] / totals[1]) if totals[1] > 0 else 0.0
        step_tokens = int(totals[2])
        engine = self._deepspeed()
        grad_norm = self._reduce_and_clip() if engine is None else None
        grads_ok = engine is None or deepspeed_grads_finite(engine, self._grad_watch)
        finite = math.isfinite(loss) and grads_ok and (grad_norm is None or math.isfinite(grad_norm))
        if not finite:
            self._skip_bad_step(opt, loss, grad_norm if grads_ok else float("nan"))
            self._reset_step_stats()
            return
        self.bad_streak = 0
        lr = lr_at(self.tokens_seen, self.optim_cfg, self.decay_tokens())
        set_lr(self._base_optimizer, lr)
        opt.step()
        opt.zero_grad(set_to_none=True)
        # tokens_seen (drives the LR schedule) counts sequences x ctx_len, as RWKV-LM does: it does not depend on how
        # batches were trimmed or split across ranks. tokens/s counts the tokens actually run (trimmed, unpadded).
        self.tokens_seen += self.tokens_per_step()
        self.samples_seen += self._micro_batch_size() * self.trainer.world_size * self.accumulate
        if engine is not None:
            grad_norm = engine.get_global_grad_norm()
        self._log_step(loss, lr, step_tokens, grad_norm)
        self._reset_step_stats()

    def _reduce_and_clip(self) -> float:
        """All-reduce (DDP) then clip; returns the global gradient norm before clipping."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        world = self.trainer.world_size
        if world > 1:
            for p in params:
                dist.all_reduce(p.grad)
                p.grad.div_(world)
        clip = self.optim_cfg.grad_clip
        if clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        return float(norm)

    def _skip_bad_step(self, opt, loss: float, grad_norm: float | None) -> None:
        engine = self._deepspeed()
        if engine is not None:
            deepspeed_discard_grads(engine)
        else:
            opt.zero_grad(set_to_none=True)
        self.bad_streak += 1
        dump_dir = Path(self.trainer.default_root_dir) / "nan_dumps"
        dump_dir.mkdir(parents=True, exist_ok=True)
        path = dump_dir / f"step-{self.trainer.global_step:08d}-rank{self.global_rank}.pt"
        torch.save(
            {"step": self.trainer.global_step, "tokens_seen": self.tokens_seen, "samples_seen": self.samples_seen,
             "loss": loss, "grad_norm": grad_norm, "batches": self._step_batches},
            path,
        )
        warnings.warn(
            f"step {self.trainer.global_step}: non-finite loss={loss} grad_norm={grad_norm}; step skipped, batch "
            f"dumped to {path} ({self.bad_streak}/{self.max_bad_steps} in a row)",
            RuntimeWarning,
            stacklevel=2,
        )
        if self.bad_streak >= self.max_bad_steps:
            raise NonFiniteStop(
                f"stopped after {self.bad_streak} consecutive non-finite steps; batches dumped under {dump_dir}"
            )

    def _log_step(self, loss: float, lr: float, step_tokens: int, grad_norm: float | None) -> None:
        now = time.perf_counter()
        tok_s = step_tokens / max(now - self._t_last, 1e-9)
        self._t_last = now
        if torch.cuda.is_available() and self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) / 2**30
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
        metrics = {
            "train/loss": loss,
            "train/lr": lr,
            "train/tokens_per_s": tok_s,
            "train/tokens_seen": float(self.tokens_seen),
            "train/segments": float(self._segments),
            "train/peak_mem_gb": peak,
        }
        if grad_norm is not None:
            metrics["train/grad_norm"] = float(grad_norm)
        self._to_loggers(metrics)
        self.log("loss", loss, prog_bar=True, logger=False, rank_zero_only=True, batch_size=1)
        self.log("tok/s", tok_s, prog_bar=True, logger=False, rank_zero_only=True, batch_size=1)

    # ---------------------------------------------------------------- validation
    def on_validation_epoch_start(self) -> None:
        self._val = torch.zeros(2, dtype=torch.float64, device=self.device)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        mask = batch.get("mask")
        result = self.engine.evaluate(batch["input_ids"], batch["targets"], mask)
        counted = float(mask.sum(dtype=torch.float64)) if mask is not None else float(batch["targets"].numel())
        self._val += torch.tensor([float(result.loss) * counted, counted], dtype=torch.float64, device=self.device)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.world_size > 1:
            dist.all_reduce(self._val)
        if self._val[1] > 0:
            val_loss = float(self._val[0] / self._val[1])
            val = {"val/loss": val_loss, "val/ppl": math.exp(min(val_loss, 50.0))}
            # self.log feeds the progress bar, EarlyStopping and `infctx validate`'s table; rows go to the loggers.
            for key, value in val.items():
                self.log(key, value, prog_bar=key == "val/loss", logger=False, rank_zero_only=True, batch_size=1)
            if self.trainer.state.fn == "fit":
                self._to_loggers(val)

    def _to_loggers(self, metrics: dict[str, float]) -> None:
        """One row per optimizer step, x = optimizer steps done. (Lightning's own logging counts micro-batches
        and repeats a step's row on the following micro-batch under gradient accumulation.)"""
        if self.trainer.is_global_zero:
            for logger in self.loggers:
                logger.log_metrics(metrics, step=self.trainer.global_step)

    # ---------------------------------------------------------------- resume
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["infctx"] = {
            "tokens_seen": self.tokens_seen,
            "samples_seen": self.samples_seen,
            "bad_streak": self.bad_streak,
            "arch": asdict(self.arch),
            "rng": _rng_state(),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("infctx")
        if state is None:
            return
        self.tokens_seen = state["tokens_seen"]
        self.samples_seen = state["samples_seen"]
        self.bad_streak = state["bad_streak"]
        _set_rng_state(state["rng"])

    # ---------------------------------------------------------------- summary
    def summary_lines(self) -> list[str]:
        from infctx.ops import resolve_backend

        trainer = self.trainer
        n_params = sum(getattr(p, "ds_numel", p.numel()) for p in self.model.parameters())
        dm = trainer.datamodule
        ctx_len = int(getattr(dm, "ctx_len", 0))
        strategy = type(trainer.strategy).__name__
        zero = (self._ds_config() or {}).get("zero_optimization")
        if zero is not None:
            offload = " + CPU offload" if zero.get("offload_optimizer", {}).get("device") == "cpu" else ""
            strategy += f" (ZeRO-{zero.get('stage', 0)}{offload})"
        try:
            backend = resolve_backend(self.arch.wkv_backend, self.device, self.arch.version, self.arch.head_size)
        except (ValueError, RuntimeError) as err:
            backend = f"unavailable ({err})"
        return [
            f"model      RWKV-{self.arch.version} L{self.arch.n_layer} D{self.arch.n_embd} vocab {self.arch.vocab_size}"
            f" = {n_params / 1e6:.2f}M parameters",
            f"batch      {self.tokens_per_step():,} tokens per optimizer step = {self._micro_batch_size()} seq x "
            f"{trainer.world_size} ranks x {self.accumulate} accumulation x ctx_len {ctx_len}",
            f"bptt       {self.bptt_cfg.mode}, segment_len {self.segment_len}, "
            f"{math.ceil(ctx_len / self.segment_len) if ctx_len else '?'} segments per sequence",
            f"kernels    WKV backend {backend}",
            f"strategy   {strategy}, precision {trainer.precision}, devices {trainer.world_size} x "
            f"{type(trainer.accelerator).__name__.replace('Accelerator', '')}",
        ]

    def on_fit_start(self) -> None:
        if self.trainer.is_global_zero:
            print("infctx fit\n  " + "\n  ".join(self.summary_lines()), flush=True)


def deepspeed_segment_config(ds_config: dict) -> None:
    """DeepSpeed settings for one backward per segment, several backwards per optimizer step.

    With DeepSpeed's managed accumulation every backward is an accumulation boundary, and ZeRO-0/1/2 then *copy*
    each backward's reduced gradients over the previous one: all but the last segment's gradient would be lost.
    Unmanaged, backwards accumulate and engine.step() is the boundary. ZeRO-3 stays managed (unmanaged ZeRO-3 refuses
    overlap_comm); it accumulates once each backward is closed as its own micro-step (deepspeed_after_backward)."""
    if ds_config.get("zero_optimization", {}).get("stage", 0) != 3:
        ds_config["managed_gradient_accumulation"] = False


def deepspeed_after_backward(engine) -> None:
    """ZeRO-3 counts micro-steps per engine.forward() and copies (not adds) a backward's gradient partitions on the
    first one. A training step runs one backward per segment inside a single forward, so each backward is closed as
    its own micro-step: later segments then accumulate."""
    if engine.zero_optimization_stage() == 3:
        engine.optimizer.clear_backward_seen_flag()


class GradWatch:
    """A tensor hook per parameter that sees each gradient as autograd produces it, before DeepSpeed reduces or
    partitions it, and remembers (on the device, no sync) whether any value since the last reset was not finite."""

    def __init__(self, params):
        self._bad: torch.Tensor | None = None
        self.handles = [p.register_hook(self._see) for p in params if p.requires_grad]

    def _see(self, grad: torch.Tensor) -> None:
        bad = (~torch.isfinite(grad)).any()
        self._bad = bad if self._bad is None else self._bad | bad

    def bad(self) -> torch.Tensor:
        """A 0-dim bool tensor: a non-finite gradient since the last reset (False when no gradient was seen)."""
        if self._bad is None:
            return torch.zeros((), dtype=torch.bool)
        return self._bad

    def reset(self) -> None:
        self._bad = None


def deepspeed_grads_finite(engine, watch: GradWatch | None = None) -> bool:
    """Whether every rank's gradients are finite, before DeepSpeed's step. DeepSpeed itself checks only under fp16
    loss scaling, so a NaN gradient of a bf16 run would reach the weights. ZeRO-1/2/3 move the gradients into their
    own buffers: their optimizer's inf/nan check looks at the local partition and all-reduces the verdict. Without
    ZeRO, and with ZeRO-1 under unmanaged accumulation (reduced only in step()), the gradients are still in `.grad`.
    Unmanaged ZeRO-2 reduces each backward into buffers it exposes only inside step(): there `watch` (a GradWatch on
    the parameters) has seen every local gradient as autograd produced it."""
    stage, managed = engine.zero_optimization_stage(), engine.managed_gradient_accumulation()
    if stage == 3 or (stage >= 1 and managed):
        return not engine.optimizer.has_overflow(partition_gradients=True)
    if stage == 2:
        if watch is None:
            raise ValueError("deepspeed_grads_finite: unmanaged ZeRO-2 needs the GradWatch that saw the backwards")
        bad = watch.bad().to(device=engine.device, dtype=torch.float32)
    else:
        bad = torch.zeros((), device=engine.device)
        for p in engine.module.parameters():
            if p.grad is not None:
                bad = torch.maximum(bad, (~torch.isfinite(p.grad)).any().float())
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return not bool(bad)


def deepspeed_discard_grads(engine) -> None:
    """Drop a skipped step's gradients the way DeepSpeed does after its own fp16 overflow: zero_grad, and with ZeRO-1/2
    CPU offload also the offload buffers and their overflow flag (kept until the next step otherwise)."""
    optimizer = engine.optimizer
    optimizer.zero_grad(set_to_none=True)
    if getattr(optimizer, "cpu_offload", False) and hasattr(optimizer, "reset_cpu_buffers"):
        optimizer.reset_cpu_buffers()


def zero3_leaf_blocks(model: RWKV) -> None:
    """Under ZeRO-3, gather each block's parameters as one unit (DeepSpeed "leaf" modules). DeepSpeed otherwise fetches
    a module's own parameters only when that module's forward runs, so block code that reads a submodule's weight
    directly (e.g. `self.key.weight` handed to a fused region) would get the empty partition placeholder."""
    from deepspeed.utils import set_z3_leaf_modules

    set_z3_leaf_modules(model, sorted({type(b) for b in model.blocks}, key=lambda c: c.__qualname__))


def _pad_to(inputs: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None, length: int):
    """Right-pad a batch to `length` tokens with zero-weight positions (a causal model: earlier outputs unchanged)."""
    extra = length - inputs.shape[1]
    if mask is None:
        mask = torch.ones(inputs.shape, dtype=torch.float32, device=inputs.device)
    if extra <= 0:
        return inputs, targets, mask
    pad = lambda t: torch.nn.functional.pad(t, (0, extra))  # noqa: E731  (zeros: token 0, weight 0)
    return pad(inputs), pad(targets), pad(mask)


def _rng_state() -> dict:
    """Every RNG a step could draw from, as types `torch.load(weights_only=True)` accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "python": random.getstate(),
    }


def _set_rng_state(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    kind, keys, pos, has_gauss, gauss = rng["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = rng["python"]
    random.setstate((version, tuple(internal), gauss_next))


class NonFiniteStop(RuntimeError):
    """Raised when too many steps in a row had a non-finite loss or gradient."""
