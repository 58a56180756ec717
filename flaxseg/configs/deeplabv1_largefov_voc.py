"""DeepLab-LargeFOV (DeepLab v1) on PASCAL VOC 2012 train_aug (Chen et al., ICLR 2015, Sec. 4;
the released ``DeepLab-LargeFOV`` ``train.prototxt`` / ``solver.prototxt`` of deeplab-public).

    python train.py --config=flaxseg/configs/deeplabv1_largefov_voc.py --pretrained=vgg16.pth \\
        --workdir=runs/dlv1

Reproduced: VGG16 with the prototxt's 3×3 pools (stride 1 for pool4/pool5, pool5a average
pool), fc6 3×3 rate 12 with 1024 channels (decimated from VGG's fc6), output stride 8, crop
321, mini-batch 20, SGD momentum 0.9, base_lr 0.001 divided by 10 every 2000 iterations, 6000
iterations, weight decay 5e-4 on kernels; the classifier fc8 at ×10 (bias ×20), every other
bias at ×2 without decay. No scale augmentation (the paper crops and mirrors only).
The loss is taken at the score map's resolution, as the prototxt does (fc8's 41×41 stride-8
scores for a 321 crop against the labels shrunk to 41×41 by its ``label_shrink`` Interp layer:
every 8th pixel), not on scores upsampled to 321×321 (``loss_resolution='score_map'``,
``flaxseg.training.steps.shrink_labels``).
The fully connected CRF is post-processing, outside training.
"""

from flaxseg.configs import default


def get_config():
    config = default.get_config()
    config.model.name = "deeplabv1"
    config.model.backbone = "vgg16"
    config.model.kwargs = {"output_stride": 8}
    config.crop_size = 321
    config.min_scale = config.max_scale = 1.0
    config.batch_size = 20
    config.steps = 6_000
    config.lr = 0.001
    config.lr_schedule = "step"
    config.lr_step_size = 2_000
    config.lr_gamma = 0.1
    config.momentum = 0.9
    config.weight_decay = 5e-4
    config.loss_resolution = "score_map"  # Caffe's label_shrink: loss on the 1/8 score map
    config.param_groups = (
        {"pattern": r"^fc8/kernel$", "lr_mult": 10.0},
        {"pattern": r"^fc8/bias$", "lr_mult": 20.0, "weight_decay": 0.0},
        {"pattern": r"/bias$", "lr_mult": 2.0, "weight_decay": 0.0},
    )
    return config
