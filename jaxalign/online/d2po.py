"""D2PO: discriminator-guided online DPO (Singhal, Lambert, Niekum, Goyal, Durrett; arXiv 2405.01511).

Letters: B pairs per step, P prompt length (padded, ``Tp``), R response length (padded, ``Tr``), N sampled
responses.

Each **round** ``r = 1 … rounds``:

1. **Sample.** ``prompts_per_round`` training prompts (drawn by ``(seed, r)``) get two responses each from
   the current policy (:func:`jaxalign.models.generate_ids`, temperature/top-p, seed ``(seed, r)``). A pair
   whose two responses are equal is dropped (counted).
2. **Gold labels.** The first ``gold_per_round`` pairs go to the gold labeller, a callable
   ``gold(prompt, response) -> float`` (higher is better; the built-ins are a keyword count and a length
   rule). The better response is ``chosen``; a tie gives no pair but still spends its label. Gold pairs
   join the **gold buffer** (all rounds).
3. **Discriminator.** ``discriminator.steps`` optimiser steps on batches drawn from the gold buffer:
   a separate reward model (the LM backbone + a scalar head on the last token, Bradley–Terry loss,
   :mod:`jaxalign.online.reward_model`) or a separate DPO model whose implicit reward
   ``β log π_D(y|x)/π_ref(y|x)`` scores responses (``kind: dpo``). ``kind: none`` is the baseline:
   online DPO with the gold labels only.
4. **Silver labels.** The discriminator labels the other pairs of the round (``silver_per_round``, default
   all): ``chosen`` is the response it scores higher; pairs whose reward gap is below ``min_margin`` are
   dropped.
5. **Policy.** ``policy_epochs`` passes over the round's gold + silver pairs with the configured loss
   (any :mod:`jaxalign.losses` name; DPO by default) against the frozen initial policy as reference.
6. **Evaluate** (not counted as labels): two samples for each held-out prompt (a fixed seed, so rounds
   are compared on the same randomness) scored by the gold labeller (``gold/reward``); the
   discriminator's accuracy on those pairs (``discriminator/accuracy``: the distribution shifts as the
   policy moves); the change of ``log π(y+)`` and ``log π(y−)`` on a probe set of gold-labelled pairs
   sampled from the initial policy (``displacement/*``).
7. **Checkpoint** (Orbax, :class:`jaxalign.train.checkpoint.Checkpointer`): policy and discriminator
   parameters and optimiser states, the gold buffer, the probe set and the label count. Every random
   choice is a function of ``(seed, round)``, so a resumed run equals an uninterrupted one.

Outputs in ``output_dir``: ``config.json``, ``metrics.jsonl`` (one line per round, round 0 = the initial
policy), ``summary.json``, ``checkpoints/<round>/``.

A sampled response is what the policy produced: its tokens up to and including the first EOS, or the
``max_new_tokens`` tokens when it did not stop (then no EOS is appended; its log-prob covers what was
sampled).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxalign.errors import CheckpointError, ConfigError, DataError, JaxAlignError
from jaxalign.online import reward_model as rm_lib
from jaxalign.online.config import OnlineConfig, run_changes
from jaxalign.train import optim
from jaxalign.train import step as step_lib

GoldFn = Callable[[str, str], float]

#: ``prompts.source: synthetic:NAME`` prompt sets (no files needed).
SYNTHETIC_PROMPTS: dict[str, list[str]] = {
    "topics": [f"Write one short sentence about {t}.\n" for t in (
        "the sea", "a cat", "the moon", "bread", "rain", "a train", "music", "a garden", "winter",
        "coffee", "a river", "the city", "friendship", "a book", "the wind", "mountains", "a dog",
        "summer", "a bicycle", "the stars", "a forest", "snow", "a market", "the sun", "a bridge",
        "tea", "a school", "the night", "an island", "a song", "the desert", "a clock")],
    "letters": [f"{w} " for w in (
        "hello", "the", "a", "we", "say", "so", "hi", "go", "see", "me", "yes", "no", "ok", "my", "you",
        "be", "it", "to", "on", "at", "is", "do", "up", "he", "she", "all", "one", "two", "cat", "dog",
        "sun", "sky")],
}


# --- gold labellers --------------------------------------------------------------------------------------

def keyword_gold(word: str) -> GoldFn:
    """``gold(prompt, response)`` = the number of (case-insensitive) occurrences of ``word``."""
    w = word.lower()

    def gold(prompt: str, response: str) -> float:
        return float(response.lower().count(w))

    gold.__name__ = f"keyword_gold({word!r})"
    return gold


def charset_gold(chars: str) -> GoldFn:
    """``gold(prompt, response)`` = the number of characters of the response in ``chars`` (case-insensitive).

    A transparent rule that even a tiny byte-level model can learn (prefer vowels, digits, ...).
    """
    keep = set(chars.lower())

    def gold(prompt: str, response: str) -> float:
        return float(sum(ch in keep for ch in response.lower()))

    gold.__name__ = f"charset_gold({chars!r})"
    return gold


def length_gold(target: int, unit: str = "words", tokenizer=None) -> GoldFn:
    """``gold(prompt, response) = −|length − target|``, length in words, characters or tokens."""
    if unit == "tokens" and tokenizer is None:
        raise ConfigError("gold.unit: tokens needs the tokenizer")

    def length(text: str) -> int:
        if unit == "words":
            return len(text.split())
        if unit == "chars":
            return len(text)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    def gold(prompt: str, response: str) -> float:
        return -float(abs(length(response) - target))

    gold.__name__ = f"length_gold({target}, {unit!r})"
    return gold


def make_gold(cfg, tokenizer=None) -> GoldFn:
    """The gold labeller of a :class:`jaxalign.online.config.GoldConfig`."""
    if cfg.kind == "keyword":
        return keyword_gold(cfg.word)
    if cfg.kind == "charset":
        return charset_gold(cfg.chars)
    if cfg.kind == "length":
        return length_gold(cfg.target, cfg.unit, tokenizer)
    module, _, name = (cfg.function or "").partition(":")
    if not module or not name:
        raise ConfigError(f"gold.function: expected \"module:function\", got {cfg.function!r}")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"gold.function: cannot import {cfg.function!r} ({err})") from None
    if not callable(fn):
        raise ConfigError(f"gold.function: {cfg.function!r} is not callable")
    return fn


def _gold_value(gold: GoldFn, prompt: str, response: str) -> float:
    value = gold(prompt, response)
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise JaxAlignError(f"the gold labeller returned {value!r} (expected a number) for the response "
                            f"{response[:60]!r}") from None
    if not math.isfinite(value):
        raise JaxAlignError(f"the gold labeller returned {value} for the response {response[:60]!r}")
    return value


# --- prompts -----------------------------------------------------------------------------------------------

def load_prompts(cfg, tokenizer) -> tuple[list[str], list[list[int]]]:
    """The prompt texts (as given to the gold labeller) and their token ids (chat-rendered if asked).

    Distinct prompts in source order; records whose prompt field is missing or not a string (or messages)
    raise ``DataError`` naming the record.
    """
    source = cfg.source
    if source.startswith("synthetic:"):
        name = source.split(":", 1)[1]
        if name not in SYNTHETIC_PROMPTS:
            raise ConfigError(f"prompts.source: unknown synthetic set {name!r} (known: "
                              f"{', '.join(SYNTHETIC_PROMPTS)})")
        raw = list(SYNTHETIC_PROMPTS[name])
    else:
        from jaxalign.data.load import open_source

        src = open_source(source)
        raw = []
        for r in src.records:
            if r.error is not None:
                raise DataError(r.error, path=src.name, record=r.index)
            v = r.value.get(cfg.field) if isinstance(r.value, dict) else None
            if not (isinstance(v, str) and v.strip()) and not isinstance(v, list):
                raise DataError("expected a non-empty prompt string or a list of messages",
                                path=src.name, record=r.index, field=cfg.field)
            raw.append(v)
    seen, prompts = set(), []
    for p in raw:
        key = json.dumps(p, sort_keys=True)
        if key not in seen:
            seen.add(key)
            prompts.append(p)
    if cfg.limit is not None:
        prompts = prompts[:cfg.limit]
    texts, ids = [], []
    for p in prompts:
        if isinstance(p, list) or cfg.chat:
            messages = p if isinstance(p, list) else [{"role": "user", "content": p.strip()}]
            if getattr(tokenizer, "chat_template", None) is None:
                raise ConfigError("prompts.chat: the tokenizer has no chat template")
            rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            row = tokenizer(rendered, add_special_tokens=False)["input_ids"]
            texts.append(messages[-1]["content"] if isinstance(p, list) else p)
        else:
            row = tokenizer(p, add_special_tokens=True)["input_ids"]
            texts.append(p)
        if cfg.max_prompt_length is not None:
            row = row[-cfg.max_prompt_length:]
        ids.append([int(t) for t in row])
    if len(prompts) < cfg.eval_size + 1:
        raise ConfigError(f"prompts.source: {len(prompts)} distinct prompts; need more than prompts.eval_size "
                          f"= {cfg.eval_size} (the held-out prompts) to train on")
    return texts, ids


# --- batches -------------------------------------------------------------------------------------------

def _round_up(n: int, m: int = 8) -> int:
    return max(m, -(-n // m) * m)


def pairs_batch(prompt_ids: list[list[int]], pairs: list[dict], rows: np.ndarray, Tp: int, Tr: int,
                pad_id: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The shared-prompt batch of ``pairs[rows]`` (``-1`` rows are fillers) and its weights ``[B]``.

    A pair is ``{"prompt": i, "chosen": ids, "rejected": ids}`` (``i`` indexes ``prompt_ids``).
    """
    from jaxalign.data.batch import shared_prompt_batch
    from jaxalign.data.tokenize import Ragged, TokenizedPairs

    rows = np.asarray(rows, np.int64)
    real = [int(r) for r in rows if r >= 0]
    local = {r: k for k, r in enumerate(dict.fromkeys(real))}
    order = list(local)
    tokens = TokenizedPairs(np.asarray(order, np.int64),
                            Ragged.from_rows([prompt_ids[pairs[r]["prompt"]] for r in order]),
                            Ragged.from_rows([pairs[r]["chosen"] for r in order]),
                            Ragged.from_rows([pairs[r]["rejected"] for r in order]))
    local_rows = np.array([local[int(r)] if r >= 0 else -1 for r in rows], np.int64)
    batch = shared_prompt_batch(tokens, local_rows, pad_id=pad_id, prompt_length=Tp, response_length=Tr)
    batch = {k: v for k, v in batch.items() if k in step_lib.BATCH_KEYS}
    return batch, (rows >= 0).astype(np.float32)


def _chunks(n: int, B: int) -> list[np.ndarray]:
    """``0 … n−1`` in batches of ``B``, the last filled with ``-1``."""
    out = []
    for start in range(0, n, B):
        rows = np.arange(start, start + B)
        out.append(np.where(rows < n, rows, -1))
    return out


# --- pure steps ----------------------------------------------------------------------------------------------

class Learner(NamedTuple):
    """A trained model's state (a pytree): steps done, trainable parameters, optimiser state."""

    step: jax.Array
    params: Any
    opt_state: Any


def _merge_params(trainable: dict, frozen: dict) -> dict:
    return {**frozen, **trainable}


def policy_step(state: Learner, frozen, rest, batch, w, ref, *, parts, spec, optimizer):
    """One optimiser step of the policy's loss on one weighted batch."""
    def loss_fn(params):
        model = parts.merge(_merge_params(params, frozen), rest)
        lp = step_lib.pair_logps(model, batch, shared_prompt=True, chunk_size=spec.chunk_size)
        return step_lib.weighted_objective(spec, lp, ref, w)

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["grad_norm"] = optax.global_norm(grads)
    return Learner(state.step + 1, params, opt_state), metrics


def logps(params, rest, batch, *, parts) -> tuple[jax.Array, jax.Array]:
    """Summed log-probs ``[B]`` of the chosen and rejected responses."""
    lp = step_lib.pair_logps(parts.merge(params, rest), batch, shared_prompt=True)
    return lp["chosen_logps"], lp["rejected_logps"]


def rm_rewards(params, rest, batch, *, parts) -> tuple[jax.Array, jax.Array]:
    """The reward model's ``(r(x, y+), r(x, y−))`` of a batch."""
    model = parts.merge(params, rest)
    return rm_lib.pair_rewards(model, *(batch[k] for k in step_lib.BATCH_KEYS))


def rm_loss(trainable, frozen, rest, batch, w, *, parts) -> tuple[jax.Array, dict]:
    """Weighted mean Bradley–Terry loss of a batch and its metrics (a function of the trainable params)."""
    rc, rr = rm_rewards(_merge_params(trainable, frozen), rest, batch, parts=parts)
    metrics = rm_lib.bt_metrics(rc, rr, w)
    return metrics["loss"], metrics


def rm_step(state: Learner, frozen, rest, batch, w, *, parts, optimizer):
    """One optimiser step of the reward model on one weighted batch."""
    (_, metrics), grads = jax.value_and_grad(functools.partial(rm_loss, parts=parts), has_aux=True)(
        state.params, frozen, rest, batch, w)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    return Learner(state.step + 1, optax.apply_updates(state.params, updates), opt_state), metrics


def rm_features(params, rest, batch, *, parts) -> tuple[jax.Array, jax.Array]:
    """Last-token hidden states ``[B, D]`` of the chosen and rejected rows (the reward head's input)."""
    model = parts.merge(params, rest)
    return rm_lib.pair_last_hidden(model, *(batch[k] for k in step_lib.BATCH_KEYS))


def head_step(state: Learner, h_c, h_r, w, *, optimizer):
    """One optimiser step of a reward head alone on cached last-token features (frozen backbone)."""
    def loss_fn(params):
        metrics = rm_lib.bt_metrics(rm_lib.head_rewards(params["head"], h_c),
                                    rm_lib.head_rewards(params["head"], h_r), w)
        return metrics["loss"], metrics

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    return Learner(state.step + 1, optax.apply_updates(state.params, updates), opt_state), metrics


def split_trainable(params: dict, trainable: str) -> tuple[dict, dict]:
    """``(trainable, frozen)`` top-level parts of a reward model's params (``"all"`` or ``"head"``)."""
    if trainable == "all":
        return params, {}
    return {"head": params["head"]}, {k: v for k, v in params.items() if k != "head"}


# --- the run -------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Models:
    """Everything jitted for one run (built once)."""

    policy_parts: Any
    policy_rest: Any
    ref_params: Any
    policy_step: Callable
    policy_logps: Callable
    disc_kind: str
    disc_parts: Any = None
    disc_rest: Any = None
    disc_frozen: Any = None
    disc_ref: Any = None
    disc_step: Callable | None = None
    disc_rewards: Callable | None = None
    disc_features: Callable | None = None


def _seed(*parts: int) -> int:
    return int(np.random.default_rng(list(parts)).integers(2 ** 31 - 1))


def _loss_spec(loss_cfg) -> step_lib.Objective:
    try:
        return step_lib.Objective.from_config(loss_cfg)
    except ConfigError as err:
        raise ConfigError(str(err)) from None


class _Run:
    """One online run; the state that persists across rounds lives in ``self.state`` and ``self.data``."""

    def __init__(self, cfg: OnlineConfig, gold: GoldFn | None, progress: bool):
        from jaxalign import models
        from jaxalign.models.paths import resolve_model_path

        self.cfg = cfg
        self.progress = progress
        dtype = jnp.dtype(cfg.model.dtype)
        model, tok = models.load_pretrained(resolve_model_path(cfg.model.path), dtype=dtype)
        if tok is None:
            raise ConfigError(f"model.path: {cfg.model.path} has no tokenizer files")
        self.tok = tok
        self.gold = gold or make_gold(cfg.gold, tok)
        self.eos = tok.eos_token_id
        if self.eos is None:
            raise ConfigError("model.path: the tokenizer has no EOS token")
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else self.eos
        self.texts, self.prompt_ids = load_prompts(cfg.prompts, tok)
        n = len(self.texts)
        self.eval_idx = np.arange(n - cfg.prompts.eval_size, n)
        self.train_idx = np.arange(n - cfg.prompts.eval_size)
        self.Tp = _round_up(max(len(p) for p in self.prompt_ids))
        self.Tr = _round_up(cfg.sampling.max_new_tokens)

        # Policy.
        self.spec = _loss_spec(cfg.loss)
        parts, params = step_lib.ModelParts.split(model)
        r = cfg.online
        est = r.rounds * r.policy_epochs * max(1, -(-2 * r.prompts_per_round // r.batch_size))
        self.policy_opt = optim.make_optimizer(cfg.optim, est)
        ref = jax.tree.map(jnp.copy, params)
        policy_fn = functools.partial(policy_step, parts=parts, spec=self.spec, optimizer=self.policy_opt)
        m = _Models(policy_parts=parts, policy_rest=parts.rest, ref_params=ref,
                    policy_step=jax.jit(policy_fn),
                    policy_logps=jax.jit(functools.partial(logps, parts=parts)), disc_kind=cfg.discriminator.kind)
        state = {"policy": Learner(jnp.zeros((), jnp.int32), params, self.policy_opt.init(params))}

        # Discriminator.
        d = cfg.discriminator
        if d.kind != "none":
            est_d = r.rounds * d.steps
            self.disc_opt = optim.make_optimizer(d.optim, est_d)
            path = resolve_model_path(d.path or cfg.model.path)
            backbone, _ = models.load_pretrained(path, dtype=dtype)
            if d.kind == "reward_model":
                from flax import nnx

                disc = rm_lib.RewardModel(backbone, rngs=nnx.Rngs(params=r.seed), head_std=d.head_std)
                dparts, dparams = step_lib.ModelParts.split(disc)
                trainable, frozen = split_trainable(dparams, d.trainable)
                if d.trainable == "head":  # frozen backbone: features once per round, then head steps
                    m.disc_step = jax.jit(functools.partial(head_step, optimizer=self.disc_opt))
                    m.disc_features = jax.jit(functools.partial(rm_features, parts=dparts))
                else:
                    m.disc_step = jax.jit(functools.partial(rm_step, parts=dparts, optimizer=self.disc_opt))
                m.disc_rewards = jax.jit(functools.partial(rm_rewards, parts=dparts))
            else:
                dparts, trainable = step_lib.ModelParts.split(backbone)
                frozen = {}
                m.disc_ref = jax.tree.map(jnp.copy, trainable)
                dspec = step_lib.Objective(names=("sigmoid",), weights=None, beta=d.beta)
                m.disc_step = jax.jit(functools.partial(policy_step, parts=dparts, spec=dspec,
                                                        optimizer=self.disc_opt))
                m.disc_rewards = jax.jit(functools.partial(logps, parts=dparts))
            m.disc_parts, m.disc_rest, m.disc_frozen = dparts, dparts.rest, frozen
            state["disc"] = Learner(jnp.zeros((), jnp.int32), trainable, self.disc_opt.init(trainable))
        self.m = m
        self.state = state
        self.data = {"round": 0, "labels_used": 0, "gold_buffer": [], "probe": []}

    # -- sampling --------------------------------------------------------------------------------------

    def sample(self, prompt_rows: np.ndarray, seed: int) -> list[tuple[list[int], list[int]]]:
        """Two responses (token lists) for each prompt row, from the current policy."""
        from jaxalign.models import generate_ids

        s = self.cfg.sampling
        model = self.m.policy_parts.merge(self.state["policy"].params, self.m.policy_rest)
        ids = [self.prompt_ids[int(i)] for i in prompt_rows for _ in range(2)]
        out = generate_ids(model, ids, s.max_new_tokens, eos_token_id=self.eos, pad_token_id=self.pad,
                           temperature=s.temperature, top_p=s.top_p, seed=seed, pad_multiple=self.Tp)
        resp = []
        for row in out.tolist():
            cut = row.index(self.eos) + 1 if self.eos in row else len(row)
            resp.append(row[:cut])
        return [(resp[2 * k], resp[2 * k + 1]) for k in range(len(prompt_rows))]

    def text(self, ids: list[int]) -> str:
        body = ids[:-1] if ids and ids[-1] == self.eos else ids
        return self.tok.decode(body, skip_special_tokens=True)

    def gold_score(self, prompt_row: int, ids: list[int]) -> float:
        return _gold_value(self.gold, self.texts[prompt_row], self.text(ids))

    # -- log-probs and rewards over lists of pairs ---------------------------------------------------------

    def _over_pairs(self, fn, pairs: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        B = self.cfg.online.batch_size
        outs_c, outs_r = [], []
        for rows in _chunks(len(pairs), B):
            batch, w = pairs_batch(self.prompt_ids, pairs, rows, self.Tp, self.Tr, self.pad)
            c, r = fn(batch)
            outs_c.append(np.asarray(c)[w > 0])
            outs_r.append(np.asarray(r)[w > 0])
        if not outs_c:
            return np.zeros(0), np.zeros(0)
        return np.concatenate(outs_c).astype(np.float64), np.concatenate(outs_r).astype(np.float64)

    def policy_logps(self, params, pairs):
        return self._over_pairs(lambda b: self.m.policy_logps(params, self.m.policy_rest, b), pairs)

    def disc_margin(self, pairs: list[dict]) -> np.ndarray:
        """``r(y_chosen) − r(y_rejected)`` under the discriminator, ``[len(pairs)]``."""
        m = self.m
        params = _merge_params(self.state["disc"].params, m.disc_frozen)
        c, r = self._over_pairs(lambda b: m.disc_rewards(params, m.disc_rest, b), pairs)
        if m.disc_kind == "dpo":
            rc, rr = self._over_pairs(lambda b: m.disc_rewards(m.disc_ref, m.disc_rest, b), pairs)
            return self.cfg.discriminator.beta * ((c - rc) - (r - rr))
        return c - r

    # -- training ------------------------------------------------------------------------------------------

    def train_policy(self, pairs: list[dict], rnd: int) -> dict:
        cfg = self.cfg
        B = cfg.online.batch_size
        m = self.m
        sums: dict[str, float] = {}
        steps = 0
        if not pairs:
            return {"policy/steps": 0}
        rng = np.random.default_rng([cfg.online.seed, rnd, 2])
        for _ in range(cfg.online.policy_epochs):
            perm = rng.permutation(len(pairs))
            for rows in _chunks(len(pairs), B):
                rows = np.where(rows >= 0, perm[np.maximum(rows, 0)], -1)
                batch, w = pairs_batch(self.prompt_ids, pairs, rows, self.Tp, self.Tr, self.pad)
                ref = {}
                if self.spec.needs_reference:
                    rc, rr = m.policy_logps(m.ref_params, m.policy_rest, batch)
                    ref = {"ref_chosen_logps": rc, "ref_rejected_logps": rr}
                self.state["policy"], metrics = m.policy_step(self.state["policy"], {}, m.policy_rest, batch,
                                                              jnp.asarray(w), ref)
                for k, v in metrics.items():
                    v = float(v)
                    if not math.isfinite(v):
                        raise JaxAlignError(f"round {rnd}: the policy's {k} is {v}; stopped (the last "
                                            f"checkpoint is round {rnd - 1})")
                    sums[k] = sums.get(k, 0.0) + v
                steps += 1
        out = {f"policy/{k}": v / steps for k, v in sums.items()}
        out["policy/steps"] = steps
        return out

    def train_disc(self, rnd: int) -> dict:
        cfg = self.cfg
        d = cfg.discriminator
        m = self.m
        buf = self.data["gold_buffer"]
        if not buf:
            return {}
        rng = np.random.default_rng([cfg.online.seed, rnd, 1])
        B = d.batch_size
        sums: dict[str, float] = {}
        feats = None
        if m.disc_features is not None:  # head only: the frozen backbone's features of the buffer, once
            params = _merge_params(self.state["disc"].params, m.disc_frozen)
            hc, hr = [], []
            for rows in _chunks(len(buf), B):
                batch, w = pairs_batch(self.prompt_ids, buf, rows, self.Tp, self.Tr, self.pad)
                c, r = m.disc_features(params, m.disc_rest, batch)
                hc.append(np.asarray(c)[w > 0])
                hr.append(np.asarray(r)[w > 0])
            feats = (np.concatenate(hc), np.concatenate(hr))
        for _ in range(d.steps):
            if len(buf) <= B:
                rows = np.concatenate([rng.permutation(len(buf)), -np.ones(B - len(buf), np.int64)])
            else:
                rows = rng.choice(len(buf), B, replace=False)
            if feats is not None:
                w = (rows >= 0).astype(np.float32)
                take = np.maximum(rows, 0)
                self.state["disc"], metrics = m.disc_step(self.state["disc"], jnp.asarray(feats[0][take]),
                                                          jnp.asarray(feats[1][take]), jnp.asarray(w))
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                continue
            batch, w = pairs_batch(self.prompt_ids, buf, rows, self.Tp, self.Tr, self.pad)
            if m.disc_kind == "reward_model":
                self.state["disc"], metrics = m.disc_step(self.state["disc"], m.disc_frozen, m.disc_rest, batch,
                                                          jnp.asarray(w))
            else:
                rc, rr = m.disc_rewards(m.disc_ref, m.disc_rest, batch)
                self.state["disc"], metrics = m.disc_step(
                    self.state["disc"], {}, m.disc_rest, batch, jnp.asarray(w),
                    {"ref_chosen_logps": rc, "ref_rejected_logps": rr})
                metrics = {"loss": metrics["loss"], "accuracy": metrics["rewards/accuracies"],
                           "margin": metrics["rewards/margins"]}
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        return {f"discriminator/train_{k}": v / d.steps for k, v in sums.items()}

    # -- evaluation ----------------------------------------------------------------------------------------

    def eval_samples(self) -> tuple[list[dict], np.ndarray]:
        """Two samples per held-out prompt (fixed seed): the ordered pairs with distinct gold scores, and
        every sample's gold score."""
        samples = self.sample(self.eval_idx, _seed(self.cfg.online.seed, 10 ** 6))
        scores, pairs = [], []
        for i, (a, b) in zip(self.eval_idx, samples):
            sa, sb = self.gold_score(int(i), a), self.gold_score(int(i), b)
            scores += [sa, sb]
            if sa != sb:
                c, r = (a, b) if sa > sb else (b, a)
                pairs.append({"prompt": int(i), "chosen": c, "rejected": r})
        return pairs, np.asarray(scores, np.float64)

    def evaluate(self, rnd: int) -> dict:
        pairs, scores = self.eval_samples()
        out = {"gold/reward": float(scores.mean()), "gold/reward_std": float(scores.std()),
               "eval/pairs": len(pairs)}
        if self.m.disc_kind != "none" and pairs:
            margin = self.disc_margin(pairs)
            out["discriminator/accuracy"] = float(np.mean(np.where(margin > 0, 1.0, np.where(margin == 0, 0.5, 0.0))))
        if rnd == 0:
            self.data["probe"] = pairs[:self.cfg.eval.probe_size]
        probe = self.data["probe"]
        if probe:
            c, r = self.policy_logps(self.state["policy"].params, probe)
            c0, r0 = self.policy_logps(self.m.ref_params, probe)
            dc, dr = c - c0, r - r0
            out.update({"displacement/chosen_logps_change": float(dc.mean()),
                        "displacement/rejected_logps_change": float(dr.mean()),
                        "displacement/fraction_chosen_down": float(np.mean(dc < 0)),
                        "displacement/probe_pairs": len(probe)})
        return out

    # -- one round -----------------------------------------------------------------------------------------

    def round(self, rnd: int) -> dict:
        cfg = self.cfg
        r = cfg.online
        t0 = time.perf_counter()
        rng = np.random.default_rng([r.seed, rnd])
        n_train = len(self.train_idx)
        if r.prompts_per_round <= n_train:
            rows = self.train_idx[rng.choice(n_train, r.prompts_per_round, replace=False)]
        else:
            rows = self.train_idx[rng.integers(n_train, size=r.prompts_per_round)]
        samples = self.sample(rows, _seed(r.seed, rnd))
        fresh = [(int(i), a, b) for i, (a, b) in zip(rows, samples) if a != b]
        identical = len(samples) - len(fresh)
        gold_part, rest = fresh[:r.gold_per_round], fresh[r.gold_per_round:]
        gold_pairs, ties = [], 0
        for i, a, b in gold_part:
            sa, sb = self.gold_score(i, a), self.gold_score(i, b)
            if sa == sb:
                ties += 1
                continue
            c, rj = (a, b) if sa > sb else (b, a)
            gold_pairs.append({"prompt": i, "chosen": c, "rejected": rj})
        self.data["labels_used"] += len(gold_part)
        self.data["gold_buffer"] = self.data["gold_buffer"] + gold_pairs
        metrics: dict[str, Any] = {"round": rnd, "gold/labels_used": self.data["labels_used"],
                                   "gold/labels_round": len(gold_part), "gold/ties_round": ties,
                                   "gold/buffer": len(self.data["gold_buffer"]), "pairs/identical": identical}

        silver_pairs: list[dict] = []
        if self.m.disc_kind != "none":
            metrics.update(self.train_disc(rnd))
            cand = rest if r.silver_per_round is None else rest[:r.silver_per_round]
            if cand and self.data["gold_buffer"]:
                as_pairs = [{"prompt": i, "chosen": a, "rejected": b} for i, a, b in cand]
                margin = self.disc_margin(as_pairs)
                agree = []
                for (i, a, b), mg in zip(cand, margin):
                    if abs(mg) < cfg.discriminator.min_margin or mg == 0:
                        continue
                    c, rj = (a, b) if mg > 0 else (b, a)
                    silver_pairs.append({"prompt": i, "chosen": c, "rejected": rj})
                    if cfg.eval.silver_agreement:
                        gc, gr = self.gold_score(i, c), self.gold_score(i, rj)
                        if gc != gr:
                            agree.append(gc > gr)
                metrics["silver/pairs"] = len(silver_pairs)
                if agree:
                    metrics["silver/agreement"] = float(np.mean(agree))
                    metrics["silver/agreement_pairs"] = len(agree)
        metrics.update(self.train_policy(gold_pairs + silver_pairs, rnd))
        metrics.update(self.evaluate(rnd))
        metrics["time_s"] = time.perf_counter() - t0
        return metrics


def _metrics_log(path: Path, resume_round: int | None):
    if resume_round is None or not path.exists():
        path.write_text("")
    else:
        keep = [line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("round", 0) <= resume_round]
        path.write_text("".join(line + "\n" for line in keep))
    return open(path, "a")


def run_online(cfg: OnlineConfig, *, gold: GoldFn | None = None, resume: bool = False, progress: bool = True,
               stop_after: int | None = None) -> dict:
    """Runs (or resumes) an online D2PO / online-DPO run; returns its summary.

    Args:
      cfg: the run configuration (:mod:`jaxalign.online.config`).
      gold: the gold labeller ``gold(prompt, response) -> float`` (higher is better); default: the one
        described by ``cfg.gold``.
      resume: continue from the latest round checkpoint in ``cfg.output_dir`` (refused when the config
        changed in a way that alters the run); without it an existing run there is an error.
      progress: print one line per round.
      stop_after: stop after this many rounds of this invocation (tests).

    Returns:
      ``{"rounds", "output_dir", "history": [metrics of each round, round 0 first], "final": ...}``.
    """
    from jaxalign.train.checkpoint import Checkpointer

    out = Path(cfg.output_dir)
    ckpt_dir = out / "checkpoints"
    existing = ckpt_dir.exists() and any(p.name.isdigit() for p in ckpt_dir.iterdir())
    if existing and not resume:
        raise CheckpointError(f"{out}: holds a run already (checkpoints in {ckpt_dir}); pass --resume to "
                              "continue it or choose another output_dir")
    run = _Run(cfg, gold, progress)
    ckpt = Checkpointer(ckpt_dir, keep_last=cfg.checkpoint.keep_last, async_save=False)
    meta = {"config": cfg.to_dict()}
    start = 0
    latest = ckpt.latest_step() if resume else None
    try:
        if latest is not None:
            saved = ckpt.read_meta(latest)
            changes = run_changes(saved["config"], cfg)
            if changes:
                raise CheckpointError(f"{out}: --resume with a config that would change the run "
                                      f"({', '.join(changes)}); revert these keys or use another output_dir")
            state, data, _ = ckpt.restore(latest, run.state)
            run.state, run.data = state, data
            start = latest
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        log = _metrics_log(out / "metrics.jsonl", start if latest is not None else None)
        try:
            if latest is None:
                m0 = {"round": 0, "gold/labels_used": 0, **run.evaluate(0)}
                log.write(json.dumps(m0) + "\n")
                log.flush()
                ckpt.save(0, run.state, run.data, dict(meta, round=0))
                if progress:
                    print(_line(m0), flush=True)
            end = cfg.online.rounds if stop_after is None else min(cfg.online.rounds, start + stop_after)
            for rnd in range(start + 1, end + 1):
                metrics = run.round(rnd)
                run.data["round"] = rnd
                log.write(json.dumps(metrics) + "\n")
                log.flush()
                ckpt.save(rnd, run.state, run.data, dict(meta, round=rnd))
                if progress:
                    print(_line(metrics), flush=True)
        finally:
            log.close()
    finally:
        ckpt.close()
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    summary = {"rounds": history[-1]["round"] if history else 0, "output_dir": str(out),
               "discriminator": cfg.discriminator.kind, "history": history,
               "final": history[-1] if history else {}}
    from jaxalign import store

    store.write_json(out / "summary.json", summary)
    return summary


def _line(m: dict) -> str:
    parts = [f"round {m['round']}", f"gold labels {m.get('gold/labels_used', 0)}",
             f"gold reward {m.get('gold/reward', float('nan')):.3f}"]
    if "discriminator/accuracy" in m:
        parts.append(f"disc acc {m['discriminator/accuracy']:.2f}")
    if "silver/pairs" in m:
        parts.append(f"silver {m['silver/pairs']}")
    if "displacement/chosen_logps_change" in m:
        parts.append(f"Δlogπ(y+) {m['displacement/chosen_logps_change']:+.3f}")
    return ", ".join(parts)


__all__ = ["SYNTHETIC_PROMPTS", "keyword_gold", "charset_gold", "length_gold", "make_gold", "load_prompts", "pairs_batch",
           "Learner", "policy_step", "logps", "rm_rewards", "rm_loss", "rm_step",
           "rm_features", "head_step",
           "split_trainable", "run_online"]

