"""Joint tokenization (the sequence convention), chat templates, BOS/EOS handling, length limits and the
on-disk cache, checked against ids computed by hand from the tiny tokenizer's known vocabulary
(tests/tiny_tokenizer.py: byte b has id 5 + b; merges he=261, ll=262, hell=263, hello=264; <|im_start|>=1,
<|im_end|>=2 (EOS), <pad>=3, <s>=4 (BOS))."""

import os
import sys
import warnings

import numpy as np
import pytest

from jaxalign import data
from jaxalign.data import tokenize as tokenize_module
from jaxalign.errors import ConfigError, DataError

sys.path.insert(0, os.path.dirname(__file__))
from tiny_tokenizer import (CHATML_WITH_BOS_TEMPLATE, byte_ids, make_tiny_tokenizer,  # noqa: E402
                            tiny_tokenizer, tiny_tokenizer_dir)  # noqa: F401

IM_START, EOS, PAD, BOS, HE, HELLO = 1, 2, 3, 4, 261, 264
# "Q: hi\n" is the bytes 81 58 32 104 105 10, i.e. ids 86 63 37 109 110 15 (no merge applies).
Q_HI = [86, 63, 37, 109, 110, 15]
PAIR = {"prompt": "Q: hi\n", "chosen": "hello", "rejected": "no"}


def _load(records, tok, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", data.DataWarning)
        return data.load_pairs(records, tok, cache=False, **options)


def _ids(ds, i=0):
    t = ds.tokens
    return t.prompt[i].tolist(), t.chosen[i].tolist(), t.rejected[i].tolist()


def _auto(folder):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def test_hand_computed_plain_text(tiny_tokenizer):
    ds = _load([PAIR], tiny_tokenizer)
    # BOS + prompt bytes; "hello" is one merged token; "no" is two byte tokens; EOS appended.
    assert _ids(ds) == ([BOS] + Q_HI, [HELLO, EOS], [115, 116, EOS])
    assert Q_HI == byte_ids("Q: hi\n")
    assert (ds.eos_id, ds.pad_id) == (EOS, PAD)
    assert ds.report.prompt_mismatch == 0 and ds.tokens.index.tolist() == [0]


def test_split_that_changes_the_prompt_tokens_is_counted(tiny_tokenizer):
    # tok("hel") = <s> he l; tok("hello") = <s> hello: the response keeps full[3:] = [] then EOS.
    # tok("help") = <s> he l p: the prompt tokens survive for the rejected sequence.
    with pytest.warns(data.DataWarning, match="1 with prompt tokens changed"):
        ds = data.load_pairs([{"prompt": "hel", "chosen": "lo", "rejected": "p"}, PAIR],
                             tiny_tokenizer, cache=False)
    assert _ids(ds, 0) == ([BOS, HE, 5 + ord("l")], [EOS], [5 + ord("p"), EOS])
    assert ds.report.prompt_mismatch == 1


def test_eos_is_not_appended_twice(tiny_tokenizer):
    ds = _load([{"prompt": "Q: hi\n", "chosen": "hello<|im_end|>", "rejected": "no"}], tiny_tokenizer)
    assert _ids(ds)[1] == [HELLO, EOS]


def test_tokenizer_that_appends_eos_itself(tmp_path):
    tok = _auto(make_tiny_tokenizer(tmp_path, add_eos=True))
    assert tok("hi")["input_ids"] == [BOS, 109, 110, EOS]
    assert _ids(_load([PAIR], tok)) == ([BOS] + Q_HI, [HELLO, EOS], [115, 116, EOS])


def test_tokenizer_without_bos_or_pad(tmp_path):
    tok = _auto(make_tiny_tokenizer(tmp_path, add_bos=False, pad_token=None))
    ds = _load([PAIR], tok)
    assert _ids(ds) == (Q_HI, [HELLO, EOS], [115, 116, EOS])
    assert ds.pad_id == EOS  # falls back to the EOS


CHAT = {"prompt": [{"role": "user", "content": "hi"}],
        "chosen": [{"role": "assistant", "content": "hello"}],
        "rejected": [{"role": "assistant", "content": "no"}]}
# "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
CHAT_PROMPT = [IM_START] + byte_ids("user\nhi") + [EOS] + byte_ids("\n") + [IM_START] + byte_ids(
    "assistant\n")


def test_chat_template_rendering(tiny_tokenizer):
    ds = _load([CHAT], tiny_tokenizer)
    # no BOS (the template has none and rendered text gets no special tokens); ChatML's "\n" after the
    # final <|im_end|> is dropped and the EOS (= <|im_end|>) is not appended a second time.
    assert _ids(ds) == (CHAT_PROMPT, [HELLO, EOS], [115, 116, EOS])
    assert ds.report.format == "conversational"


def test_chat_template_with_bos_gets_one_bos(tmp_path):
    tok = _auto(make_tiny_tokenizer(tmp_path, chat_template=CHATML_WITH_BOS_TEMPLATE))
    prompt, chosen, _ = _ids(_load([CHAT], tok))
    assert prompt == [BOS] + CHAT_PROMPT and chosen == [HELLO, EOS]


def test_chat_option_wraps_standard_pairs(tiny_tokenizer):
    plain = [{"prompt": "hi\n", "chosen": " hello", "rejected": " no "}]
    assert _ids(_load(plain, tiny_tokenizer, chat=True)) == _ids(_load([CHAT], tiny_tokenizer))


def test_multi_turn_prompt_with_system(tiny_tokenizer):
    record = {"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"},
                         {"role": "assistant", "content": "yo"}, {"role": "user", "content": "hi"}],
              "chosen": CHAT["chosen"], "rejected": CHAT["rejected"]}
    expected = ([IM_START] + byte_ids("system\nS") + [EOS] + byte_ids("\n") + [IM_START]
                + byte_ids("user\nhi") + [EOS] + byte_ids("\n") + [IM_START] + byte_ids("assistant\nyo")
                + [EOS] + byte_ids("\n") + CHAT_PROMPT)
    assert _ids(_load([record], tiny_tokenizer)) == (expected, [HELLO, EOS], [115, 116, EOS])


STRICT_TEMPLATE = ("{% if messages[0]['role'] != 'user' %}{{ raise_exception('the first message must "
                   "be the user') }}{% endif %}{% for m in messages %}{{ m['content'] + '\n' }}"
                   "{% endfor %}")


def test_chat_template_failure_is_a_bad_record(tmp_path):
    tok = _auto(make_tiny_tokenizer(tmp_path, chat_template=STRICT_TEMPLATE))
    bad = dict(CHAT, prompt=[{"role": "system", "content": "x"}])
    with pytest.raises(DataError, match=r"record 1: the chat template failed: the first message must"):
        data.load_pairs([CHAT, bad], tok, cache=False)
    with pytest.warns(data.DataWarning, match="chat-template 1"):
        ds = data.load_pairs([CHAT, bad], tok, cache=False, on_bad_record="skip")
    assert ds.tokens.index.tolist() == [0]
    assert [(p.index, p.kind) for p in ds.report.skipped] == [(1, "chat-template")]


def test_missing_chat_template_or_eos(tmp_path):
    tok = _auto(make_tiny_tokenizer(tmp_path / "a", chat_template=None))
    with pytest.raises(ConfigError, match="chat template"):
        data.load_pairs([CHAT], tok, cache=False)
    with pytest.raises(ConfigError, match="chat template"):
        data.load_pairs([PAIR], tok, cache=False, chat=True)
    tok = _auto(make_tiny_tokenizer(tmp_path / "b"))
    tok.eos_token = None
    with pytest.raises(ConfigError, match="no EOS"):
        data.load_pairs([PAIR], tok, cache=False)


RECORDS = [PAIR,
           {"prompt": "hel", "chosen": "lo world", "rejected": "p me"},
           {"prompt": "Ünïcödé ✓ 日本", "chosen": " hello hello", "rejected": "\nhe"},
           {"prompt": "say he", "chosen": "llo", "rejected": "y"},
           {"prompt": "a\n\n", "chosen": "  spaced  ", "rejected": "\ttab"}]


def _reference(tok, prompt, response):
    """The sequence convention, one record at a time, written out plainly."""
    p = tok(prompt)["input_ids"]
    full = tok(prompt + response)["input_ids"]
    return p, full[len(p):] + [tok.eos_token_id]


def test_batched_equals_one_record_at_a_time(tiny_tokenizer, monkeypatch):
    monkeypatch.setattr(tokenize_module, "_CHUNK", 2)  # several batched calls
    ds = _load(RECORDS, tiny_tokenizer)
    for i, r in enumerate(RECORDS):
        p, c = _reference(tiny_tokenizer, r["prompt"], r["chosen"])
        _, rj = _reference(tiny_tokenizer, r["prompt"], r["rejected"])
        assert _ids(ds, i) == (p, c, rj)


def test_max_prompt_length(tiny_tokenizer):
    full = [BOS] + Q_HI
    for mode, expected in (("keep_end", full[-3:]), ("keep_start", full[:3])):
        ds = _load([PAIR], tiny_tokenizer, max_prompt_length=3, truncation_mode=mode)
        assert _ids(ds) == (expected, [HELLO, EOS], [115, 116, EOS])
        assert ds.report.truncated == 1


def test_max_length_cuts_responses(tiny_tokenizer):
    # P = 7, max_length 9 leaves 2 tokens: chosen (2) fits, rejected (3) loses its EOS.
    ds = _load([PAIR], tiny_tokenizer, max_length=9)
    assert _ids(ds) == ([BOS] + Q_HI, [HELLO, EOS], [115, 116])
    assert ds.report.truncated == 1
    ds = _load([PAIR], tiny_tokenizer, max_length=5, max_prompt_length=3)
    assert _ids(ds) == ([109, 110, 15], [HELLO, EOS], [115, 116])
    ds = _load([PAIR], tiny_tokenizer, max_length=10)
    assert ds.report.truncated == 0


def test_overlong_drop_and_error(tiny_tokenizer):
    short = {"prompt": "a", "chosen": "b", "rejected": "c"}
    with pytest.warns(data.DataWarning, match=r"skipped 1 \(over-long 1\)"):
        ds = data.load_pairs([PAIR, short], tiny_tokenizer, cache=False, max_length=9,
                             overlong="drop")
    assert ds.tokens.index.tolist() == [1]
    assert [(p.index, p.kind) for p in ds.report.skipped] == [(0, "over-long")]
    with pytest.raises(DataError, match="record 0: over-long: prompt"):
        data.load_pairs([PAIR, short], tiny_tokenizer, cache=False, max_length=9, overlong="error")


def test_prompt_that_leaves_no_room_is_a_bad_record(tiny_tokenizer):
    short = {"prompt": "a", "chosen": "b", "rejected": "c"}
    with pytest.raises(DataError, match="leaves no room"):
        data.load_pairs([PAIR, short], tiny_tokenizer, cache=False, max_length=7)
    with pytest.warns(data.DataWarning):
        ds = data.load_pairs([PAIR, short], tiny_tokenizer, cache=False, max_length=7,
                             on_bad_record="skip")
    assert ds.tokens.index.tolist() == [1]
    assert ds.report.read == ds.report.kept + len(ds.report.skipped) == 2


def test_identical_pairs_survive_tokenization(tiny_tokenizer):
    with pytest.warns(data.DataWarning, match="chosen == rejected"):
        ds = data.load_pairs([{"prompt": "p", "chosen": "x", "rejected": "x"}], tiny_tokenizer,
                             cache=False)
    assert ds.report.identical == (0,) and len(ds) == 1


# --- cache --------------------------------------------------------------------------------------------

def test_cache_hit_skips_tokenization(tiny_tokenizer, tmp_path, monkeypatch):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(['{"prompt": "Q: hi\\n", "chosen": "hello", "rejected": "no"}',
                               '{"prompt": "x"}', '{"prompt": "p", "chosen": "c", "rejected": "r"}']))
    cache_dir = str(tmp_path / "cache")
    options = dict(cache_dir=cache_dir, on_bad_record="skip", max_length=9)
    with pytest.warns(data.DataWarning):
        first = data.load_pairs(str(path), tiny_tokenizer, **options)
    assert os.path.exists(first.cache_file) and first.cache_file.startswith(cache_dir)
    with np.load(first.cache_file, allow_pickle=False) as stored:  # plain arrays, no pickle
        assert {"index", "prompt_ids", "prompt_offsets", "__meta__"} <= set(stored.files)

    def refuse(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr("jaxalign.data.load.tokenize_pairs", refuse)
    with pytest.warns(data.DataWarning):
        second = data.load_pairs(str(path), tiny_tokenizer, **options)
    assert second.cache_file == first.cache_file and second.report == first.report
    for name in ("prompt", "chosen", "rejected"):
        a, b = getattr(first.tokens, name), getattr(second.tokens, name)
        np.testing.assert_array_equal(a.values, b.values)
        np.testing.assert_array_equal(a.offsets, b.offsets)
    assert first.report.truncated == 1 and first.report.read == 3 and first.report.kept == 2


def test_cache_key_changes_with_data_settings_and_tokenizer(tiny_tokenizer, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    cache_dir = str(tmp_path / "cache")
    base = data.load_pairs(str(path), tiny_tokenizer, cache_dir=cache_dir).cache_file
    assert data.load_pairs(str(path), tiny_tokenizer, cache_dir=cache_dir).cache_file == base
    other_setting = data.load_pairs(str(path), tiny_tokenizer, cache_dir=cache_dir, max_length=50)
    other_tok = _auto(make_tiny_tokenizer(tmp_path / "tok", chat_template=CHATML_WITH_BOS_TEMPLATE))
    other_tokenizer = data.load_pairs(str(path), other_tok, cache_dir=cache_dir)
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "d"}\n')
    other_data = data.load_pairs(str(path), tiny_tokenizer, cache_dir=cache_dir)
    files = {base, other_setting.cache_file, other_tokenizer.cache_file, other_data.cache_file}
    assert len(files) == 4
    assert _ids(other_data)[2] == [5 + ord("d"), EOS]


def test_default_cache_dir_from_environment(tiny_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("JAXALIGN_CACHE", str(tmp_path / "root"))
    ds = data.load_pairs([PAIR], tiny_tokenizer)
    assert os.path.dirname(ds.cache_file) == str(tmp_path / "root" / "tokenized")


def test_corrupt_cache_entry_is_rebuilt(tiny_tokenizer, tmp_path):
    first = data.load_pairs([PAIR], tiny_tokenizer, cache_dir=str(tmp_path))
    with open(first.cache_file, "wb") as f:
        f.write(b"not a zip")
    again = data.load_pairs([PAIR], tiny_tokenizer, cache_dir=str(tmp_path))
    assert _ids(again) == _ids(first)
