"""Facts shared by data, models, metrics and training (no imports of other flaxseg modules)."""

IGNORE_LABEL = 255

VOC_CLASSES = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
VOC_NUM_CLASSES = len(VOC_CLASSES)

# ImageNet statistics in [0, 1] RGB, used by every ImageNet-initialised backbone.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
