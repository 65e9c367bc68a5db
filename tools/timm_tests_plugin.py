"""pytest plugin: run timm's own model tests (``tests/test_models.py`` of timm's source) on our models.

timm's test file lists its models with ``timm.list_models()`` when it is imported, so the models must be
registered first: load this plugin with ``-p timm_tests_plugin`` (``PYTHONPATH=tools``); it imports
``models`` from this repository. timm chooses some tests by a model's name or module (``deit*`` for the
ViT checks, module ``efficientnet`` for MobileNetV2's intermediates); the plugin lets each KW model and
plain baseline take the tests of the timm model it derives from. Commands: docs/development.md.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import timm  # noqa: E402
from timm.models import _registry  # noqa: E402

import models  # noqa: E402

PREFIXES = ('kw_', 'kw1d2x_', 'plain_')
_list_models = timm.list_models


def _with_prefixes(patterns):
    """timm's name patterns, each also with our prefixes (``deit*`` also selects ``kw_deit*``)."""
    if not patterns:
        return patterns
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    return patterns + [prefix + p for p in patterns for prefix in PREFIXES if not p.startswith('*')]


def list_models(filter='', module='', pretrained=False, exclude_filters='', name_matches_cfg=False,
                include_tags=None):
    return _list_models(_with_prefixes(filter), module, pretrained, _with_prefixes(exclude_filters),
                        name_matches_cfg, include_tags)


timm.list_models = timm.models.list_models = list_models
# timm's MobileNetV2 lives in its efficientnet module, where timm looks for models with intermediates
_registry._module_to_models['efficientnet'].update(_registry._module_to_models['mobilenetv2'])
assert set(models.REGISTERED_NAMES) <= set(_list_models())
