"""Online preference optimisation: D2PO (discriminator-guided online DPO) and its reward model.

* :mod:`jaxalign.online.reward_model` — ``RewardModel`` (a causal LM + scalar head on the last token),
  ``pair_rewards``, the Bradley–Terry loss ``bradley_terry``.
* :mod:`jaxalign.online.d2po` — the round loop ``run_online`` (sample, gold-label a budget, train the
  discriminator, silver-label the rest, train the policy, evaluate, checkpoint) and gold labellers.
* :mod:`jaxalign.online.config` — the YAML run configuration (``jaxalign online configs/d2po_*.yaml``).
"""

from jaxalign.online.config import OnlineConfig, load
from jaxalign.online.d2po import charset_gold, keyword_gold, length_gold, make_gold, run_online
from jaxalign.online.reward_model import RewardModel, bradley_terry, pair_last_hidden, pair_rewards

__all__ = ["OnlineConfig", "load", "run_online", "make_gold", "keyword_gold", "charset_gold", "length_gold",
           "RewardModel", "bradley_terry", "pair_rewards", "pair_last_hidden"]
