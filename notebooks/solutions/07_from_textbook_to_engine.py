"""Solutions to the exercises of notebooks/07_from_textbook_to_engine.ipynb.

Each section replaces the notebook's exercise cell of the same number; the tests run it right
after that exercise's check cell, then the check again (notebooks/README.md, "Exercises").
"""

# %% Exercise 1
def fold_by_hand(w, gamma, beta, mean, var, eps):
    alpha = gamma / np.sqrt(var + eps)                     # (K,) the BN scale
    return w * alpha[:, None, None, None], beta - mean * alpha

# %% Exercise 2
def floor_ms(rows):
    macs = sum(sum(r["macs"].values()) for r in rows)      # every op kind of every step
    return 2 * macs / (PEAK_GFLOPS * 1e9) * 1e3            # 2 flops per MAC, in ms

# %% Exercise 3
def project_with_gate_in_weights(D, g, Wp):
    return D @ (g[:, None] * Wp)                           # row c of Wp scaled by g[c]
