"""Tiny constructor kwargs per registered model (few channels) for fast tests and train runs.

``models.create_model(name, num_classes=..., **TINY_KWARGS[name])`` builds a model that keeps
every code path of the full one (dropout, BatchNorm, aux heads, the VGG nets' depth) at a few
channels. The ResNet models take ResNet-18 instead of ResNet-50/101: depth, not width, sets their
compile time, and the heads do not depend on the unit type (bottleneck units train in
test_encoders_training.py's ResNeXt, and the full ResNets are checked against torchvision).
"""

TINY_KWARGS = {
    "fcn32s": dict(base_width=4, fc_channels=16),
    "fcn16s": dict(base_width=4, fc_channels=16),
    "fcn8s": dict(base_width=4, fc_channels=16),
    # Bayesian-SegNet dropout on so that train mode exercises the dropout rng.
    "segnet": dict(base_width=4, dropout_rate=0.5),
    "unet": dict(base_channels=4, batchnorm=True, dropout_rate=0.5),
    "pspnet": dict(backbone="resnet18", base_width=4, head_channels=8, aux_channels=8),
    "refinenet": dict(backbone="resnet18", base_width=4, features=8),
    "deeplabv1": dict(base_width=4, fc_channels=16),
    "deeplabv2": dict(backbone="resnet18", base_width=4),
    "deeplabv3": dict(backbone="resnet18", base_width=4, aspp_channels=8),
    "deeplabv3plus": dict(
        backbone="resnet18", base_width=4, aspp_channels=8, low_level_channels=4, decoder_channels=8
    ),
    "fcn_resnet": dict(backbone="resnet18", base_width=4, aux_head=True),
}

# Tiny widths of the encoder models (U-Net with an encoder = smp's Unet, DeepLab v3+'s smp
# head) for tests/test_encoders_training.py; the test adds ``backbone=<encoder>``.
TINY_ENCODER_KWARGS = {
    "unet": dict(base_channels=8),
    "deeplabv3plus": dict(
        head="smp", base_width=8, aspp_channels=8, low_level_channels=4, decoder_channels=8
    ),
}
