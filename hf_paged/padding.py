"""Left padding only: find pads after real tokens in a padding mask, and say what to do about them.

The paged path stores only real tokens and aligns every row's new tokens at its end, which gives
exactly stock's tokens for left padding only; right padding and holes would silently differ.
"""

import torch


def padding_holes(attention_mask: torch.Tensor) -> torch.Tensor:
    """[batch, length] bool: True where a pad (0) follows a real token (1) of the same row."""
    mask = attention_mask.to(torch.int8)
    return mask.cummax(dim=1).values > mask


def raise_padding_error(holes: torch.Tensor) -> None:
    """Raise the ValueError for the first row with a hole (`holes` from padding_holes)."""
    row = int(holes.any(dim=1).nonzero()[0, 0])
    raise ValueError(
        f"hf_paged needs left padding: row {row} of attention_mask has padding (0) after a real token (1) "
        '(right padding, or a hole). Pad on the left: tokenizer.padding_side = "left", as generate() '
        "expects for decoder-only models"
    )


def check_left_padding(attention_mask: torch.Tensor) -> None:
    """Raise ValueError when a row of a 2-D padding mask `[batch, length]` has a pad after a real token."""
    holes = padding_holes(attention_mask)
    if bool(holes.any()):
        raise_padding_error(holes)
