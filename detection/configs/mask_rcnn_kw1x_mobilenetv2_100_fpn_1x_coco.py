# Mask R-CNN + FPN, KW 1x MobileNetV2 1.0, 1x. ImageNet weights: configs/mobilenetv2_100/kw1x_mobilenetv2_100.json.
_base_ = './_base_/mask_rcnn_fpn_adamw_1x_coco.py'
model = dict(
    backbone=dict(
        _delete_=True,
        type='KW_MobileNetV2',
        widen_factor=1.0,
        cell_num_ratio=1,
        reduction=0.0625,
        sharing_range='layer_pwconv',
        out_indices=(1, 2, 4, 7),
        frozen_stages=1,
        norm_eval=True,
        init_cfg=dict(type='Pretrained', checkpoint='pretrained/kw1x_mobilenetv2_100.pth')),
    neck=dict(in_channels=[24, 32, 96, 1280]))
