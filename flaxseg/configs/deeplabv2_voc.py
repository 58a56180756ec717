"""DeepLab v2 (ResNet-101, ASPP-L, MSC) on PASCAL VOC 2012 train_aug (Chen et al., TPAMI 2017,
Sec. 4.1; the released ``deeplab-public-ver2`` ResNet-101 prototxt and solver).

    python train.py --config=flaxseg/configs/deeplabv2_voc.py --pretrained=resnet101.pth \\
        --workdir=runs/dlv2

Reproduced: multi-scale inputs (1, 0.75, 0.5) fused by max, a cross-entropy on each scale and
on the fused scores with equal weights (``aux_loss_weight`` 1.0), BatchNorm frozen as in the
released nets (``use_global_stats: true`` and ``lr_mult: 0`` on its scale and shift), ASPP-L
(rates 6/12/18/24) at ×10 (bias ×20), crop 321, batch 10, poly lr 2.5e-4 (power 0.9), 20k
iterations, momentum 0.9, weight decay 5e-4, random scaling 0.5–1.5 (Sec. 4.1). Every loss
is taken at its score map's resolution (``loss_resolution='score_map'``): the stride-8 maps of
each scale (41, 31 and 21 cells for a 321 crop) and the fused map (41) against the labels
shrunk to each size, as the released nets' ``label_shrink`` Interp layers do, not on scores
upsampled to the crop (``flaxseg.training.steps.shrink_labels``; that each scale's loss
uses labels shrunk to its own map is this recipe's reading, not re-checked in the prototxt).
Deviation: torchvision's ImageNet ResNet-101 (v1.5, stride in the 3×3 conv) instead of the
MSRA Caffe ResNet-101 (stride in the 1×1 conv), unless a converted Caffe file is given.
"""

from flaxseg.configs import default

# BatchNorm scale/offset of the ResNet backbone (bn1..bn3 of every unit, the stem's bn1, the
# shortcut's downsample_1; deep-stem norms stem_1/4/7).
RESNET_BATCHNORM = r"^backbone/(.*/)?(bn\d|downsample_1|stem_\d)/(scale|bias)$"


def get_config():
    config = default.get_config()
    config.model.name = "deeplabv2"
    config.model.backbone = "resnet101"
    config.model.kwargs = {
        "input_scales": [1.0, 0.75, 0.5],
        "frozen_batchnorm": True,
        "output_stride": 8,
    }
    config.aux_loss_weight = 1.0
    config.crop_size = 321
    config.min_scale, config.max_scale = 0.5, 1.5
    config.batch_size = 10
    config.steps = 20_000
    config.lr = 2.5e-4
    config.lr_schedule = "poly"
    config.lr_power = 0.9
    config.momentum = 0.9
    config.weight_decay = 5e-4
    config.loss_resolution = "score_map"  # Caffe's label_shrink: losses on the 1/8 score maps
    config.param_groups = (
        {"pattern": RESNET_BATCHNORM, "lr_mult": 0.0},
        {"pattern": r"^aspp/.*/kernel$", "lr_mult": 10.0},
        {"pattern": r"^aspp/.*/bias$", "lr_mult": 20.0, "weight_decay": 0.0},
    )
    return config
