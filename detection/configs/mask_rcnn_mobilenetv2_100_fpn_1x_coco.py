# Mask R-CNN + FPN, MobileNetV2 1.0 (plain), 1x. ImageNet weights: configs/mobilenetv2_100/mobilenetv2_100.json.
_base_ = './_base_/mask_rcnn_fpn_adamw_1x_coco.py'
model = dict(
    backbone=dict(
        _delete_=True,
        type='Plain_MobileNetV2',
        widen_factor=1.0,
        out_indices=(1, 2, 4, 7),
        frozen_stages=1,
        norm_eval=True,
        init_cfg=dict(type='Pretrained', checkpoint='pretrained/mobilenetv2_100.pth')),
    neck=dict(in_channels=[24, 32, 96, 1280]))
