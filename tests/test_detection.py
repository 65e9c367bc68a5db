"""COCO detection plugin (detection/): KW backbones in mmdetection 3.x, the configs and the entry points.

Needs the detection stack (``bash detection/install.sh``); skipped without it.
"""
import argparse
import copy
import json
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip('mmdet', reason='the detection stack is not installed; run "bash detection/install.sh"')

from mmengine.config import Config  # noqa: E402
from mmengine.optim import build_optim_wrapper  # noqa: E402
from mmdet.datasets import CocoDataset  # noqa: E402
from mmdet.registry import MODELS  # noqa: E402
from mmdet.testing import demo_mm_inputs  # noqa: E402
from mmdet.utils import register_all_modules  # noqa: E402
from PIL import Image  # noqa: E402

import models  # noqa: E402
from detection.kw_mmdet import ClassifierBackbone  # noqa: E402
# utils.py under the name the plugin imports it by, so that its errors are these classes
from kernelwarehouse.utils import CheckpointError, UserError, load_checkpoint_file  # noqa: E402
from modules.kernel_warehouse import Attention, KWConvNd  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / 'detection' / 'configs').glob('mask_rcnn_*.py'))
KW_CONFIG_PER_FAMILY = ['mask_rcnn_kw1x_resnet50_fpn_1x_coco', 'mask_rcnn_kw1x_mobilenetv2_100_fpn_1x_coco',
                        'mask_rcnn_kw1x_convnext_tiny_fpn_1x_coco']

# Fewer proposals and sampled RoIs than the configs' (1000-2000 and 512): the CPU time of the
# RoI heads then stays small next to the backbone's.
LIGHT_ROI_SETTINGS = dict(
    train_cfg=dict(rpn_proposal=dict(nms_pre=200, max_per_img=100), rcnn=dict(sampler=dict(num=64))),
    test_cfg=dict(rpn=dict(nms_pre=200, max_per_img=100), rcnn=dict(max_per_img=20)))

register_all_modules()


def _config(name: str) -> Config:
    return Config.fromfile(ROOT / 'detection' / 'configs' / f'{name}.py')


def _backbone(**cfg) -> ClassifierBackbone:
    return MODELS.build(cfg)


def _save_classification_checkpoint(model: torch.nn.Module, path: Path) -> Path:
    """A checkpoint laid out as main.py writes them."""
    state = model.state_dict()
    torch.save({'model': state, 'optimizer': {'state': {}, 'param_groups': []}, 'epoch': 299,
                'args': argparse.Namespace(model='kw_resnet50'), 'model_ema': state}, path)
    return path


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------

def test_the_released_set_of_configs_is_there():
    names = {p.stem for p in CONFIGS}
    assert names == {f'mask_rcnn_{m}_fpn_1x_coco' for m in (
        'resnet50', 'kw1x_resnet50', 'kw4x_resnet50', 'mobilenetv2_100', 'kw1x_mobilenetv2_100',
        'kw4x_mobilenetv2_100', 'convnext_tiny', 'kw1x_convnext_tiny')}


@pytest.mark.parametrize('path', CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_builds_and_fits_its_imagenet_checkpoint(path):
    """The detector builds; its backbone has exactly the keys and shapes of the classification
    model that the config's pretrained checkpoint comes from, and feeds the FPN the channels it expects."""
    cfg = Config.fromfile(path)
    detector = MODELS.build(cfg.model)
    backbone = detector.backbone
    checkpoint_name = Path(cfg.model.backbone.init_cfg.checkpoint).stem
    classification_config, = (ROOT / 'configs').glob(f'*/{checkpoint_name}.json')
    classifier = models.create_model_from_config(json.loads(classification_config.read_text()))
    expected = {k: v.shape for k, v in classifier.state_dict().items()
                if k.split('.')[0] not in backbone.head_modules}
    actual = {k: v.shape for k, v in backbone.state_dict().items() if k.split('.')[0] not in backbone.new_modules()}
    assert actual == expected
    with torch.no_grad():
        features = backbone.eval()(torch.zeros(1, 3, 64, 64))
    assert [f.shape[1] for f in features] == list(cfg.model.neck.in_channels)


def test_recipe():
    cfg = _config('mask_rcnn_kw1x_resnet50_fpn_1x_coco')
    assert cfg.optim_wrapper.optimizer == dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05)
    assert cfg.train_cfg.max_epochs == 12 and cfg.train_dataloader.batch_size == 2
    warmup, steps = cfg.param_scheduler
    assert (warmup.type, warmup.end, warmup.by_epoch) == ('LinearLR', 500, False)
    assert steps.milestones == [8, 11]
    assert sorted(cfg.val_evaluator.metric) == ['bbox', 'segm']
    convnext = _config('mask_rcnn_kw1x_convnext_tiny_fpn_1x_coco')
    assert convnext.param_scheduler[1].milestones == [9, 11]
    assert convnext.model.backbone.drop_path_rate == 0.4
    assert convnext.optim_wrapper.paramwise_cfg == dict(decay_rate=0.95, decay_type='layer_wise', num_layers=6)


def test_multi_scale_autoaugment_pipeline():
    """The training pipeline resizes the short side to 480-800 (at most 1333 long), through either branch."""
    from mmcv.transforms import Compose
    from mmdet.structures.mask import PolygonMasks

    pipeline = Compose(_config('mask_rcnn_kw1x_resnet50_fpn_1x_coco').train_pipeline[2:])  # after loading
    rng = np.random.default_rng(0)
    short_sides = set()
    for _ in range(30):
        results = dict(img=rng.integers(0, 255, (300, 400, 3), dtype=np.uint8), img_shape=(300, 400),
                       ori_shape=(300, 400), gt_bboxes=np.array([[10., 20., 200., 250.]], dtype=np.float32),
                       gt_bboxes_labels=np.array([0]), gt_ignore_flags=np.array([False]),
                       gt_masks=PolygonMasks([[np.array([10., 20., 200., 20., 200., 250.])]], 300, 400))
        out = pipeline(results)
        height, width = out['inputs'].shape[1:]
        assert 480 <= min(height, width) <= 800 and max(height, width) <= 1333
        short_sides.add(min(height, width))
    assert len(short_sides) > 3  # the scale is random


def test_convnext_layer_wise_lr_decay_reaches_our_parameter_names():
    cfg = _config('mask_rcnn_kw1x_convnext_tiny_fpn_1x_coco')
    optimizer = build_optim_wrapper(MODELS.build(cfg.model), cfg.optim_wrapper).optimizer
    lr_of = {}
    for group in optimizer.param_groups:
        for param_name in group['param_names']:
            lr_of[param_name] = group['lr']
    stem, deepest = lr_of['backbone.downsample_layers.0.0.bias'], lr_of['backbone.stages.3.2.pwconv2.bias']
    assert stem == pytest.approx(1e-4 * 0.95 ** 7) and deepest == pytest.approx(1e-4 * 0.95)
    assert lr_of['backbone.warehouse_manager.weights.0'] == pytest.approx(1e-4)  # like the heads


def test_no_weight_decay_on_norms():
    cfg = _config('mask_rcnn_kw1x_resnet50_fpn_1x_coco')
    detector = MODELS.build(cfg.model)
    optimizer = build_optim_wrapper(detector, cfg.optim_wrapper).optimizer
    decay = {id(p): g['weight_decay'] for g in optimizer.param_groups for p in g['params']}
    backbone = detector.backbone
    assert decay[id(backbone.layer2[0].bn1.weight)] == 0 and decay[id(backbone.layer2[0].conv2.attention.norm1.weight)] == 0
    assert decay[id(backbone.warehouse_manager.weights[1])] == 0.05


# ---------------------------------------------------------------------------------------------
# Backbones
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', KW_CONFIG_PER_FAMILY)
def test_loss_and_backward_on_two_images(name):
    cfg = _config(name)
    cfg.merge_from_dict(dict(model=LIGHT_ROI_SETTINGS))
    # Without ImageNet weights, a KW MobileNetV2 at temperature 0 with frozen BatchNorm statistics
    # shrinks its activations layer after layer (each kernel is a signed mix of many random cells)
    # until the gradients vanish; batch statistics keep them alive, as trained weights do.
    cfg.model.backbone.norm_eval = False
    detector = MODELS.build(cfg.model).train()
    data = detector.data_preprocessor(demo_mm_inputs(2, [(3, 64, 64), (3, 64, 96)], num_classes=80, with_mask=True),
                                      training=True)
    losses = detector(**data, mode='loss')
    assert {'loss_rpn_cls', 'loss_cls', 'loss_bbox', 'loss_mask'} <= set(losses)
    total = sum(v.sum() if isinstance(v, torch.Tensor) else sum(v) for k, v in losses.items() if 'loss' in k)
    assert torch.isfinite(total)
    total.backward()
    trainable = [w for w in detector.backbone.warehouse_manager.weights if w.requires_grad]
    assert trainable and all(w.grad is not None and w.grad.abs().sum() > 0 for w in trainable)
    assert {m.temperature for m in detector.modules() if isinstance(m, Attention)} == {0.0}


@pytest.mark.parametrize('family, args, model_name, channels, new_keys', [
    ('ResNet', dict(depth=50), 'resnet50', [256, 512, 1024, 2048], 0),
    ('MobileNetV2', dict(widen_factor=1.0), 'mobilenetv2_100', [24, 32, 96, 1280], 0),
    ('ConvNeXt', dict(arch='tiny'), 'convnext_tiny', [96, 192, 384, 768], 8),
])
@pytest.mark.parametrize('kw', [False, True], ids=['plain', 'kw'])
def test_multi_scale_features_are_the_classification_models(tmp_path, family, args, model_name, channels, new_keys,
                                                            kw):
    """Outputs at strides 4-32 with the family's channels; the deepest is the classification model's
    ``forward_features`` (through the output LayerNorm for ConvNeXt) once its checkpoint is loaded."""
    classifier = models.create_model(f'kw_{model_name}' if kw else model_name).eval()
    checkpoint = _save_classification_checkpoint(classifier, tmp_path / 'imagenet.pth')
    backbone = _backbone(type=f'{"KW" if kw else "Plain"}_{family}', **args,
                         init_cfg=dict(type='Pretrained', checkpoint=str(checkpoint)))
    backbone.init_weights()
    assert len(backbone.state_dict()) == len(classifier.state_dict()) - len(
        [k for k in classifier.state_dict() if k.split('.')[0] in backbone.head_modules]) + new_keys
    x = torch.randn(2, 3, 64, 96, dtype=torch.float64)  # float64: equal whatever kernels each path gets
    with torch.no_grad():
        features = backbone.double().eval()(x)
        expected = classifier.double().forward_features(x)
    assert [tuple(f.shape) for f in features] == [(2, c, 64 // s, 96 // s) for c, s in zip(channels, (4, 8, 16, 32))]
    if family == 'ConvNeXt':
        expected = backbone.norm3(expected)
    torch.testing.assert_close(features[-1], expected)


def test_kw_resnet50_loads_our_classification_checkpoint(tmp_path):
    classifier = models.create_model('kw_resnet50', num_classes=10)
    checkpoint = _save_classification_checkpoint(classifier, tmp_path / 'kw1x_resnet50.pth')
    backbone = _backbone(type='KW_ResNet', depth=50, init_cfg=dict(type='Pretrained', checkpoint=str(checkpoint)))
    backbone.init_weights()
    reference = classifier.state_dict()
    loaded = backbone.state_dict()
    assert set(loaded) == set(reference) - {'fc.weight', 'fc.bias'}
    for key, value in loaded.items():
        assert torch.equal(value, reference[key]), key


@pytest.mark.parametrize('layout', ['state_dict', 'bare'])
def test_original_release_layouts_load(tmp_path, layout):
    classifier = models.create_model('kw_resnet18')
    state = classifier.state_dict()
    torch.save({'state_dict': state} if layout == 'state_dict' else state, tmp_path / 'release.pth')
    backbone = _backbone(type='KW_ResNet', depth=18,
                         init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 'release.pth')))
    backbone.init_weights()
    assert torch.equal(backbone.warehouse_manager.weights[2], state['warehouse_manager.weights.2'])


def test_mismatched_checkpoint_names_the_keys(tmp_path):
    other = models.create_model('kw_resnet50', cell_num_ratio=2)
    checkpoint = _save_classification_checkpoint(other, tmp_path / 'kw2x_resnet50.pth')
    backbone = _backbone(type='KW_ResNet', depth=50, init_cfg=dict(type='Pretrained', checkpoint=str(checkpoint)))
    with pytest.raises(CheckpointError, match=r'wrong shape \(checkpoint vs model\): warehouse_manager\.weights\.0 '):
        backbone.init_weights()
    plain = _save_classification_checkpoint(models.create_model('resnet18'), tmp_path / 'resnet18.pth')
    backbone = _backbone(type='KW_ResNet', depth=18, init_cfg=dict(type='Pretrained', checkpoint=str(plain)))
    with pytest.raises(CheckpointError, match=r'resnet18\.pth does not fit this model \(\d+ missing: warehouse_manager\.weights\.0, .*'
                                              r'unexpected: layer1\.0\.conv1\.weight'):
        backbone.init_weights()


def test_bad_backbone_arguments_are_named():
    with pytest.raises(UserError, match=r"plain resnet50, which takes no KW settings \(\['cell_num_ratio'\]\)"):
        _backbone(type='Plain_ResNet', depth=50, cell_num_ratio=4)
    with pytest.raises(UserError, match=r"unknown argument\(s\) \['cell_ratio'\]"):
        _backbone(type='KW_ResNet', depth=18, cell_ratio=4)
    with pytest.raises(UserError, match=r'out_indices \(4,\) must be .* \[0, 3\]'):
        _backbone(type='KW_ResNet', depth=18, out_indices=(4,))
    with pytest.raises(UserError, match=r"init_cfg must be None or dict\(type='Pretrained'"):
        _backbone(type='KW_ResNet', depth=18, init_cfg=dict(type='Kaiming'))


def test_out_indices_pick_the_outputs():
    backbone = _backbone(type='KW_MobileNetV2', widen_factor=0.5, out_indices=(0, 2)).eval()
    with torch.no_grad():
        features = backbone(torch.randn(1, 3, 64, 64))
    assert [tuple(f.shape) for f in features] == [(1, 8, 32, 32), (1, 16, 8, 8)]  # rows 1 and 3 at width 0.5


def _trainable(module: torch.nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def test_frozen_stages_keep_a_shared_warehouse_trainable():
    """frozen_stages=1 freezes the stem and layer1 (attentions and norms included); layer1's
    warehouse also serves layer2.0.conv1 and its downsample, so it keeps training."""
    backbone = _backbone(type='KW_ResNet', depth=18, frozen_stages=1, norm_eval=False).train()
    assert not _trainable(backbone.conv1) and not _trainable(backbone.bn1) and not _trainable(backbone.layer1)
    assert not backbone.layer1.training and not backbone.bn1.training and backbone.layer2.training
    assert _trainable(backbone.layer2)
    shared = backbone.layer2[0].conv1
    assert isinstance(shared, KWConvNd) and shared.warehouse_id == backbone.layer1[0].conv1.warehouse_id
    assert all(w.requires_grad for w in backbone.warehouse_manager.weights)
    backbone(torch.randn(2, 3, 64, 64))[0].sum().backward()
    assert backbone.layer1[0].conv1.attention.fc1.weight.grad is None
    assert backbone.warehouse_manager.weights[0].grad.abs().sum() > 0

    everything = _backbone(type='KW_ResNet', depth=18, frozen_stages=4)
    assert not any(p.requires_grad for p in everything.parameters())
    # The stem of a KW MobileNetV2 has a warehouse of its own: frozen with the stem.
    mobilenet = _backbone(type='KW_MobileNetV2', frozen_stages=0)
    stem_warehouse = mobilenet.features[0][0].warehouse_id
    assert [w.requires_grad for w in mobilenet.warehouse_manager.weights].count(False) == 1
    assert not mobilenet.warehouse_manager.weights[stem_warehouse].requires_grad


def test_norm_eval_keeps_every_batchnorm_in_eval_mode():
    backbone = _backbone(type='KW_ResNet', depth=18, norm_eval=True).train()
    batchnorms = [m for m in backbone.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in batchnorms)  # the KW attentions'
    assert not any(m.training for m in batchnorms) and backbone.layer1.training


# ---------------------------------------------------------------------------------------------
# train.py and test.py on a tiny synthetic COCO
# ---------------------------------------------------------------------------------------------

def _make_coco(root: Path, num_images: int = 4) -> None:
    """Images with a rectangle and a triangle of COCO classes, polygon masks."""
    (root / 'images').mkdir(parents=True)
    (root / 'annotations').mkdir()
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        pixels = np.full((96, 128, 3), 90, dtype=np.uint8)
        x, y = (int(v) for v in rng.integers(4, 40, 2))
        pixels[y:y + 40, x:x + 50] = (200, 40, 40)
        triangle = [70., 80., 120., 80., 95., 30.]
        file_name = f'{image_id:04d}.jpg'
        Image.fromarray(pixels).save(root / 'images' / file_name)
        images.append(dict(id=image_id, file_name=file_name, height=96, width=128))
        for category_id, polygon in ((1, [x, y, x + 50, y, x + 50, y + 40, x, y + 40]), (3, triangle)):  # person, car
            xs, ys = polygon[0::2], polygon[1::2]
            box = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
            annotations.append(dict(id=len(annotations) + 1, image_id=image_id, category_id=category_id,
                                    segmentation=[[float(v) for v in polygon]], bbox=[float(v) for v in box],
                                    area=float(box[2] * box[3]), iscrowd=0))
    # All 80 classes, as in COCO: the model predicts each of them.
    categories = [dict(id=i + 1, name=name) for i, name in enumerate(CocoDataset.METAINFO['classes'])]
    (root / 'annotations' / 'tiny.json').write_text(
        json.dumps(dict(images=images, annotations=annotations, categories=categories)))


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_train_then_test_on_a_tiny_coco(tmp_path):
    """Two iterations of detection/train.py with COCO bbox/segm evaluation, then detection/test.py
    on the checkpoint it wrote."""
    _make_coco(tmp_path / 'coco')
    imagenet = _save_classification_checkpoint(models.create_model('kw_mobilenetv2_100'), tmp_path / 'imagenet.pth')
    model = dict(backbone=dict(init_cfg=dict(checkpoint=str(imagenet))), **copy.deepcopy(LIGHT_ROI_SETTINGS))
    model['test_cfg']['rcnn']['score_thr'] = 0.0  # an untrained model's boxes still reach the metric
    config = tmp_path / 'tiny.py'
    base = ROOT / 'detection' / 'configs' / 'mask_rcnn_kw1x_mobilenetv2_100_fpn_1x_coco.py'
    config.write_text(f'''
_base_ = {str(base)!r}
pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale=(128, 96), keep_ratio=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
dataset = dict(data_root={str(tmp_path / 'coco')!r} + '/', ann_file='annotations/tiny.json',
               data_prefix=dict(img='images/'), pipeline=pipeline)
train_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False, dataset=dataset)
val_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False, dataset=dataset)
test_dataloader = val_dataloader
val_evaluator = dict(ann_file={str(tmp_path / 'coco' / 'annotations' / 'tiny.json')!r})
test_evaluator = val_evaluator
train_cfg = dict(max_epochs=1)
default_hooks = dict(logger=dict(interval=1))
model = {model!r}
''')
    work_dir = tmp_path / 'work'
    train = _run('detection/train.py', str(config), '--work-dir', str(work_dir))
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    log = train.stdout + train.stderr
    num_backbone_tensors = len([k for k in load_checkpoint_file(imagenet)['model'] if not k.startswith('classifier.')])
    assert f'KW_MobileNetV2: loaded {num_backbone_tensors} tensors from {imagenet} (classifier head dropped' in log
    assert re.search(r'Epoch\(train\) \[1\]\[2/2\]', log), log[-3000:]
    assert re.search(r'coco/bbox_mAP: \d', log) and re.search(r'coco/segm_mAP: \d', log), log[-3000:]
    checkpoint = work_dir / 'epoch_1.pth'
    assert checkpoint.is_file()

    test = _run('detection/test.py', str(config), str(checkpoint), '--work-dir', str(tmp_path / 'test'))
    assert test.returncode == 0, test.stdout[-3000:] + test.stderr[-3000:]
    log = test.stdout + test.stderr
    assert re.search(r'Epoch\(test\).*coco/bbox_mAP: \d.*coco/segm_mAP: \d', log, re.S), log[-3000:]

    # mmengine itself (resuming) reads the checkpoint with torch's safe loader too.
    from mmengine.runner.checkpoint import _load_checkpoint
    assert 'message_hub' in _load_checkpoint(str(checkpoint), map_location='cpu')

    wrong = _run('detection/test.py', str(ROOT / 'detection/configs/mask_rcnn_mobilenetv2_100_fpn_1x_coco.py'),
                 str(checkpoint), '--work-dir', str(tmp_path / 'wrong'))
    assert wrong.returncode == 2
    assert re.search(r'^error: .*epoch_1\.pth does not fit this model \(\d+ missing: .*warehouse_manager', wrong.stderr,
                     re.M), wrong.stderr[-2000:]


class _GetAttr:
    """Pickles as ``getattr(owner, name)``, as mmengine's HistoryBuffer pickles its statistics."""

    def __init__(self, owner, name):
        self.owner, self.name = owner, name

    def __reduce__(self):
        return getattr, (self.owner, self.name)


def test_safe_loading_reads_mmengine_logs_and_nothing_more(tmp_path):
    """An mmengine message hub (HistoryBuffer, numpy values) loads with weights_only=True, also
    after a utils.py load (whose safe_globals block removes its own entries on exit); getattr is
    allowed for HistoryBuffer's statistics only."""
    from mmengine.logging import HistoryBuffer

    buffer = HistoryBuffer()
    for value in (np.float64(1.5), 2, 3.0):
        buffer.update(value)
    path = tmp_path / 'checkpoint.pth'
    torch.save({'log_scalars': {'loss': buffer}, 'eta': np.float64(3.0)}, path)
    load_checkpoint_file(_save_classification_checkpoint(models.create_model('resnet18'), tmp_path / 'r18.pth'))
    loaded = torch.load(path, weights_only=True)
    assert loaded['log_scalars']['loss'].mean() == pytest.approx((1.5 + 2 + 3) / 3) and loaded['eta'] == 3.0
    for owner, name in ((HistoryBuffer, 'update'), (np.ndarray, 'tofile')):
        torch.save({'x': _GetAttr(owner, name)}, path)
        with pytest.raises(pickle.UnpicklingError, match=f"refusing getattr.*'{name}'"):
            torch.load(path, weights_only=True)


def test_entry_points_report_user_mistakes(tmp_path):
    result = _run('detection/train.py', 'detection/configs/nope.py')
    assert result.returncode == 2 and 'error: config detection/configs/nope.py does not exist' in result.stderr
    result = _run('detection/test.py', str(CONFIGS[0]), str(tmp_path / 'missing.pth'), '--work-dir', str(tmp_path))
    assert result.returncode == 2 and 'missing.pth does not exist; check the path.' in result.stderr
    if not torch.cuda.is_available():
        result = _run('detection/train.py', str(CONFIGS[0]), '--launcher', 'pytorch', '--work-dir', str(tmp_path))
        assert result.returncode == 2 and 'error: --launcher pytorch needs CUDA GPUs' in result.stderr
