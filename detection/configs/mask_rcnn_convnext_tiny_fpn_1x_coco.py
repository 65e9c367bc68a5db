# Mask R-CNN + FPN, ConvNeXt-T (plain), 1x. ImageNet weights: configs/convnext/convnext_tiny.json.
# ConvNeXt's recipe: drop path 0.4, layer-wise lr decay 0.95 over 6 layers, lr steps at epochs 9 and 11.
_base_ = './_base_/mask_rcnn_fpn_adamw_1x_coco.py'
model = dict(
    backbone=dict(
        _delete_=True,
        type='Plain_ConvNeXt',
        arch='tiny',
        drop_path_rate=0.4,
        init_cfg=dict(type='Pretrained', checkpoint='pretrained/convnext_tiny.pth')),
    neck=dict(in_channels=[96, 192, 384, 768]))
# mmdetection's layer-wise decay constructor (no weight decay on 1-d parameters and biases).
optim_wrapper = dict(
    constructor='LearningRateDecayOptimizerConstructor',
    paramwise_cfg=dict(_delete_=True, decay_rate=0.95, decay_type='layer_wise', num_layers=6))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=12, by_epoch=True, milestones=[9, 11], gamma=0.1),
]
