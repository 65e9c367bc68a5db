# Mask R-CNN + FPN, ResNet50 (plain), 1x. ImageNet weights: configs/resnet50/resnet50.json.
_base_ = './_base_/mask_rcnn_fpn_adamw_1x_coco.py'
model = dict(backbone=dict(
    _delete_=True,
    type='Plain_ResNet',
    depth=50,
    frozen_stages=1,
    norm_eval=True,
    init_cfg=dict(type='Pretrained', checkpoint='pretrained/resnet50.pth')))
