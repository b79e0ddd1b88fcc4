"""Samplers: RWKV-LM's magic-prime stream order, document packing, SFT masks, blends, resume and rank split."""

import math

import numpy as np
import pytest
import torch

from infctx.data.binidx import IndexedDatasetWriter
from infctx.data.samplers import (BlendDataset, DocumentDataset, RankView, StreamDataset, document_spans,
                                  make_dataset, parse_blend)


def write(prefix, docs, masks=None):
    w = IndexedDatasetWriter(prefix, np.uint16)
    for d in docs:
        w.add_document(np.asarray(d))
    w.finalize()
    if masks is not None:
        m = IndexedDatasetWriter(f"{prefix}.mask", np.uint8)
        for d in masks:
            m.add_document(np.asarray(d))
        m.finalize()
    return str(prefix)


@pytest.fixture
def stream_data(tmp_path):
    tokens = np.arange(1, 4001) % 60000  # token value = position + 1: every read is checkable
    return write(tmp_path / "s", [tokens[:1500], tokens[1500:]]), tokens


def rwkv_lm_offset(g, p, ctx_len):
    """RWKV-LM's dataset with world_size 1, my_random_steps 0: ii = 1 + g, factor = int(p * golden)."""
    factor = int(p * (math.sqrt(5) - 1) / 2)
    ii = 1 + g
    return ((factor * ii * ii * ii) % p) * ctx_len


def test_stream_visits_every_slot_once_in_rwkv_lm_order(stream_data):
    prefix, tokens = stream_data
    ds = StreamDataset(prefix, ctx_len=32)
    assert ds.magic_prime == 113  # 4000 // 32 - 1 = 124 -> 113 is the largest prime = 2 (mod 3)
    assert len(ds) == 113 and sorted(ds.slot(g) for g in range(113)) == list(range(113))
    for g in (0, 1, 57, 112, 113, 500):
        off = rwkv_lm_offset(g, 113, 32)
        s = ds[g]
        assert s["input_ids"].dtype == torch.long and s["input_ids"].shape == (32,)
        assert s["input_ids"].tolist() == tokens[off: off + 32].tolist()
        assert s["targets"].tolist() == tokens[off + 1: off + 33].tolist()
        assert s["mask"].tolist() == [1.0] * 32
    assert [ds.slot(g) for g in range(113, 226)] == [ds.slot(g) for g in range(113)]  # next epoch repeats


def test_rank_split_and_resume(stream_data):
    prefix, _ = stream_data
    ds = StreamDataset(prefix, ctx_len=32)
    full = [ds[g]["input_ids"][0].item() for g in range(112)]
    views = [RankView(ds, rank=r, world_size=4) for r in range(4)]
    assert all(len(v) == 28 for v in views)
    got = {}
    for r, v in enumerate(views):
        for i in range(len(v)):
            got[i * 4 + r] = v[i]["input_ids"][0].item()
    assert [got[g] for g in range(112)] == full  # disjoint, complete, in global order
    v = RankView(ds, rank=1, world_size=4)
    v.set_start(40)
    assert len(v) == (113 - 40) // 4 and v[0]["input_ids"][0].item() == full[41] and v[2]["input_ids"][0].item() == full[49]
    again = StreamDataset(prefix, ctx_len=32)
    assert all(torch.equal(again[g]["input_ids"], ds[g]["input_ids"]) for g in range(0, 113, 7))


def test_stream_too_small_is_a_clear_error(stream_data):
    prefix, _ = stream_data
    with pytest.raises(ValueError, match="too few"):
        StreamDataset(prefix, ctx_len=2000)


def test_document_spans_pack_and_cut():
    # documents (start, end): lengths 3, 4, 10, 2, 2 in one stream; ctx_len 5 -> 6 tokens per sample
    ends = np.cumsum([3, 4, 10, 2, 2])
    starts = ends - np.array([3, 4, 10, 2, 2])
    s, l = document_spans(starts, ends, ctx_len=5)
    # [doc0] (doc1 would overflow); [doc1]; doc2 cut at 7 (+5): [7..13), tail [12..17) packed with doc3 [17..19)
    # and doc4 does not fit -> own sample
    assert list(zip(s.tolist(), l.tolist())) == [(0, 3), (3, 4), (7, 6), (12, 5), (17, 4)]


def test_document_mode_samples_start_at_documents_and_mask_padding(tmp_path):
    docs = [[5, 6, 0], [7, 8, 9, 0], list(range(10, 19)) + [0], [20, 0], [21, 0]]
    prefix = write(tmp_path / "d", docs)
    ds = DocumentDataset(prefix, ctx_len=5, shuffle=False)
    s = ds[0]
    assert s["input_ids"].tolist() == [5, 6, 0, 0, 0] and s["targets"].tolist() == [6, 0, 0, 0, 0]
    assert s["mask"].tolist() == [1, 1, 0, 0, 0]
    s = ds[2]  # first piece of the long document
    assert s["input_ids"].tolist() == [10, 11, 12, 13, 14] and s["targets"].tolist() == [11, 12, 13, 14, 15]
    s = ds[3]  # its tail: the next document (2 tokens) would not fit in 6
    assert s["input_ids"].tolist() == [15, 16, 17, 18, 0] and s["targets"].tolist() == [16, 17, 18, 0, 0]
    assert s["mask"].tolist() == [1, 1, 1, 1, 0]
    s = ds[4]  # two short documents packed, EOD-separated
    assert s["input_ids"].tolist() == [20, 0, 21, 0, 0] and s["targets"].tolist() == [0, 21, 0, 0, 0]
    assert s["mask"].tolist() == [1, 1, 1, 0, 0] and len(ds) == 5
    shuffled = DocumentDataset(prefix, ctx_len=5, seed=3)
    order = [shuffled.span(g) for g in range(len(shuffled))]
    assert sorted(order) == sorted(zip(ds.starts.tolist(), ds.lengths.tolist()))
    assert order == [DocumentDataset(prefix, ctx_len=5, seed=3).span(g) for g in range(len(shuffled))]
    big = DocumentDataset(prefix, ctx_len=1 << 20, shuffle=False)  # ctx 1M over a tiny file: one padded sample
    s = big[0]
    assert s["input_ids"].shape == (1 << 20,) and s["mask"].sum().item() == sum(map(len, docs)) - 1


def test_length_bucketing(tmp_path):
    rng = np.random.default_rng(0)
    docs = [list(rng.integers(1, 100, size=int(n))) + [0] for n in rng.integers(1, 30, size=200)]
    prefix = write(tmp_path / "b", docs)
    ds = DocumentDataset(prefix, ctx_len=40, seed=1, bucket_size=8)
    lengths = [ds.span(g)[1] for g in range(len(ds))]
    for a in range(0, len(ds) - 8, 8):
        assert lengths[a: a + 8] == sorted(lengths[a: a + 8], reverse=True)
    assert sorted(lengths) == sorted(ds.lengths.tolist())


def test_sft_mask_is_aligned_to_targets(tmp_path):
    docs = [[1, 2, 3, 4, 0], [5, 6, 7, 0]]
    masks = [[0, 0, 1, 1, 1], [0, 1, 1, 1]]
    prefix = write(tmp_path / "sft", docs, masks)
    ds = make_dataset(prefix, mode="sft", ctx_len=10, shuffle=False)
    s = ds[0]
    assert s["input_ids"][:8].tolist() == [1, 2, 3, 4, 0, 5, 6, 7]
    # mask[t] is the token mask of targets[t] = token t + 1
    assert s["targets"][:8].tolist() == [2, 3, 4, 0, 5, 6, 7, 0]
    assert s["mask"].tolist() == [0, 1, 1, 1, 0, 1, 1, 1, 0, 0]
    with pytest.raises(FileNotFoundError, match="mask sidecar"):
        make_dataset(write(tmp_path / "plain", docs), mode="sft", ctx_len=10)


def test_blend_weights_and_locations(tmp_path, stream_data):
    prefix, _ = stream_data
    other = write(tmp_path / "o", [np.full(3000, 7)])
    a, b = StreamDataset(prefix, 32), StreamDataset(other, 32)
    blend = BlendDataset([a, b], [0.75, 0.25], period=100)
    where = [blend.locate(g) for g in range(400)]
    assert sum(1 for i, _ in where if i == 0) == 300
    assert [k for i, k in where if i == 0] == list(range(300)) and [k for i, k in where if i == 1] == list(range(100))
    assert max(sum(1 for i, _ in where[s: s + 4] if i == 1) for s in range(0, 400, 4)) == 1  # evenly spread
    assert torch.equal(blend[1]["input_ids"], a[1]["input_ids"]) or torch.equal(blend[1]["input_ids"], b[0]["input_ids"])
    assert parse_blend(f"{prefix}@3,{other}@1") == ([prefix, other], [3.0, 1.0])
    mixed = make_dataset(f"{prefix}@3,{other}@1", mode="stream", ctx_len=32)
    assert isinstance(mixed, BlendDataset) and mixed.counts.tolist() == [7500, 2500]


def test_dataloader_workers_reopen_memmaps(stream_data):
    prefix, _ = stream_data
    ds = StreamDataset(prefix, ctx_len=32)
    ds[0]
    loader = torch.utils.data.DataLoader(RankView(ds), batch_size=4, num_workers=1)
    batch = next(iter(loader))
    assert batch["input_ids"].shape == (4, 32) and torch.equal(batch["input_ids"][1], ds[1]["input_ids"])
