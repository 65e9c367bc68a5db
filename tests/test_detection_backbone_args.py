"""The detection backbones take mmdetection's backbone arguments as mmdet's own ResNet takes them.

``init_cfg`` with mmengine's ``PretrainedInit`` options (``prefix``, ``map_location``) and checkpoint
schemes, loaded safely and strictly; ``with_cp``; ``norm_cfg`` (``BN``, ``SyncBN``, ``LN``,
``requires_grad``); ``in_channels``; the plugin imported by a config outside the repository; and timm's
``features_only`` route to the same features. Needs the detection stack; skipped without it.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch

pytest.importorskip('mmdet', reason='the detection stack is not installed; run "bash detection/install.sh"')

import timm  # noqa: E402
import torchvision  # noqa: E402
from mmdet.models.backbones import ResNet  # noqa: E402
from mmdet.registry import MODELS  # noqa: E402
from mmdet.utils import register_all_modules  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.runner.checkpoint import get_torchvision_models  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.modules.batchnorm import _BatchNorm  # noqa: E402

import models  # noqa: E402
from detection.kw_mmdet import ClassifierBackbone, backbones  # noqa: E402
# utils.py under the name the plugin imports it by, so that its errors are these classes
from kernelwarehouse.utils import CheckpointError, UserError  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MOBILENET_CONFIG = ROOT / 'detection' / 'configs' / 'mask_rcnn_kw1x_mobilenetv2_100_fpn_1x_coco.py'

register_all_modules()


def _backbone(**cfg) -> ClassifierBackbone:
    return MODELS.build(cfg)


def _pretrained(checkpoint, **options) -> dict:
    return dict(type='Pretrained', checkpoint=str(checkpoint), **options)


def _save_classification_checkpoint(model: nn.Module, path: Path) -> Path:
    torch.save({'model': model.state_dict(), 'epoch': 299}, path)
    return path


def _save_detector_checkpoint(backbone_state: dict, path: Path) -> Path:
    """Laid out as mmengine saves a detector: weights under ``state_dict``, the backbone's under ``backbone.``."""
    state = {f'backbone.{k}': v for k, v in backbone_state.items()}
    state['neck.lateral_convs.0.conv.weight'] = torch.zeros(256, 8, 1, 1)
    torch.save({'meta': {'epoch': 12, 'mmengine_version': '0.10.7'}, 'state_dict': state}, path)
    return path


def _torch_hub_file(name: str, torch_home: Path) -> Path:
    """Where torch.hub keeps the download of ``torchvision://<name>``: a file there is loaded, not downloaded."""
    path = torch_home / 'hub' / 'checkpoints' / Path(urlparse(get_torchvision_models()[name]).path).name
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


class _MakesDirectory:
    """Unpickles as ``os.makedirs(path)``: runs code if the loader lets it."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return os.makedirs, (self.path,)


# ---------------------------------------------------------------------------------------------
# init_cfg: mmengine's PretrainedInit options and checkpoint schemes
# ---------------------------------------------------------------------------------------------

def test_prefix_takes_the_backbone_out_of_a_detectors_checkpoint(tmp_path):
    torch.manual_seed(0)
    source = _backbone(type='KW_MobileNetV2', widen_factor=0.5)
    checkpoint = _save_detector_checkpoint(source.state_dict(), tmp_path / 'mask_rcnn.pth')
    for prefix in ('backbone.', 'backbone'):  # mmengine adds the dot when it is missing
        torch.manual_seed(1)
        backbone = _backbone(type='KW_MobileNetV2', widen_factor=0.5, init_cfg=_pretrained(checkpoint, prefix=prefix))
        assert not torch.equal(backbone.warehouse_manager.weights[1], source.warehouse_manager.weights[1])
        backbone.init_weights()
        assert backbone.state_dict().keys() == source.state_dict().keys()
        assert all(torch.equal(v, source.state_dict()[k]) for k, v in backbone.state_dict().items())

    without_prefix = _backbone(type='KW_MobileNetV2', widen_factor=0.5, init_cfg=_pretrained(checkpoint))
    with pytest.raises(CheckpointError, match=r"mask_rcnn\.pth holds these weights under 'backbone\.' \(the checkpoint "
                                              r"of a detector\?\); add prefix='backbone\.' to init_cfg\.$"):
        without_prefix.init_weights()
    wrong_prefix = _backbone(type='KW_MobileNetV2', widen_factor=0.5, init_cfg=_pretrained(checkpoint, prefix='head.'))
    with pytest.raises(CheckpointError, match=r"mask_rcnn\.pth has no weights under prefix 'head\.' \(its keys start "
                                              r"with 'backbone\.', 'neck\.'\); set init_cfg's prefix to one of those"):
        wrong_prefix.init_weights()


def test_plain_resnet_loads_what_mmdets_resnet_loads(tmp_path, monkeypatch):
    """``torchvision://resnet18`` (through mmengine's loader; the download stands in the torch hub cache)
    and a detector's checkpoint with ``prefix='backbone.'`` give Plain_ResNet exactly the features that
    mmdetection's ResNet gets from them; ``map_location`` reaches torch.load."""
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    torchvision_weights = torchvision.models.resnet18().state_dict()
    torch.save(torchvision_weights, _torch_hub_file('resnet18', tmp_path / 'torch'))
    mmdet_weights = ResNet(depth=18).state_dict()
    detector = _save_detector_checkpoint(mmdet_weights, tmp_path / 'mask_rcnn_r18.pth')
    x = torch.randn(1, 3, 32, 32)
    for checkpoint, prefix, weights in (('torchvision://resnet18', None, torchvision_weights),
                                        (detector, 'backbone.', mmdet_weights)):
        locations = []
        theirs = ResNet(depth=18, init_cfg=_pretrained(checkpoint, prefix=prefix))
        theirs.init_weights()
        ours = _backbone(type='Plain_ResNet', depth=18, init_cfg=_pretrained(
            checkpoint, prefix=prefix, map_location=lambda storage, location: locations.append(location) or storage))
        ours.init_weights()
        assert torch.equal(ours.layer4[1].conv2.weight, weights['layer4.1.conv2.weight'])
        assert locations  # torch.load called it for the stored tensors
        theirs.eval(), ours.eval()
        with torch.no_grad():
            assert all(torch.equal(a, b) for a, b in zip(theirs(x), ours(x)))


def test_checkpoints_needing_code_are_refused_by_every_scheme(tmp_path, monkeypatch):
    """mmengine downloads through torch.hub, which unpickles anything; the plugin loads every scheme with
    weights_only=True, also when the environment asks torch for the opposite, and puts the environment back.
    A name mmengine does not know is one sentence too."""
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    monkeypatch.setenv('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD', '1')
    monkeypatch.delenv('TORCH_FORCE_WEIGHTS_ONLY_LOAD', raising=False)
    cached = _torch_hub_file('resnet18', tmp_path / 'torch')
    marker = tmp_path / 'code_ran'
    local = tmp_path / 'local.pth'
    for path in (cached, local):
        torch.save({'state_dict': {'conv1.weight': torch.zeros(1)}, 'payload': _MakesDirectory(marker)}, path)
    for checkpoint in ('torchvision://resnet18', str(local)):
        backbone = _backbone(type='Plain_ResNet', depth=18, init_cfg=_pretrained(checkpoint))
        with pytest.raises(CheckpointError, match=r'needs arbitrary code to unpickle, which may be unsafe; if you '
                                                  r'trust its source, save its weights alone with torch\.save\('
                                                  r'state_dict, path\) and load that file\.$'):
            backbone.init_weights()
    assert not marker.exists()
    assert os.environ['TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD'] == '1' and 'TORCH_FORCE_WEIGHTS_ONLY_LOAD' not in os.environ
    misspelt = _backbone(type='Plain_ResNet', depth=18, init_cfg=_pretrained('torchvision://resnet5'))
    with pytest.raises(CheckpointError, match=r"mmengine knows no checkpoint named 'resnet5' for "
                                              r"torchvision://resnet5; check the name\.$"):
        misspelt.init_weights()


def test_bad_init_cfg_and_norm_cfg_are_named():
    with pytest.raises(UserError, match=r"init_cfg must be None or dict\(type='Pretrained', checkpoint=\.\.\., prefix="
                                        r"\.\.\., map_location=\.\.\.\); \['strict'\] are not options of mmengine's "
                                        r"PretrainedInit\."):
        _backbone(type='KW_ResNet', depth=18, init_cfg=_pretrained('x.pth', strict=True))
    with pytest.raises(UserError, match=r'checkpoint is missing or empty\.'):
        _backbone(type='KW_ResNet', depth=18, init_cfg=dict(type='Pretrained', prefix='backbone.'))
    with pytest.raises(UserError, match=r"norm_cfg must be dict\(type='BN' or 'SyncBN', requires_grad=True or False\) "
                                        r"\(the ImageNet model's BatchNorms, synchronised across processes or not\), "
                                        r"got \{'type': 'GN'"):
        _backbone(type='KW_ResNet', depth=18, norm_cfg=dict(type='GN', num_groups=32))
    with pytest.raises(UserError, match=r"KW_ConvNeXt: norm_cfg must be dict\(type='LN' or 'LN2d', .*\(ConvNeXt "
                                        r"normalises with LayerNorm, which has no BatchNorm or SyncBN form\)"):
        _backbone(type='KW_ConvNeXt', norm_cfg=dict(type='SyncBN'))
    with pytest.raises(UserError, match=r'in_channels must be a positive whole number, got 0\.'):
        _backbone(type='KW_MobileNetV2', widen_factor=0.5, in_channels=0)


# ---------------------------------------------------------------------------------------------
# with_cp, norm_cfg, in_channels
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('cfg, num_segments, deepest', [
    # the stem, then block by block, up to the deepest output
    (dict(type='KW_ResNet', depth=18, out_indices=(0, 1)), 1 + 2 + 2, 'layer2.1.bn2.weight'),
    (dict(type='KW_MobileNetV2', widen_factor=0.5, out_indices=(0, 1)), 1 + 1 + 2, 'features.3.conv.3.weight'),
], ids=['resnet18', 'mobilenetv2_050'])
def test_with_cp_gives_the_same_outputs_and_gradients(monkeypatch, cfg, num_segments, deepest):
    """float64 (at 16 px: torch's float64 grouped convs are slow on CPUs), BatchNorm on batch statistics
    and drop path: recomputation replays the same random numbers, so outputs and gradients equal those
    without checkpointing. Off in eval mode and without grad."""
    calls = []

    def counting_checkpoint(function, *args, **kwargs):
        calls.append(kwargs['use_reentrant'])
        return torch.utils.checkpoint.checkpoint(function, *args, **kwargs)

    monkeypatch.setattr(backbones, 'checkpoint', counting_checkpoint)
    plain = _backbone(**cfg, norm_eval=False, drop_path_rate=0.2).double().train()
    recomputed = _backbone(**cfg, norm_eval=False, drop_path_rate=0.2, with_cp=True).double().train()
    recomputed.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    results = []
    for backbone in (plain, recomputed):
        torch.manual_seed(0)
        image = x.clone().requires_grad_()
        outputs = backbone(image)
        sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)).sum() for o in outputs).backward()
        grads = {name: p.grad for name, p in backbone.named_parameters() if p.grad is not None}
        results.append((outputs, grads, image.grad))
    assert calls == [False] * num_segments
    (outputs, grads, image_grad), (cp_outputs, cp_grads, cp_image_grad) = results
    assert all(torch.equal(a, b) for a, b in zip(outputs, cp_outputs))
    assert grads.keys() == cp_grads.keys() and {'warehouse_manager.weights.0', deepest} <= grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(cp_grads[name], grad, rtol=1e-12, atol=1e-12, msg=name)
    torch.testing.assert_close(cp_image_grad, image_grad, rtol=1e-12, atol=1e-12)

    calls.clear()
    with torch.no_grad():
        recomputed(x)
        recomputed.eval()(x)
    recomputed(x)
    assert calls == []


def test_sync_bn_turns_every_batchnorm_into_syncbatchnorm():
    """Those of the KW attentions (1-d) included; on the CPU without a process group torch's
    SyncBatchNorm normalises with this process's batch statistics, so it computes what BatchNorm does."""
    bn = _backbone(type='KW_ResNet', depth=18, out_indices=(0, 1), norm_eval=False).double().train()
    sync = _backbone(type='KW_ResNet', depth=18, out_indices=(0, 1), norm_eval=False,
                     norm_cfg=dict(type='SyncBN', requires_grad=True)).double().train()
    sync.load_state_dict(bn.state_dict())  # the same keys
    bn_types = [type(m) for m in bn.modules() if isinstance(m, _BatchNorm)]
    assert nn.BatchNorm1d in bn_types and nn.BatchNorm2d in bn_types
    assert [type(m) for m in sync.modules() if isinstance(m, _BatchNorm)] == [nn.SyncBatchNorm] * len(bn_types)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    outputs = [backbone(x) for backbone in (bn, sync)]
    assert all(torch.equal(a, b) for a, b in zip(*outputs))
    for out in outputs:
        out[-1].sum().backward()
    torch.testing.assert_close(sync.layer1[0].conv1.attention.norm1.weight.grad,
                               bn.layer1[0].conv1.attention.norm1.weight.grad, rtol=1e-12, atol=1e-12)
    assert not any(m.training for m in _backbone(type='KW_ResNet', depth=18, norm_cfg=dict(type='SyncBN')).train()
                   .modules() if isinstance(m, _BatchNorm))  # norm_eval, the default

    cfg = Config.fromfile(MOBILENET_CONFIG)
    cfg.merge_from_dict({'model.backbone.norm_cfg': dict(type='SyncBN', requires_grad=True)})
    detector = MODELS.build(cfg.model)
    assert isinstance(detector.backbone.features[1].conv[0][0].attention.norm1, nn.SyncBatchNorm)
    assert not any(type(m) in (nn.BatchNorm1d, nn.BatchNorm2d) for m in detector.backbone.modules())


def test_norm_requires_grad_false_freezes_every_norm_layer():
    backbone = _backbone(type='KW_ResNet', depth=18, out_indices=(0,), norm_eval=False,
                         norm_cfg=dict(type='BN', requires_grad=False)).train()
    norms = {p for m in backbone.modules() if isinstance(m, _BatchNorm) for p in m.parameters()}
    assert backbone.layer1[0].conv1.attention.norm1.weight in norms
    assert all(p.requires_grad != (p in norms) for p in backbone.parameters())
    backbone(torch.randn(2, 3, 16, 16))[0].sum().backward()
    assert backbone.bn1.weight.grad is None and backbone.conv1.weight.grad is not None

    convnext = _backbone(type='KW_ConvNeXt', out_indices=(0,), norm_cfg=dict(type='LN', requires_grad=False))
    layer_norms = {p for m in convnext.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
    assert convnext.norm0.weight in layer_norms and convnext.stages[0][0].norm.weight in layer_norms
    assert all(p.requires_grad != (p in layer_norms) for p in convnext.parameters())


def test_in_channels_adapts_a_plain_first_conv_as_timm_does(tmp_path):
    """KW ResNet's first conv is plain: its 3-channel weight is summed for in_channels=1, so a grey
    image gives the features of the RGB model on the image repeated three times. A KW stem cannot be adapted."""
    classifier = models.create_model('kw_resnet18')
    checkpoint = _save_classification_checkpoint(classifier, tmp_path / 'kw_resnet18.pth')
    grey = _backbone(type='KW_ResNet', depth=18, in_channels=1, init_cfg=_pretrained(checkpoint))
    rgb = _backbone(type='KW_ResNet', depth=18, init_cfg=_pretrained(checkpoint))
    grey.init_weights(), rgb.init_weights()
    assert torch.equal(grey.conv1.weight, classifier.conv1.weight.sum(1, keepdim=True))
    x = torch.randn(2, 1, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        features = grey.double().eval()(x)
        expected = rgb.double().eval()(x.expand(-1, 3, -1, -1))
    # The summed weight is rounded to float32 once, the RGB model's three products are not.
    for out, ref in zip(features, expected):
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)

    mobilenet = _save_classification_checkpoint(models.create_model('kw_mobilenetv2_050'), tmp_path / 'mbv2.pth')
    kw_stem = _backbone(type='KW_MobileNetV2', widen_factor=0.5, in_channels=1, init_cfg=_pretrained(mobilenet))
    with pytest.raises(CheckpointError, match=r'mbv2\.pth was trained on another number of input channels than '
                                              r'in_channels=1, and the stem of KW_MobileNetV2 is a KW conv '
                                              r'\(features\.0\.0\), .*use in_channels=3 or no init_cfg\.$'):
        kw_stem.init_weights()


# ---------------------------------------------------------------------------------------------
# The installed plugin, and timm's own route to the features
# ---------------------------------------------------------------------------------------------

def test_a_config_builds_outside_the_repository_without_pythonpath(tmp_path):
    """After ``pip install -e .``, ``custom_imports=['detection.kw_mmdet']`` finds the plugin from any
    directory; a project's own ``utils.py`` there is never imported (the plugin uses kernelwarehouse.utils)."""
    (tmp_path / 'utils.py').write_text("raise ImportError(\"the project's own utils was imported\")\n")
    code = textwrap.dedent('''
        import sys
        from mmdet.registry import MODELS
        from mmdet.utils import register_all_modules
        from mmengine.config import Config
        register_all_modules()
        detector = MODELS.build(Config.fromfile(sys.argv[1]).model)
        print(type(detector.backbone).__name__, sys.modules['detection'].__file__,
              sys.modules['kernelwarehouse.utils'].__file__, 'utils' in sys.modules)
    ''')
    env = {key: value for key, value in os.environ.items() if key != 'PYTHONPATH'}
    result = subprocess.run([sys.executable, '-c', code, str(MOBILENET_CONFIG)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-4:] == ['KW_MobileNetV2', str(ROOT / 'detection' / '__init__.py'),
                                          str(ROOT / 'utils.py'), 'False']


def test_timm_features_only_gives_the_backbones_features(tmp_path):
    """docs/detection.md: ``timm.create_model(..., features_only=True)`` with the same local checkpoint
    returns exactly what the KW_ResNet backbone returns."""
    checkpoint = _save_classification_checkpoint(models.create_model('kw_resnet18'), tmp_path / 'kw_resnet18.pth')
    features = timm.create_model('kw_resnet18', features_only=True, out_indices=(1, 2, 3, 4), pretrained=True,
                                 pretrained_cfg_overlay=dict(file=str(checkpoint))).eval()
    backbone = _backbone(type='KW_ResNet', depth=18, init_cfg=_pretrained(checkpoint))
    backbone.init_weights()
    assert features.feature_info.channels() == [64, 128, 256, 512]
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(features(x), backbone.eval()(x)))
