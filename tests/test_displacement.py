"""Token-level displacement: the theory quantities against float64 NumPy, the per-pair changes and rising
tokens against transformers' PyTorch models, and the `jaxalign displacement` command."""

import json
import os
import sys

import jax.numpy as jnp
import numpy as np
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, os.path.dirname(__file__))

from jaxalign.analysis import displacement  # noqa: E402
from jaxalign.jobs import displacement as displacement_job  # noqa: E402


def test_theory_quantities_equal_float64_numpy():
    rng = np.random.default_rng(0)
    V, D, B = 11, 5, 4
    W = rng.normal(size=(V, D))
    yp, ym = np.array([0, 3, 7, 2]), np.array([1, 4, 7, 9])
    probs = rng.dirichlet(np.ones(V), size=B)
    got = {k: np.asarray(v) for k, v in displacement.theory_quantities(
        jnp.asarray(W, jnp.float32), jnp.asarray(yp), jnp.asarray(ym), jnp.asarray(probs, jnp.float32)).items()}
    for b in range(B):
        wp, wm = W[yp[b]], W[ym[b]]
        d = wp - wm
        proj = d @ wp / np.linalg.norm(wp)
        orth = d - (d @ wp) / (wp @ wp) * wp
        others = [z for z in range(V) if z not in (yp[b], ym[b])]
        thm1 = wp @ wm + sum(probs[b, z] * (W[z] @ d) for z in others)
        np.testing.assert_allclose(got["w_chosen_dot_rejected"][b], wp @ wm, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got["w_diff_proj_on_chosen"][b], proj, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got["w_diff_orth_norm"][b], np.linalg.norm(orth), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got["w_dot_diff"][b], W @ d, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got["theorem1_term"][b], thm1, rtol=1e-5, atol=1e-5)
        # the split is exact: proj² + orth² = ‖W_y+ − W_y−‖²
        np.testing.assert_allclose(proj ** 2 + np.linalg.norm(orth) ** 2, d @ d, rtol=1e-9)


def test_top_rising_hand_case():
    before = np.array([[0.5, 0.2, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25]])
    after = np.array([[0.1, 0.3, 0.2, 0.4], [0.25, 0.25, 0.25, 0.25]])
    assert displacement.top_rising(before, after, 2).tolist() == [[3, 1], [0, 1]]  # ties: lower id


# --- against transformers ---------------------------------------------------------------------------

VOCAB = 272  # the tiny tokenizer has 265 ids


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from hf_tiny import make_model
    from tiny_tokenizer import make_tiny_tokenizer

    root = tmp_path_factory.mktemp("disp")
    models = {}
    for name, seed in (("before", 0), ("after", 1)):
        hf = make_model("llama", seed=seed, vocab_size=VOCAB)
        hf.save_pretrained(root / name)
        make_tiny_tokenizer(root / name)
        models[name] = hf
    rows = [{"prompt": "hello there ", "chosen": "x", "rejected": "y"},      # single-token pair
            {"prompt": "hel", "chosen": "lo world", "rejected": "p me"},
            {"prompt": "a b c", "chosen": " d", "rejected": " d"}]             # identical responses
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, models, rows


def _torch_stats(hf, tok, rows):
    """log π(y|x) summed over response tokens + EOS, and π(·|x), one unpadded example at a time.

    The sequence convention (DESIGN §3): ``tok(x) + tok(x + y)[len(tok(x)):] + [eos]`` (record 1's
    "hel" + "lo" merges into "hello" across the boundary, so this differs from ``tok(x + y)``)."""
    import torch

    out = []
    with torch.no_grad():
        for r in rows:
            p = tok(r["prompt"])["input_ids"]
            res = {}
            for key in ("chosen", "rejected"):
                full = tok(r["prompt"] + r[key])["input_ids"]
                ids = p + full[len(p):] + [tok.eos_token_id]
                logp = torch.log_softmax(hf(input_ids=torch.tensor([ids])).logits[0].double(), -1)
                res[key] = float(sum(logp[t - 1, ids[t]] for t in range(len(p), len(ids))))
                res[key + "_first"] = ids[len(p)]
                res["next"] = torch.softmax(logp[len(p) - 1], -1).numpy()
            out.append(res)
    return out


def test_compare_equals_transformers(checkpoints):
    from jaxalign import data
    from jaxalign.models import load_pretrained

    root, hf, rows = checkpoints
    before, tok = load_pretrained(root / "before")
    after, _ = load_pretrained(root / "after")
    with pytest.warns(data.DataWarning, match="prompt tokens changed"):
        ds = data.load_pairs(str(root / "pairs.jsonl"), tok, cache=False)
    pair, token = displacement_job.compare(before, after, ds, top_k=3, batch_size=2, tokenizer=tok,
                                       progress=False)
    ref_b, ref_a = _torch_stats(hf["before"], tok, rows), _torch_stats(hf["after"], tok, rows)
    assert pair["index"].tolist() == [0, 1, 2]
    assert pair["single_token"].tolist() == [True, False, False]
    for j in range(3):
        for key, col in (("chosen", "logp_chosen"), ("rejected", "logp_rejected")):
            np.testing.assert_allclose(pair[col + "_before"][j], ref_b[j][key], rtol=1e-4)
            np.testing.assert_allclose(pair[col + "_after"][j], ref_a[j][key], rtol=1e-4)
            np.testing.assert_allclose(pair["delta_" + col][j], ref_a[j][key] - ref_b[j][key],
                                       rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(pair["p_first_chosen_before"][j],
                                   ref_b[j]["next"][ref_b[j]["chosen_first"]], rtol=1e-4)
        rising = np.argsort(-(ref_a[j]["next"] - ref_b[j]["next"]), kind="stable")[:3]
        mine = token["token_id"][token["index"] == j]
        assert mine.tolist() == rising.tolist()
        np.testing.assert_allclose(token["prob_after"][token["index"] == j], ref_a[j]["next"][rising],
                                   rtol=1e-4, atol=1e-7)
    # theory quantities: only for the single-token pair, from the before checkpoint's lm_head
    W = hf["before"].lm_head.weight.detach().double().numpy()
    yp, ym = ref_b[0]["chosen_first"], ref_b[0]["rejected_first"]
    np.testing.assert_allclose(pair["w_chosen_dot_rejected"][0], W[yp] @ W[ym], rtol=1e-4)
    assert np.isnan(pair["w_chosen_dot_rejected"][1:]).all()
    z = token["token_id"][token["index"] == 0]
    np.testing.assert_allclose(token["w_z_dot_diff"][token["index"] == 0], W[z] @ (W[yp] - W[ym]),
                               rtol=1e-4, atol=1e-6)


def test_same_checkpoint_twice_changes_nothing(checkpoints):
    from jaxalign import data
    from jaxalign.models import load_pretrained

    root, _, _ = checkpoints
    model, tok = load_pretrained(root / "before")
    with pytest.warns(data.DataWarning):
        ds = data.load_pairs(str(root / "pairs.jsonl"), tok, cache=False)
    pair, token = displacement_job.compare(model, model, ds, top_k=2, batch_size=4, progress=False)
    np.testing.assert_allclose(pair["delta_logp_chosen"], 0.0, atol=1e-6)
    np.testing.assert_allclose(token["prob_increase"], 0.0, atol=1e-7)


def test_cli_writes_tables_and_prints(checkpoints, tmp_path, capsys):
    from jaxalign.cli import main

    root, _, _ = checkpoints
    rc = main(["displacement", "--before", str(root / "before"), "--after", str(root / "after"),
               "--data", str(root / "pairs.jsonl"), "--out", str(tmp_path / "d"), "--top-k", "3",
               "--batch-size", "4", "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "3 pairs (1 single-token)" in printed and "top rising tokens" in printed
    assert pq.read_table(tmp_path / "d" / "pairs.parquet").num_rows == 3
    tokens = pq.read_table(tmp_path / "d" / "rising_tokens.parquet")
    assert tokens.num_rows == 9 and tokens.column_names == list(displacement.TOKEN_COLUMNS)
    summary = json.loads((tmp_path / "d" / "summary.json").read_text())
    assert summary["pairs"] == 3 and summary["single_token_pairs"] == 1


def test_cli_missing_checkpoint_exits_2(checkpoints, tmp_path, capsys):
    from jaxalign.cli import main

    root, _, _ = checkpoints
    rc = main(["displacement", "--before", str(root / "before"), "--after", str(tmp_path / "nope"),
               "--data", str(root / "pairs.jsonl"), "--out", str(tmp_path / "d")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "nope" in err and "Traceback" not in err
