"""SegNet (VGG16-BN encoder, index unpooling) on PASCAL VOC 2012 train_aug (Badrinarayanan,
Kendall & Cipolla, TPAMI 2017, Sec. 4; SegNet-Tutorial ``Models/segnet_train.prototxt`` and
``Models/segnet_solver.prototxt``, the VGG16 SegNet's; ``segnet_basic_*`` are SegNet-Basic's).

    python train.py --config=flaxseg/configs/segnet_voc.py --pretrained=vgg16_bn.pth \\
        --workdir=runs/segnet

Reproduced from the VGG16 SegNet's solver and net (read from alexgkendall/SegNet-Tutorial):
encoder initialised from VGG16 (ImageNet), batch 4 (``batch_size: 4``), SGD with a fixed
learning rate of 0.001 (``base_lr: 0.001``, ``lr_policy: "step"`` with ``gamma: 1.0``, i.e.
constant), momentum 0.9, weight decay 5e-4, 40k iterations, per-pixel softmax cross-entropy;
the prototxt's parameter multipliers: convolution kernels ×1 decayed, convolution biases ×2
without decay, BatchNorm scale ×1 *decayed* (``decay_mult: 1``) and BatchNorm shift ×1 without
decay. The learning rate needs no rescaling: SegNet's ``SoftmaxWithLoss`` has no
``normalize: false``, so Caffe averages it over the pixels as flaxseg's cross-entropy does
(Caffe's default of that era; caffe-segnet's loss layer itself was not re-read).
The paper's CamVid runs weight the classes by median frequency balancing
(``weight_by_label_freqs``): pass ``--config.class_weights`` for that (VOC's recipe has none).
(lr 0.1 is SegNet-Basic's solver, a 4-level net without pretrained encoder.)
Deviations: crop 321 with random scale 0.5–2.0 instead of the tutorial's fixed 360×480 CamVid
images.
"""

from flaxseg.configs import default

# BatchNorm scale/shift: the encoder's (torchvision vgg16_bn ``features.<i>``, i = the BN
# layers' indices) and the decoder's (``<conv>_D/bn``).
VGG16_BN_FEATURES_BN = "1|4|8|11|15|18|21|25|28|31|35|38|41"
SEGNET_BATCHNORM = rf"(^encoder/features_({VGG16_BN_FEATURES_BN})|/bn)"


def get_config():
    config = default.get_config()
    config.model.name = "segnet"
    config.model.backbone = "vgg16_bn"
    config.crop_size = 321
    config.batch_size = 4
    config.steps = 40_000
    config.lr = 0.001
    config.lr_schedule = "constant"
    config.momentum = 0.9
    config.weight_decay = 5e-4
    config.param_groups = (
        {"pattern": SEGNET_BATCHNORM + "/scale$", "weight_decay": 5e-4},
        {"pattern": SEGNET_BATCHNORM + "/bias$", "weight_decay": 0.0},
        {"pattern": r"/bias$", "lr_mult": 2.0, "weight_decay": 0.0},
    )
    return config
