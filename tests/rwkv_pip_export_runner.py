"""Oracle for tests/test_checkpoint.py: run BlinkDL's `rwkv` pip package (ChatRWKV's inference runtime) on .pth files
that infctx exported, and write back what it computed.

Usage: python rwkv_pip_export_runner.py REQUEST.pt RESULT.pt   (env RWKV_V7_ON=1 for RWKV-7 files)
REQUEST: dict(model=path.pth, tokens=[...], more=[...], state=[per-layer tensors in the package's layout],
              time_state_model=path.pth or None)
RESULT:  seq_logits [T,V] (prompt from a zero state, parallel), state (package state after the prompt),
         one_logits [K,V] (then `more` one token at a time), from_state_logits [T,V] (prompt from REQUEST.state),
         time_state_logits [T,V] (prompt from the time_state merged into time_state_model; v5/v6 only).
Its own process, because the package reads its switches from the environment at import time.
"""

import sys

import torch


def main() -> None:
    request = torch.load(sys.argv[1])
    from rwkv.model import RWKV

    def load(path: str):
        # The RWKV-7 loader appends '.pth' itself; the v5/v6 loader accepts either form.
        return RWKV(path[: -len(".pth")], "cpu fp32", **({} if request["version"] == 7 else {"verbose": False}))

    model = load(request["model"])
    tokens = request["tokens"]
    result = {}
    logits, state = model.forward(list(tokens), None, full_output=True)
    result["seq_logits"] = logits.double()
    result["state"] = [t.clone() for t in state]
    one = []
    for token in request["more"]:
        out, state = model.forward([token], state)
        one.append(out.double())
    result["one_logits"] = torch.stack(one)
    given = [t.clone() for t in request["state"]]
    result["from_state_logits"] = model.forward(list(tokens), given, full_output=True)[0].double()
    if request.get("time_state_model"):
        tuned = load(request["time_state_model"])
        result["time_state_logits"] = tuned.forward(list(tokens), None, full_output=True)[0].double()
    torch.save(result, sys.argv[2])


if __name__ == "__main__":
    main()
