"""A clean terminal (issue 21, item 7): the commands print no dependency warning or notice.

The commands run in a fresh Python process as a user would start them: without PyTorch (hidden, so
``transformers`` would print its "PyTorch was not found" notice), without the test suite's warning
filters or ``TRANSFORMERS_NO_ADVISORY_WARNINGS``, on the CPU backend. With ``--no-progress`` a
successful run writes its results to stdout and nothing at all to stderr.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from hf_tiny import make_tiny  # noqa: E402
from tiny_tokenizer import make_tiny_tokenizer  # noqa: E402

SCRIPT = """
import sys
sys.modules["torch"] = None  # a torch-free install: importlib.util.find_spec("torch") is None
from jaxalign.cli import main
for argv in {argvs!r}:
    status = main(argv)
    print("STATUS", status, flush=True)
"""


def test_commands_write_nothing_to_stderr(tmp_path):
    model = make_tiny("llama", tmp_path / "model", seed=5, vocab_size=272, pad_token_id=3, eos_token_id=2,
                      bos_token_id=4)
    make_tiny_tokenizer(model)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"question {i}?\n", "chosen": " yes", "rejected": " no"}) + "\n"
                            for i in range(3)))
    m, d = str(model), str(data)
    argvs = [["ches", "--model", m, "--data", d, "--out", str(tmp_path / "ches"), "--no-progress"],
             ["probe", "--checkpoints", m, m, "--data", d, "--out", str(tmp_path / "probe"), "--what",
              "logps,squeeze", "--max-new-tokens", "3", "--no-progress"],
             ["plot", str(tmp_path / "probe")]]
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "PYTHONWARNINGS", "TF_CPP_MIN_LOG_LEVEL")}
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(argvs=argvs)], env=env, capture_output=True,
                          text=True, cwd=Path(__file__).parent.parent, timeout=600)
    assert proc.stdout.count("STATUS 0") == len(argvs), (proc.stdout, proc.stderr)
    assert proc.stderr == "", f"the commands printed to stderr:\n{proc.stderr}"
    assert (tmp_path / "probe" / "plots" / "squeeze_top1.png").exists()

    # The command ran on the CLI's mesh (the 8 simulated CPU devices of the test environment): the same
    # greedy responses, and log-probs equal up to float32 rounding, as one device without a mesh.
    from jaxalign.jobs import probe

    probe.run_probe(str(tmp_path / "one"), d, checkpoints=[m, m], what="logps,squeeze", max_new_tokens=3,
                    progress=False)
    mesh_run, one = probe.read_probe(tmp_path / "probe"), probe.read_probe(tmp_path / "one")
    np.testing.assert_array_equal(mesh_run["greedy_ids"], one["greedy_ids"])
    for k in ("greedy_logps", "other_logps", "top1_chosen", "entropy_greedy"):
        # sums of a few float32 log-probs, reduced in another order across devices
        np.testing.assert_allclose(mesh_run[k], one[k], rtol=1e-5, atol=1e-5, err_msg=k)
