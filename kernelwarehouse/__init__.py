"""KernelWarehouse as a library whose name collides with nothing: ``kernelwarehouse.models`` and
``kernelwarehouse.modules`` are this repository's ``models/`` and ``modules/``.

Inside a project that has its own ``models`` or ``modules`` package (most vision repositories),
``import models`` finds the project's; ``import kernelwarehouse.models`` always finds ours. In a
checkout or an editable install the two packages sit next to this folder, at the repository root.
"""
from pathlib import Path

_REPOSITORY = Path(__file__).resolve().parent.parent
if (_REPOSITORY / 'models' / '_builder.py').is_file():
    __path__.append(str(_REPOSITORY))  # noqa: F821  (a package's __path__)
