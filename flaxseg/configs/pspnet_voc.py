"""PSPNet-50 on PASCAL VOC 2012 train_aug (Zhao et al., CVPR 2017, Sec. 5.1; hszhao/semseg
``config/voc2012/voc2012_pspnet50.yaml`` and ``tool/train.py``).

    python train.py --config=flaxseg/configs/pspnet_voc.py --pretrained=resnet50_v1c.pth \\
        --workdir=runs/psp

Reproduced: dilated deep-stem ResNet-50 at output stride 8, pyramid pooling (1, 2, 3, 6),
auxiliary head on layer3 with loss weight 0.4, crop 473, batch 16, poly lr 0.01 (power 0.9),
momentum 0.9, random scale 0.5–2.0 and flips, and semseg's parameter groups: the backbone at
the base rate, the pyramid pooling module, the head and the auxiliary head at ×10.
This recipe follows semseg (the released code), not the paper's text, where they differ:
  * length: semseg trains 50 epochs (``epochs: 50``) with ``drop_last=True`` over 8 GPUs of
    batch 2 (``DistributedSampler``: ⌈10,582 / 8⌉ = 1,323 images per GPU, ⌊1,323 / 2⌋ = 661
    batches per epoch): ``max_iter`` = 50 × 661 = 33,050 steps of 16 (the paper says 30K
    iterations for VOC, Sec. 5.1; ``--steps=30000`` for that);
  * weight decay 1e-4 on *every* parameter, biases and BatchNorm scale/shift included
    (``torch.optim.SGD(params_list, weight_decay=...)`` with no exclusions), where flaxseg's
    default decays kernels only; the two rules below say so (an override of
    ``--config.weight_decay`` has to restate them).
Not reproduced: semseg's random rotation (±10°) and Gaussian blur, which the pipeline lacks.
"""

from flaxseg.configs import default

SEMSEG_EPOCHS = 50
# Per epoch: DistributedSampler over 8 GPUs gives each ceil(10582 / 8) = 1323 images, and
# drop_last=True batches of 16 / 8 = 2 leave floor(1323 / 2) = 661 steps.
SEMSEG_BATCHES_PER_EPOCH = (-(-10_582 // 8)) // (16 // 8)


def get_config():
    config = default.get_config()
    config.model.name = "pspnet"
    config.model.backbone = "resnet50"
    config.model.kwargs = {"output_stride": 8}
    config.aux_loss_weight = 0.4
    config.crop_size = 473
    config.batch_size = 16
    config.steps = SEMSEG_EPOCHS * SEMSEG_BATCHES_PER_EPOCH
    config.lr = 0.01
    config.weight_decay = 1e-4
    config.param_groups = (
        {"pattern": r"^(ppm|head|aux_head)/", "lr_mult": 10.0, "weight_decay": 1e-4},
        {"pattern": r"", "weight_decay": 1e-4},  # semseg decays biases and BatchNorm too
    )
    return config
