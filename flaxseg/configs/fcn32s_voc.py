"""FCN-32s on PASCAL VOC: the reference Caffe solver of ``voc-fcn32s`` (Long, Shelhamer & Darrell,
CVPR 2015; fcn.berkeleyvision.org ``voc-fcn32s/solver.prototxt`` and ``net.py``).

    python train.py --config=flaxseg/configs/fcn32s_voc.py --pretrained=vgg16.pth \\
        --workdir=runs/fcn32s

Reproduced: VGG16 initialisation, batch 1, SGD momentum 0.99, fixed learning rate, weight decay
5e-4 on kernels (``decay_mult: 1``) and none on biases, biases at twice the rate
(``lr_mult: 2``), the bilinear ``upscore`` deconvolution frozen (``lr_mult: 0``), 100k
iterations, no scale augmentation, whole images (crop 512 covers every VOC image: at most
500 px a side, the rest is padding that the loss ignores).

Learning rate: Caffe's base_lr 1e-10 multiplies a loss *summed* over the pixels
(``normalize: false``); flaxseg's loss is the per-pixel mean, so the rate here is 1e-10 × 187,500
(the mean VOC image area, 500 × 375). Weight decay is scaled by the inverse factor, 5e-4 / 187,500,
so that the decay step lr·wd·w equals Caffe's 1e-10 × 5e-4 (the L2 term is added to the
gradient before the rate multiplies it, in Caffe's SGD as in flaxseg's optimiser; scaling the
rate alone would decay 187,500× faster than the reference). The three stages' solvers share
weight_decay 5e-4, so FCN-16s/8s inherit this value. Deviations: train_aug (10,582 images)
instead of the paper's SBD train (8,498), and horizontal flips, which the pipeline always
applies.
"""

from flaxseg.configs import default

CAFFE_PIXELS_PER_IMAGE = 500 * 375
CAFFE_WEIGHT_DECAY = 5e-4  # solver.prototxt of voc-fcn32s, -16s and -8s


def get_config():
    config = default.get_config()
    config.model.name = "fcn32s"
    config.model.backbone = "vgg16"
    config.dataset = "voc2012_aug"
    config.crop_size = 512
    config.min_scale = config.max_scale = 1.0
    config.batch_size = 1
    config.steps = 100_000
    config.lr = 1e-10 * CAFFE_PIXELS_PER_IMAGE
    config.lr_schedule = "constant"
    config.momentum = 0.99
    config.weight_decay = CAFFE_WEIGHT_DECAY / CAFFE_PIXELS_PER_IMAGE  # lr·wd = Caffe's
    config.param_groups = (
        {"pattern": r"^upscore", "lr_mult": 0.0},  # fixed bilinear interpolation
        {"pattern": r"/bias$", "lr_mult": 2.0, "weight_decay": 0.0},
    )
    return config
