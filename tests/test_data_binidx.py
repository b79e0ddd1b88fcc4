"""binidx against byte fixtures laid out by hand from the MMIDIDX spec, in both directions."""

import struct

import numpy as np
import pytest

from infctx.data.binidx import IndexedDatasetWriter, MMapIndexedDataset, token_dtype


def write_fixture(prefix, docs_items, code, np_dtype):
    """The original indexed_dataset writer's layout: items appended to .bin, doc_idx starting at 0 and growing by
    the number of items after each end_document; header magic, <Q version, <B code, <Q len, <Q len(doc_idx)."""
    sizes, doc_idx, data = [], [0], b""
    for doc in docs_items:
        for item in doc:
            data += np.asarray(item, dtype=np_dtype).tobytes()
            sizes.append(len(item))
        doc_idx.append(len(sizes))
    pointers, p = [], 0
    for s in sizes:
        pointers.append(p)
        p += s * np.dtype(np_dtype).itemsize
    idx = b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", code)
    idx += struct.pack("<Q", len(sizes)) + struct.pack("<Q", len(doc_idx))
    idx += b"".join(struct.pack("<i", s) for s in sizes)
    idx += b"".join(struct.pack("<q", q) for q in pointers)
    idx += b"".join(struct.pack("<q", d) for d in doc_idx)
    (prefix.parent / (prefix.name + ".idx")).write_bytes(idx)
    (prefix.parent / (prefix.name + ".bin")).write_bytes(data)
    return sizes, pointers, doc_idx


def oracle_read(prefix):
    """An independent reader of the spec with struct only."""
    idx = (prefix.parent / (prefix.name + ".idx")).read_bytes()
    assert idx[:9] == b"MMIDIDX\x00\x00"
    version, code, n, d = struct.unpack_from("<QBQQ", idx, 9)
    off = 34
    sizes = list(struct.unpack_from(f"<{n}i", idx, off))
    pointers = list(struct.unpack_from(f"<{n}q", idx, off + 4 * n))
    doc_idx = list(struct.unpack_from(f"<{d}q", idx, off + 12 * n))
    assert len(idx) == off + 12 * n + 8 * d
    fmt = {8: "H", 4: "i", 1: "B"}[code]
    width = struct.calcsize(fmt)
    data = (prefix.parent / (prefix.name + ".bin")).read_bytes()
    items = [list(struct.unpack_from(f"<{s}{fmt}", data, p)) for s, p in zip(sizes, pointers)]
    return version, code, items, doc_idx, len(data) // width


def test_reads_hand_built_uint16_fixture(tmp_path):
    docs = [[[5, 6, 7, 0]], [[65535, 1, 0]], [[42, 0]]]
    sizes, pointers, doc_idx = write_fixture(tmp_path / "fx", docs, 8, np.uint16)
    ds = MMapIndexedDataset(tmp_path / "fx")
    assert ds.dtype == np.uint16 and len(ds) == 3 and ds.num_docs == 3 and ds.num_tokens == 9
    assert ds.sizes.tolist() == [4, 3, 2] and ds.pointers.tolist() == [0, 8, 14] and ds.doc_idx.tolist() == [0, 1, 2, 3]
    assert ds[1].tolist() == [65535, 1, 0] and ds[-1].tolist() == [42, 0]
    assert ds.get(0, offset=3, length=4).tolist() == [0, 65535, 1, 0]  # RWKV-LM reads across items like this


def test_reads_megatron_multi_item_documents_int32(tmp_path):
    # Megatron's sentence-split layout: several items per document, large ids need int32 (code 4).
    docs = [[[1, 2], [3, 4, 5]], [[100000, 7]], [[8], [9], [10, 0]]]
    write_fixture(tmp_path / "mg", docs, 4, np.int32)
    ds = MMapIndexedDataset(tmp_path / "mg")
    assert ds.dtype == np.int32 and len(ds) == 6 and ds.num_docs == 3
    assert ds.doc_idx.tolist() == [0, 2, 3, 6]
    assert ds.document(0).tolist() == [1, 2, 3, 4, 5]
    assert ds.document(1).tolist() == [100000, 7]
    assert ds.document(2).tolist() == [8, 9, 10, 0]


@pytest.mark.parametrize("vocab,code", [(65536, 8), (65537, 4), (256, 8)])
def test_writer_output_reads_in_the_oracle(tmp_path, vocab, code):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, vocab, size=n) for n in (5, 1, 17, 3)]
    w = IndexedDatasetWriter(tmp_path / "w", token_dtype(vocab))
    w.add(np.concatenate(docs[:2]), np.array([5, 1]))
    for d in docs[2:]:
        w.add_document(d)
    assert (tmp_path / "w.bin.tmp").exists() and not (tmp_path / "w.bin").exists()
    w.finalize()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.bin", "w.idx"]
    version, got_code, items, doc_idx, n_tokens = oracle_read(tmp_path / "w")
    assert (version, got_code) == (1, code)
    assert items == [d.tolist() for d in docs] and doc_idx == [0, 1, 2, 3, 4] and n_tokens == 26
    ds = MMapIndexedDataset(tmp_path / "w")
    assert [ds[i].tolist() for i in range(4)] == [d.tolist() for d in docs]


def test_bad_files_give_one_clear_error(tmp_path):
    (tmp_path / "x.idx").write_bytes(b"NOTANIDX" + bytes(40))
    (tmp_path / "x.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="bad magic"):
        MMapIndexedDataset(tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="infctx data build"):
        MMapIndexedDataset(tmp_path / "missing")
    write_fixture(tmp_path / "t", [[[1, 2, 3]]], 8, np.uint16)
    (tmp_path / "t.bin").write_bytes(b"\x01\x00")
    with pytest.raises(ValueError, match="shorter than its index"):
        MMapIndexedDataset(tmp_path / "t")


def test_abort_leaves_no_files(tmp_path):
    w = IndexedDatasetWriter(tmp_path / "a", np.uint16)
    w.add_document([1, 2, 3])
    w.abort()
    assert list(tmp_path.iterdir()) == []
