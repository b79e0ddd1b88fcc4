"""Text generation in RNN mode: the prompt in parallel mode, then one token at a time with the State carried.

The prompt costs one parallel `forward` (fast, like training); every new token costs one `forward_one`, whose cost
does not grow with the length of the text so far. Sampling draws from a seeded CPU generator, so a seed gives the same
text whatever device the model runs on (up to the model's own numerics).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from infctx.model import RWKV, State


@dataclass
class SamplingConfig:
    """How the next token is picked. temperature 0 = greedy (argmax); top_p 1.0 = no nucleus cut."""

    max_tokens: int = 200
    temperature: float = 1.0
    top_p: float = 0.85
    seed: int | None = None
    stop_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def sample_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """One token id from 1-D logits: greedy at temperature 0, else softmax(logits / T) cut to the top-p nucleus.

    The nucleus keeps the most probable tokens whose cumulative probability before them is below top_p (so the most
    probable token is always kept). The draw inverts the cumulative distribution at one uniform number from the
    (CPU) generator, computed in float64 on the logits' device: no host copy of the logits, and the same seed picks
    the same token on CPU and GPU up to rounding.
    """
    if temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.detach().double() / temperature, dim=-1)
    sorted_probs, order = torch.sort(probs, descending=True)
    if top_p < 1.0:
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        sorted_probs = sorted_probs * (mass_before < top_p)
    cdf = torch.cumsum(sorted_probs, dim=-1)
    u = torch.rand((), generator=generator, dtype=torch.float64).to(cdf.device) * cdf[-1]
    pick = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.numel() - 1)
    return int(order[pick])


class EagerStep:
    """One recurrent step: `forward_one` on the carried State."""

    def __init__(self, model: RWKV, state: State):
        self.model, self.state = model, state

    def __call__(self, token: int) -> torch.Tensor:
        idx = torch.tensor([token], dtype=torch.long, device=self.state.wkv.device)
        logits, self.state = self.model.forward_one(idx, self.state)
        return logits[0]


class CudaGraphStep:
    """The same step replayed from a captured CUDA graph: for a small model each token is hundreds of tiny kernels
    whose launch overhead, not their math, sets the speed; a replay launches them all at once.

    Inputs and outputs live in fixed buffers: the token and the State are copied in, the graph is replayed, the new
    State is copied back into the input buffers. The returned logits are overwritten by the next call.
    """

    def __init__(self, model: RWKV, state: State):
        self.token = torch.zeros(1, dtype=torch.long, device=state.wkv.device)
        self.state = state.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the capture (lazy init, backend resolution, allocator)
            for _ in range(2):
                model.forward_one(self.token, self.state)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits, self.next_state = model.forward_one(self.token, self.state)

    def __call__(self, token: int) -> torch.Tensor:
        self.token.fill_(token)
        self.graph.replay()
        for buffer, new in zip(self.state.tensors(), self.next_state.tensors()):
            buffer.copy_(new)
        return self.logits[0]


@torch.no_grad()
def generate_ids(
    model: RWKV, prompt_ids: list[int], sampling: SamplingConfig, state: State | None = None, cuda_graph: bool = False
) -> Iterator[int]:
    """Yield new token ids. The prompt goes through `forward` (parallel), then each token through `forward_one`
    (replayed from a CUDA graph when `cuda_graph` and the model is on a GPU).

    `state` (batch 1) seeds the recurrence, e.g. a state-tuned initial state; it is not modified.
    """
    if not prompt_ids:
        raise ValueError("the prompt is empty: give at least one token (e.g. the tokenizer's end-of-document id)")
    weight = model.emb.weight
    generator = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
    if state is not None:
        state = state.to(weight.device, weight.dtype)  # shift vectors in the model's dtype, wkv stays fp32
    logits, state = model.forward(torch.tensor([prompt_ids], dtype=torch.long, device=weight.device), state)
    last = logits[0, -1]
    step = None
    for i in range(sampling.max_tokens):
        token = sample_token(last, sampling.temperature, sampling.top_p, generator)
        yield token
        if token in sampling.stop_ids or i == sampling.max_tokens - 1:
            return
        if step is None:
            use_graph = cuda_graph and weight.device.type == "cuda"
            step = CudaGraphStep(model, state) if use_graph else EagerStep(model, state)
        last = step(token)


def stream_text(ids: Iterable[int], tokenizer) -> Iterator[str]:
    """Decode token ids into text pieces as they arrive.

    The whole output so far is decoded each time and only its new tail is yielded: decoding tokens one by one would
    break characters split across tokens (multi-byte UTF-8, which decodes to U+FFFD until complete) and lose the
    word-joining spaces of SentencePiece-style decoders.
    """
    ids_so_far: list[int] = []
    shown = ""
    for token in ids:
        ids_so_far.append(token)
        text = tokenizer.decode(ids_so_far)
        if not text.endswith("\ufffd") and text.startswith(shown) and len(text) > len(shown):
            yield text[len(shown):]
            shown = text
    text = tokenizer.decode(ids_so_far)
    if text.startswith(shown) and text != shown:  # e.g. an incomplete character at the very end
        yield text[len(shown):]


def generate(
    model: RWKV,
    tokenizer,
    prompt: str,
    max_tokens: int = 200,
    temperature: float = 1.0,
    top_p: float = 0.85,
    seed: int | None = None,
    state: State | None = None,
    stop_ids: tuple[int, ...] = (),
    cuda_graph: bool = False,
) -> Iterator[str]:
    """Python API: yield the generated text piece by piece (streaming). An empty prompt starts from the
    end-of-document token."""
    sampling = SamplingConfig(max_tokens, temperature, top_p, seed, tuple(stop_ids))
    prompt_ids = tokenizer.encode(prompt) if prompt else [tokenizer.eod_id]
    return stream_text(generate_ids(model, prompt_ids, sampling, state, cuda_graph), tokenizer)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="infctx generate", description="Generate text with an RWKV-LM .pth in RNN mode.")
    p.add_argument("--model", required=True, help="RWKV-LM .pth (v5, v6 or v7; the version is read from the tensors)")
    p.add_argument("--prompt", default="", help="prompt text (empty: start from the end-of-document token)")
    p.add_argument("--max-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.85)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--tokenizer", default="world", help="'world' or a path to a Hugging Face tokenizer.json")
    p.add_argument("--init_state", "--init-state", dest="init_state", default=None,
                   help="state file (infctx State, or an RWKV-LM state-tuning .pth with blocks.N.att.time_state); "
                        "default: the time_state merged into --model, if any")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"], help="auto: bf16 on GPU, fp32 on CPU")
    p.add_argument("--wkv-backend", default="auto", help="WKV op: auto (CUDA kernel on GPU if it builds), torch, cuda")
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=True,
                   help="on a GPU, replay each token's step from a captured CUDA graph (default: on)")
    p.add_argument("--stop-at-eod", action="store_true", help="stop when the end-of-document token is generated")
    return p


def main(argv: list[str]) -> int:
    from infctx.checkpoint import embedded_state, load_model, load_state_file
    from infctx.data.tokenizers import get_tokenizer

    args = _parser().parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    dtype_name = args.dtype if args.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    try:
        model = load_model(args.model, dtype=dtype, device=device, wkv_backend=args.wkv_backend).eval()
        tokenizer = get_tokenizer(args.tokenizer)
        if args.init_state:
            state = load_state_file(args.init_state, model.cfg)
        else:
            state = embedded_state(args.model, model.cfg)
        if tokenizer.vocab_size > model.cfg.vocab_size:
            raise ValueError(f"tokenizer '{tokenizer.name}' has {tokenizer.vocab_size} tokens but {args.model} only "
                             f"{model.cfg.vocab_size}: pass the tokenizer the model was trained with (--tokenizer)")
        stop_ids = (tokenizer.eod_id,) if args.stop_at_eod else ()
        pieces = generate(model, tokenizer, args.prompt, args.max_tokens, args.temperature, args.top_p, args.seed,
                          state, stop_ids, args.cuda_graph)
        sys.stdout.write(args.prompt)
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    except (ValueError, FileNotFoundError) as err:
        print(f"infctx generate: {err}", file=sys.stderr)
        return 2
    return 0
