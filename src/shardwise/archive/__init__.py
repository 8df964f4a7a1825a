"""Model archives in NeMo's ``.nemo`` layout: reading in place, writing by streaming, save/restore.

See :mod:`.layout` (member names), :mod:`.reader`, :mod:`.writer`, :mod:`.artifacts`,
:mod:`.manifest`, :mod:`.api` (``save_to``/``restore_from``/``ArchiveMixin``) and :mod:`.unpack`.
"""

from .api import ArchiveMixin, RestoredArchive, load_weights_into, restore_from, save_to
from .reader import Archive

__all__ = ["Archive", "ArchiveMixin", "RestoredArchive", "load_weights_into", "restore_from", "save_to"]
