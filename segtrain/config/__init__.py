"""The configuration: composing it (``compose``), its types and choices (``schema``), what a file's config may
hold (``trust``), and the checks of values against each other (``checks``).

    from segtrain.config import compose_config
    cfg = compose_config(["debug=fast", "loss=focal_dice"])   # what python -m segtrain debug=fast ... runs with
"""

from segtrain.config.compose import (CONFIG_DIR, apply_overrides, compose_config, load_option, override_keys,
                                     split_overrides)

__all__ = ["CONFIG_DIR", "apply_overrides", "compose_config", "load_option", "override_keys", "split_overrides"]
