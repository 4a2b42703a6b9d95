"""Batches of pairs: both layouts written out by hand (right and left padding), response-mask positions,
bucketing, filler pairs, and the iterator: order, resumable state, per-process slices."""

import json

import numpy as np
import pytest

from jaxalign import data
from jaxalign.data.iterate import PairIterator, epoch_order
from jaxalign.errors import CheckpointError, ConfigError

# Two pairs written out (token ids are arbitrary; 2 plays the EOS, 0 the pad):
#   pair 0 (record 5): prompt 10 11 12, chosen 20 21 2, rejected 30 2
#   pair 1 (record 9): prompt 13,       chosen 22 2,    rejected 31 32 33 2
TOKENS = data.TokenizedPairs(
    np.array([5, 9]), data.Ragged.from_rows([[10, 11, 12], [13]]),
    data.Ragged.from_rows([[20, 21, 2], [22, 2]]), data.Ragged.from_rows([[30, 2], [31, 32, 33, 2]]))


def test_bucket_length():
    assert [data.bucket_length(n) for n in (0, 1, 16, 17, 33, 64, 65)] == [16, 16, 16, 32, 64, 64, 128]
    assert [data.bucket_length(n, 32) for n in (1, 32, 33, 100)] == [32, 32, 64, 128]
    assert [data.bucket_length(n, (64, 16, 256)) for n in (3, 16, 17, 200)] == [16, 16, 64, 256]
    assert data.bucket_length(37, None) == 37
    with pytest.raises(ConfigError, match="largest bucket 256"):
        data.bucket_length(300, (64, 256))
    with pytest.raises(ConfigError):
        data.bucket_length(3, "pow3")


def test_pairs_layout_right_padding():
    b = data.pair_batch(TOKENS, np.array([0, 1]), pad_id=0, bucket=None)
    np.testing.assert_array_equal(b["input_ids"], [[10, 11, 12, 20, 21, 2],
                                                   [13, 22, 2, 0, 0, 0],
                                                   [10, 11, 12, 30, 2, 0],
                                                   [13, 31, 32, 33, 2, 0]])
    np.testing.assert_array_equal(b["attention_mask"], [[1, 1, 1, 1, 1, 1],
                                                        [1, 1, 1, 0, 0, 0],
                                                        [1, 1, 1, 1, 1, 0],
                                                        [1, 1, 1, 1, 1, 0]])
    # from the last prompt token to the second-to-last token
    np.testing.assert_array_equal(b["response_mask"], [[0, 0, 1, 1, 1, 0],
                                                       [1, 1, 0, 0, 0, 0],
                                                       [0, 0, 1, 1, 0, 0],
                                                       [1, 1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(b["prompt_lengths"], [3, 1, 3, 1])
    np.testing.assert_array_equal(b["response_lengths"], [3, 2, 2, 4])
    np.testing.assert_array_equal(b["index"], [5, 9])
    assert all(v.dtype == np.int32 for v in b.values())


def test_pairs_layout_left_padding():
    b = data.pair_batch(TOKENS, np.array([0, 1]), pad_id=0, bucket=None, padding_side="left")
    np.testing.assert_array_equal(b["input_ids"], [[10, 11, 12, 20, 21, 2],
                                                   [0, 0, 0, 13, 22, 2],
                                                   [0, 10, 11, 12, 30, 2],
                                                   [0, 13, 31, 32, 33, 2]])
    np.testing.assert_array_equal(b["attention_mask"], [[1, 1, 1, 1, 1, 1],
                                                        [0, 0, 0, 1, 1, 1],
                                                        [0, 1, 1, 1, 1, 1],
                                                        [0, 1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(b["response_mask"], [[0, 0, 1, 1, 1, 0],
                                                       [0, 0, 0, 1, 1, 0],
                                                       [0, 0, 0, 1, 1, 0],
                                                       [0, 1, 1, 1, 1, 0]])


@pytest.mark.parametrize("side", ["right", "left"])
def test_response_mask_selects_the_predictions_of_response_tokens(side):
    """Targets ``ids[t + 1]`` at the masked positions ``t`` are exactly each row's response tokens."""
    b = data.pair_batch(TOKENS, np.array([1, 0]), pad_id=0, bucket=8, padding_side=side)
    assert b["input_ids"].shape == (4, 8)
    responses = [TOKENS.chosen[1], TOKENS.chosen[0], TOKENS.rejected[1], TOKENS.rejected[0]]
    for row, response in enumerate(responses):
        mask = b["response_mask"][row, :-1].astype(bool)
        np.testing.assert_array_equal(b["input_ids"][row, 1:][mask], response)
        assert b["response_mask"][row, -1] == 0


def test_shared_prompt_layout():
    b = data.shared_prompt_batch(TOKENS, np.array([0, 1]), pad_id=0, bucket=None)
    np.testing.assert_array_equal(b["prompt_ids"], [[10, 11, 12], [0, 0, 13]])
    np.testing.assert_array_equal(b["prompt_mask"], [[1, 1, 1], [0, 0, 1]])
    np.testing.assert_array_equal(b["chosen_ids"], [[20, 21, 2, 0], [22, 2, 0, 0]])
    np.testing.assert_array_equal(b["chosen_mask"], [[1, 1, 1, 0], [1, 1, 0, 0]])
    np.testing.assert_array_equal(b["rejected_ids"], [[30, 2, 0, 0], [31, 32, 33, 2]])
    np.testing.assert_array_equal(b["rejected_mask"], [[1, 1, 0, 0], [1, 1, 1, 1]])
    for name, expected in (("prompt", [3, 1]), ("chosen", [3, 2]), ("rejected", [2, 4]),
                           ("index", [5, 9])):
        np.testing.assert_array_equal(b[name if name == "index" else f"{name}_lengths"], expected)
    bucketed = data.shared_prompt_batch(TOKENS, np.array([0, 1]), pad_id=0, bucket=16)
    assert bucketed["prompt_ids"].shape == (2, 16) and bucketed["chosen_ids"].shape == (2, 16)


def test_filler_pairs():
    b = data.pair_batch(TOKENS, np.array([1, -1]), pad_id=7, bucket=None)
    np.testing.assert_array_equal(b["index"], [9, -1])
    for row in (1, 3):  # the chosen and rejected rows of the filler pair
        assert (b["input_ids"][row] == 7).all() and not b["attention_mask"][row].any()
        assert not b["response_mask"][row].any() and b["prompt_lengths"][row] == 0
    s = data.shared_prompt_batch(TOKENS, np.array([-1, -1]), pad_id=7)
    assert (s["index"] == -1).all() and not s["prompt_mask"].any() and not s["chosen_mask"].any()


# --- iteration ----------------------------------------------------------------------------------------

def _random_tokens(n, seed=0):
    rng = np.random.default_rng(seed)
    rows = lambda lo, hi: [list(rng.integers(5, 50, rng.integers(lo, hi))) for _ in range(n)]  # noqa
    return data.TokenizedPairs(np.arange(100, 100 + n), data.Ragged.from_rows(rows(1, 40)),
                               data.Ragged.from_rows(rows(1, 30)), data.Ragged.from_rows(rows(1, 30)))


def _splitmix64(x):
    x = (x + 0x9E3779B97F4A7C15) % 2**64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) % 2**64
    return x ^ (x >> 31)


def test_epoch_order_is_the_documented_hash_order():
    """An independent pure-Python SplitMix64 gives the same order (it does not depend on NumPy)."""
    for seed, epoch, n in ((0, 0, 10), (7, 3, 33), (2**40 + 1, 1, 5)):
        key = _splitmix64(_splitmix64(seed) ^ epoch)
        expected = sorted(range(n), key=lambda i: (_splitmix64(i ^ key), i))
        assert epoch_order(n, seed=seed, epoch=epoch).tolist() == expected
    assert epoch_order(5, seed=0, epoch=0, shuffle=False).tolist() == [0, 1, 2, 3, 4]
    assert epoch_order(50, seed=0, epoch=0).tolist() != epoch_order(50, seed=0, epoch=1).tolist()
    assert epoch_order(50, seed=0, epoch=0).tolist() != epoch_order(50, seed=1, epoch=0).tolist()


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_one_epoch_visits_every_record_once():
    tokens = _random_tokens(23)
    it = PairIterator(tokens, 4, pad_id=0, seed=3, num_epochs=1)
    batches = list(it)
    assert len(batches) == it.steps_per_epoch == 6
    seen = np.concatenate([b["index"] for b in batches])
    assert sorted(seen[seen >= 0].tolist()) == list(range(100, 123)) and (seen < 0).sum() == 1
    dropped = list(PairIterator(tokens, 4, pad_id=0, seed=3, num_epochs=1, drop_remainder=True))
    seen = np.concatenate([b["index"] for b in dropped])
    assert len(dropped) == 5 and len(set(seen.tolist())) == 20 and (seen >= 0).all()
    ordered = np.concatenate([b["index"] for b in PairIterator(tokens, 4, pad_id=0, shuffle=False,
                                                                 num_epochs=1)])
    assert ordered.tolist() == list(range(100, 123)) + [-1]


def test_lengths_are_bucketed():
    it = PairIterator(_random_tokens(40), 4, pad_id=0, num_epochs=1, bucket=32)
    assert {b["input_ids"].shape[1] for b in it} <= {32, 64, 96}


@pytest.mark.parametrize("layout", ["pairs", "shared_prompt"])
def test_save_and_restore_continues_exactly(layout):
    tokens = _random_tokens(23)
    options = dict(pad_id=0, seed=11, layout=layout)
    uninterrupted = _take(PairIterator(tokens, 4, **options), 15)  # crosses two epoch boundaries
    it = PairIterator(tokens, 4, **options)
    first = _take(it, 7)
    state = json.loads(json.dumps(it.state()))  # a checkpoint stores plain ints
    assert state == {"seed": 11, "epoch": 1, "step": 1, "batch_size": 4, "num_records": 23}
    rest = _take(PairIterator(tokens, 4, state=state, **options), 8)
    other = PairIterator(tokens, 4, **options)
    _take(other, 3)
    other.restore(state)
    assert len(first + rest) == len(uninterrupted)
    for a, b, c in zip(first + rest, uninterrupted, first + _take(other, 8)):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
            np.testing.assert_array_equal(c[key], b[key])


def test_restoring_another_runs_state_fails():
    tokens = _random_tokens(10)
    state = PairIterator(tokens, 2, pad_id=0, seed=1).state()
    for change in ({"seed": 2}, {"batch_size": 5}):
        with pytest.raises(CheckpointError, match=list(change)[0]):
            PairIterator(tokens, change.get("batch_size", 2), pad_id=0, seed=change.get("seed", 1),
                         state=state)
    with pytest.raises(CheckpointError, match="num_records"):
        PairIterator(_random_tokens(11), 2, pad_id=0, seed=1, state=state)
    with pytest.raises(CheckpointError, match="lacks"):
        PairIterator(tokens, 2, pad_id=0, seed=1, state={"epoch": 0})
    with pytest.raises(CheckpointError, match="out of range"):
        PairIterator(tokens, 2, pad_id=0, seed=1, state=dict(state, step=5))


@pytest.mark.parametrize("layout", ["pairs", "shared_prompt"])
@pytest.mark.parametrize("process_count", [2, 4])
def test_process_slices_partition_each_global_batch(layout, process_count):
    tokens, G = _random_tokens(21), 8
    whole = list(PairIterator(tokens, G, pad_id=0, seed=5, num_epochs=1, layout=layout))
    parts = [list(PairIterator(tokens, G, pad_id=0, seed=5, num_epochs=1, layout=layout,
                               process_index=p, process_count=process_count))
             for p in range(process_count)]
    seen = []
    for step, global_batch in enumerate(whole):
        local = [parts[p][step] for p in range(process_count)]
        assert len({tuple(v.shape for v in b.values()) for b in local}) == 1  # one shape everywhere
        index = np.concatenate([b["index"] for b in local])
        np.testing.assert_array_equal(index, global_batch["index"])
        seen += index[index >= 0].tolist()
        if layout == "pairs":  # chosen rows, then rejected rows, of each slice
            B = G // process_count
            chosen = np.concatenate([b["input_ids"][:B] for b in local])
            rejected = np.concatenate([b["input_ids"][B:] for b in local])
            np.testing.assert_array_equal(chosen, global_batch["input_ids"][:G])
            np.testing.assert_array_equal(rejected, global_batch["input_ids"][G:])
        else:
            np.testing.assert_array_equal(np.concatenate([b["prompt_ids"] for b in local]),
                                          global_batch["prompt_ids"])
    assert sorted(seen) == list(range(100, 121))
    assert all(len(p) == len(whole) for p in parts)


def test_iterator_options_are_checked():
    tokens = _random_tokens(10)
    with pytest.raises(ConfigError, match="divisible by process_count 4"):
        PairIterator(tokens, 6, pad_id=0, process_count=4)
    with pytest.raises(ConfigError, match="process_index"):
        PairIterator(tokens, 4, pad_id=0, process_index=2, process_count=2)
    with pytest.raises(ConfigError, match="not one batch"):
        PairIterator(tokens, 16, pad_id=0, drop_remainder=True)
    with pytest.raises(ConfigError, match="layout"):
        PairIterator(tokens, 2, pad_id=0, layout="rows")
    with pytest.raises(ConfigError, match="padding_side"):
        PairIterator(tokens, 2, pad_id=0, padding_side="middle")
    assert len(list(PairIterator(tokens, 4, pad_id=0, num_epochs=2))) == 6
