# Mask R-CNN + FPN, KW 1x ResNet50, 1x. ImageNet weights: configs/resnet50/kw1x_resnet50.json.
_base_ = './_base_/mask_rcnn_fpn_adamw_1x_coco.py'
model = dict(backbone=dict(
    _delete_=True,
    type='KW_ResNet',
    depth=50,
    cell_num_ratio=1,
    reduction=0.0625,
    sharing_range='layer_conv',
    frozen_stages=1,
    norm_eval=True,
    init_cfg=dict(type='Pretrained', checkpoint='pretrained/kw1x_resnet50.pth')))
