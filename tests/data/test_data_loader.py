"""The shard writer and the resumable loader: every row once per epoch, rank/worker independence, exact resume,
corrupt shards, manifest checks. Rows carry their own id in tokens[0:2] so every check reads the data itself."""

import json

import numpy as np
import pytest
import torch

from atlas_train.data import DataConfig, DataError, build_loader, check_manifest, read_manifest
from atlas_train.data_prep.writer import write_dataset
from repo_paths import CONFIGS

L = 7  # seq_len; rows hold L + 1 = 8 tokens
V = 500


def row(i: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(i)
    tokens = rng.integers(0, V, L + 1)
    tokens[0], tokens[1] = i % V, i // V
    return tokens, rng.random(L + 1) < 0.3


def row_ids(batch: dict) -> list[int]:
    t = batch["tokens"]
    return (t[:, 0] + V * t[:, 1]).tolist()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """97 train rows in shards of 8 rows (13 shards, the last short) and 10 val rows."""
    out = tmp_path_factory.mktemp("ds")
    per_row_mb = 4 * 512 / 2**20  # 2 tar headers + the padded tokens and starts blocks: 8 rows per shard
    write_dataset(out, {"train": map(row, range(97)), "val": map(row, range(1000, 1010))},
                  seq_len=L, vocab_size=V, shard_size_mb=8 * per_row_mb)
    return out


def cfg(path, **kw) -> DataConfig:
    return DataConfig(path=str(path), **{"shuffle_buffer": 20, "num_workers": 0, **kw})


def take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_writer_rows_roundtrip_and_manifest(dataset):
    m = read_manifest(dataset)
    assert m.seq_len == L and m.vocab_size == V and m.token_dtype == "uint16" and m.tokenizer_path is None
    train = m.split("train")
    assert train.samples == 97 and [s.samples for s in train.shards] == [8] * 12 + [1]
    assert train.documents == sum(int(row(i)[1].sum()) for i in range(97))
    val = build_loader(cfg(dataset), "val", seq_len=L, micro_batch_size=5, dp_rank=0, dp_size=1, seed=0)
    batches = list(val)
    assert len(batches) == len(val) == 2 and batches[0]["tokens"].dtype == torch.long
    for b, ids in zip(batches, [range(1000, 1005), range(1005, 1010)]):
        for got_t, got_s, i in zip(b["tokens"], b["doc_start"], ids):
            want_t, want_s = row(i)
            assert got_t.tolist() == want_t.tolist() and got_s.tolist() == want_s.tolist()
    assert [row_ids(b) for b in val] == [row_ids(b) for b in batches]  # a second pass repeats the first


def test_writer_is_deterministic_and_replaces_old_shards(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_dataset(a, {"train": map(row, range(30))}, seq_len=L, vocab_size=V, shard_size_mb=0.01)
    write_dataset(b, {"train": map(row, range(30))}, seq_len=L, vocab_size=V, shard_size_mb=0.01)
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir()) and len(files) > 2
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    (a / ".train-00007.tar.x1y2.tmp").write_bytes(b"half a shard from a killed run")
    write_dataset(a, {"train": map(row, range(3))}, seq_len=L, vocab_size=V, shard_size_mb=0.01)
    assert sorted(p.name for p in a.iterdir()) == ["manifest.json", "train-00000.tar"]


def test_writer_rejects_bad_rows(tmp_path):
    with pytest.raises(DataError, match=r"must both be \(8,\)"):
        write_dataset(tmp_path, {"train": [(np.zeros(5), np.zeros(5, bool))]}, seq_len=L, vocab_size=V)
    with pytest.raises(DataError, match=r"token ids must lie in \[0, 500\)"):
        write_dataset(tmp_path, {"train": [(np.full(8, 500), np.zeros(8, bool))]}, seq_len=L, vocab_size=V)
    with pytest.raises(DataError, match="token ids must be integers, got float64"):
        write_dataset(tmp_path, {"train": [(np.full(8, 1.5), np.zeros(8, bool))]}, seq_len=L, vocab_size=V)
    assert not (tmp_path / "manifest.json").exists()
    m = write_dataset(tmp_path, {"train": [(np.full(8, 70000), np.zeros(8, bool))]}, seq_len=L, vocab_size=70001)
    assert m.token_dtype == "uint32"


def test_check_manifest(dataset):
    m = read_manifest(dataset)
    check_manifest(m, vocab_size=V, seq_len=L)
    check_manifest(m, vocab_size=V + 12, seq_len=L)  # a padded embedding is fine
    with pytest.raises(DataError, match="vocabulary has 500 tokens but model.vocab_size is 400"):
        check_manifest(m, vocab_size=400, seq_len=L)
    with pytest.raises(DataError, match="seq_len 7 but the run uses seq_len 16"):
        check_manifest(m, vocab_size=V, seq_len=16)
    with pytest.raises(DataError, match="seq_len 7 but the run uses seq_len 16"):
        build_loader(cfg(dataset), "train", seq_len=16, micro_batch_size=1, dp_rank=0, dp_size=1, seed=0)
    with pytest.raises(DataError, match="no dataset manifest at .*nowhere"):
        read_manifest(dataset / "nowhere")
    with pytest.raises(DataError, match="no split 'test'"):
        build_loader(cfg(dataset), "test", seq_len=L, micro_batch_size=1, dp_rank=0, dp_size=1, seed=0)


def test_each_epoch_is_a_shuffled_permutation_split_over_ranks(dataset):
    dp, B = 3, 2
    loaders = [build_loader(cfg(dataset), "train", seq_len=L, micro_batch_size=B, dp_rank=r, dp_size=dp, seed=5)
               for r in range(dp)]
    per_epoch = 97 // (dp * B)
    assert loaders[0].batches_per_epoch == per_epoch
    streams = [take(ld, 2 * per_epoch) for ld in loaders]
    epochs = []
    for e in range(2):
        ids = [i for k in range(e * per_epoch, (e + 1) * per_epoch) for r in range(dp) for i in row_ids(streams[r][k])]
        assert len(set(ids)) == len(ids) == per_epoch * dp * B and set(ids) <= set(range(97))
        epochs.append(ids)
    assert epochs[0] != epochs[1] and sorted(epochs[0]) != epochs[0]
    # The sequence does not depend on dp_size: one rank with the whole global batch sees the same rows.
    whole = take(build_loader(cfg(dataset), "train", seq_len=L, micro_batch_size=dp * B, dp_rank=0, dp_size=1,
                              seed=5), per_epoch)
    assert [i for b in whole for i in row_ids(b)] == epochs[0]
    other_seed = take(build_loader(cfg(dataset), "train", seq_len=L, micro_batch_size=dp * B, dp_rank=0, dp_size=1,
                                   seed=6), per_epoch)
    assert [i for b in other_seed for i in row_ids(b)] != epochs[0]


def test_shuffle_buffer_zero_keeps_shards_contiguous(dataset):
    ld = build_loader(cfg(dataset, shuffle_buffer=0), "train", seq_len=L, micro_batch_size=1, dp_rank=0,
                      dp_size=1, seed=1)
    ids = [i for b in take(ld, 97) for i in row_ids(b)]
    shard_order = [ids[k] // 8 for k in range(len(ids)) if k == 0 or ids[k] // 8 != ids[k - 1] // 8]
    assert sorted(shard_order) == list(range(13)) and shard_order != list(range(13))
    assert ids == [i for s in shard_order for i in range(8 * s, min(8 * s + 8, 97))]


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("stop_at", [3, 16, 17, 40])
def test_resume_is_exact(dataset, workers, stop_at):
    """Saved after `stop_at` batches (16 per epoch: 17 and 40 cross epochs), a new loader continues identically."""
    def make(**kw):
        return build_loader(cfg(dataset, num_workers=workers), "train", seq_len=L, micro_batch_size=3, dp_rank=1,
                            dp_size=2, seed=9, **kw)

    reference = [row_ids(b) for b in take(make(), stop_at + 6)]
    first = make()
    it = iter(first)
    got = [row_ids(next(it)) for _ in range(stop_at)]
    state = json.loads(json.dumps(first.state_dict()))  # it travels in a checkpoint
    resumed = make()
    resumed.load_state_dict(state)
    got += [row_ids(b) for b in take(resumed, 6)]
    assert got == reference


def test_worker_count_does_not_change_the_stream(dataset):
    streams = []
    for workers in (0, 1, 2):
        ld = build_loader(cfg(dataset, num_workers=workers), "train", seq_len=L, micro_batch_size=2, dp_rank=0,
                          dp_size=1, seed=3)
        streams.append([(row_ids(b), b["doc_start"].tolist()) for b in take(ld, 55)])
    assert streams[0] == streams[1] == streams[2]


def test_resume_with_another_dp_size_continues_the_sequence(dataset):
    one = build_loader(cfg(dataset), "train", seq_len=L, micro_batch_size=4, dp_rank=0, dp_size=1, seed=2)
    reference = [i for b in take(one, 20) for i in row_ids(b)]
    two = [build_loader(cfg(dataset), "train", seq_len=L, micro_batch_size=2, dp_rank=r, dp_size=2, seed=2)
           for r in range(2)]
    its = [iter(ld) for ld in two]
    got = []
    for _ in range(5):
        got += [i for it in its for i in row_ids(next(it))]
    state = two[0].state_dict()
    assert state == two[1].state_dict()
    one_again = build_loader(cfg(dataset), "train", seq_len=L, micro_batch_size=4, dp_rank=0, dp_size=1, seed=2)
    one_again.load_state_dict(state)
    got += [i for b in take(one_again, 15) for i in row_ids(b)]
    assert got == reference


def test_resume_refuses_other_seed_or_data(dataset, tmp_path):
    ld = build_loader(cfg(dataset), "train", seq_len=L, micro_batch_size=2, dp_rank=0, dp_size=1, seed=2)
    take(ld, 3)
    state = ld.state_dict()
    other = build_loader(cfg(dataset), "train", seq_len=L, micro_batch_size=2, dp_rank=0, dp_size=1, seed=3)
    with pytest.raises(DataError, match="saved with seed 2, this run uses 3"):
        other.load_state_dict(state)
    write_dataset(tmp_path, {"train": map(row, range(50))}, seq_len=L, vocab_size=V)
    changed = build_loader(cfg(tmp_path), "train", seq_len=L, micro_batch_size=2, dp_rank=0, dp_size=1, seed=2)
    with pytest.raises(DataError, match="differ from those the data position was saved with"):
        changed.load_state_dict(state)


def test_too_few_rows_for_a_global_batch(dataset):
    with pytest.raises(DataError, match="split 'val' has 10 rows, fewer than one global batch"):
        build_loader(cfg(dataset), "val", seq_len=L, micro_batch_size=4, dp_rank=0, dp_size=3, seed=0)


def _damaged_copy(dataset, tmp_path, how):
    for f in dataset.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    shard = tmp_path / "train-00002.tar"
    data = bytearray(shard.read_bytes())
    if how == "truncate":
        data = data[: len(data) // 2]
    else:
        data[520] ^= 0xFF  # a token of the first row: same size, wrong checksum
    shard.write_bytes(bytes(data))
    return tmp_path


@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_corrupt_shard_stops_or_is_skipped(dataset, tmp_path, how, capsys):
    path = _damaged_copy(dataset, tmp_path, how)
    def make(mode, workers=0):
        return build_loader(cfg(path, on_corrupt=mode, shuffle_buffer=0, num_workers=workers), "train", seq_len=L,
                            micro_batch_size=8, dp_rank=0, dp_size=1, seed=0)

    for workers in (0, 2):  # truncation is caught when the loader is built, a flipped byte when the shard is read
        with pytest.raises(DataError, match=r"^corrupt shard \S*train-00002.tar: [^\n]*$"):
            take(make("stop", workers), 12)
    skipping = make("skip")
    assert "train-00002.tar" in capsys.readouterr().err and skipping.skipped == ["train-00002.tar"]
    ids = {i for b in take(skipping, 11) for i in row_ids(b)}
    assert ids.isdisjoint(range(16, 24)) and len(ids) == 88


@pytest.mark.parametrize("shuffle_buffer", [0, 20])
def test_each_shard_is_read_once_per_epoch(dataset, monkeypatch, shuffle_buffer):
    """The reader walks windows (or shards) in order and keeps what the next one shares: no shard is re-read."""
    import atlas_train.data.loader as loader_module

    loads = []
    real = loader_module.load_shard
    monkeypatch.setattr(loader_module, "load_shard", lambda m, shard: loads.append(shard.name) or real(m, shard))
    ld = build_loader(cfg(dataset, shuffle_buffer=shuffle_buffer), "train", seq_len=L, micro_batch_size=1,
                      dp_rank=0, dp_size=1, seed=4)
    take(ld, 97)
    assert sorted(loads) == sorted(s.name for s in read_manifest(dataset).split("train").shards)


def test_data_config_section_loads_and_rejects_bad_keys():
    from atlas_train.config import ConfigError, load_config

    demo = CONFIGS / "data" / "demo.yaml"
    cfg = load_config([demo], ["data.num_workers=0"])
    assert cfg.data.path == "runs/demo/shards" and cfg.data.num_workers == 0 and cfg.data.on_corrupt == "stop"
    with pytest.raises(ConfigError, match=r"data\.shufle_buffer: unknown key"):
        load_config([demo], ["data.shufle_buffer=3"])
    with pytest.raises(ConfigError, match=r"data\.on_corrupt: 'ignore' is not one of"):
        load_config([demo], ["data.on_corrupt=ignore"])
    with pytest.raises(ConfigError, match="data: num_workers must be >= 0"):
        load_config([demo], ["data.num_workers=-1"])
