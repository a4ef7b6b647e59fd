"""Training with open_clip's own trainer at DataComp's fixed scales."""
