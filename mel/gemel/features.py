"""What GEMEL sees of an image: the feature vector its mapper turns into visual tokens (and that
multimodal demonstration retrieval compares), and, in the `cue` prompt, the expert cue's text.

    image_feature="encoder"   the preset's image encoder (paper: CLIP ViT-L/14's pooled output;
                              offline: EfficientNet-Lite0's pooled 1280-d features). The default, and
                              what every mapper saved before this option existed was trained on.
    image_feature="conse"     the ConSE vector (mel.backends.conse): the classifier's top ImageNet
                              labels embedded by the preset's text encoder and averaged by probability,
                              so the image vector lives in the space of entity texts (384-d offline);
                              DIM scores the same vector against entity text. Beyond the paper.

A mapper's checkpoint records which one it was trained on (`MapperConfig.image_feature`; absent
in an old checkpoint: "encoder"), and the linker uses that one unless told otherwise.
"""
from __future__ import annotations

from ..backends.cache import cached_model
from ..errors import InputError

IMAGE_FEATURES = ("encoder", "conse")


@cached_model
def _conse_over(text_encoder, device: str):
    from ..backends.conse import ConSEImageEncoder
    return ConSEImageEncoder(device=device, text_encoder=text_encoder)


def load_conse(preset):
    """The ConSE image encoder in the space of the preset's text encoder (shared per process)."""
    return _conse_over(preset.backend("text_encoder"), getattr(preset, "device", "cpu"))


def check_image_feature(feature: str) -> str:
    if feature not in IMAGE_FEATURES:
        raise InputError(f"image_feature must be one of {IMAGE_FEATURES}, got {feature!r}")
    return feature


def image_feature_encoder(preset, feature: str = "encoder"):
    """(encoder with .encode(images) and .dim, the spec recorded in a mapper's config) for `feature`."""
    check_image_feature(feature)
    if feature == "conse":
        encoder = load_conse(preset)
        return encoder, str(encoder.name)
    return preset.backend("image_encoder"), str(getattr(preset, "image_encoder", ""))
