"""The stage-1 losses, one file each; every file registers its loss with ``@TEACHER_LOSSES.register(name)``.

Importing this package imports every loss file, which fills ``dmlkd.registry.TEACHER_LOSSES``. A loss is
built as ``TEACHER_LOSSES.build(name, num_classes, embedding_dim, **options)``; its options are its
annotated keyword parameters, checked by the registry.
"""

from __future__ import annotations

from dmlkd.registry import import_submodules

import_submodules(__name__, __path__)
