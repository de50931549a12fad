# Solutions to the exercises of notebooks/04_compare_with_torchvision.ipynb.
# Each section replaces the exercise's stub cell; the tests run it, then the check cell.
# ruff: noqa: F821  (names such as np and first_failure come from the notebook's kernel)

# %% Exercise 1
def my_ulp_distance(a, b):
    """Elementwise number of float32 values between a and b (int64 array)."""
    def ordered(v):
        # float32 bits as integers: non-negative floats increase with the value; a negative
        # float is its magnitude's bits with the sign bit set, so map it to minus those bits.
        i = np.asarray(v, dtype=np.float32).view(np.int32).astype(np.int64)
        return np.where(i < 0, -(i & 0x7FFFFFFF), i)      # -0.0 and +0.0 both map to 0
    return np.abs(ordered(a) - ordered(b))


# %% Exercise 2
def my_eps_error(y, gamma, mean, var, eps_right, eps_wrong):
    """max |BN_eps_wrong(y) - BN_eps_right(y)| over all entries, in float64."""
    y = np.asarray(y, dtype=np.float64)
    g, m, v = (np.asarray(t, dtype=np.float64).reshape(1, -1, 1, 1) for t in (gamma, mean, var))
    # beta cancels: the outputs differ by gamma (y - mu) (1/sqrt(v + e') - 1/sqrt(v + e))
    diff = g * (y - m) * (1 / np.sqrt(v + eps_wrong) - 1 / np.sqrt(v + eps_right))
    return float(np.abs(diff).max())


# %% Exercise 3
SE_PARTS = ("avgpool", "fc1", "fc2", "activation", "scale_activation")


def locate(rows):
    """(name of the module holding the bug, one of CAUSES) from comparison rows."""
    first = first_failure(rows)                 # innermost first: the module that diverges
    parts = first.name.split(".")
    if parts[0] == "features" and len(parts) == 2:
        # a block itself, and all its children (listed before it) agreed: what the block adds
        # to them is wrong, and an inverted residual adds only the skip connection
        return first.name, "residual add"
    if any(p in SE_PARTS for p in parts[2:]):
        return first.name, "squeeze-excite"
    return first.name, {"0": "convolution", "1": "batch norm", "2": "activation"}[parts[-1]]
