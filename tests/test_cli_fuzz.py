"""Every subcommand with generated bad arguments and bad files (issue 21, item 4).

Each case runs ``jaxalign.cli.main`` in-process and must end with exit status 2, one message line on
stderr, no traceback, and no output left behind. The model is a tiny random Llama (built once), so a case
that gets as far as loading a model costs milliseconds. Argument errors that ``argparse`` itself reports
(a non-number, an unknown choice) print the usage block and then one ``error:`` line; for those the
usage block is allowed and the one-line rule applies to the error lines.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))

from jaxalign.cli import main  # noqa: E402

_FUZZ = settings(max_examples=8, deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny model folder (weights + tokenizer), a good pairs file, a bad one, and a missing path."""
    from hf_tiny import make_tiny
    from tiny_tokenizer import make_tiny_tokenizer

    root = tmp_path_factory.mktemp("fuzz")
    make_tiny("llama", root / "model", seed=3, vocab_size=272)
    make_tiny_tokenizer(root / "model")
    good = root / "pairs.jsonl"
    good.write_text("".join(json.dumps({"prompt": f"p{i}", "chosen": " a", "rejected": " b"}) + "\n"
                            for i in range(3)))
    bad = root / "bad.jsonl"
    bad.write_text('{"prompt": "p", "chosen": \n not json at all\n')
    config = root / "list.yaml"
    config.write_text("- 1\n- 2\n")
    return {"model": str(root / "model"), "good": str(good), "bad": str(bad), "missing": str(root / "nope"),
            "list_yaml": str(config), "root": root}


def _run(argv, capsys):
    """``(status, stderr)`` of ``main(argv)``; ``argparse`` errors raise ``SystemExit``."""
    try:
        status = main(argv)
    except SystemExit as stop:
        status = stop.code
    return status, capsys.readouterr().err


def _check_clean_failure(argv, capsys, out: Path | None):
    status, err = _run(argv, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, (argv, err)
    assert status == 2, (argv, status, err)
    if lines and lines[0].startswith("usage:"):  # argparse's own report: usage block, then the error
        lines = [line for line in lines if "error:" in line]
    assert len(lines) == 1 and "error:" in lines[0], (argv, err)
    if out is not None:  # nothing at all (skipped.jsonl is written only once the inputs passed every check)
        left = sorted(p.name for p in out.iterdir()) if out.exists() else []
        assert left == [], (argv, left)


# --- the generated bad values --------------------------------------------------------------------------

_not_positive = st.integers(max_value=0).map(str)
_negative = st.integers(max_value=-1).map(str)
_not_number = st.sampled_from(["abc", "1.5.2", "", "nan?", "--", "1e"])
_unknown_choice = st.text(alphabet="xyzq_", min_size=1, max_size=6)


def _job_args(f, command: str, out: str) -> list[str]:
    """A job's arguments with good files; the case adds one bad thing."""
    m, d = f["model"], f["good"]
    return {"ches": ["--model", m, "--data", d, "--out", out],
            "entangle": ["--model", m, "--data", d, "--out", out],
            "displacement": ["--before", m, "--after", m, "--data", d, "--out", out],
            "probe": ["--checkpoints", m, m, "--data", d, "--out", out],
            "select": ["--model", m, "--data", d, "--out", out + ".jsonl", "--subset", "easy"],
            "sample": [m, "--data", d, "--out", out + ".jsonl"],
            "filter": ["--data", d, "--scores", f["missing"], "--out", out + ".jsonl", "--drop-top", "0.1"]}[command]


_COUNTS = {"ches": ["--batch-size", "--limit", "--max-length"],
           "entangle": ["--batch-size", "--limit", "--chunk-size", "--sketch-dim", "--last-blocks", "--max-length"],
           "displacement": ["--batch-size", "--limit", "--top-k", "--max-length"],
           "probe": ["--batch-size", "--limit", "--every", "--chunk-size", "--last-blocks"],
           "select": ["--batch-size", "--max-length"],
           "sample": ["--samples-per-prompt", "--batch-size", "--limit", "--max-new-tokens", "--max-prompt-length"]}
_CHOICES = {"ches": ["--on-bad-record"], "entangle": ["--method", "--sketch-kind", "--on-bad-record"],
            "displacement": ["--on-bad-record"], "probe": ["--method", "--on-bad-record"],
            "select": ["--subset", "--method", "--on-bad-record"], "sample": ["--ties", "--on-bad-record"]}


@pytest.mark.parametrize("command", sorted(_COUNTS))
@_FUZZ
@given(data=st.data())
def test_job_bad_counts(files, capsys, command, data):
    flag = data.draw(st.sampled_from(_COUNTS[command]))
    value = data.draw(_not_positive)
    out = files["root"] / f"out_{command}"
    _check_clean_failure([command] + _job_args(files, command, str(out)) + [flag, value, "--no-progress"],
                         capsys, out)


@pytest.mark.parametrize("command", sorted(_COUNTS))
@_FUZZ
@given(data=st.data())
def test_job_not_numbers_and_unknown_choices(files, capsys, command, data):
    if data.draw(st.booleans()):
        argv = [data.draw(st.sampled_from(_COUNTS[command])), data.draw(_not_number)]
    else:
        argv = [data.draw(st.sampled_from(_CHOICES[command])), data.draw(_unknown_choice)]
    out = files["root"] / f"out_{command}"
    _check_clean_failure([command] + _job_args(files, command, str(out)) + argv + ["--no-progress"], capsys, out)


@pytest.mark.parametrize("command", sorted(_COUNTS) + ["filter"])
@pytest.mark.parametrize("which", ["missing", "bad"])
@pytest.mark.parametrize("slot", ["data", "model"])
def test_job_missing_or_bad_files(files, capsys, command, which, slot):
    out = files["root"] / f"files_{command}"
    argv = _job_args(files, command, str(out))
    target = files["good"] if slot == "data" or command == "filter" else files["model"]
    argv = [files[which] if a == target else a for a in argv]
    if command == "filter" and slot == "model":  # filter has no model: a bad scores file instead
        argv = [files[which] if a == files["missing"] else a for a in argv]
    progress = [] if command == "filter" else ["--no-progress"]
    _check_clean_failure([command] + argv + progress, capsys, out)


_OTHER = ["train_missing", "train_list", "train_override", "online_missing", "online_list", "plot_missing",
          "plot_top", "demo_pairs", "demo_model", "plan_missing", "losses_beta", "inspect_missing", "inspect_bad",
          "inspect_choice"]


@pytest.mark.parametrize("case", _OTHER)
@settings(_FUZZ, max_examples=3)
@given(number=_not_positive)
def test_other_commands(files, capsys, case, number):
    out = files["root"] / "other_out"
    argv = {
        "train_missing": ["train", files["missing"] + ".yaml", "--no-progress"],
        "train_list": ["train", files["list_yaml"], "a.b=1", "--no-progress"],
        "train_override": ["train", "configs/cpu_small.yaml", f"train.steps={number}", f"output_dir={out}",
                           "--no-progress"],
        "online_missing": ["online", files["missing"] + ".yaml", "--no-progress"],
        "online_list": ["online", files["list_yaml"], "--no-progress"],
        "plot_missing": ["plot", files["missing"], "--out", str(out)],
        "plot_top": ["plot", str(files["root"]), "--top", number, "--out", str(out)],
        "demo_pairs": ["demo", "--pairs", number, "--out", str(out), "--no-progress"],
        "demo_model": ["demo", "--model", files["missing"], "--data", files["good"], "--out", str(out), "--quick",
                       "--no-progress"],
        "plan_missing": ["plan", files["missing"], "--job", "ches", "--cpu-devices", "1"],
        "losses_beta": ["losses", "--table", "--beta", "abc"],
        "inspect_missing": ["data", "inspect", "--data", files["missing"]],
        "inspect_bad": ["data", "inspect", "--data", files["bad"]],
        "inspect_choice": ["data", "inspect", "--data", files["good"], "--overlong", "sometimes"],
    }[case]
    _check_clean_failure(argv, capsys, out)


# --- bad values that pass the parser and the settings checks, found only with the model or the data -----

_DEEP = {
    "ches_layer": (["ches", "--layer", "{big}"], "ches"),
    "ches_all_skipped": (["ches", "--on-bad-record", "skip", "--data", "{bad}"], "ches"),
    "entangle_params_none_match": (["entangle", "--params", "no_such_parameter"], "entangle"),
    "entangle_params_bad_regex": (["entangle", "--params", "attn[("], "entangle"),
    "entangle_loss": (["entangle", "--loss", "no_such_loss"], "entangle"),
    "entangle_loss_option_name": (["entangle", "--loss-option", "no_such_option=1"], "entangle"),
    "entangle_loss_option_type": (["entangle", "--loss", "simpo", "--loss-option", "simpo_gamma=abc"], "entangle"),
    "entangle_last_blocks": (["entangle", "--last-blocks", "{big}"], "entangle"),
    "entangle_heatmap": (["entangle", "--heatmap", "{big}"], "entangle"),
    "probe_what": (["probe", "--what", "logps,bogus"], "probe"),
    "select_fraction": (["select", "--fraction", "-{big}"], "select"),
    "sample_judge": (["sample", "--judge", "bogus{big}"], "sample"),
    "sample_python_judge": (["sample", "--judge", "python:no_such_module_{big}:f"], "sample"),
    "sample_top_p": (["sample", "--top-p", "{big}"], "sample"),
    "sample_all_skipped": (["sample", "--on-bad-record", "skip", "--data", "{bad}"], "sample"),
    "displacement_all_skipped": (["displacement", "--on-bad-record", "skip", "--data", "{bad}"], "displacement"),
    "inspect_limit": (["data", "inspect", "--data", "{good}", "--limit", "-{big}"], None),
    "inspect_sample": (["data", "inspect", "--data", "{good}", "--sample", "-{big}"], None),
    "inspect_max_length": (["data", "inspect", "--data", "{good}", "--model", "{model}", "--max-length", "-{big}"],
                           None),
    "train_loss": (["train", "configs/cpu_small.yaml", "loss.name=no_such_loss"], None),
    "train_loss_option": (["train", "configs/cpu_small.yaml", "loss.name=simpo", "loss.options={{simpo_gamma: abc}}"],
                          None),
    "train_lr": (["train", "configs/cpu_small.yaml", "optim.lr=-{big}"], None),
    "train_batch": (["train", "configs/cpu_small.yaml", "train.batch_size=-{big}"], None),
    "online_rounds": (["online", "configs/d2po_tiny.yaml", "online.rounds=-{big}"], None),
    "plan_pairs": (["plan", "{model}", "--job", "ches", "--pairs", "-{big}", "--cpu-devices", "1"], None),
    "plan_method": (["plan", "{model}", "--job", "entangle", "--method", "bogus", "--cpu-devices", "1"], None),
    "plan_chip": (["plan", "{model}", "--job", "ches", "--chip", "bogus", "--cpu-devices", "1"], None),
}


@pytest.mark.parametrize("case", sorted(_DEEP))
@settings(_FUZZ, max_examples=1)
@given(big=st.integers(min_value=50, max_value=10**6))
def test_bad_values_found_late(files, capsys, case, big):
    words, job = _DEEP[case]
    out = files["root"] / f"deep_{case}"
    given_ = [w.format(big=big, bad=files["bad"], good=files["good"], model=files["model"]) for w in words]
    if job:  # the job's good arguments, then the case's (argparse keeps the last of a repeated option)
        argv = [job] + _job_args(files, job, str(out)) + given_[1:] + ["--no-progress"]
    elif given_[0] in ("train", "online"):
        argv = given_ + [f"output_dir={out}", "--no-progress"]
    else:
        argv = given_
    _check_clean_failure(argv, capsys, out)


# --- a clean terminal (issue 21, item 7) ----------------------------------------------------------------

def test_cli_hides_the_missing_pytorch_notice(files):
    """Without PyTorch, transformers prints an advisory notice on import; the command must not show it
    (and it is shown without the CLI, so the test can see it)."""
    import os
    import subprocess

    hide_torch = "import sys; sys.modules['torch'] = None; "  # importlib.util.find_spec('torch') -> None
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_NO_ADVISORY_WARNINGS"}

    def stderr_of(code: str) -> str:
        return subprocess.run([sys.executable, "-c", hide_torch + code], env=env, capture_output=True, text=True,
                              check=True, cwd=Path(__file__).parent.parent).stderr

    assert "PyTorch was not found" in stderr_of("import transformers")
    err = stderr_of("from jaxalign.cli import main; "
                    f"sys.exit(main(['data', 'inspect', '--data', {files['good']!r}, '--model', {files['model']!r}]))")
    assert "PyTorch" not in err and "Traceback" not in err, err
