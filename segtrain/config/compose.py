"""Where the Hydra configs live, and composing them outside a Hydra app.

Entry points other than ``python -m segtrain`` (evaluate, scripts, tests) compose the same
``configs/train.yaml``; a checkpoint stores its run's resolved config and command-line
overrides, and ``apply_overrides`` replaces only what new overrides name.
"""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from segtrain.config import schema

schema.register()  # the configs' defaults lists name these types (configs/*/*.yaml: /schema/...)
# ${segtrain.if_null:${.steps},6}: 6 while trainer.steps is null, else null (configs/trainer/default.yaml).
if not OmegaConf.has_resolver("segtrain.if_null"):
    OmegaConf.register_new_resolver("segtrain.if_null", lambda value, default: default if value is None else None)

# An absolute path: Hydra resolves a relative one against the calling module, which breaks when
# a module is imported (the `segtrain` console script, a wrapper script under torchrun).
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def compose_config(overrides: list[str] | None = None, config_name: str = "train") -> DictConfig:
    """The config ``python -m segtrain <overrides>`` would run with (hydra.* keys left out)."""
    if GlobalHydra.instance().is_initialized():  # inside a Hydra app or a test's compose context
        return compose(config_name=config_name, overrides=list(overrides or []))
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides or []))


def load_option(group: str, option: str) -> DictConfig:
    """One option of a config group as composition gives it (its schema's defaults under the file's
    values, its defaults list resolved), for code that reads one file: ``load_option("weights", "enet")``."""
    loaded = OmegaConf.load(CONFIG_DIR / group / f"{option}.yaml")
    merged = OmegaConf.create()
    for entry in loaded.pop("defaults", []):
        if entry == "_self_":
            continue
        name = str(entry).split("@")[0]
        if name.startswith("/schema/"):
            schema_group, schema_name = name[len("/schema/"):].rsplit("/", 1)
            merged = OmegaConf.merge(merged, OmegaConf.structured(schema.SCHEMAS[schema_group][schema_name]))
        else:  # another option of the same group
            merged = OmegaConf.merge(merged, load_option(group, name))
    return OmegaConf.merge(merged, loaded)


def override_keys(overrides: list[str]) -> list[str]:
    """The key or group each override names (``dataset.root=x`` -> ``dataset.root``, ``+model.x=1`` -> ``model.x``)."""
    return [o.key_or_group for o in OverridesParser.create().parse_overrides(overrides)]


def apply_overrides(saved: DictConfig, saved_overrides: list[str], overrides: list[str]) -> DictConfig:
    """``saved`` with the keys and groups named by ``overrides`` taken from a fresh composition
    of the training command's overrides followed by these ones; everything else stays as saved."""
    if not overrides:
        return saved
    named = set(override_keys(overrides))
    kept = [o.input_line for o in OverridesParser.create().parse_overrides(saved_overrides)
            if o.key_or_group not in named and not o.key_or_group.startswith("hydra")]
    fresh = compose_config(kept + overrides)
    merged = saved.copy()
    for key in sorted(named):
        OmegaConf.update(merged, key, OmegaConf.select(fresh, key), merge=False)
    return merged


# What predict and export change of a checkpoint's config; their other keys are their own config's.
CHECKPOINT_KEYS = ("dataset", "inference")


def split_overrides(overrides: list[str], keys: tuple[str, ...] = CHECKPOINT_KEYS) -> tuple[list[str], list[str]]:
    """(the overrides of the top-level ``keys``, the others): for commands whose own config (configs/predict.yaml,
    configs/export.yaml) sits beside a checkpoint's."""
    named, others = [], []
    for line, parsed in zip(overrides, OverridesParser.create().parse_overrides(overrides)):
        (named if parsed.key_or_group.split(".")[0].lstrip("+~") in keys else others).append(line)
    return named, others


def _plain_defaults(schema_class) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(schema_class), enum_to_str=True)


def upgrade_saved(saved: DictConfig) -> DictConfig:
    """A checkpoint's saved config with the keys that today's configs have and older runs' lack, filled once at
    load with today's defaults (what those runs behaved as): ``inference``, ``report``, ``calibration``,
    ``decision``, every ``trainer`` and ``dataset`` key, ``model.in_channels`` and ``sync_bn``. Before
    ``dataset.tta_flips`` existed, the flips a run trained with were the ones test-time augmentation may use."""
    tree = OmegaConf.to_container(saved)
    dataset = tree.setdefault("dataset", {})
    if "tta_flips" not in dataset:
        augment = dataset.get("augment") or {}
        dataset["tta_flips"] = [flip for flip, key in (("h", "hflip"), ("v", "vflip")) if augment.get(key)]
    defaults = {"inference": OmegaConf.load(CONFIG_DIR / "inference" / "default.yaml"),
                **OmegaConf.load(CONFIG_DIR / "analysis" / "default.yaml"),
                "trainer": _plain_defaults(schema.TrainerConfig), "dataset": _plain_defaults(schema.DatasetConfig),
                "model": {"in_channels": 3, "sync_bn": "auto"}}
    return OmegaConf.merge(OmegaConf.create(defaults), tree)
