"""CHES, LN-CHES and the baselines: hand-derived identities, float64 NumPy, brute force, and the
transformers PyTorch models computed the paper's way (one unpadded example at a time)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numerics import EPS32, assert_close_to_scale

from jaxalign import logprobs
from jaxalign.analysis import baselines, ches

# --- pure functions ---------------------------------------------------------------------------------


def _np_ches(sp, sm):
    sp, sm = np.asarray(sp, np.float64), np.asarray(sm, np.float64)
    return (sp * sm).sum(-1) - (sp * sp).sum(-1)


def _np_ln_ches(sp, sm, npos, nneg):
    sp, sm = np.asarray(sp, np.float64), np.asarray(sm, np.float64)
    npos, nneg = np.asarray(npos, np.float64), np.asarray(nneg, np.float64)
    return (sp * sm).sum(-1) / (npos * nneg) - (sp * sp).sum(-1) / npos ** 2


def _masked_rows(rng, B=4, T=9, D=6):
    h = rng.normal(size=(B, T, D)).astype(np.float32)
    attn = np.ones((B, T), np.int32)
    attn[1, :2] = 0  # left padding
    attn[2, -3:] = 0  # right padding
    prompt_len = np.array([3, 2, 1, 4])
    return h, attn, prompt_len


def test_ches_of_identical_responses_is_zero():
    rng = np.random.default_rng(0)
    S = jnp.asarray(rng.normal(size=(5, 16)) * 10, jnp.float32)
    np.testing.assert_allclose(np.asarray(ches.ches(S, S)), 0.0, atol=1e-3)
    n = jnp.array([1, 2, 3, 4, 5])
    np.testing.assert_allclose(np.asarray(ches.ln_ches(S, S, n, n)), 0.0, atol=1e-3)


@pytest.mark.parametrize("npos,nneg", [(3, 7), (5, 5), (8, 2), (1, 1)])
def test_constant_hidden_states_length_bias(npos, nneg):
    """All h equal: CHES = |y+|(|y−| − |y+|)‖h‖² (the length bias) and LN-CHES = 0 (PAPERS §5.3)."""
    h = np.array([0.5, -1.0, 2.0], np.float32)
    T = 10
    hp = np.broadcast_to(h, (1, T, 3))
    mp = (np.arange(T) < npos)[None]
    mm = (np.arange(T) < nneg)[None]
    Sp, lp = ches.hidden_sum(jnp.asarray(hp), jnp.asarray(mp))
    Sm, lm = ches.hidden_sum(jnp.asarray(hp), jnp.asarray(mm))
    assert lp.tolist() == [npos] and lm.tolist() == [nneg]
    hh = float((h.astype(np.float64) ** 2).sum())
    np.testing.assert_allclose(np.asarray(ches.ches(Sp, Sm)), [npos * (nneg - npos) * hh], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(ches.ln_ches(Sp, Sm, lp, lm)), [0.0], atol=1e-5)


@pytest.mark.parametrize("jit", [False, True])
def test_hidden_sum_and_scores_equal_float64_numpy(jit):
    rng = np.random.default_rng(1)
    h, attn, plen = _masked_rows(rng)
    mask = logprobs.response_mask(jnp.asarray(attn), jnp.asarray(plen))
    f = jax.jit(ches.hidden_sum) if jit else ches.hidden_sum
    S, n = f(jnp.asarray(h), mask)
    m = np.asarray(mask)
    # a float32 sum of T terms: within T·2⁻²⁴ of the sum of their magnitudes (tests/numerics.py)
    terms = np.abs(h.astype(np.float64)) * m[..., None]
    assert_close_to_scale(S, (h.astype(np.float64) * m[..., None]).sum(1), h.shape[1] * EPS32,
                          scale=terms.sum(1), err_msg="hidden sums")
    assert n.tolist() == m.sum(1).tolist()
    Sp, Sm = np.asarray(S[:2]), np.asarray(S[2:])
    np.testing.assert_allclose(np.asarray(ches.ches(jnp.asarray(Sp), jnp.asarray(Sm))), _np_ches(Sp, Sm),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ches.ln_ches(jnp.asarray(Sp), jnp.asarray(Sm), n[:2], n[2:])),
                               _np_ln_ches(Sp, Sm, n[:2], n[2:]), rtol=1e-5, atol=1e-5)


def test_batched_equals_one_at_a_time():
    rng = np.random.default_rng(2)
    Sp = jnp.asarray(rng.normal(size=(6, 8)), jnp.float32)
    Sm = jnp.asarray(rng.normal(size=(6, 8)), jnp.float32)
    npos, nneg = jnp.arange(1, 7), jnp.arange(7, 1, -1)
    batched = ches.ln_ches(Sp, Sm, npos, nneg)
    single = [ches.ln_ches(Sp[i:i + 1], Sm[i:i + 1], npos[i:i + 1], nneg[i:i + 1])[0] for i in range(6)]
    # another program per row; LN-CHES cancels, so the bound is the size of its terms (D = 8 products)
    Sp64, Sm64 = np.asarray(Sp, np.float64), np.asarray(Sm, np.float64)
    n_p, n_m = np.asarray(npos, np.float64), np.asarray(nneg, np.float64)
    terms = np.abs(Sp64 * Sm64).sum(1) / (n_p * n_m) + (Sp64 ** 2).sum(1) / n_p ** 2
    assert_close_to_scale(batched, np.asarray(single), 16 * EPS32, scale=terms, err_msg="ln_ches")


def test_shape_errors_quote_shapes():
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 4\)"):
        ches.ches(jnp.zeros((2, 3)), jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"\(2, 5, 3\).*\(2, 4\)"):
        ches.hidden_sum(jnp.zeros((2, 5, 3)), jnp.zeros((2, 4)))


# --- baselines --------------------------------------------------------------------------------------

def _levenshtein_dp(a, b):
    """The textbook (|a|+1)×(|b|+1) table, written independently of the library's running-min form."""
    d = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a) + 1):
        d[i][0] = i
    for j in range(len(b) + 1):
        d[0][j] = j
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
    return d[-1][-1]


def _levenshtein_brute(a, b):
    """Breadth-first search over single edits (tiny alphabets and lengths only)."""
    a, b = tuple(a), tuple(b)
    alphabet = set(a) | set(b)
    frontier, seen, dist = {a}, {a}, 0
    while b not in frontier:
        nxt = set()
        for s in frontier:
            for i in range(len(s) + 1):
                for c in alphabet:
                    nxt.add(s[:i] + (c,) + s[i:])
                if i < len(s):
                    nxt.add(s[:i] + s[i + 1:])
                    for c in alphabet:
                        nxt.add(s[:i] + (c,) + s[i + 1:])
        frontier = nxt - seen
        seen |= frontier
        dist += 1
    return dist


def test_levenshtein_against_brute_force_and_dp():
    for a in itertools.product([0, 1], repeat=3):
        for b in itertools.chain.from_iterable(itertools.product([0, 1, 2], repeat=k) for k in range(4)):
            assert baselines.levenshtein(a, b) == _levenshtein_brute(a, b), (a, b)
    rng = np.random.default_rng(3)
    for _ in range(200):
        a = rng.integers(0, 4, size=rng.integers(0, 25)).tolist()
        b = rng.integers(0, 4, size=rng.integers(0, 25)).tolist()
        assert baselines.levenshtein(a, b) == _levenshtein_dp(a, b), (a, b)


def test_minus_norm_edit_distance():
    assert baselines.minus_norm_edit_distance([5, 6, 2], [5, 6, 2]) == 0.0
    assert baselines.minus_norm_edit_distance([5, 6, 7, 2], [8, 2]) == -3 / 4
    assert baselines.minus_norm_edit_distance([1, 2], [3, 4]) == -1.0


@pytest.mark.parametrize("q,n,expected", [
    (0.0, 3, [0, 1, 2]),            # the n lowest
    (1.0, 3, [7, 8, 9]),            # the n highest
    (0.5, 4, [2, 3, 4, 5]),         # idx = round(4.5) = 4 (half to even, as Python), start 2
    (0.25, 2, [1, 2]),              # idx = round(2.25) = 2, start 1
    (0.95, 4, [6, 7, 8, 9]),        # idx 9, start 7 -> shifted left to N - n = 6
    (0.1, 5, [0, 1, 2, 3, 4]),      # idx 1, start max(0, 1 - 2) = 0
    (0.5, 20, list(range(10))),     # n > N takes everything
    (0.5, 0, []),
])
def test_quantile_slice_hand_cases(q, n, expected):
    # scores whose sorted order is known: position p has rank perm[p]
    perm = np.array([3, 9, 0, 7, 1, 5, 8, 2, 6, 4])
    scores = perm * 1.5 - 2.0
    got = baselines.quantile_slice(scores, q, n)
    # positions whose rank is in `expected`, in ascending score order
    want = [int(np.where(perm == r)[0][0]) for r in expected]
    assert got.tolist() == want


def test_quantile_slice_errors_and_ties():
    with pytest.raises(ValueError, match="quantile"):
        baselines.quantile_slice([1.0], 1.5, 1)
    # ties keep input order (stable sort)
    assert baselines.quantile_slice([1.0, 1.0, 0.0, 1.0], 1.0, 2).tolist() == [1, 3]


# --- against transformers, the paper's way ----------------------------------------------------------

import os  # noqa: E402
import sys  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))

EOS = 2


def _pairs_ids(seed, n):
    """``n`` pairs of token ids (prompt, chosen + EOS, rejected + EOS) of varied lengths."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        P, Rc, Rr = rng.integers(1, 9), rng.integers(0, 6), rng.integers(0, 6)
        ids = lambda k: rng.integers(3, 128, size=k).tolist()  # noqa: E731
        out.append((ids(P), ids(Rc) + [EOS], ids(Rr) + [EOS]))
    return out


def _tokens(examples):
    from jaxalign.data.tokenize import Ragged, TokenizedPairs

    return TokenizedPairs(np.arange(len(examples), dtype=np.int64),
                          *(Ragged.from_rows([e[k] for e in examples]) for k in range(3)))


def _torch_reference(hf_model, examples):
    """One example at a time, unpadded, ``output_hidden_states=True``, float32, no_grad:
    S(y) = hidden_states[-1][0][prompt_len-1:-1].sum(0) of x ⊕ y ⊕ EOS; h_last = [...][-2]."""
    import torch

    rows = []
    with torch.no_grad():
        for p, c, r in examples:
            S, last, n = [], [], []
            for y in (c, r):
                ids = torch.tensor([p + y])
                h = hf_model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0].double()
                summed = h[len(p) - 1:-1]
                S.append(summed.sum(0).numpy())
                last.append(h[-2].numpy())
                n.append(summed.shape[0])
            rows.append((S, last, n))
    Sp = np.stack([r[0][0] for r in rows])
    Sm = np.stack([r[0][1] for r in rows])
    n_p = np.array([r[2][0] for r in rows], np.float64)
    n_m = np.array([r[2][1] for r in rows], np.float64)
    return {"ches": _np_ches(Sp, Sm), "ln_ches": _np_ln_ches(Sp, Sm, n_p, n_m),
            "last_hidden_ip": np.einsum("bd,bd->b", np.stack([r[1][0] for r in rows]),
                                        np.stack([r[1][1] for r in rows])),
            "chosen_len": n_p, "rejected_len": n_m, "scale": (Sp * Sp).sum(-1) + np.abs((Sp * Sm).sum(-1))}


def _score_all(scorer, examples, batch_size):
    from jaxalign.data.batch import LENGTH_BUCKETS
    from jaxalign.data.batch import shared_prompt_batch

    tokens = _tokens(examples)
    outs = []
    for start in range(0, len(examples), batch_size):
        rows = np.full(batch_size, -1)
        take = np.arange(start, min(start + batch_size, len(examples)))
        rows[:take.size] = take
        batch = shared_prompt_batch(tokens, rows, pad_id=0, bucket=LENGTH_BUCKETS)
        outs.append({k: v[:take.size] for k, v in scorer(batch).items()})
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def tiny_pair(request, tmp_path_factory):
    from hf_tiny import make_model

    from jaxalign.models import load_pretrained

    path = tmp_path_factory.mktemp(request.param)
    hf = make_model(request.param, seed=5)
    hf.save_pretrained(path)
    model, _ = load_pretrained(path)
    return hf, model


def test_scores_equal_transformers_one_at_a_time(tiny_pair):
    """Batched (prompts left-padded, responses right-padded, filler rows) = the paper's procedure."""
    hf, model = tiny_pair
    examples = _pairs_ids(7, 11)
    examples.append((examples[0][0], examples[0][1], list(examples[0][1])))  # y+ = y−: CHES 0
    ref = _torch_reference(hf, examples)
    got = _score_all(ches.make_scorer(model), examples, batch_size=4)
    _assert_scores_equal_reference(got, ref)
    assert abs(got["ches"][-1]) <= 1e-4 * ref["scale"][-1]


def _assert_scores_equal_reference(got, ref):
    """``got`` (column name -> [N]) against :func:`_torch_reference`, row by row."""
    assert np.asarray(got["chosen_len"]).tolist() == ref["chosen_len"].tolist()
    assert np.asarray(got["rejected_len"]).tolist() == ref["rejected_len"].tolist()
    # 1e-4 relative to the size of the terms (CHES is a difference of two inner products)
    np.testing.assert_allclose(got["ches"], ref["ches"], rtol=1e-4, atol=1e-4 * ref["scale"].max())
    ln_scale = ref["scale"] / ref["chosen_len"] ** 2
    np.testing.assert_allclose(got["ln_ches"], ref["ln_ches"], rtol=1e-4, atol=1e-4 * ln_scale.max())
    np.testing.assert_allclose(got["last_hidden_ip"], ref["last_hidden_ip"], rtol=1e-4,
                               atol=1e-4 * np.abs(ref["last_hidden_ip"]).max())


def test_eight_devices_equal_one(tiny_pair):
    from jaxalign import parallel

    if jax.device_count() < 8:
        pytest.skip("needs 8 (simulated) devices")
    _, model = tiny_pair
    examples = _pairs_ids(8, 16)
    mesh = parallel.make_mesh()
    assert mesh.shape["data"] == 8
    one = _score_all(ches.make_scorer(model, return_sums=True), examples, batch_size=8)
    many = _score_all(ches.make_scorer(model, mesh=mesh, return_sums=True), examples, batch_size=8)
    for k in one:
        np.testing.assert_allclose(many[k], one[k], rtol=1e-5, atol=1e-4, err_msg=k)


# --- the `jaxalign ches` job: outputs, resume, bad records, errors ---------------------------------

import json  # noqa: E402

import pyarrow.parquet as pq  # noqa: E402

from jaxalign import store  # noqa: E402
from jaxalign.analysis import filtering, stats  # noqa: E402
from jaxalign.jobs import ches as ches_run  # noqa: E402
from jaxalign.cli import main  # noqa: E402

RECORDS = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in [
    ("hello there ", "x", "y"), ("a b", " yes", " no way"), ("hello", " world", " world!"),
    ("q: 1+1", " 2", " two"), ("tell me", " sure thing", " no"), ("hi", " hello", " hello"),
    ("ab", "cd", "ce"), ("the cat sat on", " the mat", " a hat"), ("x", "yz", "zy"), ("why?", " because", " hm"),
]]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    from hf_tiny import make_tiny
    from tiny_tokenizer import make_tiny_tokenizer

    root = tmp_path_factory.mktemp("job")
    make_tiny("llama", root / "model", seed=2, vocab_size=272)
    make_tiny_tokenizer(root / "model")
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    out = root / "full"
    assert main(["ches", "--model", str(root / "model"), "--data", str(data), "--out", str(out),
                 "--batch-size", "3", "--no-progress"]) == 0
    return root, data, out


def _assert_every_row_equals_transformers(folder, t, table):
    """Every output row against ``transformers`` run on that row's pair alone (float64 sums): the
    length-sorted batches must land each pair's scores on its own row."""
    import torch
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    examples = [(list(t.prompt[i]), list(t.chosen[i]), list(t.rejected[i])) for i in range(len(t))]
    ref = _torch_reference(hf, examples)
    _assert_scores_equal_reference({k: table.column(k).to_numpy() for k in
                                    ("chosen_len", "rejected_len", "ches", "ln_ches", "last_hidden_ip")}, ref)
    # the rows are told apart: no two pairs share a CHES value, so a shift of rows would show
    assert len(set(np.round(ref["ches"], 3).tolist())) == len(examples)


def test_cli_ches_outputs(job, capsys):
    from jaxalign.data import DataWarning, load_pairs
    from jaxalign.models import load_tokenizer

    root, data, out = job
    table = pq.read_table(out / "scores.parquet")
    assert table.column_names == ["index", "ches", "ln_ches", "minus_norm_edit_distance", "last_hidden_ip",
                                  "real_cosine", "prompt_len", "chosen_len", "rejected_len"]
    assert table.column("index").to_pylist() == list(range(len(RECORDS)))
    with pytest.warns(DataWarning, match="chosen == rejected"):
        ds = load_pairs(str(data), load_tokenizer(root / "model"), cache=False)
    t = ds.tokens
    assert table.column("prompt_len").to_pylist() == t.prompt.lengths.tolist()
    assert table.column("chosen_len").to_pylist() == t.chosen.lengths.tolist()
    edit = [-_levenshtein_dp(list(t.chosen[i]), list(t.rejected[i])) / max(len(t.chosen[i]), len(t.rejected[i]))
            for i in range(len(t))]
    np.testing.assert_allclose(table.column("minus_norm_edit_distance").to_numpy(), edit)
    assert table.column("ches").to_numpy()[5] == pytest.approx(0.0, abs=1e-3)  # identical responses
    _assert_every_row_equals_transformers(root / "model", t, table)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["scored"] == len(RECORDS) and summary["counts"]["skipped"] == 0
    assert set(summary["measures"]) == set(ches_run.MEASURES)
    assert set(summary["measures"]["ln_ches"]["quantiles"]) >= {"0", "0.5", "1"}
    assert (out / "ches_hist.png").read_bytes()[:4] == b"\x89PNG"
    assert not (out / "scores.parquet.parts").exists()
    # a finished run is not silently overwritten
    assert main(["ches", "--model", str(root / "model"), "--data", str(data), "--out", str(out),
                 "--no-progress", "--batch-size", "3"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_real_cosine_equals_transformers_one_response_at_a_time(job):
    """REAL (Zhang et al.): each response tokenized alone, final hidden states averaged, L2-normalised."""
    import torch
    import transformers

    root, _, out = job
    folder = root / "model"
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    def embed(text):
        ids = torch.tensor([tok(text)["input_ids"]])
        with torch.no_grad():
            h = hf(input_ids=ids, output_hidden_states=True).hidden_states[-1][0].double().mean(0).numpy()
        return h / np.linalg.norm(h)

    want = [embed(r["chosen"]) @ embed(r["rejected"]) for r in RECORDS]
    got = pq.read_table(out / "scores.parquet").column("real_cosine").to_numpy()
    np.testing.assert_allclose(got, want, atol=2e-5)
    assert got[5] == pytest.approx(1.0, abs=1e-5)  # identical responses
    summary = json.loads((out / "summary.json").read_text())
    assert summary["spearman"]["ln_ches"]["real_cosine"] == pytest.approx(
        stats.spearman(pq.read_table(out / "scores.parquet").column("ln_ches").to_numpy(), want), abs=1e-9)


class _Stop(Exception):
    pass


def test_resume_after_interrupt_equals_uninterrupted(job, tmp_path):
    root, data, full = job
    out = tmp_path / "r"
    seen = []

    def stop_after_two(batch_id):
        seen.append(batch_id)
        if len(seen) == 2:
            raise _Stop()

    with pytest.raises(_Stop):
        ches_run.run_ches(str(root / "model"), str(data), str(out), batch_size=3, progress=False,
                          after_batch=stop_after_two)
    assert not (out / "scores.parquet").exists()
    progress = json.loads((out / "scores.parquet.parts" / "progress.json").read_text())
    assert sorted(progress["done"]) == ["0", "1"]
    # another batch size would make other batches: refused, naming the setting
    with pytest.raises(Exception, match="batch_size: 3 then, 4 now"):
        ches_run.run_ches(str(root / "model"), str(data), str(out), batch_size=4, progress=False)
    rest = []
    ches_run.run_ches(str(root / "model"), str(data), str(out), batch_size=3, progress=False,
                      after_batch=rest.append)
    assert rest == [2, 3]  # only the unfinished batches ran
    got = pq.read_table(out / "scores.parquet")
    assert got.column("index").to_pylist() == list(range(len(RECORDS)))  # no gaps, no duplicates
    # The same settings uninterrupted: the same batches through the same compiled programs, so the
    # resumed table must be bit-identical.
    ches_run.run_ches(str(root / "model"), str(data), str(tmp_path / "u"), batch_size=3, progress=False)
    assert got.equals(pq.read_table(tmp_path / "u" / "scores.parquet"))
    # The CLI run (`full`) shards each batch over the 8-device mesh, padded to 8 rows: another program.
    _assert_scores_close(got, pq.read_table(full / "scores.parquet"))


def _assert_scores_close(got, want):
    """Scores of two different compiled programs (batch composition, padding, sharding) on the same pairs.

    Each hidden state h passes through the same float32 ops in another order, so it agrees to a few ulps
    of |h|. CHES = <S+, S-> - |S+|^2 with S = a sum of n hidden states is a difference of terms of size
    up to n+ * max(n+, n-) * |h|^2, which can cancel to near 0: its error is bounded relative to those
    terms, not to CHES. |h|^2 is estimated by the last-hidden inner products of the table. 1e-5 of the
    terms is ~170 float32 ulps (2^-24 = 6e-8), room for the D = 64-term dot products and L = 2 blocks.
    """
    g = {c: got.column(c).to_numpy() for c in got.column_names}
    w = {c: want.column(c).to_numpy() for c in want.column_names}
    for c in ("index", "prompt_len", "chosen_len", "rejected_len", "minus_norm_edit_distance"):
        np.testing.assert_array_equal(g[c], w[c], err_msg=c)  # integers and tokens: exact
    h2 = np.abs(w["last_hidden_ip"]).max()
    n_pos, n_max = w["chosen_len"], np.maximum(w["chosen_len"], w["rejected_len"])
    err, bound = np.abs(g["ches"] - w["ches"]), 1e-5 * n_pos * n_max * h2  # a bound per pair
    assert (err <= bound).all(), f"ches: |diff| {err} > {bound}"
    np.testing.assert_allclose(g["ln_ches"], w["ln_ches"], rtol=0, atol=1e-5 * h2, err_msg="ln_ches")
    np.testing.assert_allclose(g["last_hidden_ip"], w["last_hidden_ip"], rtol=0, atol=1e-5 * h2,
                               err_msg="last_hidden_ip")
    # cosines of unit vectors (REAL): a few ulps of 1
    np.testing.assert_allclose(g["real_cosine"], w["real_cosine"], rtol=0, atol=1e-6, err_msg="real_cosine")


def test_bad_records_error_or_skip(job, tmp_path, capsys):
    root, _, _ = job
    bad = tmp_path / "bad.jsonl"
    rows = [json.dumps(r) for r in RECORDS[:3]]
    rows.insert(1, json.dumps({"prompt": "p", "chosen": "c"}))
    bad.write_text("\n".join(rows) + "\n")
    args = ["ches", "--model", str(root / "model"), "--data", str(bad), "--no-progress"]
    assert main(args + ["--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl" in err and "record 1" in err and "'rejected'" in err and "Traceback" not in err
    assert main(args + ["--out", str(tmp_path / "s"), "--on-bad-record", "skip"]) == 0
    table = pq.read_table(tmp_path / "s" / "scores.parquet")
    assert table.column("index").to_pylist() == [0, 2, 3]  # the input's positions
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert summary["counts"]["skipped"] == 1 and summary["counts"]["skipped_by_kind"] == {"missing-field": 1}
    skipped = [json.loads(x) for x in (tmp_path / "s" / "skipped.jsonl").read_text().splitlines()]
    assert skipped[0]["index"] == 1 and skipped[0]["field"] == "rejected"


def test_no_usable_pair_exits_2_with_the_counts(job, tmp_path, capsys):
    root, _, _ = job
    bad = tmp_path / "allbad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "chosen": "c"}) + "\n" + json.dumps({"prompt": "q"}) + "\n")
    rc = main(["ches", "--model", str(root / "model"), "--data", str(bad), "--out", str(tmp_path / "o"),
               "--on-bad-record", "skip", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "no usable preference pairs: read 2 records, skipped 2" in err
    assert not (tmp_path / "o" / "scores.parquet").exists()


@pytest.mark.parametrize("extra,needle", [
    (["--batch-size", "0"], "--batch-size"),
    (["--limit", "0"], "--limit"),
    (["--limit", "-2"], "--limit must be at least 1, got -2"),
    (["--layer", "7"], "--layer 7"),
])
def test_cli_option_errors_exit_2(job, tmp_path, capsys, extra, needle):
    root, data, _ = job
    rc = main(["ches", "--model", str(root / "model"), "--data", str(data), "--out", str(tmp_path / "o")]
              + extra)
    assert rc == 2 and needle in capsys.readouterr().err


def test_cli_layer_option(job, tmp_path):
    root, data, full = job
    out = tmp_path / "l"
    assert main(["ches", "--model", str(root / "model"), "--data", str(data), "--out", str(out), "--layer", "1",
                 "--limit", "4", "--no-progress", "--batch-size", "4"]) == 0
    got = pq.read_table(out / "scores.parquet").column("ches").to_numpy()
    assert got.shape == (4,)
    assert not np.allclose(got, pq.read_table(full / "scores.parquet").column("ches").to_numpy()[:4])
    assert json.loads((out / "summary.json").read_text())["layer"] == 1


def test_cli_missing_files_exit_2(job, tmp_path, capsys):
    root, data, _ = job
    assert main(["ches", "--model", str(tmp_path / "nomodel"), "--data", str(data),
                 "--out", str(tmp_path / "o")]) == 2
    assert "nomodel" in capsys.readouterr().err
    assert main(["ches", "--model", str(root / "model"), "--data", str(tmp_path / "nodata.jsonl"),
                 "--out", str(tmp_path / "o")]) == 2
    assert "nodata.jsonl" in capsys.readouterr().err


# --- filter -----------------------------------------------------------------------------------------

def test_select_hand_cases():
    s = [0.5, -1.0, 2.0, 0.0, 1.0, 3.0]  # ascending positions: 1 3 0 4 2 5
    assert filtering.select(s, drop_top=1 / 3).tolist() == [0, 1, 3, 4]
    assert filtering.select(s, drop_top=0.0).tolist() == [0, 1, 2, 3, 4, 5]
    assert filtering.select(s, keep_lowest=2).tolist() == [1, 3]
    assert filtering.select(s, quantile=0.0, n=2).tolist() == [1, 3]
    assert filtering.select(s, quantile=1.0, n=2).tolist() == [2, 5]
    # idx = round(0.5 · 5) = 2 (half to even), start 2 - 1 = 1: sorted[1:4] = positions 3, 0, 4
    assert filtering.select(s, quantile=0.5, n=3).tolist() == [0, 3, 4]
    from jaxalign.errors import ConfigError

    with pytest.raises(ConfigError, match="needs --n"):
        filtering.select(s, quantile=0.5)
    with pytest.raises(ConfigError, match="exactly one"):
        filtering.select(s, keep_lowest=1, drop_top=0.1)


@pytest.fixture
def scored(tmp_path):
    """A JSONL file of 6 records (formatted by hand) and a scores table with known LN-CHES; record 4
    has no score (as if skipped while scoring)."""
    lines = [f'{{"prompt": "p{i}",  "chosen": "c{i}", "rejected": "r{i}"}}' for i in range(6)]
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(lines) + "\n")
    scores = tmp_path / "scores.parquet"
    store.write_table({"index": [0, 1, 2, 3, 5], "ln_ches": [0.5, -1.0, 2.0, 0.0, 3.0],
                       "ches": [1.0, 2.0, 3.0, 4.0, 5.0]}, scores)
    return data, scores, lines


def test_cli_filter_quantile_window_jsonl_bytes(scored, tmp_path, capsys):
    data, scores, lines = scored
    out = tmp_path / "f.jsonl"
    assert main(["filter", "--data", str(data), "--scores", str(scores), "--quantile", "0", "--n", "2",
                 "--out", str(out)]) == 0
    assert out.read_text() == lines[1] + "\n" + lines[3] + "\n"  # byte for byte, input order
    assert "kept 2 of 5 scored records (6 in the input, 1 without a score)" in capsys.readouterr().out
    assert main(["filter", "--data", str(data), "--scores", str(scores), "--by", "ln_ches",
                 "--quantile", "1", "--n", "2", "--out", str(out)]) == 0
    assert out.read_text() == lines[2] + "\n" + lines[5] + "\n"
    assert main(["filter", "--data", str(data), "--scores", str(scores), "--drop-top", "0.4",
                 "--out", str(out)]) == 0
    assert out.read_text() == "".join(lines[i] + "\n" for i in (0, 1, 3))
    assert main(["filter", "--data", str(data), "--scores", str(scores), "--by", "ches",
                 "--keep-lowest", "1", "--out", str(out)]) == 0
    assert out.read_text() == lines[0] + "\n"


@pytest.mark.parametrize("fmt", ["json", "parquet", "csv"])
def test_cli_filter_keeps_input_format(tmp_path, fmt):
    rows = [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(4)]
    data = tmp_path / f"d.{fmt}"
    if fmt == "json":
        data.write_text(json.dumps(rows))
    elif fmt == "parquet":
        store.write_table({k: [r[k] for r in rows] for k in rows[0]}, data)
    else:
        data.write_text("prompt,chosen,rejected\n" + "".join(f"p{i},c{i},r{i}\n" for i in range(4)))
    scores = tmp_path / "s.parquet"
    store.write_table({"index": [0, 1, 2, 3], "ln_ches": [3.0, 1.0, 2.0, 0.0]}, scores)
    out = tmp_path / f"out.{fmt}"
    assert main(["filter", "--data", str(data), "--scores", str(scores), "--keep-lowest", "2",
                 "--out", str(out)]) == 0
    from jaxalign.data import read_source

    assert [r.value for r in read_source(str(out)).records] == [rows[1], rows[3]]


def test_cli_filter_errors_exit_2(scored, tmp_path, capsys):
    data, scores, _ = scored
    base = ["filter", "--data", str(data), "--out", str(tmp_path / "o.jsonl")]
    other = tmp_path / "other.parquet"
    store.write_table({"index": [0, 9], "ln_ches": [0.0, 1.0]}, other)
    assert main(base + ["--scores", str(other), "--keep-lowest", "1"]) == 2
    err = capsys.readouterr().err
    assert "other.parquet" in err and "record 9" in err and "'index'" in err
    nan = tmp_path / "nan.parquet"
    store.write_table({"index": [0, 1], "ln_ches": [0.0, float("nan")]}, nan)
    assert main(base + ["--scores", str(nan), "--keep-lowest", "1"]) == 2
    err = capsys.readouterr().err
    assert "nan.parquet" in err and "record 1" in err and "'ln_ches'" in err
    assert main(base + ["--scores", str(scores), "--by", "nope", "--keep-lowest", "1"]) == 2
    assert "'nope'" in capsys.readouterr().err
    assert main(["filter", "--data", str(data), "--scores", str(scores), "--keep-lowest", "1",
                 "--out", str(tmp_path / "o.parquet")]) == 2
    assert "must end in .jsonl" in capsys.readouterr().err
    assert main(base + ["--scores", str(scores), "--quantile", "0.5"]) == 2
    assert "--n" in capsys.readouterr().err


@pytest.mark.parametrize("seed", range(4))
def test_spearman_equals_scipy_with_ties_and_nan(seed):
    """Average ranks for ties; pairs with a non-finite value dropped; ``None`` when undefined."""
    from scipy import stats as scipy_stats

    rank_stats = stats
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 6, 40).astype(float)  # many ties
    y = x + rng.normal(0, 2, 40)
    y[rng.integers(0, 40, 3)] = np.nan
    ok = np.isfinite(y)
    assert rank_stats.spearman(x, y) == pytest.approx(scipy_stats.spearmanr(x[ok], y[ok]).statistic, abs=1e-12)
    np.testing.assert_allclose(rank_stats.rankdata(x), scipy_stats.rankdata(x))
    assert rank_stats.spearman(np.ones(5), np.arange(5.0)) is None
    assert rank_stats.spearman([1.0], [2.0]) is None


@pytest.mark.slow
def test_distributed_two_processes_equal_one(job, tmp_path):
    """``ches --distributed`` as two local processes (found through SLURM's variables, the way a cluster
    launcher sets them): every process batches, process 0 writes; the table equals one process's."""
    import os
    import socket
    import subprocess

    root, data, full = job
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "two"
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
               SLURM_JOB_ID="1", SLURM_NTASKS="2", SLURM_STEP_NODELIST="localhost", SLURM_STEP_NUM_NODES="1",
               XLA_FLAGS="--xla_force_host_platform_device_count=1",
               PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                           os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "jaxalign.cli", "ches", "--model", str(root / "model"), "--data", str(data),
           "--out", str(out), "--batch-size", "3", "--no-progress", "--distributed"]
    procs = [subprocess.Popen(cmd, env=dict(env, SLURM_PROCID=str(i), SLURM_LOCALID=str(i)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
    # two processes really ran: only the lead prints the summary
    assert "scored 10 pairs" in outs[0] and "scored" not in outs[1], outs
    one, two = pq.read_table(full / "scores.parquet"), pq.read_table(out / "scores.parquet")
    assert two.column_names == one.column_names
    assert two.column("index").to_pylist() == one.column("index").to_pylist()
    for name in one.column_names:
        # the same pairs through the same programs, batch rows split over two processes: float32 rounding
        np.testing.assert_allclose(two.column(name).to_numpy(), one.column(name).to_numpy(), rtol=1e-5,
                                   atol=1e-5, err_msg=name)
