"""U-Net on PASCAL VOC 2012 train_aug (Ronneberger, Fischer & Brox, MICCAI 2015, Sec. 3).

    python train.py --config=flaxseg/configs/unet_voc.py --workdir=runs/unet

Reproduced from the paper: the paper's network (no BatchNorm, 'same' padding so that any crop
gives logits of its own size), trained from scratch with SGD at the paper's high momentum 0.99
("a high momentum (0.99) such that a large number of the previously seen training samples
determine the update") on single large tiles (batch 1, crop 512), dropout at the end of the
contracting path. Not in the paper (biomedical data, no learning rate stated): the learning
rate 1e-3 (an effective step of 0.1 with momentum 0.99), the poly schedule, 60k iterations,
weight decay 5e-4, random scale 0.5–2.0 and flips; the paper's border-weight map has no VOC
counterpart.
"""

from flaxseg.configs import default


def get_config():
    config = default.get_config()
    config.model.name = "unet"
    config.model.backbone = "unet"
    config.model.kwargs = {"dropout_rate": 0.5}
    config.crop_size = 512
    config.batch_size = 1
    config.steps = 60_000
    config.lr = 1e-3
    config.momentum = 0.99
    config.weight_decay = 5e-4
    return config
