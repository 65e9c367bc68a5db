# Mask R-CNN + FPN, KW 4x ResNet50, 1x. ImageNet weights: configs/resnet50/kw4x_resnet50.json.
_base_ = './mask_rcnn_kw1x_resnet50_fpn_1x_coco.py'
model = dict(backbone=dict(
    cell_num_ratio=4,
    init_cfg=dict(type='Pretrained', checkpoint='pretrained/kw4x_resnet50.pth')))
