"""RefineNet (4-cascaded, ResNet-101) on PASCAL VOC 2012 train_aug (Lin et al., CVPR 2017).

    python train.py --config=flaxseg/configs/refinenet_voc.py --pretrained=resnet101.pth \\
        --workdir=runs/refinenet

The original MATLAB/MatConvNet training code is not published in a form this recipe could
follow line by line; the optimisation follows the PyTorch training configuration released with
Light-Weight RefineNet (Nekrasov, Shen & Reid, BMVC 2018) by the same group: SGD momentum 0.9,
encoder lr 5e-4 and decoder lr ×10 (5e-3), weight decay 1e-5, crop 500, batch 6, random scale
0.5–2.0 and flips. The poly schedule over 30k iterations stands in for its three-stage
epoch-based decay.
"""

from flaxseg.configs import default


def get_config():
    config = default.get_config()
    config.model.name = "refinenet"
    config.model.backbone = "resnet101"
    config.crop_size = 500
    config.batch_size = 6
    config.steps = 30_000
    config.lr = 5e-4
    config.weight_decay = 1e-5
    config.param_groups = ({"pattern": r"^(?!backbone/)", "lr_mult": 10.0},)
    return config
