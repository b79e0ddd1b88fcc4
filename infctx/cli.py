"""`infctx` command line: one entry point that hands each subcommand to the module that owns it.

Subcommand modules are imported lazily so `infctx data ...` never pays for Lightning or DeepSpeed imports.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str, str]] = {
    "fit": ("infctx.train.cli", "main", "train a model from a LightningCLI recipe (--config recipes/x.yaml)"),
    "validate": ("infctx.train.cli", "main", "evaluate a checkpoint on the validation data of a recipe"),
    "data": ("infctx.data.cli", "main", "build / inspect binidx datasets"),
    "init": ("infctx.checkpoint", "main_init", "write a freshly initialised model as an RWKV-LM .pth"),
    "export": ("infctx.checkpoint", "main_export", "turn a training checkpoint into an RWKV-LM .pth"),
    "generate": ("infctx.generate", "main", "generate text with a .pth model in RNN mode"),
    "doctor": ("infctx.ops.doctor", "main", "check the CUDA toolchain, build and test the kernels"),
    "demo": ("infctx.demo", "main", "long-range recall demo: full vs truncated BPTT on CPU"),
    "plot": ("infctx.train.plot", "main", "plot loss and tokens/s of a training run"),
}


def usage() -> str:
    lines = ["usage: infctx <command> [args]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"infctx: unknown command '{name}'. Run `infctx --help` for the list.", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    if name in ("fit", "validate"):
        rest = [name, *rest]
    result = getattr(importlib.import_module(module), func)(rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
