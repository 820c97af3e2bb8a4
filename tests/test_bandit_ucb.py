"""The UCB1 bonus's count: ``sqrt(ln n_k / N_k(a))`` with n_k the pulls of step k so far (not n_k + 1).

Truth: the formula by hand on a state set directly, chosen so the two counts choose differently.
"""

from __future__ import annotations

import math

import numpy as np

from anchorflow.runtime import FastFlowBandit


def test_the_bonus_uses_ln_n_of_the_pulls_so_far():
    """Arm 0 pulled once (Q 0), arm 2 twice (Q 0.326), n = 3, unit 1, gamma 1. By hand:
    ln 3 -> scores 1.048 vs 1.067 (arm 2); ln 4 -> 1.177 vs 1.159 (arm 0): a bonus on n + 1 fails."""
    b = FastFlowBandit(10, gamma=1.0, arms=(0, 2), bonus="raw")
    b.N[3], b.Q[3] = [1, 2], [0.0, 0.326]
    by_hand = {n: np.array([0.0, 0.326]) + np.sqrt(math.log(n) / np.array([1, 2])) for n in (3, 4)}
    assert int(np.argmax(by_hand[3])) == 1 and int(np.argmax(by_hand[4])) == 0  # the case separates the two
    assert b.select(3, 6) == 2
