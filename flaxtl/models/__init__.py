"""Model zoo: VGG16 (Keras layer names) and a small CNN baseline."""
from flaxtl.models.vgg import VGG16, layer_names, trunk_layer_names

__all__ = ["VGG16", "layer_names", "trunk_layer_names"]
