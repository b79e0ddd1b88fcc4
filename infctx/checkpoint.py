"""RWKV-LM .pth checkpoints: read them (memory-mapped, the config read from the tensors), write them (atomically),
initialise fresh ones (`infctx init`) and export training checkpoints to them (`infctx export`).

A .pth is a flat {name: tensor} dict whose names are our parameter names (they equal RWKV-LM's), so no renaming is
ever needed. Recurrent-state layout, for the conversions below: ours is wkv[layer, batch, head, value, key] for every
version. RWKV-LM state tuning stores `blocks.{i}.att.time_state` as [head, value, key] (the same); the `rwkv` pip
package keeps [head, key, value] for v5/v6 and [head, value, key] for v7 in its per-layer state list.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path

import torch

from infctx.fileio import write_atomic
from infctx.model import RWKV, ModelConfig, State

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")
_TIME_STATE_KEY = re.compile(r"^blocks\.(\d+)\.att\.time_state$")


class CheckpointError(ValueError):
    """A checkpoint that does not fit: the message is one line naming the file, the tensor and what to do."""


# ----------------------------------------------------------------------------------------------------------- writing


def atomic_save(obj: object, path: str | os.PathLike) -> Path:
    """torch.save to a temporary file in the target folder, then rename: a crash never leaves a half-written file."""
    return write_atomic(path, lambda tmp: torch.save(obj, tmp))


def save_pth(weights: Mapping[str, torch.Tensor] | torch.nn.Module, path: str | os.PathLike,
             dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write an RWKV-LM .pth: every floating tensor cast to `dtype`, each one a compact CPU copy (no shared storage)."""
    if isinstance(weights, torch.nn.Module):
        weights = weights.state_dict()
    out = {}
    for name, t in weights.items():
        t = t.detach().to("cpu")
        out[name] = (t.to(dtype) if t.is_floating_point() else t).contiguous().clone()
    return atomic_save(out, path)


# ----------------------------------------------------------------------------------------------------------- reading


def read_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Memory-mapped load of a flat {name: tensor} file: only the tensors that are used get paged in."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as err:  # torch raises several types for a file that is not a torch zip archive
        raise CheckpointError(f"{path}: cannot be read as a PyTorch checkpoint ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''})") from err
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: not an RWKV-LM .pth (expected a flat dict of tensors); "
                              "for a training checkpoint use `infctx export`")
    return obj


def split_time_state(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[int, torch.Tensor]]:
    """Separate RWKV-LM state-tuning tensors (`blocks.{i}.att.time_state`, [H, value, key]) from the weights."""
    weights, time_state = {}, {}
    for name, t in tensors.items():
        m = _TIME_STATE_KEY.match(name)
        if m:
            time_state[int(m.group(1))] = t
        else:
            weights[name] = t
    return weights, time_state


# Config fields read from tensor shapes, per version: field -> (parameter of a block, dim, divisor).
_SHAPE_FIELDS: dict[int, dict[str, tuple[str, int, int]]] = {
    5: {"head_size": ("att.time_faaaa", 1, 1), "dim_att": ("att.key.weight", 0, 1),
        "dim_ffn": ("ffn.key.weight", 0, 1)},
    6: {"head_size": ("att.time_faaaa", 1, 1), "dim_att": ("att.key.weight", 0, 1), "dim_ffn": ("ffn.key.weight", 0, 1),
        "d_mix_lora": ("att.time_maa_w1", 1, 5), "d_decay_lora": ("att.time_decay_w1", 1, 1)},
    7: {"head_size": ("att.r_k", 1, 1), "dim_ffn": ("ffn.key.weight", 0, 1), "d_decay_lora": ("att.w1", 1, 1),
        "d_aaa_lora": ("att.a1", 1, 1), "d_mv_lora": ("att.v1", 1, 1), "d_gate_lora": ("att.g1", 1, 1)},
}


def detect_version(tensors: Mapping[str, torch.Tensor], source: str = "checkpoint") -> int:
    """The RWKV version, told by a tensor only that version has: v7 `att.r_k`, v6 `att.time_maa_x`, v5 `att.time_mix_k`
    with a per-head [H, N] `att.time_decay` (RWKV-5.2; older v5/v4 layouts are not supported)."""
    if "blocks.0.att.r_k" in tensors:
        return 7
    if "blocks.0.att.time_maa_x" in tensors:
        return 6
    decay = tensors.get("blocks.0.att.time_decay")
    if "blocks.0.att.time_mix_k" in tensors and decay is not None and decay.dim() == 2:
        return 5
    raise CheckpointError(f"{source}: no RWKV-7 (blocks.0.att.r_k), RWKV-6 (blocks.0.att.time_maa_x) or RWKV-5.2 "
                          "(blocks.0.att.time_mix_k with a per-head time_decay) tensors; "
                          "only RWKV-5.2/6/7 are supported")


def infer_config(tensors: Mapping[str, torch.Tensor], source: str = "checkpoint", **overrides) -> ModelConfig:
    """Read version, n_layer, n_embd, vocab, head size, dim_ffn (and dim_att / LoRA widths) from the tensors themselves.

    Fields no tensor tells (wkv_backend, head_size_divisor) keep their defaults unless given in `overrides`.
    """
    if "emb.weight" not in tensors:
        raise CheckpointError(f"{source}: tensor 'emb.weight' is missing, so this is not an RWKV-5/6/7 checkpoint")
    layers = sorted({int(m.group(1)) for m in map(_BLOCK_KEY.match, tensors) if m})
    if not layers:
        raise CheckpointError(f"{source}: no 'blocks.N.*' tensors, so this is not an RWKV-5/6/7 checkpoint")
    version = detect_version(tensors, source)
    vocab_size, n_embd = tensors["emb.weight"].shape
    values = dict(version=version, n_layer=layers[-1] + 1, n_embd=int(n_embd), vocab_size=int(vocab_size))
    for field, (param, dim, divisor) in _SHAPE_FIELDS[version].items():
        name = next((f"blocks.{i}.{param}" for i in layers if f"blocks.{i}.{param}" in tensors), None)
        if name is None:
            raise CheckpointError(f"{source}: no 'blocks.N.{param}' tensor, needed to read {field} of an "
                                  f"RWKV-{version}")
        values[field] = int(tensors[name].shape[dim]) // divisor
    values.update(overrides)
    try:
        return ModelConfig(**values)
    except ValueError as err:
        raise CheckpointError(f"{source}: the tensors imply an invalid config: {err}") from err


def check_shapes(expected: Mapping[str, torch.Size], tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """Every tensor the model needs is present with the same shape, and nothing else is; else one clear line."""
    problems = []
    for name, shape in expected.items():
        if name not in tensors:
            problems.append(f"tensor '{name}' is missing (the model expects shape {tuple(shape)})")
        elif tuple(tensors[name].shape) != tuple(shape):
            problems.append(f"tensor '{name}' has shape {tuple(tensors[name].shape)} in the file but the model "
                            f"expects {tuple(shape)}")
    problems += [f"unexpected tensor '{name}' (shape {tuple(t.shape)}) that the model does not have"
                 for name, t in tensors.items() if name not in expected]
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise CheckpointError(f"{source}: {problems[0]}{more}; check the model settings (version, n_layer, n_embd, "
                              "head_size, dim_ffn, vocab_size) against the checkpoint")


def expected_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    """Parameter shapes of RWKV(cfg), from a model built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        model = RWKV(cfg, init_weights=False)
    return {name: t.shape for name, t in model.state_dict().items()}


def config_for(tensors: Mapping[str, torch.Tensor], cfg: ModelConfig | None, source: str) -> ModelConfig:
    """`cfg` if given (after checking the file is of its version), else the config the tensors imply."""
    if cfg is None:
        return infer_config(tensors, source)
    found = detect_version(tensors, source)
    if found != cfg.version:
        raise CheckpointError(f"{source}: this is an RWKV-{found} checkpoint but the model config says version "
                              f"{cfg.version}; set version {found} or pick an RWKV-{cfg.version} file")
    return cfg


def load_pth(path: str | os.PathLike, cfg: ModelConfig | None = None) -> dict[str, torch.Tensor]:
    """The weights of an RWKV-LM .pth, memory-mapped and checked: without `cfg` the config comes from the tensors;
    with one (a recipe), every tensor must match it. `blocks.N.att.time_state` tensors are left out (see
    `load_state_file`). The dict loads into RWKV(cfg) with `load_state_dict(strict=True)`.
    """
    weights, _ = split_time_state(read_tensors(path))
    cfg = config_for(weights, cfg, str(path))
    expected = expected_shapes(cfg)
    check_shapes(expected, fill_unused_value_residual(weights, expected), str(path))
    return weights


def fill_unused_value_residual(weights: dict[str, torch.Tensor], expected: Mapping[str, torch.Size]) -> dict:
    """RWKV-7 layer 0 owns v0/v1/v2 but never reads them (it defines v_first); converters that strip them leave a
    file RWKV-LM itself still loads, so add zeros in place of the missing ones (in `weights`, which is returned)."""
    for name in ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"):
        if name in expected and name not in weights and "blocks.0.att.r_k" in weights:
            weights[name] = torch.zeros(expected[name], dtype=weights["blocks.0.att.r_k"].dtype)
    return weights


def load_model(path: str | os.PathLike, cfg: ModelConfig | None = None, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", wkv_backend: str = "auto") -> RWKV:
    """An RWKV model with the weights of an RWKV-LM .pth; the config is read from the tensors (with `wkv_backend`)
    unless `cfg` is given.

    Built on the meta device and filled by assignment, so the only copy made is the cast to `dtype` / `device`
    (none at all for fp32 weights on CPU from an fp32 file: the parameters then are the copy-on-write mapped file).
    """
    weights = load_pth(path, cfg)
    with torch.device("meta"):
        model = RWKV(cfg if cfg is not None else infer_config(weights, str(path), wkv_backend=wkv_backend),
                     init_weights=False)
    model.load_state_dict({k: t.to(device=device, dtype=dtype) for k, t in weights.items()}, assign=True)
    return model


# ------------------------------------------------------------------------------------------------------------ states


def state_to_time_state(state: State, row: int = 0) -> dict[str, torch.Tensor]:
    """One batch row of a State as RWKV-LM state-tuning tensors `blocks.{i}.att.time_state` [H, value, key].

    Same layout as ours, so no transpose; the token-shift vectors are dropped because RWKV-LM does not tune them.
    """
    return {f"blocks.{i}.att.time_state": state.wkv[i, row].detach().float().cpu().clone()
            for i in range(state.wkv.shape[0])}


def state_from_time_state(time_state: Mapping[int, torch.Tensor], cfg: ModelConfig, source: str = "state") -> State:
    """A batch-1 State from RWKV-LM `time_state` tensors (layer -> [H, value, key]); token shifts start at zero."""
    state = State.zeros(cfg, 1, torch.device("cpu"), torch.float32)
    expected = tuple(state.wkv.shape[2:])
    if sorted(time_state) != list(range(cfg.n_layer)):
        raise CheckpointError(f"{source}: time_state for layers {sorted(time_state)} but the model has layers "
                              f"0..{cfg.n_layer - 1}")
    for i, t in time_state.items():
        if tuple(t.shape) != expected:
            raise CheckpointError(f"{source}: tensor 'blocks.{i}.att.time_state' has shape {tuple(t.shape)} but the "
                                  f"model expects {expected}")
        state.wkv[i, 0] = t.float()
    return state


def state_to_rwkv_pip(state: State, version: int, row: int = 0) -> list[torch.Tensor]:
    """One batch row of a State in the `rwkv` pip package's layout: per layer [att_x_prev, wkv, ffn_x_prev].

    Its wkv is [H, key, value] for v5/v6 (transposed from ours) and [H, value, key] for v7 (as ours).
    """
    out = []
    for i in range(state.wkv.shape[0]):
        wkv = state.wkv[i, row]
        out += [state.att_shift[i, row], wkv.transpose(-1, -2) if version in (5, 6) else wkv, state.ffn_shift[i, row]]
    return [t.detach().float().contiguous().clone() for t in out]


def state_from_rwkv_pip(tensors: list[torch.Tensor], cfg: ModelConfig) -> State:
    """The inverse of `state_to_rwkv_pip`: a batch-1 State from the `rwkv` package's per-layer state list."""
    state = State.zeros(cfg, 1, torch.device("cpu"), torch.float32)
    for i in range(cfg.n_layer):
        att, wkv, ffn = tensors[3 * i: 3 * i + 3]
        state.att_shift[i, 0] = att.float()
        state.wkv[i, 0] = (wkv.transpose(-1, -2) if cfg.version in (5, 6) else wkv).float()
        state.ffn_shift[i, 0] = ffn.float()
    return state


def load_state_file(path: str | os.PathLike, cfg: ModelConfig) -> State:
    """A State to seed generation or training: an infctx State file, or any .pth holding RWKV-LM
    `blocks.N.att.time_state` tensors (a state-tuning output, or a model with its tuned state merged in)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such state file")
    obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    if isinstance(obj, dict) and any(isinstance(k, str) and _TIME_STATE_KEY.match(k) for k in obj):
        return state_from_time_state(split_time_state(obj)[1], cfg, str(path))
    state = State.load(path)
    expected = State.zeros(cfg, 1, torch.device("meta"), torch.float32)
    for name in ("att_shift", "wkv", "ffn_shift"):
        got, want = getattr(state, name).shape, getattr(expected, name).shape
        if got[0] != want[0] or got[2:] != want[2:]:
            raise CheckpointError(f"{path}: state '{name}' has shape {tuple(got)} but the model needs "
                                  f"{(want[0], 'batch', *want[2:])}")
    return state


def embedded_state(path: str | os.PathLike, cfg: ModelConfig) -> State | None:
    """The tuned state merged into a model .pth as `blocks.N.att.time_state` (as the rwkv package reads it), or
    None."""
    time_state = split_time_state(read_tensors(path))[1]
    return state_from_time_state(time_state, cfg, str(path)) if time_state else None


# ------------------------------------------------------------------------------------------- training checkpoints


def model_weights(tensors: Mapping[str, object], source: str) -> dict[str, torch.Tensor]:
    """The RWKV weights inside a training state dict, whatever attribute path wraps them: Lightning prefixes keys
    with the LightningModule attribute ('model.'), DeepSpeed under Lightning adds '_forward_module.'. The prefix is
    the one in front of both 'emb.weight' and 'head.weight'; keys outside it (optimiser extras) are dropped."""
    prefixes = [k[: -len("emb.weight")] for k in tensors
                if k.endswith("emb.weight") and (k == "emb.weight" or k.endswith(".emb.weight"))]
    prefixes = sorted((p for p in prefixes if p + "head.weight" in tensors), key=len)
    if not prefixes:
        raise CheckpointError(f"{source}: no 'emb.weight' + 'head.weight' pair in the checkpoint's state dict, so it "
                              "holds no RWKV model")
    prefix = prefixes[0]
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix) and isinstance(v, torch.Tensor)}


def _is_deepspeed_dir(path: Path) -> bool:
    return path.is_dir() and (path / "latest").is_file()


def find_checkpoint(run: Path) -> Path:
    """The checkpoint to export from a run directory: the one a `last` pointer file names (infctx fit writes
    checkpoints/last), else a 'last*' checkpoint, else the most recently written one."""
    pointers = sorted((p for p in run.rglob("last") if p.is_file() and p.stat().st_size < 4096),
                      key=lambda p: p.stat().st_mtime, reverse=True)
    for pointer in pointers:
        target = pointer.parent / pointer.read_text().strip()
        if pointer.read_text().strip() and target.exists():
            return target
    found = [p for p in run.rglob("*") if (p.is_file() and p.suffix in (".ckpt", ".pth")) or _is_deepspeed_dir(p)]
    found = [p for p in found if not any(_is_deepspeed_dir(q) for q in p.parents)]  # not the shards inside one
    if not found:
        raise CheckpointError(f"{run}: no checkpoint (*.ckpt file, *.pth, or DeepSpeed folder with a 'latest' file) "
                              "in this directory")
    last = [p for p in found if p.name.startswith("last")]
    return max(last or found, key=lambda p: p.stat().st_mtime)


def read_training_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The RWKV weights (fp32 where training kept fp32 masters) from a Lightning .ckpt, a DeepSpeed ZeRO-2/3 sharded
    checkpoint folder, a run directory holding either, or an RWKV-LM .pth. Runs on CPU, needs no GPU."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint file or directory")
    if path.is_dir() and not _is_deepspeed_dir(path):
        path = find_checkpoint(path)
    if _is_deepspeed_dir(path):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        tensors = get_fp32_state_dict_from_zero_checkpoint(str(path))
    else:
        try:
            obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except Exception:  # Lightning .ckpt files may pickle hyper-parameters; this is the user's own checkpoint
            obj = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
        if not isinstance(obj, dict):
            raise CheckpointError(f"{path}: not a checkpoint dict (got {type(obj).__name__})")
        tensors = obj.get("state_dict", obj.get("module", obj))  # Lightning / DeepSpeed model-states file / plain
    return model_weights(tensors, str(path))


# --------------------------------------------------------------------------------------------------------------- CLI


def _init_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="infctx init", description="Write a freshly initialised model as an RWKV-LM .pth.")
    p.add_argument("--version", type=int, choices=[5, 6, 7], default=7)
    p.add_argument("--n_layer", type=int, required=True)
    p.add_argument("--n_embd", type=int, required=True)
    p.add_argument("--vocab", type=int, default=65536, help="vocabulary size (65536 = RWKV World)")
    p.add_argument("--head_size", type=int, default=64)
    p.add_argument("--dim_ffn", type=int, default=None, help="default: RWKV-LM's per-version choice")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", required=True)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                   help="fp32 (default: a training start point, kept exact) or bf16")
    return p


def main_init(argv: list[str]) -> int:
    args = _init_parser().parse_args(argv)
    try:
        cfg = ModelConfig(version=args.version, n_layer=args.n_layer, n_embd=args.n_embd, vocab_size=args.vocab,
                          head_size=args.head_size, dim_ffn=args.dim_ffn)
        torch.manual_seed(args.seed)
        model = RWKV(cfg)  # RWKV-LM's initialisation (RWKV.init_weights) runs in the constructor
    except ValueError as err:
        print(f"infctx init: {err}", file=sys.stderr)
        return 2
    save_pth(model, args.output, DTYPES[args.dtype])
    n_params = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.output}: RWKV-{cfg.version} L{cfg.n_layer} D{cfg.n_embd} head {cfg.head_size} "
          f"vocab {cfg.vocab_size}, {n_params / 1e6:.2f}M parameters, {args.dtype}")
    return 0


def _export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="infctx export",
                                description="Turn a training checkpoint into a single RWKV-LM .pth (CPU only).")
    p.add_argument("source", metavar="RUN_OR_CKPT",
                   help="Lightning .ckpt, DeepSpeed ZeRO checkpoint folder, run directory, or .pth")
    p.add_argument("--output", required=True)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="bf16 (default, as RWKV-LM ships) or fp32")
    p.add_argument("--state-output", "--state_output", dest="state_output", default=None,
                   help="also write the tuned state (blocks.N.att.time_state in the checkpoint) to this file")
    p.add_argument("--state-format", choices=["infctx", "rwkv"], default="infctx",
                   help="infctx: State.save file (--init_state); rwkv: RWKV-LM time_state .pth (RWKV-Runner, rwkv pip)")
    return p


def main_export(argv: list[str]) -> int:
    args = _export_parser().parse_args(argv)
    try:
        weights, time_state = split_time_state(read_training_checkpoint(args.source))
        cfg = infer_config(weights, args.source)
        check_shapes(expected_shapes(cfg), weights, args.source)
        if args.state_output and not time_state:
            raise CheckpointError(f"{args.source}: --state-output asked for, but the checkpoint holds no tuned state "
                                  "(no blocks.N.att.time_state tensors)")
    except (CheckpointError, FileNotFoundError) as err:
        print(f"infctx export: {err}", file=sys.stderr)
        return 2
    save_pth(weights, args.output, DTYPES[args.dtype])
    print(f"wrote {args.output}: RWKV-{cfg.version} L{cfg.n_layer} D{cfg.n_embd} vocab {cfg.vocab_size}, {args.dtype}")
    if args.state_output:
        state = state_from_time_state(time_state, cfg, args.source)
        if args.state_format == "rwkv":
            atomic_save(state_to_time_state(state), args.state_output)
        else:
            state.save(args.state_output)
        print(f"wrote {args.state_output}: tuned state ({args.state_format} format)")
    return 0
