"""The hand-written backward of RWKV-7's chunked form (infctx.ops.wkv7_chunk_grad, the algorithm a tensor-core
wkv7 kernel implements) in float64 against autograd of the per-token oracle `wkv7_naive`.
"""

from __future__ import annotations

import pytest
import torch

from infctx import ops
from infctx.ops.wkv7_chunk_grad import chunked_backward, chunked_forward
from test_wkv7_span_math import inputs  # the same float64 model-range inputs (a = -kappa, b = kappa * alpha)


def upstream(B, T, H, N, seed):
    """Random incoming gradients of y and of the final state."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, T, H, N, generator=g, dtype=torch.float64),
            torch.randn(B, H, N, N, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("T,L", [(37, 8), (32, 16), (5, 16)], ids=["padded", "two-chunks", "one-short-chunk"])
def test_hand_backward_matches_autograd_of_the_oracle(T, L):
    """Forward (y, sT) and every gradient, ds0 included with a random dsT, within 1e-10 of float64 autograd through
    the per-token recurrence."""
    x = inputs(2, T, 3, 8, seed=T)
    dy, dsT = upstream(2, T, 3, 8, seed=100 + T)
    leaves = {n: t.clone().requires_grad_() for n, t in x.items()}
    y_ref, sT_ref = ops.wkv7_naive(*leaves.values())
    torch.autograd.backward([y_ref, sT_ref], [dy, dsT])
    y, sT, _, _ = chunked_forward(*x.values(), L)
    got = chunked_backward(*x.values(), dy, dsT, L)
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    assert rel(y, y_ref) <= 1e-10 and rel(sT, sT_ref) <= 1e-10
    errors = {n: rel(got[n], leaves[n].grad) for n in x}
    assert max(errors.values()) <= 1e-10, errors


def test_a_wrong_term_is_caught():
    """The check has teeth: dropping the state-gradient path through the end factors (b_end dS_end^T in dU) moves
    the gradients far outside the tolerance."""
    x = inputs(1, 24, 2, 8, seed=3)
    dy, dsT = upstream(1, 24, 2, 8, seed=4)
    good = chunked_backward(*x.values(), dy, dsT, 8)
    bad = chunked_backward(*x.values(), dy, torch.zeros_like(dsT), 8)
    leaves = {n: t.clone().requires_grad_() for n, t in x.items()}
    torch.autograd.backward(list(ops.wkv7_naive(*leaves.values())), [dy, dsT])
    assert ((good["a"] - leaves["a"].grad).norm() / leaves["a"].grad.norm()).item() <= 1e-10
    assert ((bad["a"] - leaves["a"].grad).norm() / leaves["a"].grad.norm()).item() > 1e-3
