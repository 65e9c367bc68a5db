# Mask R-CNN + FPN, KW 1x ConvNeXt-T, 1x. ImageNet weights: configs/convnext/kw1x_convnext_tiny.json.
_base_ = './mask_rcnn_convnext_tiny_fpn_1x_coco.py'
model = dict(backbone=dict(
    type='KW_ConvNeXt',
    cell_num_ratio=1,
    reduction=0.0625,
    sharing_range='layer_pwconv',
    init_cfg=dict(type='Pretrained', checkpoint='pretrained/kw1x_convnext_tiny.pth')))
