"""SegNet (VGG16-BN encoder, index unpooling) on PASCAL VOC 2012 train_aug (Badrinarayanan,
Kendall & Cipolla, TPAMI 2017, Sec. 4; SegNet-Tutorial ``segnet_train.prototxt`` and solver).

    python train.py --config=flaxseg/configs/segnet_voc.py --pretrained=vgg16_bn.pth \\
        --workdir=runs/segnet

Reproduced: encoder initialised from VGG16 (ImageNet), SGD with a fixed learning rate of 0.1
and momentum 0.9, weight decay 5e-4, biases at ×2 without decay (the prototxt's
``lr_mult: 2, decay_mult: 0``), per-pixel softmax cross-entropy. The paper's CamVid runs
weight the classes by median frequency balancing: pass ``--config.class_weights`` for that
(VOC's recipe has none). Deviations: crop 321 with random scale 0.5–2.0 instead of the paper's
fixed-size inputs, batch 8, 40k iterations.
"""

from flaxseg.configs import default


def get_config():
    config = default.get_config()
    config.model.name = "segnet"
    config.model.backbone = "vgg16_bn"
    config.crop_size = 321
    config.batch_size = 8
    config.steps = 40_000
    config.lr = 0.1
    config.lr_schedule = "constant"
    config.momentum = 0.9
    config.weight_decay = 5e-4
    config.param_groups = ({"pattern": r"/bias$", "lr_mult": 2.0, "weight_decay": 0.0},)
    return config
