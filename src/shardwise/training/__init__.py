"""Training checkpoints: ``save_checkpoint`` / ``load_checkpoint`` in NxD's layout (see :mod:`.api`)."""

from .api import finalize_checkpoint, load_checkpoint, save_checkpoint

__all__ = ["save_checkpoint", "load_checkpoint", "finalize_checkpoint"]
