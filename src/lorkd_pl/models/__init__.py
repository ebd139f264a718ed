"""Models: backbones and heads, teacher loading, losses, the generalist and the LoRKD student."""
