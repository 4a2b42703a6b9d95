"""Built-in schema readers (jaxalign.data.schemas) and the pair builder (jaxalign.data.pairing).

Each data set gets a miniature file in its documented schema (columns from its card, written here), laid
out as its repository lays out its files; the test checks the detected format, the pairs and prompts
against pairs written out by hand, the provenance columns, and a bad record under both policies.
"""

import gzip
import json
import os
import re
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jaxalign import cli, data
from jaxalign.data import pairing, schemas
from jaxalign.data.load import read_with_provenance
from jaxalign.errors import ConfigError, DataError

sys.path.insert(0, os.path.dirname(__file__))
from tiny_tokenizer import tiny_tokenizer, tiny_tokenizer_dir  # noqa: E402,F401

pytestmark = pytest.mark.filterwarnings("ignore::jaxalign.data.DataWarning")  # counts checked instead


def U(text):
    return [{"role": "user", "content": text}]


def A(text):
    return [{"role": "assistant", "content": text}]


def S(text):
    return [{"role": "system", "content": text}]


def _write(path, rows):
    """Writes ``rows`` as Parquet, JSONL, or gzipped JSONL, by the suffix of ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), str(path))
    else:
        text = "".join(json.dumps(r) + "\n" for r in rows).encode()
        path.write_bytes(gzip.compress(text) if path.suffix == ".gz" else text)
    return str(path)


def _tuples(pairs):
    return [(p.index, p.prompt, p.chosen, p.rejected) for p in pairs]


def _read(source, **options):
    pairs, report, prov = read_with_provenance(source, **options)
    return _tuples(pairs), report, prov


def _check_policies(source, bad_index, kind, field, good, **options):
    """The bad record raises under 'error' (naming record and field) and is left out under 'skip'."""
    with pytest.raises(DataError, match=re.escape(f"record {bad_index}, field '{field}'")):
        data.read_pairs(source, on_bad_record="error", **options)
    with pytest.warns(data.DataWarning, match="skipped 1"):
        pairs, report = data.read_pairs(source, on_bad_record="skip", **options)
    assert _tuples(pairs) == good
    assert [(p.index, p.kind, p.field) for p in report.skipped] == [(bad_index, kind, field)]
    assert report.read == report.kept + len(report.skipped) + report.unselected


# --- the pair builder -----------------------------------------------------------------------------

SCORES = [3.0, 5.0, 1.0, 5.0, None]   # a tie for best (1 and 3), one unrated


@pytest.mark.parametrize("rule, margin, expected", [
    ("best-vs-worst", None, [(1, 2)]),              # first of the tied best; the unrated one is out
    ("best-vs-each", None, [(1, 0), (1, 2)]),       # the other best (3) is a tie: no pair
    ("all-pairs", None, [(0, 2), (1, 0), (1, 2), (3, 0), (3, 2)]),
    ("all-pairs", 3.0, [(1, 2), (3, 2)]),
    ("best-vs-each", 3.0, [(1, 2)]),
    ("best-vs-worst", 5.0, []),                      # 5 - 1 = 4 < 5
])
def test_pair_rules_by_hand(rule, margin, expected):
    assert pairing.build_pairs(SCORES, pairing.PairingRule(rule, margin), source_index=0) == expected


def test_random_rules_are_seeded_per_record():
    every = [(0, 2), (1, 0), (1, 2), (3, 0), (3, 2)]   # all-pairs above, written by hand
    rule = pairing.PairingRule("random-pairs", k=2, seed=7)
    got = pairing.build_pairs(SCORES, rule, source_index=4)
    # the documented draw: default_rng([seed, 1, source_index]) picks k positions of all-pairs
    picked = np.random.default_rng([7, 1, 4]).choice(len(every), size=2, replace=False)
    assert got == [every[p] for p in sorted(picked)]
    assert got == pairing.build_pairs(SCORES, rule, source_index=4)
    assert pairing.build_pairs(SCORES, pairing.PairingRule("random-pairs", k=9), source_index=0) == every
    below = [0, 2]                                     # scored below the best (1)
    pick = np.random.default_rng([3, 1, 5]).integers(len(below))
    assert pairing.build_pairs(SCORES, pairing.PairingRule("best-vs-random", seed=3),
                               source_index=5) == [(1, below[pick])]
    assert pairing.build_pairs([2.0, 2.0], pairing.PairingRule("all-pairs"), source_index=0) == []
    with pytest.raises(ConfigError, match="pairing must be one of"):
        pairing.PairingRule("best")
    with pytest.raises(ConfigError, match="margin must be positive"):
        pairing.PairingRule(margin=0.0)


# --- HuggingFaceH4/ultrafeedback_binarized ----------------------------------------------------------

def _h4_row(i, prompt, good, bad, first_user=None):
    conv = U(first_user if first_user is not None else prompt)
    return {"prompt": prompt, "prompt_id": f"id{i}", "chosen": conv + A(good), "rejected": conv + A(bad),
            "messages": conv + A(good), "score_chosen": 8.0 + i, "score_rejected": 3.0}


def _h4_folder(tmp_path, bad=False):
    root = tmp_path / "ultrafeedback_binarized"
    train = [_h4_row(0, "What is 2+2?", "4", "5"), _h4_row(1, "Name a colour.", "Red.", "Seven."),
             _h4_row(2, "Say hi.", "Hi!", "No.", first_user="Say hello." if bad else None)]
    _write(root / "data" / "train_prefs-00000-of-00001.parquet", train)
    _write(root / "data" / "test_prefs-00000-of-00001.parquet", [_h4_row(0, "Capital of France?", "Paris",
                                                                         "Rome")])
    _write(root / "data" / "train_sft-00000-of-00001.parquet", train)
    return str(root)


def test_h4_ultrafeedback_binarized(tmp_path):
    root = _h4_folder(tmp_path)
    with pytest.raises(DataError, match=r"choose a split .*'test_prefs', 'train_prefs', 'train_sft'"):
        data.read_pairs(root)
    got, report, prov = _read(root, split="train_prefs")
    assert report.schema == "ultrafeedback-binarized" and "prompt, chosen, rejected" in report.detected
    assert report.format == "ultrafeedback-binarized: conversational"
    assert got == [(0, U("What is 2+2?"), A("4"), A("5")), (1, U("Name a colour."), A("Red."), A("Seven.")),
                   (2, U("Say hi."), A("Hi!"), A("No."))]
    assert prov["chosen_score"].tolist() == [8.0, 9.0, 10.0] and prov["margin"].tolist() == [5.0, 6.0, 7.0]
    got, _, _ = _read(root, split="test_prefs")
    assert got == [(0, U("Capital of France?"), A("Paris"), A("Rome"))]
    # read as TRL's format, the file fails as the issue describes: the prompt is a string
    with pytest.raises(DataError, match="record 0, field 'prompt'.*expected a list of messages"):
        data.read_pairs(root, split="train_prefs", format="trl")


def test_h4_bad_record_policies(tmp_path):
    root = _h4_folder(tmp_path, bad=True)
    good = [(0, U("What is 2+2?"), A("4"), A("5")), (1, U("Name a colour."), A("Red."), A("Seven."))]
    _check_policies(root, 2, "mismatch", "chosen", good, split="train_prefs")


# --- trl-lib/ultrafeedback_binarized and argilla/dpo-mix-7k ---------------------------------------

def test_trl_ultrafeedback(tmp_path):
    rows = [{"chosen": U("2+2?") + A("4"), "rejected": U("2+2?") + A("5"), "score_chosen": 9.0,
             "score_rejected": 2.0},
            {"chosen": U("hi") + A("hello"), "rejected": U("hey") + A("go"), "score_chosen": 7.0,
             "score_rejected": 1.0},                                   # no shared user turn: bad
            {"chosen": S("Be brief.") + U("sky?") + A("blue"), "rejected": S("Be brief.") + U("sky?") + A("red"),
             "score_chosen": 6.0, "score_rejected": 6.0}]
    path = _write(tmp_path / "data" / "train-00000-of-00001.parquet", rows)
    good = [(0, U("2+2?"), A("4"), A("5")), (2, S("Be brief.") + U("sky?"), A("blue"), A("red"))]
    _check_policies(path, 1, "mismatch", "rejected", good)
    got, report, prov = _read(path, on_bad_record="skip")
    assert report.schema == "trl-ultrafeedback"
    assert prov["chosen_score"].tolist() == [9.0, 6.0] and prov["rejected_score"].tolist() == [2.0, 6.0]


def test_dpo_mix(tmp_path):
    def row(q, good, bad, rc, rr):
        return {"dataset": "capybara", "chosen": U(q) + A(good), "rejected": U(q) + A(bad),
                "chosen_rating": rc, "rejected_rating": rr, "chosen_model": "m1", "rejected_model": "m2"}

    root = tmp_path / "dpo-mix-7k"
    _write(root / "data" / "train-00000-of-00001.parquet",
           [row("a?", "yes", "no", 5.0, 2.0), row("b?", "x", "y", 4.5, 1.0), row("c?", "p", "q", 3.0, 1.5)])
    _write(root / "data" / "test-00000-of-00001.parquet", [row("d?", "k", "l", 5.0, 1.0)])
    got, report, prov = _read(str(root))
    assert report.schema == "dpo-mix"
    assert got == [(0, U("a?"), A("yes"), A("no")), (1, U("b?"), A("x"), A("y")), (2, U("c?"), A("p"), A("q"))]
    assert prov["margin"].tolist() == [3.0, 3.5, 1.5]
    assert _read(str(root), split="test")[0] == [(0, U("d?"), A("k"), A("l"))]
    rows = [row("a?", "yes", "no", 5.0, 2.0), dict(row("b?", "x", "y", 4.5, 1.0), chosen_rating="high")]
    _check_policies(rows, 1, "wrong-type", "chosen_rating", [(0, U("a?"), A("yes"), A("no"))],
                    format="dpo-mix")


# --- Anthropic/hh-rlhf ------------------------------------------------------------------------------

HH_ONE = "\n\nHuman: How do I boil an egg?\n\nAssistant:"
HH_TWO = ("\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke."
          "\n\nAssistant:")


def _hh_folder(tmp_path, bad=False):
    root = tmp_path / "hh-rlhf"
    harmless = [{"chosen": HH_ONE + " Put it in boiling water for 9 minutes.",
                 "rejected": HH_ONE + " I don't know."},
                {"chosen": HH_TWO + " Why did the chicken cross the road?",
                 "rejected": (HH_TWO + " No." + "\n\nHuman: Please?\n\nAssistant: Fine.") if bad
                 else HH_TWO + " No."}]
    helpful = [{"chosen": "\n\nHuman: 2+2?\n\nAssistant: 4", "rejected": "\n\nHuman: 2+2?\n\nAssistant: 5"}]
    _write(root / "harmless-base" / "train.jsonl.gz", harmless)
    _write(root / "helpful-base" / "train.jsonl.gz", helpful)
    _write(root / "helpful-base" / "test.jsonl.gz", helpful[:1])
    return str(root)


def test_hh_rlhf_text_and_messages(tmp_path):
    root = _hh_folder(tmp_path)
    got, report, _ = _read(root)
    assert report.schema == "hh-rlhf" and report.format == "hh-rlhf: standard"
    assert report.source.endswith("[split train]")
    assert got == [(0, HH_ONE, " Put it in boiling water for 9 minutes.", " I don't know."),
                   (1, HH_TWO, " Why did the chicken cross the road?", " No."),
                   (2, "\n\nHuman: 2+2?\n\nAssistant:", " 4", " 5")]
    got, _, _ = _read(root, subset="harmless-base", transcript="messages")
    assert got == [(0, U("How do I boil an egg?"), A("Put it in boiling water for 9 minutes."),
                    A("I don't know.")),
                   (1, U("Hi there") + A("Hello! How can I help?") + U("Tell me a joke."),
                    A("Why did the chicken cross the road?"), A("No."))]
    assert _read(root, split="test")[0] == [(0, "\n\nHuman: 2+2?\n\nAssistant:", " 4", " 5")]
    with pytest.raises(DataError, match="no subset 'red-team'"):
        data.read_pairs(root, subset="red-team")


def test_hh_rlhf_bad_record_policies(tmp_path):
    root = _hh_folder(tmp_path, bad=True)       # rejected has an extra turn after chosen's prompt
    good = [(0, HH_ONE, " Put it in boiling water for 9 minutes.", " I don't know."),
            (2, "\n\nHuman: 2+2?\n\nAssistant:", " 4", " 5")]
    _check_policies(root, 1, "mismatch", "rejected", good)


# --- stanfordnlp/SHP ----------------------------------------------------------------------------------

def _shp_row(post, a, b, label, sa, sb):
    return {"post_id": "p", "domain": "askscience_train", "upvote_ratio": 0.9, "history": post,
            "c_root_id_A": "a", "c_root_id_B": "b", "created_at_utc_A": 1, "created_at_utc_B": 2,
            "score_A": sa, "score_B": sb, "human_ref_A": a, "human_ref_B": b, "labels": label,
            "seconds_difference": 1.0, "score_ratio": 2.0}


def test_shp(tmp_path):
    rows = [_shp_row("Why is the sky blue?", "Rayleigh scattering.", "Magic.", 1, 40, 3),
            _shp_row("Why do cats purr?", "Nobody knows.", "Vibrating larynx muscles.", 0, 2, 10),
            _shp_row("Is water wet?", "Yes.", "No.", 2, 5, 1)]
    path = tmp_path / "askscience" / "train.json"      # the repository's JSON-lines files
    _write(path, rows)
    good = [(0, U("Why is the sky blue?"), A("Rayleigh scattering."), A("Magic.")),
            (1, U("Why do cats purr?"), A("Vibrating larynx muscles."), A("Nobody knows."))]
    _check_policies(str(tmp_path), 2, "bad-value", "labels", good)
    got, report, prov = _read(str(tmp_path), on_bad_record="skip", subset="askscience")
    assert report.schema == "shp"
    assert prov["chosen_response"].tolist() == [0, 1] and prov["chosen_score"].tolist() == [40.0, 10.0]
    assert prov["rejected_score"].tolist() == [3.0, 2.0]


# --- PKU-Alignment/PKU-SafeRLHF ---------------------------------------------------------------------

def _pku_row(prompt, r0, r1, better, safer):
    return {"prompt": prompt, "response_0": r0, "response_1": r1, "prompt_source": "x",
            "response_0_source": "a", "response_1_source": "b", "is_response_0_safe": safer == 0,
            "is_response_1_safe": safer == 1, "better_response_id": better, "safer_response_id": safer}


def test_pku_saferlhf_better_and_safer(tmp_path):
    rows = [_pku_row("How to pick a lock?", "Use a tension wrench.", "I can't help.", 0, 1),
            _pku_row("Best pizza?", "Margherita.", "Pineapple.", 1, 1),
            _pku_row("Hi", "Hello", "Hey", 0, 0)]
    _write(tmp_path / "data" / "Alpaca-7B" / "train.jsonl", rows)
    _write(tmp_path / "data" / "Alpaca2-7B" / "train.jsonl", rows[:1])
    got, report, prov = _read(str(tmp_path), subset="Alpaca-7B")
    assert report.schema == "pku-saferlhf"
    assert got == [(0, U("How to pick a lock?"), A("Use a tension wrench."), A("I can't help.")),
                   (1, U("Best pizza?"), A("Pineapple."), A("Margherita.")), (2, U("Hi"), A("Hello"), A("Hey"))]
    assert prov["chosen_response"].tolist() == [0, 1, 0]
    got, _, _ = _read(str(tmp_path), subset="Alpaca-7B", aspect="safer")
    assert got[0] == (0, U("How to pick a lock?"), A("I can't help."), A("Use a tension wrench."))
    assert len(_read(str(tmp_path))[0]) == 4               # both subsets, in path order
    bad = rows + [dict(_pku_row("x", "a", "b", 0, 0), better_response_id=None)]
    good = [(i, *t[1:]) for i, t in enumerate(_read(str(tmp_path), subset="Alpaca-7B")[0])]
    _check_policies(bad, 3, "missing-field", "better_response_id", good)
    with pytest.raises(ConfigError, match=r"aspect of pku-saferlhf must be one of \('better', 'safer'\)"):
        data.read_pairs(rows, aspect="helpful")


# --- nvidia/HelpSteer2 preference -------------------------------------------------------------------

def _hs_row(prompt, r1, r2, strength):
    return {"split": "train", "prompt": prompt, "response_1": r1, "response_2": r2,
            "preference_strength": strength, "preference_statement": "@Response 2 is better.",
            "preference_elaboration": "", "three_most_similar_preferences": [],
            "all_preferences_unprocessed": []}


def test_helpsteer2_preference(tmp_path):
    rows = [_hs_row("c#", "A language.", "C# is a language by Microsoft.", 3),
            _hs_row("Hi <extra_id_1>Assistant\nHello! <extra_id_1>User\nTell me a joke.", "A joke.", "No.", -2),
            _hs_row("Same?", "x", "y", 0),                         # a tie: no pair
            _hs_row("Bad", "x", "y", 5)]
    path = _write(tmp_path / "preference" / "preference.jsonl.gz", rows)
    good = [(0, U("c#"), A("C# is a language by Microsoft."), A("A language.")),
            (1, U("Hi") + A("Hello!") + U("Tell me a joke."), A("A joke."), A("No."))]
    _check_policies(path, 3, "bad-value", "preference_strength", good)
    got, report, prov = _read(path, on_bad_record="skip")
    assert report.schema == "helpsteer2-preference" and report.no_pair == (2,)
    assert prov["chosen_response"].tolist() == [2, 1] and prov["margin"].tolist() == [3.0, 2.0]
    got, _, _ = _read(path, on_bad_record="skip", margin=3.0)
    assert got == good[:1]


# --- openbmb/UltraFeedback (raw) ----------------------------------------------------------------------

def _completion(text, overall, ratings, model="m"):
    aspects = ("helpfulness", "honesty", "instruction_following", "truthfulness")
    notes = {a: {"Rating": str(r), "Rationale": "..."} for a, r in zip(aspects, ratings)}
    fine = np.mean([r for r in ratings if r != "N/A"])
    return {"annotations": notes, "critique": "...", "custom_system_prompt": "", "fine-grained_score": fine,
            "model": model, "overall_score": overall, "principle": "helpfulness", "response": text}


UF = [{"source": "evol_instruct", "instruction": "Add 2 and 2.", "models": ["a", "b", "c", "d"],
       "completions": [_completion("4", 9.0, [5, 5, 5, 5]), _completion("5", 2.0, [1, 2, 1, 1]),
                       _completion("four", 7.5, [4, 5, 5, "N/A"]), _completion("22", 2.0, [2, 2, 3, 2])],
       "correct_answers": ["4"], "incorrect_answers": ["5"]},
      {"source": "flan", "instruction": "Name a fruit.", "models": ["a", "b"],
       "completions": [_completion("Car.", 1.0, [1, 1, 1, 1]), _completion("Apple.", 8.0, [5, 5, 5, 5])],
       "correct_answers": [], "incorrect_answers": []}]


def test_ultrafeedback_pair_rules(tmp_path):
    path = _write(tmp_path / "ultrafeedback.jsonl", UF)
    q0, q1 = U("Add 2 and 2."), U("Name a fruit.")
    got, report, prov = _read(path)
    assert report.schema == "ultrafeedback" and report.pairing == "aspect overall, best-vs-worst"
    assert got == [(0, q0, A("4"), A("5")), (1, q1, A("Apple."), A("Car."))]   # 5 and 22 tie: first
    assert prov["source_index"].tolist() == [0, 1] and prov["rejected_response"].tolist() == [1, 0]
    got, report, prov = _read(path, pairing="best-vs-each")
    assert got == [(0, q0, A("4"), A("5")), (1, q0, A("4"), A("four")), (2, q0, A("4"), A("22")),
                   (3, q1, A("Apple."), A("Car."))]
    assert report.records == 2 and report.read == 4
    assert prov["source_index"].tolist() == [0, 0, 0, 1]
    assert prov["chosen_score"].tolist() == [9.0, 9.0, 9.0, 8.0]
    assert prov["rejected_score"].tolist() == [2.0, 7.5, 2.0, 1.0]
    got, _, prov = _read(path, pairing="all-pairs", margin=5.5)
    assert got == [(0, q0, A("4"), A("5")), (1, q0, A("4"), A("22")), (2, q0, A("four"), A("5")),
                   (3, q0, A("four"), A("22")), (4, q1, A("Apple."), A("Car."))]
    # helpfulness ratings: 5, 1, 4, 2 -> best "4", worst "5"; honesty ratings 5, 2, 5, 2
    got, _, _ = _read(path, aspect="honesty", pairing="all-pairs")
    assert [(t[2], t[3]) for t in got[:4]] == [(A("4"), A("5")), (A("4"), A("22")), (A("four"), A("5")),
                                               (A("four"), A("22"))]
    # truthfulness of "four" is N/A: it is never paired
    got, _, _ = _read(path, aspect="truthfulness", pairing="all-pairs")
    assert all(A("four") not in (t[2], t[3]) for t in got)
    got, _, prov = _read(path, aspect="mean-rating", pairing="best-vs-worst")
    assert got[0][2:] == (A("4"), A("5")) and prov["chosen_score"][0] == 5.0
    assert prov["rejected_score"][0] == pytest.approx(5 / 4)   # (1+2+1+1)/4


def test_ultrafeedback_random_pairs_and_bad_records(tmp_path):
    every0 = [(0, 1), (0, 2), (0, 3), (2, 1), (2, 3)]             # overall: 9, 2, 7.5, 2
    got, _, prov = _read(UF, pairing="random-pairs", pairs_per_prompt=2, seed=11)
    picked = sorted(np.random.default_rng([11, 1, 0]).choice(len(every0), size=2, replace=False))
    expected0 = [every0[p] for p in picked]
    assert list(zip(prov["chosen_response"][:2], prov["rejected_response"][:2])) == expected0
    assert prov["source_index"].tolist() == [0, 0, 1]          # record 1 has only one pair
    bad = [UF[0], {"instruction": "x", "completions": [{"overall_score": 1.0}]}, UF[1]]
    q0, q1 = U("Add 2 and 2."), U("Name a fruit.")
    good = [(0, q0, A("4"), A("5")), (2, q1, A("Apple."), A("Car."))]   # the bad record is pair 1
    _check_policies(bad, 1, "missing-field", "completions[0].response", good)
    with pytest.raises(DataError, match=r"\(source record 1\)"):
        data.read_pairs(bad)


# --- berkeley-nest/Nectar ---------------------------------------------------------------------------

def _answers(*pairs):
    return [{"answer": a, "model": "gpt-4", "rank": r} for a, r in pairs]


NECTAR = [{"prompt": "\n\nHuman: Name a primary colour.\n\nAssistant: ",
           "answers": _answers(("Red.", 1.0), ("Blue.", 2.0), ("Seven.", 3.0)),
           "turns": 1, "num_responses": 3, "source": ["sharegpt"], "good_natured": True},
          {"prompt": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: 2+2?\n\nAssistant: ",
           "answers": _answers(("5", 3.0), ("4", 1.0)), "turns": 2, "num_responses": 2,
           "source": ["lmsys"], "good_natured": True}]


def test_nectar(tmp_path):
    path = _write(tmp_path / "data" / "rlaif.parquet", NECTAR)
    got, report, prov = _read(str(tmp_path))                   # one file: split 'rlaif', the only one
    p0 = "\n\nHuman: Name a primary colour.\n\nAssistant:"
    p1 = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: 2+2?\n\nAssistant:"
    assert report.schema == "nectar"
    assert got == [(0, p0, " Red.", " Seven."), (1, p1, " 4", " 5")]
    assert prov["chosen_score"].tolist() == [-1.0, -1.0] and prov["rejected_score"].tolist() == [-3.0, -3.0]
    got, _, prov = _read(path, transcript="messages", pairing="best-vs-each")
    assert got == [(0, U("Name a primary colour."), A("Red."), A("Blue.")),
                   (1, U("Name a primary colour."), A("Red."), A("Seven.")),
                   (2, U("Hi") + A("Hello!") + U("2+2?"), A("4"), A("5"))]
    bad = [NECTAR[0], {**NECTAR[1], "answers": [{"answer": "4", "model": "m"}]}]
    _check_policies(bad, 1, "missing-field", "answers[0].rank", [(0, p0, " Red.", " Seven.")])


# --- Intel/orca_dpo_pairs and argilla/distilabel-intel-orca-dpo-pairs ------------------------------

def test_orca_dpo_pairs(tmp_path):
    rows = [{"system": "You are a helpful assistant.", "question": "2+2?", "chosen": "4", "rejected": "5"},
            {"system": "", "question": "Say hi.", "chosen": "Hi!", "rejected": "No."},
            {"system": "", "chosen": "a", "rejected": "b"}]
    path = _write(tmp_path / "orca_rlhf.jsonl", rows)
    good = [(0, S("You are a helpful assistant.") + U("2+2?"), A("4"), A("5")),
            (1, U("Say hi."), A("Hi!"), A("No."))]
    _check_policies(path, 2, "missing-field", "question", good)
    assert _read(path, on_bad_record="skip")[1].schema == "orca-dpo"


def test_distilabel_orca(tmp_path):
    def row(q, c, r, status, rating):
        return {"system": "", "input": q, "chosen": c, "rejected": r, "generations": [c, r], "order": [],
                "labelling_model": "gpt-4", "labelling_prompt": [], "raw_labelling_response": "",
                "rating": rating, "rationale": "", "status": status, "original_chosen": c,
                "original_rejected": r, "chosen_score": max(rating), "in_gsm8k_train": False}

    rows = [row("2+2?", "4", "5", "unchanged", [9.0, 2.0]), row("hi", "a", "b", "tie", [5.0, 5.0]),
            row("sky?", "blue", "green", "swapped", [3.0, 8.0])]
    path = _write(tmp_path / "data" / "train-00000-of-00001.parquet", rows)
    got, report, prov = _read(path)
    assert report.schema == "distilabel-orca" and report.no_pair == (1,)
    assert got == [(0, U("2+2?"), A("4"), A("5")), (2, U("sky?"), A("blue"), A("green"))]
    assert prov["chosen_score"].tolist() == [9.0, 8.0] and prov["rejected_score"].tolist() == [2.0, 3.0]


# --- choosing the reader, selection, tokenized provenance, CLI, config ------------------------------

def test_format_override_and_option_errors():
    rows = [{"prompt": "Q\n", "chosen": "a", "rejected": "b"}]
    assert data.read_pairs(rows)[1].schema == "trl"
    assert "no built-in schema matches" in data.read_pairs(rows)[1].detected
    with pytest.raises(DataError, match="record 0, field 'history': missing field"):
        data.read_pairs(rows, format="shp")
    with pytest.raises(ConfigError, match="unknown format 'nope'"):
        data.read_pairs(rows, format="nope")
    with pytest.raises(ConfigError, match="pairing, margin and pairs_per_prompt apply to the ranked"):
        data.read_pairs(rows, pairing="all-pairs")
    with pytest.raises(ConfigError, match="transcript applies to the formats hh-rlhf, nectar"):
        data.read_pairs(rows, transcript="messages")
    with pytest.raises(ConfigError, match="pairs_per_prompt applies to pairing='random-pairs'"):
        data.read_pairs(UF, pairs_per_prompt=2)
    with pytest.raises(ConfigError, match="limit or sample, not both"):
        data.read_pairs(rows, limit=1, sample=1)


def test_limit_and_seeded_sample():
    rows = [{"prompt": f"Q{i}\n", "chosen": "a", "rejected": "b"} for i in range(6)]
    pairs, report = data.read_pairs(rows, limit=2)
    assert [p.index for p in pairs] == [0, 1] and report.unselected == 4
    pairs, report = data.read_pairs(rows, sample=3, seed=548)
    expected = sorted(np.random.default_rng(548).choice(6, size=3, replace=False).tolist())
    assert [p.index for p in pairs] == expected and (report.read, report.kept) == (6, 3)
    with pytest.raises(DataError, match="sample=7 but only 6 valid pairs"):
        data.read_pairs(rows, sample=7)


def test_load_pairs_carries_provenance(tmp_path, tiny_tokenizer):
    ds = data.load_pairs(UF, tiny_tokenizer, pairing="best-vs-each", sample=2, seed=1, cache=False)
    chosen = sorted(np.random.default_rng(1).choice(4, size=2, replace=False).tolist())
    assert ds.tokens.index.tolist() == chosen
    source_of_pair = [0, 0, 0, 1]                                  # best-vs-each above, by hand
    table = ds.provenance_table()
    assert table.column_names == list(schemas.PROVENANCE_COLUMNS)
    assert table["index"].to_pylist() == chosen
    assert table["source_index"].to_pylist() == [source_of_pair[i] for i in chosen]


def test_cli_list_and_inspect(tmp_path, capsys):
    assert cli.main(["data", "list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in schemas.FORMATS)
    root = _h4_folder(tmp_path)
    assert cli.main(["data", "inspect", "--data", root, "--split", "test_prefs"]) == 0
    out = capsys.readouterr().out
    assert "format: ultrafeedback-binarized: conversational" in out
    assert "why: record 0 has the columns prompt, chosen, rejected" in out
    path = _write(tmp_path / "uf.jsonl", UF)
    assert cli.main(["data", "inspect", "--data", path, "--pairing", "all-pairs", "--margin", "5",
                     "--aspect", "overall"]) == 0
    assert "pairs by: aspect overall, all-pairs, margin >= 5" in capsys.readouterr().out
    assert cli.main(["data", "inspect", "--data", path, "--format", "shp"]) == 2


def test_train_config_data_format():
    from jaxalign.train.config import from_dict

    cfg = from_dict({"model": {"path": "m"}, "data": {"train": "x.parquet", "format": "ultrafeedback"}})
    assert cfg.data.format == "ultrafeedback"
