"""DeepLab v3 on PASCAL VOC 2012 train_aug (Chen et al., "Rethinking Atrous Convolution", 2017,
Sec. 4; tensorflow/models research/deeplab's ``train.py`` flags for VOC).

    python train.py --config=flaxseg/configs/deeplabv3_voc.py --pretrained=resnet101.pth \\
        --workdir=runs/dlv3

Reproduced: ResNet-101, output stride 16, multi-grid (1, 2, 4), ASPP rates 6/12/18 with image
pooling and BatchNorm trained (batch 16), crop 513, poly lr 0.007 (power 0.9), 30k iterations,
momentum 0.9, weight decay 1e-4, random scale 0.5–2.0 and flips, BatchNorm running statistics
with decay 0.9997 (TF DeepLab's ``batch_norm_decay``, its ResNet and Xception arg scopes; flax
momentum = TF decay; flaxseg's default is PyTorch's 0.9). This is the paper's first
stage (77.2% val at OS 16 as reported, Table 4 with MG(1, 2, 4)); its second stage (fine-tune
at OS 8 on trainval with frozen BN) and inference at OS 8 with multi-scale + flip are not part
of this recipe.
"""

from flaxseg.configs import default

TF_DEEPLAB_BN_DECAY = 0.9997


def get_config():
    config = default.get_config()
    config.model.name = "deeplabv3"
    config.model.backbone = "resnet101"
    config.model.kwargs = {"output_stride": 16, "bn_momentum": TF_DEEPLAB_BN_DECAY}
    config.crop_size = 513
    config.batch_size = 16
    config.steps = 30_000
    config.lr = 0.007
    config.weight_decay = 1e-4
    return config
