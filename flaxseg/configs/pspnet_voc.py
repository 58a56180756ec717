"""PSPNet-50 on PASCAL VOC 2012 train_aug (Zhao et al., CVPR 2017, Sec. 5.1; hszhao/semseg
``config/voc2012/voc2012_pspnet50.yaml`` and ``tool/train.py``).

    python train.py --config=flaxseg/configs/pspnet_voc.py --pretrained=resnet50_v1c.pth \\
        --workdir=runs/psp

Reproduced: dilated deep-stem ResNet-50 at output stride 8, pyramid pooling (1, 2, 3, 6),
auxiliary head on layer3 with loss weight 0.4, crop 473, batch 16, poly lr 0.01 (power 0.9),
momentum 0.9, weight decay 1e-4, random scale 0.5–2.0 and flips, 50 epochs of 10,582 images
(33,069 iterations of 16), and semseg's parameter groups: the backbone at the base rate, the
pyramid pooling module, the head and the auxiliary head at ×10.
Not reproduced: semseg's random rotation (±10°) and Gaussian blur, which the pipeline lacks.
"""

from flaxseg.configs import default


def get_config():
    config = default.get_config()
    config.model.name = "pspnet"
    config.model.backbone = "resnet50"
    config.model.kwargs = {"output_stride": 8}
    config.aux_loss_weight = 0.4
    config.crop_size = 473
    config.batch_size = 16
    config.steps = 33_069
    config.lr = 0.01
    config.weight_decay = 1e-4
    config.param_groups = ({"pattern": r"^(ppm|head|aux_head)/", "lr_mult": 10.0},)
    return config
