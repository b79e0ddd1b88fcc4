"""Independent oracle: run BlinkDL's `rwkv` pip package (the ChatRWKV inference runtime) on an RWKV-LM .pth.

Usage: python rwkv_pip_oracle.py MODEL.pth TOKENS.pt OUT.pt   (env RWKV_V7_ON=1 for RWKV-7 files)
Writes the per-token logits [T, V] (float64) for the token list, computed by that package from a zero state.
Runs in its own process because the package reads its switches from the environment at import time.
"""

import sys

import torch


def main() -> None:
    model_path, tokens_path, out_path = sys.argv[1:4]
    from rwkv.model import RWKV

    strategy = "cpu fp32"
    name = model_path[: -len(".pth")]
    model = RWKV(name, strategy) if "V7" in sys.argv[4:] else RWKV(name, strategy, verbose=False)
    tokens = torch.load(tokens_path).tolist()
    logits, _ = model.forward(tokens, None, full_output=True)
    torch.save(logits.double(), out_path)


if __name__ == "__main__":
    main()
