"""DeepLab v3+ with aligned Xception-65 on PASCAL VOC 2012 train_aug (Chen et al., ECCV 2018,
Sec. 4; tensorflow/models research/deeplab: ``train.py`` flags, ``model.py`` and
``core/xception.py``).

    python train.py --config=flaxseg/configs/deeplabv3plus_voc.py --pretrained=xception65.pth \\
        --workdir=runs/dlv3p

Reproduced: Xception-65 at output stride 16, depthwise-separable ASPP (6/12/18) and decoder,
crop 513, batch 16, poly lr 0.007 (power 0.9), 30k iterations, momentum 0.9, weight decay 4e-5
(TF DeepLab's default for Xception) on every kernel except the depthwise ones (TF DeepLab's
``regularize_depthwise=False``), random scale 0.5–2.0 and flips, BatchNorm running statistics
with decay 0.9997 (TF DeepLab's ``batch_norm_decay``; flax momentum = TF decay).
For the ResNet-101 variant: ``--backbone=resnet101 --config.weight_decay=1e-4``.
"""

from flaxseg.configs import default

TF_DEEPLAB_BN_DECAY = 0.9997


def get_config():
    config = default.get_config()
    config.model.name = "deeplabv3plus"
    config.model.backbone = "xception65"
    config.model.kwargs = {"output_stride": 16, "bn_momentum": TF_DEEPLAB_BN_DECAY}
    config.crop_size = 513
    config.batch_size = 16
    config.steps = 30_000
    config.lr = 0.007
    config.weight_decay = 4e-5
    config.param_groups = ({"pattern": r"conv_dw/kernel$", "weight_decay": 0.0},)
    return config
