"""CXRBase models: the MAE ViT for pretraining and the ViT classifier for fine-tuning."""
from .classifier import VisionTransformerClassifier, classifier
from .mae import MaskedAutoencoderViT, mae
from .vit import PRESETS

__all__ = ["MaskedAutoencoderViT", "VisionTransformerClassifier", "mae", "classifier", "PRESETS"]
