"""``jaxalign demo``: what this project is for, in one command, on a real model and real data.

Four steps, each with a progress bar, all outputs in one folder (default ``./demo_out``):

1. **CHES** (:func:`jaxalign.jobs.ches.run_ches`): CHES, LN-CHES and the two baselines of every
   pair (Razin et al., ICLR 2025).
2. **Entanglement** (:func:`jaxalign.jobs.entangle.run_entangle`): ‖g_w‖², ‖g_l‖², ⟨g_w, g_l⟩
   and DPO's predicted change of both log-probs for a sample of the trained pairs (Yuan et al., ICLR 2025).
3. **Two DPO runs** (:func:`jaxalign.train.loop.train`) from the same start with the same
   hyper-parameters, one on the highest-LN-CHES pairs and one on the lowest; the ledger records the
   chosen/rejected log-prob of every trained pair. With ``mitigations``, two more: the pool without its
   highest-LN-CHES pairs (Razin et al.'s filter) and DPO+SFT on the highest-LN-CHES pairs.

Step 0 makes the pairs. The default: answer-swap pairs (:mod:`jaxalign.demo.answer_pairs`): the model's
own greedy reason after the right and the wrong answer to questions with a known answer, y− sharing y+'s
continuation for half of them (Yuan et al. §4.3's identical-suffix construction, in the model's words).
With ``prompts`` the pairs are on-policy: two responses per prompt sampled from the model and ordered
by a judge (:func:`jaxalign.jobs.sample.sample_pairs`); with ``data``, a preference data set.
4. **The report** (:mod:`jaxalign.demo.report`): ``report.md`` with PNG figures and ``report.html``.

Modules: :mod:`jaxalign.demo.pipeline` (settings, steps, resume), :mod:`jaxalign.demo.answer_pairs` (the
default pairs), :mod:`jaxalign.demo.report` (the numbers and the report), :mod:`jaxalign.demo.pooling`
(several seeds' results pooled: ``jaxalign demo --seeds 0-5``). ``docs/demo.md`` describes the output.
"""

from jaxalign.demo.pipeline import Settings, run_demo

__all__ = ["Settings", "run_demo"]
