"""REAL (response-embedding pair selection): selection rules on hand-made embeddings, k-means against brute
force, the embedding against transformers' PyTorch model, and the ``jaxalign select`` command."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from hf_tiny import make_tiny  # noqa: E402
from tiny_tokenizer import make_tiny_tokenizer  # noqa: E402

from jaxalign import cli  # noqa: E402
from jaxalign.analysis import real  # noqa: E402
from jaxalign.jobs import select as select_job  # noqa: E402
from jaxalign.data.read import read_list  # noqa: E402
from jaxalign.errors import ConfigError, DataError  # noqa: E402

VOCAB = 272  # the tiny tokenizer's 265 ids, rounded up


def _unit(angle_deg):
    a = np.deg2rad(np.asarray(angle_deg, np.float64))
    return np.stack([np.cos(a), np.sin(a)], -1)


# --- pure functions ---------------------------------------------------------------------------------------

def test_mean_pool_equals_float64_numpy():
    rng = np.random.default_rng(0)
    h = rng.normal(size=(3, 7, 5)).astype(np.float32)
    mask = np.ones((3, 7), np.int32)
    mask[0, 4:] = 0   # right padding
    mask[1, :3] = 0   # left padding
    got = np.asarray(real.mean_pool(jnp.asarray(h), jnp.asarray(mask)))
    m = (h.astype(np.float64) * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    want = m / np.linalg.norm(m, axis=-1, keepdims=True)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, rtol=1e-6)


def test_select_fraction_easy_hard_random_exactly():
    # chosen embeddings at 0°, rejected at the angles below: cos = cos(angle).
    angles = np.array([10.0, 80.0, 45.0, 170.0, 30.0, 100.0])
    cos = np.einsum("ND,ND->N", _unit(np.zeros(6)), _unit(angles))
    easy = real.select_fraction(cos, "easy", 0.5)
    hard = real.select_fraction(cos, "hard", 0.5)
    assert easy.rows.tolist() == [1, 3, 5]        # 80°, 170°, 100°: the least similar
    assert hard.rows.tolist() == [0, 2, 4]        # 10°, 45°, 30°: the most similar
    assert easy.cutoff == pytest.approx(np.cos(np.deg2rad(80.0)))
    assert real.select_fraction(cos, "easy", 1 / 3).rows.tolist() == [3, 5]
    assert real.num_kept(0.25, 6) == 2 and real.num_kept(0.01, 6) == 1 and real.num_kept(1.0, 6) == 6
    r1 = real.select_fraction(cos, "random", 0.5, seed=3).rows
    assert r1.tolist() == sorted(np.random.default_rng(3).permutation(6)[:3].tolist())
    with pytest.raises(ConfigError, match="fraction"):
        real.select_fraction(cos, "easy", 0.0)
    with pytest.raises(ConfigError, match="centroid needs several responses"):
        real.select_fraction(cos, "centroid", 0.5)


def test_select_fraction_ties_follow_record_order_and_are_counted():
    cos = np.array([0.5, 0.2, 0.5, 0.5, 0.9])
    easy = real.select_fraction(cos, "easy", 0.6)  # 3 pairs: 0.2 then two of the three 0.5s
    assert easy.rows.tolist() == [0, 1, 2] and easy.ties_at_cutoff == 3
    hard = real.select_fraction(cos, "hard", 0.4)  # 0.9 then the first 0.5
    assert hard.rows.tolist() == [0, 4] and hard.ties_at_cutoff == 3
    assert real.select_fraction(cos, "easy", 0.8).ties_at_cutoff == 0  # all 0.5s kept: no arbitrary cut


def _brute_force_2partition(x):
    best = None
    K = len(x)
    for mask in range(1, 2 ** (K - 1)):  # point K-1 always in cluster 0: each partition once
        labels = np.array([(mask >> i) & 1 for i in range(K)])
        if labels.min() == labels.max():
            continue
        cost = sum(((x[labels == c] - x[labels == c].mean(0)) ** 2).sum() for c in (0, 1))
        if best is None or cost < best[1] - 1e-12:
            best = (labels, cost)
    return best


@pytest.mark.parametrize("seed,K,D", [(0, 5, 2), (1, 6, 3), (2, 7, 3), (3, 8, 4), (4, 8, 2)])
def test_kmeans2_finds_the_brute_force_optimum(seed, K, D):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(K, D))
    x[: K // 2] += 0.3 * rng.normal(size=D)  # mild structure, not an obvious split
    labels, cent, inertia = real.kmeans2(x)
    bf_labels, bf_cost = _brute_force_2partition(x)
    assert inertia == pytest.approx(bf_cost, rel=1e-9, abs=1e-12)
    same = np.array_equal(labels, bf_labels) or np.array_equal(labels, 1 - bf_labels)
    assert same
    np.testing.assert_allclose(cent, np.stack([x[labels == c].mean(0) for c in (0, 1)]), atol=1e-12)


def test_kmeans2_degenerate_cases():
    labels, _, inertia = real.kmeans2(np.ones((3, 2)))
    assert labels.tolist() == [0, 0, 0] and inertia == 0.0
    labels, _, _ = real.kmeans2(np.array([[0.0], [0.0], [1.0]]))
    assert labels.tolist() == [0, 0, 1]


def test_select_in_group_hard_easy_centroid():
    # Six responses on the unit circle: a group near 0° and a group near 125°.
    angles = [0.0, 8.0, 120.0, 127.0, 20.0, 131.0]
    emb = _unit(angles)
    scores = [1.0, 4.0, 3.0, 3.0, 0.0, 3.0]  # 120°, 127°, 131° tie: no pair among them
    # hard: the most similar pair with different scores: (0°, 8°) -> chosen 8° (score 4), rejected 0°.
    assert real.select_in_group(emb, scores, "hard") == (1, 0)
    # easy: the least similar pair: 0° vs 131° -> chosen 131° (score 3), rejected 0° (score 1).
    assert real.select_in_group(emb, scores, "easy") == (5, 0)
    # centroid: clusters {0°, 8°, 20°} and {120°, 127°, 131°}; each cluster's member nearest its mean.
    picks = []
    for g in ([0, 1, 4], [2, 3, 5]):
        c = emb[g].mean(0)
        picks.append(g[int(np.argmin(((emb[g] - c) ** 2).sum(-1)))])
    assert picks == [1, 3]
    assert real.select_in_group(emb, scores, "centroid") == (1, 3)
    # Equal scores are no preference.
    assert real.select_in_group(emb, [1.0] * 6, "hard") is None
    assert real.select_in_group(emb[:2], [2.0, 2.0], "centroid") is None
    # random: a candidate pair, chosen by score, reproducible by the generator.
    a = real.select_in_group(emb, scores, "random", rng=np.random.default_rng(0))
    b = real.select_in_group(emb, scores, "random", rng=np.random.default_rng(0))
    assert a == b and scores[a[0]] > scores[a[1]]


def test_read_groups_validates_and_names_the_field():
    rows = [{"prompt": "p", "responses": ["a", "b", "c"], "scores": [1, 2, 3]},
            {"prompt": "q", "responses": ["a", "b"], "ranks": [2, 1]},
            {"prompt": "r", "responses": ["a"], "scores": [1]},
            {"prompt": "s", "responses": ["a", " "], "scores": [1, 2]},
            {"prompt": "t", "responses": ["a", "b"], "scores": [1, "x"]}]
    src = read_list(rows, name="g.jsonl")
    assert real.is_grouped(src)
    with pytest.raises(DataError, match=r"g.jsonl, record 2, field 'responses'.*2 more"):
        real.read_groups(src)
    groups, problems = real.read_groups(src, on_bad_record="skip")
    assert [g.index for g in groups] == [0, 1]
    assert groups[1].scores == [-2.0, -1.0]  # ranks: 1 = best
    assert [(p.index, p.kind, p.field) for p in problems] == [
        (2, "wrong-type", "responses"), (3, "empty", "responses[1]"), (4, "wrong-type", "scores")]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".csv"])
def test_write_records_round_trip(tmp_path, suffix):
    from jaxalign.data.read import read_source

    rows = [{"prompt": "x\n", "chosen": "é", "rejected": "b"}, {"prompt": "y", "chosen": "c", "rejected": "d"}]
    path = select_job.write_records(tmp_path / f"out{suffix}", rows)
    assert [r.value for r in read_source(str(path)).records] == rows
    with pytest.raises(ConfigError, match="unknown file type"):
        select_job.write_records(tmp_path / "out.txt", rows)


# --- the embedding against transformers -------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = make_tiny("llama", tmp_path_factory.mktemp("real") / "llama", vocab_size=VOCAB,
                       pad_token_id=3, eos_token_id=2, bos_token_id=4)
    make_tiny_tokenizer(folder)
    from jaxalign.models import load_pretrained

    model, tok = load_pretrained(folder)
    return folder, model, tok


TEXTS = ["hello", "a much longer response, with punctuation!", "hello", "no", "yes, of course: 42"]


def _torch_embeddings(folder, tok, texts):
    import torch
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    enc = tok(texts, padding=True, return_tensors="pt")  # right padding: a padded batch, as REAL's code
    assert tok.padding_side == "right" and enc["attention_mask"].min() == 0
    with torch.no_grad():
        hs = hf(**enc, output_hidden_states=True).hidden_states[-1].double()
    mask = enc["attention_mask"].double()[..., None]
    mean = (hs * mask).sum(1) / mask.sum(1)
    return (mean / mean.norm(dim=-1, keepdim=True)).numpy()


def test_embedding_equals_transformers_masked_mean(tiny):
    folder, model, tok = tiny
    want = _torch_embeddings(folder, tok, TEXTS)
    for bs in (2, 16):  # several batches with filler rows; one batch
        got = real.embed_texts(model, tok, TEXTS, batch_size=bs)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=2e-5)
    cos = real.real_cosines(model, tok, [("hello", "no"), {"chosen": TEXTS[1], "rejected": TEXTS[4]}],
                            batch_size=4)
    np.testing.assert_allclose(cos, [want[0] @ want[3], want[1] @ want[4]], atol=2e-5)


def test_embedding_truncates_and_sees_no_prompt(tiny):
    _, model, tok = tiny
    e = real.embed_texts(model, tok, ["hello world", "hello"], max_length=2)
    # "<s> hello" both, through programs of two padded widths: unit vectors good to ~100 ulps of 1
    np.testing.assert_allclose(e[0], e[1], atol=1e-5)
    # The pair's prompt is ignored: the same responses give the same cosine under any prompt.
    from jaxalign.data import Pair
    c = real.real_cosines(model, tok, [Pair(0, "p1", "yes", "no"), Pair(1, "other prompt", "yes", "no")])
    assert c[0] == c[1]


# --- the command --------------------------------------------------------------------------------------

PAIRS = [{"prompt": f"q{i}\n", "chosen": c, "rejected": r, "extra": i}
         for i, (c, r) in enumerate([("yes", "no"), ("hello", "hello!"), ("a long answer here", "no"),
                                     ("1 2 3", "1 2"), ("blue", "green"), ("fine thanks", "go away")])]


def test_cli_select_pairs_writes_input_records(tiny, tmp_path, capsys):
    folder, model, tok = tiny
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    cos = real.real_cosines(model, tok, PAIRS)
    for subset, order in (("easy", np.argsort(cos, kind="stable")), ("hard", np.argsort(-cos, kind="stable"))):
        out = tmp_path / f"{subset}.jsonl"
        rc = cli.main(["select", "--model", str(folder), "--data", str(data), "--method", "real",
                       "--subset", subset, "--fraction", "0.5", "--out", str(out),
                       "--scores", str(tmp_path / f"{subset}.parquet"), "--no-progress"])
        assert rc == 0
        got = [json.loads(line) for line in out.read_text().splitlines()]
        assert got == [PAIRS[i] for i in sorted(order[:3])]  # unchanged records, input order
    import pyarrow.parquet as pq
    t = pq.read_table(tmp_path / "easy.parquet").to_pydict()
    assert t["index"] == list(range(6)) and sum(t["selected"]) == 3
    np.testing.assert_allclose(t["real_cosine"], cos, atol=1e-5)  # cosines from another batch plan
    assert "written to" in capsys.readouterr().out
    # Errors are for people: exit 2 and a message.
    rc = cli.main(["select", "--model", str(folder), "--data", str(data), "--subset", "centroid",
                   "--out", str(tmp_path / "c.jsonl"), "--no-progress"])
    assert rc == 2 and "centroid needs several responses" in capsys.readouterr().err


def test_cli_select_groups(tiny, tmp_path, capsys):
    folder, model, tok = tiny
    rows = [{"prompt": "p0", "responses": ["yes", "no", "hello", "yes!"], "scores": [3, 1, 2, 3]},
            {"prompt": "p1", "responses": ["same", "other"], "scores": [1, 1]},
            {"prompt": "p2", "responses": ["blue", "green", "1 2 3"], "ranks": [3, 1, 2]}]
    data = tmp_path / "groups.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for subset in ("hard", "easy", "centroid"):
        out = tmp_path / f"{subset}.jsonl"
        assert cli.main(["select", "--model", str(folder), "--data", str(data), "--subset", subset,
                         "--out", str(out), "--no-progress"]) == 0
        got = [json.loads(line) for line in out.read_text().splitlines()]
        assert len(got) == 2  # p1 has no preference pair
        for rec, src in zip(got, (rows[0], rows[2])):
            emb = real.embed_texts(model, tok, src["responses"])
            scores = src.get("scores") or [-r for r in src["ranks"]]
            c, r = real.select_in_group(emb, scores, subset)
            assert rec == {"prompt": src["prompt"], "chosen": src["responses"][c],
                           "rejected": src["responses"][r], "score_chosen": float(scores[c]),
                           "score_rejected": float(scores[r])}
    assert "1 prompt(s) gave no pair" in capsys.readouterr().out
    rc = cli.main(["select", "--model", str(folder), "--data", str(data), "--subset", "easy",
                   "--fraction", "0.5", "--out", str(tmp_path / "x.jsonl"), "--no-progress"])
    assert rc == 2


def test_select_help_has_an_example(capsys):
    with pytest.raises(SystemExit):
        cli.main(["select", "--help"])
    assert "example:" in capsys.readouterr().out


def test_embedding_on_a_mesh_equals_one_device(tiny):
    import jax

    from jaxalign import parallel

    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (simulated) devices")
    _, model, tok = tiny
    one = real.embed_texts(model, tok, TEXTS, batch_size=4)
    mesh = parallel.make_mesh((4, 2, 1))
    sharded = real.embed_texts(model, tok, TEXTS, batch_size=4, mesh=mesh)
    np.testing.assert_allclose(sharded, one, atol=1e-5)


def test_doctests():
    import doctest

    result = doctest.testmod(real, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted >= 5
