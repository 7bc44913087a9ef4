"""One drafter implementation per kind, behind the `Drafter` interface of `base.py`."""

from specdiff_jax.decode.drafters.ar import ARDrafter
from specdiff_jax.decode.drafters.base import Drafter
from specdiff_jax.decode.drafters.bidir import BidirDrafter
from specdiff_jax.decode.drafters.block import BlockDrafter
from specdiff_jax.decode.drafters.none import NoDrafter

DRAFTERS: dict[str, Drafter] = {d.kind: d for d in (NoDrafter(), ARDrafter(), BlockDrafter(), BidirDrafter())}

__all__ = ["ARDrafter", "BidirDrafter", "BlockDrafter", "DRAFTERS", "Drafter", "NoDrafter"]
