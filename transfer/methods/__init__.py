"""The transfer methods, one file each; every file registers its method with ``@TRANSFER_METHODS.register``.

Importing this package imports every method file, which fills ``dmlkd.registry.TRANSFER_METHODS``. Build
one with ``TRANSFER_METHODS.build(name, TransferContext(...), **options)``; ``TRANSFER_METHODS.options(name)``
lists its options and their defaults.
"""

from __future__ import annotations

from dmlkd.registry import import_submodules

import_submodules(__name__, __path__)
