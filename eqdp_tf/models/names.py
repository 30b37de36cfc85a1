"""The models' names as plain data (no TensorFlow): what ``config`` validates flags against."""

ARCHITECTURES = ("eq_resnet9", "wrn16_4")
# 'paper': 2x2 average pool + linear (as the official code); 'invariant': global average pool + linear.
HEADS = ("paper", "invariant")


def restricted_group(restrict):
    """The subgroup named by a --restrict value, or None for no restriction (None, '', 'none' in any case)."""
    return None if restrict is None or str(restrict).strip().lower() in ("", "none") else str(restrict)
