"""From images to features: safe image decoding and the timm backbone."""
