"""Generation in RNN mode: greedy equals an argmax loop over full-sequence logits, seeded sampling is reproducible and
follows the tempered / top-p distribution, a state (in memory, State file, RWKV-LM time_state) seeds generation, and
the CLI streams what the Python API yields."""

from __future__ import annotations

import pytest
import torch

from infctx.checkpoint import load_state_file, save_pth, state_to_time_state
from infctx.data.tokenizers import get_tokenizer
from infctx.generate import SamplingConfig, generate, generate_ids, main, sample_token, stream_text
from infctx.model import RWKV, ModelConfig, State


def tiny_model(version: int = 7, vocab: int = 256, seed: int = 0, head_size: int = 32) -> RWKV:
    """RWKV-LM init plus noise (the init zeroes output projections, which would make the blocks no-ops)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(version=version, n_layer=2, n_embd=64, vocab_size=vocab, head_size=head_size,
                      wkv_backend="torch")
    model = RWKV(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


def argmax_loop(model: RWKV, prompt: list[int], n: int) -> list[int]:
    """The oracle: rerun the whole sequence in parallel mode for every new token (no state carried)."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0][0, -1].argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("version", [5, 6, 7])
def test_greedy_equals_argmax_over_full_sequence_logits(version):
    model = tiny_model(version)
    prompt = [3, 40, 41, 200, 7, 7, 19]
    got = list(generate_ids(model, prompt, SamplingConfig(max_tokens=16, temperature=0.0)))
    assert got == argmax_loop(model, prompt, 16)
    assert len(set(got)) > 3, "degenerate model: the comparison would prove little"
    assert got == list(generate_ids(model, prompt, SamplingConfig(max_tokens=16, temperature=0.0)))


def test_sampling_is_reproducible_with_a_seed():
    model = tiny_model()
    run = lambda seed, **kw: list(generate_ids(model, [1, 2, 3], SamplingConfig(max_tokens=12, seed=seed, **kw)))  # noqa: E731
    assert run(5) == run(5)
    assert run(5) != run(6)
    assert run(5, temperature=0.7, top_p=0.5) == run(5, temperature=0.7, top_p=0.5)
    assert run(9, top_p=1e-9) == argmax_loop(model, [1, 2, 3], 12)  # a nucleus of one token is greedy


def test_sample_token_follows_temperature_and_top_p():
    """Frequencies over many draws against hand-computed probabilities."""
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    g = torch.Generator().manual_seed(0)
    n = 10000

    def freq(temperature, top_p):
        counts = torch.bincount(torch.tensor([sample_token(logits, temperature, top_p, g) for _ in range(n)]),
                                minlength=4)
        return counts.double() / n

    # top_p 0.6: token 1 is kept (mass before it 0.5 < 0.6), token 2 is not (0.8): renormalised 0.5/0.8, 0.3/0.8
    torch.testing.assert_close(freq(1.0, 0.6), torch.tensor([0.625, 0.375, 0.0, 0.0], dtype=torch.float64),
                               atol=0.02, rtol=0)
    # temperature 0.5 squares the probabilities: 0.25, 0.09, 0.0225, 0.0025 over 0.365
    p = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64) ** 2
    torch.testing.assert_close(freq(0.5, 1.0), p / p.sum(), atol=0.02, rtol=0)
    assert sample_token(logits, 0.0, 0.9, g) == 0
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0.0)


def test_state_seeds_generation(tmp_path):
    """Generating from the state after prompt A with prompt B equals generating with prompt A+B; the state also
    survives a State file and an RWKV-LM time_state .pth (whose shift vectors are zero, so compare with that)."""
    model = tiny_model(7)
    a, b = [5, 6, 7, 8, 9], [10, 11]
    greedy = SamplingConfig(max_tokens=8, temperature=0.0)
    with torch.no_grad():
        _, state = model(torch.tensor([a]))
    expected = list(generate_ids(model, a + b, greedy))
    assert list(generate_ids(model, b, greedy, state)) == expected
    assert list(generate_ids(model, b, greedy)) != expected

    state.save(tmp_path / "state.pt")
    loaded = load_state_file(tmp_path / "state.pt", model.cfg)
    assert list(generate_ids(model, b, greedy, loaded)) == expected

    wkv_only = State(torch.zeros_like(state.att_shift), state.wkv, torch.zeros_like(state.ffn_shift))
    save_pth(state_to_time_state(state), tmp_path / "tuned_state.pth", torch.float32)
    from_time_state = load_state_file(tmp_path / "tuned_state.pth", model.cfg)
    assert list(generate_ids(model, b, greedy, from_time_state)) == list(generate_ids(model, b, greedy, wkv_only))


def test_stream_text_waits_for_complete_utf8_characters():
    tok = get_tokenizer("bytes")
    ids = list("héllo 世界".encode())
    pieces = list(stream_text(ids, tok))
    assert "".join(pieces) == "héllo 世界"
    assert all("\ufffd" not in p for p in pieces)
    assert "世" in pieces and "界" in pieces  # each 3-byte character came out whole, once complete
    assert list(stream_text([0xE4, 0xB8], tok)) == ["\ufffd"]  # a truncated character is still flushed at the end

    class Metaspace:  # SentencePiece-style: each word token carries its leading space, stripped at the text start
        words = ["\u2581Hello", "\u2581big", "\u2581world"]

        def decode(self, ids):
            return "".join(self.words[i] for i in ids).replace("\u2581", " ").lstrip(" ")

    pieces = list(stream_text([0, 1, 2], Metaspace()))
    assert pieces == ["Hello", " big", " world"]  # token-by-token decoding would give "Hellobigworld"


def test_cli_streams_what_the_api_yields(tmp_path, capsys):
    model = tiny_model(7)
    path = tmp_path / "m.pth"
    save_pth(model, path, torch.float32)
    state = State.zeros(model.cfg, 1)
    state.wkv.normal_(generator=torch.Generator().manual_seed(3))
    state.save(tmp_path / "s.pt")
    tok = get_tokenizer("bytes")
    for extra, seeded in (([], None), (["--init_state", str(tmp_path / "s.pt")], state)):
        args = ["--model", str(path), "--prompt", "Hi there", "--tokenizer", "bytes", "--max-tokens", "12",
                "--temperature", "0.9", "--top-p", "0.8", "--seed", "11", "--device", "cpu", *extra]
        assert main(args) == 0
        out = capsys.readouterr().out
        api = "".join(generate(model, tok, "Hi there", 12, 0.9, 0.8, 11, seeded))
        assert out == "Hi there" + api + "\n"
    assert main(["--model", str(tmp_path / "nope.pth"), "--tokenizer", "bytes"]) == 2
    assert "no such file" in capsys.readouterr().err


@pytest.mark.gpu
def test_gpu_generation_matches_cpu(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    model = tiny_model(7, head_size=64)  # a head size the CUDA kernel has, for the CLI's 'auto' backend below
    prompt = [3, 40, 41, 200, 7]
    greedy = SamplingConfig(max_tokens=16, temperature=0.0)
    cpu = list(generate_ids(model, prompt, greedy))
    gpu_model = tiny_model(7, head_size=64).cuda()
    assert list(generate_ids(gpu_model, prompt, greedy)) == cpu
    assert list(generate_ids(gpu_model, prompt, greedy, cuda_graph=True)) == cpu
    seeded = SamplingConfig(max_tokens=16, temperature=1.0, top_p=0.9, seed=4)
    assert list(generate_ids(gpu_model, prompt, seeded, cuda_graph=True)) == list(generate_ids(gpu_model, prompt, seeded))
    # bf16 on the GPU with an fp32 state from a file (the CLI's default on GPU): runs and is reproducible.
    state = State.zeros(model.cfg, 1)
    state.wkv.normal_(generator=torch.Generator().manual_seed(3))
    sampled = SamplingConfig(max_tokens=16, temperature=0.8, seed=1)
    bf16 = gpu_model.bfloat16()
    first = list(generate_ids(bf16, prompt, sampled, state))
    assert len(first) == 16 and first == list(generate_ids(bf16, prompt, sampled, state))
    save_pth(model, tmp_path / "m.pth", torch.bfloat16)
    state.save(tmp_path / "s.pt")
    assert main(["--model", str(tmp_path / "m.pth"), "--tokenizer", "bytes", "--prompt", "GPU", "--max-tokens", "8",
                 "--init_state", str(tmp_path / "s.pt"), "--device", "cuda"]) == 0
