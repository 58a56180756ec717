"""ml_collections configs. `default.get_config()` is the standard VOC recipe."""
