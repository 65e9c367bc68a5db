# Mask R-CNN + FPN, KW 4x MobileNetV2 1.0, 1x. ImageNet weights: configs/mobilenetv2_100/kw4x_mobilenetv2_100.json
# (which shares warehouses across layers only, not across conv kinds).
_base_ = './mask_rcnn_kw1x_mobilenetv2_100_fpn_1x_coco.py'
model = dict(backbone=dict(
    cell_num_ratio=4,
    sharing_range='layer',
    init_cfg=dict(type='Pretrained', checkpoint='pretrained/kw4x_mobilenetv2_100.pth')))
